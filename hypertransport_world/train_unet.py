"""Rectified-flow training of the world's UNet, in ComfyUI's classes, on the ComfyUI CLIP's conditioning.

The UNet (:func:`~hypertransport_world.model.new_diffusion_model`) learns ComfyUI's flow convention
(``ModelType.FLOW``): at noise level ``σ`` the input is ``x_σ = (1 − σ) x_0 + σ ε`` and the output
``ε − x_0``, with ``x_0`` the VAE's latent of a rendered scene (pixels mapped to [−1, 1]) and the
timestep ``model_sampling.timestep(σ)``. Captions are encoded by the world's ComfyUI CLIP exactly as
``CLIPTextEncode`` encodes them (the batched call below is checked against it in the tests), 10 % of
them empty for classifier-free guidance. AdamW, bf16 autocast, EMA weights are what is saved.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import model as WM
from . import scene as S

log = logging.getLogger(__name__)


@dataclass
class UNetTrainConfig:
    seed: int = 0  # seeds init, data and noise levels
    minutes: float = 150.0  # wall-clock guard (stops at whichever of minutes/steps comes first)
    steps: int = 5000  # optimizer steps (the schedule runs over these, so a rebuild is the same recipe on any device)
    batch: int = 64  # images per step
    lr: float = 1e-3  # AdamW learning rate (constant after warm-up, cosine over the last 30%)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup: int = 200  # linear warm-up steps
    cond_drop: float = 0.1  # fraction of empty captions (for classifier-free guidance)
    ema: float = 0.999  # EMA decay of the saved weights
    bf16: bool = True  # bf16 autocast (CPU with AMX or CUDA)
    p_colour: float = 0.8  # fraction of captions naming the colour
    p_pattern: float = 0.7  # fraction of captions naming the pattern
    device: str = "cpu"  # "cpu" or "cuda"


class CaptionEncoder:
    """Captions → ``(B, 16, C)`` token features of the world's ComfyUI CLIP, batched: ComfyUI's tokenizer,
    then one call of ComfyUI's ``SDClipModel`` (what ``CLIP.encode_from_tokens`` computes for a prompt of
    one 16-token section without weights)."""

    def __init__(self, clip):
        self.clip = clip
        self.model = clip.cond_stage_model.clip_l

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            sections = self.clip.tokenize(c)["l"]
            if len(sections) != 1 or any(w != 1.0 for _, w in sections[0]):
                raise ValueError(f"caption {c!r} is not one unweighted {WM.TOKENS}-token section")
            rows.append([t for t, _ in sections[0]])
        z, _ = self.model(rows)
        return z.float()


def flow_loss(diffusion, model_sampling, x0: torch.Tensor, ctx: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
              bf16: bool) -> torch.Tensor:
    """Mean squared error of the UNet's output against ``ε − x_0`` at noise levels ``sigma`` (B,)."""
    s = sigma.view(-1, 1, 1, 1)
    xt = model_sampling.calculate_input(sigma, (1 - s) * x0 + s * noise)
    t = model_sampling.timestep(sigma).float()
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        v = diffusion(xt, t, context=ctx)
    return F.mse_loss(v.float(), noise - x0)


def train_unet(clip, cfg: UNetTrainConfig, progress: bool = True, on_checkpoint=None):
    """Train a fresh world UNet against the frozen ComfyUI ``clip``; returns ``(ema BaseModel, stats)``."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    dev = torch.device(cfg.device)
    base = WM.new_diffusion_model(torch.float32, device=dev)
    WM.init_weights_(base.diffusion_model, cfg.seed)
    unet = base.diffusion_model.train()
    ema_model = copy.deepcopy(base)
    ema = ema_model.diffusion_model.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    ms = base.model_sampling
    encode = CaptionEncoder(clip)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget, t0 = cfg.minutes * 60, time.time()
    step, ema_loss = 0, None
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, disable=not progress, mininterval=10)
    while step < cfg.steps and time.time() - t0 < budget:
        frac = max(step / cfg.steps, (time.time() - t0) / budget)  # the steps, or the guard if it comes first
        decay = 1.0 if frac < 0.7 else 0.5 * (1 + math.cos(math.pi * (frac - 0.7) / 0.3))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * max(decay, 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        specs = S.sample_specs(cfg.batch, rng, p_colour=cfg.p_colour, p_pattern=cfg.p_pattern)
        x0 = (S.render_batch(specs) * 2 - 1).to(dev)  # the pixel-space VAE's latent
        caps = [S.caption(s) if rng.random() >= cfg.cond_drop else "" for s in specs]
        ctx = encode(caps).to(dev)
        noise = torch.randn(x0.shape).to(dev)
        sigma = torch.sigmoid(torch.randn(cfg.batch)).to(dev)  # logit-normal noise levels (drawn on the CPU: one stream on any device)
        loss = flow_loss(unet, ms, x0, ctx, sigma, noise, cfg.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
        if step % 250 == 0:
            log.info("unet step %d loss %.4f lr %.2e (%.1f min)", step, ema_loss, lr, (time.time() - t0) / 60)
        if on_checkpoint is not None and step % 1000 == 0:
            on_checkpoint(ema, step)
    bar.close()
    stats = {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "final_loss": ema_loss, "config": asdict(cfg)}
    return ema_model.to("cpu"), stats
