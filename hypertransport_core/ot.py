"""Distributional losses between steered-source and target activations (METHOD §3).

At each site the activations are pooled to ``(n, C)`` samples. The default loss is, per channel, the
squared 1-D Wasserstein-2 distance between the two empirical distributions, averaged over channels
("sliced Wasserstein on the canonical directions", LinEAS):

.. math:: L_s = \\frac{1}{C} \\sum_c W_2^2\\big(\\{x_{ic}\\}_i, \\{y_{jc}\\}_j\\big),
          \\quad W_2^2 = \\int_0^1 |F_x^{-1}(q) - F_y^{-1}(q)|^2 dq

With equal counts this is the mean squared difference of the sorted samples; with unequal counts
POT's :func:`ot.wasserstein_1d` integrates the two quantile functions exactly, and
:func:`w2_quantile` approximates it by interpolating quantiles (batched, for training). Sliced Wasserstein
over random directions (POT's :func:`ot.sliced_wasserstein_distance`) is the alternative.
Everything is differentiable in ``x``; targets carry no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ot
import torch

from .errors import HyperTransportError

LOSSES = ("w2_channels", "sliced")


def w2_per_channel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared 1-D W2 between the columns of ``x`` ``(n, C)`` and ``y`` ``(m, C)``: returns ``(C,)``.

    Example::

        >>> w2_per_channel(torch.zeros(4, 2), torch.ones(4, 2))
        tensor([1., 1.])
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise HyperTransportError(
            f"w2_per_channel needs (n, C) and (m, C) with the same C, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    y = y.to(x.dtype)
    if x.shape[0] == y.shape[0]:
        return (torch.sort(x, dim=0).values - torch.sort(y, dim=0).values).pow(2).mean(0)
    return ot.wasserstein_1d(x, y, p=2)


def w2_quantile(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared 1-D W2 per channel by quantile interpolation, batched: ``x`` ``(..., n, C)``,
    ``y`` ``(..., m, C)`` → ``(..., C)``.

    ``y``'s empirical quantile function is linearly interpolated at ``x``'s quantile levels
    ``(i + 1/2) / n``; with ``n == m`` this is exactly the sorted-difference formula. Cheaper than the
    exact :func:`w2_per_channel` for unequal counts, and batched over leading axes (a batch of concepts).
    """
    n, m = x.shape[-2], y.shape[-2]
    xs = torch.sort(x, dim=-2).values
    ys = torch.sort(y.to(x.dtype), dim=-2).values
    if n != m:
        pos = ((torch.arange(n, device=x.device, dtype=x.dtype) + 0.5) / n * m - 0.5).clamp(0, m - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=m - 1)
        frac = (pos - lo.to(x.dtype)).view(-1, 1)
        ys = ys.index_select(-2, lo) * (1 - frac) + ys.index_select(-2, hi) * frac
    return (xs - ys).pow(2).mean(-2)


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_projections: int = 64, seed: int = 0) -> torch.Tensor:
    """Squared sliced W2 over ``n_projections`` random directions (POT), a scalar."""
    return ot.sliced_wasserstein_distance(x, y.to(x.dtype), n_projections=n_projections, p=2, seed=seed) ** 2


def site_loss(x: torch.Tensor, y: torch.Tensor, kind: str = "w2_channels", n_projections: int = 64, seed: int = 0) -> torch.Tensor:
    """Loss of one site for one group of samples (scalar)."""
    if kind == "w2_channels":
        return w2_per_channel(x, y).mean()
    if kind == "sliced":
        return sliced_w2(x, y, n_projections, seed)
    raise HyperTransportError(f"loss {kind!r} is not one of {LOSSES}. Fix: pick one of those.")


def transport_loss(
    source: Mapping[str, Sequence[torch.Tensor]],
    target: Mapping[str, Sequence[torch.Tensor]],
    kind: str = "w2_channels",
    *,
    n_projections: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """Average of :func:`site_loss` over sites and over the groups each site holds.

    Args:
        source: ``{site: [ (n, C) per group ]}`` steered-source activations (e.g. one group per
            denoising step, as :func:`~hypertransport_core.hooks.capture_pooled` records them).
        target: same layout, the target activations (no gradient needed).
        kind: ``"w2_channels"`` (default) or ``"sliced"``.

    Returns:
        scalar tensor.
    """
    if not source:
        raise HyperTransportError("no source activations were recorded. Fix: run the model inside capture_pooled().")
    terms = []
    for name, xs in source.items():
        if name not in target:
            raise HyperTransportError(f"target activations lack site {name!r}. Fix: compute targets for the same sites.")
        ys = target[name]
        if len(xs) != len(ys):
            raise HyperTransportError(
                f"site {name!r}: {len(xs)} source groups vs {len(ys)} target groups. "
                "Fix: run source and target with the same number of sampling steps."
            )
        for x, y in zip(xs, ys):
            terms.append(site_loss(x, y.detach().to(x.device), kind, n_projections, seed))
    return torch.stack(terms).mean()
