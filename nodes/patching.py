"""How a steering reaches a ComfyUI model: through the ModelPatcher of a clone, never the shared model.

The arithmetic is the core's (:class:`hypertransport_core.engine.SteeringPlan`: strengths resolved, maps
composed, checked and cast once); this module is the ComfyUI glue around it:

* **hooks** — an ``APPLY_MODEL`` wrapper (:class:`SteeringWrapper`, key ``"hypertransport"``) that puts the
  plan's forward hooks on ``diffusion_model`` around each model call whose sigma lies inside the
  start/end range, with the call's cond/uncond layout (``transformer_options["cond_or_uncond"]``). The
  hooks live only for that call (removed also when sampling raises). Works for every model family,
  because every family goes through ``BaseModel.apply_model``. A call whose output is NaN/Inf raises
  with the steering named, instead of letting a black image pass as a result.
* **folded** — maps that the plan can fold (:meth:`SteeringPlan.split_foldable`: applied at every
  position of a norm's output, the norm with affine weights) are written into the norm's
  ``weight``/``bias`` as weight patches (:func:`make_folded_map`, through ``ModelPatcher.add_patches``),
  like a LoRA: free at sampling time, restored by ComfyUI when another model is loaded. Patches are
  *relative* (``a ⊙ γ'``, ``a ⊙ β' + c`` of the weight as earlier patches left it), so they compose with
  LoRAs and with each other, and do not depend on what another clone left in the shared weights.

Stacking: steerings compose in node order, except that a folded map acts inside its norm, i.e. before
any hooked map on the same site, whatever the order of the nodes (the maps' scales commute; their
shifts do not, exactly).

Default rows: every batch row is steered (cond and uncond alike), as a LoRA changes the model for both;
``rows="cond"``/``"uncond"`` restrict it.

Hooks also carry what cannot be a weight: a step range, a *ramp* (the strength eased in or out over the
steered steps), one strength per image of the batch, and a region (a MASK: outside it, every site's output
is the unsteered one).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence

import torch

from hypertransport_core.engine import Intervention, Rows, SiteMap, SteeringPlan, check_folded, check_map, compose, fold
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.lru import LRU

WRAPPER_KEY = "hypertransport"
ROWS = ("all", "cond", "uncond")
MODES = ("auto", "hooks", "folded")
RAMPS = ("constant", "ease in", "ease out")
#: the strength range the nodes accept (and their tooltips state)
STRENGTH_RANGE = (-10.0, 10.0)
#: compiled plans a wrapper keeps for ramp factors other than 1 (least recently used dropped): a ramp has one factor
#: per steered step, and a plan holds a copy of every map (one per image with batch strengths)
RAMP_PLANS = 4


def _wrappers_mp():
    import comfy.patcher_extension as pe

    return pe.WrappersMP.APPLY_MODEL


#: beyond this |strength| the maps extrapolate far past what they were fitted for (the embedded world's images turn to
#: noise past about ±2); a node still runs up to STRENGTH_RANGE but says so in the UI
SOFT_STRENGTH = 2.0
#: a composed map that scales a channel by more than this (or flips it harder than its negative) is reported
SOFT_SCALE = 6.0


def extreme_warning(steerings) -> str | None:
    """A warning for the UI when ``[(Steering, strength), ...]`` is beyond what its maps were fitted for: a strength
    past :data:`SOFT_STRENGTH`, or a composed per-channel scale past :data:`SOFT_SCALE`; None when all is ordinary."""
    from hypertransport_core.interventions import effective_affine

    far = [lam for _, lam in steerings if abs(float(lam)) > SOFT_STRENGTH]
    if far:
        return (f"strength {far[0]:g} is past ±{SOFT_STRENGTH:g}: the maps extrapolate far beyond what they were fitted for "
                "and images may turn to noise. Fix: use a strength between -2 and 2 (1 is the full learned map).")
    scale = 0.0
    for st, lam in steerings:
        a, _ = effective_affine(st.w.float(), st.b.float(), float(lam))
        scale = max(scale, float(a.abs().max()))
    if scale > SOFT_SCALE:
        return (f"the composed maps scale some channels by {scale:.1f}x (more than {SOFT_SCALE:g}x): images may break up. "
                "Fix: lower the strength, or steer with fewer concepts at once.")
    return None


def check_strength(strength: float, what: str = "strength") -> float:
    """A finite strength within :data:`STRENGTH_RANGE`, else an error naming the value and the fix."""
    s = float(strength)
    lo, hi = STRENGTH_RANGE
    if not math.isfinite(s) or not lo <= s <= hi:
        raise HyperTransportError(f"{what} is {s}; it must be a number from {lo:g} to {hi:g}. Fix: set e.g. 1.0 on the node.")
    return s


def check_range(start_percent: float, end_percent: float) -> tuple[float, float]:
    start, end = float(start_percent), float(end_percent)
    if not (math.isfinite(start) and math.isfinite(end)) or not 0.0 <= start <= end <= 1.0:
        raise HyperTransportError(
            f"step range start_percent={start}, end_percent={end}: expected 0 <= start <= end <= 1. "
            "Fix: set start_percent below end_percent on the Apply Steering node."
        )
    return start, end


def rows_for(transformer_options: Mapping, rows: str) -> Rows:
    """The row layout of a model call (its ``cond_or_uncond``: 0 = cond, 1 = uncond) and the rows to steer."""
    cou = list(transformer_options.get("cond_or_uncond") or [0])
    if rows == "all":
        return Rows(chunks=len(cou))
    want = 0 if rows == "cond" else 1
    return Rows(chunks=len(cou), keep=tuple(c == want for c in cou))


def scale_spec(spec, g: float):
    """A strength spec (float, one per image, or per block of either) times ``g``."""
    if isinstance(spec, Mapping):
        return {k: scale_spec(v, g) for k, v in spec.items()}
    if isinstance(spec, (tuple, list)):
        return tuple(float(x) * g for x in spec)
    return float(spec) * g


def ramp_factor(ramp: str, step: int, n: int) -> float:
    """The strength factor of the ``step``-th of ``n`` steered steps: 1 (constant), rising linearly from 0 to 1
    (ease in) or falling from 1 to 0 (ease out)."""
    if ramp == "constant" or n <= 1:
        return 1.0
    p = step / (n - 1)
    return p if ramp == "ease in" else 1.0 - p


class SteeringWrapper:
    """``APPLY_MODEL`` wrapper steering ``diffusion_model`` while sigma is inside the range.

    Holds the interventions and their compiled plans (one per ramp factor). ``ModelPatcher.clone()`` copies
    the wrapper lists shallowly; should a wrapper ever be deep-copied (as ``model_options`` is),
    ``__deepcopy__`` returns the same object, so the maps are never duplicated per clone.

    Args:
        interventions: ``[(steering, strength spec), ...]`` at full strength.
        rows: "all", "cond" or "uncond".
        ramp: one of :data:`RAMPS`.
        per_image: the number of images the strengths are given for (one strength per image), or ``None``.
        region: a ComfyUI MASK ``(1 or B, H, W)`` (image resolution) or ``None``.
        plan: the compiled plan at full strength, when the caller has it (e.g. the part of the interventions
            that stays hooks next to folded weights); compiled from ``interventions`` otherwise.
    """

    def __init__(self, interventions, start_percent=0.0, end_percent=1.0, rows="all", label: str = "steering",
                 ramp: str = "constant", per_image: int | None = None, region: torch.Tensor | None = None,
                 plan: SteeringPlan | None = None):
        if rows not in ROWS:
            raise HyperTransportError(f"rows {rows!r} is not one of {ROWS}. Fix: pick one in the node.")
        if ramp not in RAMPS:
            raise HyperTransportError(f"ramp {ramp!r} is not one of {RAMPS}. Fix: pick one in the node.")
        self.interventions, self.rows, self.label, self.ramp = list(interventions), rows, label, ramp
        self.per_image, self.region = per_image, region
        self.start_percent, self.end_percent = float(start_percent), float(end_percent)
        self._full = plan if plan is not None else SteeringPlan.compile(self.interventions, what=label)
        self._plans: LRU[SteeringPlan] = LRU(RAMP_PLANS)
        self._sigmas: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self.calls = 0  # model calls that were steered (for tests and diagnostics)
        self.factors: list[float] = []  # the ramp factor of each steered call (for tests and diagnostics)

    def __deepcopy__(self, memo):
        return self

    @property
    def plan(self) -> SteeringPlan:
        return self._full

    def plan_for(self, g: float) -> SteeringPlan:
        """The plan at ramp factor ``g`` (the full plan at 1; others compiled and kept in a bounded LRU)."""
        g = round(g, 6)
        if g == 1.0:
            return self._full
        with self._lock:
            hit = self._plans.get(g)
            if hit is None:
                hit = self._plans.put(g, SteeringPlan.compile([(st, scale_spec(sp, g)) for st, sp in self.interventions],
                                                              what=self.label))
            return hit

    @property
    def full_range(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def sigma_range(self, model_sampling) -> tuple[float, float]:
        key = id(model_sampling)
        if key not in self._sigmas:
            self._sigmas[key] = (float(model_sampling.percent_to_sigma(self.start_percent)),
                                 float(model_sampling.percent_to_sigma(self.end_percent)))
        return self._sigmas[key]

    def active(self, model_sampling, sigma: torch.Tensor) -> bool:
        if self.full_range:
            return True
        hi, lo = self.sigma_range(model_sampling)
        s = float(sigma.reshape(-1)[0])
        return lo <= s <= hi

    def factor(self, model_sampling, sigma: torch.Tensor, topts: Mapping) -> float:
        """The ramp factor of this call: its place among the schedule's steps inside the range."""
        if self.ramp == "constant":
            return 1.0
        sched = topts.get("sample_sigmas")
        if sched is None:
            return 1.0
        steps = [float(x) for x in sched[:-1]]
        inside = [x for x in steps if self.full_range or (self.sigma_range(model_sampling)[1] <= x <= self.sigma_range(model_sampling)[0])]
        s = float(sigma.reshape(-1)[0])
        i = min(range(len(inside)), key=lambda j: abs(inside[j] - s)) if inside else 0
        return ramp_factor(self.ramp, i, len(inside))

    def __call__(self, executor, x, t, *args, **kwargs):
        base = executor.class_obj
        if not self.plan or not self.active(base.model_sampling, t):
            return executor(x, t, *args, **kwargs)
        topts = (args[3] if len(args) > 3 else kwargs.get("transformer_options", {})) or {}
        rows = rows_for(topts, self.rows)
        if self.per_image is not None:
            check_batch(self.label, self.per_image, x.shape[0] // rows.chunks if x.shape[0] % rows.chunks == 0 else -1)
        if self.region is not None:
            region = self.region.to(x.device, torch.float32)[:, None]
            rows = Rows(rows.chunks, rows.keep, torch.nn.functional.interpolate(region, size=x.shape[-2:], mode="area"))
        g = self.factor(base.model_sampling, t, topts)
        self.calls += 1
        self.factors.append(g)
        plan = self.plan_for(g)
        with plan.hooks(base.diffusion_model, rows):
            out = executor(x, t, *args, **kwargs)
        return check_output(out, t, self.label)


def check_output(out, t: torch.Tensor, label: str):
    """``out`` when finite, else an error naming the steering (a NaN/Inf model output would be a black image)."""
    if torch.is_tensor(out) and not bool(torch.isfinite(out).all()):
        raise HyperTransportError(
            f"the model steered by {label} produced NaN/Inf at sigma {float(t.reshape(-1)[0]):.4g}: the image "
            "would be black or noise. Fix: lower the strength (or the block multipliers), or check the steering file."
        )
    return out


class FoldedOutputCheck:
    """``APPLY_MODEL`` wrapper of a model with folded maps: checks every output is finite (hooks check theirs)."""

    def __init__(self, label: str):
        self.label = label

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, *args, **kwargs):
        return check_output(executor(x, t, *args, **kwargs), t, self.label)


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
            self.scale, self.shift = scale, shift

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weights=None):
            return fold(scale, shift, weight)

    return FoldedMap()


def _patches(maps: dict[str, SiteMap]) -> dict:
    patches = {}
    for path, sm in maps.items():
        patches[f"diffusion_model.{path}.weight"] = make_folded_map(sm.a, None)
        patches[f"diffusion_model.{path}.bias"] = make_folded_map(sm.a, sm.c)
    return patches


def _original(model, key: str) -> torch.Tensor:
    """The weight ``key`` as loaded, before any clone's patches (ComfyUI's clones share one backup)."""
    bk = getattr(model, "backup", {}).get(key)
    if bk is not None:
        return bk.weight
    return model.get_model_object(key)


def check_folded_chain(model, maps: dict[str, SiteMap], label: str) -> None:
    """Before folding ``maps`` into ``model`` (a clone that may already hold folded maps of earlier nodes): the map
    the whole chain composes at each site stays within the engine's bounds (:func:`check_map`), and the folded
    weights fit the model's dtype (float16: 65504), else an error naming the site."""
    for path, sm in maps.items():
        key = f"diffusion_model.{path}.bias"
        chain = [(p[1].scale, p[1].shift) for p in model.patches.get(key, [])
                 if getattr(p[1], "name", "") == "hypertransport_fold" and getattr(p[1], "shift", None) is not None]
        a, c = compose([*chain, (sm.a, sm.c)])
        if chain:
            check_map(path, a, c, f"{label}, with the {len(chain)} folded steering(s) before it")
        for part, shift in (("weight", None), ("bias", c)):
            check_folded(path, fold(a, shift, _original(model, f"diffusion_model.{path}.{part}")), label)


def attach(model, interventions: Sequence[Intervention], *, start_percent=0.0, end_percent=1.0, rows="all", mode="auto",
           label: str = "steering", ramp: str = "constant", per_image: int | None = None, region: torch.Tensor | None = None):
    """A clone of ``model`` (a ComfyUI ``ModelPatcher``) steered by ``interventions``.

    ``mode``: ``"hooks"``; ``"folded"`` (needs what a weight can hold: the full step range, all rows, a constant
    strength for every image and no region); ``"auto"`` folds what it can then and hooks otherwise. Returns
    the clone.
    """
    if mode not in MODES:
        raise HyperTransportError(f"mode {mode!r} is not one of {MODES}. Fix: pick one in the node.")
    start, end = check_range(start_percent, end_percent)
    full = start <= 0.0 and end >= 1.0
    plain = full and rows == "all" and ramp == "constant" and per_image is None and region is None
    if mode == "folded" and not plain:
        raise HyperTransportError(
            f"folded mode writes the maps into the model's weights, so it acts on every step, row and image alike, "
            f"everywhere; found start_percent={start}, end_percent={end}, rows={rows!r}, ramp={ramp!r}"
            f"{', one strength per image' if per_image else ''}{', a mask' if region is not None else ''}. "
            "Fix: set mode to 'hooks' (or 'auto'), or use start 0, end 1, rows 'all', ramp 'constant', one strength, no mask."
        )
    wrapper = SteeringWrapper(interventions, start, end, rows, label, ramp, per_image, region)  # compiled and checked here
    m = model.clone()
    if mode == "folded" or (mode == "auto" and plain):
        maps, rest = wrapper.plan.split_foldable(m.get_model_object("diffusion_model"))
        check_folded_chain(m, maps, label)
        patches = _patches(maps)
        if patches:
            added = m.add_patches(patches, 1.0, 1.0)
            if len(added) != len(patches):
                missing = sorted(set(patches) - set(added))[:3]
                raise HyperTransportError(
                    f"the model has no weights {missing} to fold the steering into. "
                    "Fix: set mode to 'hooks' on Apply Steering (Advanced)."
                )
        if patches:  # folded maps act at every call: check every output, as hooks do
            m.add_wrapper_with_key(_wrappers_mp(), WRAPPER_KEY, FoldedOutputCheck(label))
        if not rest:
            return m
        wrapper = SteeringWrapper(interventions, start, end, rows, label, plan=rest)  # constant ramp: only this plan
    m.add_wrapper_with_key(_wrappers_mp(), WRAPPER_KEY, wrapper)
    if per_image is not None:
        import comfy.patcher_extension as pe

        m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, BatchCheck(per_image, label))
    return m


class BatchCheck:
    """``OUTER_SAMPLE`` wrapper: one strength per image needs as many images as strengths, checked on the latent batch
    before sampling starts (before the model is even loaded), not at the first steered step."""

    def __init__(self, per_image: int, label: str):
        self.per_image, self.label = per_image, label

    def __call__(self, executor, noise, latent_image, *args, **kwargs):
        check_batch(self.label, self.per_image, latent_image.shape[0])
        return executor(noise, latent_image, *args, **kwargs)


def check_batch(label: str, per_image: int, images: int) -> None:
    """One strength per image needs as many images as strengths (``images`` -1: the rows do not split into images)."""
    if images != per_image:
        raise HyperTransportError(
            f"{label}: {per_image} strengths for a batch of {images if images >= 0 else 'an uneven number of'} images. "
            "Fix: give one strength per image (the Empty Latent Image's batch_size), or a single strength."
        )


def wrappers_of(model) -> list[SteeringWrapper]:
    """The HyperTransport wrappers on a ModelPatcher (for tests and diagnostics)."""
    return [w for w in model.get_wrappers(_wrappers_mp(), WRAPPER_KEY) if isinstance(w, SteeringWrapper)]
