"""Scoped forward hooks: steer a module tree, or record its pooled activations, and always clean up.

Both context managers remove every hook they registered when the ``with`` body ends, also when it
raises (the pattern of baukit's ``Trace``). Hooks run in registration order, so
``with steer(...), capture_pooled(...)`` records the *steered* activations.

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
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import HyperTransportError
from .interventions import Steering, StrengthSpec, apply_affine, effective_affine, strength_for
from .sites import Site

RowMask = torch.Tensor | Callable[[], torch.Tensor | None] | None


def _modules_for(root: nn.Module, sites: Sequence[Site]) -> dict[str, nn.Module]:
    wanted = {s.module for s in sites}
    found = {n: m for n, m in root.named_modules() if n in wanted}
    missing = sorted(wanted - found.keys())
    if missing:
        raise HyperTransportError(
            f"the model has no module {missing[0]!r} ({len(missing)} of {len(wanted)} site modules missing). "
            "Fix: use a hypernet/steering trained for this model family, or list this model's sites with list_sites()."
        )
    return found


def _select(output, site: Site):
    if site.output_index is None:
        return output
    if not isinstance(output, (tuple, list)):
        raise HyperTransportError(
            f"site {site.name!r} expects a tuple output but the module returned {type(output).__name__}. "
            "Fix: check the site table for this model family."
        )
    return output[site.output_index]


def _replace(output, site: Site, value):
    if site.output_index is None:
        return value
    items = list(output)
    items[site.output_index] = value
    return type(output)(items) if isinstance(output, tuple) else items


def pool(z: torch.Tensor, site: Site) -> torch.Tensor:
    """Mean over every axis but batch and channel: ``(B, C)``."""
    if site.channel_dim in (1, 1 - z.ndim) and z.ndim > 2:
        return z.mean(dim=tuple(range(2, z.ndim)))
    if z.ndim > 2:
        return z.mean(dim=tuple(range(1, z.ndim - 1)))
    return z


@contextlib.contextmanager
def steer(
    root: nn.Module,
    interventions: Sequence[tuple[Steering, StrengthSpec]],
    *,
    row_mask: RowMask = None,
) -> Iterator[None]:
    """Apply ``interventions`` to the outputs of their sites inside ``root`` for the duration.

    Args:
        root: the module tree the sites' module paths are relative to.
        interventions: ``[(steering, strength), ...]``; at a site they apply in list order. A strength
            is a float or a mapping site-name-prefix → float (``"*"`` the default), see
            :func:`strength_for`. A strength of 0 registers no hook for that site.
        row_mask: ``None`` steers every batch row (the default: the steering acts as a change of the
            model, like a LoRA, on cond and uncond rows alike); a ``(B,)`` bool tensor, or a callable
            returning one (or None) at hook time, steers only the rows that are True.
    """
    # Each site's effective map a ⊙ z + c is computed once per `with` block (float32), then cast once
    # per device/dtype the activations arrive in (offloaded or fp16/bf16 models), not at every call.
    by_module: dict[str, list[tuple[Site, torch.Tensor, torch.Tensor, dict]]] = defaultdict(list)
    for steering, spec in interventions:
        parts = steering.split()
        for site in steering.sites:
            lam = strength_for(spec, site)
            if lam != lam or lam in (float("inf"), float("-inf")):
                raise HyperTransportError(f"strength for site {site.name!r} is {lam}. Fix: use a finite number.")
            if lam == 0:
                continue
            w, b = parts[site.name]
            a, c = effective_affine(w.float(), b.float(), lam)
            by_module[site.module].append((site, a, c, {}))
    modules = _modules_for(root, [e[0] for v in by_module.values() for e in v])

    def make_hook(entries):
        def hook(_module, _inputs, output):
            mask = row_mask() if callable(row_mask) else row_mask
            for site, a, c, cast in entries:
                z = _select(output, site)
                key = (z.device, z.dtype)
                if key not in cast:
                    cast[key] = (a.to(device=z.device, dtype=z.dtype), c.to(device=z.device, dtype=z.dtype))
                a_z, c_z = cast[key]
                z = apply_affine(z, a_z, c_z, channel_dim=site.channel_dim, form=site.form, row_mask=mask)
                output = _replace(output, site, z)
            return output

        return hook

    handles = []
    try:
        for path, entries in by_module.items():
            handles.append(modules[path].register_forward_hook(make_hook(entries)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_pooled(
    root: nn.Module,
    sites: Sequence[Site],
    *,
    detach: bool = False,
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each site's output, pooled to ``(B, C)`` (mean over tokens or spatial positions).

    Yields ``{site_name: [tensor per forward call]}`` (float32), filled as the model runs.
    With ``detach=False`` the tensors keep their graph, for losses. ``rows`` selects the batch rows
    to keep (e.g. the conditional half of a guided batch: ``lambda a: a[: len(a) // 2]``).
    """
    modules = _modules_for(root, sites)
    store: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    by_module: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        by_module[s.module].append(s)

    def make_hook(entries):
        def hook(_module, _inputs, output):
            for site in entries:
                p = pool(_select(output, site), site).float()
                if rows is not None:
                    p = rows(p)
                store[site.name].append(p.detach() if detach else p)

        return hook

    handles = []
    try:
        for path, entries in by_module.items():
            handles.append(modules[path].register_forward_hook(make_hook(entries)))
        yield store
    finally:
        for h in handles:
            h.remove()


def fold_steering(
    root: nn.Module, interventions: Sequence[tuple[Steering, StrengthSpec]]
) -> tuple[dict[str, torch.Tensor], list[Site]]:
    """Fold elementwise maps into the affine weights of the norms that produce the sites.

    For a norm ``γ ⊙ x̂ + β`` followed by ``a ⊙ z + c`` (see :func:`effective_affine`), the result is
    ``(a γ) ⊙ x̂ + (a β + c)``: exact, and free at sampling time. Several interventions compose.

    Returns:
        ``(patches, unfoldable)``: ``patches`` maps parameter paths (``"<module>.weight"``,
        ``"<module>.bias"``) to their new values (float32, on the parameter's device); ``unfoldable``
        lists the sites that must stay hooks (pooled form, tuple outputs, or no affine weight and bias).
    """
    acc: dict[str, tuple[Site, torch.Tensor, torch.Tensor]] = {}
    unfoldable: dict[str, Site] = {}
    for steering, spec in interventions:
        if steering.w.ndim != 1:
            raise HyperTransportError("a batched (K, C) steering cannot be folded. Fix: fold one concept's steering.")
        parts = steering.split()
        for site in steering.sites:
            lam = strength_for(spec, site)
            if lam == 0:
                continue
            w, b = parts[site.name]
            a, c = effective_affine(w.float(), b.float(), lam)
            if site.name in acc:
                _, a0, c0 = acc[site.name]
                a, c = a * a0, a * c0 + c
            acc[site.name] = (site, a, c)
    modules = _modules_for(root, [s for s, _, _ in acc.values()])
    patches: dict[str, torch.Tensor] = {}
    for name, (site, a, c) in acc.items():
        m = modules[site.module]
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        spatial_pooled = site.form == "pooled" and site.channel_dim == 1
        if spatial_pooled or site.output_index is not None or not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
            unfoldable[name] = site
            continue
        if weight.shape[0] != site.channels:
            raise HyperTransportError(
                f"site {name!r}: expected {site.channels} channels, the module's weight has {weight.shape[0]}. "
                "Fix: use a steering made for this model."
            )
        shape = [-1] + [1] * (weight.ndim - 1)
        a_d, c_d = a.to(weight.device), c.to(weight.device)
        patches[f"{site.module}.weight"] = a_d.view(shape) * weight.detach().float()
        patches[f"{site.module}.bias"] = a_d * bias.detach().float() + c_d
    return patches, list(unfoldable.values())


@contextlib.contextmanager
def folded(root: nn.Module, interventions: Sequence[tuple[Steering, StrengthSpec]]) -> Iterator[list[Site]]:
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
