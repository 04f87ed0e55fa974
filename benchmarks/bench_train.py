"""What a training step costs, and what a fixed CPU budget buys: trainer configurations side by side, in one run.

    python benchmarks/bench_train.py [--variant NAME:key=value,...]... [--budget 240] [--threads 0]

For each variant (default: ``before``, the trainer's former defaults, for 330 s, about what its main job trained; then
today's defaults for a third of that and for all of it) on the embedded world, one after another in this process (never
time two trainings side by side: they share the cores):

1. set-up: split, concept embeddings and the cached target activations, timed (``setup s``);
2. the FLOPs of an optimizer step (the mean over ``--flop-steps``), counted by ``torch.utils.flop_counter``
   (convolutions, matmuls, attention: the model's forward and the input-gradient backward through the sampler);
3. seconds per optimizer step over ``--timed-steps`` steps, split into forward (hypernet, steered sampler run and
   OT loss), backward and optimizer;
4. a fresh run whose cosine schedule is sized to ``--budget`` seconds at that step time, trained to its end, then
   its loss on the validation concepts (fixed batches; test concepts are never touched here).

Every number is printed; ratios are against the first variant. Options of a variant are the trainer's
(``python trainer/train.py --help``), e.g. ``--variant rows4:prompts_per_concept=4``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hypertransport_core.errors import HyperTransportError  # noqa: E402
from trainer import train as T  # noqa: E402
from trainer.cli import command  # noqa: E402
from trainer.config import (
    TrainConfig,  # noqa: E402
    parse_overrides,  # noqa: E402
)

# before: the trainer's defaults until 2026-12-07 (the loss at every sampler step, 16 concepts a step, lr 3e-3) for about
# what the main job trained then (130 steps); after: today's defaults for a third of that CPU time, and for all of it
DEFAULT_VARIANTS = ("before:loss_steps=all,concepts_per_step=16,lr=0.003,budget=330", "after-third:budget=110", "after:budget=330")


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` → ``(name, typed overrides)``; ``budget=SECONDS`` (not a trainer option) sets
    that variant's training budget, kept under the key ``"budget"``."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise HyperTransportError(f"--variant {text!r}: expected NAME:key=value,... Fix: e.g. --variant fp32:precision=fp32")
    items = [x.strip() for x in rest.split(",") if x.strip()]
    budget = [x for x in items if x.startswith("budget=")]
    out = parse_overrides([x for x in items if not x.startswith("budget=")])
    if budget:
        try:
            out["budget"] = float(budget[-1].split("=", 1)[1])
        except ValueError:
            out["budget"] = -1.0
        if not out["budget"] > 0:
            raise HyperTransportError(f"--variant {text!r}: budget must be a positive number of seconds. Fix: e.g. budget=120")
    return name.strip(), out


def step_flops(run: T.Run, steps: int = 1) -> int:
    """FLOPs of an optimizer step of ``run``, the mean over ``steps`` steps (it advances the run by them): with
    ``--loss-steps one`` a step's cost depends on the sampler step drawn, so one step is not representative."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for _ in range(steps):
        with FlopCounterMode(display=False) as fc:
            T.train_step(run)
        total += int(fc.get_total_flops())
    return total // steps


def measure(name: str, overrides: dict, a, shared_targets: str | None = None) -> dict:
    overrides = dict(overrides)
    budget = overrides.pop("budget", a.budget)
    base = dict(out=os.path.join(a.out, name), steps=1000, ckpt_every=0, eval_every=0, max_minutes=0.0,
                threads=a.threads)
    cfg = TrainConfig(**{**base, **overrides})
    shutil.rmtree(cfg.out, ignore_errors=True)
    if shared_targets and os.path.isfile(shared_targets):  # reused only when its key matches this variant's settings
        os.makedirs(cfg.out, exist_ok=True)
        shutil.copyfile(shared_targets, os.path.join(cfg.out, "targets.safetensors"))
    t0 = time.perf_counter()
    run = T.build(cfg, progress=False)
    setup = time.perf_counter() - t0
    flops = step_flops(run, a.flop_steps)
    clock: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in range(a.timed_steps):
        T.train_step(run, clock)
    per_step = (time.perf_counter() - t0) / a.timed_steps
    phases = {k: v / a.timed_steps for k, v in clock.items()}
    steps = max(1, int(budget / per_step))
    run = T.build(dataclasses.replace(cfg, steps=steps), progress=False)  # targets from the cache just written
    t0 = time.perf_counter()
    for _ in range(steps):
        T.train_step(run)
    trained = time.perf_counter() - t0
    val = T.evaluate_loss(run, run.val, batches=a.eval_batches)
    return dict(name=name, overrides=overrides, budget=budget, setup=setup, flops=flops, per_step=per_step, phases=phases,
                steps=steps, trained=trained, val=val, targets=os.path.join(cfg.out, "targets.safetensors"))


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=None,
                   help="NAME:key=value,... trainer options of one variant, budget=SECONDS its own budget (repeat; "
                        "default: before (the former defaults, 330 s), after-third (110 s) and after (330 s))")
    p.add_argument("--budget", type=float, default=240.0, help="CPU seconds of training for the loss at a fixed budget")
    p.add_argument("--timed-steps", type=int, default=6, help="steps timed for the per-step figures")
    p.add_argument("--flop-steps", type=int, default=4, help="steps whose FLOPs are counted (the mean is printed)")
    p.add_argument("--eval-batches", type=int, default=2, help="fixed validation batches for the loss")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default=os.path.join("runs", "bench_train"), help="scratch folder (emptied per variant)")
    p.add_argument("--targets", default="", help="a targets.safetensors from an earlier run to start from (used only where "
                   "its key matches; the first variant's set-up time then excludes computing them)")
    a = p.parse_args(argv)
    if a.budget <= 0 or a.timed_steps < 1 or a.eval_batches < 1 or a.flop_steps < 1:
        raise HyperTransportError("--budget, --timed-steps and --eval-batches must be positive. Fix: e.g. --budget 240.")
    variants = [parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS)]
    print(f"bench_train: {len(variants)} variant(s), budget {a.budget:g} s unless a variant sets its own, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    for name, ov in variants:
        r = measure(name, ov, a, rows[0]["targets"] if rows else a.targets or None)
        rows.append(r)
        ph = r["phases"]
        print(f"  {name}: set-up {r['setup']:.1f} s; {r['flops'] / 1e9:.1f} GFLOP/step; {r['per_step']:.2f} s/step "
              f"(forward {ph.get('forward', 0):.2f}, backward {ph.get('backward', 0):.2f}, optimizer "
              f"{ph.get('optimizer', 0):.3f}) = {r['flops'] / r['per_step'] / 1e9:.0f} GFLOP/s; {r['steps']} steps in "
              f"{r['trained']:.0f} s (budget {r['budget']:g} s); validation loss {r['val']:.4f}", flush=True)
    first = rows[0]
    print("\n| variant | options | set-up s | GFLOP/step | s/step | forward | backward | optimizer | GFLOP/s | budget s | "
          "steps | validation loss | s/step vs first | budget vs first | loss vs first |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phases"]
        opts = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "defaults"
        print(f"| {r['name']} | {opts} | {r['setup']:.1f} | {r['flops'] / 1e9:.1f} | {r['per_step']:.2f} | "
              f"{ph.get('forward', 0):.2f} | {ph.get('backward', 0):.2f} | {ph.get('optimizer', 0):.3f} | "
              f"{r['flops'] / r['per_step'] / 1e9:.0f} | {r['budget']:g} | {r['steps']} | {r['val']:.4f} | "
              f"{r['per_step'] / first['per_step']:.2f} | {r['budget'] / first['budget']:.2f} | {r['val'] / first['val']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
