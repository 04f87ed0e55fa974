"""Rebuild the embedded world's models from a seed: HT-World-CLIP first, then the UNet (ComfyUI's classes).

    python -m hypertransport_world.build --seed 0 --out hypertransport_world/weights
    python -m hypertransport_world.build --stage unet     # retrain the UNet against the CLIP already in --out

Both trainings run a fixed number of steps (their schedules follow the steps), so the recipe is the
same on a CPU or a GPU (``--device cuda``). Writes ``HT-World-CLIP.safetensors`` (open_clip layout) with
its open_clip config ``HT-World-CLIP.json``, ``world_unet.safetensors`` (ComfyUI's UNet, fp16) and
``build_stats.json``; the UNet's EMA weights are also written every 1000 steps, so a long run can be
inspected (and sampled) while it trains. The quality printed at the end is measured from pixels on images
sampled by ComfyUI's own sampler (``hypertransport_world.quality``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch

log = logging.getLogger("hypertransport_world.build")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of both trainings")
    p.add_argument("--out", default="hypertransport_world/weights", help="output folder")
    p.add_argument("--stage", choices=["all", "clip", "unet", "eval"], default="all",
                   help="what to (re)build; 'unet' loads the CLIP already in --out, 'eval' only measures")
    p.add_argument("--clip-minutes", type=float, default=60.0, help="CLIP wall-clock guard (stops early, shortening the schedule)")
    p.add_argument("--clip-steps", type=int, default=2000, help="CLIP optimizer steps")
    p.add_argument("--clip-batch", type=int, default=128, help="CLIP images (and captions) per step")
    p.add_argument("--unet-minutes", type=float, default=150.0, help="UNet wall-clock guard (stops early, shortening the schedule)")
    p.add_argument("--unet-steps", type=int, default=5000, help="UNet optimizer steps")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-eval", action="store_true", help="skip the quality evaluation at the end")
    p.add_argument("--eval-n", type=int, default=520, help="images in the final evaluation")
    p.add_argument("--eval-steps", type=int, default=8, help="sampler steps of the final evaluation")
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
    from hypertransport_comfy.comfyui import check_device, import_comfyui

    check_device(device)

    import_comfyui()
    from . import model as WM
    from . import train_unet as TU
    from . import world_clip as C

    os.makedirs(a.out, exist_ok=True)
    clip_path = os.path.join(a.out, WM.CLIP_FILE)
    unet_path = os.path.join(a.out, WM.UNET_FILE)

    if a.stage in ("all", "clip"):
        log.info("training HT-World-CLIP: %d steps on %s (guard %.0f min)", a.clip_steps, device, a.clip_minutes)
        clip, stats = C.train_clip(
            C.ClipTrainConfig(seed=a.seed, minutes=a.clip_minutes, steps=a.clip_steps, batch=a.clip_batch, device=device)
        )
        stats["zero_shot"] = C.zero_shot_accuracy(clip, C.get_tokenizer())
        log.info("clip: %s", stats)
        C.save_clip(clip, clip_path, stats)
        C.write_open_clip_config(os.path.join(a.out, f"{C.MODEL_NAME}.json"))
        _update_stats(a.out, "clip", stats)
    comfy_clip = WM.text_encoder(WM.open_clip_state_dict(clip_path))

    if a.stage in ("all", "unet"):
        log.info("training the world UNet: %d steps on %s (guard %.0f min)", a.unet_steps, device, a.unet_minutes)

        def checkpoint(ema, step):
            WM.save_unet(ema, unet_path, {"steps": step, "partial": True})
            log.info("saved EMA weights at step %d", step)

        cfg = TU.UNetTrainConfig(seed=a.seed, minutes=a.unet_minutes, steps=a.unet_steps, device=device)
        t0 = time.time()
        model, stats = TU.train_unet(comfy_clip, cfg, on_checkpoint=checkpoint)
        log.info("unet: %s (%.1f min)", stats, (time.time() - t0) / 60)
        WM.save_unet(model.diffusion_model, unet_path, stats)
        _update_stats(a.out, "unet", stats)

    if not a.no_eval and a.stage in ("all", "unet", "eval"):
        from .quality import evaluate_world

        q = evaluate_world(WM.load(a.out), n=a.eval_n, steps=a.eval_steps)
        log.info("quality: %s", q)
        _update_stats(a.out, f"quality_{a.eval_steps}_steps", q)


if __name__ == "__main__":
    main()
