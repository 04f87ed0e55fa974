"""Shared by the trainer tests: a tiny training config on a short concept list (tiny random world)."""

from __future__ import annotations

from pathlib import Path

CONCEPTS = ["red", "blue", "green", "navy", "white", "gold", "horizontal-striped", "coarse-checkered", "fine-dotted", "crimson"]


def tiny_config(folder: Path, **overrides):
    """A ``TrainConfig`` writing to ``folder/run``, training on :data:`CONCEPTS` (written to ``folder``)."""
    from trainer.config import TrainConfig

    folder.mkdir(parents=True, exist_ok=True)
    lst = folder / "concepts.txt"
    lst.write_text("\n".join(CONCEPTS) + "\n")
    base = dict(out=str(folder / "run"), steps=6, n_target=4, concepts_per_step=3, prompts_per_concept=3, n_refs=2,
                sampler_steps=2, ckpt_every=3, eval_every=0, hidden=32, rank=4, lr=1e-2, concepts=str(lst),
                holdout_frac=0.3, max_minutes=0.0)
    base.update(overrides)
    return TrainConfig(**base)
