"""The transport loss (METHOD §3) against POT, scipy and an independent quantile integration."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import scipy.stats
import torch
from core_helpers import single_thread  # noqa: F401

from hypertransport_core import HyperTransportError, sliced_w2, transport_loss, w2_per_channel
from hypertransport_core.ot import LOSS_ALIASES, site_loss


def _rand(n, C, seed, shift=0.0, scale=1.0):
    return shift + scale * torch.randn(n, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _w2sq_quantile_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Exact ∫₀¹ (F_x⁻¹(q) − F_y⁻¹(q))² dq for two empirical 1-D measures (uniform weights), by
    integrating the piecewise-constant quantile functions between all breakpoints i/n and j/m."""
    xs, ys = np.sort(x), np.sort(y)
    n, m = len(xs), len(ys)
    qs = np.unique(np.concatenate([np.arange(n + 1) / n, np.arange(m + 1) / m]))
    total = 0.0
    for lo, hi in zip(qs[:-1], qs[1:]):
        mid = (lo + hi) / 2
        total += (hi - lo) * (xs[min(int(mid * n), n - 1)] - ys[min(int(mid * m), m - 1)]) ** 2
    return total


def test_documented_example():
    torch.testing.assert_close(w2_per_channel(torch.zeros(4, 2), torch.ones(4, 2)), torch.ones(2))


def test_equal_counts_matches_sorted_formula_and_pot():
    x, y = _rand(16, 5, 0), _rand(16, 5, 1, shift=0.7, scale=2.0)
    got = w2_per_channel(x, y)
    sorted_ref = ((np.sort(x.numpy(), 0) - np.sort(y.numpy(), 0)) ** 2).mean(0)
    np.testing.assert_allclose(got.numpy(), sorted_ref, rtol=1e-12)
    pot = np.array([ot.wasserstein_1d(x[:, c].numpy(), y[:, c].numpy(), p=2) for c in range(5)])
    np.testing.assert_allclose(got.numpy(), pot, rtol=1e-10)
    # gaussian sanity: a pure shift by 0.7 and scale 2 gives about 0.7² + 1²
    assert 0.3 < got.mean().item() < 3.0


def test_unequal_counts_matches_pot_and_quantile_integration():
    x, y = _rand(7, 4, 2), _rand(11, 4, 3, shift=-0.5)
    got = w2_per_channel(x, y).numpy()
    ref = np.array([_w2sq_quantile_reference(x[:, c].numpy(), y[:, c].numpy()) for c in range(4)])
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    pot = np.array([ot.wasserstein_1d(x[:, c].numpy(), y[:, c].numpy(), p=2) for c in range(4)])
    np.testing.assert_allclose(got, pot, rtol=1e-10)


def test_reference_integration_agrees_with_scipy_for_p1():
    # sanity check of the reference's quantile bookkeeping, with |·| instead of (·)² against scipy's W1
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(1, 2, size=13)
    xs, ys = np.sort(x), np.sort(y)
    qs = np.unique(np.concatenate([np.arange(10) / 9, np.arange(14) / 13]))
    w1 = sum((hi - lo) * abs(xs[min(int((lo + hi) / 2 * 9), 8)] - ys[min(int((lo + hi) / 2 * 13), 12)]) for lo, hi in zip(qs[:-1], qs[1:]))
    assert w1 == pytest.approx(scipy.stats.wasserstein_distance(x, y), rel=1e-12)
    assert ot.wasserstein_1d(x, y, p=1) == pytest.approx(w1, rel=1e-10)


@pytest.mark.parametrize("m", [6, 9])
def test_differentiable_gradcheck(m):
    x = _rand(6, 3, 4).requires_grad_(True)
    y = _rand(m, 3, 5)
    assert torch.autograd.gradcheck(lambda a: w2_per_channel(a, y), (x,), eps=1e-6, atol=1e-6)


def test_shape_errors():
    with pytest.raises(HyperTransportError, match=r"\(4, 3\) and \(4, 2\)"):
        w2_per_channel(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(HyperTransportError):
        w2_per_channel(torch.zeros(4), torch.zeros(4))


def test_sliced_option():
    x, y = _rand(20, 6, 6), _rand(20, 6, 7, shift=1.0)
    s = sliced_w2(x, y, n_projections=32, seed=0)
    assert s.ndim == 0 and s.item() > 0
    assert sliced_w2(x, x.clone(), n_projections=32).item() == pytest.approx(0.0, abs=1e-12)
    assert sliced_w2(x, y, 32, seed=0).item() == pytest.approx(s.item())  # seeded: reproducible
    # in one dimension every direction is ±1, so sliced W2² is the plain W2²
    x1, y1 = _rand(10, 1, 8), _rand(10, 1, 9, shift=0.3)
    assert sliced_w2(x1, y1, 8).item() == pytest.approx(w2_per_channel(x1, y1).item(), rel=1e-9)
    xg = x.clone().requires_grad_(True)
    sliced_w2(xg, y).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_transport_loss_averages_over_sites_and_groups():
    src = {"a": [_rand(8, 3, 10), _rand(8, 3, 11)], "b": [_rand(8, 5, 12), _rand(8, 5, 13)]}
    tgt = {"a": [_rand(8, 3, 20), _rand(8, 3, 21)], "b": [_rand(8, 5, 22), _rand(8, 5, 23)], "unused": [torch.zeros(8, 2)]}
    terms = [w2_per_channel(src[k][i], tgt[k][i]).mean() for k in ("a", "b") for i in range(2)]
    torch.testing.assert_close(transport_loss(src, tgt, "w2_exact"), torch.stack(terms).mean())
    torch.testing.assert_close(transport_loss(src, tgt), torch.stack(terms).mean())  # equal counts: quantile = exact
    sliced_terms = [sliced_w2(src[k][i], tgt[k][i], 16, 0) for k in ("a", "b") for i in range(2)]
    torch.testing.assert_close(transport_loss(src, tgt, "sliced", n_projections=16), torch.stack(sliced_terms).mean())
    torch.testing.assert_close(transport_loss(src, src), torch.tensor(0.0, dtype=torch.float64))
    # targets carry no gradient, sources do
    xs = {k: [t.clone().requires_grad_(True) for t in v] for k, v in src.items()}
    yt = {k: [t.clone().requires_grad_(True) for t in v] for k, v in tgt.items()}
    transport_loss(xs, yt).backward()
    assert xs["a"][0].grad is not None and yt["a"][0].grad is None


def test_transport_loss_errors():
    a = {"a": [torch.zeros(4, 2)]}
    with pytest.raises(HyperTransportError, match="1 source groups vs 2 target groups"):
        transport_loss(a, {"a": [torch.zeros(4, 2), torch.zeros(4, 2)]})
    with pytest.raises(HyperTransportError, match="lack site 'a'"):
        transport_loss(a, {"b": [torch.zeros(4, 2)]})
    with pytest.raises(HyperTransportError, match="no source activations"):
        transport_loss({}, a)
    with pytest.raises(HyperTransportError, match="not one of"):
        site_loss(torch.zeros(4, 2), torch.zeros(4, 2), "sinkhorn")
    with pytest.raises(HyperTransportError, match="do not split into 3 concepts"):
        transport_loss({"a": [torch.zeros(4, 2)]}, {"a": [torch.zeros(3, 4, 2)]}, concepts=3)


@pytest.mark.parametrize("kind", ["w2_quantile", "w2_exact", "sliced"])
def test_batched_loss_is_the_mean_of_the_per_concept_losses(kind):
    """The trainer's call (K concepts in one batch, rows in concept blocks) equals LinEAS's call per concept."""
    K, P, n, C = 3, 4, 7, 5
    src = {"a": [_rand(K * P, C, 40), _rand(K * P, C, 41)], "b": [_rand(K * P, 2, 42), _rand(K * P, 2, 43)]}
    tgt = {"a": [_rand(K * n, C, 50).view(K, n, C), _rand(K * n, C, 51).view(K, n, C)],
           "b": [_rand(K * n, 2, 52).view(K, n, 2), _rand(K * n, 2, 53).view(K, n, 2)]}
    batched = transport_loss(src, tgt, kind, concepts=K, n_projections=8)
    per = [transport_loss({s: [x[k * P : (k + 1) * P] for x in v] for s, v in src.items()},
                          {s: [y[k] for y in v] for s, v in tgt.items()}, kind, n_projections=8) for k in range(K)]
    torch.testing.assert_close(batched, torch.stack(per).mean())
    assert LOSS_ALIASES["w2_channels"] == "w2_quantile"  # configs of earlier versions keep their meaning


def test_quantile_and_exact_variants_differ_only_for_unequal_counts():
    x, y = _rand(3, 4, 60), _rand(24, 4, 61, shift=0.5)
    q = transport_loss({"a": [x]}, {"a": [y]}, "w2_quantile")
    e = transport_loss({"a": [x]}, {"a": [y]}, "w2_exact")
    assert not torch.allclose(q, e)
    torch.testing.assert_close(e, w2_per_channel(x, y).mean())


def test_w2_quantile_equal_counts_exact_and_unequal_close():
    from hypertransport_core import w2_quantile

    x, y = _rand(16, 5, 30), _rand(16, 5, 31, shift=0.5)
    torch.testing.assert_close(w2_quantile(x, y), w2_per_channel(x, y))
    xb, yb = torch.stack([x, y]), torch.stack([y, x])  # batched over a leading axis
    torch.testing.assert_close(w2_quantile(xb, yb), torch.stack([w2_per_channel(x, y), w2_per_channel(y, x)]))
    xl, yl = _rand(400, 3, 32), _rand(600, 3, 33, shift=1.0)  # many samples: interpolation ≈ exact
    torch.testing.assert_close(w2_quantile(xl, yl), w2_per_channel(xl, yl), atol=2e-2, rtol=2e-2)
