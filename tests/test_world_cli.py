"""The one-shot CLI and the shipped world hypernet (real world weights; a few seconds)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from hypertransport_core import read_header
from studies import steer
from trainer.config import SHIPPED_HYPERNET

pytestmark = [pytest.mark.comfy, pytest.mark.skipif(not os.path.isfile(SHIPPED_HYPERNET), reason="shipped world hypernet missing")]


def test_shipped_hypernet_is_valid_and_records_its_split():
    meta = read_header(SHIPPED_HYPERNET, expect="hypertransport.hypernet")
    assert meta["model_family"] == "sd15"
    held, train = meta["training"]["holdout_concepts"], meta["training"]["train_concepts"]
    assert len(held) >= 0.2 * (len(held) + len(train)) and not set(held) & set(train)


def test_cli_steers_towards_a_held_out_colour(tmp_path, comfy):
    from hypertransport_world import metrics as M

    concept = "chartreuse"  # held out: the shipped hypernet never saw it
    out = tmp_path / "x.png"
    steer.main(["--concept", concept, "--strength", "1", "--hypernet", SHIPPED_HYPERNET, "--out", str(out), "--seed", "3"])
    img = np.asarray(Image.open(out).convert("RGB"))
    w = img.shape[1] // 2  # unsteered | steered, upscaled 8x
    base, steered = img[::8, : w : 8], img[::8, w::8]
    assert M.inducement(steered, concept) > M.inducement(base, concept) + 0.2


def test_cli_takes_a_reference_image_with_alpha(tmp_path, comfy):
    ref = tmp_path / "ref.png"
    rgba = np.zeros((40, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(ref)
    out = tmp_path / "y.png"
    steer.main(["--image", str(ref), "--hypernet", SHIPPED_HYPERNET, "--out", str(out), "--single"])
    assert Image.open(out).size == (256, 256)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concept", "red", "--strength", "nan"], "finite"),
        (["--image", "/nonexistent.png"], "does not exist"),
        (["--concept", "red", "--hypernet", "/nonexistent.safetensors"], "does not exist"),
        (["--concept", "   "], "empty"),
    ],
)
def test_cli_bad_input_names_the_fix(tmp_path, args, message, comfy):
    if "--hypernet" not in args:
        args = args + ["--hypernet", SHIPPED_HYPERNET]
    with pytest.raises(SystemExit, match=message):
        steer.main(args + ["--out", str(tmp_path / "z.png")])
