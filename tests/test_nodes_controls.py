"""The controls of Apply Steering (Advanced) and the basic node's STEERING input, in-process against a real
ComfyUI on a tiny SD1.5 model: one strength per image of a batch, a region (MASK), a ramp over the steps,
block presets; each checked against what it must equal."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def D(pack):
    return pack.nodes.definitions


@pytest.fixture(scope="module")
def P(pack):
    return pack.nodes.patching


class Tiny:
    def __init__(self, comfy, D, make_hypernet):
        self.comfy, self.D = comfy, D
        self.model = comfy.tiny_sd15()
        self.hn = D.LoadHyperNet.execute(make_hypernet(self.model, "controls_sd15.safetensors")).args[0]
        self.concept = D.EncodeConcept.execute(self.hn, "watercolor").args[0]
        self.steering = D.MakeSteering.execute(self.hn, self.concept).args[0]
        self.pos = comfy.random_cond("sd15", seed=1, dim=64)
        self.neg = comfy.random_cond("sd15", seed=2, dim=64)

    def sample(self, model, batch=1, steps=2, seed=42, cfg=2.0):
        return self.comfy.sample(model, self.pos, self.neg, seed=seed, steps=steps, cfg=cfg, latent_shape=(batch, 4, 8, 8))

    def advanced(self, strength=1.0, **kw):
        args = dict(start_percent=0.0, end_percent=1.0, mode="hooks", rows="all", block_strengths="")
        args.update(kw)
        return self.D.ApplySteeringAdvanced.execute(self.model, self.steering, strength, **args).args[0]


@pytest.fixture(scope="module")
def t(comfy, D, make_hypernet):
    return Tiny(comfy, D, make_hypernet)


# ---------------------------------------------------------------------- the basic node's input ---
def test_basic_node_takes_a_steering(t, D):
    via_hypernet = D.ApplySteering.execute(t.model, t.hn, t.concept, 0.8).args[0]
    via_steering = D.ApplySteering.execute(t.model, None, None, 0.8, steering=t.steering).args[0]
    torch.testing.assert_close(t.sample(via_steering), t.sample(via_hypernet), rtol=0, atol=0)
    with pytest.raises(ValueError, match="either a steering, or a hypernet and a concept, not both"):
        D.ApplySteering.execute(t.model, t.hn, t.concept, 0.8, steering=t.steering)
    with pytest.raises(ValueError, match="nothing to apply"):
        D.ApplySteering.execute(t.model, None, None, 0.8)


def test_advanced_node_takes_a_hypernet_and_a_concept(t, D):
    via_steering = t.advanced(0.8)
    via_hypernet = D.ApplySteeringAdvanced.execute(t.model, None, 0.8, 0.0, 1.0, "hooks", "all", "", hypernet=t.hn,
                                                   concept=t.concept).args[0]
    torch.testing.assert_close(t.sample(via_hypernet), t.sample(via_steering), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        D.ApplySteeringAdvanced.execute(t.model, t.steering, 0.8, hypernet=t.hn, concept=t.concept)
    with pytest.raises(ValueError, match="nothing to apply"):
        D.ApplySteeringAdvanced.execute(t.model, None, 0.8, hypernet=t.hn)


def test_extreme_strengths_and_maps_are_warned_about(t, P, D, pack, caplog, monkeypatch):
    """Past ±2, or a composed scale past 6x, the node still runs (the hard bound is ±10) but warns in the UI and the log."""
    shown = []
    monkeypatch.setattr(pack.nodes.feedback, "progress_text", shown.append)
    assert P.extreme_warning([(t.steering, 1.0)]) is None and P.extreme_warning([(t.steering, -2.0)]) is None
    assert "past ±2" in P.extreme_warning([(t.steering, 2.5)])
    big = type(t.steering)(t.steering.sites, torch.full_like(t.steering.w, 4.0), t.steering.b)  # 1 + 2 (4 - 1) = 7x
    assert "7.0x" in P.extreme_warning([(big, 2.0)]) and P.extreme_warning([(big, 1.0)]) is None
    with caplog.at_level("WARNING"):
        D.ApplySteering.execute(t.model, None, None, 5.0, steering=t.steering)
        D.ApplySteeringAdvanced.execute(t.model, t.steering, 1.0, 0.0, 1.0, "hooks", "all", "", batch_strengths="1, 3")
    assert len(shown) == 2 and all(x.startswith("warning: strength") for x in shown), shown
    assert "strength 5 is past" in caplog.text and "strength 3 is past" in caplog.text
    shown.clear()
    D.ApplySteering.execute(t.model, None, None, 1.0, steering=t.steering)
    assert shown == []
    hn = D.LoadHyperNet.execute(t.hn.name).args[0]  # Load HyperNet shows its description on the node
    assert shown == [hn.describe()] and "sites" in shown[0]
    spec = {i.id: i for i in D.ApplySteering.define_schema().inputs}["strength"]
    assert (spec.min, spec.max) == (-3.0, 3.0) and P.STRENGTH_RANGE == (-10.0, 10.0)  # the slider, and the hard bound


# ------------------------------------------------------------------- one strength per image ---
def test_one_strength_per_image_equals_separate_runs(t, P):
    strengths = (-1.0, 0.0, 0.5, 1.0)
    batch = t.sample(t.advanced(1.0, batch_strengths=", ".join(map(str, strengths))), batch=4)
    for i, lam in enumerate(strengths):
        alone = t.sample(t.advanced(lam) if lam else t.model, batch=4)  # the same four noises, one strength
        torch.testing.assert_close(batch[i], alone[i], rtol=1e-5, atol=1e-5)
    assert torch.equal(batch[1], t.sample(t.model, batch=4)[1])  # strength 0: the unsteered image, bit for bit
    doubled = t.sample(t.advanced(0.5, batch_strengths="-2, 0, 1, 2"), batch=4)  # each times strength
    torch.testing.assert_close(doubled, batch, rtol=1e-5, atol=1e-5)


def test_batch_strengths_errors(t):
    with pytest.raises(ValueError, match="needs hooks|acts on every step, row and image alike"):
        t.advanced(1.0, mode="folded", batch_strengths="0, 1")
    m = t.advanced(1.0, batch_strengths="0, 0.5, 1", start_percent=0.5)  # the first steps are not steered
    calls = []
    handle = m.get_model_object("diffusion_model").register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="3 strengths for a batch of 2 images. Fix: give one strength per image"):
            t.sample(m, batch=2)
    finally:
        handle.remove()
    assert not calls  # refused before sampling, not at the first steered step
    for bad in ("1, x", "1, nan", "11"):
        with pytest.raises(ValueError, match="batch_strengths"):
            t.advanced(1.0, batch_strengths=bad)


# ------------------------------------------------------------------------------- a region ---
def _site_outputs(dm, sites, fn):
    """The outputs of ``sites`` while ``fn()`` runs (a forward hook that records them)."""
    out, handles = {}, []
    for s in sites:
        mod = dm.get_submodule(s.module)
        handles.append(mod.register_forward_hook(lambda m, i, o, n=s.name: out.setdefault(n, o.detach().clone())))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return out


def test_region_leaves_every_site_unsteered_outside_the_mask(t, comfy):
    from hypertransport_core import Rows, SteeringPlan

    dm = t.model.model.diffusion_model
    plan = SteeringPlan.compile([(t.steering, 1.0)])
    spatial = next(s for s in t.steering.sites if s.channel_dim == 1)
    token = next(s for s in t.steering.sites if s.channel_dim == -1)
    g = torch.Generator().manual_seed(0)
    x, ts, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5.0, 5.0]), torch.randn(2, 8, 64, generator=g)
    region = torch.zeros(1, 1, 8, 8)
    region[..., :, :4] = 1.0  # the left half of the latent
    with torch.no_grad():
        plain = _site_outputs(dm, [spatial, token], lambda: dm(x, ts, context=ctx))
        for site in (spatial, token):  # each site steered alone, so its input is the unsteered one
            one = SteeringPlan({site.name: plan.maps[site.name]})
            with one.hooks(dm, Rows(region=region)):
                masked = _site_outputs(dm, [site], lambda: dm(x, ts, context=ctx))[site.name]
            with one.hooks(dm):
                full = _site_outputs(dm, [site], lambda: dm(x, ts, context=ctx))[site.name]
            if site.channel_dim == 1:  # (B, C, h, w)
                w = masked.shape[-1]
                assert torch.equal(masked[..., w // 2 :], plain[site.name][..., w // 2 :])
                torch.testing.assert_close(masked[..., : w // 2], full[..., : w // 2])
            else:  # (B, h*w, C) tokens in raster order
                n = masked.shape[1]
                side = int(n**0.5)
                grid = masked.reshape(2, side, side, -1)
                assert torch.equal(grid[:, :, side // 2 :], plain[site.name].reshape(2, side, side, -1)[:, :, side // 2 :])
                torch.testing.assert_close(grid[:, :, : side // 2], full.reshape(2, side, side, -1)[:, :, : side // 2])


def test_mask_on_the_node(t):
    ref, full = t.sample(t.model), t.sample(t.advanced(1.0))
    zero = t.sample(t.advanced(1.0, mask=torch.zeros(1, 64, 64)))
    one = t.sample(t.advanced(1.0, mask=torch.ones(1, 64, 64)))
    assert torch.equal(zero, ref)  # nothing steered anywhere
    torch.testing.assert_close(one, full, rtol=1e-3, atol=1e-3)  # z + 1 * (out - z): float rounding only
    half = torch.zeros(1, 64, 64)
    half[:, :, :32] = 1
    out = t.sample(t.advanced(1.0, mask=half))
    assert not torch.equal(out, ref) and not torch.allclose(out, full)
    with pytest.raises(ValueError, match="not a MASK"):
        t.advanced(1.0, mask="oops")


# ------------------------------------------------------------------------------- a ramp ---
@pytest.mark.parametrize("ramp, want", [("constant", [1, 1, 1, 1]), ("ease in", [0, 1 / 3, 2 / 3, 1]), ("ease out", [1, 2 / 3, 1 / 3, 0])])
def test_ramp_sets_the_strength_of_each_step(t, P, ramp, want):
    m = t.advanced(1.0, ramp=ramp)
    (w,) = P.wrappers_of(m)
    t.sample(m, steps=4, cfg=1.0)
    assert w.factors == pytest.approx(want)
    # the strength each step used: the plan of that factor holds maps at strength factor * 1.0
    if ramp != "constant":
        first = w.plan_for(want[0])
        site = next(iter(w.plan.maps))
        full_a = w.plan.maps[site].a
        got = first.maps[site].a if site in first.maps else torch.ones_like(full_a)
        torch.testing.assert_close(got, 1 + want[0] * (full_a - 1))


def test_ramp_counts_only_the_steps_in_the_range(t, P):
    m = t.advanced(1.0, ramp="ease in", start_percent=0.5, end_percent=1.0)
    (w,) = P.wrappers_of(m)
    t.sample(m, steps=4, cfg=1.0)
    assert w.factors == pytest.approx([0.0, 1.0])  # 2 of the 4 steps are in the range: 0 at the first, full at the last


# ------------------------------------------------------------------------ block presets ---
def test_presets_equal_their_block_lines(t, D):
    from hypertransport_core.sites import block_presets

    presets = block_presets(t.steering.sites, t.steering.meta["family"])
    assert {"input", "middle", "output", "fine", "coarse"} <= set(presets)
    for name in ("input", "output", "coarse"):
        lines = "*: 0\n" + "\n".join(f"{b}: 1" for b in presets[name])
        a = t.sample(t.advanced(1.0, preset=name))
        b = t.sample(t.advanced(1.0, block_strengths=lines))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, t.sample(t.advanced(1.0)))
    with pytest.raises(ValueError, match="preset 'early' does not apply to this steering's blocks; it has input"):
        t.advanced(1.0, preset="early")
    info = D.LoadHyperNet.execute("controls_sd15.safetensors").args[1]
    assert "blocks input_blocks.1" in info and "presets input, middle, output, fine, coarse" in info
