"""The quality protocol: one configuration on three splits, chosen on validation, reported on test concepts.

    python studies/protocol.py --tag base --stage val                      # train seeds 0,1,2; evaluate validation
    python studies/protocol.py --tag long --set steps=800 --stage val      # an alternative, judged the same way
    python studies/protocol.py --tag long --stage test --compose           # the chosen one, on the test concepts
    python studies/protocol.py --report                                    # every tag's table: reports/protocol/

Each split is a seed of :func:`trainer.train.split_concepts`: its test concepts are held out of training and of
every choice; its validation concepts are held out of training and are what configurations are compared on. A
tag trains one hypernet per seed (``runs/protocol/<tag>/seed<N>``, reused when present) with ``--set`` overrides
of the trainer's defaults, then runs the evaluator on the ``--stage`` concepts, on test with a converged LinEAS
baseline (``--lineas-steps``, see ``studies/baseline.py``; fits are cached and shared; validation compares HT
configurations alone unless ``--lineas-concepts`` says otherwise), and with ``--compose`` the
composition study. ``--report`` collects every tag and stage into ``reports/protocol/protocol.md`` with the
issue's targets, per split and as the mean of the splits.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from hypertransport_core.errors import HyperTransportError
from trainer.cli import command
from trainer.config import TrainConfig, parse_overrides

log = logging.getLogger("hypertransport.protocol")

RUNS, REPORTS = os.path.join("runs", "protocol"), os.path.join("reports", "protocol")
LINEAS_CACHE = os.path.join("runs", "lineas_cache")


def train_split(tag: str, seed: int, overrides: dict) -> str:
    """The tag's hypernet for split ``seed`` (trained unless it exists with the same settings)."""
    from trainer import train as T

    out = os.path.join(RUNS, tag, f"seed{seed}")
    path = os.path.join(out, "hypernet.safetensors")
    settings = {**overrides, "seed": seed}
    marker = os.path.join(out, "protocol.json")
    if os.path.isfile(path) and os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == settings:
                log.info("%s seed %d: reusing %s", tag, seed, path)
                return path
    cfg = TrainConfig(**{**overrides, "seed": seed, "out": out, "max_minutes": 0.0})
    T.train(cfg)
    with open(marker, "w") as f:
        json.dump(settings, f)
    return path


def evaluate_split(tag: str, seed: int, hypernet: str, stage: str, a: argparse.Namespace) -> dict:
    from studies.evaluate import EvalConfig, evaluate

    out = os.path.join(REPORTS, tag, f"seed{seed}-{stage}")
    cfg = EvalConfig(hypernet=hypernet, split=stage, out=out, lineas_concepts=a.lineas_concepts, lineas_steps=a.lineas_steps,
                     lineas_random=a.lineas_random, lineas_cache=LINEAS_CACHE, sweep_methods=a.sweep_methods,
                     grid_concepts=a.grid_concepts)
    return evaluate(cfg)


def compose_split(tag: str, seed: int, hypernet: str, a: argparse.Namespace) -> dict:
    from studies.compose import ComposeConfig, compose

    return compose(ComposeConfig(hypernet=hypernet, pairs=a.pairs, pool=min(a.lineas_concepts, 8) if a.lineas_concepts > 0 else 8,
                                 lineas_steps=a.lineas_steps, lineas_cache=LINEAS_CACHE,
                                 out=os.path.join(REPORTS, tag, f"seed{seed}-composition")))


# ------------------------------------------------------------------------------------------ report
TARGETS = [  # (name, how it is computed from one split's figures, target, "≥")
    ("HT text / converged LinEAS, random concepts", "random_text_over_lineas", 1.00),
    ("HT text / converged LinEAS, hardest", "hardest_text_over_lineas", 0.90),
    ("HT text / converged LinEAS, all fitted", "text_over_lineas", 1.00),
    ("HT text / LinEAS, patterns", "pattern_text_over_lineas", 0.80),
    ("HT image / HT text", "image_over_text", 0.90),
    ("Spearman(inducement, λ)", "spearman", 0.95),
    ("Spearman, colours", "spearman_colour", 0.95),
    ("Spearman, patterns", "spearman_pattern", 0.95),
    ("λ < 0 below λ = 0", "negative_share", 0.95),
    ("shape kept at λ = 1", "shape_kept", 0.95),
    ("composition: colour kept", "compose_colour", 0.70),
    ("composition: pattern kept", "compose_pattern", 0.70),
]


def split_figures(results: dict, composition: dict | None) -> dict:
    s, cs = results["summary"], results["concepts"]
    lin = [c for c in cs if "lineas" in cs[c]["methods"]]
    pat = [c for c in lin if cs[c]["kind"] == "pattern"]

    def ratio(names, a="ht_text", b="lineas"):
        if not names:
            return float("nan")
        return float(np.mean([cs[c]["methods"][a]["inducement"] for c in names]) /
                     np.mean([cs[c]["methods"][b]["inducement"] for c in names]))

    out = {
        "n_concepts": s["n_concepts"], "n_lineas": len(lin), "n_lineas_patterns": len(pat),
        "lineas_steps": results["config"]["lineas_steps"],
        "text_over_lineas": ratio(lin), "pattern_text_over_lineas": ratio(pat),
        "image_over_text": s["image_over_text"], "spearman": s["spearman_mean"],
        "negative_share": s.get("negative_moves_away", {}).get("share", float("nan")),
        "shape_kept": s["methods"]["ht_text"]["shape_kept"],
        "random_text_over_lineas": s.get("on_random", {}).get("text_over_lineas", float("nan")),
        "hardest_text_over_lineas": s.get("on_hardest", {}).get("text_over_lineas", float("nan")),
        "spearman_colour": s.get("spearman_by_kind", {}).get("colour", float("nan")),
        "spearman_pattern": s.get("spearman_by_kind", {}).get("pattern", float("nan")),
        "held_loss_text_over_lineas": s.get("on_lineas_concepts", {}).get("held_loss_text_over_lineas", float("nan")),
        "off_kind": {k: {m: row.get(m, float("nan")) for m in ("prompt", "lineas", "ht_text")}
                     for k, row in s.get("off_kind_by_kind", {}).items()},
        "ind": {m: s["methods"][m]["inducement"] for m in ("none", "prompt", "lineas", "ht_text", "ht_image")},
        "seconds_ht": s["methods"]["ht_text"]["seconds_to_intervention"],
        "seconds_lineas": s["methods"]["lineas"]["seconds_to_intervention"],
    }
    if composition:
        cp = composition["summary"].get("colour+pattern", {}).get("ht_combine", {})
        out["compose_colour"], out["compose_pattern"] = cp.get("ratio_a", float("nan")), cp.get("ratio_b", float("nan"))
        st = composition["summary"].get("colour+pattern", {}).get("ht_stacked", {})
        out["compose_stacked"] = (st.get("ratio_a", float("nan")), st.get("ratio_b", float("nan")))
        ls = composition["summary"].get("colour+pattern", {}).get("lineas_stacked", {})
        out["compose_lineas"] = (ls.get("ratio_a", float("nan")), ls.get("ratio_b", float("nan")))
    return out


def collect() -> dict:
    """``{(tag, stage): {seed: figures}}`` from every evaluated split under reports/protocol."""
    found: dict = {}
    for path in sorted(glob.glob(os.path.join(REPORTS, "*", "seed*-*", "results.json"))):
        tag = os.path.basename(os.path.dirname(os.path.dirname(path)))
        seed_s, stage = os.path.basename(os.path.dirname(path)).split("-", 1)
        if stage == "composition":
            continue
        with open(path) as f:
            res = json.load(f)
        comp_path = os.path.join(REPORTS, tag, f"{seed_s}-composition", "composition.json")
        comp = json.load(open(comp_path)) if stage == "test" and os.path.isfile(comp_path) else None
        found.setdefault((tag, stage), {})[int(seed_s[4:])] = split_figures(res, comp)
    return found


def _nanmean(vals) -> float:
    good = [v for v in vals if v == v]
    return float(np.mean(good)) if good else float("nan")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.3f}"


def report() -> str:
    found = collect()
    if not found:
        raise HyperTransportError(f"nothing evaluated under {REPORTS}. Fix: run e.g. `python studies/protocol.py --tag base --stage val`.")
    lines = ["# The quality protocol on the embedded world", "",
             "Per tag (a training configuration) and stage (`val`: validation concepts, used to choose; `test`: the test "
             "concepts, reported once), every split and their mean. Commands: `studies/protocol.py` (its docstring).", ""]
    for (tag, stage), seeds in sorted(found.items()):
        with_settings = os.path.join(RUNS, tag, f"seed{min(seeds)}", "protocol.json")
        settings = json.load(open(with_settings)) if os.path.isfile(with_settings) else {}
        settings.pop("seed", None)
        lines += [f"## {tag} on {stage} ({', '.join(f'{k}={v}' for k, v in settings.items()) or 'trainer defaults'})", "",
                  "| figure | target | " + " | ".join(f"split {s}" for s in sorted(seeds)) + " | mean | met |",
                  "|---|---|" + "---|" * (len(seeds) + 2)]
        for name, key, target in TARGETS:
            vals = [seeds[s].get(key, float("nan")) for s in sorted(seeds)]
            good = [v for v in vals if v == v]
            mean = float(np.mean(good)) if good else float("nan")
            met = "-" if mean != mean else ("yes" if mean >= target else "**no**")
            lines.append(f"| {name} | ≥ {target:g} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(mean)} | {met} |")
        for m in ("none", "prompt", "lineas", "ht_text", "ht_image"):
            vals = [seeds[s]["ind"][m] for s in sorted(seeds)]
            lines.append(f"| inducement: {m} | | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(float(np.mean(vals)))} | |")
        vals = [seeds[s].get("held_loss_text_over_lineas", float("nan")) for s in sorted(seeds)]
        lines.append("| held OT loss: HT text / LinEAS (one estimator; lower is better) | | " + " | ".join(_fmt(v) for v in vals) +
                     f" | {_fmt(_nanmean(vals))} | |")
        for kind in ("colour", "pattern"):  # specificity: HT (and LinEAS) should move the other kind no more than prompting
            for m in ("prompt", "lineas", "ht_text"):
                vals = [seeds[s].get("off_kind", {}).get(kind, {}).get(m, float("nan")) for s in sorted(seeds)]
                lines.append(f"| off-kind change steering a {kind}: {m} | ≤ prompt's | " + " | ".join(_fmt(v) for v in vals) +
                             f" | {_fmt(_nanmean(vals))} | |")
        n = seeds[min(seeds)]
        per = "; ".join(f"split {k}: {seeds[k]['lineas_steps']} steps on {seeds[k]['n_lineas']} "
                        f"({seeds[k]['n_lineas_patterns']} patterns)" for k in sorted(seeds))
        lines += ["", f"Concepts per split: {n['n_concepts']}. LinEAS fits: {per}. Time to an intervention: "
                  f"HT {n['seconds_ht'] * 1e3:.1f} ms, LinEAS {n['seconds_lineas']:.0f} s (split {min(seeds)}).", ""]
    os.makedirs(REPORTS, exist_ok=True)
    if loss_plot(os.path.join(REPORTS, "loss_vs_steps.png")):
        lines += ["![held-out loss vs optimizer steps](loss_vs_steps.png)", ""]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(REPORTS, "protocol.md"), "w") as f:
        f.write(text)
    return text


def loss_plot(path: str, curve: str = os.path.join("reports", "lineas_curve", "curve.json")) -> bool:
    """The hypernets' validation loss during training (every tag and split; the final one is estimated on other
    batches, so it is left out), their test loss at the end, and
    the converged LinEAS fits' held loss over LinEAS steps (``studies/baseline.py``); False when nothing to plot."""
    logs = sorted(glob.glob(os.path.join(RUNS, "*", "seed*", "train_log.jsonl")))
    if not logs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hypertransport_core import load_hypernet

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, lp in enumerate(logs):
        run = os.path.dirname(lp)
        label = f"{os.path.basename(os.path.dirname(run))} {os.path.basename(run)}"
        with open(lp) as f:
            recs = [json.loads(x) for x in f if x.strip()]
        pts = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        hn_path = os.path.join(run, "hypernet.safetensors")
        if os.path.isfile(hn_path):
            ts = load_hypernet(hn_path).training_summary
            if ts.get("holdout_loss") is not None:
                ax.plot([ts["steps"]], [ts["holdout_loss"]], "s", color=f"C{i}", ms=5)
        if pts:
            ax.plot(*zip(*pts), "-o", color=f"C{i}", ms=3, lw=1, label=f"HT {label}: validation (squares: test)")
    if os.path.isfile(curve):
        with open(curve) as f:
            c = json.load(f)
        ax.plot(c["checkpoints"], c["mean_held_loss"], "k--", lw=1.5, label=f"LinEAS per concept ({len(c['concepts'])} test concepts)")
    ax.set_xlabel("optimizer steps (hypernet: training steps; LinEAS: steps of one concept's fit)")
    ax.set_ylabel("OT loss on held batches")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@command
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", help="name of the configuration (its runs and reports go under runs/protocol/<tag>)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="trainer option, repeatable")
    p.add_argument("--seeds", default="0,1,2", help="the splits")
    p.add_argument("--stage", choices=("val", "test"), default="val")
    p.add_argument("--lineas-steps", type=int, default=240, help="LinEAS steps of the baseline (converged: see studies/baseline.py)")
    p.add_argument("--lineas-concepts", type=int, default=None,
                   help="concepts per split given a LinEAS fit (default: 16 on test, none (-1) on val: choices compare HT configurations)")
    p.add_argument("--lineas-random", type=int, default=None,
                   help="and concepts drawn at random per split, seeded (default: 12 on test, 0 on val): the ratio for an "
                        "ordinary concept")
    p.add_argument("--sweep-methods", default="ht_text,ht_image,lineas", help="methods swept over λ")
    p.add_argument("--grid-concepts", type=int, default=12)
    p.add_argument("--compose", action="store_true", help="also the composition study (test stage)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--report", action="store_true", help="only collect what was evaluated into reports/protocol/protocol.md")
    a = p.parse_args(argv)
    if a.report:
        print(report())
        return 0
    if not a.tag:
        p.error("--tag is required (or --report)")
    overrides = parse_overrides(a.set)
    if a.lineas_concepts is None:
        a.lineas_concepts = 16 if a.stage == "test" else -1
    if a.lineas_random is None:
        a.lineas_random = 12 if a.stage == "test" else 0
    bad = {k for k in overrides if k in ("seed", "out", "max_minutes")}
    if bad:
        raise HyperTransportError(f"--set {sorted(bad)}: the protocol sets these itself (per split).")
    for seed in [int(s) for s in a.seeds.split(",") if s.strip()]:
        path = train_split(a.tag, seed, overrides)
        evaluate_split(a.tag, seed, path, a.stage, a)
        if a.compose and a.stage == "test":
            compose_split(a.tag, seed, path, a)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
