"""The trainer's config (:class:`TrainConfig`), and config dataclasses ↔ config files (JSON or TOML) ↔
``--flags``, checked up front.

Each field's help text is the comment on its line in the dataclass source, so the defaults and
their documentation stay together (nanoGPT style) and ``--help`` shows both.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
from dataclasses import dataclass
from typing import Any, get_type_hints

import tomllib

from hypertransport_comfy.comfyui import check_device
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.hypernet import check_templates
from hypertransport_core.ot import LOSS_ALIASES, LOSSES

#: the embedded world's files (HT-World-CLIP, the UNet and the shipped hypernet)
WORLD_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hypertransport_world", "weights")
#: the hypernet a default `python trainer/train.py` run writes, and the copy of one shipped with the world
RUN_HYPERNET = os.path.join("runs", "world", "hypernet.safetensors")
SHIPPED_HYPERNET = os.path.join(WORLD_WEIGHTS, "world_hypernet.safetensors")


def default_hypernet() -> str:
    """``runs/world/hypernet.safetensors`` when a default training run made one, else the shipped hypernet."""
    return RUN_HYPERNET if os.path.isfile(RUN_HYPERNET) else SHIPPED_HYPERNET


def field_help(cls) -> dict[str, str]:
    """``{field: comment}`` read from the ``name: type = default  # comment`` lines of ``cls``."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise HyperTransportError(f"config file {path!r} does not exist. Fix: pass an existing .json or .toml file.")
    if not path.endswith((".toml", ".json")):
        raise HyperTransportError(f"config file {path!r}: use a .json or .toml file.")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f) if path.endswith(".toml") else json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise HyperTransportError(f"config file {path!r} cannot be read ({type(e).__name__}: {str(e)[:120]}). "
                                  "Fix: correct the file's syntax.") from None
    if not isinstance(data, dict):
        raise HyperTransportError(f"config file {path!r} holds a {type(data).__name__}, not a table of options. "
                                  "Fix: write options as name = value (TOML) or {\"name\": value} (JSON).")
    return data


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser(cls, description: str, extra: list[tuple[tuple, dict]] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)  # defaults are written into each help below
    p.add_argument("--config", help="a .json or .toml file with any of the options below (flags override it)")
    helps = field_help(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = helps.get(f.name, "")
        kw: dict[str, Any] = {"default": None, "help": text if "(default" in text else f"{text} (default: {default!r})"}
        if t is bool:
            kw["type"], kw["nargs"], kw["const"] = _parse_bool, "?", True
        elif t in (int, float, str):
            kw["type"] = t
        elif "float" in str(t):
            kw["type"] = float
        elif "int" in str(t):
            kw["type"] = int
        else:
            kw["type"] = str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    for args, kw in extra:
        p.add_argument(*args, **kw)
    return p


def resolve(cls, ns: argparse.Namespace):
    """defaults < config file < flags → an instance of ``cls``."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if getattr(ns, "config", None):
        for k, v in load_config_file(ns.config).items():
            k = k.replace("-", "_")
            if k not in names:
                raise HyperTransportError(f"config file {ns.config!r}: unknown option {k!r}. Known: {sorted(names)}")
            values[k] = v
    for k in names:
        v = getattr(ns, k, None)
        if v is not None:
            values[k] = v
    return cls(**values)


@dataclass
class TrainConfig:
    backend: str = "world"  # "world": the embedded default model shipped in hypertransport_world/weights
    world_weights: str = WORLD_WEIGHTS  # folder with the world's files (backend "world"): HT-World-CLIP and world_unet .safetensors
    out: str = "runs/world"  # run folder: hypernet, checkpoint, target cache, logs
    seed: int = 0  # seeds the split, the batches and the hypernet init
    holdout_frac: float = 0.25  # share of concepts held out (never seen by the hypernet)
    holdout: str = ""  # file of held-out concept names, one per line (replaces holdout_frac)
    val_frac: float = 0.15  # share of the other concepts kept out of training as the validation set (choose configurations on it; the held-out test concepts stay untouched)
    concepts: str = ""  # file restricting the concept list, one per line (default: all of the backend's)
    n_target: int = 16  # target prompts per concept whose activations are cached
    concepts_per_step: int = 8  # concepts in one batch (8 reached a lower validation loss than 16 or 4 in the same CPU time, docs/benchmarks.md)
    prompts_per_concept: int = 2  # source prompts per concept in one batch
    balance_kinds: float = 1.0  # a kind's share of each batch ~ (its training concepts)^this: 1 = proportional (uniform over concepts), 0 = equal shares
    steps: int = 450  # optimizer steps (the default run trains ~5 min on two idle CPU cores; the shipped hypernet trained longer)
    lr: float = 6e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    hidden: int = 512  # hypernet trunk width
    depth: int = 1  # hypernet trunk layers (1 generalizes to held-out pattern compositions better than 2 on the embedded world)
    rank: int = 16  # rank of each site's head
    dropout: float = 0.0  # dropout in the hypernet trunk while training
    text_templates: str = ""  # a text concept is its mean embedding over these '|'-separated phrases, "{}" = the concept (e.g. "{}|a {} circle"); recorded in the hypernet, which the nodes then encode with. "" = the bare text
    embed_noise: float = 0.0  # training only: Gaussian noise of this expected norm added to each concept embedding (unit norm) before the hypernet, then re-normalized; 0 = none
    image_frac: float = 0.25  # share of training concepts given as a reference-image embedding
    n_refs: int = 8  # reference images rendered per concept (image-embedding inputs)
    loss: str = "w2_quantile"  # "w2_quantile" (per-channel W2, quantile-interpolated), "w2_exact" (POT) or "sliced"
    loss_steps: str = "one"  # sampler steps the training loss compares: "all", or "one" drawn per batch (the sampler stops there and only that step is backpropagated: the same objective in expectation, for less work)
    sampler_steps: int = 4  # sampler steps per generation
    guidance: float = 2.0  # classifier-free guidance of the sampler (1 = none)
    form: str = "pooled"  # map form at spatial (GroupNorm) sites: "pooled" or "elementwise"
    ckpt_every: int = 50  # steps between checkpoints (0: only at the end)
    eval_every: int = 50  # steps between validation-loss evaluations (0: only at the end)
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: str = "auto"  # where ComfyUI runs the model: "auto" (CUDA when available), "cpu" (ComfyUI --cpu) or "cuda"; the hypernet stays on the CPU. Not carried over by hypernet files
    max_minutes: float = 14.0  # stop early (checkpoint + hypernet saved) after this long, a guard for slow machines (0: no limit)
    resume: bool = False  # continue from <out>/checkpoint.safetensors
    model: str = ""  # --backend comfy: checkpoint or diffusion-model .safetensors, loaded with ComfyUI's own loaders
    text_encoders: str = ""  # --backend comfy: comma-separated text encoder files, when --model holds none
    clip_type: str = "stable_diffusion"  # --backend comfy: ComfyUI CLIPType of --text-encoders (stable_diffusion, sdxl, pixart, flux, ...)
    clip_arch: str = "ViT-L-14"  # --backend comfy: open_clip architecture of the concept encoder (or an open_clip config .json)
    clip_weights: str = ""  # --backend comfy: local open_clip weights file of the concept encoder
    concept_list: str = ""  # --backend comfy: concept<TAB>category file (default trainer/data/concepts.tsv)
    neutral_prompts: str = ""  # --backend comfy: neutral prompts, one a line (default trainer/data/neutral_prompts.txt)
    resolution: int = 0  # --backend comfy: image side in pixels (0: the family's default)
    timesteps: str = ""  # --backend comfy: comma-separated fixed timesteps, one per step (default: the family's, DMD2 999,749,499,249)
    precision: str = "auto"  # "fp32", "bf16" or "fp16" autocast of the diffusion model while training ("auto": bf16 for the world, fp32 for comfy)
    grad_checkpoint: bool = False  # --backend comfy: recompute block activations in backward (less memory, slower)
    cache: str = "memory"  # target cache: "memory" (<out>/targets.safetensors, loaded whole) or "disk" (<out>/targets/ shards, read per batch)
    cache_chunk: int = 4  # --cache disk: concepts per target shard

    def check(self) -> None:
        """Raise ``HyperTransportError`` with the fix for the first bad value."""
        def bad(name, why):
            raise HyperTransportError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {why}")

        if self.backend not in ("world", "comfy"):
            bad("backend", "must be 'world' (the embedded model) or 'comfy' (a ComfyUI model file, with --model).")
        if self.cache not in ("memory", "disk"):
            bad("cache", "must be 'memory' or 'disk'.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            bad("precision", "must be auto, fp32, bf16 or fp16.")
        if self.cache_chunk < 1:
            bad("cache_chunk", "must be at least 1.")
        if not 0 < self.holdout_frac < 1:
            bad("holdout_frac", "must be between 0 and 1 (e.g. 0.25).")
        if not 0 <= self.val_frac < 1:
            bad("val_frac", "must be in [0, 1) (e.g. 0.15; 0 = no validation set).")
        for name in ("n_target", "concepts_per_step", "prompts_per_concept", "steps", "hidden", "depth", "rank", "sampler_steps", "n_refs"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1.")
        if self.n_target < 2 or self.prompts_per_concept < 2:
            bad("prompts_per_concept" if self.prompts_per_concept < 2 else "n_target", "needs at least 2 samples to compare distributions.")
        if not 0 < self.lr <= 1:
            bad("lr", "must be in (0, 1]: AdamW steps of that size already throw the maps out of range (e.g. 3e-3).")
        if not 0 <= self.image_frac <= 1:
            bad("image_frac", "must be in [0, 1].")
        if not 0 <= self.embed_noise <= 2:
            bad("embed_noise", "must be in [0, 2] (the noise's norm beside unit-norm embeddings; e.g. 0.1).")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1) (e.g. 0.1).")
        if not 0 <= self.balance_kinds <= 1:
            bad("balance_kinds", "must be in [0, 1] (1: batches proportional to each kind's size, 0: equal shares).")
        if self.text_templates:
            try:
                check_templates(self.template_list(), "--text-templates")
            except HyperTransportError as e:
                bad("text_templates", str(e).split(": ", 1)[1])
        if LOSS_ALIASES.get(self.loss, self.loss) not in LOSSES:
            bad("loss", f"must be one of {LOSSES}.")
        if self.loss_steps not in ("all", "one"):
            bad("loss_steps", "must be 'all' (the loss at every sampler step) or 'one' (at one step drawn per batch).")
        if self.form not in ("pooled", "elementwise"):
            bad("form", "must be 'pooled' or 'elementwise'.")
        if self.guidance < 1:
            bad("guidance", "must be >= 1.")
        if self.device != "auto":
            check_device(self.device)
        for name in ("holdout", "concepts"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                bad(name, "file does not exist. Fix: give a text file with one concept name per line.")

    def template_list(self) -> tuple[str, ...]:
        """``--text-templates`` as phrases: a '|'-separated string, or a list (as a config file may give it)."""
        t = self.text_templates
        if isinstance(t, (list, tuple)):
            return tuple(t)
        if not isinstance(t, str):
            raise HyperTransportError(f"--text-templates={str(t)[:60]!r}: give '|'-separated phrases, or a list of phrases in "
                                      "a config file, e.g. \"{}|a photo of {}\".")
        return tuple(x for x in t.split("|") if x)


RESUME_KEYS = ("backend", "seed", "holdout_frac", "holdout", "val_frac", "concepts", "n_target", "concepts_per_step",
                "prompts_per_concept", "balance_kinds", "lr", "weight_decay", "hidden", "depth", "rank", "dropout", "image_frac", "n_refs", "text_templates", "embed_noise",
                "loss", "loss_steps", "sampler_steps", "guidance", "form", "model", "concept_list", "neutral_prompts", "resolution",
                "timesteps")


def train_config_of(hypernet) -> TrainConfig:
    """The training config a hypernet file records (unknown keys from other versions are ignored; the device
    it was trained on is not carried over)."""
    saved = dict(getattr(hypernet, "training_summary", {}).get("config", {}))
    saved.pop("device", None)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def parse_overrides(items: list[str]) -> dict:
    """``["steps=800", "rank=32"]`` → typed TrainConfig overrides (unknown names refused with the list)."""
    hints = get_type_hints(TrainConfig)
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            raise HyperTransportError(f"--set {item!r}: expected name=value with a trainer option, e.g. steps=800. "
                             f"Options: {', '.join(sorted(hints))}")
        typ = hints[key]
        try:
            out[key] = (val.strip().lower() in ("1", "true", "yes")) if typ is bool else typ(val.strip())
        except (TypeError, ValueError):
            raise HyperTransportError(f"--set {item!r}: {val.strip()!r} is not a {getattr(typ, '__name__', typ)}. "
                                      "Fix: e.g. steps=800, lr=0.003.") from None
    return out
