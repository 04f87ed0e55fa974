"""The one steering engine: interventions compiled once into per-site maps, applied by hooks or folded into weights.

A :class:`SteeringPlan` is what every path consumes: :func:`~hypertransport_core.hooks.steer`, the folded
path (:meth:`SteeringPlan.split_foldable`), the trainer and the ComfyUI nodes. Compiling
(:meth:`SteeringPlan.compile`) resolves each site's strength (a scalar or per-block multipliers,
:func:`~hypertransport_core.interventions.strength_for`), turns ``(w, b, λ)`` into one affine map
``a ⊙ z + c`` (the inverse map for ``λ < 0``, :func:`~hypertransport_core.interventions.effective_affine`),
composes the interventions that share a site, and checks the result once: finite, and within
:data:`MAX_SCALE` / :data:`MAX_SHIFT`, else an error naming the site and the value. Composition is exact
for both forms (pooled and elementwise): ``a₂(a₁ z + c₁) + c₂ = (a₂a₁) z + (a₂c₁ + c₂)``.

The maps are cast once per device and dtype the activations arrive in. At a site with output ``z``:

* token outputs ``(B, N, C)`` and elementwise spatial sites: ``a ⊙ z + c`` at every position;
* pooled spatial sites ``(B, C, H, W)``: ``z + (a − 1) ⊙ mean_{HW}(z) + c`` (Lin-AcT/LinEAS).

Rows (:class:`Rows`): ComfyUI runs the conditional and unconditional rows of a guided step as equal
*chunks* of one batch. A plan holding ``K`` maps per site (``(K, C)``: a batch of concepts in training,
or one strength per image) steers ``K`` equal blocks of rows inside every chunk; a chunk (or row) mask
leaves rows unsteered.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .errors import HyperTransportError
from .interventions import Steering, StrengthSpec, effective_affine, strength_for
from .sites import FORMS, Site, token_layout

#: Largest |a| and |c| a composed map may have. Trained maps stay within ~10; these allow strength 10 on an
#: inverse map of |w| = 0.01 and still refuse what would turn the model's activations into noise or Inf.
MAX_SCALE = 1e4
MAX_SHIFT = 1e5
#: Beyond these a map is legal but extreme (the image is likely saturated): compiling logs a warning naming the site.
WARN_SCALE = 100.0
WARN_SHIFT = 100.0

Intervention = tuple[Steering, StrengthSpec]


class MapOutOfRange(HyperTransportError):
    """A composed map is non-finite or beyond :data:`MAX_SCALE` / :data:`MAX_SHIFT` (raised by :func:`check_map`)."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rows:
    """How a model call's batch is laid out, and which of its rows to steer.

    Attributes:
        chunks: the batch is this many equal chunks (ComfyUI: one per entry of ``cond_or_uncond``).
        keep: per chunk, whether it is steered (``None``: every chunk).
        region: optional ``(1 or B, 1, H, W)`` weights in [0, 1] at the latent's resolution (``B``: the rows of
            one chunk): where to steer. Each site sees it resized to its own layout (:func:`region_for`);
            where it is 0 the site's output is the unsteered one.
    """

    chunks: int = 1
    keep: tuple[bool, ...] | None = None
    region: torch.Tensor | None = None

    def row_mask(self, batch: int) -> torch.Tensor | None:
        """``(batch,)`` bool, or ``None`` when every row is steered."""
        if self.keep is None or all(self.keep):
            return None
        if len(self.keep) != self.chunks or batch % self.chunks:
            raise HyperTransportError(f"row layout {self} does not fit a batch of {batch} rows.")
        return torch.tensor(self.keep, dtype=torch.bool).repeat_interleave(batch // self.chunks)


RowsLike = Rows | torch.Tensor | Callable[[], "Rows | torch.Tensor | None"] | None


@contextlib.contextmanager
def hook_handles() -> Iterator[list]:
    """A list to put hook handles in; every one is removed when the block ends, also when it raises (the
    pattern of baukit's ``Trace``: nothing is ever left on a model)."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _resolve_rows(rows: RowsLike) -> Rows | torch.Tensor | None:
    return rows() if callable(rows) else rows


def _resolve(rows: RowsLike, batch: int) -> tuple[int, torch.Tensor | None]:
    """``(chunks, (batch,) bool mask or None)`` of a rows argument at hook time."""
    r = _resolve_rows(rows)
    if r is None:
        return 1, None
    if isinstance(r, Rows):
        return r.chunks, r.row_mask(batch)
    if torch.is_tensor(r):
        if r.numel() != batch:
            raise HyperTransportError(
                f"row mask has {r.numel()} entries for a batch of {batch} rows. "
                "Fix: pass one bool per batch row (or None to steer every row)."
            )
        return 1, r.reshape(-1).to(torch.bool)
    raise HyperTransportError(f"rows must be None, a Rows, a bool tensor or a callable returning one, not {type(r).__name__}.")


def region_for(region: torch.Tensor, z: torch.Tensor, channel_dim: int, chunks: int,
               tokens: tuple[str, int] = ("image", 0)) -> torch.Tensor | None:
    """A latent-resolution region ``(1 or B, 1, H, W)`` as weights broadcasting against activation ``z``.

    Spatial outputs ``(B, C, h, w)`` see it resized to ``h × w`` (area average). Token outputs ``(B, N, C)`` see
    it by token position, as the site's family table lays its tokens out (``tokens``: a layout of
    :data:`~hypertransport_core.sites.TOKEN_LAYOUTS` and the token stride, :func:`~hypertransport_core.sites.token_layout`).
    The image tokens are in raster order, ``⌈H/s⌉ × ⌈W/s⌉`` of them at the table's stride ``s`` (a DiT's patch size:
    the latent is padded up to it), else at the stride for which they fit: ``"image"``: all ``N`` tokens (UNet
    transformer blocks, DiT patches); ``"text_first"``: the last ones, the text tokens before them weighted 0 (Flux's
    single-stream blocks; reference-image tokens after them, as Flux Kontext adds, are not laid out); ``"text"``: none,
    so not steered under a region (weights 0), as is a token output whose length fits no stride."""
    import torch.nn.functional as F

    H, W = region.shape[-2:]
    rows = z.shape[0]
    r = region.to(device=z.device, dtype=z.dtype)
    if r.shape[0] not in (1, rows):  # one region per image of a chunk: repeat it for every chunk
        if r.shape[0] * chunks != rows:
            raise HyperTransportError(
                f"the mask holds {r.shape[0]} regions for a batch of {rows // chunks} images. "
                "Fix: give one mask, or one per image of the batch."
            )
        r = r.repeat(chunks, 1, 1, 1)
    cd = channel_dim % z.ndim
    if cd == 1 and z.ndim == 4:
        return F.interpolate(r, size=z.shape[-2:], mode="area") if r.shape[-2:] != z.shape[-2:] else r
    if z.ndim != 3 or cd != 2:
        return None  # another layout: steer it where the region is nonzero on average
    N = z.shape[1]
    kind, stride = tokens
    zeros = torch.zeros(r.shape[0], N, 1, device=z.device, dtype=z.dtype)
    if kind == "text":
        return zeros
    for s in (stride,) if stride else (1, 2, 4, 8, 16, 32, 64):
        h, w = (-(-H // s), -(-W // s)) if stride else (H // s, W // s)
        fits = h * w == N if kind == "image" else 0 < h * w <= N
        if h * w == 0 or not fits:
            continue
        flat = (F.interpolate(r, size=(h, w), mode="area") if (h, w) != (H, W) else r).reshape(r.shape[0], h * w, 1)
        return torch.cat([zeros[:, : N - h * w], flat], dim=1) if h * w < N else flat
    return zeros


def transform(
    z: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    *,
    channel_dim: int,
    form: str,
    chunks: int = 1,
    mask: torch.Tensor | None = None,
    a_minus_1: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    tokens: tuple[str, int] = ("image", 0),
) -> torch.Tensor:
    """The steered activation ``z'`` of one site (the arithmetic every path shares).

    Args:
        z: ``(B, ...)`` activation; its channel axis is ``channel_dim`` (1 or -1).
        a, c: ``(C,)`` or ``(K, C)`` maps in ``z``'s device and dtype (``K`` equal blocks of rows per chunk).
        form: ``"pooled"`` or ``"elementwise"`` (only spatial channel-first outputs pool).
        chunks: the batch is this many equal chunks; ``(K, C)`` maps repeat in every chunk.
        mask: optional ``(B,)`` bool; rows where it is False are returned unchanged.
        a_minus_1: ``a − 1`` when the caller has it cached (pooled sites).
        region: optional latent-resolution weights (see :class:`Rows`); the steered change is scaled by them.
    """
    B = z.shape[0]
    cd = channel_dim % z.ndim
    C = z.shape[cd]
    K = a.shape[0] if a.ndim == 2 else 1
    if a.shape[-1] != C or c.shape != a.shape or a.ndim > 2 or B % (chunks * K):
        raise HyperTransportError(
            f"map shapes {tuple(a.shape)} do not fit activation {tuple(z.shape)} with {C} channels on dim {channel_dim} "
            f"({chunks} chunk(s)). Fix: use a steering made for this model's sites."
        )
    pooled = form == "pooled" and cd == 1 and z.ndim > 2
    # rows: `chunks` equal chunks (cond/uncond), each K equal blocks (one per map) of n rows
    zz = rearrange(z, "(c k n) ... -> c k n ...", c=chunks, k=K)
    shape = [1, K, 1] + [1] * (z.ndim - 1)
    shape[2 + cd] = C
    c_v = c.reshape(shape)
    if pooled:
        am1 = (a - 1 if a_minus_1 is None else a_minus_1).reshape(shape)
        m = zz.mean(dim=tuple(range(4, zz.ndim)), keepdim=True)  # the spatial mean of each channel
        out = zz + torch.addcmul(c_v, am1, m)
    else:
        out = torch.addcmul(c_v, zz, a.reshape(shape))
    if region is not None:
        r = region_for(region, z, channel_dim, chunks, tokens)
        if r is not None:
            rr = r.reshape(1, 1, 1, *r.shape[1:]) if r.shape[0] == 1 else rearrange(r, "(c k n) ... -> c k n ...", c=chunks, k=K)
            out = zz + rr * (out - zz)
    if mask is not None:
        keep = rearrange(mask.to(z.device), "(c k n) -> c k n", c=chunks, k=K).reshape(list(zz.shape[:3]) + [1] * (z.ndim - 1))
        out = torch.where(keep, out, zz)
    return rearrange(out, "c k n ... -> (c k n) ...")


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
    """Steer one activation tensor with the map ``(w, b)`` at ``strength`` (see :func:`transform`).

    Args:
        z: activation, ``(B, ..., C)`` (``channel_dim=-1``) or ``(B, C, ...)`` (``channel_dim=1``).
        w, b: ``(C,)`` map, or ``(K, C)``: K maps for K equal blocks of consecutive rows.
        strength: λ; ``0`` returns ``z`` unchanged (the same object).
        form: ``"pooled"`` or ``"elementwise"``.
        row_mask: optional ``(B,)`` bool; rows where it is False are returned unchanged.
    """
    if form not in FORMS:
        raise HyperTransportError(f"form {form!r} is not one of {FORMS}. Fix: pass 'pooled' or 'elementwise'.")
    if strength == 0:
        return z
    a, c = effective_affine(w.to(z.device, torch.float32), b.to(z.device, torch.float32), strength)
    _, mask = _resolve(row_mask, z.shape[0])
    return transform(z, a.to(z.dtype), c.to(z.dtype), channel_dim=channel_dim, form=form, mask=mask)


def _select(output, site: Site):
    if site.output_index is None:
        return output
    if not isinstance(output, (tuple, list)) or site.output_index >= len(output):
        raise HyperTransportError(
            f"site {site.name!r} expects element {site.output_index} of a tuple output but the module returned "
            f"{type(output).__name__}. Fix: use a hypernet/steering made for this model family."
        )
    return output[site.output_index]


def _replace(output, site: Site, value):
    if site.output_index is None:
        return value
    items = list(output)
    items[site.output_index] = value
    return type(output)(items) if isinstance(output, tuple) else items


class SiteMap:
    """One site's composed map ``a ⊙ z + c`` (float32), with its casts per device and dtype."""

    __slots__ = ("site", "a", "c", "tokens", "_cast")

    def __init__(self, site: Site, a: torch.Tensor, c: torch.Tensor, tokens: tuple[str, int] = ("image", 0)):
        self.site, self.a, self.c, self.tokens = site, a, c, tokens  # the site's token layout and stride (for a region)
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def cast(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (device.type, device.index, dtype, torch.is_grad_enabled())  # a cast made without grad has no graph
        hit = self._cast.get(key)
        if hit is None:
            a = self.a.to(device=device, dtype=dtype)
            hit = (a, self.c.to(device=device, dtype=dtype), (self.a - 1).to(device=device, dtype=dtype))
            self._cast[key] = hit
        return hit

    def __call__(self, z: torch.Tensor, chunks: int = 1, mask: torch.Tensor | None = None,
                 region: torch.Tensor | None = None) -> torch.Tensor:
        a, c, am1 = self.cast(z.device, z.dtype)
        return transform(z, a, c, channel_dim=self.site.channel_dim, form=self.site.form, chunks=chunks, mask=mask,
                         a_minus_1=am1, region=region, tokens=self.tokens)


def modules_for(root: nn.Module, paths: Sequence[str]) -> dict[str, nn.Module]:
    """``{path: module}`` for the given module paths inside ``root`` (an error names the first missing one)."""
    out = {}
    for p in dict.fromkeys(paths):
        try:
            out[p] = root.get_submodule(p)
        except AttributeError:
            raise HyperTransportError(
                f"the model has no module {p!r} (a site of the steering). "
                "Fix: use a hypernet/steering trained for this model family, or list this model's sites with list_sites()."
            ) from None
    return out


def foldable(site: Site, module: nn.Module | None) -> bool:
    """Whether a map at ``site`` can be written into ``module``'s affine weights exactly: the map acts at
    every position (not a spatial mean), on a tensor output, of a module with 1-D ``weight`` and ``bias``
    of the site's width."""
    if module is None or site.output_index is not None:
        return False
    if site.form == "pooled" and site.channel_dim == 1:  # spatial mean: cannot be a weight
        return False
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        isinstance(w, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and w.ndim == 1
        and b.ndim == 1
        and w.shape[0] == site.channels == b.shape[0]
    )


class SteeringPlan:
    """Interventions compiled into one map per site (see the module docstring).

    Example::

        >>> plan = SteeringPlan.compile([(steering, 0.8)])
        >>> with plan.hooks(unet):
        ...     out = unet(x, t, ctx)
    """

    def __init__(self, maps: dict[str, SiteMap]):
        self.maps = maps
        self.by_module: dict[str, list[SiteMap]] = defaultdict(list)
        for sm in maps.values():
            self.by_module[sm.site.module].append(sm)

    def __bool__(self) -> bool:
        return bool(self.maps)

    @property
    def sites(self) -> list[Site]:
        return [sm.site for sm in self.maps.values()]

    @staticmethod
    def compile(interventions: Sequence[Intervention], what: str = "steering") -> SteeringPlan:
        """Compose ``[(steering, strength), ...]`` (strength: a float or per-block multipliers) site by site."""
        acc: dict[str, tuple[Site, torch.Tensor, torch.Tensor]] = {}
        tokens: dict[str, tuple[str, int]] = {}
        for steering, spec in interventions:
            parts = steering.split()
            family = steering.meta.get("family", "generic")
            for site in steering.sites:
                lam = strength_for(spec, site)  # a float, or one per image of the batch
                lams = list(lam) if isinstance(lam, (tuple, list)) else [lam]
                if not all(math.isfinite(x) for x in lams):
                    raise HyperTransportError(f"{what}: the strength of site {site.name!r} is {lam}. Fix: use a finite strength.")
                if all(x == 0 for x in lams):
                    continue
                w, b = parts[site.name]
                if len(lams) > 1 and w.ndim != 1:
                    raise HyperTransportError(f"{what}: one strength per image needs a single concept's steering, not a batch.")
                a, c = effective_affine(w.float(), b.float(), torch.tensor(lams) if len(lams) > 1 else lams[0])
                if site.name in acc:
                    _, a0, c0 = acc[site.name]
                    a, c = a * a0, a * c0 + c
                acc[site.name] = (site, a, c)
                tokens.setdefault(site.name, token_layout(family, site))
        for name, (_, a, c) in acc.items():
            check_map(name, a, c, what)
        return SteeringPlan({name: SiteMap(site, a, c, tokens[name]) for name, (site, a, c) in acc.items()})

    @contextlib.contextmanager
    def hooks(self, root: nn.Module, rows: RowsLike = None) -> Iterator[None]:
        """Forward hooks on the sites' modules inside ``root`` for the duration, always removed (also when
        the body raises). ``rows``: see :class:`Rows` (evaluated at every hooked call when callable)."""
        modules = modules_for(root, list(self.by_module))

        def make_hook(entries: list[SiteMap]):
            def hook(_module, _inputs, output):
                r = _resolve_rows(rows)
                region = r.region if isinstance(r, Rows) else None
                for sm in entries:
                    z = _select(output, sm.site)
                    chunks, mask = _resolve(r, z.shape[0])
                    output = _replace(output, sm.site, sm(z, chunks, mask, region))
                return output

            return hook

        with hook_handles() as handles:
            for path, entries in self.by_module.items():
                handles.append(modules[path].register_forward_hook(make_hook(entries)))
            yield

    def split_foldable(self, root: nn.Module) -> tuple[dict[str, SiteMap], SteeringPlan]:
        """``({module path: map}, rest)``: the maps that :func:`foldable` allows to write into their module's
        weights (single maps only, not ``(K, C)``), and a plan of the others, which stay hooks."""
        fold, rest = {}, {}
        for name, sm in self.maps.items():
            try:
                module = root.get_submodule(sm.site.module)
            except AttributeError:
                module = None
            if sm.a.ndim == 1 and foldable(sm.site, module) and sm.site.module not in fold:
                fold[sm.site.module] = sm
            else:
                rest[name] = sm
        return fold, SteeringPlan(rest)

    @staticmethod
    def folded_weights(sm: SiteMap, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A norm's ``(γ, β)`` with ``sm`` folded in: ``(a γ, a β + c)`` (float32 math, the weights' dtype out)."""
        return fold(sm.a, None, weight), fold(sm.a, sm.c, bias)


def fold(a: torch.Tensor, c: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """The one fold formula: a norm's weight ``γ ↦ a ⊙ γ`` (``c`` None) or bias ``β ↦ a ⊙ β + c``, per output channel
    (dim 0), in float32, returned in ``t``'s dtype and device."""
    a = a.to(device=t.device, dtype=torch.float32).view([-1] + [1] * (t.ndim - 1))
    out = a * t.float()
    if c is not None:
        out = out + c.to(device=t.device, dtype=torch.float32).view([-1] + [1] * (t.ndim - 1))
    return out.to(t.dtype)


def compose(maps: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` of the maps ``[(a₁, c₁), (a₂, c₂), …]`` applied in order: ``a₂(a₁ z + c₁) + c₂ = (a₂a₁) z + (a₂c₁ + c₂)``."""
    a, c = maps[0][0].float(), maps[0][1].float()
    for a2, c2 in maps[1:]:
        a, c = a2.float() * a, a2.float() * c + c2.float()
    return a, c


def check_map(name: str, a: torch.Tensor, c: torch.Tensor, what: str = "steering") -> None:
    """Refuse a composed map that is non-finite or beyond :data:`MAX_SCALE` / :data:`MAX_SHIFT` (the error names the
    site and the value); log a warning beyond :data:`WARN_SCALE` / :data:`WARN_SHIFT`."""
    for kind, t, limit, warn in (("scale a", a, MAX_SCALE, WARN_SCALE), ("shift c", c, MAX_SHIFT, WARN_SHIFT)):
        t = t.detach()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise MapOutOfRange(
                f"{what}: the map at site {name!r} has a non-finite {kind} ({int((~finite).sum())} channels). "
                "Fix: the steering or hypernet file is corrupt, or the strengths overflow; lower the strength."
            )
        big = float(t.abs().max()) if t.numel() else 0.0
        if big > limit:
            raise MapOutOfRange(
                f"{what}: the map at site {name!r} has a {kind} of magnitude {big:.3g} (more than {limit:g}): "
                "it would drown the model's activations. Fix: lower the strength or the block multipliers, "
                "or check the steering file."
            )
        if big > warn:
            log.warning("%s: the map at site %r has a %s of magnitude %.3g: expect a saturated or broken image. "
                        "Lower the strength if it looks wrong.", what, name, kind, big)


def check_folded(name: str, t: torch.Tensor, what: str = "steering") -> None:
    """Refuse folded weights that are non-finite or overflow their dtype (float16: 65504), naming the site."""
    big = float(t.detach().float().abs().max()) if t.numel() else 0.0
    limit = torch.finfo(t.dtype).max
    if not math.isfinite(big) or big >= limit:
        raise HyperTransportError(
            f"{what}: folded into {name!r}, the steering gives a {t.dtype} weight of magnitude "
            f"{big:.3g}, beyond what {t.dtype} holds ({limit:.5g}): the image would be NaN. Fix: lower the strength or "
            "the block multipliers, use fewer chained steerings, or set mode to 'hooks'."
        )
