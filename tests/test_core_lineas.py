"""Per-concept fitting (LinEAS, METHOD §4) end to end on a tiny two-norm model."""

from __future__ import annotations

import pytest
import torch
from core_helpers import single_thread  # noqa: F401
from torch import nn

from hypertransport_core import (
    HyperTransportError,
    LinEASConfig,
    Steering,
    capture_pooled,
    fit_lineas,
    list_sites,
    steer,
    steered_loss,
)


class _Tiny(nn.Module):
    def __init__(self, d=6, c=8):
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(d, c), nn.LayerNorm(c)
        self.fc2, self.ln2 = nn.Linear(c, c), nn.LayerNorm(c)

    def forward(self, x):
        return self.ln2(self.fc2(torch.tanh(self.ln1(self.fc1(x)))))


def _setup(n=64, seed=0):
    torch.manual_seed(seed)
    net = _Tiny()
    for p in net.parameters():
        p.requires_grad_(False)  # only the maps are fitted
    g = torch.Generator().manual_seed(seed + 1)
    mu, sigma = torch.linspace(-1.5, 1.5, 6), torch.linspace(0.5, 2.0, 6)
    src = torch.randn(n, 4, 6, generator=g)  # (n prompts, 4 tokens, d)
    tgt = mu + sigma * torch.randn(n, 4, 6, generator=g)  # the "concept" shifts the inputs affinely
    sites = list_sites(net)
    with torch.no_grad(), capture_pooled(net, sites, detach=True) as targets:
        net(tgt)
    return net, sites, src, dict(targets)


def _batch_fn(net, src, targets):
    return lambda step: ((lambda: net(src)), targets)


def _loss(net, steering, src, targets):
    with torch.no_grad():
        return float(steered_loss(net, steering, lambda: net(src), targets))


def test_fit_reduces_loss_and_result_is_a_usable_steering():
    net, sites, src, targets = _setup()
    initial = _loss(net, Steering.identity(sites), src, targets)
    seen = []
    res = fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=120, lr=5e-2), label="shift",
                     callback=lambda step, loss: seen.append(loss))
    assert len(seen) == 120 and seen[0] == pytest.approx(initial, rel=1e-5)
    final = _loss(net, res, src, targets)
    assert final < 0.3 * initial, (initial, final)
    assert res.meta["label"] == "shift" and res.meta["fit"]["steps"] == 120
    assert not res.w.requires_grad and res.sites == tuple(sites)
    # usable with steer: the steered model's pooled activations approach the targets
    with torch.no_grad(), steer(net, [(res, 1.0)]), capture_pooled(net, sites) as acts:
        net(src)
    for s in sites:
        gap = (acts[s.name][0].mean(0) - targets[s.name][0].mean(0)).abs().mean()
        with torch.no_grad():
            plain = (net(src) if s.name == "ln2" else net.ln1(net.fc1(src))).mean(1).mean(0)
        assert gap < 0.5 * (plain - targets[s.name][0].mean(0)).abs().mean()


def test_downstream_site_sees_upstream_map():
    net, sites, src, targets = _setup(seed=3)
    res = fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=120, lr=5e-2))
    w1, b1 = res.params("ln1")
    w2, b2 = res.params("ln2")
    only_ln2 = Steering(res.sites, torch.cat([torch.ones(8), w2]), torch.cat([torch.zeros(8), b2]))
    ln2_target = {"ln2": targets["ln2"]}

    def ln2_loss(st):
        with torch.no_grad(), steer(net, [(st, 1.0)]), capture_pooled(net, [sites[1]]) as acts:
            net(src)
        from hypertransport_core import transport_loss

        return float(transport_loss(acts, ln2_target))

    joint, alone, initial = ln2_loss(res), ln2_loss(only_ln2), ln2_loss(Steering.identity(sites))
    # ln2's map was fitted on activations already moved by ln1's map: it works with it, not without it
    assert joint < 0.3 * initial
    assert joint < alone
    assert (w1 - 1).abs().max() > 1e-2 and b1.abs().max() > 1e-2  # the upstream map did move


def test_sparsity_prox_zeroes_channels_and_sites():
    net, sites, src, targets = _setup(seed=5)
    dense = fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=30, lr=5e-2))
    assert ((dense.w - 1).abs() > 0).all()
    sparse = fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=30, lr=5e-2, l1=3.0))
    zero_w = (sparse.w == 1).sum().item()
    zero_b = (sparse.b == 0).sum().item()
    assert zero_w + zero_b >= 4, (zero_w, zero_b)  # the soft threshold leaves exact zeros
    off = fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=5, lr=5e-2, l1=1000.0))
    assert torch.equal(off.w, torch.ones_like(off.w)) and torch.equal(off.b, torch.zeros_like(off.b))
    grouped = fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=5, lr=5e-2, group=1000.0))
    assert torch.equal(grouped.w, torch.ones_like(grouped.w))  # whole sites switched off


def test_sliced_loss_fit_runs():
    net, sites, src, targets = _setup(seed=7)
    initial = _loss(net, Steering.identity(sites), src, targets)
    res = fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=40, lr=5e-2, loss="sliced"))
    assert _loss(net, res, src, targets) < initial


def test_bad_config_and_diverging_fit():
    net, sites, src, targets = _setup()
    with pytest.raises(HyperTransportError, match="steps >= 1"):
        fit_lineas(net, sites, _batch_fn(net, src, targets), LinEASConfig(steps=0))
    bad = {k: [torch.full_like(v[0], float("nan"))] for k, v in targets.items()}
    with pytest.raises(HyperTransportError, match="lower the learning rate"):
        fit_lineas(net, sites, _batch_fn(net, src, bad), LinEASConfig(steps=2))
    assert all(not m._forward_hooks for m in net.modules())
