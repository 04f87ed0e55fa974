"""The embedded world: generator, pixel metrics, and its models in ComfyUI's own classes (CPU, fast)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from hypertransport_world import WEIGHTS_DIR
from hypertransport_world import metrics as M
from hypertransport_world import scene as W
from hypertransport_world import world_clip as C


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


# ------------------------------------------------------------------ the world in ComfyUI's classes
SHIPPED_UNET = os.path.join(WEIGHTS_DIR, "world_unet.safetensors")
needs_unet = pytest.mark.skipif(not os.path.isfile(SHIPPED_UNET),
                                reason="world UNet absent: build it with `python -m hypertransport_world.build --seed 0`")


@pytest.fixture(scope="module")
def WM(comfy):
    from hypertransport_world import model

    return model


@pytest.fixture(scope="module")
def open_clip_world():
    return C.load_world_clip(os.path.join(WEIGHTS_DIR, "HT-World-CLIP.safetensors"))


@pytest.fixture(scope="module")
def world(WM):
    return WM.load() if os.path.isfile(SHIPPED_UNET) else None


@pytest.mark.comfy
def test_text_encoder_is_comfyuis_clip_with_the_world_clips_text_tower(WM, open_clip_world):
    import comfy.clip_model
    import comfy.sd
    import comfy.sd1_clip

    from hypertransport_world.train_unet import CaptionEncoder

    oc, tok = open_clip_world
    sd = WM.open_clip_state_dict(os.path.join(WEIGHTS_DIR, "HT-World-CLIP.safetensors"))
    clip = WM.text_encoder(sd)
    assert isinstance(clip, comfy.sd.CLIP)
    te = clip.cond_stage_model.clip_l
    assert isinstance(te, comfy.sd1_clip.SDClipModel) and isinstance(te.transformer, comfy.clip_model.CLIPTextModel)
    assert isinstance(clip.tokenizer.clip_l, comfy.sd1_clip.SDTokenizer)  # ComfyUI's CLIP tokenizer, its own vocabulary
    caps = ["a red circle", "a dark slate blue reverse-diagonal-pinstriped triangle", ""]
    ids = [[t for t, _ in clip.tokenize(c)["l"][0]] for c in caps]
    oc_ids = tok(caps)
    for a, b in zip(ids, oc_ids.tolist()):  # the same BPE tokens up to the end token; ComfyUI pads with it, open_clip with 0
        n = b.index(49407) + 1
        assert a[:n] == b[:n] and len(a) == WM.TOKENS
    z = CaptionEncoder(clip)(caps)  # the UNet's batched conditioning = CLIPTextEncode's, prompt by prompt
    for i, c in enumerate(caps):
        assert torch.equal(z[i], clip.encode_from_tokens(clip.tokenize(c))[0].float())
    # pooled, projected: open_clip's encode_text (what the hypernet's concept encoder computes)
    eot = oc_ids.argmax(-1)
    _, _, proj, _ = te.transformer(oc_ids, None, num_tokens=(eot + 1).tolist(), intermediate_output=None, dtype=torch.float32)
    torch.testing.assert_close(torch.nn.functional.normalize(proj, dim=-1), C.encode_text(oc, tok, caps), atol=1e-5, rtol=0)


@pytest.mark.comfy
def test_clip_vision_is_comfyuis_with_the_world_clips_image_tower(WM, open_clip_world):
    import comfy.clip_vision

    oc, _ = open_clip_world
    cv = WM.clip_vision(WM.open_clip_state_dict(os.path.join(WEIGHTS_DIR, "HT-World-CLIP.safetensors")))
    assert isinstance(cv, comfy.clip_vision.ClipVisionModel)
    _, imgs = _gt(6, seed=4)
    out = cv.encode_image(imgs.permute(0, 2, 3, 1))  # ComfyUI's own preprocessing (config mean/std 0.5)
    torch.testing.assert_close(torch.nn.functional.normalize(out["image_embeds"], dim=-1), C.encode_image(oc, imgs),
                               atol=1e-5, rtol=0)


@pytest.mark.comfy
def test_unet_is_comfyuis_sd_unet_in_pixel_space_with_flow_matching(WM):
    import comfy.model_base
    import comfy.model_sampling
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from hypertransport_core import detect_family, list_sites

    base = WM.new_diffusion_model(torch.float32)
    WM.init_weights_(base.diffusion_model)
    dm = base.diffusion_model
    assert type(dm) is UNetModel and base.model_type == comfy.model_base.ModelType.FLOW
    assert isinstance(base.model_sampling, comfy.model_sampling.CONST)
    assert base.latent_format.latent_channels == 3 and float(base.model_sampling.timestep(torch.tensor(0.5))) == 500.0
    sites = list_sites(dm)
    assert detect_family(dm) == "sd15" and len(sites) == 43  # the SD1.5 site table, not a world table
    assert all(getattr(dm.get_submodule(s.module), "weight", None) is not None for s in sites)
    assert torch.count_nonzero(dm.out[2].weight) == 0  # starts by predicting 0
    # the flow convention: denoised = x - sigma * output
    torch.nn.init.normal_(dm.out[2].weight, std=0.1)
    x, sigma, ctx = torch.randn(2, 3, 32, 32), torch.tensor([0.7, 0.2]), torch.randn(2, 16, 128)
    with torch.no_grad():
        v = dm(x, base.model_sampling.timestep(sigma), context=ctx)
        den = base.apply_model(x, sigma, c_crossattn=ctx)
    torch.testing.assert_close(den, x - sigma.view(-1, 1, 1, 1) * v)


@pytest.mark.comfy
def test_unet_file_is_checked_before_loading(WM, tmp_path):
    base = WM.new_diffusion_model(torch.float32)
    WM.init_weights_(base.diffusion_model)
    good = str(tmp_path / "u.safetensors")
    WM.save_unet(base.diffusion_model, good)
    assert WM.load_unet(good) is not None
    from safetensors.torch import load_file, save_file

    sd = load_file(good)
    save_file(sd, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="'format' is None, expected 'ht-world-unet/2'.*Fix: rebuild"):
        WM.load_unet(str(tmp_path / "nometa.safetensors"))
    import json

    meta = {"format": WM.UNET_FORMAT, "config": json.dumps({**WM.UNET_CONFIG, "model_channels": 64})}
    save_file(sd, str(tmp_path / "cfg.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="config differs.*Fix: rebuild"):
        WM.load_unet(str(tmp_path / "cfg.safetensors"))
    sd["out.2.weight"] = torch.zeros(3, 32, 5, 5, dtype=torch.float16)
    save_file(sd, str(tmp_path / "shape.safetensors"), metadata={"format": WM.UNET_FORMAT, "config": json.dumps(WM.UNET_CONFIG)})
    with pytest.raises(ValueError, match="tensors do not match the world UNet"):
        WM.load_unet(str(tmp_path / "shape.safetensors"))
    with pytest.raises(FileNotFoundError, match="Fix: rebuild"):
        WM.load_unet(str(tmp_path / "missing.safetensors"))


@pytest.mark.comfy
@needs_unet
def test_shipped_world_samples_with_comfyuis_sampler(world):
    import comfy.sample

    from hypertransport_comfy import sampling

    enc = sampling.PromptEncoder(world.clip)
    pos, neg = sampling.batch_conditioning([enc("a red circle"), enc("a blue square")]), sampling.batch_conditioning([enc("")])
    noise = sampling.seeded_noise([0, 1], (3, 32, 32))
    sig = sampling.sigmas_for(world.model, "simple", 4)
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    a = sampling.sample(world.model, pos, neg, noise, sig, 2.0, "euler")
    # the same as the stock KSampler path (comfy.sample.sample with the scheduler), image by image
    one = comfy.sample.sample(world.model, noise[:1], 4, 2.0, "euler", "simple", [[pos[0][0][:1], {}]], neg,
                              torch.zeros(1, 3, 32, 32), disable_pbar=True, seed=0)
    torch.testing.assert_close(a[:1], one, atol=1e-4, rtol=0)
    imgs = world.vae.decode(a)
    assert imgs.shape == (2, 32, 32, 3) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1
    assert M.inducement(imgs[0], "red") > 0.6 and M.shape_of(imgs[1]) == "square"


def test_shipped_clip_vision_config_is_the_worlds(comfy):
    """The JSON ComfyUI's ClipVisionModel reads (shipped) matches the config derived from HT-World-CLIP's."""
    import json

    from hypertransport_world import model as WM

    with open(WM.VISION_CONFIG_FILE) as f:
        assert json.load(f) == WM.VISION_CONFIG


def test_off_kind_change_sees_the_other_kind_only():
    """Specificity: steering a colour must not be credited when it draws a pattern, and a pattern when it recolours."""
    def img(colour, pattern):
        return W.render_batch([W.Spec("circle", colour, pattern, 16, 16, 11)])[0]

    red, blue, red_striped = img("red", "plain"), img("blue", "plain"), img("red", "diagonal-banded")
    assert M.off_kind_change(blue, red, "colour") < 0.05  # recoloured, no pattern: nothing off-kind
    assert M.off_kind_change(red_striped, red, "colour") > 0.5  # a "colour" that draws stripes
    assert M.off_kind_change(red_striped, red, "pattern") < 0.15  # a pattern on the same colour
    assert M.off_kind_change(blue, red, "pattern") == pytest.approx(1.0)  # a "pattern" that recolours red to blue
    assert M.off_kind_change(red, red, "colour") == 0.0 == M.off_kind_change(red, red, "pattern")
    empty = torch.tensor(W.BACKGROUND, dtype=torch.float32)[:, None, None].expand(3, 32, 32) / 255
    assert np.isnan(M.off_kind_change(empty, red, "colour")) and np.isnan(M.off_kind_change(red, empty, "pattern"))
    with pytest.raises(KeyError, match="shape"):
        M.off_kind_change(red, red, "shape")
