"""Fit one concept's steering on any ComfyUI model (LinEAS, METHOD §4): what the Fit Steering node runs.

The model is the connected MODEL itself (no copy of its weights), sampled as the trainer samples it
(:class:`hypertransport_comfy.backend.ComfyBackend`: ComfyUI's sampler, the family's schedule), its prompts encoded by
the connected CLIP as CLIPTextEncode does. Prompts come from lines of text: each line is a prompt, and
``{concept}`` marks where the concept goes (a line without it gets ``", {concept}"`` appended); the
neutral prompt is the line without the concept. The target activations (the concept's prompts, no
steering) are computed once; then LinEAS fits every site's map end to end, with the trainer's loss.

Weights loaded by ComfyUI's loaders are inference tensors (the executor runs under
``torch.inference_mode()``), which autograd cannot save; when the model holds any, the fit runs on a clone
whose layers copy their weights at each forward (an identity weight wrapper, as ComfyUI's own training
node does), so gradients reach the maps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hypertransport_comfy.concepts import ConceptInfo, ConceptSource
from hypertransport_comfy.targets import TargetSettings, concept_seed
from hypertransport_core import HyperTransportError, LinEASConfig, Steering, fit_lineas, weights_fingerprint
from hypertransport_core.lru import LRU

log = logging.getLogger("hypertransport.fit")

SLOT = "{concept}"
DEFAULT_PROMPTS = (
    "a photo of a house on a hill",
    "a cat sitting on a chair",
    "a city street at noon",
    "a bowl of fruit on a table",
    "a portrait of a woman",
    "a boat on a lake",
    "a forest path",
    "a bridge over a river",
)
MAX_PROMPTS = 64


@dataclass(frozen=True)
class FitSettings:
    """What a fit depends on besides the model and the concept (also its cache key)."""

    steps: int = 60  # LinEAS optimizer steps
    lr: float = 1e-2  # Adam learning rate
    seed: int = 0  # prompts, seeds and noise
    n_target: int = 24  # target prompts whose activations are matched
    prompts_per_step: int = 3  # source prompts per optimizer step
    sampler_steps: int = 0  # 0: the model's sampling settings
    cfg: float = 0.0  # 0: the model's
    resolution: int = 0  # image side in pixels; 0: the model's

    def check(self) -> None:
        for name, lo, hi in (("steps", 1, 10_000), ("n_target", 2, 512), ("prompts_per_step", 2, 64), ("sampler_steps", 0, 100),
                             ("resolution", 0, 4096)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise HyperTransportError(f"Fit Steering: {name} is {v}; it must be from {lo} to {hi}. Fix: change it on the node.")
        if not (0 < self.lr <= 1.0) or not (self.cfg == 0 or 1.0 <= self.cfg <= 30.0):
            raise HyperTransportError(f"Fit Steering: lr {self.lr} must be in (0, 1] and cfg {self.cfg} 0 (the model's) or 1..30. "
                                      "Fix: e.g. lr 0.01, cfg 0.")


def parse_prompts(text: str, concept: str) -> tuple[list[str], list[str]]:
    """``(neutral, with the concept)`` prompts from the lines of ``text`` (see the module docstring)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()] or list(DEFAULT_PROMPTS)
    if len(lines) > MAX_PROMPTS:
        raise HyperTransportError(f"Fit Steering: {len(lines)} prompt lines; at most {MAX_PROMPTS}. Fix: keep fewer lines.")
    if len(lines) < 2 and SLOT not in lines[0]:
        raise HyperTransportError("Fit Steering: give at least 2 prompts (or one with {concept}). Fix: add prompt lines.")
    neutral, target = [], []
    for ln in lines:
        if SLOT in ln:
            neutral.append(re.sub(r"\s+", " ", ln.replace(SLOT, "")).strip(" ,"))
            target.append(ln.replace(SLOT, concept))
        else:
            neutral.append(ln)
            target.append(f"{ln}, {concept}")
    return neutral, target


class PromptPairs(ConceptSource):
    """One concept and its paired prompts (a concept source for :class:`hypertransport_comfy.backend.ComfyBackend`)."""

    def __init__(self, concept: str, neutral: Sequence[str], target: Sequence[str]):
        self.concepts = [ConceptInfo(concept, "concept")]
        self.neutral, self.target = list(neutral), list(target)

    def source_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        return [self.neutral[int(i)] for i in rng.integers(0, len(self.neutral), n)]

    def target_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        return [self.target[int(i)] for i in rng.integers(0, len(self.target), n)]


def _trainable(patcher):
    """``patcher``, or a clone whose layers copy their weights at each forward when it holds inference tensors."""
    dm = patcher.model.diffusion_model
    if not any(p.is_inference() for p in dm.parameters()):
        return patcher
    m = patcher.clone()
    for name, mod in dm.named_modules():
        if not hasattr(mod, "comfy_cast_weights"):
            continue
        for kind in ("weight", "bias"):
            if isinstance(getattr(mod, kind, None), torch.Tensor):
                m.add_weight_wrapper(f"diffusion_model.{name}.{kind}", _same)
    return m


def _same(weight):
    return weight


_CACHE: LRU[Steering] = LRU(8)


def cache_key(patcher, clip, concept: str, prompts: str, settings: FitSettings) -> str:
    """The model's weights (and every patch on them, e.g. a LoRA), the text encoder's, the inputs and settings."""
    dm = patcher.model.diffusion_model
    patches = sorted((k, len(v)) for k, v in getattr(patcher, "patches", {}).items())
    ident = {"model": weights_fingerprint(dm), "patches": patches, "patches_uuid": str(getattr(patcher, "patches_uuid", "")),
             "clip": weights_fingerprint(clip.cond_stage_model), "concept": concept, "prompts": prompts, **asdict(settings)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def fit_steering(patcher, clip, concept: str, prompts: str = "", settings: FitSettings | None = None, *,
                 on_step: Callable[[int, int, float], None] | None = None, use_cache: bool = True) -> Steering:
    """One concept's LinEAS steering for the ComfyUI MODEL ``patcher`` (see the module docstring).

    ``on_step(step, steps, loss)`` runs after every step (and during the target pass); it may raise to stop
    (ComfyUI's interrupt): nothing is returned or cached then. Results are cached in memory by
    :func:`cache_key`.
    """
    settings = settings or FitSettings()
    settings.check()
    concept = (concept or "").strip()
    if not concept:
        raise HyperTransportError("Fit Steering: the concept is empty. Fix: type a concept, e.g. 'watercolor'.")
    key = cache_key(patcher, clip, concept, prompts, settings) if use_cache else None
    cached = _CACHE.get(key) if key is not None else None
    if cached is not None:
        log.info("Fit Steering: %r reused from the cache", concept)
        return cached
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        steering = _fit(patcher, clip, concept, prompts, settings, on_step)
    if key is not None:
        _CACHE.put(key, steering)
    return steering


def fit_concept_lineas(
    backend, concept: str, targets: dict[str, torch.Tensor], cfg: TargetSettings, config: LinEASConfig | None = None,
    callback=None, snapshot=None,
) -> Steering:
    """The per-concept baseline on the same backend, targets and loss: LinEAS fitting of one concept.

    Args:
        targets: ``{site: (sampler_steps, n_target, C)}`` of this concept (a row of the cache).
        callback, snapshot: see :func:`hypertransport_core.fit_lineas`.
    """
    P = cfg.prompts_per_concept
    device = next(backend.root.parameters()).device  # the cache is on the CPU; the loss runs beside the model
    tgt = {k: list(v.to(device)) for k, v in targets.items()}  # per step: (n, C)
    salt = concept_seed(cfg, concept, "lineas")

    def batch_fn(step: int):
        rng = np.random.default_rng([salt, step])
        prompts = backend.source_prompts(P, rng)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, P)]
        return (lambda: backend.run(prompts, seeds, grad=True)), tgt

    return fit_lineas(backend.root, backend.sites, batch_fn, config, label=concept, callback=callback, snapshot=snapshot,
                      steer_rows=backend.steer_rows, capture_rows=backend.cond_rows)


def _fit(patcher, clip, concept: str, prompts: str, settings: FitSettings, on_step) -> Steering:
    from hypertransport_comfy.backend import ComfyBackend
    from hypertransport_comfy.sampling import PromptEncoder
    from hypertransport_comfy.targets import compute_targets

    neutral, target = parse_prompts(prompts, concept)
    defaults = patcher.model_options.get("hypertransport_sampling", {})  # the embedded world states its own
    model = _trainable(patcher)
    backend = ComfyBackend(
        model, PromptEncoder(clip), None, PromptPairs(concept, neutral, target),
        steps=settings.sampler_steps or defaults.get("steps"), guidance=settings.cfg or defaults.get("cfg", 1.0),
        resolution=settings.resolution or defaults.get("side"), sampler=defaults.get("sampler"), scheduler=defaults.get("scheduler"),
        latent_shape=tuple(defaults["latent_shape"]) if "latent_shape" in defaults and not settings.resolution else None,
    )
    cfg = TargetSettings(seed=settings.seed, n_target=settings.n_target, prompts_per_concept=settings.prompts_per_step,
                         sampler_steps=backend.steps, guidance=backend.guidance)
    if on_step is not None:
        on_step(0, settings.steps, float("nan"))
    targets = compute_targets(backend, [concept], cfg, progress=False)
    steering = fit_concept_lineas(
        backend, concept, {k: v[0] for k, v in targets.items()}, cfg, LinEASConfig(steps=settings.steps, lr=settings.lr),
        callback=(lambda step, loss: on_step(step + 1, settings.steps, loss)) if on_step is not None else None,
    )
    steering.meta.update({"label": concept, "family": backend.family, "encoder": {},
                          "fit": {**steering.meta.get("fit", {}), "prompts": len(neutral), **asdict(settings)}})
    return steering
