"""Concept encoders on a tiny random-weight open_clip model (no network, fixed seed)."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from core_helpers import single_thread  # noqa: F401
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file

from hypertransport_core import Concept, ConceptEncoder, HyperTransportError, weights_fingerprint
from hypertransport_core.encoders import to_model_input

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _model(seed=0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**copy.deepcopy(TINY_CFG)).eval()


@pytest.fixture(scope="module")
def enc():
    return ConceptEncoder.from_model(_model(), SimpleTokenizer(context_length=16), "ht-tiny")


def _images(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_text_and_image_embeddings_are_unit_norm_in_one_space(enc):
    t = enc.encode_text(["watercolor", "a red cube", "  neon  "])
    i = enc.encode_image(_images((2, 32, 32, 3)))
    assert t.shape == (3, 32) and i.shape == (2, 32)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(i.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(t[0], t[1])
    torch.testing.assert_close(enc.encode_text("neon"), t[2:])  # stripped, and a bare string works
    assert enc.identity["embed_dim"] == 32 and enc.identity["arch"] == "ht-tiny"
    c = enc.concept(" watercolor ")
    assert isinstance(c, Concept) and c.modality == "text" and c.label == "watercolor"
    torch.testing.assert_close(c.embedding, t[0])
    ic = enc.image_concept(_images((2, 32, 32, 3)))
    assert ic.modality == "image" and ic.embedding.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_image_layouts_alpha_gray_and_odd_sizes(enc):
    rgb = _images((2, 40, 40, 3))
    gray = _images((2, 40, 40, 1), seed=1)
    torch.testing.assert_close(enc.encode_image(gray), enc.encode_image(gray.repeat(1, 1, 1, 3)))
    opaque = torch.cat([rgb, torch.ones(2, 40, 40, 1)], dim=-1)
    torch.testing.assert_close(enc.encode_image(opaque), enc.encode_image(rgb))
    clear_a = torch.cat([rgb, torch.zeros(2, 40, 40, 1)], dim=-1)
    clear_b = torch.cat([_images((2, 40, 40, 3), seed=5), torch.zeros(2, 40, 40, 1)], dim=-1)
    torch.testing.assert_close(enc.encode_image(clear_a), enc.encode_image(clear_b))  # only the background is left
    odd = enc.encode_image(_images((1, 17, 45, 3)))
    assert odd.shape == (1, 32) and torch.isfinite(odd).all()
    x = to_model_input(_images((1, 17, 45, 3)), 32, enc.mean, enc.std)
    assert x.shape == (1, 3, 32, 32)
    assert enc.encode_image(_images((40, 40, 3))).shape == (1, 32)  # a single (H, W, C) image
    bchw = rgb.permute(0, 3, 1, 2)
    torch.testing.assert_close(enc.encode_image(bchw, layout="BCHW"), enc.encode_image(rgb))


def test_bad_images_raise(enc):
    with pytest.raises(HyperTransportError, match="5 channels"):
        enc.encode_image(_images((1, 8, 8, 5)))
    with pytest.raises(HyperTransportError, match="NaN"):
        enc.encode_image(torch.full((1, 8, 8, 3), float("nan")))
    with pytest.raises(HyperTransportError, match="empty"):
        enc.encode_image(torch.zeros(0, 8, 8, 3))
    with pytest.raises(HyperTransportError, match=r"\(B, H, W, C\)"):
        enc.encode_image(torch.zeros(8, 8))


def test_empty_text_raises(enc):
    for bad in ("", "   ", [], ["ok", " "]):
        with pytest.raises(HyperTransportError, match="empty"):
            enc.encode_text(bad)


def test_identity_stable_changes_with_weights_and_survives_fp16():
    m = _model()
    a = ConceptEncoder.from_model(m, SimpleTokenizer(context_length=16), "ht-tiny")
    b = ConceptEncoder.from_model(_model(), SimpleTokenizer(context_length=16), "ht-tiny")
    assert a.identity == b.identity and len(a.identity["fingerprint"]) == 16
    assert ConceptEncoder.from_model(_model(seed=1), SimpleTokenizer(context_length=16), "ht-tiny").identity != a.identity
    changed = _model()
    with torch.no_grad():
        changed.text_projection[0, 0] += 0.5
    assert weights_fingerprint(changed) != weights_fingerprint(m)
    half = copy.deepcopy(m).half()
    assert weights_fingerprint(half) == weights_fingerprint(m)
    enc16 = ConceptEncoder.from_model(half, SimpleTokenizer(context_length=16), "ht-tiny")
    assert enc16.identity == a.identity
    e16 = enc16.encode_text(["watercolor"])
    assert e16.dtype == torch.float32
    torch.testing.assert_close(e16, a.encode_text(["watercolor"]), atol=2e-2, rtol=0)


def test_from_open_clip_errors_name_the_problem(tmp_path):
    missing = tmp_path / "ViT-B-32-weights.safetensors"
    with pytest.raises(HyperTransportError, match="ViT-B-32-weights.safetensors.*does not exist"):
        ConceptEncoder.from_open_clip("ViT-B-32", weights=str(missing))
    with pytest.raises(HyperTransportError, match="no architecture 'NoSuchArch'"):
        ConceptEncoder.from_open_clip("NoSuchArch")


def test_from_open_clip_loads_a_local_safetensors_file(tmp_path):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "ht-tiny-test.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(cfg_dir))
    ref = _model(seed=3)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    enc = ConceptEncoder.from_open_clip("ht-tiny-test", weights=str(weights))
    assert enc.arch == "ht-tiny-test" and enc.image_size == 32
    assert enc.identity["fingerprint"] == weights_fingerprint(ref)
    direct = ConceptEncoder.from_model(ref, SimpleTokenizer(context_length=16), "ht-tiny-test")
    torch.testing.assert_close(enc.encode_text(["a red cube"]), direct.encode_text(["a red cube"]))
    img = _images((1, 32, 32, 3))
    torch.testing.assert_close(enc.encode_image(img), direct.encode_image(img), atol=1e-5, rtol=1e-5)


def test_tower_fingerprints_per_tower_and_what_weights_do_not_fix():
    """text_/image_fingerprint cover one tower each; the same weights run with another activation differ."""
    a = ConceptEncoder.from_model(_model(), SimpleTokenizer(context_length=16), "ht-tiny").identity
    assert len(a["text_fingerprint"]) == 16 and len(a["image_fingerprint"]) == 16
    assert a["text_fingerprint"] != a["image_fingerprint"]
    text_changed, image_changed = _model(), _model()
    with torch.no_grad():
        text_changed.ln_final.weight[0] += 0.5
        image_changed.visual.ln_post.weight[0] += 0.5
    t = ConceptEncoder.from_model(text_changed, SimpleTokenizer(context_length=16), "ht-tiny").identity
    i = ConceptEncoder.from_model(image_changed, SimpleTokenizer(context_length=16), "ht-tiny").identity
    assert t["text_fingerprint"] != a["text_fingerprint"] and t["image_fingerprint"] == a["image_fingerprint"]
    assert i["image_fingerprint"] != a["image_fingerprint"] and i["text_fingerprint"] == a["text_fingerprint"]
    torch.manual_seed(0)
    quick = open_clip.model.CLIP(**copy.deepcopy(TINY_CFG), quick_gelu=True).eval()
    quick.load_state_dict(_model().state_dict())
    q = ConceptEncoder.from_model(quick, SimpleTokenizer(context_length=16), "ht-tiny").identity
    assert q["fingerprint"] == a["fingerprint"]  # the whole-model fingerprint sees only weights
    assert q["text_fingerprint"] != a["text_fingerprint"] and q["image_fingerprint"] != a["image_fingerprint"]
