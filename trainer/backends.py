"""What the trainer and evaluator need from a text-to-image model, and the embedded world's version.

A backend knows its steerable module tree (``root``), its sites, its concept encoder, how to write
neutral (source) and concept (target) prompts, and how to run its sampler on prompts with the
caller's hooks active. The trainer never touches the model otherwise, so a ComfyUI-loaded model is
one more backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hypertransport_core import ConceptEncoder, Site, SiteRule, SiteTable, list_sites, register_table
from hypertransport_core.sites import NORM_TYPES, SITE_TABLES

WORLD_WEIGHTS = os.path.join(os.path.dirname(__file__), "world", "weights")
#: the hypernet a default `python trainer/train.py` run writes, and the copy of one shipped with the world
RUN_HYPERNET = os.path.join("runs", "world", "hypernet.safetensors")
SHIPPED_HYPERNET = os.path.join(WORLD_WEIGHTS, "world_hypernet.safetensors")


def default_hypernet() -> str:
    """``runs/world/hypernet.safetensors`` when a default training run made one, else the shipped hypernet."""
    return RUN_HYPERNET if os.path.isfile(RUN_HYPERNET) else SHIPPED_HYPERNET

if "world" not in SITE_TABLES:
    register_table(
        SiteTable(
            "world",
            "the embedded world's UNet (trainer/world/diffusion.py): every GroupNorm/LayerNorm",
            (SiteRule(r".+", NORM_TYPES, "pooled"),),
        )
    )


@dataclass(frozen=True)
class ConceptInfo:
    name: str  # the concept's words, what the user types ("dark slate blue", "coarse-checkered")
    kind: str  # "colour" or "pattern" in the world; free text elsewhere


class WorldBackend:
    """The embedded world: HT-World-CLIP + the world UNet + its Euler flow sampler.

    Args:
        clip, tokenizer, unet: the world's models (see :func:`WorldBackend.load`).
        steps: sampler steps.
        guidance: classifier-free guidance (1.0: one conditional forward per step).
        form: site form for spatial (GroupNorm) sites, "pooled" or "elementwise".
        precision: "bf16"/"fp16" run the UNet under autocast (bf16 is 2x faster on CPUs with AMX; norms, and
            so the steered sites, stay fp32 under autocast), "fp32" runs it in full precision.
    """

    family = "world"

    def __init__(self, clip: nn.Module, tokenizer, unet: nn.Module, steps: int = 4, guidance: float = 2.0, form: str = "pooled",
                 precision: str = "fp32"):
        from trainer.world import world as W

        self.W = W
        self.clip, self.tokenizer, self.unet = clip.eval(), tokenizer, unet.eval()
        for p in list(clip.parameters()) + list(unet.parameters()):
            p.requires_grad_(False)
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision {precision!r}: use fp32, bf16 or fp16")
        self.steps, self.guidance, self.precision = steps, guidance, precision
        self.root = unet
        self.sites: list[Site] = list_sites(unet, "world", form=form)
        self.encoder = ConceptEncoder.from_model(clip, tokenizer, "HT-World-CLIP", mean=(0.5,) * 3, std=(0.5,) * 3)
        self.concepts = [ConceptInfo(n, "colour") for n in W.COLOUR_NAMES] + [ConceptInfo(p, "pattern") for p in W.PATTERNS]

    @classmethod
    def load(cls, weights: str = WORLD_WEIGHTS, device: str = "cpu", **kw) -> WorldBackend:
        """The shipped world models (``trainer/world/weights``), on ``device``."""
        from trainer.world.clip_model import load_world_clip
        from trainer.world.diffusion import load_world_unet

        clip_path, unet_path = os.path.join(weights, "world_clip.safetensors"), os.path.join(weights, "world_unet.safetensors")
        for p in (clip_path, unet_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} is missing. Fix: rebuild the world with `python -m trainer.world.build`.")
        clip, tok = load_world_clip(clip_path, device)
        return cls(clip, tok, load_world_unet(unet_path, device), **kw)

    @classmethod
    def tiny_random(cls, seed: int = 0, **kw) -> WorldBackend:
        """A randomly initialised, smaller world model (tests only: fast, meaningless images)."""
        from trainer.world.clip_model import build_clip, get_tokenizer
        from trainer.world.diffusion import build_unet

        torch.manual_seed(seed)
        clip = build_clip()
        unet = build_unet({"channels": [16, 32, 32], "ctx_dim": 128, "temb_dim": 32, "heads": 2, "groups": 4})
        return cls(clip, get_tokenizer(16), unet, **kw)

    # -- prompts -----------------------------------------------------------------------------
    def concept_info(self, name: str) -> ConceptInfo:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"{name!r} is not a concept of the embedded world (see trainer/world/world.py)")

    def source_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """Neutral prompts: ``"a {shape}"`` (colour and pattern left to the model)."""
        return [self.W.neutral_prompt(str(s)) for s in rng.choice(self.W.SHAPES, n)]

    def target_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        """The same prompts with the concept: ``"a {concept} {shape}"``."""
        return [f"a {concept} {s}" for s in rng.choice(self.W.SHAPES, n)]

    def paired_prompts(self, concept: str, shapes: Sequence[str]) -> tuple[list[str], list[str]]:
        """(neutral, prompted) prompts for the same shapes, for evaluation."""
        return [self.W.neutral_prompt(s) for s in shapes], [f"a {concept} {s}" for s in shapes]

    def reference_images(self, concept: str, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` ground-truth renders showing the concept (other attributes random), ``(n, H, W, 3)`` in [0, 1]."""
        info = self.concept_info(concept)
        kw = {"colours": [concept]} if info.kind == "colour" else {"patterns": [concept]}
        specs = self.W.sample_specs(n, rng, **kw)
        return self.W.render_batch(specs).permute(0, 2, 3, 1)

    # -- sampling ------------------------------------------------------------------------------
    @property
    def rows_per_prompt(self) -> int:
        """Rows each prompt takes in one UNet call (2 with guidance: cond rows first, then uncond)."""
        return 1 if self.guidance == 1.0 else 2

    def cond_rows(self, a: torch.Tensor) -> torch.Tensor:
        """The conditional rows of one UNet call's batch (all rows without guidance)."""
        return a if self.rows_per_prompt == 1 else a[: a.shape[0] // 2]

    def run(self, prompts: Sequence[str], seeds: Sequence[int], grad: bool = False) -> torch.Tensor:
        """Sample images ``(B, 3, 32, 32)`` in [0, 1]; hooks the caller set on ``root`` are active."""
        from trainer.world.diffusion import sample

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        dev = next(self.unet.parameters()).device
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = sample(self.unet, self.clip, self.tokenizer, list(prompts), list(seeds), steps=self.steps,
                         guidance=self.guidance, grad=grad, detach_between_steps=True)
        return out.float()
