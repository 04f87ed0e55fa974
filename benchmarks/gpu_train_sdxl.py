"""What training a HyperTransport hypernet on SDXL / DMD2 costs on one GPU, and an estimate of GPU hours.

    python benchmarks/gpu_train_sdxl.py                      # full-size SDXL UNet, bf16, on CUDA (< 8 min on an H100)
    python benchmarks/gpu_train_sdxl.py --tiny               # a tiny SDXL on the CPU: checks the script, numbers meaningless
    python benchmarks/gpu_train_sdxl.py --resolution 512 --concepts 2 --prompts 4

Builds the full-size SDXL UNet from ComfyUI's own classes (``comfy.supported_models.SDXL``, 2.6 B
parameters, all 256 norm sites / 294,080 channels) with random weights (timings do not depend on the
values), random text conditioning of SDXL's width (2048 tokens dims, 1280 pooled), and measures in one run:

1. ``fwd``: one sampler step without gradients for a batch of target prompts (what filling the target
   cache costs per image and step);
2. ``train``: one hypernet optimizer step (``trainer.train.train_step``: hypernet forward, K concepts ×
   P prompts sampled for S steps through the steered UNet with gradients, W2 loss, backward, AdamW),
   with and without gradient checkpointing, time and peak GPU memory (out of memory is reported, not fatal);
3. ``lineas``: one LinEAS step for one concept (P prompts, S steps, maps of every site);
4. ``hypernet``: one hypernet forward pass for one concept (the cost of a new concept at inference).

Estimate (printed for several N; ``E`` epochs over the training concepts, ``K`` concepts a step,
``n`` target prompts, ``S`` sampler steps, ``B`` the batch of the target pass)::

    targets_s  = N · n · S · fwd_per_image_step          # computed once, cached on disk (--cache disk)
    train_s    = ceil(E · N / K) · train_step_s
    gpu_hours  = (targets_s + train_s) / 3600             # divide by G GPUs for torchrun data parallel
    lineas_h   = N · L · lineas_step_s / 3600             # per-concept fitting of N concepts, L steps each

The epoch count that reaches a given held-out quality on real models is not known here (the paper does
not say); pass ``--epochs``. NOT YET RUN ON A GPU in this project: only ``--tiny`` on a CPU was run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

T0 = time.perf_counter()


def sdxl_unet_config(tiny: bool) -> dict:
    """The released SDXL UNet layout (ComfyUI's detection of sd_xl_base), or a tiny one for ``--tiny``."""
    cfg = {
        "num_classes": "sequential", "adm_in_channels": 2816, "use_linear_in_transformer": True,
        "context_dim": 64 if tiny else 2048, "model_channels": 64 if tiny else 320,
        "channel_mult": [1, 2] if tiny else [1, 2, 4],
        "num_res_blocks": [1, 1] if tiny else [2, 2, 2],
        "transformer_depth": [0, 1] if tiny else [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 1, 1] if tiny else [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "transformer_depth_middle": 1 if tiny else 10,
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    if not tiny:
        cfg["num_head_channels"] = 64
    return cfg


def build_patcher(tiny: bool, dtype: torch.dtype, device: torch.device):
    from hypertransport_comfy.comfyui import import_comfyui

    mm = import_comfyui()
    import comfy.model_patcher
    import comfy.supported_models as sm

    mc = sm.SDXL(sdxl_unet_config(tiny))
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "", device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # ComfyUI allocates layers uninitialised: fill every parameter
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).to(p.dtype) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu")), mm


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int = 1):
    """(seconds per call, peak bytes) over ``reps`` calls after one warm-up call."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    dt = (time.perf_counter() - t) / reps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return dt, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny SDXL on the CPU (checks the script; numbers meaningless)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights and autocast dtype")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (DMD2: 1024)")
    p.add_argument("--sampler-steps", type=int, default=4, help="DMD2: 4 (timesteps 999,749,499,249) or 1 (t=399)")
    p.add_argument("--concepts", type=int, default=4, help="K: concepts per hypernet step")
    p.add_argument("--prompts", type=int, default=4, help="P: source prompts per concept")
    p.add_argument("--n-target", type=int, default=24, help="n: target prompts per concept (cache)")
    p.add_argument("--target-batch", type=int, default=8, help="batch of the target (no-grad) pass")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions of each measurement (after one warm-up)")
    p.add_argument("--hidden", type=int, default=512, help="hypernet trunk width")
    p.add_argument("--rank", type=int, default=8, help="hypernet head rank")
    p.add_argument("--epochs", type=float, default=20, help="E for the estimate: passes over the training concepts")
    p.add_argument("--lineas-steps", type=int, default=1000, help="L for the LinEAS estimate (the papers: ~1000)")
    p.add_argument("--budget-s", type=float, default=420, help="skip the remaining measurements past this many seconds")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    a = p.parse_args(argv)

    if not a.tiny and not torch.cuda.is_available():
        print("gpu_train_sdxl.py needs a CUDA GPU for the full-size SDXL UNet (about 5 GB of bf16 weights plus "
              "activations). Run it on a GPU machine, or pass --tiny to check the script on the CPU.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.tiny:
        a.precision, a.resolution = "fp32", 64
        a.n_target, a.hidden = min(a.n_target, 4), min(a.hidden, 32)
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.precision]

    from ht_devkit.tiny import HashTextEncoder
    from hypertransport_comfy.backend import ComfyBackend
    from hypertransport_comfy.concepts import ListedConcepts, read_concepts, read_prompts
    from hypertransport_core import HyperNet, HyperNetConfig, LinEASConfig
    from trainer import train as T

    torch.manual_seed(0)
    patcher, _ = build_patcher(a.tiny, dtype, device)
    ctx = 64 if a.tiny else 2048
    concepts = read_concepts()[: max(8, 2 * a.concepts)]
    neutral = read_prompts()

    class _Enc:  # embeddings are random here; only the width matters
        identity = {"arch": "ViT-L-14", "fingerprint": "random", "embed_dim": 768}

    def backend_for(ckpt: bool) -> ComfyBackend:
        return ComfyBackend(patcher, HashTextEncoder(ctx, tokens=77, pooled_dim=1280), _Enc(), ListedConcepts(concepts, neutral),
                            family="sdxl", steps=a.sampler_steps, guidance=1.0, resolution=a.resolution,
                            precision=a.precision, grad_checkpoint=ckpt)

    b = backend_for(False)
    C = sum(s.channels for s in b.sites)
    n_params = sum(p.numel() for p in b.root.parameters())
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": a.tiny,
                 "precision": a.precision, "resolution": a.resolution, "sampler_steps": a.sampler_steps,
                 "unet_parameters": n_params, "sites": len(b.sites), "channels": C, "K": a.concepts, "P": a.prompts}
    print(f"SDXL UNet {n_params / 1e9:.3f} B parameters, {len(b.sites)} sites, {C:,} channels; {out['device']}, "
          f"{a.precision}, {a.resolution}px, {a.sampler_steps} steps (timesteps {b.sigmas.tolist()})", flush=True)

    def over_budget(what: str) -> bool:
        if time.perf_counter() - T0 > a.budget_s:
            print(f"skipping {what}: past --budget-s {a.budget_s:.0f}", flush=True)
            out[what] = "skipped (budget)"
            return True
        return False

    # 1. target pass (no grad)
    prompts = [f"{neutral[i % len(neutral)]}, {concepts[0].name}" for i in range(a.target_batch)]
    dt, peak = timed(lambda: b.run(prompts, list(range(a.target_batch))), device, a.reps)
    out["fwd_per_image_step_s"] = dt / (a.target_batch * a.sampler_steps)
    out["fwd_batch_peak_gb"] = peak / 2**30
    print(f"target pass: {dt:.3f} s for {a.target_batch} images x {a.sampler_steps} steps "
          f"= {1e3 * out['fwd_per_image_step_s']:.1f} ms per image-step, peak {peak / 2**30:.1f} GB", flush=True)

    # 2. hypernet training step, with and without gradient checkpointing
    K, P = a.concepts, a.prompts
    names = [c.name for c in concepts[:K]]
    cfg = T.TrainConfig(backend="comfy", out="/dev/null", concepts_per_step=K, prompts_per_concept=P, n_target=a.n_target,
                        sampler_steps=a.sampler_steps, guidance=1.0, hidden=a.hidden, rank=a.rank, steps=1000,
                        image_frac=0.0, precision=a.precision)
    g = torch.Generator().manual_seed(1)
    targets = {s.name: torch.randn((K, a.sampler_steps, a.n_target, s.channels), generator=g) for s in b.sites}
    text_emb = {c: torch.nn.functional.normalize(torch.randn(768, generator=g), dim=0) for c in names}

    def make_run(backend) -> T.Run:
        hn = HyperNet(HyperNetConfig(embed_dim=768, hidden=a.hidden, rank=a.rank), backend.sites, family="sdxl",
                      encoder=_Enc.identity)
        opt = torch.optim.AdamW(hn.parameters(), lr=1e-3)
        return T.Run(cfg, backend, names, [], hn, opt, text_emb, {}, targets, {c: i for i, c in enumerate(names)})

    out["hypernet_parameters"] = sum(p.numel() for p in make_run(b).hypernet.parameters())
    for ckpt in (True, False):
        key = f"train_step{'_ckpt' if ckpt else ''}"
        if over_budget(key):
            continue
        bk = b if not ckpt else backend_for(True)
        run = make_run(bk)
        try:
            dt, peak = timed(lambda r=run: T.train_step(r), device, a.reps)
            out[key + "_s"], out[key + "_peak_gb"] = dt, peak / 2**30
            print(f"hypernet step, K={K} x P={P}, grad checkpointing {'on ' if ckpt else 'off'}: {dt:.2f} s, "
                  f"peak {peak / 2**30:.1f} GB", flush=True)
        except torch.cuda.OutOfMemoryError:
            out[key + "_s"] = "out of memory"
            print(f"hypernet step, grad checkpointing {'on' if ckpt else 'off'}: out of memory", flush=True)
        finally:
            run = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if ckpt:  # later measurements on the plain model: rebuild the patcher's block forwards
            for m in bk.root.modules():
                if getattr(m, "_ht_ckpt", False):
                    del m.forward
                    m._ht_ckpt = False

    # 3. LinEAS step (one concept, P prompts)
    if not over_budget("lineas_step"):
        one = {k: v[0] for k, v in targets.items()}
        reps = max(1, a.reps)
        t0 = time.perf_counter()
        T.fit_concept_lineas(b, names[0], one, cfg, LinEASConfig(steps=1, lr=1e-3))
        sync(device)
        t1 = time.perf_counter()
        T.fit_concept_lineas(b, names[0], one, cfg, LinEASConfig(steps=1 + reps, lr=1e-3))
        sync(device)
        t2 = time.perf_counter()
        out["lineas_step_s"] = ((t2 - t1) - (t1 - t0)) / reps if reps else (t1 - t0)
        if out["lineas_step_s"] <= 0:
            out["lineas_step_s"] = (t2 - t1) / (1 + reps)
        print(f"LinEAS step (1 concept, P={P}): {out['lineas_step_s']:.2f} s", flush=True)

    # 4. hypernet forward for one concept
    hn = make_run(b).hypernet.eval()
    e = text_emb[names[0]][None]
    for dev in ([device] if device.type == "cpu" else [torch.device("cpu"), device]):
        h = hn.to(dev)
        with torch.no_grad():
            dt, _ = timed(lambda h=h, dev=dev: h(e.to(dev), "text"), dev, 10)
        out[f"hypernet_forward_{dev.type}_ms"] = 1e3 * dt
        print(f"hypernet forward (1 concept, {out['hypernet_parameters'] / 1e6:.1f} M parameters) on {dev.type}: "
              f"{1e3 * dt:.2f} ms", flush=True)

    # estimate
    print("\nEstimate (formula in this script's docstring; E = --epochs, one GPU, divide by G for G GPUs):")
    step = out.get("train_step_ckpt_s") if isinstance(out.get("train_step_ckpt_s"), float) else out.get("train_step_s")
    rows = []
    for N in (100, 1000, 10000):
        tgt_s = N * a.n_target * a.sampler_steps * out["fwd_per_image_step_s"]
        tr_s = math.ceil(a.epochs * N / K) * step if isinstance(step, float) else float("nan")
        lin_h = N * a.lineas_steps * out["lineas_step_s"] / 3600 if isinstance(out.get("lineas_step_s"), float) else float("nan")
        rows.append({"N": N, "targets_h": tgt_s / 3600, "train_h": tr_s / 3600, "gpu_hours": (tgt_s + tr_s) / 3600,
                     "lineas_h": lin_h, "target_cache_gb": N * a.sampler_steps * a.n_target * C * 2 / 2**30})
        r = rows[-1]
        print(f"  N={N:>6}: targets {r['targets_h']:8.2f} h + training {r['train_h']:8.2f} h = {r['gpu_hours']:8.2f} GPU h "
              f"(cache {r['target_cache_gb']:,.0f} GB on disk); LinEAS per concept x N: {r['lineas_h']:8.1f} GPU h")
    out["estimate"] = rows
    out["epochs"] = a.epochs
    out["wall_s"] = time.perf_counter() - T0
    print(f"\ntotal {out['wall_s']:.0f} s" + ("  (--tiny on CPU: the numbers say nothing about a GPU)" if a.tiny else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
