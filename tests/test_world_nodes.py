"""Node path = trainer path, measured: the world workflow posted to a real ComfyUI server gives, for held-out
concepts, the images (and so the pixel inducement) the evaluator computes in-process for the same concept,
seed and strength; and steering raises inducement over the unsteered image."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hypertransport_world", "weights")


@pytest.fixture(scope="module")
def world_backend(comfy):
    if not os.path.isfile(os.path.join(SHIPPED, "world_unet.safetensors")):
        pytest.skip("world UNet absent: build it with `python -m hypertransport_world.build --seed 0`")
    from trainer.backend import ComfyBackend

    return ComfyBackend.world(SHIPPED)  # fp32, as ComfyUI's KSampler computes on a CPU


def test_server_images_equal_the_evaluators(comfy_server, world_backend):
    from ht_devkit.world_check import SHAPE_PROMPTS, Item, compare
    from hypertransport_core import load_hypernet

    hn = load_hypernet(os.path.join(SHIPPED, "world_hypernet.safetensors"))
    held = hn.training_summary["holdout_concepts"]
    colours = [c for c in held if "-" not in c and c != "plain"][:2]
    patterns = [c for c in held if "-" in c][:2]
    assert len(colours) == 2 and len(patterns) == 2, held
    items = [Item(c, p, 11 + k, lam) for c in colours + patterns for k, p in enumerate(SHAPE_PROMPTS) for lam in (1.0,)]
    rows = compare(comfy_server, world_backend, hn, items)
    for r in rows:
        assert r["max_pixel_diff"] <= 2, r  # float noise: folded vs hooked norms, batch vs single image
        assert abs(r["server"] - r["evaluator"]) < 0.01, r
    for c in colours + patterns:
        mine = [r for r in rows if r["concept"] == c]
        assert sum(r["server"] for r in mine) > sum(r["unsteered"] for r in mine), mine
