"""The embedded world: a tiny text-to-image world the project builds and ships itself.

One coloured, patterned shape on a fixed background, 32x32 pixels; 139 CSS colours and 26 patterns
as concepts; a tiny open_clip CLIP ("HT-World-CLIP") and a tiny rectified-flow UNet conditioned on
its token features. Whether steering induced a concept is measured from pixels (``metrics``).

Example::

    from trainer.world import load_world, metrics
    w = load_world()
    imgs = w.sample(["a red circle", "a coarse-checkered square"], seeds=[0, 1])   # (2, 3, 32, 32) in [0, 1]
    metrics.inducement(imgs[0], "red")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import world
from .world import COLOURS, CONCEPTS, PATTERNS, SHAPES

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
CLIP_FILE = "world_clip.safetensors"
UNET_FILE = "world_unet.safetensors"

__all__ = ["World", "load_world", "CONCEPTS", "COLOURS", "PATTERNS", "SHAPES", "WEIGHTS_DIR", "world"]


@dataclass
class World:
    """The loaded world models. ``unet`` norms (GroupNorm/LayerNorm) are the steering sites."""

    clip: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    concepts: list[dict] = field(default_factory=lambda: list(CONCEPTS))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def sample(self, prompts: list[str], seeds, steps: int = 4, guidance: float = 2.0, **kw) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [0, 1]; see :func:`trainer.world.diffusion.sample`."""
        from .diffusion import sample

        return sample(self.unet, self.clip, self.tokenizer, prompts, seeds, steps=steps, guidance=guidance, **kw)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Normalized CLIP text embeddings (n, 128)."""
        from .clip_model import encode_text

        return encode_text(self.clip, self.tokenizer, list(texts))

    @torch.no_grad()
    def encode_image(self, imgs: torch.Tensor) -> torch.Tensor:
        """Normalized CLIP image embeddings (n, 128) of (n, 3, 32, 32) images in [0, 1]."""
        from .clip_model import encode_image

        return encode_image(self.clip, imgs.to(next(self.clip.parameters()).device))

    def text_tokens(self, texts: list[str]) -> torch.Tensor:
        """Per-token CLIP features (n, 16, 128): what the UNet is conditioned on."""
        from .diffusion import encode_prompts

        return encode_prompts(self.clip, self.tokenizer, list(texts))


def load_world(device: str = "cpu", weights_dir: str | None = None) -> World:
    """Load the shipped world (``trainer/world/weights``) in fp32, eval mode, on ``device``.

    Raises FileNotFoundError naming the rebuild command when a weights file is missing.
    """
    from .clip_model import load_world_clip
    from .diffusion import load_world_unet

    d = weights_dir or WEIGHTS_DIR
    paths = [os.path.join(d, CLIP_FILE), os.path.join(d, UNET_FILE)]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"{p} is missing; rebuild the world with `python -m trainer.world.build --seed 0 --out {d}`"
            )
    clip, tok = load_world_clip(paths[0], device)
    unet = load_world_unet(paths[1], device)
    return World(clip=clip, tokenizer=tok, unet=unet)
