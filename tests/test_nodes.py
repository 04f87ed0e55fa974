"""The nodes in-process against a real ComfyUI, on tiny random-weight models of every family.

Every model is built from ComfyUI's own classes (SD1.5, SDXL, PixArt-Sigma, Flux); sampling is
``comfy.sample.sample`` with 2 euler steps (4 where the step range is tested), as KSampler runs it.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy

FAMILIES = ["sd15", "sdxl", "pixart", "flux"]


@pytest.fixture(scope="module")
def D(pack):
    return pack.nodes.definitions


@pytest.fixture(scope="module")
def P(pack):
    return pack.nodes.patching


class Fam:
    """A tiny model of one family with its hypernet, a concept and helpers."""

    def __init__(self, comfy, D, make_hypernet, family, form=None, dtype=None):
        build, self.ckw, self.shape = comfy.FAMILIES[family]
        self.comfy, self.family = comfy, family
        self.model = build(dtype=dtype) if dtype is not None else build()
        suffix = f"_{form}" if form else ""
        name = make_hypernet(self.model, f"{family}{suffix}.safetensors", form=form)
        self.hn = D.LoadHyperNet.execute(name).args[0]
        self.concept = D.EncodeConcept.execute(self.hn, "watercolor").args[0]
        self.concept2 = D.EncodeConcept.execute(self.hn, "a pencil sketch").args[0]
        self.pos = comfy.random_cond(seed=1, **self.ckw)
        self.neg = comfy.random_cond(seed=2, **self.ckw)

    def sample(self, model, steps=2, seed=42):
        return self.comfy.sample(model, self.pos, self.neg, seed=seed, steps=steps, latent_shape=self.shape)


_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_models():
    yield
    _CACHE.clear()  # free the ModelPatchers while ComfyUI is still importable (quiet interpreter exit)
    import gc

    gc.collect()


@pytest.fixture(params=FAMILIES)
def fam(request, comfy, D, make_hypernet):
    key = request.param
    if key not in _CACHE:
        _CACHE[key] = Fam(comfy, D, make_hypernet, key)
    return _CACHE[key]


@pytest.fixture
def sd15(comfy, D, make_hypernet):
    if "sd15" not in _CACHE:
        _CACHE["sd15"] = Fam(comfy, D, make_hypernet, "sd15")
    return _CACHE["sd15"]


def no_hooks_left(model) -> bool:
    dm = model.model.diffusion_model
    return all(not m._forward_hooks for m in dm.modules())


# ----------------------------------------------------------------------------------- schema ---
def test_every_node_documented(D):
    ids = set()
    for cls in D.NODES:
        s = cls.define_schema()
        assert s.node_id.startswith("HyperTransport"), s.node_id
        assert s.node_id not in ids
        ids.add(s.node_id)
        assert s.description and s.display_name and s.category == "HyperTransport", s.node_id
        for i in s.inputs:
            assert i.tooltip, f"{s.node_id}.{i.id} has no tooltip"
        for o in s.outputs:
            assert o.tooltip, f"{s.node_id} output {o.display_name} has no tooltip"
    assert {
        "HyperTransportLoadHyperNet",
        "HyperTransportEncodeConcept",
        "HyperTransportEncodeReferenceImage",
        "HyperTransportApplySteering",
    } <= ids


def test_load_hypernet_reports_family_encoder_sites(sd15):
    info = sd15.hn.describe()
    assert "sd15" in info and "ht-tiny-clip" in info and f"{len(sd15.hn.net.sites)} sites" in info


# --------------------------------------------------------------------- invariants per family ---
def test_strength_zero_is_the_same_model(fam, D):
    ref = fam.sample(fam.model)
    (m,) = D.ApplySteering.execute(fam.model, fam.hn, fam.concept, 0.0, 0.0, 1.0).args
    assert m is fam.model
    assert torch.equal(fam.sample(m), ref)
    steering = D.MakeSteering.execute(fam.hn, fam.concept).args[0]
    (m2,) = D.ApplySteeringAdvanced.execute(fam.model, steering, 0.0, 0.0, 1.0, "hooks", "all", "").args
    assert m2 is fam.model


@pytest.mark.parametrize("mode", ["hooks", "folded"])
def test_steering_changes_output_and_leaves_original_untouched(fam, D, P, mode):
    ref = fam.sample(fam.model)
    sd_before = {k: v.clone() for k, v in fam.model.model.diffusion_model.state_dict().items()}
    steering = D.MakeSteering.execute(fam.hn, fam.concept).args[0]
    (m,) = D.ApplySteeringAdvanced.execute(fam.model, steering, 1.0, 0.0, 1.0, mode, "all", "").args
    assert m is not fam.model
    out = fam.sample(m)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref)
    assert no_hooks_left(fam.model)
    assert torch.equal(fam.sample(fam.model), ref), "the shared model changed after a steered run"
    for k, v in fam.model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, sd_before[k]), k
    assert not fam.model.patches and not P.wrappers_of(fam.model)


def test_folded_equals_hooked(fam, D):
    steering = D.MakeSteering.execute(fam.hn, fam.concept).args[0]
    (mh,) = D.ApplySteeringAdvanced.execute(fam.model, steering, 0.8, 0.0, 1.0, "hooks", "all", "").args
    (mf,) = D.ApplySteeringAdvanced.execute(fam.model, steering, 0.8, 0.0, 1.0, "folded", "all", "").args
    a, b = fam.sample(mh), fam.sample(mf)
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_elementwise_sites_fold_completely(comfy, D, P, make_hypernet, family):
    f = Fam(comfy, D, make_hypernet, family, form="elementwise")
    steering = D.MakeSteering.execute(f.hn, f.concept).args[0]
    (mf,) = D.ApplySteeringAdvanced.execute(f.model, steering, 1.0, 0.0, 1.0, "folded", "all", "").args
    assert not P.wrappers_of(mf), "every elementwise norm site should fold: no hooks at sampling time"
    assert len(mf.patches) == 2 * len(steering.sites)
    (mh,) = D.ApplySteeringAdvanced.execute(f.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "").args
    ref = f.sample(f.model)
    a, b = f.sample(mh), f.sample(mf)
    assert not torch.equal(a, ref)
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    assert torch.equal(f.sample(f.model), ref)
    # negative strength (inverse map) folds too
    (mh,) = D.ApplySteeringAdvanced.execute(f.model, steering, -0.7, 0.0, 1.0, "hooks", "all", "").args
    (mf,) = D.ApplySteeringAdvanced.execute(f.model, steering, -0.7, 0.0, 1.0, "folded", "all", "").args
    torch.testing.assert_close(f.sample(mf), f.sample(mh), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------ isolation, stacking ---
def test_two_clones_independent(sd15, D):
    (a,) = D.ApplySteering.execute(sd15.model, sd15.hn, sd15.concept, 1.0, 0.0, 1.0).args
    (b,) = D.ApplySteering.execute(sd15.model, sd15.hn, sd15.concept2, -1.0, 0.0, 1.0).args
    ref = sd15.sample(sd15.model)
    a1, b1 = sd15.sample(a), sd15.sample(b)
    assert not torch.equal(a1, b1)
    a2 = sd15.sample(a)
    base = sd15.sample(sd15.model)
    b2 = sd15.sample(b)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(base, ref)


def test_stacks_with_itself(sd15, D, P):
    s1 = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    s2 = D.MakeSteering.execute(sd15.hn, sd15.concept2).args[0]
    for mode in ("hooks", "folded"):
        (m1,) = D.ApplySteeringAdvanced.execute(sd15.model, s1, 1.0, 0.0, 1.0, mode, "all", "").args
        (m12,) = D.ApplySteeringAdvanced.execute(m1, s2, 0.5, 0.0, 1.0, mode, "all", "").args
        both = P.attach(sd15.model, [(s1, 1.0), (s2, 0.5)], mode="hooks")
        out = sd15.sample(m12)
        assert not torch.equal(out, sd15.sample(m1))
        torch.testing.assert_close(out, sd15.sample(both), rtol=1e-3, atol=1e-3)
    assert torch.equal(sd15.sample(sd15.model), sd15.sample(sd15.model))


def test_stacks_with_lora_patch_and_other_wrapper(sd15, D):
    import comfy.patcher_extension as pe

    base = sd15.model
    ref = sd15.sample(base)
    lora = base.clone()  # a LoRA-like weight patch on a conv and on a norm the steering folds into
    key = "diffusion_model.input_blocks.0.0.weight"
    norm_key = next(k for k in base.model.state_dict() if k.endswith("norm1.weight"))
    w = base.model.state_dict()[key]
    nw = base.model.state_dict()[norm_key]
    lora.add_patches({key: (torch.full_like(w, 0.01),), norm_key: (torch.full_like(nw, 0.1),)}, 1.0)
    calls = []

    def other(executor, *a, **k):
        calls.append(1)
        return executor(*a, **k)

    lora.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "someone_else", other)
    ref_lora = sd15.sample(lora)
    n_other = len(calls)
    assert not torch.equal(ref_lora, ref)
    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    outs = {}
    for mode in ("hooks", "folded"):
        (m,) = D.ApplySteeringAdvanced.execute(lora, steering, 1.0, 0.0, 1.0, mode, "all", "").args
        outs[mode] = sd15.sample(m)
        assert not torch.equal(outs[mode], ref_lora)
    assert len(calls) == 3 * n_other, "the other node's wrapper must keep running"
    torch.testing.assert_close(outs["folded"], outs["hooks"], rtol=1e-3, atol=1e-3)  # folded composes with the LoRA
    assert torch.equal(sd15.sample(lora), ref_lora) and torch.equal(sd15.sample(base), ref)


def test_hooks_removed_when_sampling_raises(sd15, D):
    import comfy.patcher_extension as pe

    (m,) = D.ApplySteeringAdvanced.execute(
        sd15.model, D.MakeSteering.execute(sd15.hn, sd15.concept).args[0], 1.0, 0.0, 1.0, "hooks", "all", ""
    ).args
    m = m.clone()
    seen = []

    def boom(executor, *a, **k):
        seen.append(sum(len(x._forward_hooks) for x in executor.class_obj.diffusion_model.modules()))
        raise RuntimeError("boom")

    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "zz_boom", boom)
    ref = sd15.sample(sd15.model)
    with pytest.raises(RuntimeError, match="boom"):
        sd15.sample(m)
    assert seen and seen[0] > 0, "the steering hooks should be active inside the model call"
    assert no_hooks_left(sd15.model)
    assert torch.equal(sd15.sample(sd15.model), ref)


# ------------------------------------------------------------------------ step range and rows ---
def test_step_range_honoured(sd15, D, P):
    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    ref = sd15.sample(sd15.model, steps=4)
    outs = {}
    for rng in ((0.0, 1.0), (0.4, 1.0), (0.0, 0.4), (0.1, 0.2)):
        (m,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, *rng, "hooks", "all", "").args
        (w,) = P.wrappers_of(m)
        outs[rng] = sd15.sample(m, steps=4)
        outs[rng, "calls"] = w.calls
    # 4 "normal"-schedule steps call the model at t = 999, 666, 333, 0; 40 % of the sampling = t 599.4,
    # 10 % .. 20 % = t 899.1 .. 799.2 holds no step
    assert outs[(0.0, 1.0), "calls"] == 4
    assert outs[(0.4, 1.0), "calls"] == 2 and outs[(0.0, 0.4), "calls"] == 2
    assert outs[(0.1, 0.2), "calls"] == 0 and torch.equal(outs[(0.1, 0.2)], ref)
    assert len({tuple(outs[r].flatten()[:8].tolist()) for r in ((0.0, 1.0), (0.4, 1.0), (0.0, 0.4))}) == 3
    with pytest.raises(ValueError, match="folded"):
        D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.4, 1.0, "folded", "all", "")
    with pytest.raises(ValueError, match="start_percent"):
        D.ApplySteering.execute(sd15.model, sd15.hn, sd15.concept, 1.0, 0.8, 0.2)


def test_rows_cond_uncond(sd15, D):
    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    ref = sd15.sample(sd15.model)
    outs = {}
    for rows in ("all", "cond", "uncond"):
        (m,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "auto", rows, "").args
        outs[rows] = sd15.sample(m)
    assert len({tuple(o.flatten()[:8].tolist()) for o in (*outs.values(), ref)}) == 4


def test_per_block_strength(sd15, D):
    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    ref = sd15.sample(sd15.model)
    (full,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "").args
    (part,) = D.ApplySteeringAdvanced.execute(
        sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "*: 0\ninput_blocks: 1.0  # only the encoder half"
    ).args
    (same,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "*: 1").args
    o_full, o_part = sd15.sample(full), sd15.sample(part)
    assert not torch.equal(o_part, ref) and not torch.equal(o_part, o_full)
    assert torch.equal(sd15.sample(same), o_full)
    (zero,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "*: 0").args
    assert zero is sd15.model
    with pytest.raises(ValueError, match="block_strengths"):
        D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "input_blocks")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(comfy, D, make_hypernet, dtype):
    f = Fam(comfy, D, make_hypernet, "sd15", dtype=dtype)
    ref = f.sample(f.model)
    steering = D.MakeSteering.execute(f.hn, f.concept).args[0]
    for mode in ("hooks", "folded"):
        (m,) = D.ApplySteeringAdvanced.execute(f.model, steering, 1.0, 0.0, 1.0, mode, "all", "").args
        out = f.sample(m)
        assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(f.sample(f.model), ref)


def test_maps_follow_the_activation_device_and_dtype(P, sd15, D):
    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    w = P.SteeringWrapper([(steering, 1.0)])
    moved = w.on_device(torch.device("meta"))
    assert moved[0][0].w.device.type == "meta" and w.on_device(torch.device("meta")) is moved
    prep = w.prepared(torch.device("meta"), torch.float16)
    sm = next(iter(prep.by_module.values()))[0]
    assert sm.a.device.type == "meta" and sm.a.dtype == torch.float16
    assert w.prepared(torch.device("meta"), torch.float16) is prep
    # an activation in another dtype/device than prepared still gets maps of its own dtype
    site = sm.site
    z = torch.randn(2, site.channels, 3, 3) if site.channel_dim == 1 else torch.randn(2, 5, site.channels)
    sm32 = w.prepared(torch.device("cpu"), torch.float32).by_module[site.module][0]
    out = P._apply(z.to(torch.bfloat16), sm32, None)
    assert out.dtype == torch.bfloat16


def test_clones_share_the_maps(sd15, D, P):
    (m,) = D.ApplySteeringAdvanced.execute(
        sd15.model, D.MakeSteering.execute(sd15.hn, sd15.concept).args[0], 1.0, 0.0, 0.5, "hooks", "all", ""
    ).args
    c1, c2 = m.clone(), m.clone().clone()
    (w,) = P.wrappers_of(m)
    assert P.wrappers_of(c1)[0] is w and P.wrappers_of(c2)[0] is w
    import copy

    assert copy.deepcopy(w) is w  # model_options deep copies would not duplicate the maps either
    (f,) = D.ApplySteeringAdvanced.execute(
        sd15.model, D.MakeSteering.execute(sd15.hn, sd15.concept).args[0], 1.0, 0.0, 1.0, "folded", "all", ""
    ).args
    k = next(iter(f.patches))
    assert f.clone().patches[k][0][1] is f.patches[k][0][1]


# ---------------------------------------------------------------------------- concepts, files ---
def test_encode_concepts_and_combine(sd15, D):
    enc = D.EncodeConcept.execute
    single = enc(sd15.hn, "watercolor").args[0]
    multi = enc(sd15.hn, "watercolor\n(a pencil sketch:-0.5)").args[0]
    assert single.modality == "text" and abs(float(single.embedding.norm()) - 1) < 1e-5
    combined = D.CombineConcepts.execute(single, 1.0, sd15.concept2, -0.5, None, 1.0).args[0]
    torch.testing.assert_close(multi.embedding, combined.embedding)
    with pytest.raises(ValueError, match="empty"):
        enc(sd15.hn, "  \n ")


@pytest.mark.parametrize("shape", [(1, 64, 48, 3), (3, 17, 300, 3), (2, 40, 40, 4), (1, 33, 31, 1), (1, 2, 2, 3)])
def test_encode_reference_image_any_shape(sd15, D, shape):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(shape, generator=g)
    c = D.EncodeReferenceImage.execute(sd15.hn, img).args[0]
    assert c.modality == "image" and c.embedding.shape == (32,) and torch.isfinite(c.embedding).all()
    if shape[0] > 1:  # a batch is averaged
        each = [D.EncodeReferenceImage.execute(sd15.hn, img[i : i + 1]).args[0].embedding for i in range(shape[0])]
        mean = torch.nn.functional.normalize(torch.stack(each).mean(0), dim=0)
        torch.testing.assert_close(c.embedding, mean, rtol=1e-4, atol=1e-5)
    (m,) = D.ApplySteering.execute(sd15.model, sd15.hn, c, 1.0, 0.0, 1.0).args
    assert torch.isfinite(sd15.sample(m)).all()


def test_save_and_load_steering_without_hypernet(sd15, D, comfy_base):
    import folder_paths

    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    out = D.SaveSteering.execute(steering, "unit/steer")
    rel = out.args[0]
    path = comfy_base / "output" / "hypertransport_steerings" / rel
    assert path.is_file() and path.stat().st_size < 64 * 1024
    folder_paths.filename_list_cache.clear()
    loaded, info = D.LoadSteering.execute(rel).args
    assert "watercolor" in info and "sd15" in info
    (a,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "").args
    (b,) = D.ApplySteeringAdvanced.execute(sd15.model, loaded, 1.0, 0.0, 1.0, "hooks", "all", "").args
    assert torch.equal(sd15.sample(a), sd15.sample(b))
    with pytest.raises(ValueError, match="leaves the output folder"):
        D.SaveSteering.execute(steering, "../../evil")


# ------------------------------------------------------------------------------------ errors ---
def test_wrong_family_is_refused_before_sampling(comfy, D, make_hypernet, sd15):
    sdxl = comfy.tiny_sdxl()
    name = make_hypernet(sdxl, "for_sdxl.safetensors")
    hn = D.LoadHyperNet.execute(name).args[0]
    with pytest.raises(ValueError) as e:
        D.ApplySteering.execute(sd15.model, hn, sd15.concept, 1.0, 0.0, 1.0)
    msg = str(e.value)
    assert "'sdxl'" in msg and "'sd15'" in msg and "Load HyperNet" in msg
    steering = D.MakeSteering.execute(hn, sd15.concept).args[0]
    with pytest.raises(ValueError, match="sdxl"):
        D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "auto", "all", "")


def test_other_encoder_is_refused(sd15, D):
    from hypertransport_core.concepts import Concept

    alien = Concept(
        torch.nn.functional.normalize(torch.randn(32), dim=0),
        "text",
        {"arch": "ViT-L-14", "fingerprint": "0123456789abcdef", "embed_dim": 32},
        "alien",
    )
    with pytest.raises(ValueError, match="ViT-L-14"):
        D.ApplySteering.execute(sd15.model, sd15.hn, alien, 1.0, 0.0, 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_strength(sd15, D, bad):
    with pytest.raises(ValueError, match="finite"):
        D.ApplySteering.execute(sd15.model, sd15.hn, sd15.concept, bad, 0.0, 1.0)


def test_corrupt_hypernet_file(comfy_base, D):
    import folder_paths

    p = comfy_base / "models" / "hypertransport" / "corrupt.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    folder_paths.filename_list_cache.clear()
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        D.LoadHyperNet.execute("corrupt.safetensors")
    with pytest.raises(ValueError, match="not found"):
        D.LoadHyperNet.execute("missing.safetensors")


@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_hooks_match_core_steer(comfy, D, P, make_hypernet, family):
    """The wrapper's precomputed maps give what hypertransport_core.hooks.steer gives."""
    if family not in _CACHE:
        _CACHE[family] = Fam(comfy, D, make_hypernet, family)
    f = _CACHE[family]
    steering = D.MakeSteering.execute(f.hn, f.concept).args[0]
    outs = {}
    for engine in ("prepared", "core"):
        for lam in (0.7, -0.6):
            m = f.model.clone()
            m.add_wrapper_with_key(P._wrappers_mp(), P.WRAPPER_KEY, P.SteeringWrapper([(steering, lam)], engine=engine))
            outs[engine, lam] = f.sample(m)
    for lam in (0.7, -0.6):
        torch.testing.assert_close(outs["prepared", lam], outs["core", lam], rtol=1e-3, atol=1e-3)


def test_validate_inputs_refuses_before_running(D):
    assert D.ApplySteering.validate_inputs(strength=1.0, start_percent=0.0, end_percent=1.0) is True
    assert "finite" in D.ApplySteering.validate_inputs(strength=float("nan"), start_percent=0.0, end_percent=1.0)
    assert "start_percent" in D.ApplySteering.validate_inputs(strength=1.0, start_percent=0.8, end_percent=0.2)
    assert D.ApplySteering.validate_inputs(strength=None) is True  # a widget fed by a link: checked at run time
    assert "empty" in D.EncodeConcept.validate_inputs(text=" ")
    assert D.EncodeConcept.validate_inputs(text="(watercolor:0.5)") is True
    assert "block_strengths" in D.ApplySteeringAdvanced.validate_inputs(strength=1.0, block_strengths="oops")


def test_folded_maps_in_a_partially_loaded_model(comfy, D, P, make_hypernet):
    """ComfyUI's low-VRAM path (weights patched per layer at run time by LowVramPatch, as for models
    offloaded between devices) applies the folded maps exactly like a full load, and unpatching
    restores the model."""
    f = Fam(comfy, D, make_hypernet, "sd15", form="elementwise")
    steering = D.MakeSteering.execute(f.hn, f.concept).args[0]
    (m,) = D.ApplySteeringAdvanced.execute(f.model, steering, 1.0, 0.0, 1.0, "folded", "all", "").args
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5.0, 5.0]), torch.randn(2, 8, 64, generator=g)
    cpu = torch.device("cpu")

    def fwd():
        with torch.no_grad():
            return m.model.apply_model(x, t, c_crossattn=ctx)

    with torch.no_grad():
        ref = f.model.model.apply_model(x, t, c_crossattn=ctx)
    m.load(cpu, lowvram_model_memory=0, force_patch_weights=False, full_load=True)
    full = fwd()
    m.unpatch_model(cpu)
    m.load(cpu, lowvram_model_memory=1, force_patch_weights=False, full_load=False)
    dm = m.model.diffusion_model
    assert any(getattr(mod, "weight_function", None) for mod in dm.modules()), "not partially loaded"
    low = fwd()
    m.unpatch_model(cpu)
    assert not torch.equal(full, ref)
    torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(f.model.model.apply_model(x, t, c_crossattn=ctx), ref)
