"""Per-channel affine interventions and how a strength λ applies them (METHOD §2).

For a site with map ``T(z) = w ⊙ z + b`` and strength ``λ``:

- ``λ ≥ 0``: ``z + λ (T(z) − z)``; ``λ = 0`` returns ``z`` itself, ``λ = 1`` the full map, ``λ > 1``
  extrapolates.
- ``λ < 0``: the concept is removed with the inverse map, ``z + |λ| (T⁻¹(z) − z)``,
  ``T⁻¹(z) = (z − b) / w``, where ``|w|`` is clamped to at least :data:`MIN_ABS_W`.

Both are one elementwise affine map ``a ⊙ z + c`` (:func:`effective_affine`). Token outputs
``(B, N, C)`` get it at every token; spatial outputs ``(B, C, H, W)`` get it either at every position
(``form="elementwise"``) or, as Lin-AcT/LinEAS do, on the spatial mean ``m`` with the difference
added everywhere: ``z + (a − 1) ⊙ m + c`` (``form="pooled"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import HyperTransportError
from .sites import FORMS, Site

#: Smallest ``|w|`` the inverse map divides by (keeps ``T⁻¹`` finite when a map nearly kills a channel).
MIN_ABS_W = 1e-2


def effective_affine(w: torch.Tensor, b: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` such that the steered output is ``a ⊙ z + c`` at strength ``strength``.

    .. math:: λ ≥ 0:\\ a = 1 + λ (w − 1),\\ c = λ b; \\quad λ < 0:\\ a = 1 + |λ| (1/w − 1),\\ c = −|λ| b / w

    Args:
        w, b: ``(C,)`` map parameters.
        strength: λ.
    """
    lam = float(strength)
    if lam >= 0:
        return 1 + lam * (w - 1), lam * b
    mag = -lam
    safe_w = torch.where(w < 0, torch.clamp(w, max=-MIN_ABS_W), torch.clamp(w, min=MIN_ABS_W))
    return 1 + mag * (1 / safe_w - 1), -mag * b / safe_w


def _channel_shape(z: torch.Tensor, channel_dim: int) -> list[int]:
    shape = [1] * z.ndim
    shape[channel_dim] = z.shape[channel_dim]
    return shape


def apply_map(
    z: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    strength: float,
    *,
    channel_dim: int = -1,
    form: str = "pooled",
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steer one activation tensor.

    Args:
        z: activation, ``(B, ..., C)`` (``channel_dim=-1``) or ``(B, C, ...)`` (``channel_dim=1``).
        w, b: ``(C,)`` map, or ``(K, C)``: K maps for K equal blocks of consecutive rows (a batch of
            concepts in training); cast to ``z``'s dtype and device.
        strength: λ; ``0`` returns ``z`` unchanged (the same object).
        channel_dim: the channel axis of ``z``.
        form: ``"pooled"`` or ``"elementwise"``; ``"pooled"`` only differs for ``channel_dim=1`` with
            spatial axes (token outputs are always mapped at every token).
        row_mask: optional ``(B,)`` bool; rows where it is False are returned unchanged.

    Returns:
        tensor like ``z``.
    """
    if strength == 0:
        return z
    a, c = effective_affine(w.to(device=z.device, dtype=torch.float32), b.to(device=z.device, dtype=torch.float32), strength)
    return apply_affine(z, a.to(z.dtype), c.to(z.dtype), channel_dim=channel_dim, form=form, row_mask=row_mask)


def apply_affine(
    z: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    *,
    channel_dim: int = -1,
    form: str = "pooled",
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`apply_map` after :func:`effective_affine`: ``a ⊙ z + c`` (elementwise) or
    ``z + (a − 1) ⊙ mean(z) + c`` (pooled), with ``a, c`` ``(C,)`` or ``(K, C)`` already on ``z``'s device."""
    if form not in FORMS:
        raise HyperTransportError(f"form {form!r} is not one of {FORMS}. Fix: pass 'pooled' or 'elementwise'.")
    C = z.shape[channel_dim]
    if a.shape[-1:] != (C,) or c.shape != a.shape or a.ndim > 2 or (a.ndim == 2 and z.shape[0] % a.shape[0]):
        raise HyperTransportError(
            f"map shapes {tuple(a.shape)} do not fit activation {tuple(z.shape)} "
            f"with {C} channels on dim {channel_dim}. Fix: use a steering made for this model's sites."
        )
    shape = _channel_shape(z, channel_dim)
    if a.ndim == 2:  # K maps, each for a block of B/K consecutive rows (batched training)
        reps = z.shape[0] // a.shape[0]
        a, c = a.repeat_interleave(reps, 0), c.repeat_interleave(reps, 0)
        shape[0] = z.shape[0]
    a, c = a.view(shape), c.view(shape)
    spatial_dims = [d for d in range(2, z.ndim)] if channel_dim in (1, 1 - z.ndim) else []
    if form == "pooled" and spatial_dims:
        m = z.mean(dim=spatial_dims, keepdim=True)
        out = z + ((a - 1) * m + c)
    else:
        out = z * a + c
    if row_mask is not None:
        if row_mask.numel() != z.shape[0]:
            raise HyperTransportError(
                f"row mask has {row_mask.numel()} entries for a batch of {z.shape[0]} rows. "
                "Fix: pass one bool per batch row (or None to steer every row)."
            )
        mask = row_mask.to(device=z.device, dtype=torch.bool).view([-1] + [1] * (z.ndim - 1))
        out = torch.where(mask, out, z)
    return out


@dataclass(frozen=True)
class Steering:
    """One concept's maps for every site, packed: ``w`` and ``b`` are ``(C_total,)`` in site order.

    Attributes:
        sites: the sites, in the order their channels are packed.
        w, b: packed parameters (float32), ``(C_total,)``; or ``(K, C_total)`` for K concepts steering K
            equal blocks of batch rows at once (training only).
        meta: free-form JSON-able description (concept label, source hypernet, family, ...).

    Example::

        >>> s = Steering.identity(sites)
        >>> w0, b0 = s.params(sites[0].name)   # views of the packed tensors
    """

    sites: tuple[Site, ...]
    w: torch.Tensor
    b: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        total = sum(s.channels for s in self.sites)
        for key in ("w", "b"):
            t = getattr(self, key)
            if t.ndim not in (1, 2) or t.shape[-1] != total or t.shape != self.w.shape:
                raise HyperTransportError(
                    f"steering tensor {key!r}: expected shape ({total},) for {len(self.sites)} sites, "
                    f"found {tuple(t.shape)}. Fix: build it from the same site list it was made for."
                )
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise HyperTransportError("steering lists a site twice. Fix: deduplicate the site list.")

    @staticmethod
    def identity(sites: Sequence[Site], meta: dict | None = None) -> Steering:
        total = sum(s.channels for s in sites)
        return Steering(tuple(sites), torch.ones(total), torch.zeros(total), dict(meta or {}))

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        out, o = {}, 0
        for s in self.sites:
            out[s.name] = (o, o + s.channels)
            o += s.channels
        return out

    def params(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_s, b_s)`` of one site (views)."""
        try:
            lo, hi = self.offsets[name]
        except KeyError:
            raise HyperTransportError(f"steering has no site {name!r}. Fix: check the site list of the file.") from None
        return self.w[..., lo:hi], self.b[..., lo:hi]

    def split(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site_name: (w_s, b_s)}`` for all sites (views)."""
        ws = torch.split(self.w, [s.channels for s in self.sites], dim=-1)
        bs = torch.split(self.b, [s.channels for s in self.sites], dim=-1)
        return {s.name: (w, b) for s, w, b in zip(self.sites, ws, bs)}

    def to(self, device=None, dtype=None) -> Steering:
        return Steering(self.sites, self.w.to(device=device, dtype=dtype), self.b.to(device=device, dtype=dtype), self.meta)

    def detach(self) -> Steering:
        return Steering(self.sites, self.w.detach(), self.b.detach(), self.meta)


def combine_steerings(parts: Sequence[tuple[Steering, float]], meta: dict | None = None) -> Steering:
    """Weighted sum of maps in parameter space: ``w = 1 + Σ α_i (w_i − 1)``, ``b = Σ α_i b_i``.

    All parts must share one site list. A negative weight subtracts a concept's map.
    """
    if not parts:
        raise HyperTransportError("combine_steerings got nothing to combine. Fix: pass at least one (steering, weight).")
    sites = parts[0][0].sites
    for s, _ in parts[1:]:
        if s.sites != sites:
            raise HyperTransportError(
                "steerings made for different sites cannot be combined. Fix: combine steerings from one hypernet/model."
            )
    w = 1 + sum(float(a) * (s.w - 1) for s, a in parts)
    b = sum(float(a) * s.b for s, a in parts)
    labels = [f"{a:+g}*{s.meta.get('label', '?')}" for s, a in parts]
    return Steering(sites, w, b, {**parts[0][0].meta, "label": " ".join(labels), **(meta or {})})


StrengthSpec = float | Mapping[str, float]


def strength_for(spec: StrengthSpec, site: Site) -> float:
    """The strength of ``site`` under a scalar or a per-site/per-prefix mapping (longest prefix wins,
    ``"*"`` the default, missing means 1.0)."""
    if not isinstance(spec, Mapping):
        return float(spec)
    if site.name in spec:
        return float(spec[site.name])
    best, val = -1, float(spec.get("*", 1.0))
    for k, v in spec.items():
        if k != "*" and site.name.startswith(k) and len(k) > best:
            best, val = len(k), float(v)
    return val
