"""Tiny random-weight models from ComfyUI's own classes, random hypernets and a tiny open_clip encoder.

ComfyUI allocates layers uninitialised (``torch.empty``): every tiny model is filled by
:func:`init_random_` from a fixed seed. Model files written here are detected by ComfyUI's own loaders.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


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
    text_projection=None,
    text_templates: tuple[str, ...] = (),
):
    """A :class:`HyperNet` for ``diffusion_model``'s sites with random, non-zero heads (not the identity);
    ``text_projection`` ``(width, d)``: the encoder's, kept in the file."""
    import torch

    from hypertransport_core.hypernet import HyperNet, HyperNetConfig
    from hypertransport_core.sites import detect_family, list_sites

    family = family or detect_family(diffusion_model)
    sites = list_sites(diffusion_model, family, form=form)
    torch.manual_seed(seed)
    hn = HyperNet(
        HyperNetConfig(embed_dim=int(encoder_identity["embed_dim"]), hidden=16, depth=1, rank=2,
                       text_width=0 if text_projection is None else int(text_projection.shape[0]),
                       text_templates=tuple(text_templates)),
        sites,
        family=family,
        encoder=dict(encoder_identity),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (hn.channel_w, hn.channel_b, hn.offset_w, hn.offset_b):
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        if text_projection is not None:
            hn.text_projection.copy_(text_projection)
    return hn.eval()


def write_hypernet(base: str | os.PathLike, name: str, diffusion_model, encoder_identity: dict, **kw) -> str:
    """Save :func:`random_hypernet` as ``models/hypertransport/<name>``; returns the file name."""
    from hypertransport_core.files import save_hypernet

    d = Path(base) / "models" / "hypertransport"
    d.mkdir(parents=True, exist_ok=True)
    save_hypernet(str(d / name), random_hypernet(diffusion_model, encoder_identity, **kw), training={"test": True})
    return name


#: a smaller UNet of the world's kind (ComfyUI's UNetModel, SD1.5 names, 3-channel pixels) for fast trainer tests
TINY_WORLD_UNET = {
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "disable_self_attentions": [True, True],
}


def tiny_world(seed: int = 0, weights_dir: str | None = None):
    """The world's CLIP, VAE and CLIP_VISION with a small random UNet in its place (``WorldModels``)."""
    import torch

    from hypertransport_world import model as WM

    base = WM.new_diffusion_model(torch.float32, config={**WM.UNET_CONFIG, **TINY_WORLD_UNET})
    init_random_(base.diffusion_model, seed)
    return WM.load(weights_dir or WM.WEIGHTS_DIR, unet=WM.patcher_for(base))


def tiny_world_backend(seed: int = 0, steps: int = 2, guidance: float = 2.0, **kw):
    """A trainer backend on :func:`tiny_world` (meaningless images, real code paths)."""
    from hypertransport_comfy.backend import ComfyBackend

    return ComfyBackend.world(models=tiny_world(seed), steps=steps, guidance=guidance, **kw)


class HashTextEncoder:
    """Stands in for a text encoder too large to build here (CLIP-G, T5-XXL): a fixed random token embedding
    per prompt (seeded by a hash of the text), in CLIPTextEncode's output form ``[cond, extras]``. Equal
    prompts give equal conditioning."""

    def __init__(self, dim: int, tokens: int = 8, pooled_dim: int | None = None):
        self.dim, self.tokens, self.pooled_dim = dim, tokens, pooled_dim

    def __call__(self, prompt: str) -> list:
        import hashlib

        import torch

        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % 2**63
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn((1, self.tokens, self.dim), generator=g)
        extras = {"pooled_output": torch.randn((1, self.pooled_dim), generator=g)} if self.pooled_dim else {}
        return [cond, extras]


def tiny_backend(patcher, encoder, context_dim: int, *, pooled_dim: int | None = None, concepts=None, neutral=None,
                 tokens: int = 8, **kw):
    """A trainer backend on a tiny random-weight ComfyUI model with :class:`HashTextEncoder` conditioning
    (``pooled_dim``: 1280 for SDXL, the vector width for Flux); concepts from the shipped list by default."""
    from hypertransport_comfy.backend import ComfyBackend
    from hypertransport_comfy.concepts import ListedConcepts, read_concepts, read_prompts

    source = ListedConcepts(concepts if concepts is not None else read_concepts(), neutral if neutral is not None else read_prompts())
    return ComfyBackend(patcher, HashTextEncoder(context_dim, tokens, pooled_dim), encoder, source, **kw)


def write_tiny_sd3(base: str | os.PathLike, name: str = "tiny_sd3_mmdit.safetensors") -> str:
    """``models/diffusion_models/<name>``: a one-block SD3 MMDiT (hidden 64) that UNETLoader detects as SD3, a
    family HyperTransport has no site table for (skipped when present). Returns the file name."""
    import comfy.model_detection
    import comfy.supported_models as sm
    import safetensors.torch
    import torch

    path = Path(base) / "models" / "diffusion_models" / name
    if path.exists():
        return name
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = sm.SD3({
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "input_size": None, "adm_in_channels": 32,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 64}},
        "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    })
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "")
    init_random_(model.diffusion_model, 7)
    sd = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
    found = type(comfy.model_detection.model_config_from_unet(sd, "")).__name__
    assert found == "SD3", found
    safetensors.torch.save_file(sd, str(path))
    return name
