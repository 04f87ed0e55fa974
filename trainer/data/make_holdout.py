"""Write holdout.txt: 20 % of concepts.tsv held out, stratified by category, fixed seed.

    python trainer/data/make_holdout.py [--concepts FILE] [--out FILE] [--frac 0.2] [--seed 0]

Per category, ``round(frac * n)`` concepts are drawn with ``numpy.random.default_rng(seed)`` (categories
in file order, one generator for all); the file lists them in concept-file order. Rerunning with the
same inputs reproduces the file byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def stratified_holdout(rows: list[tuple[str, str]], frac: float = 0.2, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    cats: dict[str, list[str]] = {}
    for name, cat in rows:
        cats.setdefault(cat, []).append(name)
    held = set()
    for names in cats.values():
        k = int(round(frac * len(names)))
        held.update(names[i] for i in rng.choice(len(names), k, replace=False))
    return [n for n, _ in rows if n in held]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default=os.path.join(HERE, "concepts.tsv"))
    p.add_argument("--out", default=os.path.join(HERE, "holdout.txt"))
    p.add_argument("--frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with open(a.concepts, newline="") as f:
        rows = [(r[0].strip(), r[1].strip()) for r in csv.reader(f, delimiter="\t")
                if r and r[0].strip() and not r[0].startswith("#") and r[0] != "concept"]
    held = stratified_holdout(rows, a.frac, a.seed)
    with open(a.out, "w") as f:
        f.write(f"# held-out concepts: {len(held)} of {len(rows)} ({a.frac:.0%} per category, seed {a.seed}); "
                "written by trainer/data/make_holdout.py\n")
        f.write("\n".join(held) + "\n")
    print(f"{len(held)} of {len(rows)} concepts held out -> {a.out}")


if __name__ == "__main__":
    main()
