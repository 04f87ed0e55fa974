"""Sampling time of an SDXL-architecture model in ComfyUI: unsteered vs steered (hooks, folded).

The model is ComfyUI's own SDXL class (``supported_models.SDXL`` / ``model_base.SDXL``) with the real
SDXL layout (channel_mult 1/2/4, 2 res blocks, transformer depth 0/2/10, middle 10: all 256 norm
sites) at a reduced width so it runs on a CPU; random weights. Sampling is ``comfy.sample.sample``
(KSampler's path), euler, cfg > 1 so cond and uncond run batched. Each configuration is sampled once
to load/patch it, then timed; rounds rotate the order; medians of wall and CPU time are reported.

Configurations:
  unsteered       the model as loaded
  hooks           Apply Steering (Advanced), mode hooks: forward hooks on all 256 sites every step
                  (what a start/end step range uses)
  folded          Apply Steering over the whole sampling, hypernet with elementwise sites:
                  every map written into the norm weights (nothing runs per step)
  folded+pooled   the same with the site table's forms (46 GroupNorm sites pooled: they stay hooks)

Run:  .venv/bin/python benchmarks/bench_comfy_sampling.py [--width 128] [--latent 32] [--steps 2] [--rounds 5]
(x = time / unsteered time. On a shared CPU wall time swings with the neighbours' load; the process's CPU
time with one torch thread is the steadier measure of the work added.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=128, help="model_channels (SDXL: 320); a multiple of 64")
    ap.add_argument("--context", type=int, default=256, help="cross-attention context width (SDXL: 2048)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default); 1 is steadier on a shared machine"
    )
    a = ap.parse_args(argv)

    import ht_devkit as H

    base = tempfile.mkdtemp(prefix="ht_bench_")
    t0 = time.perf_counter()
    H.setup_comfy(base_directory=base)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import comfy.supported_models as sm

    pack = H.load_pack()
    D, P = pack.nodes.definitions, pack.nodes.patching
    from hypertransport_core.sites import list_sites, site_summary

    cfg = sm.SDXL(H.unet_config("sdxl", a.width, a.context, full=True))
    model = H.patcher_for(cfg, seed=0)
    dm = model.model.diffusion_model
    n_params = sum(p.numel() for p in dm.parameters())
    enc = H.write_tiny_encoder(base)
    import folder_paths

    H.write_hypernet(base, "bench_table.safetensors", dm, enc.identity, seed=1)
    H.write_hypernet(base, "bench_elementwise.safetensors", dm, enc.identity, seed=1, form="elementwise")
    folder_paths.filename_list_cache.clear()
    hn_t = D.LoadHyperNet.execute("bench_table.safetensors").args[0]
    hn_e = D.LoadHyperNet.execute("bench_elementwise.safetensors").args[0]
    concept = D.EncodeConcept.execute(hn_t, "watercolor").args[0]
    s_t = D.MakeSteering.execute(hn_t, concept).args[0]
    s_e = D.MakeSteering.execute(hn_e, concept).args[0]
    adv = D.ApplySteeringAdvanced.execute
    configs = {
        "unsteered": model,
        "hooks": adv(model, s_t, 1.0, 0.0, 1.0, "hooks", "all", "").args[0],
        "folded": adv(model, s_e, 1.0, 0.0, 1.0, "folded", "all", "").args[0],
        "folded+pooled": adv(model, s_t, 1.0, 0.0, 1.0, "folded", "all", "").args[0],
    }
    hooked_sites = {k: sum(len(w.interventions[0][0].sites) for w in P.wrappers_of(m)) for k, m in configs.items()}
    pos = H.random_cond("sdxl", 1, dim=a.context, latent_hw=(a.latent, a.latent))
    neg = H.random_cond("sdxl", 2, dim=a.context, latent_hw=(a.latent, a.latent))
    shape = (1, 4, a.latent, a.latent)

    def run(m):
        return H.sample(m, pos, neg, seed=3, steps=a.steps, cfg=2.0, latent_shape=shape)

    summary = site_summary(list_sites(dm))
    print(
        f"ComfyUI SDXL class, width {a.width}, context {a.context}: {n_params / 1e6:.1f}M params, "
        f"{summary['sites']} sites / {summary['channels']:,} channels; latent {a.latent}x{a.latent} "
        f"({a.latent * 8}px), {a.steps} euler steps, cfg 2 (cond+uncond batched), torch threads "
        f"{torch.get_num_threads()}; setup {time.perf_counter() - t0:.1f}s"
    )
    times: dict[str, list[float]] = {k: [] for k in configs}  # wall seconds
    cpu: dict[str, list[float]] = {k: [] for k in configs}  # this process's CPU seconds
    outs = {}
    names = list(configs)
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            outs[k] = run(configs[k])  # load / patch this clone
            t, c = time.perf_counter(), time.process_time()
            run(configs[k])
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    w0, c0, m0 = statistics.median(times["unsteered"]), statistics.median(cpu["unsteered"]), min(cpu["unsteered"])
    print(
        f"{'configuration':15s} {'wall s':>7s} {'x':>7s} {'CPU s':>7s} {'x':>7s} {'min CPU':>8s} {'x':>7s} "
        f"{'hooked sites':>13s}"
    )
    for k in names:
        w, c, m = statistics.median(times[k]), statistics.median(cpu[k]), min(cpu[k])
        print(f"{k:15s} {w:7.3f} {w / w0:6.3f}x {c:7.3f} {c / c0:6.3f}x {m:8.3f} {m / m0:6.3f}x {hooked_sites[k]:13d}")
    print(f"(medians over {a.rounds} rounds, and the minimum CPU time: the least disturbed run)")
    hooks_e = run(adv(model, s_e, 1.0, 0.0, 1.0, "hooks", "all", "").args[0])
    print(
        f"steered differs from unsteered: {not torch.equal(outs['hooks'], outs['unsteered'])}; "
        f"max |folded - hooked| (same elementwise maps): {(outs['folded'] - hooks_e).abs().max().item():.2e}"
    )
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
