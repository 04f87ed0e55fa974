"""How a steering reaches a ComfyUI model: through the ModelPatcher of a clone, never the shared model.

Two mechanisms, both undone by ComfyUI itself:

* **hooks** — an ``APPLY_MODEL`` wrapper (:class:`SteeringWrapper`, key ``"hypertransport"``) that
  registers forward hooks on the sites around each model call whose sigma lies inside the start/end
  range. The hooks live only for that call (removed also when sampling raises). Works for every model
  family, because every family goes through ``BaseModel.apply_model``. By default the hooks are
  :func:`steer_prepared`'s: the arithmetic of :func:`hypertransport_core.hooks.steer`, with each
  site's ``(a, c)`` computed once per device/dtype instead of at every call (``engine="core"`` uses
  the core's ``steer`` itself; the tests check both give the same images).
* **folded** — for sites whose map is applied at every position of a norm's output and whose norm
  has affine weights, the map is written into the norm's ``weight``/``bias`` as weight patches
  (:class:`FoldedMap`, through ``ModelPatcher.add_patches``), like a LoRA: free at sampling time,
  restored by ComfyUI when another model is loaded. Patches are *relative* (``a ⊙ γ'``,
  ``a ⊙ β' + c`` of the weight as earlier patches left it), so they compose with LoRAs and with
  each other, and do not depend on what another clone left in the shared weights.

Stacking: steerings compose in node order, except that a folded map acts inside its norm, i.e.
before any hooked map on the same site, whatever the order of the nodes (the maps' scales commute;
their shifts do not, exactly).

Default rows: every batch row is steered (cond and uncond alike), as a LoRA changes the model for
both; ``rows="cond"``/``"uncond"`` restrict it using ``transformer_options["cond_or_uncond"]``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

import torch

from hypertransport_core.errors import HyperTransportError
from hypertransport_core.hooks import steer
from hypertransport_core.interventions import Steering, StrengthSpec, effective_affine, strength_for
from hypertransport_core.sites import Site

WRAPPER_KEY = "hypertransport"
ROWS = ("all", "cond", "uncond")
MODES = ("auto", "hooks", "folded")

Intervention = tuple[Steering, StrengthSpec]


def _wrappers_mp():
    import comfy.patcher_extension as pe

    return pe.WrappersMP.APPLY_MODEL


def check_strength(strength: float, what: str = "strength") -> float:
    s = float(strength)
    if not math.isfinite(s):
        raise HyperTransportError(f"{what} is {s}. Fix: set a finite number on the Apply Steering node (e.g. 1.0).")
    return s


def check_range(start_percent: float, end_percent: float) -> tuple[float, float]:
    start, end = float(start_percent), float(end_percent)
    if not (math.isfinite(start) and math.isfinite(end)) or not 0.0 <= start <= end <= 1.0:
        raise HyperTransportError(
            f"step range start_percent={start}, end_percent={end}: expected 0 <= start <= end <= 1. "
            "Fix: set start_percent below end_percent on the Apply Steering node."
        )
    return start, end


def row_mask_for(transformer_options: Mapping, batch: int, rows: str) -> torch.Tensor | None:
    """``(B,)`` bool mask of the rows to steer, from ``cond_or_uncond`` (0 = cond, 1 = uncond)."""
    if rows == "all":
        return None
    cou = transformer_options.get("cond_or_uncond")
    if not cou or batch % len(cou):
        return None  # unknown layout: behave like a LoRA (steer all)
    want = 0 if rows == "cond" else 1
    flags = torch.tensor([c == want for c in cou], dtype=torch.bool)
    return flags.repeat_interleave(batch // len(cou))


class SiteMap:
    """One site's ``a ⊙ z + c`` in one device/dtype, with its broadcast views cached per activation rank."""

    __slots__ = ("site", "a", "c", "pooled", "_views")

    def __init__(self, site: Site, a: torch.Tensor, c: torch.Tensor):
        self.site, self.a, self.c = site, a, c
        self.pooled = site.form == "pooled"
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}

    def views(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(a or a − 1, c, pooled)`` shaped to broadcast against a rank-``ndim`` activation."""
        v = self._views.get(ndim)
        if v is None:
            cd = self.site.channel_dim
            pooled = self.pooled and cd in (1, 1 - ndim) and ndim > 2  # spatial mean, as apply_map does
            a = self.a - 1 if pooled else self.a
            if cd in (-1, ndim - 1):
                v = (a, self.c, pooled)
            else:
                shape = [1] * ndim
                shape[cd] = -1
                v = (a.view(shape), self.c.view(shape), pooled)
            self._views[ndim] = v
        return v


class PreparedMaps:
    """The maps of some interventions as ready-to-use per-site ``(a, c)`` (``a ⊙ z + c``) in one
    device/dtype, grouped by module. Same arithmetic as :func:`hypertransport_core.apply_map`
    (maps composed in list order; pooled spatial sites map the spatial mean), but computed once
    per sampling run instead of at every call: the per-step cost is one fused kernel per site
    (two for pooled sites: the mean, then the shift)."""

    def __init__(self, interventions: Sequence[Intervention], device: torch.device, dtype: torch.dtype):
        self.by_module: dict[str, list[SiteMap]] = defaultdict(list)
        for steering, spec in interventions:
            parts = steering.split()
            for site in steering.sites:
                lam = check_strength(strength_for(spec, site), f"strength of site {site.name!r}")
                if lam == 0:
                    continue
                w, b = parts[site.name]
                a, c = effective_affine(w.float(), b.float(), lam)
                self.by_module[site.module].append(
                    SiteMap(site, a.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype))
                )


def _apply(z: torch.Tensor, sm: SiteMap, mask: torch.Tensor | None) -> torch.Tensor:
    if sm.a.dtype != z.dtype or sm.a.device != z.device:  # a block computing in another precision/device
        sm = SiteMap(sm.site, sm.a.to(device=z.device, dtype=z.dtype), sm.c.to(device=z.device, dtype=z.dtype))
    a, c, pooled = sm.views(z.ndim)
    if pooled:  # a holds a − 1 here
        out = z + torch.addcmul(c, a, z.mean(dim=tuple(range(2, z.ndim)), keepdim=True))
    else:
        out = torch.addcmul(c, z, a)
    if mask is not None:
        out = torch.where(mask.to(z.device).view([-1] + [1] * (z.ndim - 1)), out, z)
    return out


@contextlib.contextmanager
def steer_prepared(root: torch.nn.Module, maps: PreparedMaps, row_mask: torch.Tensor | None = None) -> Iterator[None]:
    """Like :func:`hypertransport_core.hooks.steer` for :class:`PreparedMaps`: forward hooks on the sites'
    modules for the duration, always removed (also when the body raises)."""
    modules = {}
    for path in maps.by_module:  # by path, not named_modules(): a few getattr per site, every call
        try:
            modules[path] = root.get_submodule(path)
        except AttributeError:
            raise HyperTransportError(
                f"the model has no module {path!r} (a site of the steering). "
                "Fix: use a hypernet/steering trained for this model family."
            ) from None

    def make_hook(entries):
        def hook(_module, _inputs, output):
            for sm in entries:
                i = sm.site.output_index
                if i is None:
                    output = _apply(output, sm, row_mask)
                else:
                    items = list(output)
                    items[i] = _apply(items[i], sm, row_mask)
                    output = type(output)(items) if isinstance(output, tuple) else items
            return output

        return hook

    handles = []
    try:
        for path, entries in maps.by_module.items():
            handles.append(modules[path].register_forward_hook(make_hook(entries)))
        yield
    finally:
        for h in handles:
            h.remove()


class SteeringWrapper:
    """``APPLY_MODEL`` wrapper steering ``diffusion_model`` while sigma is inside the range.

    Holds only references to the maps. ``ModelPatcher.clone()`` copies the wrapper lists shallowly;
    should a wrapper ever be deep-copied (as ``model_options`` is), ``__deepcopy__`` returns the same
    object, so the maps are never duplicated per clone.
    """

    def __init__(
        self,
        interventions: Sequence[Intervention],
        start_percent=0.0,
        end_percent=1.0,
        rows="all",
        engine: str = "prepared",
    ):
        if engine not in ("prepared", "core"):
            raise HyperTransportError(f"engine {engine!r} is not 'prepared' or 'core'.")
        self.engine = engine
        if rows not in ROWS:
            raise HyperTransportError(f"rows {rows!r} is not one of {ROWS}. Fix: pick one in the node.")
        self.interventions = tuple(interventions)
        self.start_percent, self.end_percent = check_range(start_percent, end_percent)
        self.rows = rows
        self._sigmas: dict[int, tuple[float, float]] = {}
        self._on_device: dict[tuple, tuple[Intervention, ...]] = {}
        self._prepared: dict[tuple, PreparedMaps] = {}
        self._lock = threading.Lock()
        self.calls = 0  # model calls that were steered (for tests and diagnostics)

    def __deepcopy__(self, memo):
        return self

    @property
    def full_range(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def sigma_range(self, model_sampling) -> tuple[float, float]:
        key = id(model_sampling)
        if key not in self._sigmas:
            self._sigmas[key] = (
                float(model_sampling.percent_to_sigma(self.start_percent)),
                float(model_sampling.percent_to_sigma(self.end_percent)),
            )
        return self._sigmas[key]

    def active(self, model_sampling, sigma: torch.Tensor) -> bool:
        if self.full_range:
            return True
        hi, lo = self.sigma_range(model_sampling)
        s = float(sigma.reshape(-1)[0])
        return lo <= s <= hi

    def on_device(self, device: torch.device) -> tuple[Intervention, ...]:
        """The maps moved once to the activations' device (offloaded models), kept float32."""
        key = (device.type, device.index)
        with self._lock:
            if key not in self._on_device:
                self._on_device[key] = tuple((s.to(device=device), spec) for s, spec in self.interventions)
            return self._on_device[key]

    def prepared(self, device: torch.device, dtype: torch.dtype) -> PreparedMaps:
        """Per-site ``(a, c)`` in the activations' device and dtype, computed once and kept."""
        key = (device.type, device.index, dtype)
        with self._lock:
            if key not in self._prepared:
                self._prepared[key] = PreparedMaps(self.interventions, device, dtype)
            return self._prepared[key]

    def __call__(self, executor, x, t, *args, **kwargs):
        base = executor.class_obj
        if not self.interventions or not self.active(base.model_sampling, t):
            return executor(x, t, *args, **kwargs)
        topts = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        mask = row_mask_for(topts or {}, x.shape[0], self.rows)
        self.calls += 1
        if self.engine == "core":
            with steer(base.diffusion_model, self.on_device(x.device), row_mask=mask):
                return executor(x, t, *args, **kwargs)
        dtype = base.manual_cast_dtype or base.get_dtype()
        with steer_prepared(base.diffusion_model, self.prepared(x.device, dtype), row_mask=mask):
            return executor(x, t, *args, **kwargs)


def _foldable(site: Site, module: torch.nn.Module | None) -> bool:
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


def _weight_adapter_base():
    from comfy.weight_adapter.base import WeightAdapterBase

    return WeightAdapterBase


def make_folded_map(scale: torch.Tensor, shift: torch.Tensor | None):
    """A weight patch ``W ↦ scale ⊙ W (+ shift)`` applied to the weight as earlier patches left it."""

    class FoldedMap(_weight_adapter_base()):
        name = "hypertransport_fold"

        def __init__(self):
            self.loaded_keys = set()
            self.weights = [scale] if shift is None else [scale, shift]

        def calculate_weight(
            self,
            weight,
            key,
            strength,
            strength_model,
            offset,
            function,
            intermediate_dtype=torch.float32,
            original_weights=None,
        ):
            a = scale.to(device=weight.device, dtype=weight.dtype)
            out = weight * a.view([-1] + [1] * (weight.ndim - 1))
            if shift is not None:
                out = out + shift.to(device=weight.device, dtype=weight.dtype)
            return out

    return FoldedMap()


def restrict(steering: Steering, names: Sequence[str]) -> Steering:
    """The part of ``steering`` on the named sites (same order as in ``steering``)."""
    wanted = set(names)
    sites = [s for s in steering.sites if s.name in wanted]
    parts = [steering.params(s.name) for s in sites]
    return Steering(tuple(sites), torch.cat([w for w, _ in parts]), torch.cat([b for _, b in parts]), steering.meta)


def fold_plan(diffusion_model: torch.nn.Module, interventions: Sequence[Intervention]):
    """Split into weight patches (``{"diffusion_model.<module>.weight": FoldedMap, ...}``) and the
    interventions that must stay hooks (same strengths, restricted to unfoldable sites)."""
    modules = dict(diffusion_model.named_modules())
    acc: dict[str, tuple[Site, torch.Tensor, torch.Tensor]] = {}
    hooked: list[Intervention] = []
    for steering, spec in interventions:
        keep: dict[str, float] = {}
        for site in steering.sites:
            lam = check_strength(strength_for(spec, site), f"strength of site {site.name!r}")
            if lam == 0:
                continue
            if not _foldable(site, modules.get(site.module)):
                keep[site.name] = lam
                continue
            w, b = steering.params(site.name)
            a, c = effective_affine(w.float(), b.float(), lam)
            if site.name in acc:  # compose with an earlier intervention: a2(a1 z + c1) + c2
                _, a0, c0 = acc[site.name]
                a, c = a * a0, a * c0 + c
            acc[site.name] = (site, a, c)
        if keep:
            hooked.append((restrict(steering, list(keep)), keep))
    patches = {}
    for site, a, c in acc.values():
        patches[f"diffusion_model.{site.module}.weight"] = make_folded_map(a, None)
        patches[f"diffusion_model.{site.module}.bias"] = make_folded_map(a, c)
    return patches, hooked


def attach(
    model, interventions: Sequence[Intervention], *, start_percent=0.0, end_percent=1.0, rows="all", mode="auto"
):
    """A clone of ``model`` (a ComfyUI ``ModelPatcher``) steered by ``interventions``.

    ``mode``: ``"hooks"``; ``"folded"`` (needs the full step range and all rows); ``"auto"`` folds
    when that is possible and hooks otherwise. Returns the clone.
    """
    if mode not in MODES:
        raise HyperTransportError(f"mode {mode!r} is not one of {MODES}. Fix: pick one in the node.")
    start, end = check_range(start_percent, end_percent)
    full = start <= 0.0 and end >= 1.0
    if mode == "folded" and (not full or rows != "all"):
        raise HyperTransportError(
            f"folded mode writes the maps into the model's weights, so it acts on every step and row; "
            f"found start_percent={start}, end_percent={end}, rows={rows!r}. "
            "Fix: set mode to 'hooks' (or 'auto'), or use start 0, end 1 and rows 'all'."
        )
    m = model.clone()
    hooked = list(interventions)
    if mode == "folded" or (mode == "auto" and full and rows == "all"):
        patches, hooked = fold_plan(m.get_model_object("diffusion_model"), interventions)
        if patches:
            added = m.add_patches(patches, 1.0, 1.0)
            if len(added) != len(patches):
                missing = sorted(set(patches) - set(added))[:3]
                raise HyperTransportError(
                    f"the model has no weights {missing} to fold the steering into. "
                    "Fix: set mode to 'hooks' on Apply Steering (Advanced)."
                )
    if hooked:
        m.add_wrapper_with_key(_wrappers_mp(), WRAPPER_KEY, SteeringWrapper(hooked, start, end, rows))
    return m


def wrappers_of(model) -> list[SteeringWrapper]:
    """The HyperTransport wrappers on a ModelPatcher (for tests and diagnostics)."""
    return [w for w in model.get_wrappers(_wrappers_mp(), WRAPPER_KEY) if isinstance(w, SteeringWrapper)]
