"""Rebuild the embedded world's models from a seed: HT-World-CLIP first, then the UNet.

    python -m trainer.world.build --seed 0 --out trainer/world/weights
    python -m trainer.world.build --stage unet          # retrain the UNet against the saved CLIP

Both trainings run a fixed number of steps (their schedules follow the steps), so the recipe is the
same on a CPU (about 20 + 40 minutes with 2 threads here) or a GPU (``--device cuda``: a few minutes).

Writes ``world_clip.safetensors`` and ``world_unet.safetensors`` (fp16, config JSON in the
safetensors metadata) and ``build_stats.json``; the UNet's EMA weights are also saved every
1000 steps so a long run can be inspected while it trains.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

from trainer.config import check_device

from . import clip_model as C
from . import diffusion as D

log = logging.getLogger("trainer.world.build")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of both trainings")
    p.add_argument("--out", default="trainer/world/weights", help="output folder")
    p.add_argument(
        "--stage",
        choices=["all", "clip", "unet", "eval"],
        default="all",
        help="what to (re)build; 'unet' loads the CLIP already in --out",
    )
    p.add_argument("--clip-minutes", type=float, default=60.0, help="CLIP wall-clock guard (stops early, shortening the schedule)")
    p.add_argument("--clip-steps", type=int, default=2000, help="CLIP optimizer steps")
    p.add_argument("--clip-batch", type=int, default=128, help="CLIP images (and captions) per step")
    p.add_argument("--unet-minutes", type=float, default=90.0, help="UNet wall-clock guard (stops early, shortening the schedule)")
    p.add_argument("--unet-steps", type=int, default=4000, help="UNet optimizer steps")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest when other jobs share 2 cores)"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the quality evaluation at the end")
    p.add_argument("--eval-n", type=int, default=360, help="images in the final evaluation")
    a = p.parse_args(argv)
    if a.clip_minutes <= 0 or a.unet_minutes <= 0:
        p.error("--clip-minutes and --unet-minutes must be > 0 (e.g. 10 and 60)")
    return a


def _update_stats(out: str, key: str, value) -> None:
    path = os.path.join(out, "build_stats.json")
    stats = json.load(open(path)) if os.path.exists(path) else {}
    stats[key] = value
    with open(path + ".tmp", "w") as f:
        json.dump(stats, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    check_device(device)
    os.makedirs(a.out, exist_ok=True)
    clip_path = os.path.join(a.out, "world_clip.safetensors")
    unet_path = os.path.join(a.out, "world_unet.safetensors")

    if a.stage in ("all", "clip"):
        log.info("training HT-World-CLIP: %d steps on %s (guard %.0f min)", a.clip_steps, device, a.clip_minutes)
        clip, stats = C.train_clip(
            C.ClipTrainConfig(seed=a.seed, minutes=a.clip_minutes, steps=a.clip_steps, batch=a.clip_batch, device=device)
        )
        stats["zero_shot"] = C.zero_shot_accuracy(clip, C.get_tokenizer())
        log.info("clip: %s", stats)
        C.save_clip(clip, clip_path, stats)
        _update_stats(a.out, "clip", stats)
    clip, tok = C.load_world_clip(clip_path)

    if a.stage in ("all", "unet"):
        log.info("training the world UNet: %d steps on %s (guard %.0f min)", a.unet_steps, device, a.unet_minutes)

        def checkpoint(ema, step):
            D.save_unet(ema, unet_path, {"steps": step, "partial": True})
            log.info("saved EMA weights at step %d", step)

        cfg = D.UNetTrainConfig(seed=a.seed, minutes=a.unet_minutes, steps=a.unet_steps, device=device)
        t0 = time.time()
        unet, stats = D.train_unet(clip, tok, cfg, on_eval=checkpoint)
        log.info("unet: %s (%.1f min)", stats, (time.time() - t0) / 60)
        D.save_unet(unet, unet_path, stats)
        _update_stats(a.out, "unet", stats)

    if not a.no_eval and a.stage in ("all", "unet", "eval"):
        from .evaluate import evaluate_world

        unet = D.load_world_unet(unet_path, device)
        q = evaluate_world(unet, clip.to(device), tok, n=a.eval_n)
        log.info("quality: %s", q)
        _update_stats(a.out, "quality", q)


if __name__ == "__main__":
    main()
