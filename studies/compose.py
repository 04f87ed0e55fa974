"""Two concepts at once: how much of each survives, by the hypernet (combined or stacked) and by LinEAS stacked.

    python studies/compose.py                                   # the hypernet's test concepts
    python studies/compose.py --hypernet runs/world/hypernet.safetensors --pairs 4 --lineas-steps 240

Pairs are drawn from ``--pool`` of the hypernet's test concepts (patterns and saturated colours first): ``--pairs`` colour + pattern pairs and half as many colour +
colour pairs. For each pair (a, b), on the evaluator's seeds of ``"a {shape}"``:

- ``ht_combine``: the hypernet on the normalized sum of the two embeddings (what Combine Concepts does);
- ``ht_stacked``: the hypernet's two steerings applied one after the other (two Apply Steering nodes);
- ``lineas_stacked``: the two LinEAS fits stacked (the baseline);
- ``prompt``: both in the prompt, ``"a {a} {b} {shape}"``, for reference.

Each concept's inducement is reported, and its ratio to the same method's single-concept inducement (HT for
the HT rows, LinEAS for the LinEAS row). Two colours cannot both be fully induced: their pairs are also scored
against the colour halfway between them (``mix``). Writes ``composition.json`` and ``composition.md``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from hypertransport_core import combine_concepts
from hypertransport_world import scene
from studies.measure import EvalSet, hard_first, lineas_for, mean_inducement, open_study, steered_images
from trainer.cli import command
from trainer.config import WORLD_WEIGHTS, build_parser, resolve

log = logging.getLogger("hypertransport.compose")

METHODS = ("ht_combine", "ht_stacked", "lineas_stacked", "prompt")


@dataclass
class ComposeConfig:
    hypernet: str = ""  # default: runs/world, else the shipped hypernet
    world_weights: str = WORLD_WEIGHTS
    pairs: int = 4  # colour + pattern pairs (and pairs // 2 colour + colour pairs)
    pool: int = 8  # drawn from this many test concepts, hard first (the evaluator's LinEAS concepts: fits are shared)
    lineas_steps: int = 240  # LinEAS steps per concept (the converged count, see studies/baseline.py)
    lineas_lr: float = 1e-2
    lineas_cache: str = "runs/lineas_cache"  # LinEAS fits shared with the evaluator (see studies/measure.py)
    seeds_per_shape: int = 4
    out: str = "reports/composition"
    threads: int = 0
    precision: str = "fp32"


def choose_pairs(test: list[str], n: int, seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``n`` (colour, pattern) pairs and ``n // 2`` (colour, colour) pairs from ``test``, seeded; every concept
    in at most one pair of each kind."""
    rng = np.random.default_rng(seed)
    colours = [c for c in test if c in scene.COLOURS]
    patterns = [c for c in test if c in scene.PATTERNS and c != "plain"]
    colours = [colours[i] for i in rng.permutation(len(colours))]
    patterns = [patterns[i] for i in rng.permutation(len(patterns))]
    n_cp = min(n, len(patterns), len(colours))
    cp = list(zip(colours[:n_cp], patterns[:n_cp]))
    rest = colours[n_cp:]
    cc = [(rest[2 * i], rest[2 * i + 1]) for i in range(min(n // 2, len(rest) // 2))]
    return cp, cc


def mix_concept(a: str, b: str) -> dict:
    """The colour halfway between two colours, as a concept the pixel metrics score."""
    rgb = tuple(int(round((x + y) / 2)) for x, y in zip(scene.COLOURS[a], scene.COLOURS[b]))
    return {"name": f"{a}+{b}", "kind": "colour_rgb", "rgb": rgb}


def _score(images: torch.Tensor, concept) -> float:
    if isinstance(concept, dict) and concept.get("kind") == "colour_rgb":
        from hypertransport_world import metrics as M

        return float(np.mean([max(0.0, 1.0 - M.colour_error(im, concept["rgb"]) / 200.0) for im in images]))
    return mean_inducement(images, concept)


def compose(cfg: ComposeConfig, backend=None) -> dict:
    hn, tcfg, backend = open_study(cfg, backend)
    cp, cc = choose_pairs(hard_first(list(hn.training_summary.get("holdout_concepts", [])), cfg.pool), cfg.pairs,
                          seed=tcfg.seed)
    es = EvalSet.default(cfg.seeds_per_shape)
    enc = backend.encoder
    ht, lin, single = {}, {}, {}
    base = steered_images(backend, es, [])
    for c in {x for p in cp + cc for x in p}:
        ht[c] = hn.steering(hn.text_concept(enc, c))
        lin[c] = lineas_for(backend, tcfg, c, cfg.lineas_steps, cfg.lineas_lr, cfg.lineas_cache)[0]
        single[c] = {"none": _score(base, c), "ht": _score(steered_images(backend, es, [(ht[c], 1.0)]), c),
                     "lineas": _score(steered_images(backend, es, [(lin[c], 1.0)]), c)}
    rows = []
    for kind, pairs in (("colour+pattern", cp), ("colour+colour", cc)):
        for a, b in pairs:
            both = hn.steering(combine_concepts([(hn.text_concept(enc, a), 1.0), (hn.text_concept(enc, b), 1.0)]))
            ims = {
                "ht_combine": steered_images(backend, es, [(both, 1.0)]),
                "ht_stacked": steered_images(backend, es, [(ht[a], 1.0), (ht[b], 1.0)]),
                "lineas_stacked": steered_images(backend, es, [(lin[a], 1.0), (lin[b], 1.0)]),
                "prompt": backend.images([f"a {a} {b} {s}" for s in es.shapes], list(es.seeds)),
            }
            row = {"kind": kind, "a": a, "b": b, "methods": {}}
            for m, im in ims.items():
                ref = "lineas" if m.startswith("lineas") else "ht"
                r = {c: {"inducement": _score(im, c), "single": single[c][ref], "none": single[c]["none"]} for c in (a, b)}
                for v in r.values():
                    v["ratio"] = v["inducement"] / v["single"] if v["single"] > 0 else float("nan")
                    gain = v["single"] - v["none"]
                    v["gain_ratio"] = (v["inducement"] - v["none"]) / gain if abs(gain) > 1e-6 else float("nan")
                if kind == "colour+colour":
                    r["mix"] = {"inducement": _score(im, mix_concept(a, b)), "none": _score(base, mix_concept(a, b))}
                row["methods"][m] = r
            rows.append(row)
            log.info("%s + %s: %s", a, b, "; ".join(
                f"{m} {row['methods'][m][a]['inducement']:.2f}/{row['methods'][m][b]['inducement']:.2f}" for m in METHODS))
    out = {"config": cfg.__dict__, "split_seed": tcfg.seed, "single": single, "pairs": rows, "summary": summarize(rows)}
    write(out, cfg)
    return out


def summarize(rows: list[dict]) -> dict:
    """Per pair kind and method: mean ratio of each concept to its single inducement, and the share of pairs in
    which both concepts keep at least 70 % (the target for colour + pattern)."""
    out: dict = {}
    for kind in ("colour+pattern", "colour+colour"):
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        out[kind] = {}
        for m in METHODS:
            ratios = [[r["methods"][m][r[k]]["ratio"] for k in ("a", "b")] for r in rs]
            entry = {"ratio_a": float(np.nanmean([x[0] for x in ratios])), "ratio_b": float(np.nanmean([x[1] for x in ratios])),
                     "both_at_least_70": float(np.mean([min(x) >= 0.7 for x in ratios]))}
            if kind == "colour+colour":
                entry["mix"] = float(np.mean([r["methods"][m]["mix"]["inducement"] for r in rs]))
            out[kind][m] = entry
    return out


def write(out: dict, cfg: ComposeConfig) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "composition.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# Composition (split seed {out['split_seed']}, LinEAS {cfg.lineas_steps} steps)", "",
             "| pair kind | method | first concept kept | second kept | pairs with both ≥ 70 % | mix colour |", "|---|---|---|---|---|---|"]
    for kind, ms in out["summary"].items():
        for m, e in ms.items():
            lines.append(f"| {kind} | {m} | {e['ratio_a']:.2f} | {e['ratio_b']:.2f} | {100 * e['both_at_least_70']:.0f} % | "
                         f"{e['mix']:.3f} |" if "mix" in e else f"| {kind} | {m} | {e['ratio_a']:.2f} | {e['ratio_b']:.2f} | "
                         f"{100 * e['both_at_least_70']:.0f} % | - |")
    lines += ["", "Kept: the concept's inducement with both applied over its inducement alone by the same method "
              "(prompt: over HT alone).", "", "| a | b | method | a | b |", "|---|---|---|---|---|"]
    for r in out["pairs"]:
        for m in METHODS:
            e = r["methods"][m]
            lines.append(f"| {r['a']} | {r['b']} | {m} | {e[r['a']]['inducement']:.3f} | {e[r['b']]['inducement']:.3f} |")
    with open(os.path.join(cfg.out, "composition.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


@command
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = resolve(ComposeConfig, build_parser(ComposeConfig, __doc__.split("\n\n")[0]).parse_args(argv))
    out = compose(cfg)
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
