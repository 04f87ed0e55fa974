"""Time to a new concept's intervention: HyperTransport (encode + one hypernet pass) vs a LinEAS fit.

    python benchmarks/bench_world.py [--hypernet runs/world/hypernet.safetensors] [--concepts 3] [--lineas-steps 60]

Both on the embedded world's model, in the same run and process, for concepts the hypernet never
saw. LinEAS time includes computing its concept's target activations (a new concept has none
cached) and the fit; HyperTransport time is text encoding plus the hypernet's forward pass. Then the
Fit Steering node's own code (``hypertransport_comfy/fit.py`` on the world's ComfyUI MODEL, as the node runs it) is
timed for ``--fit-steps`` steps: its cost per step on the world.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hypertransport_comfy.targets import compute_targets  # noqa: E402
from hypertransport_core import LinEASConfig, load_hypernet  # noqa: E402
from trainer.config import default_hypernet, train_config_of  # noqa: E402
from trainer.train import fit_concept_lineas, make_backend  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hypernet", default="", help="default: runs/world/hypernet.safetensors, else the shipped one")
    p.add_argument("--concepts", type=int, default=3, help="held-out concepts to time LinEAS on")
    p.add_argument("--lineas-steps", type=int, default=60, help="LinEAS steps (60: the Fit Steering template's; the evaluator's converged baseline uses 120)")
    p.add_argument("--fit-steps", type=int, default=20, help="Fit Steering steps to time (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.hypernet = a.hypernet or default_hypernet()
    if not os.path.isfile(a.hypernet):
        raise SystemExit(f"{a.hypernet} does not exist. Fix: run `python trainer/train.py` first.")
    hn = load_hypernet(a.hypernet)
    tcfg = train_config_of(hn)
    backend = make_backend(tcfg)
    concepts = hn.training_summary["holdout_concepts"][: a.concepts]
    hn.steering(hn.text_concept(backend.encoder, "warm up"))
    ht, lin = [], []
    for c in concepts:
        reps = []
        for _ in range(20):
            t = time.perf_counter()
            hn.steering(hn.text_concept(backend.encoder, c))
            reps.append(time.perf_counter() - t)
        ht.append(statistics.median(reps))
        t = time.perf_counter()
        tgt = compute_targets(backend, [c], tcfg, progress=False)
        with torch.enable_grad():
            fit_concept_lineas(backend, c, {k: v[0] for k, v in tgt.items()}, tcfg, LinEASConfig(steps=a.lineas_steps))
        lin.append(time.perf_counter() - t)
        print(f"{c:>24}: HyperTransport {1000 * ht[-1]:.2f} ms | LinEAS ({a.lineas_steps} steps + targets) {lin[-1]:.1f} s")
    h, l_ = statistics.median(ht), statistics.median(lin)
    print(f"median: HyperTransport {1000 * h:.2f} ms, LinEAS {l_:.1f} s, ratio {l_ / h:,.0f}x "
          f"(torch threads {torch.get_num_threads()}, {len(backend.sites)} sites, {sum(s.channels for s in backend.sites)} channels)")
    if a.fit_steps:
        fit_node_cost(concepts[0], a.fit_steps, tcfg.world_weights)
    return 0


def fit_node_cost(concept: str, steps: int, weights: str) -> None:
    """Seconds per step of Fit Steering on the world's MODEL: a 1-step fit (targets + one step) and a
    ``1 + steps`` fit, the difference divided by ``steps``."""
    from hypertransport_comfy import fit
    from hypertransport_world import model as WM

    world = WM.load(weights)
    times = []
    for n in (1, 1 + steps):
        t = time.perf_counter()
        fit.fit_steering(world.model, world.clip, concept, "", fit.FitSettings(steps=n), use_cache=False)
        times.append(time.perf_counter() - t)
    per_step = (times[1] - times[0]) / steps
    print(f"Fit Steering node on the world: {per_step:.3f} s per step, {times[0] - per_step:.1f} s of targets and set-up; "
          f"a 60-step fit {times[0] + 59 * per_step:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
