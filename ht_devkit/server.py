"""A real ComfyUI server on loopback with this pack installed, for end-to-end tests and screenshots."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from hypertransport_comfy.comfyui import MISSING, REPO, find_comfyui

from .tiny import build_from_file, write_hypernet, write_model_files, write_tiny_encoder

#: the pack's folder name in custom_nodes, as the README's install (git clone, ComfyUI-Manager) makes it
PACK_FOLDER = "comfyui-hypertransport"


def prepare_server_base(base: str | os.PathLike) -> dict:
    """Everything a server needs under ``base``: model files, the tiny encoder, hypernets named as the
    workflows expect (made for the tiny stand-in models), a corrupt file, input images, this pack in
    ``custom_nodes/`` (a symlink) and the test-only nodes. Returns the names written."""
    import numpy as np
    from PIL import Image

    base = Path(base)
    names = write_model_files(base)
    enc = write_tiny_encoder(base)
    dms = {k: build_from_file(base / "models" / "diffusion_models" / names[k]) for k in ("sd15", "pixart")}
    write_hypernet(base, "hypertransport_sdxl_dmd2.safetensors", dms["sd15"], enc.identity, seed=1)
    write_hypernet(base, "hypertransport_pixart.safetensors", dms["pixart"], enc.identity, seed=2)
    (base / "models" / "hypertransport" / "corrupt.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{oops")
    write_hostile_hypernet(base / "models" / "hypertransport" / "hypertransport_sdxl_dmd2.safetensors",
                           base / "models" / "hypertransport" / "deep_header.safetensors")
    # what an interrupted save leaves behind: never offered in a file list
    (base / "models" / "hypertransport" / ".tmp-0123456789abcdef.safetensors").write_bytes(b"partial")
    inp = base / "input"
    inp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(inp / "example.png")
    Image.fromarray(rng.integers(0, 255, (1, 1, 4), dtype=np.uint8), "RGBA").save(inp / "odd_rgba.png")
    Image.fromarray(rng.integers(0, 255, (7, 300), dtype=np.uint8), "L").save(inp / "odd_gray.png")
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    cn = link_pack(base)
    test_nodes = cn / "ht_e2e_test_nodes"
    if not test_nodes.exists():
        test_nodes.symlink_to(Path(__file__).resolve().parent / "test_nodes", target_is_directory=True)
    return {**names, "encoder": enc.identity}


def link_pack(base: str | os.PathLike) -> Path:
    """This pack in ``base/custom_nodes`` (a symlink, named as the README installs it); returns that folder."""
    cn = Path(base) / "custom_nodes"
    cn.mkdir(parents=True, exist_ok=True)
    link = cn / PACK_FOLDER
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return cn


def with_metadata(src, dst, **changes) -> str:
    """``src`` rewritten to ``dst`` with metadata keys changed (a non-string value is JSON-encoded), the tensor bytes
    copied as they are: the content hash no longer matches, as in a file edited by hand."""
    import json
    import struct

    with open(src, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    header["__metadata__"].update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in changes.items()})
    body = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)
    return str(dst)


def write_hostile_hypernet(src, dst, **arch) -> None:
    """``src`` with its recorded trunk claiming ``arch`` (default: 500 layers of width 1024): a 15 KB file that
    would allocate gigabytes if the header were trusted before its tensors are checked."""
    import json

    from hypertransport_core.tensorfile import read_layout

    cfg = json.loads(read_layout(src, what="hypernet").metadata["arch"])
    with_metadata(src, dst, arch={**cfg, **(arch or {"depth": 500, "hidden": 1024})})


def error_text(entry: dict) -> str:
    """What ComfyUI said against a prompt: the validation response (HTTP 400) or its execution errors, as JSON."""
    import json

    if "response" in entry:  # rejected by validation (HTTP 400)
        return json.dumps(entry["response"])
    return json.dumps([m for m in entry["status"].get("messages", []) if m[0] == "execution_error"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``main.py --cpu`` on 127.0.0.1 with ``--base-directory base``; stopped by its own PID."""

    def __init__(self, base: str | os.PathLike, port: int | None = None, python: str = sys.executable):
        import subprocess

        self.base = Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = find_comfyui()
        if root is None:
            raise RuntimeError(MISSING)
        self.log_path = self.base / "server.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("HT_TEST_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [
                python,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(self.base),
                "--disable-auto-launch",
                "--disable-api-nodes",
            ],
            cwd=root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.time() + 180
        while True:
            try:
                self.get("/system_stats")
                break
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("ComfyUI server did not start:\n" + self.log()[-4000:]) from None
                time.sleep(0.25)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 30):
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns ``(http status, body)`` (validation errors come back as 400)."""
        import json
        import urllib.error
        import urllib.request
        import uuid

        data = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4())}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of a finished prompt (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                st = h[prompt_id]["status"]
                if st["completed"] or st.get("status_str") == "error":
                    return h[prompt_id]
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        status, body = self.post_prompt(prompt)
        if status != 200:
            return {"status": {"status_str": "invalid", "completed": False}, "response": body, "http": status}
        return self.wait(body["prompt_id"], timeout)

    def stop(self):
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
