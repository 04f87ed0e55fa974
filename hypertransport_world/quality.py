"""The world's text-to-image quality, measured from pixels on images sampled by ComfyUI's own sampler.

    python -m hypertransport_world.quality --n 360 --steps 8 [--grid samples.png]

Prints (and returns) colour within 40 RGB units, mean colour error, shape accuracy, pattern accuracy of
prompted patterns, and position consistency (same seed, different colour). Images are made as
CLIPTextEncode → KSampler (euler, simple, guidance 2) → VAE Decode would make them.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from . import metrics as M
from . import scene as W


def sampler_for(world, steps: int, guidance: float):
    """``prompts, seeds -> (B, 3, 32, 32)`` images of the loaded world (``model.WorldModels``)."""
    from hypertransport_comfy import sampling

    from . import model as WM

    encode = sampling.PromptEncoder(world.clip)

    def run(prompts, seeds):
        imgs = sampling.generate(world.model, world.vae, encode, prompts, seeds, steps=steps, cfg=guidance,
                                 sampler=WM.SAMPLING.sampler, scheduler=WM.SAMPLING.scheduler,
                                 latent_shape=(3, WM.SIDE, WM.SIDE))
        return imgs.permute(0, 3, 1, 2)

    return run


@torch.no_grad()
def evaluate_world(world, n: int = 360, steps: int = 8, guidance: float = 2.0, seed: int = 0, n_pos: int = 48) -> dict:
    """Quality of the loaded world on ``n`` full captions 'a {colour} {pattern} {shape}' (plus n/3 colour-only).

    Returns a dict of rates in [0, 1] and errors in RGB units / pixels.
    """
    run = sampler_for(world, steps, guidance)
    rng = np.random.default_rng(10_000 + seed)
    specs = W.sample_specs(n, rng, p_colour=1.0, p_pattern=1.0)
    prompts = [W.caption(s) for s in specs]
    seeds = [100_000 + seed * 10_000 + i for i in range(n)]
    t0 = time.time()
    imgs = run(prompts, seeds)
    dt = time.time() - t0
    errs = np.array([M.colour_error(im, W.COLOURS[s.colour]) for im, s in zip(imgs, specs)])
    shape_ok = [M.shape_of(im) == s.shape for im, s in zip(imgs, specs)]
    pats = [M.pattern_of(im) for im in imgs]
    pat_ok = [p == s.pattern for p, s in zip(pats, specs)]
    pat_score = [M.pattern_score(im, s.pattern) for im, s in zip(imgs, specs)]
    per_pattern = {
        p: float(np.mean([ok for ok, s in zip(pat_ok, specs) if s.pattern == p]))
        for p in W.PATTERNS
        if any(s.pattern == p for s in specs)
    }
    # colour-only prompts ("a red circle")
    m = max(n // 3, 1)
    cspecs = W.sample_specs(m, rng, p_colour=1.0, p_pattern=0.0)
    cimgs = run([W.caption(s) for s in cspecs], seeds[:m])
    cerrs = np.array([M.colour_error(im, W.COLOURS[s.colour]) for im, s in zip(cimgs, cspecs)])
    cshape = [M.shape_of(im) == s.shape for im, s in zip(cimgs, cspecs)]
    # position: same seed and shape, two different colours; baseline: two different seeds
    shapes = [W.SHAPES[i % 3] for i in range(n_pos)]
    cols = rng.choice(W.COLOUR_NAMES, size=(n_pos, 2))
    pseeds = [7_000_000 + i for i in range(n_pos)]
    ia = run([f"a {c[0]} {s}" for c, s in zip(cols, shapes)], pseeds)
    ib = run([f"a {c[1]} {s}" for c, s in zip(cols, shapes)], pseeds)
    pos_a = [M.position_of(x) for x in ia]
    pos_b = [M.position_of(x) for x in ib]
    same = [np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(pos_a, pos_b) if a and b]
    diff = [np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in zip(pos_a, pos_b[1:] + pos_b[:1]) if a and b]
    return {
        "n": n,
        "steps": steps,
        "guidance": guidance,
        "colour_within40": float((errs <= M.COLOUR_TOLERANCE).mean()),
        "colour_error_mean": float(errs.mean()),
        "colour_error_median": float(np.median(errs)),
        "shape_acc": float(np.mean(shape_ok)),
        "pattern_acc": float(np.mean(pat_ok)),
        "pattern_score_mean": float(np.mean(pat_score)),
        "pattern_acc_by_pattern": per_pattern,
        "colour_only_within40": float((cerrs <= M.COLOUR_TOLERANCE).mean()),
        "colour_only_shape_acc": float(np.mean(cshape)),
        "position_shift_same_seed_px": float(np.mean(same)) if same else None,
        "position_shift_other_seed_px": float(np.mean(diff)) if diff else None,
        "sample_seconds_per_image": dt / n,
    }


def save_grid(imgs: torch.Tensor, path: str, titles: list[str] | None = None, cols: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(imgs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6))
    for k, ax in enumerate(np.atleast_1d(axes).flat):
        ax.axis("off")
        if k < len(imgs):
            ax.imshow(W.to_uint8(imgs[k : k + 1])[0])
            if titles:
                ax.set_title(titles[k], fontsize=4)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="hypertransport_world/weights", help="folder with the world's files")
    p.add_argument("--n", type=int, default=360, help="full-caption samples")
    p.add_argument("--steps", type=int, default=8, help="sampler steps")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--grid", default=None, help="also save a PNG grid of 48 samples here")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from hypertransport_comfy.comfyui import import_comfyui

    import_comfyui()
    from . import model as WM

    world = WM.load(a.weights)
    q = evaluate_world(world, n=a.n, steps=a.steps, guidance=a.guidance)
    print(json.dumps(q, indent=2))
    if a.grid:
        specs = W.sample_specs(48, np.random.default_rng(5), p_colour=0.9, p_pattern=0.9)
        prompts = [W.caption(s) for s in specs]
        save_grid(sampler_for(world, a.steps, a.guidance)(prompts, list(range(48))), a.grid, prompts)


if __name__ == "__main__":
    main()
