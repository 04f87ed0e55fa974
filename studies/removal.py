"""Removing a concept (λ < 0): how far the inverse map may divide, measured on validation concepts.

    python studies/removal.py --hypernet runs/protocol/base/seed0/hypernet.safetensors --split val
    python studies/removal.py --floors 0.01,0.25,0.5 --split test --out reports/removal/test

``λ < 0`` applies the inverse map ``T⁻¹(z) = (z − b) / w`` (METHOD §2, the paper's), with ``|w|`` kept at
least a floor (ours: ``hypertransport_core.interventions.REMOVAL_FLOOR``, varied here with ``removal_floor``). A hypernet's maps hold channels with
``w`` near zero (and some with ``w < 0``); dividing by them multiplies those channels by up to ``1/floor``, which
is where removal can turn the image into noise. For each floor this steers the evaluator's seeds of every
concept at each negative strength with the hypernet's map of the concept's text and measures

- inducement (pixels) at each λ < 0 against λ = 0, and the share of concepts below λ = 0 at the most
  negative λ;
- shape kept (pixels and world CLIP) at the most negative λ: is it still the same picture;
- Spearman of inducement vs λ over the evaluator's whole sweep (the positive side does not depend on the floor).

``mirror`` is measured beside the floors as a reference, not the paper's rule: the straight line through λ = 0
and λ = 1 continued below zero (``z + λ (T(z) − z)`` with λ < 0). Writes ``removal.json``, ``removal.md`` and
``removal_grid.png`` to ``--out``.
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
from scipy.stats import spearmanr

from hypertransport_core import Steering
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.interventions import MAX_REMOVAL_FLOOR, MIN_ABS_W, removal_floor
from studies.evaluate import SPLITS, _mean, image_metrics
from studies.measure import EvalSet, mean_inducement, open_study, steered_images
from trainer.cli import command
from trainer.config import WORLD_WEIGHTS, build_parser, resolve

log = logging.getLogger("hypertransport.removal")


@dataclass
class RemovalConfig:
    hypernet: str = ""  # whose maps, split and training settings (default: runs/world, else the shipped hypernet)
    world_weights: str = WORLD_WEIGHTS  # folder with the world's models
    split: str = "val"  # concepts from the hypernet's "val" (choose on these) or "test" list
    max_concepts: int = 0  # only the first N (0 = all)
    floors: str = "0.01,0.1,0.25,0.5,1"  # smallest |w| the inverse divides by, one run each
    negative: str = "-1,-0.5"  # the negative strengths measured
    positive: str = "0.5,1,1.5"  # the rest of the evaluator's sweep (for Spearman; λ = 0 is always in)
    mirror: bool = True  # also measure the mirror rule (not the paper's; a reference)
    seeds_per_shape: int = 2  # images per shape and strength (3 shapes), as the evaluator
    grid_concepts: int = 8  # rows of removal_grid.png
    out: str = "reports/removal"
    threads: int = 0  # torch CPU threads (0: default)
    precision: str = "fp32"

    def lists(self) -> tuple[list[float], list[float], list[float]]:
        try:
            floors = [float(x) for x in self.floors.split(",") if x.strip()]
            neg = sorted(float(x) for x in self.negative.split(",") if x.strip())
            pos = sorted(float(x) for x in self.positive.split(",") if x.strip())
        except ValueError:
            raise HyperTransportError("--floors, --negative and --positive take comma-separated numbers, e.g. --floors 0.01,0.5") from None
        if not floors or not all(MIN_ABS_W <= f <= MAX_REMOVAL_FLOOR for f in floors) or len(set(floors)) < len(floors):
            raise HyperTransportError(f"--floors {self.floors!r}: distinct floors from {MIN_ABS_W:g} (the engine's lowest) to "
                             f"{MAX_REMOVAL_FLOOR:g}, e.g. 0.01,0.5,1.")
        if not neg or max(neg) >= 0 or any(x <= 0 for x in pos):
            raise HyperTransportError("--negative must be strengths below 0 and --positive above 0, e.g. --negative -1,-0.5.")
        if self.split not in ("val", "test"):
            raise HyperTransportError(f"--split {self.split!r}: use val (to choose) or test (to report).")
        return floors, neg, pos


def mirrored(st: Steering) -> Steering:
    """The map whose positive strength ``|λ|`` is ``st`` at ``λ = −|λ|`` on the straight line:
    ``1 + |λ| (w' − 1) = 1 + λ (w − 1)`` and ``|λ| b' = λ b``, i.e. ``w' = 2 − w``, ``b' = −b``."""
    return Steering(st.sites, 2 - st.w, -st.b, {**st.meta, "removal": "mirror"})


def run(cfg: RemovalConfig, backend=None) -> dict:
    floors, neg, pos = cfg.lists()
    hn, tcfg, backend = open_study(cfg, backend)
    concepts = list(hn.training_summary.get(SPLITS[cfg.split], []))
    if not concepts:
        raise HyperTransportError(f"the hypernet records no {cfg.split} concepts. Fix: pass a hypernet trained by trainer/train.py.")
    concepts = [concepts[i] for i in np.random.default_rng(0).permutation(len(concepts))]  # the evaluator's order
    if cfg.max_concepts:
        concepts = concepts[: cfg.max_concepts]
    floor_of = {f"floor {f:g}": f for f in floors}  # label → the exact floor asked for
    rules = list(floor_of) + (["mirror"] if cfg.mirror else [])
    es = EvalSet.default(cfg.seeds_per_shape)
    shapes = list(es.shapes)
    base = steered_images(backend, es, [])
    lam_all = neg + [0.0] + pos
    out: dict = {"config": cfg.__dict__, "split_seed": hn.training_summary.get("split_seed"), "strengths": lam_all,
                 "rules": rules, "concepts": {}}
    grid = []
    t0 = time.perf_counter()
    for ci, concept in enumerate(concepts):
        emb = hn.encode_text(backend.encoder, [concept])[0]
        st = hn.steering(hn.text_concept(backend.encoder, concept))
        ind0 = mean_inducement(base, concept)
        ind_pos = [mean_inducement(steered_images(backend, es, [(st, lam)]), concept) for lam in pos]
        entry = {"kind": backend.concept_info(concept).kind, "inducement_0": ind0, "inducement_pos": ind_pos, "rules": {}}
        row = []
        for rule in rules:
            ind_neg, kept = [], {}
            for lam in neg:
                if rule == "mirror":
                    ims = steered_images(backend, es, [(mirrored(st), -lam)])
                else:
                    with removal_floor(floor_of[rule]):
                        ims = steered_images(backend, es, [(st, lam)])
                ind_neg.append(mean_inducement(ims, concept))
                if lam == neg[0]:
                    m = image_metrics(backend, ims, concept, base, emb, shapes)
                    kept = {"shape_kept": _mean(m["shape_kept"]), "shape_kept_clip": _mean(m["shape_kept_clip"])}
                    row.append(ims[0])
            sweep = ind_neg + [ind0] + ind_pos
            rho = spearmanr(lam_all, sweep).statistic if np.std(sweep) > 0 else 0.0
            entry["rules"][rule] = {"inducement_neg": ind_neg, "below_0": bool(ind_neg[0] < ind0), "spearman": float(rho), **kept}
        out["concepts"][concept] = entry
        if len(grid) < cfg.grid_concepts:
            grid.append((concept, base[0], row))
        log.info("[%d/%d] %s: λ=0 %.3f | at λ=%g %s (%.0f s)", ci + 1, len(concepts), concept, ind0, neg[0],
                 " ".join(f"{r}: {entry['rules'][r]['inducement_neg'][0]:.3f}/{entry['rules'][r]['shape_kept']:.2f}" for r in rules),
                 time.perf_counter() - t0)
    cs = out["concepts"]
    out["summary"] = {r: {"below_0": float(np.mean([cs[c]["rules"][r]["below_0"] for c in cs])),
                          "spearman": _mean([cs[c]["rules"][r]["spearman"] for c in cs]),
                          "inducement_neg": [_mean([cs[c]["rules"][r]["inducement_neg"][j] for c in cs]) for j in range(len(neg))],
                          "shape_kept": _mean([cs[c]["rules"][r]["shape_kept"] for c in cs]),
                          "shape_kept_clip": _mean([cs[c]["rules"][r]["shape_kept_clip"] for c in cs])} for r in rules}
    out["inducement_0"] = _mean([cs[c]["inducement_0"] for c in cs])
    out["seconds"] = time.perf_counter() - t0
    write(out, grid, cfg, neg)
    return out


def write(out: dict, grid, cfg: RemovalConfig, neg: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "removal.json"), "w") as f:
        json.dump(out, f, indent=1)
    rules, s = out["rules"], out["summary"]
    lines = [f"Removal on {len(out['concepts'])} {cfg.split} concepts (`{cfg.hypernet or 'default hypernet'}`); "
             f"inducement at λ = 0: {out['inducement_0']:.3f}.", "",
             "| rule | " + " | ".join(f"inducement λ={x:g}" for x in neg) + f" | below λ = 0 at λ={neg[0]:g} | Spearman | "
             f"shape kept λ={neg[0]:g} (pixels) | (CLIP) |", "|---" * (len(neg) + 5) + "|"]
    lines += [f"| {r} | " + " | ".join(f"{x:.3f}" for x in s[r]["inducement_neg"]) +
              f" | {s[r]['below_0']:.2f} | {s[r]['spearman']:.3f} | {s[r]['shape_kept']:.3f} | {s[r]['shape_kept_clip']:.3f} |" for r in rules]
    lines += ["", f"{out['seconds']:.0f} s. `mirror` is a reference line, not the paper's inverse."]
    with open(os.path.join(cfg.out, "removal.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if grid:
        fig, axes = plt.subplots(len(grid), len(rules) + 1, figsize=(1.25 * (len(rules) + 1), 1.3 * len(grid)), squeeze=False)
        for r, (concept, im0, row) in enumerate(grid):
            for j, im in enumerate([im0] + row):
                ax = axes[r][j]
                ax.imshow(im.clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title("λ=0" if j == 0 else rules[j - 1], fontsize=7)
            axes[r][0].set_ylabel(concept, fontsize=7, rotation=0, ha="right", va="center")
        fig.suptitle(f"removing a concept at λ = {neg[0]:g}: the inverse map with |w| floored, and the mirror line", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out, "removal_grid.png"), dpi=110)
        plt.close(fig)


@command
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = resolve(RemovalConfig, build_parser(RemovalConfig, __doc__.split("\n\n")[0]).parse_args(argv))
    cfg.lists()
    out = run(cfg)
    best = max(out["rules"], key=lambda r: (out["summary"][r]["below_0"], out["summary"][r]["spearman"]))
    print(f"{os.path.join(cfg.out, 'removal.md')}; most often below λ = 0: {best} "
          f"({out['summary'][best]['below_0']:.2f}, Spearman {out['summary'][best]['spearman']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
