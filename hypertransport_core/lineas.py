"""Per-concept fitting of the maps (LinEAS, METHOD §4): the baseline HyperTransport amortizes.

All sites are optimized together, end to end: the source pass runs through the model with every map
active, so each map sees what the maps upstream did. Maps start at the identity (``w = 1, b = 0``);
Adam; optionally a sparse-group-lasso proximal step after each update on ``(w − 1, b)``:

.. math:: u ← \\mathrm{soft}(u, η λ_1), \\qquad u_s ← u_s \\max(0, 1 − η λ_g \\sqrt{2 C_s} / \\lVert u_s \\rVert)

(per-channel L1, then one group per site), which zeroes whole channels and whole sites.

The model is not part of this module: the caller passes ``batch_fn(step)``, which returns a
closure that runs the model on a batch of source prompts, and that batch's target activations
(pooled, per site, per forward call; see :func:`~hypertransport_core.hooks.capture_pooled`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .engine import RowsLike, SteeringPlan
from .errors import HyperTransportError
from .hooks import capture_pooled
from .interventions import Steering
from .ot import loss_kind, transport_loss
from .sites import Site

log = logging.getLogger(__name__)

Targets = Mapping[str, Sequence[torch.Tensor]]
BatchFn = Callable[[int], tuple[Callable[[], object], Targets]]


@dataclass
class LinEASConfig:
    """Per-concept fitting settings (LinEAS used ~1000 steps at 1e-4..1e-3; 50 steps at 1e-3 already works)."""

    steps: int = 100  # optimizer steps
    lr: float = 1e-2  # Adam learning rate
    loss: str = "w2_quantile"  # "w2_quantile", "w2_exact" or "sliced" (hypertransport_core.ot.LOSSES)
    l1: float = 0.0  # per-channel sparsity (0 = off, as in the papers' T2I results)
    group: float = 0.0  # per-site group sparsity (0 = off)

    def to_dict(self) -> dict:
        return asdict(self)


def steered_loss(
    root: nn.Module,
    steering: Steering,
    run: Callable[[], object],
    targets: Targets,
    kind: str = "w2_quantile",
    *,
    steer_rows: RowsLike = None,
    capture_rows: RowsLike = None,
    groups: slice | None = None,
) -> torch.Tensor:
    """Run ``run()`` with ``steering`` active at strength 1 and return the transport loss to ``targets``.

    This is the loss of both the trainer and LinEAS. ``steering`` may hold ``K`` maps (``(K, C)``: K
    concepts, each steering its own block of rows); ``targets`` are then ``(K, n, C)`` per group.
    ``steer_rows`` lays out the rows the maps act on and ``capture_rows`` selects the rows compared (e.g.
    the conditional chunk of a guided batch), see :class:`~hypertransport_core.engine.Rows`. ``groups`` keeps
    only those recorded groups (model calls) for the loss, e.g. ``slice(-1, None)`` with the last step's targets.
    """
    plan = SteeringPlan.compile([(steering, 1.0)], what="steered_loss")
    concepts = steering.w.shape[0] if steering.w.ndim == 2 else 1
    with plan.hooks(root, steer_rows), capture_pooled(root, steering.sites, rows=capture_rows) as acts:
        run()
    if groups is not None:
        acts = {k: v[groups] for k, v in acts.items()}
    return transport_loss(acts, targets, kind, concepts=concepts)


def _prox_sparse_group(u: torch.Tensor, sizes: list[int], step_l1: float, step_group: float) -> None:
    """In-place sparse-group-lasso proximal operator on ``u`` ``(2, C_total)`` (rows: w−1 and b)."""
    if step_l1 > 0:
        u.copy_(torch.sign(u) * torch.clamp(u.abs() - step_l1, min=0))
    if step_group > 0:
        for chunk in torch.split(u, sizes, dim=1):
            norm = chunk.norm()
            thr = step_group * (2 * chunk.shape[1]) ** 0.5
            chunk.mul_(torch.clamp(1 - thr / (norm + 1e-12), min=0))


def fit_lineas(
    root: nn.Module,
    sites: Sequence[Site],
    batch_fn: BatchFn,
    config: LinEASConfig | None = None,
    *,
    label: str = "",
    callback: Callable[[int, float], None] | None = None,
    snapshot: Callable[[int, Steering], None] | None = None,
    steer_rows: RowsLike = None,
    capture_rows: RowsLike = None,
) -> Steering:
    """Fit one concept's maps for every site, end to end.

    Args:
        root: module tree holding the sites.
        sites: the sites to fit.
        batch_fn: ``batch_fn(step) -> (run, targets)``; ``run()`` runs the model on source prompts
            (gradients must be enabled through the model), ``targets`` are that batch's target
            activations ``{site: [ (n, C) per forward call ]}``.
        config: :class:`LinEASConfig`.
        label: the concept, stored in the result's meta.
        callback: ``callback(step, loss)`` after each step (it may raise to stop the fit: nothing is returned).
        snapshot: ``snapshot(steps_done, steering)`` after each step with a detached copy of the maps so far
            (for convergence curves: the caller keeps the ones it wants).
        steer_rows, capture_rows: the row layout of the model calls and the rows the loss compares (e.g.
            only the conditional chunk when the sampler runs cond and uncond rows in one batch).

    Returns:
        a :class:`~hypertransport_core.interventions.Steering` with ``meta["fit"]`` giving steps,
        final loss and seconds.
    """
    cfg = config or LinEASConfig()
    loss_kind(cfg.loss)
    if cfg.steps < 1 or cfg.lr <= 0:
        raise HyperTransportError(f"LinEAS needs steps >= 1 and lr > 0, got steps={cfg.steps}, lr={cfg.lr}.")
    sites = tuple(sites)
    total = sum(s.channels for s in sites)
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    u = torch.zeros(2, total, device=device, requires_grad=True)  # rows: w − 1, b
    opt = torch.optim.Adam([u], lr=cfg.lr)
    sizes = [s.channels for s in sites]
    t0 = time.perf_counter()
    loss_val = float("nan")
    for step in range(cfg.steps):
        run, targets = batch_fn(step)
        steering = Steering(sites, 1 + u[0], u[1])
        loss = steered_loss(root, steering, run, targets, cfg.loss, steer_rows=steer_rows, capture_rows=capture_rows)
        loss_val = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise HyperTransportError(f"LinEAS loss became {loss_val} at step {step}. Fix: lower the learning rate.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.l1 > 0 or cfg.group > 0:
            with torch.no_grad():
                _prox_sparse_group(u, sizes, cfg.lr * cfg.l1, cfg.lr * cfg.group)
        if callback is not None:
            callback(step, loss_val)
        if snapshot is not None:
            d = u.detach().cpu()
            snapshot(step + 1, Steering(sites, 1 + d[0], d[1].clone(), meta={"label": label}))
    seconds = time.perf_counter() - t0
    u = u.detach().cpu()
    meta = {
        "label": label,
        "fit": {"method": "lineas", "steps": cfg.steps, "final_loss": loss_val, "seconds": seconds, **cfg.to_dict()},
    }
    log.info("LinEAS %r: %d steps, loss %.4g, %.1f s", label, cfg.steps, loss_val, seconds)
    return Steering(sites, 1 + u[0], u[1], meta)
