"""Does a test concept steer worse the farther it lies from the training concepts? One diagnostic of transfer.

    python studies/transfer.py reports/protocol/shipped/seed0-test reports/protocol/shipped/seed1-test \\
        reports/protocol/shipped/seed2-test

For each evaluator report given (``studies/evaluate.py --out``), the hypernet it evaluated and each test concept:
the cosine similarity of the concept's text embedding to its nearest *training* concept's, both as the hypernet
sees them (:meth:`HyperNet.prepare`: centred and re-normalized), against how well HT from text steers it: its gain
over no steering as a share of prompting's gain, and its inducement over converged LinEAS's where LinEAS was fitted.
Prints the Spearman correlation of each with the similarity, and the means by thirds of the similarity. A
correlation near zero says that the shortfall on new concepts is not a matter of their distance to the training
concepts in the encoder's space.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from scipy.stats import spearmanr

from hypertransport_core import HyperTransportError, load_hypernet
from trainer.cli import command


def nearest_training_similarity(hn, encoder, concepts: list[str], train: list[str]) -> np.ndarray:
    """``(len(concepts),)``: each concept's largest cosine with a training concept, as the hypernet sees both."""
    if not train or not concepts:
        raise HyperTransportError("no training or test concepts to compare. Fix: give a report of a hypernet with a split.")
    with torch.no_grad():
        e_train = hn.prepare(hn.encode_text(encoder, train))
        e = hn.prepare(hn.encode_text(encoder, concepts))
    return (e @ e_train.T).max(1).values.numpy()


def rows_of(results: dict, similarity: np.ndarray) -> list[dict]:
    """One row per concept of an evaluator ``results.json``: similarity, HT gain / prompting's gain (NaN when
    prompting itself gains under 0.05) and HT / LinEAS inducement (NaN where LinEAS was not fitted)."""
    out = []
    for s, (c, e) in zip(similarity, results["concepts"].items()):
        m = e["methods"]
        none, ht, pr = (m[k]["inducement"] for k in ("none", "ht_text", "prompt"))
        lin = m.get("lineas", {}).get("inducement")
        out.append({"concept": c, "kind": e["kind"], "similarity": float(s),
                    "gain_share": (ht - none) / (pr - none) if pr - none > 0.05 else float("nan"),
                    "over_lineas": ht / lin if lin else float("nan")})
    return out


def summarize(rows: list[dict]) -> dict:
    sim = np.array([r["similarity"] for r in rows])
    out: dict = {"n": len(rows)}
    for key in ("gain_share", "over_lineas"):
        v = np.array([r[key] for r in rows])
        ok = ~np.isnan(v)
        out[key] = {"n": int(ok.sum()), "spearman": float(spearmanr(sim[ok], v[ok]).correlation) if ok.sum() > 2 else float("nan")}
    edges = np.quantile(sim, [1 / 3, 2 / 3])
    thirds = (sim < edges[0], (sim >= edges[0]) & (sim < edges[1]), sim >= edges[1])
    def mean(values: list[float]) -> float:  # NaN, without a warning, when a third has no value
        v = np.array(values, dtype=float)
        return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")

    out["thirds"] = [{"similarity": float(sim[t].mean()),
                      **{k: mean([r[k] for r, keep in zip(rows, t) if keep]) for k in ("gain_share", "over_lineas")}}
                     for t in thirds]
    return out


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="evaluator output folders (each with results.json)")
    a = p.parse_args(argv)
    from studies.measure import world_backend
    from trainer.config import WORLD_WEIGHTS, train_config_of

    rows, backend = [], None
    for folder in a.reports:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise HyperTransportError(f"{path} does not exist. Fix: give folders written by studies/evaluate.py --out.")
        with open(path) as f:
            results = json.load(f)
        hn = load_hypernet(results["config"]["hypernet"])
        backend = backend or world_backend(WORLD_WEIGHTS, train_config_of(hn))
        sim = nearest_training_similarity(hn, backend.encoder, list(results["concepts"]), hn.training_summary.get("train_concepts", []))
        rows += rows_of(results, sim)
    s = summarize(rows)
    print(f"{s['n']} test concepts; Spearman of nearest-training similarity with HT gain / prompting's gain: "
          f"{s['gain_share']['spearman']:.3f} (n={s['gain_share']['n']}), with HT / converged LinEAS: "
          f"{s['over_lineas']['spearman']:.3f} (n={s['over_lineas']['n']})")
    for name, t in zip(("farthest third", "middle third", "nearest third"), s["thirds"]):
        print(f"  {name}: similarity {t['similarity']:.3f}, HT gain / prompting's {t['gain_share']:.3f}, HT / LinEAS {t['over_lineas']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
