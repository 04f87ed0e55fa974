"""Interventions (METHOD §2): the per-site affine map, its strength, inverse, composition and row masks."""

from __future__ import annotations

import pytest
import torch
from core_helpers import single_thread  # noqa: F401

from hypertransport_core import (
    HyperTransportError,
    Site,
    Steering,
    apply_map,
    combine_steerings,
    effective_affine,
    steer,
)
from hypertransport_core.interventions import MIN_ABS_W, REMOVAL_FLOOR, removal_floor, strength_for


def _wb(C, seed=0, K=None):
    g = torch.Generator().manual_seed(seed)
    shape = (C,) if K is None else (K, C)
    return 1 + 0.5 * torch.randn(shape, generator=g), 0.3 * torch.randn(shape, generator=g)


def _z(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


TOKEN = ((2, 5, 6), -1)
SPATIAL = ((2, 6, 4, 3), 1)


@pytest.mark.parametrize("form", ["pooled", "elementwise"])
@pytest.mark.parametrize("shape,cdim", [TOKEN, SPATIAL])
def test_strength_zero_is_bit_identical(shape, cdim, form):
    z = _z(shape)
    w, b = _wb(6)
    out = apply_map(z, w, b, 0.0, channel_dim=cdim, form=form)
    assert torch.equal(out, z)
    out = apply_map(z, w, b, 0.0, channel_dim=cdim, form=form, row_mask=torch.tensor([True, False]))
    assert torch.equal(out, z)


def test_token_map_is_applied_at_every_token():
    z, (w, b) = _z(TOKEN[0]), _wb(6)
    for form in ("pooled", "elementwise"):  # token outputs ignore the form
        torch.testing.assert_close(apply_map(z, w, b, 1.0, channel_dim=-1, form=form), w * z + b)


def test_spatial_elementwise_and_pooled_forms():
    z, (w, b) = _z(SPATIAL[0]), _wb(6)
    wv, bv = w.view(1, 6, 1, 1), b.view(1, 6, 1, 1)
    torch.testing.assert_close(apply_map(z, w, b, 1.0, channel_dim=1, form="elementwise"), wv * z + bv)
    m = z.mean(dim=(2, 3), keepdim=True)
    pooled = apply_map(z, w, b, 1.0, channel_dim=1, form="pooled")
    torch.testing.assert_close(pooled, z + (wv - 1) * m + bv)
    # pooled: the spatial mean is mapped, the deviations from it are left alone
    torch.testing.assert_close(pooled.mean(dim=(2, 3), keepdim=True), wv * m + bv)
    torch.testing.assert_close(pooled - pooled.mean(dim=(2, 3), keepdim=True), z - m, atol=1e-6, rtol=0)
    assert not torch.allclose(pooled, apply_map(z, w, b, 1.0, channel_dim=1, form="elementwise"))


@pytest.mark.parametrize("form", ["pooled", "elementwise"])
@pytest.mark.parametrize("shape,cdim", [TOKEN, SPATIAL])
def test_interpolation_is_linear_and_extrapolates(shape, cdim, form):
    z, (w, b) = _z(shape).double(), _wb(6)
    f = lambda lam: apply_map(z, w, b, lam, channel_dim=cdim, form=form)  # noqa: E731
    full = f(1.0)
    torch.testing.assert_close(f(0.5), (z + full) / 2)
    torch.testing.assert_close(f(0.25), z + 0.25 * (full - z))
    torch.testing.assert_close(f(2.0), z + 2 * (full - z))  # λ > 1 extrapolates
    assert (f(2.0) - z).abs().max() > (full - z).abs().max()


def test_negative_strength_uses_inverse_map():
    C = 6
    w, b = _wb(C)
    w = torch.where(w.abs() < REMOVAL_FLOOR, torch.full_like(w, REMOVAL_FLOOR + 0.3), w)  # above the removal floor
    z = _z((3, 4, C)).double()
    forward = apply_map(z, w, b, 1.0, channel_dim=-1)
    back = apply_map(forward, w, b, -1.0, channel_dim=-1)  # T⁻¹(T(z)) = z
    torch.testing.assert_close(back, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_map(z, w, b, -1.0, channel_dim=-1), (z - b.double()) / w.double(), atol=1e-6, rtol=1e-6)
    # spatial elementwise as well
    zs = _z((2, C, 3, 3)).double()
    fs = apply_map(zs, w, b, 1.0, channel_dim=1, form="elementwise")
    torch.testing.assert_close(apply_map(fs, w, b, -1.0, channel_dim=1, form="elementwise"), zs, atol=1e-5, rtol=1e-5)
    # λ = -0.5 is halfway from z to T⁻¹(z)
    inv = apply_map(z, w, b, -1.0, channel_dim=-1)
    torch.testing.assert_close(apply_map(z, w, b, -0.5, channel_dim=-1), (z + inv) / 2)


def test_inverse_keeps_w_away_from_zero():
    w = torch.tensor([1e-12, -1e-12, 0.0, 1e-3, 2.0 * max(1.0, REMOVAL_FLOOR)])
    b = torch.ones(5)
    z = _z((2, 5))
    for floor in (MIN_ABS_W, REMOVAL_FLOOR):  # the lowest a study may set, and the default
        with removal_floor(floor):
            out = apply_map(z, w, b, -1.0)
            assert torch.isfinite(out).all()
            a, c = effective_affine(w, b, -1.0)
        assert a.abs().max() <= 1 / floor + 1e-3
        assert a[1] < 0 and a[0] > 0  # the sign of w is kept
        assert a[4] == pytest.approx(1 / w[4].item())  # |w| above the floor: the exact inverse
        torch.testing.assert_close(c, -b / torch.where(w < 0, w.clamp(max=-floor), w.clamp(min=floor)))


def test_bad_shapes_and_form_raise():
    z = _z((2, 3, 6))
    with pytest.raises(HyperTransportError, match="do not fit"):
        apply_map(z, torch.ones(5), torch.zeros(5), 1.0)
    with pytest.raises(HyperTransportError, match="do not fit"):
        apply_map(z, torch.ones(4, 6), torch.zeros(4, 6), 1.0)  # 2 rows not divisible into 4 blocks
    with pytest.raises(HyperTransportError, match="form"):
        apply_map(z, torch.ones(6), torch.zeros(6), 1.0, form="sideways")


def test_row_mask_steers_only_chosen_rows():
    z, (w, b) = _z((4, 6, 3, 3)), _wb(6)
    mask = torch.tensor([True, False, True, False])
    out = apply_map(z, w, b, 1.0, channel_dim=1, row_mask=mask)
    full = apply_map(z, w, b, 1.0, channel_dim=1)
    assert torch.equal(out[~mask], z[~mask])
    assert torch.equal(out[mask], full[mask])
    assert not torch.allclose(out[mask], z[mask])


def test_batched_maps_apply_per_row_block():
    K, C = 2, 6
    w, b = _wb(C, K=K)
    z = _z((4, 5, C))  # rows 0-1 get map 0, rows 2-3 map 1
    out = apply_map(z, w, b, 0.7, channel_dim=-1)
    for k in range(K):
        rows = slice(2 * k, 2 * k + 2)
        torch.testing.assert_close(out[rows], apply_map(z[rows], w[k], b[k], 0.7, channel_dim=-1))
    zs = _z((4, C, 2, 2))
    out = apply_map(zs, w, b, 1.0, channel_dim=1, form="pooled")
    torch.testing.assert_close(out[2:], apply_map(zs[2:], w[1], b[1], 1.0, channel_dim=1, form="pooled"))


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.LayerNorm(4)
        self.b = torch.nn.LayerNorm(4)

    def forward(self, x):
        return self.b(self.a(x) * 2)


def _two_sites():
    return [Site("a", "a", 4, -1), Site("b", "b", 4, -1)]


def test_several_interventions_compose_in_list_order():
    net, sites = _Two(), _two_sites()
    w1, b1 = _wb(8, seed=3)
    w2, b2 = _wb(8, seed=4)
    s1, s2 = Steering(tuple(sites), w1, b1), Steering(tuple(sites), w2, b2)
    x = _z((2, 3, 4))
    # expected: at each site first s1 (strength 0.5), then s2 (strength 2)
    a1, c1 = effective_affine(w1, b1, 0.5)
    a2, c2 = effective_affine(w2, b2, 2.0)
    h = net.a(x)
    h = (h * a1[:4] + c1[:4]) * a2[:4] + c2[:4]
    y = net.b(h * 2)
    y = (y * a1[4:] + c1[4:]) * a2[4:] + c2[4:]
    with steer(net, [(s1, 0.5), (s2, 2.0)]):
        out = net(x)
    torch.testing.assert_close(out, y)
    with steer(net, [(s2, 2.0), (s1, 0.5)]):
        swapped = net(x)
    assert not torch.allclose(out, swapped)  # order matters: the maps do not commute in general


def test_per_site_strength_mapping():
    s = Site("output_blocks.1.0.in_layers.0", "m", 4)
    assert strength_for(0.3, s) == 0.3
    assert strength_for({"*": 0.2}, s) == 0.2
    assert strength_for({}, s) == 1.0
    assert strength_for({"output_blocks": 0.5, "output_blocks.1": 0.7, "*": 0.1}, s) == 0.7  # longest prefix
    assert strength_for({"output_blocks.1.0.in_layers.0": -1.0, "output_blocks": 0.5}, s) == -1.0
    assert strength_for({"input_blocks": 0.5, "*": 0.0}, s) == 0.0


@pytest.mark.parametrize("key, name, hit", [
    ("blocks.2", "blocks.2.norm1", True),
    ("blocks.2", "blocks.20.norm1", False),  # a bare string prefix would zero PixArt blocks 20-27 too
    ("blocks.2", "blocks.27.norm2", False),
    ("blocks.2.norm1", "blocks.2.norm1", True),
    ("blocks", "blocks.11.norm2", True),
    ("double_blocks.1", "double_blocks.1@0", True),  # a Flux double block's img and txt streams
    ("double_blocks.1", "double_blocks.1@1", True),
    ("double_blocks.1", "double_blocks.10@0", False),  # not blocks 10-18
    ("double_blocks.1", "double_blocks.18@1", False),
    ("single_blocks.3", "single_blocks.37", False),
    ("output_blocks.1", "output_blocks.1.0.in_layers.0", True),
    ("output_blocks.1", "output_blocks.10.0.in_layers.0", False),
])
def test_block_keys_match_whole_dotted_segments(key, name, hit):
    site = Site(name, name.split("@")[0], 8)
    assert strength_for({key: 0.0, "*": 1.0}, site) == (0.0 if hit else 1.0)

    net, sites = _Two(), _two_sites()
    w, b = _wb(8, seed=5)
    st = Steering(tuple(sites), w, b)
    x = _z((2, 3, 4))
    with steer(net, [(st, {"a": 1.0, "*": 0.0})]):
        only_a = net(x)
    a_only = Steering(tuple(sites), torch.cat([w[:4], torch.ones(4)]), torch.cat([b[:4], torch.zeros(4)]))
    with steer(net, [(a_only, 1.0)]):
        ref = net(x)
    torch.testing.assert_close(only_a, ref)
    assert net.b._forward_hooks == {} and net.a._forward_hooks == {}


def test_steer_default_mask_steers_all_rows_and_mask_keeps_others_bit_identical():
    net, sites = _Two(), _two_sites()
    w, b = _wb(8, seed=6)
    st = Steering(tuple(sites), w, b)
    x = _z((4, 3, 4))
    plain = net(x)
    with steer(net, [(st, 1.0)]):
        all_rows = net(x)
    assert not torch.allclose(all_rows, plain, atol=1e-3)
    assert all(not torch.allclose(all_rows[i], plain[i], atol=1e-3) for i in range(4))
    mask = torch.tensor([False, True, False, True])
    with steer(net, [(st, 1.0)], rows=lambda: mask):
        masked = net(x)
    assert torch.equal(masked[~mask], plain[~mask])
    torch.testing.assert_close(masked[mask], all_rows[mask])
    with steer(net, [(st, 0.0)]):  # strength 0: no hook at all, bit-identical
        assert net.a._forward_hooks == {}
        assert torch.equal(net(x), plain)


def test_steer_rejects_non_finite_strength():
    net, sites = _Two(), _two_sites()
    st = Steering.identity(sites)
    with pytest.raises(HyperTransportError, match="finite"):
        with steer(net, [(st, float("nan"))]):
            pass


def test_combine_steerings_and_steering_validation():
    sites = _two_sites()
    w1, b1 = _wb(8, seed=1)
    w2, b2 = _wb(8, seed=2)
    s1 = Steering(tuple(sites), w1, b1, {"label": "x"})
    s2 = Steering(tuple(sites), w2, b2, {"label": "y"})
    c = combine_steerings([(s1, 1.0), (s2, -0.5)])
    torch.testing.assert_close(c.w, 1 + (w1 - 1) - 0.5 * (w2 - 1))
    torch.testing.assert_close(c.b, b1 - 0.5 * b2)
    assert "x" in c.meta["label"] and "y" in c.meta["label"]
    with pytest.raises(HyperTransportError, match="expected shape"):
        Steering(tuple(sites), torch.ones(7), torch.zeros(7))
    with pytest.raises(HyperTransportError, match="twice"):
        Steering((sites[0], sites[0]), torch.ones(8), torch.zeros(8))
    with pytest.raises(HyperTransportError, match="different sites"):
        combine_steerings([(s1, 1.0), (Steering.identity([sites[0]]), 1.0)])
    w, b = s1.params("b")
    assert torch.equal(w, w1[4:]) and torch.equal(b, b1[4:])


def test_steer_with_batched_steering_and_tensor_row_mask():
    net, sites = _Two(), _two_sites()
    w, b = _wb(8, seed=7, K=2)
    batched = Steering(tuple(sites), w, b)
    x = _z((4, 3, 4))
    with steer(net, [(batched, 1.0)]):
        out = net(x)
    for k in range(2):
        with steer(net, [(Steering(tuple(sites), w[k], b[k]), 1.0)]):
            torch.testing.assert_close(out[2 * k : 2 * k + 2], net(x[2 * k : 2 * k + 2]))
    plain = net(x)
    mask = torch.tensor([True, True, False, False])
    with steer(net, [(batched, 1.0)], rows=mask):
        masked = net(x)
    assert torch.equal(masked[2:], plain[2:])
    torch.testing.assert_close(masked[:2], out[:2])


def test_a_map_first_run_without_gradients_still_carries_them_later():
    """A plan's per-dtype casts are made at the first hooked call; one made under no_grad (a sampler step whose loss is
    not wanted) must not be reused when gradients are on, or the gradient through it is silently lost."""
    from hypertransport_core.engine import SiteMap

    site = Site("m", "m", 4)
    a = torch.full((4,), 1.5, requires_grad=True)
    sm = SiteMap(site, a, torch.zeros(4, requires_grad=True))
    z = torch.randn(2, 3, 4, dtype=torch.bfloat16)  # a model under autocast: the map is cast to its dtype
    with torch.no_grad():
        sm(z)
    sm(z).float().sum().backward()
    assert a.grad is not None and torch.allclose(a.grad, z.float().sum((0, 1)), rtol=0.02, atol=0.05)
