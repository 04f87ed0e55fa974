"""Encode Concept / Encode Reference Image reuse ComfyUI's own CLIP / CLIP_VISION objects.

A tiny open_clip CLIP (QuickGELU, 3 text layers, a 32-px ViT) with random weights is the hypernet's
encoder. Its weights are converted into ComfyUI's layout with ComfyUI's own converters
(``comfy.utils.clip_text_transformers_convert``, ``comfy.clip_vision.convert_to_transformers``) and
loaded into ComfyUI's own classes: an SD1.5-style ``comfy.sd.CLIP`` (``SD1ClipModel``, clip_l), an
SDXL-style one (``SDXLClipModel``: clip_l with other weights, clip_g with the encoder's) and a
``ClipVisionModel``. Tiny sizes come in through ComfyUI's ``<name>_model_config`` model options and a
JSON config file.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.comfy

from ht_devkit.clips import (  # noqa: E402
    ARCH,
    CFG,
    CV_CFG,
    NOFILE_ARCH,
    _open_clip_model,
    _text_sd,
    _vision_sd,
    comfy_clip_vision,
    comfy_sd15_clip,
    comfy_sdxl_clip,
)

TEXTS = ["watercolor", "a red cube, on a table!", "neon " * 40]  # the last one is truncated at 77 tokens


# ------------------------------------------------------------------------------ fixtures ---
@pytest.fixture(scope="module")
def D(pack):
    return pack.nodes.definitions


@pytest.fixture(scope="module")
def CC(pack):
    return pack.nodes.comfy_clip


@pytest.fixture(scope="module")
def MF(pack):
    return pack.nodes.model_files


class World:
    pass


@pytest.fixture(scope="module")
def W(comfy, comfy_base, D, tmp_path_factory):
    """The encoder (weights in models/clip), its hypernet, and ComfyUI objects holding it or not."""
    import folder_paths
    import open_clip
    from safetensors.torch import save_file

    from hypertransport_core.encoders import ConceptEncoder

    w = World()
    hdir, cdir = comfy_base / "models" / "hypertransport", comfy_base / "models" / "clip"
    hdir.mkdir(parents=True, exist_ok=True)
    cdir.mkdir(parents=True, exist_ok=True)
    for arch in (ARCH, NOFILE_ARCH):
        (hdir / f"{arch}.json").write_text(json.dumps(CFG))
        open_clip.add_model_config(str(hdir / f"{arch}.json"))
    w.model = comfy.init_random_(_open_clip_model(0), seed=11)
    w.other = comfy.init_random_(_open_clip_model(0), seed=12)
    w.weights = cdir / f"{ARCH}.safetensors"
    save_file({k: v.contiguous() for k, v in w.model.state_dict().items()}, str(w.weights))
    w.enc = ConceptEncoder.from_open_clip(ARCH, weights=str(w.weights))
    dm = comfy.tiny_sd15().model.diffusion_model
    w.hn_name = comfy.write_hypernet(comfy_base, "reuse_sd15.safetensors", dm, w.enc.identity, seed=3)
    nofile = ConceptEncoder.from_model(w.model, open_clip.get_tokenizer(ARCH), NOFILE_ARCH).identity
    comfy.write_hypernet(comfy_base, "reuse_nofile.safetensors", dm, nofile, seed=3)
    old = {k: w.enc.identity[k] for k in ("arch", "fingerprint", "embed_dim")}  # a file from before tower fingerprints
    comfy.write_hypernet(comfy_base, "reuse_old.safetensors", dm, old, seed=3)
    folder_paths.filename_list_cache.clear()
    w.hn = D.LoadHyperNet.execute(w.hn_name).args[0]
    w.hn_nofile = D.LoadHyperNet.execute("reuse_nofile.safetensors").args[0]
    w.hn_old = D.LoadHyperNet.execute("reuse_old.safetensors").args[0]
    w.clip32 = comfy_sd15_clip(w.model, dtype=torch.float32)
    w.clip16 = comfy_sd15_clip(w.model)  # ComfyUI's default text-encoder dtype on this device (fp16 on the CPU)
    w.clip_other = comfy_sd15_clip(w.other, dtype=torch.float32)
    w.sdxl = comfy_sdxl_clip(w.other, w.model)
    tmp = tmp_path_factory.mktemp("clip_vision_cfg")
    w.cv = comfy_clip_vision(w.model, tmp)
    w.cv32 = comfy_clip_vision(w.model, tmp, fp32=True)  # for an exact check
    w.cv_other = comfy_clip_vision(w.other, tmp)
    w.cv_gelu = comfy_clip_vision(w.model, tmp, {**CV_CFG, "hidden_act": "gelu"})
    w.images = torch.rand((2, 40, 52, 4), generator=torch.Generator().manual_seed(0))  # RGBA, odd size
    yield w
    del w.clip32, w.clip16, w.clip_other, w.sdxl, w.cv, w.cv32, w.cv_other, w.cv_gelu
    import gc

    gc.collect()


def forbid_open_clip(monkeypatch, MF):
    """From here on, any attempt to build an open_clip encoder fails the test."""
    from hypertransport_core.encoders import ConceptEncoder

    def refuse(*a, **k):
        raise AssertionError("the open_clip loading path was used")

    monkeypatch.setattr(MF, "_load_encoder", refuse)
    monkeypatch.setattr(ConceptEncoder, "from_open_clip", classmethod(lambda cls, *a, **k: refuse()))


@pytest.fixture
def no_open_clip(MF, monkeypatch):
    forbid_open_clip(monkeypatch, MF)


def _emb(out):
    return out.args[0].embedding


def _cos(a, b):
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


# ----------------------------------------------------------------------- fingerprints (d, e) ---
def test_comfy_towers_fingerprint_like_the_open_clip_towers(W, CC):
    ident = W.enc.identity
    assert ident["text_fingerprint"] and ident["image_fingerprint"]
    assert ident["text_fingerprint"] != ident["image_fingerprint"]
    (l32,) = CC.text_towers(W.clip32)
    (l16,) = CC.text_towers(W.clip16)
    assert l32.name == "clip_l" and l32.fingerprint == ident["text_fingerprint"]
    assert W.clip16.cond_stage_model.clip_l.transformer.text_projection.weight.dtype == torch.float16
    assert l16.fingerprint == ident["text_fingerprint"], "an fp16 copy held by ComfyUI must fingerprint alike"
    xl = {t.name: t.fingerprint for t in CC.text_towers(W.sdxl)}
    assert xl == {"clip_l": CC.text_towers(W.clip_other)[0].fingerprint, "clip_g": ident["text_fingerprint"]}
    assert CC.image_tower(W.cv).fingerprint == ident["image_fingerprint"]
    assert CC.image_tower(W.cv_other).fingerprint != ident["image_fingerprint"]
    # same weights, another activation: not the same model, and the fingerprint says so
    assert CC.image_tower(W.cv_gelu).fingerprint != ident["image_fingerprint"]


def test_tower_fingerprints_survive_fp16_and_ignore_the_other_tower(W):
    from hypertransport_core.encoders import ConceptEncoder

    half = ConceptEncoder.from_model(copy.deepcopy(W.model).half(), W.enc.tokenizer, ARCH)
    assert {k: half.identity[k] for k in ("text_fingerprint", "image_fingerprint", "fingerprint")} == {
        k: W.enc.identity[k] for k in ("text_fingerprint", "image_fingerprint", "fingerprint")
    }
    mixed = copy.deepcopy(W.model)
    with torch.no_grad():
        mixed.visual.proj.add_(0.1)
    ident = ConceptEncoder.from_model(mixed, W.enc.tokenizer, ARCH).identity
    assert ident["text_fingerprint"] == W.enc.identity["text_fingerprint"]
    assert ident["image_fingerprint"] != W.enc.identity["image_fingerprint"]


def test_layout_mapping_inverts_comfyuis_converters(W):
    """hf_*_to_open_clip undo ComfyUI's own open_clip → HF conversions exactly (names, fused q/k/v, transposes)."""
    from hypertransport_core.clip_layouts import UNMAPPED, hf_text_to_open_clip, hf_vision_to_open_clip, open_clip_tower

    sd = W.model.state_dict()
    for tower, back in (
        ("text", hf_text_to_open_clip(_text_sd(W.model))),
        ("image", hf_vision_to_open_clip(_vision_sd(W.model))),
    ):
        want = open_clip_tower(sd, tower)
        assert not [k for k in back if k.startswith(UNMAPPED)]
        assert sorted(back) == sorted(want), tower
        for k in want:
            assert torch.equal(back[k], want[k]), k
    extra = hf_text_to_open_clip({**_text_sd(W.model), "text_model.extra.weight": torch.ones(2)})
    assert f"{UNMAPPED}text_model.extra.weight" in extra


def test_token_ids_agree_with_comfyuis_tokenizer(W):
    """Plain text: ComfyUI's CLIP tokenizer and open_clip's give the same ids (same BPE vocabulary)."""
    hf = W.clip32.tokenizer.clip_l.tokenizer
    for text in ["watercolor", "a red cube, on a table!", "Van Gogh's starry night", "low-poly 3d render"]:
        ids = W.enc.tokenizer([text])[0]
        n = int(ids.argmax()) + 1
        assert hf(text)["input_ids"] == ids[:n].tolist(), text


# --------------------------------------------------------------------------- text: (a), (b) ---
def test_text_through_comfy_clip_equals_open_clip(W, D, MF, monkeypatch):
    text = "\n".join(["watercolor", "a red cube, on a table! * 0.5"])
    ref = _emb(D.EncodeConcept.execute(W.hn, text, f"{ARCH}.safetensors"))
    forbid_open_clip(monkeypatch, MF)
    got = _emb(D.EncodeConcept.execute(W.hn, text, f"{ARCH}.safetensors", W.clip32))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)  # fp32 weights: the same computation
    direct = W.enc.encode_text(TEXTS)
    half = _emb(D.EncodeConcept.execute(W.hn, "watercolor", "auto (match the hypernet's encoder)", W.clip16))
    assert _cos(half, direct[0]) > 0.9999  # fp16 weights (ComfyUI's default): equal up to fp16 rounding


def test_every_text_and_the_sdxl_clip_g(W, CC):
    direct = W.enc.encode_text(TEXTS)
    enc32 = CC.text_encoder_for(W.hn, W.clip32, "auto")
    assert isinstance(enc32, CC.ComfyTextEncoder) and enc32.tower.name == "clip_l"
    torch.testing.assert_close(enc32.encode_text(TEXTS), direct, atol=2e-5, rtol=0)
    xl = CC.text_encoder_for(W.hn, W.sdxl, "auto")
    assert isinstance(xl, CC.ComfyTextEncoder) and xl.tower.name == "clip_g"  # clip_l holds other weights
    assert _cos(xl.encode_text(TEXTS), direct) > 0.9999


def test_no_open_clip_load_when_the_clip_matches(W, D, no_open_clip):
    c = D.EncodeConcept.execute(W.hn, "watercolor", "auto (match the hypernet's encoder)", W.clip32).args[0]
    assert c.encoder["fingerprint"] == W.enc.identity["fingerprint"]
    steering = D.MakeSteering.execute(W.hn, c).args[0]  # the hypernet accepts the concept
    assert torch.isfinite(steering.w).all()
    xl = D.EncodeConcept.execute(W.hn, "watercolor", "auto (match the hypernet's encoder)", W.sdxl).args[0]
    assert _cos(xl.embedding, c.embedding) > 0.9999
    img = D.EncodeReferenceImage.execute(W.hn, W.images, "auto (match the hypernet's encoder)", W.cv).args[0]
    mixed = D.CombineConcepts.execute(c, 1.0, img, 0.5).args[0]
    assert mixed.modality == "mixed"
    with pytest.raises(ValueError, match="does not load as .*open_clip loading path"):  # the guard itself works
        D.EncodeConcept.execute(W.hn, "watercolor", "auto (match the hypernet's encoder)")


def test_fingerprints_are_cached_per_tower(W, CC, monkeypatch):
    CC.text_towers(W.clip32)
    calls = []
    real = CC.tower_fingerprint
    monkeypatch.setattr(CC, "tower_fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        CC.text_encoder_for(W.hn, W.clip32, "auto").encode_text(["watercolor"])
    clone = W.clip32.clone()  # a clone shares the module: no rehash either
    CC.text_encoder_for(W.hn, clone, "auto")
    assert calls == []


# ---------------------------------------------------------------------- text: fallback (c) ---
def test_other_clip_falls_back_with_a_warning(W, D, caplog):
    ref = _emb(D.EncodeConcept.execute(W.hn, "watercolor", f"{ARCH}.safetensors"))
    with caplog.at_level(logging.WARNING):
        got = _emb(D.EncodeConcept.execute(W.hn, "watercolor", f"{ARCH}.safetensors", W.clip_other))
    torch.testing.assert_close(got, ref)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "not the hypernet's encoder" in msg and ARCH in msg
    assert W.enc.identity["text_fingerprint"] in msg and "clip_l (fingerprint " in msg


def test_other_clip_and_no_weights_names_both_fixes(W, D):
    from hypertransport_core.errors import HyperTransportError

    with pytest.raises(HyperTransportError) as e:
        D.EncodeConcept.execute(W.hn_nofile, "watercolor", "auto (match the hypernet's encoder)", W.clip_other)
    msg = str(e.value)
    assert "connect the CLIP" in msg and "models/clip" in msg and NOFILE_ARCH in msg
    with pytest.raises(HyperTransportError) as e:
        D.EncodeReferenceImage.execute(W.hn_nofile, W.images, "auto (match the hypernet's encoder)", W.cv_other)
    assert "connect the CLIP_VISION" in str(e.value) and "models/clip" in str(e.value)


def test_old_hypernet_without_tower_fingerprints_falls_back(W, D, caplog):
    ref = _emb(D.EncodeConcept.execute(W.hn_old, "watercolor", f"{ARCH}.safetensors"))
    with caplog.at_level(logging.WARNING):
        got = _emb(D.EncodeConcept.execute(W.hn_old, "watercolor", f"{ARCH}.safetensors", W.clip32))
    torch.testing.assert_close(got, ref)
    assert "records no text_fingerprint" in caplog.text


def test_lora_patched_clip_falls_back_and_its_base_still_matches(W, D, CC, caplog):
    import comfy.model_management as mm

    lora = W.clip32.clone()
    key = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    w = W.clip32.cond_stage_model.state_dict()[key]
    assert lora.add_patches({key: (torch.full_like(w, 0.05),)}) == [key]
    (t,) = CC.text_towers(lora)
    assert t.fingerprint is None and "weight patches" in t.why_not
    with caplog.at_level(logging.WARNING):
        D.EncodeConcept.execute(W.hn, "watercolor", f"{ARCH}.safetensors", lora)
    assert "weight patches" in caplog.text
    mm.load_model_gpu(lora.patcher)  # the LoRA now sits in the shared weights, in place
    assert not torch.equal(W.clip32.cond_stage_model.state_dict()[key], w)
    CC._FINGERPRINTS.clear()
    enc = CC.text_encoder_for(W.hn, W.clip32, "auto")  # rehash: ComfyUI swaps the plain weights back first
    assert isinstance(enc, CC.ComfyTextEncoder)
    torch.testing.assert_close(enc.encode_text(["watercolor"]), W.enc.encode_text(["watercolor"]), atol=2e-5, rtol=0)


# --------------------------------------------------------------------------------- images ---
def test_image_through_comfy_clip_vision_equals_open_clip(W, D, no_open_clip):
    ref = W.enc.image_concept(W.images).embedding
    got = _emb(D.EncodeReferenceImage.execute(W.hn, W.images, "auto (match the hypernet's encoder)", W.cv))
    assert W.cv.model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.float16
    assert _cos(got, ref) > 0.9999  # ComfyUI holds the vision tower in fp16 here
    exact = _emb(D.EncodeReferenceImage.execute(W.hn, W.images, "auto (match the hypernet's encoder)", W.cv32))
    torch.testing.assert_close(exact, ref, atol=2e-5, rtol=0)
    one = D.EncodeReferenceImage.execute(W.hn, W.images[:1, :, :, :3], "auto (match the hypernet's encoder)", W.cv)
    assert _cos(_emb(one), W.enc.encode_image(W.images[:1, :, :, :3])[0]) > 0.9999


@pytest.mark.parametrize("which", ["cv_other", "cv_gelu"])
def test_other_clip_vision_falls_back(W, D, caplog, which):
    ref = W.enc.image_concept(W.images).embedding
    with caplog.at_level(logging.WARNING):
        got = _emb(D.EncodeReferenceImage.execute(W.hn, W.images, f"{ARCH}.safetensors", getattr(W, which)))
    torch.testing.assert_close(got, ref)
    assert "not the hypernet's encoder" in caplog.text and W.enc.identity["image_fingerprint"] in caplog.text


# ------------------------------------------------------------------------- real executor ---
def test_through_comfyuis_executor(W, comfy):
    import nodes

    if "HyperTransportEncodeConcept" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(comfy.REPO)))
    got: dict = {}

    class HTTestConceptSink:
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"concept": ("HT_CONCEPT",), "key": ("STRING", {"default": "c"})}}

        def run(self, concept, key):
            got[key] = concept
            return ()

    nodes.NODE_CLASS_MAPPINGS["HTTestConceptSink"] = HTTestConceptSink
    comfy.constant_node("HTTestReuseCLIP", ("CLIP", "CLIP_VISION"), (W.clip32, W.cv))
    comfy.constant_node("HTTestImage", ("IMAGE",), (W.images,))
    auto = "auto (match the hypernet's encoder)"
    prompt = {
        "1": {"class_type": "HTTestReuseCLIP", "inputs": {}},
        "2": {"class_type": "HyperTransportLoadHyperNet", "inputs": {"hypernet_name": W.hn_name}},
        "3": {
            "class_type": "HyperTransportEncodeConcept",
            "inputs": {"hypernet": ["2", 0], "text": "watercolor", "clip_weights": auto, "clip": ["1", 0]},
        },
        "4": {
            "class_type": "HyperTransportEncodeReferenceImage",
            "inputs": {"hypernet": ["2", 0], "image": ["5", 0], "clip_weights": auto, "clip_vision": ["1", 1]},
        },
        "5": {"class_type": "HTTestImage", "inputs": {}},
        "6": {"class_type": "HTTestConceptSink", "inputs": {"concept": ["3", 0], "key": "text"}},
        "7": {"class_type": "HTTestConceptSink", "inputs": {"concept": ["4", 0], "key": "image"}},
    }
    ex = comfy.run_prompt(comfy.prompt_executor(), prompt)
    assert ex.success, ex.status_messages
    torch.testing.assert_close(got["text"].embedding, W.enc.encode_text(["watercolor"])[0], atol=2e-5, rtol=0)
    assert _cos(got["image"].embedding, W.enc.image_concept(W.images).embedding) > 0.9999


def test_auto_search_tries_every_candidate_and_names_each(W, D, comfy_base, monkeypatch):
    """A candidate file that does not load does not hide the next one; when none fits, each is named."""
    import folder_paths

    broken = comfy_base / "models" / "clip" / f"{ARCH}-broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a model}")
    folder_paths.filename_list_cache.clear()
    try:
        c = D.EncodeConcept.execute(W.hn, "watercolor", "auto (match the hypernet's encoder)").args[0]
        assert c.encoder["fingerprint"] == W.enc.identity["fingerprint"]  # the good file, found after the broken one
        good = comfy_base / "models" / "clip" / f"{ARCH}.safetensors"
        monkeypatch.setattr(folder_paths, "get_filename_list", lambda f: [broken.name] if f == "text_encoders" else [])
        with pytest.raises(ValueError, match=f"found {broken.name} \\(does not load as {ARCH}: .*Fix: put the CLIP weights"):
            D.EncodeConcept.execute(W.hn, "watercolor", "auto (match the hypernet's encoder)")
        assert good.exists()
    finally:
        broken.unlink()
        folder_paths.filename_list_cache.clear()


def test_clip_without_its_text_projection_uses_the_hypernets(W, D, comfy, comfy_base, no_open_clip):
    """An SD1.5 checkpoint's clip_l has no text projection (ComfyUI leaves it unloaded): the tower still matches
    before its projection, and the projection the hypernet file keeps completes the encoding."""
    import folder_paths

    from hypertransport_core.encoders import text_projection

    proj = text_projection(W.model)
    dm = comfy.tiny_sd15().model.diffusion_model
    name = "reuse_with_projection.safetensors"
    from hypertransport_core.files import save_hypernet

    save_hypernet(str(comfy_base / "models" / "hypertransport" / name),
                  comfy.random_hypernet(dm, W.enc.identity, seed=3, text_projection=proj))
    folder_paths.filename_list_cache.clear()
    hn = D.LoadHyperNet.execute(name).args[0]
    clip = comfy_sd15_clip(W.model, dtype=torch.float32)
    with torch.no_grad():  # what an SD1.5 checkpoint leaves there: not the encoder's projection
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.copy_(torch.randn(32, 32))
    got = D.EncodeConcept.execute(hn, "watercolor", "auto (match the hypernet's encoder)", clip).args[0]
    want = W.enc.encode_text(["watercolor"])[0]
    torch.testing.assert_close(got.embedding, want, atol=1e-5, rtol=0)
    # without the kept projection the same CLIP does not match (and the open_clip path is forbidden here)
    with pytest.raises(ValueError, match="not the hypernet's encoder.*open_clip loading path"):
        D.EncodeConcept.execute(W.hn, "watercolor", "auto (match the hypernet's encoder)", clip)
