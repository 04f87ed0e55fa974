"""Per-channel affine interventions and how a strength λ applies them (METHOD §2).

For a site with map ``T(z) = w ⊙ z + b`` and strength ``λ``:

- ``λ ≥ 0``: ``z + λ (T(z) − z)``; ``λ = 0`` returns ``z`` itself, ``λ = 1`` the full map, ``λ > 1``
  extrapolates.
- ``λ < 0``: the concept is removed with the inverse map, ``z + |λ| (T⁻¹(z) − z)``,
  ``T⁻¹(z) = (z − b) / w``, where ``|w|`` is raised to at least the *removal floor* (sign kept):
  :data:`REMOVAL_FLOOR`, or what :func:`removal_floor` sets for a block of code (a study's knob).

Both are one elementwise affine map ``a ⊙ z + c`` (:func:`effective_affine`); how it meets an
activation (every token, every position, or the spatial mean) is the engine's
(:mod:`~hypertransport_core.engine`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from .errors import HyperTransportError
from .sites import Site

#: The lowest removal floor allowed (keeps ``T⁻¹`` finite when a map nearly kills a channel).
MIN_ABS_W = 1e-2
#: Smallest ``|w|`` the inverse map divides by (ours, METHOD §2: "w kept away from 0"). Hypernet maps hold
#: channels with ``w`` near 0 (and some below 0); dividing by them multiplied those channels up to 100-fold at
#: the former floor 0.01 and turned removed images into noise. At 1, for strengths from −1 to 0, the inverse
#: amplifies no channel: it undoes the shift ``b`` and shrinks what the map enlarged (below −1 it extrapolates).
#: The sign of ``w`` is kept, so a channel with ``−1 < w < 0`` is mirrored (``a = −1`` at λ = −1): measured
#: that way, an unsigned floor was not measured. Chosen on the validation concepts of three splits among
#: 0.01–4 by ``studies/removal.py`` (README, "Removing a concept").
REMOVAL_FLOOR = 1.0
#: The highest removal floor allowed (beyond it the inverse only shrinks activations towards 0).
MAX_REMOVAL_FLOOR = 100.0
_FLOOR: ContextVar[float] = ContextVar("removal_floor", default=REMOVAL_FLOOR)


@contextmanager
def removal_floor(floor: float) -> Iterator[None]:
    """Inside the block, ``λ < 0`` divides by ``|w| ≥ floor`` instead of :data:`REMOVAL_FLOOR` (this context only).

    It reaches maps computed inside the block in this thread: ``steer()`` compiles its plan on entry, so a
    study's ``with removal_floor(f), steer(...)`` works; plans compiled later or in another thread (ComfyUI's
    patches compile lazily in the worker) use :data:`REMOVAL_FLOOR`."""
    floor = float(floor)
    if not MIN_ABS_W <= floor <= MAX_REMOVAL_FLOOR:
        raise HyperTransportError(f"removal floor {floor!r} is outside [{MIN_ABS_W:g}, {MAX_REMOVAL_FLOOR:g}]. Fix: pass e.g. 0.5.")
    token = _FLOOR.set(floor)
    try:
        yield
    finally:
        _FLOOR.reset(token)


def _floored(w: torch.Tensor) -> torch.Tensor:
    f = _FLOOR.get()
    return torch.where(w < 0, torch.clamp(w, max=-f), torch.clamp(w, min=f))


def effective_affine(w: torch.Tensor, b: torch.Tensor, strength) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` such that the steered output is ``a ⊙ z + c`` at strength ``strength``.

    .. math:: λ ≥ 0:\\ a = 1 + λ (w − 1),\\ c = λ b; \\quad λ < 0:\\ a = 1 + |λ| (1/w − 1),\\ c = −|λ| b / w

    Args:
        w, b: ``(C,)`` map parameters (or ``(K, C)``).
        strength: λ, a float; or a ``(K,)`` tensor of strengths for ``(C,)`` maps, giving ``(K, C)``: one map
            per image of a batch.
    """
    if torch.is_tensor(strength) and strength.ndim == 1:
        lam = strength.to(device=w.device, dtype=w.dtype)[:, None]
        safe_w = _floored(w)
        mag = lam.abs()
        a = torch.where(lam >= 0, 1 + lam * (w - 1), 1 + mag * (1 / safe_w - 1))
        c = torch.where(lam >= 0, lam * b, -mag * b / safe_w)
        return a, c
    lam = float(strength)
    if lam >= 0:
        return 1 + lam * (w - 1), lam * b
    mag = -lam
    safe_w = _floored(w)
    return 1 + mag * (1 / safe_w - 1), -mag * b / safe_w


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


StrengthSpec = float | Sequence[float] | Mapping[str, float | Sequence[float]]


def block_matches(key: str, site_name: str) -> bool:
    """Whether a per-block key names ``site_name``: the whole name, or a prefix ending at a dotted segment
    (``"blocks.2"`` matches ``"blocks.2.norm1"`` and ``"blocks.2"``, never ``"blocks.20.norm1"``); a tuple
    element's site ``"double_blocks.1@0"`` is matched by ``"double_blocks.1"``."""
    if site_name == key:
        return True
    return site_name.startswith(key) and site_name[len(key)] in ".@"


def _value(v):
    return tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else float(v)


def strength_for(spec: StrengthSpec, site: Site):
    """The strength of ``site`` under a scalar, one strength per image (a sequence), or a per-site/per-block
    mapping of either: the longest key that :func:`block_matches` the site's name wins, ``"*"`` is the
    default, missing means 1.0. Returns a float or a tuple of floats."""
    if not isinstance(spec, Mapping):
        return _value(spec)
    best, val = -1, _value(spec.get("*", 1.0))
    for k, v in spec.items():
        if k != "*" and len(k) > best and block_matches(k, site.name):
            best, val = len(k), _value(v)
    return val
