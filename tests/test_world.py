"""The embedded world: generator, pixel metrics, tiny models, shipped weights (CPU, fast)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from trainer.world import WEIGHTS_DIR
from trainer.world import clip_model as C
from trainer.world import diffusion as D
from trainer.world import metrics as M
from trainer.world import world as W


def _gt(n=200, seed=1):
    specs = W.sample_specs(n, np.random.default_rng(seed))
    return specs, W.render_batch(specs)


def test_concepts_two_kinds_at_least_150():
    kinds = {c["kind"] for c in W.CONCEPTS}
    assert kinds == {"colour", "pattern"}
    assert len(W.CONCEPTS) >= 150
    assert len(W.COLOURS) == 139 and len(set(W.COLOURS.values())) == 139
    assert "dark slate blue" in W.COLOURS and W.COLOURS["dark slate blue"] == (72, 61, 139)
    assert 20 <= len(W.PATTERNS) <= 32 and "plain" in W.PATTERNS
    assert len({c["name"] for c in W.CONCEPTS}) == len(W.CONCEPTS)


def test_background_far_from_every_colour_and_shade():
    rgb = np.array(list(W.COLOURS.values()), dtype=np.float32)
    both = np.concatenate([rgb, W.shade_of(rgb)])
    d = np.linalg.norm(both - np.array(W.BACKGROUND), axis=1)
    assert d.min() > 2 * W.MASK_THRESHOLD - 1


def test_generator_deterministic_per_seed():
    a = W.sample_specs(16, np.random.default_rng(3))
    b = W.sample_specs(16, np.random.default_rng(3))
    assert a == b
    assert torch.equal(W.render_batch(a), W.render_batch(b))
    img = W.render(a[0])
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)


def test_captions_and_neutral_prompt():
    s = W.Spec("square", "dark slate blue", "fine-checkered", 16, 16, 8)
    assert W.caption(s) == "a dark slate blue fine-checkered square"
    s.say_colour = False
    assert W.caption(s) == "a fine-checkered square"
    s.say_pattern = False
    assert W.caption(s) == "a square" == W.neutral_prompt("square")
    assert W.parse_caption("a dark slate blue vertical-striped triangle") == {
        "colour": "dark slate blue",
        "pattern": "vertical-striped",
        "shape": "triangle",
    }
    # the longest pattern name wins: "reverse-diagonal-banded" is not "diagonal-banded"
    assert W.parse_caption("a red reverse-diagonal-banded circle")["pattern"] == "reverse-diagonal-banded"


def test_metrics_on_ground_truth():
    specs, imgs = _gt()
    assert np.mean([M.shape_of(i) == s.shape for i, s in zip(imgs, specs)]) >= 0.99
    errs = [M.colour_error(i, W.COLOURS[s.colour]) for i, s in zip(imgs, specs)]
    assert np.median(errs) < 1e-3 and np.mean(np.array(errs) <= 40) >= 0.99
    assert np.mean([M.pattern_of(i) == s.pattern for i, s in zip(imgs, specs)]) >= 0.97
    for i, s in zip(imgs[:20], specs[:20]):
        x, y = M.position_of(i)
        assert abs(x - s.cx) < 1.0 and abs(y - s.cy) < 3.5  # triangle centroid sits below its centre


def test_every_pattern_detected_on_a_large_object():
    for shape in W.SHAPES:
        specs = [W.Spec(shape, "red", p, 16, 16, 10) for p in W.PATTERNS]
        for img, s in zip(W.render_batch(specs), specs):
            assert M.pattern_of(img) == s.pattern, (shape, s.pattern, M.pattern_scores(img))
            assert M.inducement(img, s.pattern) > 0.9


def test_inducement_colour_and_input_formats():
    s = W.Spec("circle", "red", "plain", 16, 16, 9)
    u8 = W.render(s)
    t = W.render_batch([s])[0]
    assert M.inducement(u8, "red") == 1.0 == M.inducement(t, {"name": "red", "kind": "colour"})
    assert M.inducement(u8, "blue") < 0.2
    assert M.colour_hit(u8, (250, 5, 5)) and not M.colour_hit(u8, (0, 0, 255))
    with pytest.raises(KeyError):
        M.inducement(u8, "not a concept")
    empty = torch.tensor(W.BACKGROUND, dtype=torch.float32)[:, None, None].expand(3, 32, 32) / 255
    assert M.shape_of(empty) is None and M.colour_error(empty, (0, 0, 0)) == M.MAX_RGB_DISTANCE


def test_batch_generation_fast():
    import time

    specs = W.sample_specs(128, np.random.default_rng(0))
    W.render_batch(specs)
    t = time.perf_counter()
    W.render_batch(specs)
    assert time.perf_counter() - t < 1.0  # ~0.015 s idle; loose for busy shared machines


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    clip = C.build_clip(cfg).eval()
    unet = D.WorldUNet(channels=(8, 16, 32), ctx_dim=32, temb_dim=32, heads=2, groups=4).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    return clip, C.get_tokenizer(), unet


def test_sampler_deterministic_and_single_batched_forward(tiny_models):
    clip, tok, unet = tiny_models
    calls = []
    h = unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        a = D.sample(unet, clip, tok, ["a red circle", "a blue square"], [1, 2], steps=3, guidance=2.0)
    finally:
        h.remove()
    assert calls == [4, 4, 4]  # one forward per step, cond and uncond rows together
    b = D.sample(unet, clip, tok, ["a red circle", "a blue square"], [1, 2], steps=3, guidance=2.0)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    g1 = D.sample(unet, clip, tok, ["x", "y"], torch.Generator().manual_seed(0), steps=2, guidance=1.0)
    g2 = D.sample(unet, clip, tok, ["x", "y"], torch.Generator().manual_seed(0), steps=2, guidance=1.0)
    assert torch.equal(g1, g2)
    assert torch.equal(D.initial_noise([5], 1), D.initial_noise([5], 1))
    ctx = D.encode_prompts(clip, tok, ["a red circle", "a blue square"])
    c = D.sample(unet, clip, tok, None, [1, 2], steps=3, guidance=2.0, ctx=ctx)
    assert torch.equal(a, c)
    with pytest.raises(ValueError):
        D.initial_noise([1, 2], 3)


def test_sampler_grad_flag(tiny_models):
    clip, tok, unet = tiny_models
    p = next(unet.parameters())
    out = D.sample(unet, clip, tok, ["a red circle"], [0], steps=2, guidance=2.0, grad=True)
    assert out.requires_grad
    out.mean().backward()
    assert p.grad is not None
    unet.zero_grad()
    assert not D.sample(unet, clip, tok, ["a red circle"], [0], steps=2).requires_grad


def test_unet_norms_are_affine_steering_sites():
    unet = D.build_unet()
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert len(norms) >= 30
    assert all(getattr(m, "weight", None) is not None for m in norms)


def test_text_tokens_shape(tiny_models):
    clip, tok, _ = tiny_models
    f = C.text_tokens(clip, tok(["a red circle", "checkered"]))
    assert f.shape == (2, 16, 32)


@pytest.mark.skipif(
    not os.path.exists(os.path.join(WEIGHTS_DIR, "world_unet.safetensors")),
    reason="shipped weights absent: build them with `python -m trainer.world.build --seed 0`",
)
def test_shipped_weights_load_and_sample():
    from trainer.world import load_world

    w = load_world()
    e = w.encode_text(["red", "a checkered square"])
    assert e.shape == (2, 128) and torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-4)
    imgs = w.sample(["a red circle", "a blue square"], [0, 1], steps=4)
    assert imgs.shape == (2, 3, 32, 32)
    assert w.encode_image(imgs).shape == (2, 128)
    assert len(w.concepts) >= 150
