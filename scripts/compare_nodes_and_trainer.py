"""Node path = trainer path, for every held-out concept: the world steered through a real ComfyUI server
(the nodes) and in-process (the evaluator's backend), side by side.

    .venv/bin/python scripts/compare_nodes_and_trainer.py [--hypernet FILE] [--strengths 1,-1] [--seeds 2]

Starts ComfyUI (``main.py --cpu``) on loopback with this pack in a throw-away base directory, posts one
graph per (concept, shape prompt, seed, strength), reads the saved PNGs, makes the same images in-process,
and prints per concept: the mean pixel inducement from the server's images and from the evaluator's, the
unsteered one, and the largest pixel difference. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hypernet", default="", help="hypernet file (default: the shipped world hypernet)")
    p.add_argument("--strengths", default="1", help="comma-separated strengths")
    p.add_argument("--seeds", type=int, default=2, help="seeds per shape prompt")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in this process")
    a = p.parse_args(argv)
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    import ht_devkit
    from ht_devkit.world_check import SHAPE_PROMPTS, Item, compare
    from hypertransport_core import load_hypernet
    from trainer.config import SHIPPED_HYPERNET

    base = tempfile.mkdtemp(prefix="ht_compare_")
    ht_devkit.setup_comfy(base_directory=os.path.join(base, "inprocess"))
    from hypertransport_comfy.backend import ComfyBackend

    path = a.hypernet or SHIPPED_HYPERNET
    name = "world_hypernet.safetensors"
    server_base = os.path.join(base, "server")
    ht_devkit.prepare_server_base(server_base)
    if a.hypernet:  # the server finds hypernets in its models folder; the shipped one comes with the pack
        import shutil

        name = "compare_" + os.path.basename(path)
        shutil.copy(path, os.path.join(server_base, "models", "hypertransport", name))
    hn = load_hypernet(path)
    held = hn.training_summary.get("holdout_concepts") or []
    strengths = [float(s) for s in a.strengths.split(",") if s.strip()]
    items = [Item(c, pr, 100 + k, lam) for c in held for pr in SHAPE_PROMPTS for k in range(a.seeds) for lam in strengths]
    backend = ComfyBackend.world()
    t0 = time.perf_counter()
    server = ht_devkit.Server(server_base)
    try:
        rows = compare(server, backend, hn, items, name)
    finally:
        server.stop()
    print(f"{len(items)} generations of {len(held)} held-out concepts, strengths {strengths}, in {time.perf_counter() - t0:.0f} s")
    print(f"{'concept':32s} {'strength':>8s} {'server':>8s} {'evaluator':>9s} {'unsteered':>9s} {'max px diff':>11s}")
    for c in held:
        for lam in strengths:
            mine = [r for r in rows if r["concept"] == c and r["strength"] == lam]
            print(f"{c:32s} {lam:8g} {np.mean([r['server'] for r in mine]):8.3f} {np.mean([r['evaluator'] for r in mine]):9.3f} "
                  f"{np.mean([r['unsteered'] for r in mine]):9.3f} {max(r['max_pixel_diff'] for r in mine):11d}")
    d = [abs(r["server"] - r["evaluator"]) for r in rows]
    print(f"mean server {np.mean([r['server'] for r in rows]):.4f}, evaluator {np.mean([r['evaluator'] for r in rows]):.4f}; "
          f"largest |difference| of an image's inducement {max(d):.4f}, largest pixel difference "
          f"{max(r['max_pixel_diff'] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
