"""How long LinEAS must fit before it stops improving: inducement and loss vs optimizer steps, per concept.

    python studies/baseline.py                                   # 16 test concepts of the shipped hypernet's split
    python studies/baseline.py --steps 480 --checkpoints 15,30,60,120,240,480 --concepts-file mine.txt

The per-concept baseline the hypernet amortizes is only an honest yardstick once it has converged. For each
concept (by default 16 of the hypernet's test concepts, the most saturated colours and the patterns first, so
the hard cases are in) this fits LinEAS with the trainer's settings (the same targets, loss, prompts per step,
sampler) for ``--steps`` steps, keeps the maps at every checkpoint, and measures each on the evaluator's seeds:
pixel inducement, and the OT loss on fixed held batches. Writes ``curve.json``, ``curve.md`` and ``curve.png``
to ``--out`` and prints the step count after which mean inducement rises by less than ``--tolerance``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from hypertransport_comfy.targets import compute_targets
from hypertransport_core import LinEASConfig, save_steering
from hypertransport_core.errors import HyperTransportError
from studies.measure import EvalSet, hard_first, held_loss, inducement_of, lineas_cache_path, open_study
from trainer.cli import command
from trainer.config import WORLD_WEIGHTS, build_parser, resolve
from trainer.train import fit_concept_lineas, read_list

log = logging.getLogger("hypertransport.baseline")


@dataclass
class CurveConfig:
    hypernet: str = ""  # whose split and training settings to use (default: runs/world, else the shipped hypernet)
    world_weights: str = WORLD_WEIGHTS  # folder with the world's models
    split: str = "test"  # concepts from the hypernet's "test" or "val" list
    n_concepts: int = 16  # how many (saturated colours and patterns first, see the module docstring)
    concepts_file: str = ""  # or exactly these concepts, one per line
    steps: int = 480  # LinEAS optimizer steps
    checkpoints: str = "15,30,60,120,240,480"  # steps at which the maps are measured
    lr: float = 1e-2  # LinEAS learning rate (the evaluator's)
    seeds_per_shape: int = 4  # evaluation images per shape (3 shapes)
    tolerance: float = 0.01  # "stops rising": mean inducement gains less than this up to the last checkpoint
    out: str = "reports/lineas_curve"
    lineas_cache: str = "runs/lineas_cache"  # the full-length fit is kept here for the evaluator ("" = not kept)
    threads: int = 0  # torch CPU threads (0: default)
    precision: str = "fp32"

    def checkpoint_list(self) -> list[int]:
        try:
            got = sorted({int(x) for x in self.checkpoints.split(",") if x.strip()})
        except ValueError:
            raise HyperTransportError(f"--checkpoints {self.checkpoints!r}: give comma-separated step counts, e.g. 30,60,120") from None
        if not got or got[0] < 1 or got[-1] > self.steps:
            raise HyperTransportError(f"--checkpoints {self.checkpoints!r}: every step must be in 1..--steps ({self.steps}).")
        return got


def converged_at(steps: list[int], mean_ind: list[float], tol: float) -> int:
    """The first checkpoint after which mean inducement never gains ``tol`` or more again."""
    for i, s in enumerate(steps):
        if max(mean_ind[i:]) - mean_ind[i] < tol:
            return s
    return steps[-1]


def _fit_with_checkpoints(backend, concept, targets, tcfg, cfg: CurveConfig, checkpoints):
    """``(maps at each checkpoint, training losses, the final fit)``."""
    kept, losses = {}, []

    def keep(done, st):
        if done in checkpoints:
            kept[done] = st

    final = fit_concept_lineas(backend, concept, targets, tcfg, LinEASConfig(steps=cfg.steps, lr=cfg.lr),
                               callback=lambda step, loss: losses.append(loss), snapshot=keep)
    return kept, losses, final


def run_curve(cfg: CurveConfig, backend=None) -> dict:
    hn, tcfg, backend = open_study(cfg, backend)
    if cfg.concepts_file:
        concepts = read_list(cfg.concepts_file)
    else:
        key = {"test": "holdout_concepts", "val": "val_concepts"}[cfg.split]
        concepts = hard_first(list(hn.training_summary.get(key, [])), cfg.n_concepts)
    checkpoints = cfg.checkpoint_list()
    es = EvalSet.default(cfg.seeds_per_shape)
    out: dict = {"config": cfg.__dict__, "checkpoints": checkpoints, "concepts": {}}
    for i, concept in enumerate(concepts):
        t0 = time.perf_counter()
        tgt = compute_targets(backend, [concept], tcfg, progress=False)
        row = {k: v[0] for k, v in tgt.items()}
        t_targets = time.perf_counter() - t0
        kept, losses, final = _fit_with_checkpoints(backend, concept, row, tcfg, cfg, checkpoints)
        fit_s = time.perf_counter() - t0
        if cfg.lineas_cache:  # the same fit the evaluator would make with --lineas-steps cfg.steps
            final.meta["target_seconds"] = t_targets
            path = lineas_cache_path(backend, tcfg, concept, cfg.steps, cfg.lr, cfg.lineas_cache)
            os.makedirs(cfg.lineas_cache, exist_ok=True)
            save_steering(path, final)
        ind = [inducement_of(backend, es, [(kept[s], 1.0)], [concept])[concept] for s in checkpoints]
        held = [held_loss(backend, tcfg, concept, row, kept[s]) for s in checkpoints]
        out["concepts"][concept] = {"inducement": ind, "held_loss": held, "train_loss": losses, "fit_seconds": fit_s,
                                    "kind": backend.concept_info(concept).kind}
        log.info("[%d/%d] %s: inducement %s | held loss %s (%.0f s)", i + 1, len(concepts), concept,
                 " ".join(f"{x:.3f}" for x in ind), " ".join(f"{x:.4f}" for x in held), time.perf_counter() - t0)
    cs = out["concepts"]
    out["mean_inducement"] = [float(np.mean([cs[c]["inducement"][j] for c in cs])) for j in range(len(checkpoints))]
    out["mean_held_loss"] = [float(np.mean([cs[c]["held_loss"][j] for c in cs])) for j in range(len(checkpoints))]
    out["converged_at"] = converged_at(checkpoints, out["mean_inducement"], cfg.tolerance)
    out["seconds_per_step"] = float(np.mean([cs[c]["fit_seconds"] for c in cs])) / cfg.steps
    write(out, cfg)
    return out


def write(out: dict, cfg: CurveConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "curve.json"), "w") as f:
        json.dump(out, f, indent=1)
    steps, cs = out["checkpoints"], out["concepts"]
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.4))
    for e in cs.values():
        axs[0].plot(steps, e["inducement"], color="C1" if e["kind"] == "pattern" else "0.75", lw=0.8)
        axs[1].plot(steps, e["held_loss"], color="C1" if e["kind"] == "pattern" else "0.75", lw=0.8)
    axs[0].plot(steps, out["mean_inducement"], color="C0", lw=2.5, label="mean")
    axs[1].plot(steps, out["mean_held_loss"], color="C0", lw=2.5, label="mean")
    axs[0].axvline(out["converged_at"], color="k", lw=0.6, ls="--")
    for a, t in zip(axs, ("pixel inducement at λ = 1", "OT loss on held batches")):
        a.set_xscale("log"), a.set_xlabel("LinEAS steps"), a.set_title(t, fontsize=9), a.legend(fontsize=8)
        a.set_xticks(steps, [str(x) for x in steps]), a.minorticks_off()
    fig.suptitle(f"LinEAS per concept ({len(cs)} concepts; orange: patterns); rises < {cfg.tolerance:g} after "
                 f"{out['converged_at']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "curve.png"), dpi=110)
    plt.close(fig)
    lines = ["| steps | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|",
             "| mean inducement | " + " | ".join(f"{x:.3f}" for x in out["mean_inducement"]) + " |",
             "| mean held loss | " + " | ".join(f"{x:.4f}" for x in out["mean_held_loss"]) + " |"]
    lines += [f"| {c} ({e['kind']}) | " + " | ".join(f"{x:.3f}" for x in e["inducement"]) + " |" for c, e in cs.items()]
    lines += ["", f"Converged (mean inducement gains < {cfg.tolerance:g} afterwards) at **{out['converged_at']} steps**; "
              f"one LinEAS step costs {out['seconds_per_step']:.2f} s here, so a converged fit "
              f"{out['converged_at'] * out['seconds_per_step']:.0f} s per concept (plus its target pass)."]
    with open(os.path.join(cfg.out, "curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


@command
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = resolve(CurveConfig, build_parser(CurveConfig, __doc__.split("\n\n")[0]).parse_args(argv))
    cfg.checkpoint_list()
    out = run_curve(cfg)
    print(f"mean inducement per checkpoint {dict(zip(out['checkpoints'], [round(x, 3) for x in out['mean_inducement']]))}; "
          f"converged at {out['converged_at']} steps; {os.path.join(cfg.out, 'curve.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
