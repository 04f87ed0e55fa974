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
        assert s.description and s.display_name.startswith("HyperTransport "), s.node_id  # not ComfyUI's "Load Hypernetwork"
        assert s.category.startswith("HyperTransport/"), s.node_id
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
    ref = sd15.sample(sd15.model)
    s1 = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    s2 = D.MakeSteering.execute(sd15.hn, sd15.concept2).args[0]
    for mode in ("hooks", "folded"):
        (m1,) = D.ApplySteeringAdvanced.execute(sd15.model, s1, 1.0, 0.0, 1.0, mode, "all", "").args
        (m12,) = D.ApplySteeringAdvanced.execute(m1, s2, 0.5, 0.0, 1.0, mode, "all", "").args
        both = P.attach(sd15.model, [(s1, 1.0), (s2, 0.5)], mode="hooks")
        out = sd15.sample(m12)
        assert not torch.equal(out, sd15.sample(m1))
        torch.testing.assert_close(out, sd15.sample(both), rtol=1e-3, atol=1e-3)
    assert torch.equal(sd15.sample(sd15.model), ref)  # the shared model is as it was before any steering


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


def test_rows_cond_uncond(sd15, D, P):
    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]

    def run(rows, cfg):
        (m,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", rows, "").args
        return sd15.comfy.sample(m, sd15.pos, sd15.neg, seed=42, steps=2, cfg=cfg, latent_shape=sd15.shape)

    ref1 = sd15.comfy.sample(sd15.model, sd15.pos, sd15.neg, seed=42, steps=2, cfg=1.0, latent_shape=sd15.shape)
    # cfg 1: ComfyUI runs only the conditional rows, so "cond" is "all" and "uncond" steers nothing
    assert torch.equal(run("cond", 1.0), run("all", 1.0)) and not torch.equal(run("all", 1.0), ref1)
    assert torch.equal(run("uncond", 1.0), ref1)
    # cfg 2: the chunk ComfyUI labels 0 (cond) or 1 (uncond) is the one steered, whatever the batch order
    (m,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "cond", "").args
    (w,) = P.wrappers_of(m)
    dm = sd15.model.model.diffusion_model
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 8, 64)
    for order in ([0, 1], [1, 0]):
        with torch.no_grad():
            plain = dm(x, torch.tensor([5.0] * 4), context=ctx)
            with w.plan.hooks(dm, P.rows_for({"cond_or_uncond": order}, "cond")):
                steered = dm(x, torch.tensor([5.0] * 4), context=ctx)
        cond = slice(0, 2) if order == [0, 1] else slice(2, 4)
        unc = slice(2, 4) if order == [0, 1] else slice(0, 2)
        assert torch.equal(steered[unc], plain[unc]) and not torch.allclose(steered[cond], plain[cond])
    outs = {rows: run(rows, 2.0) for rows in ("all", "cond", "uncond")}
    assert len({tuple(o.flatten()[:8].tolist()) for o in outs.values()}) == 3


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
    with pytest.raises(ValueError, match="block 'input_block' matches none of the steering's .* sites. Fix: .*input_blocks"):
        D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "input_block: 0.5")
    with pytest.raises(ValueError, match="multiplier 1e\\+09, outside -10..10"):
        D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "*: 1e9")


def test_absurd_maps_and_non_finite_outputs_are_errors_not_images(sd15, D, P):
    from hypertransport_core import Steering

    steering = D.MakeSteering.execute(sd15.hn, sd15.concept).args[0]
    b = steering.b.clone()
    b[3] = 3e38
    huge = Steering(steering.sites, steering.w, b, dict(steering.meta))
    with pytest.raises(ValueError, match=f"map at site '{steering.sites[0].name}' has a shift c of magnitude 3e\\+38"):
        D.ApplySteeringAdvanced.execute(sd15.model, huge, 1.0, 0.0, 1.0, "hooks", "all", "")
    assert not sd15.model.patches and not P.wrappers_of(sd15.model)
    # a model call that returns NaN under the steering: an error naming the steering, not a black image
    (m,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "").args
    (w,) = P.wrappers_of(m)

    class Exec:
        class_obj = sd15.model.model

        def __call__(self, x, t, *a, **k):
            return torch.full_like(x, float("nan"))

    with pytest.raises(ValueError, match="produced NaN/Inf at sigma .*Fix: lower the strength"):
        w(Exec(), torch.zeros(2, 4, 8, 8), torch.tensor([1.0, 1.0]), transformer_options={})
    assert no_hooks_left(sd15.model)


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
    (m,) = D.ApplySteeringAdvanced.execute(sd15.model, steering, 1.0, 0.0, 1.0, "hooks", "all", "").args
    (w,) = P.wrappers_of(m)
    sm = next(iter(w.plan.maps.values()))
    a, c, _ = sm.cast(torch.device("meta"), torch.float16)
    assert a.device.type == "meta" and a.dtype == torch.float16 and sm.cast(torch.device("meta"), torch.float16)[0] is a
    # an activation in another dtype gets maps of its own dtype
    site = sm.site
    z = torch.randn(2, site.channels, 3, 3) if site.channel_dim == 1 else torch.randn(2, 5, site.channels)
    assert sm(z.to(torch.bfloat16)).dtype == torch.bfloat16


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
    multi = enc(sd15.hn, "watercolor\na pencil sketch * -0.5").args[0]
    assert single.modality == "text" and abs(float(single.embedding.norm()) - 1) < 1e-5
    combined = D.CombineConcepts.execute(single, 1.0, sd15.concept2, -0.5, None, 1.0).args[0]
    torch.testing.assert_close(multi.embedding, combined.embedding)
    with pytest.raises(ValueError, match="empty"):
        enc(sd15.hn, "  \n ")


def test_a_hypernet_trained_on_templates_encodes_text_through_them(sd15, D, make_hypernet):
    name = make_hypernet(sd15.model, "sd15_templates.safetensors", text_templates=("{}", "a {} painting"))
    hn = D.LoadHyperNet.execute(name)
    assert "mean over 2 phrases ('{}', 'a {} painting')" in hn.args[1]
    got = D.EncodeConcept.execute(hn.args[0], "watercolor").args[0]
    plain = [D.EncodeConcept.execute(sd15.hn, t).args[0].embedding for t in ("watercolor", "a watercolor painting")]
    torch.testing.assert_close(got.embedding, torch.nn.functional.normalize(torch.stack(plain).mean(0), dim=0))
    assert got.label == "watercolor" and not torch.allclose(got.embedding, plain[0])


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e9, -10.5])
def test_non_finite_or_out_of_range_strength(sd15, D, bad):
    with pytest.raises(ValueError, match="strength is .*; it must be a number from -10 to 10. Fix"):
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
def test_node_hooks_equal_core_steer_around_the_sampler(comfy, D, P, make_hypernet, family):
    """The node's wrapper (ComfyUI glue: sigma range, rows) adds nothing to the core engine's arithmetic:
    its images equal those of hypertransport_core.steer() held around the whole sampler run."""
    from hypertransport_core import steer

    if family not in _CACHE:
        _CACHE[family] = Fam(comfy, D, make_hypernet, family)
    f = _CACHE[family]
    steering = D.MakeSteering.execute(f.hn, f.concept).args[0]
    for lam in (0.7, -0.6):
        (m,) = D.ApplySteeringAdvanced.execute(f.model, steering, lam, 0.0, 1.0, "hooks", "all", "").args
        node = f.sample(m)
        with steer(f.model.model.diffusion_model, [(steering, lam)]):
            core = f.sample(f.model)
        assert not torch.equal(node, f.sample(f.model))
        torch.testing.assert_close(node, core, rtol=0, atol=0)


def test_validate_inputs_refuses_before_running(D):
    assert D.ApplySteering.validate_inputs(strength=1.0) is True
    assert "from -10 to 10" in D.ApplySteering.validate_inputs(strength=float("nan"))
    assert "from -10 to 10" in D.ApplySteering.validate_inputs(strength=1e9)
    assert "from -10 to 10" in D.ApplySteeringAdvanced.validate_inputs(strength=-11.0)
    assert D.ApplySteering.validate_inputs(strength=None) is True  # a widget fed by a link: checked at run time
    assert "empty" in D.EncodeConcept.validate_inputs(text=" ")
    assert D.EncodeConcept.validate_inputs(text="watercolor * 0.5\noil painting") is True
    assert "prompt emphasis" in D.EncodeConcept.validate_inputs(text="(watercolor:0.5)")
    assert "'abc' is not a number" in D.EncodeConcept.validate_inputs(text="red * abc")
    assert "outside -10..10" in D.EncodeConcept.validate_inputs(text="red * 1e39")
    assert "more than 16 concept lines" in D.EncodeConcept.validate_inputs(text="red\n" * 17)
    import inspect

    # one input per validate_inputs: ComfyUI attaches the message to every input the function names
    for node in (D.ApplySteering, D.ApplySteeringAdvanced, D.EncodeConcept):
        assert len(inspect.signature(node.validate_inputs).parameters) == 1, node


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


def test_loading_the_nodes_imports_neither_pot_nor_the_trainer():
    """POT is a training dependency (the loss); the nodes load without it, and without the trainer's modules."""
    import subprocess
    import sys

    import ht_devkit

    code = (
        f"import sys; sys.path.insert(0, {str(ht_devkit.REPO)!r}); import ht_devkit; ht_devkit.setup_comfy(); ht_devkit.load_pack(); "
        "import hypertransport_pack.nodes.definitions; "
        "print(sorted(m for m in sys.modules if m == 'ot' or m.startswith('ot.') or m.startswith('trainer.t')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr[-2000:]


def test_a_comfyui_without_the_v3_api_gets_a_warning(tmp_path):
    """Inside a ComfyUI too old for the V3 node API the pack says so (and registers nothing), not silence."""
    import subprocess
    import sys

    import ht_devkit

    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "__init__.py").write_text("")  # a ComfyUI with no comfy_api package
    code = (
        "import importlib.util, logging, sys; logging.basicConfig(level=logging.INFO); "
        "import comfy; "
        f"spec = importlib.util.spec_from_file_location('htpack', {str(ht_devkit.REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ht_devkit.REPO)!r}]); "
        "m = importlib.util.module_from_spec(spec); sys.modules['htpack'] = m; spec.loader.exec_module(m); "
        "print('entrypoint', m.comfy_entrypoint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert "entrypoint None" in out.stdout, out.stdout + out.stderr
    assert "no V3 node API" in out.stderr and "Update ComfyUI to 0.3.75" in out.stderr, out.stderr


def test_packaging_for_the_registry():
    import tomllib

    import ht_devkit

    repo = ht_devkit.REPO
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["requires-comfyui"].startswith(">=") and comfy["Icon"].endswith("docs/icon.png")
    assert (repo / "docs" / "icon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Permission is hereby granted" in (repo / "LICENSE").read_text()
    for wf in (repo / "workflows").glob("*.json"):  # the template browser shows <name>.jpg beside <name>.json
        thumb = wf.with_suffix(".jpg")
        assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{wf.name} has no thumbnail"
