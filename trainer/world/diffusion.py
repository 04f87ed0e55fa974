"""A tiny text-to-image UNet for the embedded world, trained by rectified flow in pixel space.

Pixel space 32x32x3 in [-1, 1] (no VAE). Channels 32/64/128; GroupNorm in every resblock;
transformer blocks with LayerNorm: cross-attention to HT-World-CLIP token features at 16x16 and
8x8, self-attention at 8x8. Every norm is an ``nn.GroupNorm`` or ``nn.LayerNorm`` with affine
weights: these are the steering sites.

Flow convention: ``x_t = (1 - t) x_0 + t * noise``, the UNet predicts ``v = noise - x_0``, and
sampling integrates ``dx/dt = v`` from ``t = 1`` (noise) to ``t = 0`` with Euler steps.

Sampling with guidance ``g != 1`` runs the conditional and unconditional rows in ONE UNet call per
step (``[cond; uncond]`` stacked, like ComfyUI), so a hook on any site sees both.

Example::

    imgs = sample(unet, clip, tok, ["a red circle", "a blue circle"], seeds=[0, 0], steps=4)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from . import clip_model as C
from . import world as W

log = logging.getLogger(__name__)

UNET_CONFIG: dict = {"channels": [32, 64, 128], "ctx_dim": 128, "temb_dim": 128, "heads": 4, "groups": 8}


# --------------------------------------------------------------------------- model
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like DDPM timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    a = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, dim: int, ctx_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(ctx_dim, dim, bias=False)
        self.v = nn.Linear(ctx_dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, ctx, mask=None):
        B, N, D = x.shape
        h = self.heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)
        k = self.k(ctx).view(B, ctx.shape[1], h, D // h).transpose(1, 2)
        v = self.v(ctx).view(B, ctx.shape[1], h, D // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """GroupNorm + proj_in, [LN self-attn], LN cross-attn, LN feed-forward, proj_out (SD style)."""

    def __init__(self, dim: int, ctx_dim: int, heads: int, groups: int, self_attn: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.self_attn = self_attn
        if self_attn:
            self.norm1 = nn.LayerNorm(dim)
            self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, ctx_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, ctx, ctx_mask=None):
        B, Cc, H, Wd = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        if self.self_attn:
            n = self.norm1(h)
            h = h + self.attn1(n, n)
        h = h + self.attn2(self.norm2(h), ctx, ctx_mask)
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, Cc, H, Wd))


class WorldUNet(nn.Module):
    """UNet(x (B,3,32,32), t (B,), ctx (B,T,ctx_dim), ctx_mask (B,T) bool or None) -> v."""

    def __init__(self, channels=(32, 64, 128), ctx_dim=128, temb_dim=128, heads=4, groups=8):
        super().__init__()
        c0, c1, c2 = channels
        self.temb_dim = temb_dim
        self.time_mlp = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, temb_dim, groups)  # 32x32
        self.pool0 = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1 = ResBlock(c0, c1, temb_dim, groups)  # 16x16
        self.attn_d1 = TransformerBlock(c1, ctx_dim, heads, groups, self_attn=False)
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, temb_dim, groups)  # 8x8
        self.attn_d2 = TransformerBlock(c2, ctx_dim, heads, groups, self_attn=True)
        self.mid1 = ResBlock(c2, c2, temb_dim, groups)
        self.attn_mid = TransformerBlock(c2, ctx_dim, heads, groups, self_attn=True)
        self.mid2 = ResBlock(c2, c2, temb_dim, groups)
        self.up2 = ResBlock(c2 + c2, c2, temb_dim, groups)  # 8x8
        self.attn_u2 = TransformerBlock(c2, ctx_dim, heads, groups, self_attn=True)
        self.up1 = ResBlock(c2 + c1, c1, temb_dim, groups)  # 16x16
        self.attn_u1 = TransformerBlock(c1, ctx_dim, heads, groups, self_attn=False)
        self.up0 = ResBlock(c1 + c0, c0, temb_dim, groups)  # 32x32
        self.norm_out = nn.GroupNorm(groups, c0)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, ctx, ctx_mask=None):
        if ctx_mask is not None:  # (B, T) bool keep -> SDPA mask (B, 1, 1, T)
            ctx_mask = ctx_mask[:, None, None, :]
        temb = self.time_mlp(timestep_embedding(t, self.temb_dim).to(x.dtype))
        h0 = self.down0(self.conv_in(x), temb)
        h1 = self.attn_d1(self.down1(self.pool0(h0), temb), ctx, ctx_mask)
        h2 = self.attn_d2(self.down2(self.pool1(h1), temb), ctx, ctx_mask)
        m = self.mid2(self.attn_mid(self.mid1(h2, temb), ctx, ctx_mask), temb)
        u = self.attn_u2(self.up2(torch.cat([m, h2], 1), temb), ctx, ctx_mask)
        u = F.interpolate(u, scale_factor=2, mode="nearest")
        u = self.attn_u1(self.up1(torch.cat([u, h1], 1), temb), ctx, ctx_mask)
        u = F.interpolate(u, scale_factor=2, mode="nearest")
        u = self.up0(torch.cat([u, h0], 1), temb)
        return self.conv_out(F.silu(self.norm_out(u)))


def build_unet(config: dict | None = None) -> WorldUNet:
    cfg = config or UNET_CONFIG
    return WorldUNet(tuple(cfg["channels"]), cfg["ctx_dim"], cfg["temb_dim"], cfg["heads"], cfg["groups"])


# --------------------------------------------------------------------------- conditioning + sampler
@torch.no_grad()
def encode_prompts(clip, tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP per-token features (B, T, width) the UNet is conditioned on (frozen CLIP)."""
    dev = next(clip.parameters()).device
    return C.text_tokens(clip, tokenizer(list(prompts)).to(dev)).float()


def initial_noise(seeds, n: int, device="cpu") -> torch.Tensor:
    """(n, 3, 32, 32) starting noise; per-image int seeds (list) or one torch.Generator."""
    if isinstance(seeds, torch.Generator):
        return torch.randn(n, 3, W.SIZE, W.SIZE, generator=seeds).to(device)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts; pass one seed per prompt")
    out = [torch.randn(3, W.SIZE, W.SIZE, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device)


def timesteps(steps: int, shift: float = 1.0) -> list[float]:
    """t from 1 to 0 in ``steps`` Euler steps (``shift > 1`` spends more steps at high noise)."""
    ts = np.linspace(1.0, 0.0, steps + 1)
    ts = shift * ts / (1 + (shift - 1) * ts)
    return [float(t) for t in ts]


def denoise_step(
    unet: nn.Module,
    x: torch.Tensor,
    t: float,
    t_next: float,
    ctx: torch.Tensor,
    uncond_ctx: torch.Tensor | None = None,
    guidance: float = 1.0,
    grad: bool = False,
) -> torch.Tensor:
    """One Euler step of the flow ODE from ``t`` to ``t_next``.

    With ``guidance != 1`` and ``uncond_ctx`` given, ONE UNet call on ``[x; x]`` with contexts
    ``[ctx; uncond_ctx]`` (rows 0..B-1 conditional, B..2B-1 unconditional); otherwise one call on
    the conditional rows only. ``grad=True`` keeps the autograd graph.

    Args:
        x: (B, 3, 32, 32) current sample at time t.
        ctx, uncond_ctx: (B, T, D) CLIP token features.
    Returns: (B, 3, 32, 32) sample at time t_next.
    """
    with torch.set_grad_enabled(grad):
        B = x.shape[0]
        tt = torch.full((B,), t, device=x.device)
        if guidance != 1.0 and uncond_ctx is not None:
            v = unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([ctx, uncond_ctx]))
            vc, vu = v[:B], v[B:]
            v = vu + guidance * (vc - vu)
        else:
            v = unet(x, tt, ctx)
        return x + (t_next - t) * v


def sample(
    unet: nn.Module,
    clip,
    tokenizer,
    prompts: list[str],
    seeds,
    steps: int = 4,
    guidance: float = 2.0,
    grad: bool = False,
    detach_between_steps: bool = True,
    shift: float = 1.0,
    noise: torch.Tensor | None = None,
    ctx: torch.Tensor | None = None,
    uncond_ctx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate images (B, 3, 32, 32) in [0, 1] for ``prompts``.

    Deterministic per seed: ``seeds`` is a list of ints (one per prompt: the same seed gives the
    same starting noise whatever the prompt) or a ``torch.Generator``. ``guidance=1`` skips the
    unconditional rows (one cheaper forward per step). ``grad=True`` keeps the graph of every
    step; ``detach_between_steps`` cuts it between steps (each step then back-props alone).
    ``noise`` (B, 3, 32, 32) replaces the seeded noise; ``ctx``/``uncond_ctx`` (B, T, D) replace
    the encoded prompts / empty prompts.
    """
    dev = next(unet.parameters()).device
    n = len(prompts) if ctx is None else ctx.shape[0]
    ctx = encode_prompts(clip, tokenizer, prompts).to(dev) if ctx is None else ctx.to(dev)
    unc = None
    if guidance != 1.0:
        unc = encode_prompts(clip, tokenizer, [""] * n).to(dev) if uncond_ctx is None else uncond_ctx.to(dev)
    x = noise.to(dev) if noise is not None else initial_noise(seeds, n, dev)
    ts = timesteps(steps, shift)
    for t, tn in zip(ts[:-1], ts[1:]):
        if detach_between_steps:
            x = x.detach()
        x = denoise_step(unet, x, t, tn, ctx, unc, guidance, grad)
    return ((x + 1) / 2).clamp(0, 1)


# --------------------------------------------------------------------------- training
@dataclass
class UNetTrainConfig:
    seed: int = 0  # seeds init, data and timesteps
    minutes: float = 90.0  # wall-clock guard (stops at whichever of minutes/steps comes first)
    steps: int = 4000  # optimizer steps (the schedule runs over these, so a rebuild is the same recipe on any device)
    batch: int = 64  # images per step
    lr: float = 1e-3  # AdamW learning rate (constant after warm-up, cosine over the last 30%)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup: int = 200  # linear warm-up steps
    cond_drop: float = 0.1  # fraction of empty captions (for classifier-free guidance)
    ema: float = 0.999  # EMA decay of the shipped weights
    bf16: bool = True  # bf16 autocast (CPU or CUDA)
    p_colour: float = 0.8  # fraction of captions naming the colour
    p_pattern: float = 0.7  # fraction of captions naming the pattern
    device: str = "cpu"  # "cpu" or "cuda"; the frozen CLIP is moved there too


def train_unet(clip, tokenizer, cfg: UNetTrainConfig, progress: bool = True, on_eval=None):
    """Rectified-flow training of a fresh WorldUNet against frozen CLIP; returns (ema_unet, stats)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    dev = cfg.device
    unet = build_unet().to(dev)
    clip = clip.to(dev)
    ema = copy.deepcopy(unet).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    clip.eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget = cfg.minutes * 60
    t0 = time.time()
    step, ema_loss = 0, None
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, disable=not progress, mininterval=10)
    except ImportError:  # pragma: no cover
        bar = None
    while step < cfg.steps and time.time() - t0 < budget:
        frac = max(step / cfg.steps, (time.time() - t0) / budget)  # the steps, or the guard if it comes first
        decay = 1.0 if frac < 0.7 else 0.5 * (1 + math.cos(math.pi * (frac - 0.7) / 0.3))
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * max(decay, 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        specs = W.sample_specs(cfg.batch, rng, p_colour=cfg.p_colour, p_pattern=cfg.p_pattern)
        x0 = W.render_batch(specs).to(dev) * 2 - 1
        caps = [W.caption(s) if rng.random() >= cfg.cond_drop else "" for s in specs]
        ctx = encode_prompts(clip, tokenizer, caps)
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(cfg.batch) * 1.0).to(dev)  # logit-normal timesteps (drawn on the CPU: same stream on any device)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            v = unet(xt, t, ctx)
        loss = F.mse_loss(v.float(), noise - x0)
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
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{ema_loss:.4f}")
        if step % 250 == 0:
            log.info("unet step %d loss %.4f lr %.2e (%.1f min)", step, ema_loss, lr, (time.time() - t0) / 60)
        if on_eval is not None and step % 1000 == 0:
            on_eval(ema, step)
    if bar is not None:
        bar.close()
    stats = {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "final_loss": ema_loss, "config": asdict(cfg)}
    clip.to("cpu")
    return ema.cpu(), stats


# --------------------------------------------------------------------------- save / load
def save_unet(unet, path: str, stats: dict | None = None, dtype=torch.float16) -> None:
    meta = {
        "format": "ht-world-unet/1",
        "config": json.dumps(UNET_CONFIG),
        "flow": "rectified flow, x_t=(1-t)x0+t*noise, v=noise-x0, pixels in [-1,1]",
        "stats": json.dumps(stats or {}),
    }
    C.save_module(unet, path, meta, dtype)


def load_world_unet(path: str, device: str = "cpu") -> WorldUNet:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "ht-world-unet/1":
        raise ValueError(
            f"{path}: metadata 'format' is {meta.get('format')!r}, expected "
            "'ht-world-unet/1'; rebuild with `python -m trainer.world.build`"
        )
    unet = build_unet(json.loads(meta["config"]))
    unet.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return unet.eval().to(device)
