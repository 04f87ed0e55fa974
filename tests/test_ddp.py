"""Data parallel training (2 processes, gloo) equals one process; a run killed with SIGKILL resumes to the
same weights as an uninterrupted one (a tiny ComfyUI SD1.5 model, disk target cache, the trainer as a
subprocess)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from world_helpers import CONCEPTS  # noqa: E402


def _cfg(out: Path, **kw):
    # lr 1e-3: Adam divides by sqrt(v), so float-rounding differences in near-zero gradients (the ranks run
    # smaller batches through the model) grow with lr; at 1e-2 one entry of 13k drifted 2e-5 in 4 steps.
    from world_helpers import tiny_config

    # the loss at every sampler step: with one step per batch the drawn step is the same on every rank (it comes from the
    # batch's RNG), but the single-step gradients hold more near-zero entries for Adam to amplify the ranks' rounding in
    return tiny_config(out, **{"steps": 4, "concepts_per_step": 5, "ckpt_every": 2, "eval_every": 2, "lr": 1e-3,
                               "loss_steps": "all", **kw})


def _worker(rank: int, world: int, port: int, out: str, result: str):
    from trainer import distributed

    torch.set_num_threads(1)
    # what torchrun sets; trainer.distributed.setup() reads it (gloo without CUDA)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert distributed.setup() and distributed.world_size() == world
    try:
        import ht_devkit
        from trainer import train as T

        ht_devkit.setup_comfy(base_directory=os.path.join(out, "comfy_base"))
        backend = ht_devkit.tiny_world_backend(seed=0, steps=2, guidance=2.0)
        run = T.train(_cfg(Path(out)), backend, progress=False)
        assert run.shard == (rank, world)
        torch.save({k: v.clone() for k, v in run.hypernet.state_dict().items()}, f"{result}.{rank}")
    finally:
        distributed.cleanup()


def test_concept_slices_cover_the_batch():
    from trainer.distributed import concept_slice

    for n in (2, 5, 8):
        for w in (1, 2, 3):
            if w > n:
                continue
            parts = [concept_slice(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


@pytest.mark.comfy
def test_two_processes_match_one(tmp_path, comfy):
    import torch.multiprocessing as mp

    from trainer import train as T

    torch.set_num_threads(1)
    single = T.train(_cfg(tmp_path / "single"), comfy.tiny_world_backend(seed=0, steps=2, guidance=2.0), progress=False)
    assert single.shard is None
    result = str(tmp_path / "ddp.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path / "ddp"), result), nprocs=2, join=True)
    r0, r1 = torch.load(f"{result}.0"), torch.load(f"{result}.1")
    for k, v in single.hypernet.state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=0, atol=1e-5, msg=k)
        torch.testing.assert_close(r1[k], r0[k], rtol=0, atol=0, msg=k)  # ranks stay identical
    # only rank 0 wrote files; they hold the same weights
    from hypertransport_core import load_hypernet

    hn = load_hypernet(str(tmp_path / "ddp" / "run" / "hypernet.safetensors"))
    torch.testing.assert_close(hn.offset_w, single.hypernet.offset_w.detach(), rtol=0, atol=1e-5)
    log = (tmp_path / "ddp" / "run" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4  # one writer
    losses = [json.loads(ln)["loss"] for ln in log]
    assert losses == pytest.approx([h["loss"] for h in single.history if "loss" in h], rel=1e-5)


# --------------------------------------------------------------------------- SIGKILL + --resume
DRIVER = r'''
import json, os, sys, time
sys.path[:0] = [{tests!r}, {repo!r}]
import torch
torch.set_num_threads(1)
import ht_devkit as ch
ch.setup_comfy(base_directory={base!r})
enc = ch.write_tiny_encoder({base!r})
from trainer import train as T
from hypertransport_comfy.concepts import ConceptInfo
concepts = [ConceptInfo(c, "colour", "{{prompt}}, in {{concept}} colours") for c in {concepts!r}]
neutral = ["a house", "a cat", "a tree", "a boat", "a street", "a bowl of fruit"]
backend = ch.tiny_backend(ch.tiny_sd15(), enc, 64, concepts=concepts, neutral=neutral, resolution=64, steps=2)
cfg = T.TrainConfig(**json.loads(sys.argv[1]))
hang = int(os.environ.get("HT_HANG_AT", "0"))
if hang:
    real = T.train_step
    def slow(run):
        if run.step >= hang:
            print("HANGING", flush=True)
            time.sleep(600)
        return real(run)
    T.train_step = slow
run = T.train(cfg, backend, progress=False)
torch.save(run.hypernet.state_dict(), os.path.join(cfg.out, "final.pt"))
'''


def _driver(tmp_path: Path) -> Path:
    p = tmp_path / "driver.py"
    p.write_text(DRIVER.format(tests=str(REPO / "tests"), repo=str(REPO), base=str(tmp_path / "base"), concepts=CONCEPTS))
    return p


def _ckpt_step(path: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return int(f.metadata()["step"])
    except Exception:
        return -1


@pytest.mark.comfy
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    if not (REPO / ".comfyui" / "ComfyUI").is_dir() and not os.environ.get("COMFYUI_DIR"):
        pytest.skip("ComfyUI not found")
    drv = _driver(tmp_path)
    kw = dict(backend="comfy", steps=6, n_target=4, concepts_per_step=3, prompts_per_concept=3, n_refs=1, sampler_steps=2,
              guidance=1.0, ckpt_every=2, eval_every=0, hidden=32, rank=4, lr=1e-2, holdout_frac=0.3, cache="disk",
              cache_chunk=4, image_frac=0.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    py = sys.executable

    full = dict(kw, out=str(tmp_path / "full"))
    subprocess.run([py, str(drv), json.dumps(full)], check=True, env=env, cwd=REPO, capture_output=True, timeout=300)

    cut = dict(kw, out=str(tmp_path / "cut"))
    proc = subprocess.Popen([py, str(drv), json.dumps(cut)], env={**env, "HT_HANG_AT": "5"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ckpt = tmp_path / "cut" / "checkpoint.safetensors"
    try:
        t0 = time.time()
        while _ckpt_step(ckpt) < 4:  # the checkpoint of step 4 is on disk; the process is inside step 5
            assert proc.poll() is None, "the trainer ended before it was killed"
            assert time.time() - t0 < 240, "no checkpoint at step 4"
            time.sleep(0.2)
        assert proc.stdout.readline().strip() == "HANGING"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "hypernet.safetensors").exists()

    subprocess.run([py, str(drv), json.dumps(dict(cut, resume=True))], check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=300)
    a = torch.load(tmp_path / "full" / "final.pt")
    b = torch.load(tmp_path / "cut" / "final.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
