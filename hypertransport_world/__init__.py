"""The embedded world: a tiny text-to-image world the project builds and ships itself.

One coloured, patterned shape on a fixed background, 32×32 pixels; 139 CSS colours and 26 fill
patterns as concepts, measurable from pixels (:mod:`~hypertransport_world.metrics`). Its models are
ComfyUI models like any other (:mod:`~hypertransport_world.model`: ComfyUI's own UNet, CLIP text,
CLIP vision and pixel-space VAE classes), loaded in ComfyUI by the "HyperTransport Load Embedded
World" node and by the trainer through the same ComfyUI code.

* :mod:`~hypertransport_world.scene`: the generator (concepts, rendering, captions); pure Python;
* :mod:`~hypertransport_world.metrics`: pixel metrics (colour, shape, pattern, inducement); pure;
* :mod:`~hypertransport_world.world_clip`: HT-World-CLIP, a tiny CLIP in open_clip's classes;
* :mod:`~hypertransport_world.model`: the world as ComfyUI objects (needs ComfyUI);
* :mod:`~hypertransport_world.train_unet`, :mod:`~hypertransport_world.build`: rebuilding it;
* :mod:`~hypertransport_world.quality`: its quality, sampled with ComfyUI's sampler.

Nothing here imports ComfyUI at package import time.
"""

from __future__ import annotations

import os

from . import scene
from .scene import COLOURS, CONCEPTS, PATTERNS, SHAPES

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

__all__ = ["CONCEPTS", "COLOURS", "PATTERNS", "SHAPES", "WEIGHTS_DIR", "scene"]
