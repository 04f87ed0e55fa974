"""What every world study measures the same way: the evaluation images, pixel inducement, a held OT loss.

The evaluator (``studies/evaluate.py``), the LinEAS convergence curve (``studies/baseline.py``), composition
(``studies/compose.py``) and the split protocol (``studies/protocol.py``) all generate the same seeds of the
neutral prompt ``"a {shape}"`` and score them with the world's pixel metrics, so their figures compare.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hypertransport_core import Steering, steer
from hypertransport_core.lineas import steered_loss
from hypertransport_world import scene


@dataclass(frozen=True)
class EvalSet:
    """The evaluation images' shapes and seeds: ``seeds_per_shape`` of each world shape, seeds from 1000."""

    shapes: tuple[str, ...]
    seeds: tuple[int, ...]

    @classmethod
    def default(cls, seeds_per_shape: int = 4) -> EvalSet:
        shapes = tuple(s for s in scene.SHAPES for _ in range(seeds_per_shape))
        return cls(shapes, tuple(1000 + i for i in range(len(shapes))))

    @property
    def neutral(self) -> list[str]:
        return [scene.neutral_prompt(s) for s in self.shapes]


def open_study(cfg, backend=None):
    """``(hypernet, its training config, the world backend)`` for a study's config (its ``hypernet``,
    ``world_weights``, ``precision``, ``threads`` and, where it has one, ``device``)."""
    from hypertransport_core import load_hypernet
    from trainer.config import default_hypernet, train_config_of

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hn = load_hypernet(cfg.hypernet or default_hypernet())
    tcfg = train_config_of(hn)
    return hn, tcfg, backend or world_backend(cfg.world_weights, tcfg, cfg.precision, getattr(cfg, "device", "auto"))


def world_backend(weights: str, tcfg, precision: str = "fp32", device: str = "auto"):
    """The world through ComfyUI, sampled as the hypernet ``tcfg`` was trained (steps, guidance, map form)."""
    from hypertransport_comfy.backend import ComfyBackend
    from hypertransport_comfy.comfyui import import_comfyui

    import_comfyui(cpu=True if device == "cpu" else None)
    return ComfyBackend.world(weights, precision=precision, form=tcfg.form, steps=tcfg.sampler_steps, guidance=tcfg.guidance)


def steered_images(backend, es: EvalSet, steerings: Sequence[tuple[Steering, float]]) -> torch.Tensor:
    """The evaluation images with ``steerings`` (stacked, each at its strength) active; ``(B, H, W, 3)``."""
    if not steerings:
        return backend.images(es.neutral, list(es.seeds))
    with steer(backend.root, list(steerings)):
        return backend.images(es.neutral, list(es.seeds))


def mean_inducement(images: torch.Tensor, concept) -> float:
    """Mean pixel inducement of ``concept`` (a world concept name, or a ``{"name", "kind"}`` dict)."""
    from hypertransport_world import metrics as M

    return float(np.mean([M.inducement(im, concept) for im in images]))


def inducement_of(backend, es: EvalSet, steerings: Sequence[tuple[Steering, float]], concepts: Sequence) -> dict:
    """``{concept: mean inducement}`` of one set of evaluation images steered by ``steerings``."""
    ims = steered_images(backend, es, steerings)
    return {(c if isinstance(c, str) else c["name"]): mean_inducement(ims, c) for c in concepts}


@torch.no_grad()
def held_loss(backend, tcfg, concept: str, targets: dict[str, torch.Tensor], steering: Steering, batches: int = 2,
              n: int = 8) -> float:
    """The trainer's OT loss of ``steering`` to one concept's targets ``{site: (steps, n_target, C)}`` on fixed
    source batches (the same for every call: comparable across fits and checkpoints)."""
    device = next(backend.root.parameters()).device
    tgt = {k: list(v.to(device)) for k, v in targets.items()}
    losses = []
    for i in range(batches):
        rng = np.random.default_rng([tcfg.seed, 10**6 + i])
        prompts = backend.source_prompts(n, rng)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, n)]
        loss = steered_loss(backend.root, steering, lambda p=prompts, s=seeds: backend.run(p, s, grad=False), tgt, tcfg.loss,
                            steer_rows=backend.steer_rows, capture_rows=backend.cond_rows)
        losses.append(float(loss))
    return float(np.mean(losses))


def hard_first(concepts: list[str], n: int) -> list[str]:
    """``n`` concepts: patterns and the most saturated colours first (where a short fit falls short), then the rest.

    The LinEAS baseline, its convergence curve and the composition study all draw from this list, so they share
    fits (and the hard cases are always in)."""
    def saturation(c: str) -> float:
        rgb = np.array(scene.COLOURS[c], dtype=float)
        return float(rgb.max() - rgb.min())

    patterns = [c for c in concepts if c in scene.PATTERNS]
    colours = sorted((c for c in concepts if c in scene.COLOURS), key=saturation, reverse=True)
    k_pat = min(len(patterns), n // 3)
    picked = patterns[:k_pat] + colours[: n - k_pat]
    return picked + [c for c in concepts if c not in picked][: n - len(picked)]


def lineas_cache_path(backend, tcfg, concept: str, steps: int, lr: float, cache_dir: str) -> str:
    """Where a LinEAS fit is kept: named by everything it depends on (the world's weights and sampling, the
    hypernet's training settings and split seed, the concept, steps and learning rate)."""
    import hashlib
    import json
    import os

    from hypertransport_comfy.targets import targets_key

    ident = {"targets": targets_key(backend, [concept], tcfg), "steps": steps, "lr": lr,
             **{k: getattr(tcfg, k) for k in ("prompts_per_concept", "loss", "form")}}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{concept.replace(' ', '_')}-{steps}-{key}.safetensors")


#: converged LinEAS fits shipped with the world: split 0's hardest test concepts under the trainer's defaults, so that
#: the main job measures against a converged fit within its time budget (read only; rebuilt by
#: ``python studies/evaluate.py --hypernet hypertransport_world/weights/world_hypernet.safetensors --lineas-steps 120
#: --lineas-cache hypertransport_world/weights/lineas``)
SHIPPED_FITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hypertransport_world", "weights", "lineas")


def lineas_for(backend, tcfg, concept: str, steps: int, lr: float, cache_dir: str = "",
               shipped: str = SHIPPED_FITS) -> tuple[Steering, float, float]:
    """One concept's LinEAS maps fitted as the evaluator fits them: ``(steering, fit seconds, target seconds)``.

    With ``cache_dir`` a fit is kept (see :func:`lineas_cache_path`) and reused with the times measured when it
    was fitted, so the evaluator, composition, the protocol and the convergence curve share fits. A fit of the same
    name in ``shipped`` (:data:`SHIPPED_FITS`) is used as it is: the name carries the hash of all it depends on."""
    import time

    from hypertransport_comfy.targets import compute_targets
    from hypertransport_core import LinEASConfig, load_steering, save_steering
    from trainer.train import fit_concept_lineas

    name = os.path.basename(lineas_cache_path(backend, tcfg, concept, steps, lr, "."))
    path = os.path.join(cache_dir, name) if cache_dir else ""
    found = [p for p in (path, os.path.join(shipped, name) if shipped else "") if p and os.path.isfile(p)]
    if found:
        st = load_steering(found[0])
        st.meta["loaded_from"] = found[0]  # its times are those measured when it was fitted
        fit = st.meta.get("fit", {})
        return st, float(fit.get("seconds", float("nan"))), float(st.meta.get("target_seconds", float("nan")))
    t = time.perf_counter()
    tgt = compute_targets(backend, [concept], tcfg, progress=False)
    t_targets = time.perf_counter() - t
    with torch.enable_grad():
        st = fit_concept_lineas(backend, concept, {k: v[0] for k, v in tgt.items()}, tcfg, LinEASConfig(steps=steps, lr=lr))
    st.meta["target_seconds"] = t_targets
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        save_steering(path, st)
    return st, float(st.meta["fit"]["seconds"]), t_targets
