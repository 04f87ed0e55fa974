"""Scoped forward hooks: steer a module tree, or record its pooled activations, and always clean up.

Both context managers remove every hook they registered when the ``with`` body ends, also when it
raises (the pattern of baukit's ``Trace``). Hooks run in registration order, so
``with steer(...), capture_pooled(...)`` records the *steered* activations. The arithmetic is the
engine's (:class:`~hypertransport_core.engine.SteeringPlan`).

Example::

    >>> with steer(unet, [(steering, 0.8)]):
    ...     out = unet(x, t, ctx)
    >>> with capture_pooled(unet, sites) as acts:
    ...     unet(x, t, ctx)
    >>> acts[sites[0].name][0].shape      # one (B, C) tensor per forward call
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .engine import Intervention, Rows, RowsLike, SteeringPlan, _resolve, _select, hook_handles, modules_for
from .sites import Site


def pool(z: torch.Tensor, site: Site) -> torch.Tensor:
    """Mean over every axis but batch and channel: ``(B, C)``."""
    if site.channel_dim in (1, 1 - z.ndim) and z.ndim > 2:
        return z.mean(dim=tuple(range(2, z.ndim)))
    if z.ndim > 2:
        return z.mean(dim=tuple(range(1, z.ndim - 1)))
    return z


def steer(root: nn.Module, interventions: Sequence[Intervention], *, rows: RowsLike = None):
    """Apply ``interventions`` to the outputs of their sites inside ``root`` for the duration.

    Args:
        root: the module tree the sites' module paths are relative to.
        interventions: ``[(steering, strength), ...]``, composed site by site in list order. A strength is
            a float or a mapping block name → float (``"*"`` the default), see
            :func:`~hypertransport_core.interventions.strength_for`. A strength of 0 hooks nothing there.
        rows: ``None`` steers every batch row (the steering acts as a change of the model, like a LoRA, on
            cond and uncond rows alike); a ``(B,)`` bool tensor, a :class:`~hypertransport_core.engine.Rows`,
            or a callable returning one (or None) at hook time, restricts or lays out the rows.
    """
    return SteeringPlan.compile(interventions).hooks(root, rows)


@contextlib.contextmanager
def capture_pooled(
    root: nn.Module,
    sites: Sequence[Site],
    *,
    detach: bool = False,
    rows: RowsLike = None,
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each site's output, pooled to ``(B, C)`` (mean over tokens or spatial positions).

    Yields ``{site_name: [tensor per forward call]}`` (float32), filled as the model runs.
    With ``detach=False`` the tensors keep their graph, for losses. ``rows`` keeps only some rows: a
    :class:`~hypertransport_core.engine.Rows` (e.g. only the conditional chunk of a guided batch), a bool
    mask, or a callable returning either at hook time; a call that keeps no row records nothing (a sampler
    may run the unconditional rows in a call of their own).
    """
    modules = modules_for(root, [s.module for s in sites])
    store: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    by_module: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        by_module[s.module].append(s)

    def make_hook(entries):
        def hook(_module, _inputs, output):
            for site in entries:
                p = pool(_select(output, site), site).float()
                _, mask = _resolve(rows, p.shape[0])
                if mask is not None:
                    if not bool(mask.any()):
                        continue
                    p = p[mask.to(p.device)]
                store[site.name].append(p.detach() if detach else p)

        return hook

    with hook_handles() as handles:
        for path, entries in by_module.items():
            handles.append(modules[path].register_forward_hook(make_hook(entries)))
        yield store


def fold_steering(
    root: nn.Module, interventions: Sequence[Intervention]
) -> tuple[dict[str, torch.Tensor], list[Site]]:
    """Fold elementwise maps into the affine weights of the norms that produce the sites.

    For a norm ``γ ⊙ x̂ + β`` followed by ``a ⊙ z + c``, the result is ``(a γ) ⊙ x̂ + (a β + c)``: exact,
    and free at sampling time. Several interventions compose.

    Returns:
        ``(patches, unfoldable)``: ``patches`` maps parameter paths (``"<module>.weight"``,
        ``"<module>.bias"``) to their new values (float32, on the parameter's device); ``unfoldable``
        lists the sites that must stay hooks (pooled form, tuple outputs, or no affine weight and bias).
    """
    from .errors import HyperTransportError

    if any(st.w.ndim != 1 for st, _ in interventions):
        raise HyperTransportError("a batched (K, C) steering cannot be folded. Fix: fold one concept's steering.")
    fold, rest = SteeringPlan.compile(interventions).split_foldable(root)
    patches: dict[str, torch.Tensor] = {}
    for path, sm in fold.items():
        m = root.get_submodule(path)
        w, b = SteeringPlan.folded_weights(sm, m.weight.detach().float(), m.bias.detach().float())
        patches[f"{path}.weight"], patches[f"{path}.bias"] = w, b
    return patches, rest.sites


@contextlib.contextmanager
def folded(root: nn.Module, interventions: Sequence[Intervention]) -> Iterator[list[Site]]:
    """Temporarily write folded maps into ``root``'s norm weights (restored on exit, also on error).

    Yields the sites that could not be folded (apply them with :func:`steer`).
    """
    patches, rest = fold_steering(root, interventions)
    params = dict(root.named_parameters())
    saved = {k: params[k].detach().clone() for k in patches}
    try:
        with torch.no_grad():
            for k, v in patches.items():
                params[k].copy_(v.to(params[k].dtype))
        yield rest
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


__all__ = ["Rows", "capture_pooled", "fold_steering", "folded", "hook_handles", "pool", "steer"]
