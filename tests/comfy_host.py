"""A real ComfyUI to test the node pack against, in-process or as a server; no GPU needed.

Which ComfyUI (first found wins):

1. ``$COMFYUI_DIR``;
2. the ComfyUI holding this pack, when the repository sits in ``<ComfyUI>/custom_nodes/``;
3. ``<repo>/.comfyui/ComfyUI`` (what ``scripts/get_comfyui.sh`` unpacks).

Import-order gotchas handled by :func:`setup_comfy`:

* ``comfy.model_management`` reads ``comfy.cli_args.args`` at import time, so ``args.cpu`` (and
  ``args.base_directory``) are set first.
* ``nodes.py`` puts ``<ComfyUI>/comfy`` first on ``sys.path``; ComfyUI's top-level ``utils`` package
  must be imported before ``nodes`` or ``import server`` fails later.
* This repository has a ``nodes/`` folder too: ComfyUI's directory goes to the front of ``sys.path``
  so ``import nodes`` means ComfyUI's ``nodes.py``; the pack is imported as a package under its own
  name (:func:`load_pack`), exactly as ComfyUI's ``load_custom_node`` does.
* ComfyUI allocates layers uninitialised (``torch.empty``): every tiny model is filled by
  :func:`init_random_` from a fixed seed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE = "hypertransport_pack"


if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # appended: ComfyUI's own `nodes` module keeps precedence over our `nodes/`
from trainer.comfy_backend import find_comfyui  # noqa: E402  (one search order for the trainer and the tests)

MISSING_REASON = (
    "ComfyUI not found (looked at $COMFYUI_DIR, the ComfyUI holding this repo in custom_nodes/, and "
    f"{REPO / '.comfyui' / 'ComfyUI'}). Fix: run `bash scripts/get_comfyui.sh` or set COMFYUI_DIR."
)


def setup_comfy(base_directory: str | os.PathLike | None = None):
    """Import ComfyUI in-process on the CPU. Returns ``comfy.model_management``."""
    root = find_comfyui()
    if root is None:
        raise RuntimeError(MISSING_REASON)
    if "nodes" in sys.modules and not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(str(root)):
        del sys.modules["nodes"]  # our nodes/ package imported by mistake: ComfyUI's nodes.py is meant
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # same as `main.py --cpu`
    comfy.cli_args.args.disable_all_custom_nodes = True
    if base_directory is not None:
        comfy.cli_args.args.base_directory = str(base_directory)
    import comfy.model_management as mm
    import utils.extra_config  # noqa: F401  (must precede `import nodes`)

    return mm


def load_pack(name: str = PACK_MODULE):
    """Import this repository as a ComfyUI custom-node package (``__init__.py`` by file location)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# tiny random-weight models from ComfyUI's own classes
# --------------------------------------------------------------------------------------------
def init_random_(module, seed: int = 0):
    """Fill every parameter deterministically (ComfyUI layers start as uninitialised memory)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.device.type == "meta":
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith("weight") or name.endswith("scale"):  # norm weights
                p.copy_(1.0 + 0.02 * torch.randn(p.shape, generator=g))
            else:  # PixArt scale_shift_table, y_embedding, ...
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def patcher_for(model_config, seed: int = 0, dtype=None, device=None):
    """A real ``ModelPatcher`` around ``model_config.get_model`` with random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    model_config.set_inference_dtype(dtype or torch.float32, None)
    model = model_config.get_model({}, "", device=device)
    if device is None or str(device) != "meta":
        init_random_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=torch.device("cpu")
    )


def unet_config(family: str, model_channels: int, context_dim: int, *, full: bool = False) -> dict:
    """UNet config for SD1.5 / SDXL; ``full=True`` gives the released model's layout."""
    if family == "sd15":
        cfg = {
            "adm_in_channels": None,
            "use_linear_in_transformer": False,
            "context_dim": context_dim,
            "model_channels": model_channels,
            "channel_mult": [1, 2, 4, 4] if full else [1, 2],
            "num_res_blocks": [2, 2, 2, 2] if full else [1, 1],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0] if full else [1, 1],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0] if full else [1, 1, 1, 1],
            "transformer_depth_middle": 1,
        }
    elif family == "sdxl":
        cfg = {
            "num_classes": "sequential",
            "adm_in_channels": 2816,
            "use_linear_in_transformer": True,
            "context_dim": context_dim,
            "model_channels": model_channels,
            "channel_mult": [1, 2, 4] if full else [1, 2],
            "num_res_blocks": [2, 2, 2] if full else [1, 1],
            "transformer_depth": [0, 0, 2, 2, 10, 10] if full else [0, 1],
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10] if full else [0, 0, 1, 1],
            "transformer_depth_middle": 10 if full else 1,
        }
    else:
        raise ValueError(family)
    cfg.update(
        {
            "use_checkpoint": False,
            "image_size": 32,
            "use_spatial_transformer": True,
            "legacy": False,
            "in_channels": 4,
            "out_channels": 4,
            "use_temporal_resblock": False,
            "use_temporal_attention": False,
        }
    )
    return cfg


def tiny_sd15(seed=0, context_dim=64, model_channels=32, dtype=None):
    """SD1.5-family UNet (supported_models.SD15 / model_base.BaseModel / openaimodel.UNetModel)."""
    import comfy.supported_models as sm

    return patcher_for(sm.SD15(unet_config("sd15", model_channels, context_dim)), seed, dtype)


def tiny_sdxl(seed=0, context_dim=64, model_channels=64, dtype=None):
    """SDXL-family UNet (supported_models.SDXL / model_base.SDXL); model_channels a multiple of 64."""
    import comfy.supported_models as sm

    return patcher_for(sm.SDXL(unet_config("sdxl", model_channels, context_dim)), seed, dtype)


def pixart_config(sigma=True, hidden_size=96, depth=2, caption_channels=32, num_heads=4):
    return {
        "image_model": "pixart_sigma" if sigma else "pixart_alpha",
        "num_heads": num_heads,
        "patch_size": 2,
        "hidden_size": hidden_size,
        "in_channels": 4,
        "depth": depth,
        "caption_channels": caption_channels,
        "model_max_length": 16 if hidden_size < 1152 else 300,
        "input_size": 16 if hidden_size < 1152 else 128,
        "pe_interpolation": 0.25 if hidden_size < 1152 else 2.0,
        "micro_condition": not sigma,
    }


def tiny_pixart(seed=0, sigma=True, hidden_size=96, depth=2, caption_channels=32, dtype=None):
    """PixArt-Alpha/Sigma DiT (latent side must exceed 32; hidden_size divisible by 3 and 4)."""
    import comfy.supported_models as sm

    cfg = (sm.PixArtSigma if sigma else sm.PixArtAlpha)(pixart_config(sigma, hidden_size, depth, caption_channels))
    return patcher_for(cfg, seed, dtype)


def flux_config(hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=32, vec_in_dim=32):
    pe = hidden_size // num_heads
    axes = [pe - 2 * (pe * 3 // 8), pe * 3 // 8, pe * 3 // 8] if hidden_size < 3072 else [16, 56, 56]
    return {
        "image_model": "flux",
        "guidance_embed": True,
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "vec_in_dim": vec_in_dim,
        "context_in_dim": context_in_dim,
        "hidden_size": hidden_size,
        "mlp_ratio": 4.0,
        "num_heads": num_heads,
        "depth": depth,
        "depth_single_blocks": depth_single_blocks,
        "axes_dim": axes,
        "theta": 10000,
        "qkv_bias": True,
    }


def tiny_flux(seed=0, hidden_size=64, depth=1, depth_single_blocks=1, context_in_dim=32, dtype=None):
    """Flux-dev DiT (supported_models.Flux / model_base.Flux / ldm.flux.model.Flux), 16-channel latents."""
    import comfy.supported_models as sm

    cfg = sm.Flux(flux_config(hidden_size, 2, depth, depth_single_blocks, context_in_dim, 32))
    return patcher_for(cfg, seed, dtype)


#: family -> (builder, cond kwargs, latent shape for 2-step tests)
FAMILIES = {
    "sd15": (tiny_sd15, {"kind": "sd15", "dim": 64}, (1, 4, 8, 8)),
    "sdxl": (tiny_sdxl, {"kind": "sdxl", "dim": 64}, (1, 4, 8, 8)),
    "pixart": (tiny_pixart, {"kind": "pixart", "dim": 32}, (1, 4, 40, 40)),
    "flux": (tiny_flux, {"kind": "flux", "dim": 32}, (1, 16, 8, 8)),
}


def random_cond(kind, seed=1, batch=1, tokens=8, dim=64, latent_hw=(8, 8)):
    """A CONDITIONING list ``[[tensor(B,T,C), extras]]`` as CLIPTextEncode would output."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = torch.randn((batch, tokens, dim), generator=g)
    extra = {}
    if kind == "sdxl":
        h, w = latent_hw[0] * 8, latent_hw[1] * 8
        extra = {
            "pooled_output": torch.randn((batch, 1280), generator=g),
            "width": w,
            "height": h,
            "target_width": w,
            "target_height": h,
            "crop_w": 0,
            "crop_h": 0,
        }
    elif kind == "flux":
        extra = {"pooled_output": torch.randn((batch, 32), generator=g), "guidance": 3.5}
    return [[c, extra]]


def sample(
    patcher,
    positive,
    negative,
    seed=42,
    steps=2,
    cfg=2.0,
    latent_shape=(1, 4, 8, 8),
    sampler_name="euler",
    scheduler="normal",
):
    """``comfy.sample.sample`` as KSampler calls it; returns the latent."""
    import comfy.sample
    import torch

    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        patcher,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent,
        denoise=1.0,
        disable_pbar=True,
        seed=seed,
    )


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


# --------------------------------------------------------------------------------------------
# model files for a server / the in-process executor
# --------------------------------------------------------------------------------------------
def write_model_files(base: str | os.PathLike) -> dict:
    """Random-weight files ComfyUI's own loaders accept, under ``base/models`` (skipped when present).

    * ``diffusion_models/tiny_sd15_unet.safetensors``: a reduced SD1.5 UNet, detected as SD15;
    * ``loras/tiny_sd15_lora.safetensors``: a rank-2 LoRA for it (one conv), for stacking;
    * ``diffusion_models/tiny_pixart_sigma.safetensors``: a one-block PixArt-Sigma (hidden 1152,
      captions 4096), detected as PixArtSigma;
    * ``vae_approx/taesd_*`` and ``taesdxl_*``: random TAESD ("taesd" / "taesdxl" in VAELoader).

    Text encoders are not written: CLIP-L/G and T5-XXL have fixed sizes in ComfyUI (246 MB to 9 GB);
    the end-to-end tests feed random conditioning of the right width instead (``HTTestConditioning``).
    Returns ``{"sd15": unet name, "pixart": unet name, "lora": lora name}``.
    """
    import comfy.model_detection
    import comfy.supported_models as sm
    import comfy.taesd.taesd as taesd
    import safetensors.torch
    import torch

    base = Path(base)
    for d in ("diffusion_models", "loras", "vae_approx", "hypertransport", "clip"):
        (base / "models" / d).mkdir(parents=True, exist_ok=True)

    def save_unet(path, cfg, expect, seed):
        if path.exists():
            return
        cfg.set_inference_dtype(torch.float32, None)
        model = cfg.get_model({}, "")
        init_random_(model.diffusion_model, seed)
        sd = {k: v.to(torch.float16).contiguous() for k, v in model.diffusion_model.state_dict().items()}
        found = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
        assert found == expect, (found, expect)
        safetensors.torch.save_file(sd, str(path))

    sd15 = base / "models" / "diffusion_models" / "tiny_sd15_unet.safetensors"
    save_unet(
        sd15,
        sm.SD15(
            {
                **unet_config("sd15", 320, 768),
                "channel_mult": [1],
                "num_res_blocks": [1],
                "transformer_depth": [1],
                "transformer_depth_output": [1, 1],
            }
        ),
        "SD15",
        0,
    )
    pixart = base / "models" / "diffusion_models" / "tiny_pixart_sigma.safetensors"
    save_unet(pixart, sm.PixArtSigma(pixart_config(True, 1152, 1, 4096, 16)), "PixArtSigma", 4)
    lora = base / "models" / "loras" / "tiny_sd15_lora.safetensors"
    if not lora.exists():
        g = torch.Generator().manual_seed(5)
        k = "diffusion_model.input_blocks.1.1.proj_in"
        safetensors.torch.save_file(
            {
                f"{k}.lora_down.weight": torch.randn(2, 320, 1, 1, generator=g) * 0.1,
                f"{k}.lora_up.weight": torch.randn(320, 2, 1, 1, generator=g) * 0.1,
            },
            str(lora),
        )
    for prefix in ("taesd", "taesdxl"):
        for part, ctor, seed in (("encoder", taesd.Encoder, 2), ("decoder", taesd.Decoder, 3)):
            p = base / "models" / "vae_approx" / f"{prefix}_{part}.safetensors"
            if not p.exists():
                net = init_random_(ctor(4), seed)
                safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p))
    return {"sd15": sd15.name, "pixart": pixart.name, "lora": lora.name}


def build_from_file(path: str | os.PathLike):
    """The diffusion model of a UNet file on the ``meta`` device (for its site list, no memory)."""
    import comfy.model_detection
    import safetensors.torch
    import torch

    sd = safetensors.torch.load_file(str(path))
    cfg = comfy.model_detection.model_config_from_unet(sd, "")
    cfg.set_inference_dtype(torch.float32, None)
    return cfg.get_model({}, "", device=torch.device("meta")).diffusion_model


# --------------------------------------------------------------------------------------------
# a tiny random open_clip encoder and random-but-nonzero hypernets (no downloads)
# --------------------------------------------------------------------------------------------
TINY_CLIP_ARCH = "ht-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_encoder(base: str | os.PathLike, seed: int = 0):
    """``models/hypertransport/ht-tiny-clip.json`` (open_clip config) + ``models/clip/ht-tiny-clip.safetensors``.

    Returns the :class:`~hypertransport_core.encoders.ConceptEncoder` loaded back from the file.
    """
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    from hypertransport_core.encoders import ConceptEncoder

    base = Path(base)
    cfg_dir = base / "models" / "hypertransport"
    w_dir = base / "models" / "clip"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    w_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = cfg_dir / f"{TINY_CLIP_ARCH}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(str(cfg_path))
    weights = w_dir / f"{TINY_CLIP_ARCH}.safetensors"
    if not weights.exists():
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
        init_random_(model, seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return ConceptEncoder.from_open_clip(TINY_CLIP_ARCH, weights=str(weights))


def random_hypernet(
    diffusion_model,
    encoder_identity: dict,
    *,
    family: str | None = None,
    form: str | None = None,
    seed: int = 0,
    scale: float = 0.2,
):
    """A :class:`HyperNet` for ``diffusion_model``'s sites with random, non-zero heads (not the identity)."""
    import torch

    from hypertransport_core.hypernet import HyperNet, HyperNetConfig
    from hypertransport_core.sites import detect_family, list_sites

    family = family or detect_family(diffusion_model)
    sites = list_sites(diffusion_model, family, form=form)
    torch.manual_seed(seed)
    hn = HyperNet(
        HyperNetConfig(embed_dim=int(encoder_identity["embed_dim"]), hidden=16, depth=1, rank=2),
        sites,
        family=family,
        encoder=dict(encoder_identity),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (hn.channel_w, hn.channel_b, hn.offset_w, hn.offset_b):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return hn.eval()


def write_hypernet(base: str | os.PathLike, name: str, diffusion_model, encoder_identity: dict, **kw) -> str:
    """Save :func:`random_hypernet` as ``models/hypertransport/<name>``; returns the file name."""
    from hypertransport_core.files import save_hypernet

    d = Path(base) / "models" / "hypertransport"
    d.mkdir(parents=True, exist_ok=True)
    save_hypernet(str(d / name), random_hypernet(diffusion_model, encoder_identity, **kw), training={"test": True})
    return name


# --------------------------------------------------------------------------------------------
# a real server on loopback
# --------------------------------------------------------------------------------------------
E2E_NODES_SRC = '''"""Test-only nodes for the HyperTransport end-to-end tests (written by tests/comfy_host.py)."""
import torch


class HTTestConditioning:
    """Random CONDITIONING of a given width: stands in for text encoders too large to fake (CLIP-G, T5-XXL)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}), "seed": ("INT", {"default": 0}),
                             "dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, text, seed, dim, tokens):
        g = torch.Generator().manual_seed(seed + len(text))
        return ([[torch.randn((1, tokens, dim), generator=g), {}]],)


NODE_CLASS_MAPPINGS = {"HTTestConditioning": HTTestConditioning}
'''


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
    inp = base / "input"
    inp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(inp / "example.png")
    Image.fromarray(rng.integers(0, 255, (1, 1, 4), dtype=np.uint8), "RGBA").save(inp / "odd_rgba.png")
    Image.fromarray(rng.integers(0, 255, (7, 300), dtype=np.uint8), "L").save(inp / "odd_gray.png")
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    cn = base / "custom_nodes"
    cn.mkdir(parents=True, exist_ok=True)
    link = cn / "HyperTransport"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    (cn / "ht_e2e_test_nodes").mkdir(exist_ok=True)
    (cn / "ht_e2e_test_nodes" / "__init__.py").write_text(E2E_NODES_SRC)
    return {**names, "encoder": enc.identity}


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
            raise RuntimeError(MISSING_REASON)
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


# ------------------------------------------------------------------ ComfyUI's real executor, no HTTP
class DummyServer:
    """What ``execution.PromptExecutor`` touches on the server."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def prompt_executor():
    """A ``PromptExecutor`` without caching (every prompt runs every node)."""
    import execution

    return execution.PromptExecutor(DummyServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})


def run_prompt(ex, prompt: dict):
    """Validate ``prompt`` (API form) as the server does, then execute it on ``ex``; returns ``ex``."""
    import asyncio
    import uuid

    import execution

    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert valid[0], valid
    ex.execute(prompt, pid, {}, valid[2])
    return ex


def constant_node(name: str, return_types: tuple[str, ...], values: tuple):
    """Register a test node ``name`` without inputs that outputs ``values``; returns its class."""
    import nodes

    cls = type(name, (), {
        "RETURN_TYPES": return_types,
        "FUNCTION": "run",
        "CATEGORY": "testing",
        "INPUT_TYPES": classmethod(lambda cls: {"required": {}}),
        "run": lambda self: values,
    })
    nodes.NODE_CLASS_MAPPINGS[name] = cls
    return cls
