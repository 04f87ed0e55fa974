"""Distributional losses between steered-source and target activations (METHOD §3): the one loss.

At each site the activations are pooled to samples of shape ``(n, C)``. The default loss is, per
channel, the squared 1-D Wasserstein-2 distance between the two empirical distributions, averaged over
channels ("sliced Wasserstein on the canonical directions", LinEAS):

.. math:: L_s = \\frac{1}{C} \\sum_c W_2^2\\big(\\{x_{ic}\\}_i, \\{y_{jc}\\}_j\\big),
          \\quad W_2^2 = \\int_0^1 |F_x^{-1}(q) - F_y^{-1}(q)|^2 dq

Three variants (:data:`LOSSES`), named for how they compute it:

* ``"w2_quantile"`` (default): :func:`w2_quantile`, ``y``'s quantile function linearly interpolated at
  ``x``'s quantile levels; batched over concepts; exact when the counts are equal;
* ``"w2_exact"``: :func:`w2_per_channel`, POT's :func:`ot.wasserstein_1d` integrating both quantile
  functions exactly (one concept at a time);
* ``"sliced"``: POT's :func:`ot.sliced_wasserstein_distance` over random directions.

:func:`transport_loss` is what the trainer and LinEAS both call: sources ``(K, P, C)`` (K concepts, P
samples each) or ``(P, C)``, targets ``(K, n, C)`` or ``(n, C)``, one group per sampler step; the loss
is the mean over concepts, sites and groups, so K concepts in one call give the mean of the K
per-concept losses. Everything is differentiable in the sources; targets carry no gradient. POT is
imported on first use only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .errors import HyperTransportError

LOSSES = ("w2_quantile", "w2_exact", "sliced")
#: names earlier versions recorded in configs and files
LOSS_ALIASES = {"w2_channels": "w2_quantile"}


def loss_kind(kind: str) -> str:
    """The canonical name of a loss (``LOSSES``, or an old alias); raises naming the choices."""
    k = LOSS_ALIASES.get(kind, kind)
    if k not in LOSSES:
        raise HyperTransportError(f"loss {kind!r} is not one of {LOSSES}. Fix: pick one of those.")
    return k


def w2_per_channel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact squared 1-D W2 between the columns of ``x`` ``(n, C)`` and ``y`` ``(m, C)``: returns ``(C,)``.

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
    import ot

    return ot.wasserstein_1d(x, y, p=2)


def w2_quantile(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared 1-D W2 per channel by quantile interpolation, batched: ``x`` ``(..., n, C)``,
    ``y`` ``(..., m, C)`` → ``(..., C)``.

    ``y``'s empirical quantile function is linearly interpolated at ``x``'s quantile levels
    ``(i + 1/2) / n``; with ``n == m`` this is exactly the sorted-difference formula.
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
    import ot

    return ot.sliced_wasserstein_distance(x, y.to(x.dtype), n_projections=n_projections, p=2, seed=seed) ** 2


def site_loss(x: torch.Tensor, y: torch.Tensor, kind: str = "w2_quantile", n_projections: int = 64, seed: int = 0) -> torch.Tensor:
    """Loss of one site for one group, per concept: ``x`` ``(K, P, C)``, ``y`` ``(K, n, C)`` → ``(K,)``
    (2-D inputs are one concept)."""
    k = loss_kind(kind)
    x3, y3 = (x[None], y[None]) if x.ndim == 2 else (x, y)
    if x3.ndim != 3 or y3.ndim != 3 or x3.shape[0] != y3.shape[0] or x3.shape[-1] != y3.shape[-1]:
        raise HyperTransportError(
            f"loss inputs must be (K, P, C) and (K, n, C) (or (P, C) and (n, C)), got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if k == "w2_quantile":
        return w2_quantile(x3, y3).mean(-1)
    if k == "w2_exact":
        return torch.stack([w2_per_channel(a, b).mean() for a, b in zip(x3, y3)])
    return torch.stack([sliced_w2(a, b, n_projections, seed) for a, b in zip(x3, y3)])


def transport_loss(
    source: Mapping[str, Sequence[torch.Tensor]],
    target: Mapping[str, Sequence[torch.Tensor]],
    kind: str = "w2_quantile",
    *,
    concepts: int = 1,
    n_projections: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """Mean of :func:`site_loss` over concepts, sites and the groups each site holds.

    Args:
        source: ``{site: [ (K·P, C) per group ]}`` steered-source activations as
            :func:`~hypertransport_core.hooks.capture_pooled` records them (one group per denoising
            step); rows are ``concepts`` equal blocks, one per concept.
        target: ``{site: [ (K, n, C) or (n, C) per group ]}``, the target activations (no gradient needed).
        kind: one of :data:`LOSSES`.
        concepts: ``K``.

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
            if x.shape[0] % concepts:
                raise HyperTransportError(f"site {name!r}: {x.shape[0]} source rows do not split into {concepts} concepts.")
            y3 = y.detach().to(x.device)
            y3 = y3[None] if y3.ndim == 2 else y3
            terms.append(site_loss(x.reshape(concepts, -1, x.shape[-1]), y3, kind, n_projections, seed))
    return torch.stack(terms).mean()
