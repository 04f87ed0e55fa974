"""Steer one generation of the embedded world from a concept's words or a reference image.

    python studies/steer.py --concept "tomato" --strength 1 --out tomato.png
    python studies/steer.py --image my_reference.png --prompt "a square" --strength 0.7 --out out.png

Writes a PNG: the unsteered image and the steered one side by side (upscaled, nearest neighbour),
unless ``--single``. The concept can be any text: the hypernet maps its CLIP embedding, whether or
not the concept was in its training set.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from PIL import Image

from hypertransport_core import HyperTransportError, load_hypernet, steer
from trainer.cli import command
from trainer.config import WORLD_WEIGHTS, default_hypernet, train_config_of


def load_image(path: str) -> torch.Tensor:
    """A PNG/JPEG as a ComfyUI-style IMAGE ``(1, H, W, C)`` in [0, 1] (alpha and grayscale kept)."""
    if not os.path.isfile(path):
        raise HyperTransportError(f"--image {path!r} does not exist. Fix: give the path of a PNG or JPEG file.")
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # PIL raises many types for bad files
        raise HyperTransportError(f"--image {path!r} is not an image PIL can read ({e}). Fix: use a PNG or JPEG file.") from None
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.mode else "RGB")
    a = np.asarray(im, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(a)[None]


def to_png(imgs: list[torch.Tensor], path: str, scale: int = 8) -> None:
    """Images ``(H, W, 3)`` in [0, 1] side by side, upscaled ``scale`` times (nearest neighbour)."""
    row = torch.cat([im.clamp(0, 1) for im in imgs], dim=1)  # (H, W*n, 3)
    arr = (row.numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--concept", help="the concept in words, e.g. 'crimson' or 'coarse-checkered'")
    src.add_argument("--image", help="a reference image (PNG/JPEG) showing the concept")
    p.add_argument("--strength", type=float, default=1.0, help="λ: 0 none, 1 full, >1 more, <0 removes the concept")
    p.add_argument("--prompt", default="a circle", help="the text prompt of the generation")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--hypernet", default="", help="hypernet file (default: runs/world/hypernet.safetensors from "
                   "trainer/train.py, else the one shipped in hypertransport_world/weights)")
    p.add_argument("--world-weights", default=WORLD_WEIGHTS, help="folder with the world's models")
    p.add_argument("--out", default="steered.png", help="output PNG")
    p.add_argument("--single", action="store_true", help="write only the steered image")
    a = p.parse_args(argv)
    if not np.isfinite(a.strength):
        raise HyperTransportError(f"--strength {a.strength}: use a finite number, e.g. 1.0")
    a.hypernet = a.hypernet or default_hypernet()
    if not os.path.isfile(a.hypernet):
        raise HyperTransportError(f"--hypernet {a.hypernet!r} does not exist. Fix: run `python trainer/train.py` first, or pass a hypernet file.")
    from hypertransport_comfy.backend import ComfyBackend
    from hypertransport_comfy.comfyui import import_comfyui

    try:
        hn = load_hypernet(a.hypernet)
        tcfg = train_config_of(hn)
        import_comfyui()
        backend = ComfyBackend.world(a.world_weights, form=tcfg.form, steps=tcfg.sampler_steps, guidance=tcfg.guidance)
        concept = hn.text_concept(backend.encoder, a.concept) if a.concept else backend.encoder.image_concept(load_image(a.image), os.path.basename(a.image))
        steering = hn.steering(concept)
    except HyperTransportError as e:
        raise HyperTransportError(str(e)) from None
    base = backend.images([a.prompt], [a.seed])[0]
    with steer(backend.root, [(steering, a.strength)]):
        out = backend.images([a.prompt], [a.seed])[0]
    to_png([out] if a.single else [base, out], a.out)
    print(f"wrote {a.out}: {'steered' if a.single else 'unsteered | steered'} '{a.prompt}' by {concept.label!r} at strength {a.strength:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
