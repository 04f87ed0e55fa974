"""Peak memory of loading a hypernet or steering file, against the file's true tensor size.

    python benchmarks/bench_load_memory.py [--sizes 8,32,128] [--keep]

For each size (MB of float32 parameters) a hypernet is written as float32 and as float16, plus a steering
of 1M channels; each file is loaded by ``load_hypernet`` / ``load_steering`` in a fresh subprocess, whose
peak is reset just before the load (``/proc/self/clear_refs``; importing torch peaks gigabytes above a small load) and
the resident memory before it (``VmRSS``) is subtracted from the peak after it (``VmHWM``). Prints the growth, the file's tensor
bytes, the growth over the tensor bytes, and the bound the README states: at most 2x the tensor bytes
plus a fixed 24 MB (loading reads the file with plain reads, in chunks, into float32 tensors that become the
module's parameters: no memory map, no second copy).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MARGIN = 24 * 2**20

PROBE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import torch
    from hypertransport_core import load_hypernet, load_steering
    torch.zeros(1)

    def status(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    # reset the peak (importing torch peaks far above a small load and would hide it), then peak minus resident
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS:")
    obj = {loader}({path!r})
    print(1024 * max(0, status("VmHWM:") - base))
""")


def measure(path: str, loader: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO, path=path, loader=loader)], capture_output=True,
                         text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.split()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,32,128", help="hypernet sizes in MB of float32 parameters")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    a = ap.parse_args(argv)
    import torch

    from hypertransport_core import HyperNet, HyperNetConfig, Site, Steering, save_hypernet, save_steering
    from hypertransport_core.tensorfile import read_layout

    folder = tempfile.mkdtemp(prefix="ht_mem_")
    rows = []
    for mb in (int(x) for x in a.sizes.split(",")):
        # channels x rank dominate: 2 * C * (rank + 1) floats
        C = int(mb * 2**20 / 4 / (2 * 121))
        n = max(1, C // 4096)
        sites = [Site(f"s{i}", f"s{i}", 4096) for i in range(n)]
        hn = HyperNet(HyperNetConfig(embed_dim=64, hidden=128, rank=120), sites)
        for dtype, tag in ((torch.float32, "f32"), (torch.float16, "f16")):
            p = os.path.join(folder, f"hn_{mb}_{tag}.safetensors")
            save_hypernet(p, hn, dtype=dtype)
            rows.append((f"hypernet {mb} MB params, {tag}", p, "load_hypernet"))
    sites = [Site(f"s{i}", f"s{i}", 4096) for i in range(256)]
    p = os.path.join(folder, "steering_1M.safetensors")
    save_steering(p, Steering.identity(sites))
    rows.append(("steering 1M channels", p, "load_steering"))
    print(f"{'file':34s} {'tensor MB':>10s} {'peak growth MB':>15s} {'growth/tensor':>14s} {'bound MB':>9s}")
    worst = 0.0
    for name, path, loader in rows:
        tensor = read_layout(path).tensor_bytes
        grow = measure(path, loader)
        bound = 2 * tensor + MARGIN
        worst = max(worst, grow / bound)
        print(f"{name:34s} {tensor / 2**20:10.1f} {grow / 2**20:15.1f} {grow / tensor:14.2f} {bound / 2**20:9.1f}")
    print(f"largest growth / bound: {worst:.2f} (bound: 2 x tensor bytes + {MARGIN // 2**20} MB)")
    if not a.keep:
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        os.rmdir(folder)
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
