"""Core benchmark: prints numbers, asserts nothing about speed.

1. HyperNet for the SDXL site table (256 sites, 294,080 channels), default config: parameter count,
   size, and batch-1 forward time (median of --runs after warm-up), the shipped forward against the
   literal reference formula (``HyperNet.forward_reference``), interleaved.
2. Cost of an active intervention on a small conv + GroupNorm + attention + LayerNorm model
   (64 channels, 32x32, batch 4): unsteered, hooks on every norm (pooled form), hooks (elementwise
   form), and the elementwise maps folded into the norm weights; the modes are measured round-robin
   in one run so that load from other processes hits them alike.

Usage::

    .venv/bin/python benchmarks/bench_core.py --threads 1 --runs 100
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from ht_devkit.core_models import sdxl_reference_sites  # noqa: E402
from hypertransport_core import HyperNet, HyperNetConfig, Steering, folded, list_sites, steer  # noqa: E402


def _fmt(ts: list[float]) -> str:
    ms = sorted(t * 1e3 for t in ts)
    return f"median {statistics.median(ms):8.3f} ms   min {ms[0]:8.3f}   p90 {ms[int(0.9 * (len(ms) - 1))]:8.3f}"


def bench_hypernet(runs: int, embed_dim: int) -> None:
    sites = sdxl_reference_sites()
    hn = HyperNet(HyperNetConfig(embed_dim=embed_dim), sites, family="sdxl").eval()
    with torch.no_grad():  # trained-looking heads (zeros would not change the cost, but keep it honest)
        for p in (hn.channel_w, hn.channel_b, hn.offset_w, hn.offset_b):
            p.normal_(0, 0.02)
    n = hn.num_parameters()
    print("== HyperNet, SDXL site table ==")
    print(f"sites {len(sites)}, channels {hn.total_channels:,}, config {hn.config}")
    print(f"parameters {n:,} ({n / 1e6:.2f} M; target <= 25 M), size {n * 4 / 2**20:.1f} MiB float32 / {n * 2 / 2**20:.1f} MiB fp16")
    e = torch.nn.functional.normalize(torch.randn(1, embed_dim), dim=-1)
    params = [p.detach() for p in hn.parameters()]

    def read_all() -> None:  # memory floor: every parameter read once (batch-1 forward is bandwidth bound)
        for p in params:
            p.sum()

    modes = {
        "forward (per-run bmm)": hn,
        "forward_reference (gather (B,C,2r))": hn.forward_reference,
        "floor: read every parameter once": lambda _e: read_all(),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    with torch.inference_mode():
        w0, b0 = hn(e)
        w1, b1 = hn.forward_reference(e)
        diff = max(float((w0 - w1).abs().max()), float((b0 - b1).abs().max()))
        for fn in modes.values():
            for _ in range(5):
                fn(e)
        for i in range(runs):
            for k, fn in modes.items():
                if k.startswith("forward_reference") and i % 5:  # the slow path: every 5th round is enough
                    continue
                t = time.perf_counter()
                fn(e)
                times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        print(f"  {k:40s} {_fmt(ts)}   (n={len(ts)})")
    speedup = statistics.median(times["forward_reference (gather (B,C,2r))"]) / statistics.median(times["forward (per-run bmm)"])
    print(f"  speed-up {speedup:.1f}x, max |difference| {diff:.2e}; target <= 5 ms")


class Block(nn.Module):
    """conv → GroupNorm → SiLU → conv → GroupNorm → tokens → LayerNorm → attention → LayerNorm → MLP."""

    def __init__(self, c: int = 64, heads: int = 4):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(32, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(32, c)
        self.ln1, self.attn = nn.LayerNorm(c), nn.MultiheadAttention(c, heads, batch_first=True)
        self.ln2, self.mlp = nn.LayerNorm(c), nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn2(self.conv2(torch.nn.functional.silu(self.gn1(self.conv1(x))))) + x
        B, C, H, W = h.shape
        t = h.flatten(2).transpose(1, 2)
        q = self.ln1(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        t = t + self.mlp(self.ln2(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


def bench_overhead(runs: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 64, 3, padding=1), Block(), Block()).eval()
    x = torch.randn(4, 4, 32, 32)
    pooled_sites, elem_sites = list_sites(net, "generic"), list_sites(net, "generic", form="elementwise")
    g = torch.Generator().manual_seed(1)
    total = sum(s.channels for s in pooled_sites)
    w, b = 1 + 0.1 * torch.randn(total, generator=g), 0.1 * torch.randn(total, generator=g)
    pooled, elem = Steering(tuple(pooled_sites), w, b), Steering(tuple(elem_sites), w, b)
    print("\n== Intervention overhead: 2 blocks of conv+GroupNorm+attention+LayerNorm, 64 ch, 32x32, batch 4 ==")
    print(f"sites {len(pooled_sites)} ({sum(s.channel_dim == 1 for s in pooled_sites)} GroupNorm, "
          f"{sum(s.channel_dim == -1 for s in pooled_sites)} LayerNorm), {total} channels")
    modes = {
        "unsteered": lambda: torch.no_grad(),
        "hooks, pooled form": lambda: steer(net, [(pooled, 0.8)]),
        "hooks, elementwise form": lambda: steer(net, [(elem, 0.8)]),
        "folded (elementwise)": lambda: folded(net, [(elem, 0.8)]),
    }
    with torch.inference_mode():
        with steer(net, [(elem, 0.8)]):
            ref = net(x)
        with folded(net, [(elem, 0.8)]) as rest:
            assert not rest
            fold_diff = float((net(x) - ref).abs().max())
        for ctx in modes.values():
            for _ in range(3):
                with ctx():
                    net(x)
        times: dict[str, list[float]] = {k: [] for k in modes}
        setup: dict[str, list[float]] = {k: [] for k in modes}
        for _ in range(runs):
            for k, ctx in modes.items():
                t0 = time.perf_counter()
                with ctx():
                    t1 = time.perf_counter()
                    net(x)
                    t2 = time.perf_counter()
                setup[k].append((t1 - t0) + (time.perf_counter() - t2))
                times[k].append(t2 - t1)
    base = statistics.median(times["unsteered"])
    for k in modes:
        ratio = statistics.median(times[k]) / base
        print(f"  {k:26s} forward {_fmt(times[k])}   ratio {ratio:5.3f}   enter+exit {statistics.median(setup[k]) * 1e3:6.3f} ms")
    print(f"  folded vs hooked elementwise: max |difference| {fold_diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per measurement (>= 50 recommended)")
    ap.add_argument("--embed-dim", type=int, default=768, help="concept embedding width (ViT-L-14: 768)")
    ap.add_argument("--skip-overhead", action="store_true", help="only the hypernet part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, runs {args.runs}")
    bench_hypernet(args.runs, args.embed_dim)
    if not args.skip_overhead:
        bench_overhead(args.runs)


if __name__ == "__main__":
    main()
