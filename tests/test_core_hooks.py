"""Scoped hooks (steer, capture_pooled, folded): they clean up on error, and folding equals hooking."""

from __future__ import annotations

import pytest
import torch
from core_helpers import TinyNet, single_thread  # noqa: F401
from torch import nn

from hypertransport_core import (
    HyperTransportError,
    Site,
    Steering,
    capture_pooled,
    fold_steering,
    folded,
    list_sites,
    steer,
)


def _net(seed=0, c=8):
    torch.manual_seed(seed)
    net = TinyNet(c=c).eval()
    with torch.no_grad():  # non-trivial affine weights, so folding is really exercised
        for m in net.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return net


def _steering(sites, seed=1):
    g = torch.Generator().manual_seed(seed)
    total = sum(s.channels for s in sites)
    return Steering(tuple(sites), 1 + 0.4 * torch.randn(total, generator=g), 0.3 * torch.randn(total, generator=g))


def _x(seed=2):
    return torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(seed))


def _no_hooks(net):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same_params(net, saved):
    return all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())


def test_steer_changes_output_and_removes_hooks():
    net = _net()
    st = _steering(list_sites(net))
    x = _x()
    plain = net(x)
    with steer(net, [(st, 1.0)]):
        assert not _no_hooks(net)
        steered = net(x)
    assert _no_hooks(net)
    assert not torch.allclose(steered, plain, atol=1e-3)
    assert torch.equal(net(x), plain)


def test_steer_removes_hooks_when_body_raises():
    net = _net()
    st = _steering(list_sites(net))
    with pytest.raises(RuntimeError, match="boom"):
        with steer(net, [(st, 1.0)]):
            net(_x())
            raise RuntimeError("boom")
    assert _no_hooks(net)


def test_steer_with_missing_module_raises_before_hooking():
    net = _net()
    st = _steering([Site("gn", "gn", 8, 1), Site("nowhere", "nowhere", 8)])
    with pytest.raises(HyperTransportError, match="no module 'nowhere'"):
        with steer(net, [(st, 1.0)]):
            pass
    assert _no_hooks(net)


def test_capture_pooled_records_means_and_cleans_up_on_error():
    net = _net()
    sites = list_sites(net)
    x = _x()
    with capture_pooled(net, sites, detach=True) as acts:
        net(x)
        net(x)
    assert _no_hooks(net)
    assert [len(acts[s.name]) for s in sites] == [2, 2, 2]
    expected = net.gn(net.conv(x)).mean(dim=(2, 3))
    torch.testing.assert_close(acts["gn"][0], expected)
    assert acts["ln1"][0].shape == (2, 8)
    assert not acts["gn"][0].requires_grad
    with pytest.raises(KeyError):
        with capture_pooled(net, sites):
            raise KeyError("inner")
    assert _no_hooks(net)


def test_capture_after_steer_records_steered_activations():
    net = _net()
    sites = list_sites(net)
    st = _steering(sites)
    x = _x()
    with steer(net, [(st, 1.0)]), capture_pooled(net, sites) as acts:
        net(x)
    w, b = st.params("gn")
    torch.testing.assert_close(acts["gn"][0], net.gn(net.conv(x)).mean(dim=(2, 3)) * w + b)  # pooled form
    assert acts["gn"][0].requires_grad  # keeps the graph for losses


@pytest.mark.parametrize("lam", [1.0, 0.6, 2.0, -0.8])
def test_fold_equals_hooked_elementwise(lam):
    net = _net()
    sites = list_sites(net, form="elementwise")
    st = _steering(sites)
    x = _x()
    with steer(net, [(st, lam)]):
        hooked = net(x)
    saved = _params(net)
    with torch.no_grad(), folded(net, [(st, lam)]) as rest:
        assert rest == []
        assert _no_hooks(net)
        fold_out = net(x)
    torch.testing.assert_close(fold_out, hooked, atol=1e-5, rtol=1e-5)
    assert _same_params(net, saved)


def test_fold_composes_several_interventions():
    net = _net()
    sites = list_sites(net, form="elementwise")
    s1, s2 = _steering(sites, 1), _steering(sites, 2)
    x = _x()
    with steer(net, [(s1, 0.5), (s2, -1.0)]):
        hooked = net(x)
    with torch.no_grad(), folded(net, [(s1, 0.5), (s2, -1.0)]):
        fold_out = net(x)
    torch.testing.assert_close(fold_out, hooked, atol=1e-5, rtol=1e-5)


def test_pooled_spatial_sites_are_unfoldable():
    net = _net()
    sites = list_sites(net)  # default: pooled
    st = _steering(sites)
    patches, rest = fold_steering(net, [(st, 1.0)])
    assert [s.name for s in rest] == ["gn"]  # the GroupNorm on (B, C, H, W), pooled form
    assert set(patches) == {"ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"}  # token outputs fold
    w, b = st.params("ln1")
    torch.testing.assert_close(patches["ln1.weight"], w * net.ln1.weight)
    torch.testing.assert_close(patches["ln1.bias"], w * net.ln1.bias + b)
    # folded + steering the rest by hooks == fully hooked
    x = _x()
    with steer(net, [(st, 1.0)]):
        hooked = net(x)
    gn_only = Steering(tuple(rest), *st.params("gn"))
    with torch.no_grad(), folded(net, [(st, 1.0)]), steer(net, [(gn_only, 1.0)]):
        mixed = net(x)
    torch.testing.assert_close(mixed, hooked, atol=1e-5, rtol=1e-5)


def test_norm_without_affine_is_unfoldable():
    net = nn.Sequential(nn.LayerNorm(4, elementwise_affine=False))
    sites = list_sites(net)
    patches, rest = fold_steering(net, [(_steering(sites), 1.0)])
    assert patches == {} and [s.name for s in rest] == ["0"]


def test_folded_restores_weights_when_body_raises():
    net = _net()
    sites = list_sites(net, form="elementwise")
    saved = _params(net)
    with pytest.raises(ValueError, match="inside"):
        with folded(net, [(_steering(sites), 1.5)]):
            assert not _same_params(net, saved)
            raise ValueError("inside")
    assert _same_params(net, saved)


def test_fold_refuses_batched_steering():
    net = _net()
    sites = list_sites(net)
    total = sum(s.channels for s in sites)
    st = Steering(tuple(sites), torch.ones(2, total), torch.zeros(2, total))
    with pytest.raises(HyperTransportError, match="batched"):
        fold_steering(net, [(st, 1.0)])


def test_fold_in_half_precision_matches_within_tolerance():
    net = _net().half()
    sites = list_sites(net, form="elementwise")
    st = _steering(sites)
    saved = _params(net)
    with folded(net, [(st, 1.0)]):
        assert net.ln1.weight.dtype == torch.float16
        torch.testing.assert_close(net.ln1.weight.float(), (st.params("ln1")[0] * saved["ln1.weight"].float()), atol=2e-3, rtol=2e-3)
    assert _same_params(net, saved)
