"""HT-World-CLIP: a tiny CLIP built with open_clip's own classes, trained on the embedded world.

Vision: a ViT on 32x32 images, patch 4, width 128, 3 layers. Text: open_clip's default BPE
tokenizer (vocab 49408) with context length 16, width 128, 3 layers. Shared embedding dim 128.

Training is InfoNCE with a learned temperature, with *multi-positive* targets: caption j is a
positive for image i whenever image i has every attribute caption j names ("red" matches every red
object), so single-word captions ("dark slate blue", "coarse-checkered") can be mixed in without
false negatives.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import open_clip
import torch
from safetensors.torch import load_file, save_file

from . import scene as W

log = logging.getLogger(__name__)

MODEL_NAME = "HT-World-CLIP"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # the image tower sees [0, 1] images as (x - 0.5) / 0.5, see preprocess
FORMAT = "ht-world-clip/1"
CLIP_CONFIG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "layers": 3, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
}


def register() -> None:
    """Register HT-World-CLIP with open_clip so ``open_clip.create_model(MODEL_NAME)`` works."""
    from open_clip import factory

    factory._MODEL_CONFIGS[MODEL_NAME] = json.loads(json.dumps(CLIP_CONFIG))


def build_clip(config: dict | None = None, device: str | torch.device | None = None) -> open_clip.model.CLIP:
    """A randomly initialised HT-World-CLIP (open_clip.model.CLIP); ``device="meta"`` allocates nothing."""
    cfg = config or CLIP_CONFIG
    with torch.device(device or "cpu"):
        return open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])


def write_open_clip_config(path: str) -> None:
    """HT-World-CLIP's open_clip model config (``open_clip.add_model_config(path)`` registers it)."""
    with open(path, "w") as f:
        json.dump(CLIP_CONFIG, f, indent=2)
        f.write("\n")


def get_tokenizer(context_length: int = 16) -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's default BPE tokenizer (vocab shipped in the package), ``context_length`` 16."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def preprocess(imgs: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) images in [0, 1] -> the image tower's input range [-1, 1]."""
    return imgs * 2.0 - 1.0


def encode_text(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Normalized pooled text embeddings (n, embed_dim)."""
    dev = next(model.parameters()).device
    return model.encode_text(tokenizer(texts).to(dev), normalize=True)


def encode_image(model, imgs: torch.Tensor) -> torch.Tensor:
    """Normalized image embeddings (n, embed_dim) of images in [0, 1]."""
    return model.encode_image(preprocess(imgs), normalize=True)


# --------------------------------------------------------------------------- training data
def _caption_attrs(spec: W.Spec, rng: np.random.Generator, p_single: float) -> tuple[str, dict]:
    """A caption for the spec and the attributes it names."""
    u = rng.random()
    if u < p_single:  # a single concept word alone
        k = rng.integers(3)
        if k == 0:
            return spec.colour, {"colour": spec.colour}
        if k == 1:
            return spec.pattern, {"pattern": spec.pattern}
        return spec.shape, {"shape": spec.shape}
    attrs = {"shape": spec.shape}
    if spec.say_colour:
        attrs["colour"] = spec.colour
    if spec.say_pattern:
        attrs["pattern"] = spec.pattern
    return W.caption(spec), attrs


def make_batch(n: int, rng: np.random.Generator, p_single: float = 0.3):
    specs = W.sample_specs(n, rng, p_colour=0.85, p_pattern=0.7)
    imgs = W.render_batch(specs)
    caps, attrs = zip(*[_caption_attrs(s, rng, p_single) for s in specs])
    keys = (("colour", W.COLOUR_NAMES), ("pattern", W.PATTERNS), ("shape", W.SHAPES))
    match = torch.ones(n, n, dtype=torch.bool)
    for key, names in keys:
        img_v = torch.tensor([names.index(getattr(s, key)) for s in specs])
        cap_v = torch.tensor([names.index(a[key]) if key in a else -1 for a in attrs])
        match &= (cap_v[None, :] == -1) | (img_v[:, None] == cap_v[None, :])
    match = match.float()
    return imgs, list(caps), match


def contrastive_loss(img_f, txt_f, logit_scale, match):
    """Multi-positive InfoNCE; ``match[i, j] = 1`` if caption j describes image i."""
    logits = logit_scale.exp() * img_f @ txt_f.T
    t_i = match / match.sum(1, keepdim=True)
    t_t = match.T / match.T.sum(1, keepdim=True)
    li = -(t_i * logits.log_softmax(1)).sum(1).mean()
    lt = -(t_t * logits.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (li + lt)


@dataclass
class ClipTrainConfig:
    seed: int = 0  # seeds the model init and the data stream
    minutes: float = 60.0  # wall-clock guard; training stops at whichever of minutes/steps comes first
    steps: int = 2000  # optimizer steps (the schedule runs over these, so a rebuild is the same recipe on any device)
    batch: int = 128  # images per step (captions per step too)
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay over the steps)
    weight_decay: float = 0.05  # AdamW weight decay
    p_single: float = 0.3  # fraction of captions that are one concept word alone
    warmup: int = 100  # linear warm-up steps
    device: str = "cpu"  # "cpu" or "cuda"


def train_clip(cfg: ClipTrainConfig, progress: bool = True) -> tuple[open_clip.model.CLIP, dict]:
    """Train HT-World-CLIP from scratch; returns the model (eval mode) and a stats dict."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_clip().to(cfg.device)
    tok = get_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget = cfg.minutes * 60
    t0 = time.time()
    step, ema_loss = 0, None
    model.train()
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, disable=not progress, mininterval=10)
    except ImportError:  # pragma: no cover
        bar = None
    while step < cfg.steps and time.time() - t0 < budget:
        frac = max(step / cfg.steps, (time.time() - t0) / budget)  # the steps, or the guard if it comes first
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1)))
        for g in opt.param_groups:
            g["lr"] = lr
        imgs, caps, match = make_batch(cfg.batch, rng, cfg.p_single)
        imgs, match = imgs.to(cfg.device), match.to(cfg.device)
        img_f = model.encode_image(preprocess(imgs), normalize=True)
        txt_f = model.encode_text(tok(caps).to(cfg.device), normalize=True)
        loss = contrastive_loss(img_f, txt_f, model.logit_scale, match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{ema_loss:.3f}", T=f"{model.logit_scale.exp().item():.1f}")
        if step % 200 == 0:
            log.info(
                "clip step %d loss %.4f scale %.1f (%.1f min)",
                step,
                ema_loss,
                model.logit_scale.exp().item(),
                (time.time() - t0) / 60,
            )
    if bar is not None:
        bar.close()
    model.eval().cpu()
    stats = {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "final_loss": ema_loss, "config": asdict(cfg)}
    return model, stats


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, n: int = 512, seed: int = 123) -> dict[str, float]:
    """Zero-shot retrieval from images: colour words, pattern words, shape words, by argmax cosine."""
    rng = np.random.default_rng(seed)
    specs = W.sample_specs(n, rng)
    img_f = encode_image(model, W.render_batch(specs))
    out = {}
    for key, names in (("colour", W.COLOUR_NAMES), ("pattern", W.PATTERNS), ("shape", W.SHAPES)):
        txt_f = encode_text(model, tokenizer, names)
        pred = (img_f @ txt_f.T).argmax(1)
        truth = torch.tensor([names.index(getattr(s, key)) for s in specs])
        out[f"{key}_top1"] = (pred == truth).float().mean().item()
        if key == "colour":  # within-40-RGB counts as right for near-duplicate CSS colours
            rgb = torch.tensor([W.COLOURS[n_] for n_ in names], dtype=torch.float32)
            err = (rgb[pred] - rgb[truth]).norm(dim=1)
            out["colour_within40"] = (err <= 40).float().mean().item()
    # image -> full caption retrieval among the batch's own captions
    caps = [W.caption(W.Spec(s.shape, s.colour, s.pattern, s.cx, s.cy, s.r)) for s in specs]
    txt_f = encode_text(model, tokenizer, caps)
    out["caption_top1"] = ((img_f @ txt_f.T).argmax(1) == torch.arange(n)).float().mean().item()
    return out


# --------------------------------------------------------------------------- save / load
def save_module(module: torch.nn.Module, path: str, meta: dict[str, str], dtype=torch.float16) -> None:
    """Write ``module``'s weights in ``dtype`` with ``meta`` as safetensors, atomically (temp file, then rename)."""
    import os

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)


def save_clip(model, path: str, stats: dict | None = None, dtype=torch.float16) -> None:
    meta = {
        "format": FORMAT,
        "model_name": MODEL_NAME,
        "config": json.dumps(CLIP_CONFIG),
        "tokenizer": "open_clip SimpleTokenizer(context_length=16)",
        "stats": json.dumps(stats or {}),
    }
    save_module(model, path, meta, dtype)


def load_world_clip(path: str, device: str = "cpu"):
    """Load HT-World-CLIP weights -> (model in eval mode, fp32, tokenizer)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: metadata 'format' is {meta.get('format')!r}, expected "
            "'ht-world-clip/1'; rebuild with `python -m hypertransport_world.build`"
        )
    cfg = json.loads(meta["config"])
    model = build_clip(cfg)
    sd = {k: v.float() for k, v in load_file(path).items()}
    model.load_state_dict(sd)
    model.eval().to(device)
    tok = get_tokenizer(cfg["text_cfg"]["context_length"])
    return model, tok
