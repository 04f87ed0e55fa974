"""Train a HyperTransport hypernet with the optimal-transport loss (METHOD §3, §5).

    python trainer/train.py                         # the embedded world, default run (~15 min, 2 cores)
    python trainer/train.py --steps 50 --out runs/quick
    python trainer/train.py --config my.toml --resume

Each step takes a batch of training concepts, maps their CLIP embeddings to maps for every site,
runs neutral source prompts through the sampler with those maps active (each concept steering its
own block of rows), and pulls the pooled activations at every site and step towards the cached
activations of the concept's own prompts (per-channel 1-D W2). Held-out concepts are never shown to
the hypernet.

The run folder (``--out``) gets ``hypernet.safetensors`` (the core's file format),
``checkpoint.safetensors`` (every ``--ckpt-every`` steps, atomic; ``--resume`` continues from it),
``targets.safetensors`` (the target activation cache, reused across runs with the same settings),
``split.json`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # `python trainer/train.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from hypertransport_core import (
    HyperNet,
    HyperNetConfig,
    LinEASConfig,
    Steering,
    capture_pooled,
    fit_lineas,
    save_hypernet,
    steer,
    w2_quantile,
)
from hypertransport_core.files import _atomic_save
from trainer.backends import WORLD_WEIGHTS, WorldBackend
from trainer.config import build_parser, check_device, resolve

log = logging.getLogger("hypertransport.train")


@dataclass
class TrainConfig:
    backend: str = "world"  # "world": the embedded default model shipped in trainer/world/weights
    world_weights: str = WORLD_WEIGHTS  # folder with world_clip/world_unet .safetensors (backend "world")
    out: str = "runs/world"  # run folder: hypernet, checkpoint, target cache, logs
    seed: int = 0  # seeds the split, the batches and the hypernet init
    holdout_frac: float = 0.25  # share of concepts held out (never seen by the hypernet)
    holdout: str = ""  # file of held-out concept names, one per line (replaces holdout_frac)
    concepts: str = ""  # file restricting the concept list, one per line (default: all of the backend's)
    n_target: int = 24  # target prompts per concept whose activations are cached
    concepts_per_step: int = 16  # concepts in one batch
    prompts_per_concept: int = 3  # source prompts per concept in one batch
    balance_kinds: float = 1.0  # a kind's share of each batch ~ (its training concepts)^this: 1 = proportional (uniform over concepts), 0 = equal shares
    steps: int = 200  # optimizer steps
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    hidden: int = 512  # hypernet trunk width
    depth: int = 1  # hypernet trunk layers (1 generalizes to held-out pattern compositions better than 2 on the embedded world)
    rank: int = 16  # rank of each site's head
    dropout: float = 0.0  # dropout in the hypernet trunk while training
    image_frac: float = 0.25  # share of training concepts given as a reference-image embedding
    n_refs: int = 8  # reference images rendered per concept (image-embedding inputs)
    loss: str = "w2_channels"  # "w2_channels" (per-channel W2, quantile-interpolated) or "sliced"
    sampler_steps: int = 4  # sampler steps per generation
    guidance: float = 2.0  # classifier-free guidance of the sampler (1 = none)
    form: str = "pooled"  # map form at spatial (GroupNorm) sites: "pooled" or "elementwise"
    ckpt_every: int = 50  # steps between checkpoints (0: only at the end)
    eval_every: int = 100  # steps between held-out loss evaluations (0: only at the end)
    threads: int = 0  # torch CPU threads (0: torch's default)
    device: str = "cpu"  # --backend world: torch device of the world's models ("cuda", "cuda:1"); the hypernet stays on the CPU. Not recorded as a property of the hypernet
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
    precision: str = "auto"  # "fp32", "bf16" or "fp16" autocast of the diffusion model ("auto": bf16 for the world on CPU, fp32 for comfy)
    grad_checkpoint: bool = False  # --backend comfy: recompute block activations in backward (less memory, slower)
    cache: str = "memory"  # target cache: "memory" (<out>/targets.safetensors, loaded whole) or "disk" (<out>/targets/ shards, read per batch)
    cache_chunk: int = 4  # --cache disk: concepts per target shard

    def check(self) -> None:
        """Raise ``SystemExit`` with the fix for the first bad value."""
        def bad(name, why):
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {why}")

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
        for name in ("n_target", "concepts_per_step", "prompts_per_concept", "steps", "hidden", "depth", "rank", "sampler_steps", "n_refs"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1.")
        if self.n_target < 2 or self.prompts_per_concept < 2:
            bad("prompts_per_concept" if self.prompts_per_concept < 2 else "n_target", "needs at least 2 samples to compare distributions.")
        if not self.lr > 0:
            bad("lr", "must be > 0 (e.g. 3e-3).")
        if not 0 <= self.image_frac <= 1:
            bad("image_frac", "must be in [0, 1].")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1) (e.g. 0.1).")
        if not 0 <= self.balance_kinds <= 1:
            bad("balance_kinds", "must be in [0, 1] (1: batches proportional to each kind's size, 0: equal shares).")
        if self.loss not in ("w2_channels", "sliced"):
            bad("loss", "must be 'w2_channels' or 'sliced'.")
        if self.form not in ("pooled", "elementwise"):
            bad("form", "must be 'pooled' or 'elementwise'.")
        if self.guidance < 1:
            bad("guidance", "must be >= 1.")
        check_device(self.device)
        for name in ("holdout", "concepts"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                bad(name, "file does not exist. Fix: give a text file with one concept name per line.")


# Fields that change what a checkpoint means; a resume with other values is refused.
_RESUME_KEYS = ("backend", "seed", "holdout_frac", "holdout", "concepts", "n_target", "concepts_per_step",
                "prompts_per_concept", "balance_kinds", "lr", "weight_decay", "hidden", "depth", "rank", "dropout", "image_frac", "n_refs",
                "loss", "sampler_steps", "guidance", "form", "model", "concept_list", "neutral_prompts", "resolution",
                "timesteps")


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: TrainConfig
    backend: WorldBackend
    train: list[str]
    holdout: list[str]
    hypernet: HyperNet
    opt: torch.optim.Optimizer
    text_emb: dict[str, torch.Tensor]  # concept -> (d,)
    image_emb: dict[str, torch.Tensor]  # concept -> (n_refs, d)
    targets: dict[str, torch.Tensor]  # site -> (n_concepts, sampler_steps, n_target, C) for train + holdout
    index: dict[str, int]  # concept -> row in targets
    step: int = 0
    shard: tuple[int, int] | None = None  # (rank, world size) under torchrun: this process's share of each batch
    concept_p: np.ndarray | None = None  # sampling probability of each training concept (None: uniform), see _kind_balanced_probs
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------- data
def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def split_concepts(all_names: list[str], cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(train, holdout). ``--holdout FILE`` fixes the held-out list; else a seeded share per kind."""
    names = list(all_names)
    if cfg.concepts:
        wanted = read_list(cfg.concepts)
        unknown = [c for c in wanted if c not in names]
        if unknown:
            raise SystemExit(f"--concepts: {unknown[:5]} are not concepts of this backend. Fix: check the spelling.")
        names = wanted
    if cfg.holdout:
        held = read_list(cfg.holdout)
        unknown = [c for c in held if c not in all_names]
        if unknown:
            raise SystemExit(f"--holdout: {unknown[:5]} are not concepts of this backend. Fix: check the spelling.")
    else:
        rng = np.random.default_rng(cfg.seed)
        held = [names[i] for i in sorted(rng.choice(len(names), max(1, round(cfg.holdout_frac * len(names))), replace=False))]
    train = [c for c in names if c not in held]
    if len(train) < cfg.concepts_per_step:
        raise SystemExit(f"only {len(train)} training concepts for --concepts-per-step {cfg.concepts_per_step}. Fix: lower it.")
    return train, held


def _concept_seed(cfg: TrainConfig, concept: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{cfg.seed}/{salt}/{concept}".encode()).digest()[:4], "little")


def encode_concepts(backend, concepts: list[str], cfg: TrainConfig) -> tuple[dict, dict]:
    """Text embedding of each concept name and ``n_refs`` single-image embeddings of its renders."""
    enc = backend.encoder
    text = enc.encode_text(concepts).cpu()  # beside the hypernet, which stays on the CPU
    text_emb = {c: text[i] for i, c in enumerate(concepts)}
    image_emb = {}
    for c in concepts:
        refs = backend.reference_images(c, cfg.n_refs, np.random.default_rng(_concept_seed(cfg, c, "refs")))
        image_emb[c] = enc.encode_image(refs).cpu()
    return text_emb, image_emb


def targets_key(backend, concepts: list[str], cfg: TrainConfig) -> str:
    ident = {
        "encoder": backend.encoder.identity,
        "unet": _module_fingerprint(backend.root),
        "concepts": concepts,
        "sites": [s.name for s in backend.sites],
        **{k: getattr(cfg, k) for k in ("seed", "n_target", "sampler_steps", "guidance")},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _module_fingerprint(m: torch.nn.Module) -> str:
    from hypertransport_core import weights_fingerprint

    return weights_fingerprint(m)


@torch.no_grad()
def compute_targets(backend, concepts: list[str], cfg: TrainConfig, chunk: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """Pooled activations of every site at every sampler step for each concept's target prompts.

    Returns ``{site: (n_concepts, sampler_steps, n_target, C)}`` (float32). Only the conditional rows are
    kept (with guidance the unconditional rows carry no concept).
    """
    sites = backend.sites
    out = {s.name: [] for s in sites}
    n = cfg.n_target
    it = range(0, len(concepts), chunk)
    for lo in tqdm(it, desc="target activations", disable=not progress, unit="chunk"):
        group = concepts[lo : lo + chunk]
        prompts, seeds = [], []
        for c in group:
            rng = np.random.default_rng(_concept_seed(cfg, c, "targets"))
            prompts += backend.target_prompts(c, n, rng)
            seeds += [int(s) for s in rng.integers(0, 2**31 - 1, n)]
        with capture_pooled(backend.root, sites, detach=True, rows=backend.cond_rows) as acts:
            backend.run(prompts, seeds)
        for s in sites:
            per_step = torch.stack(acts[s.name]).cpu()  # (steps, G*n, C); the cache lives in CPU memory or on disk
            out[s.name].append(per_step.view(len(acts[s.name]), len(group), n, -1).transpose(0, 1))
    return {k: torch.cat(v) for k, v in out.items()}


def load_or_compute_targets(backend, concepts: list[str], cfg: TrainConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    """The target cache at ``<out>/targets.safetensors``, recomputed only when its key differs."""
    if cfg.cache == "disk":  # shards under <out>/targets/, read lazily per batch (trainer/cache.py)
        from trainer.cache import load_or_compute_disk

        return load_or_compute_disk(backend, concepts, cfg, progress)
    path = os.path.join(cfg.out, "targets.safetensors")
    key = targets_key(backend, concepts, cfg)
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                log.info("target activations: reusing %s", path)
                return {k: f.get_tensor(k).float() for k in f.keys()}
    t0 = time.perf_counter()
    targets = compute_targets(backend, concepts, cfg, progress=progress)
    os.makedirs(cfg.out, exist_ok=True)
    _atomic_save({k: v.half() for k, v in targets.items()}, {"key": key, "concepts": concepts}, path)
    log.info("target activations: %d concepts in %.1f s -> %s", len(concepts), time.perf_counter() - t0, path)
    return {k: v.half().float() for k, v in targets.items()}  # same precision as a reloaded cache


# --------------------------------------------------------------------------------------- build
def train_config_of(hypernet) -> TrainConfig:
    """The training config a hypernet file records (unknown keys from other versions are ignored; the device
    it was trained on is not carried over: a hypernet trained on a GPU evaluates on the CPU by default)."""
    saved = dict(getattr(hypernet, "training_summary", {}).get("config", {}))
    saved.pop("device", None)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def make_backend(cfg: TrainConfig):
    if cfg.backend == "world":
        return WorldBackend.load(cfg.world_weights, steps=cfg.sampler_steps, guidance=cfg.guidance, form=cfg.form,
                                 precision="bf16" if cfg.precision == "auto" else cfg.precision, device=cfg.device)
    if cfg.backend == "comfy":
        from trainer.comfy_backend import CONCEPTS_TSV, NEUTRAL_PROMPTS, ComfyBackend

        for name in ("model", "clip_weights"):
            if not getattr(cfg, name) or not os.path.isfile(getattr(cfg, name)):
                raise SystemExit(f"--{name.replace('_', '-')}={getattr(cfg, name)!r}: --backend comfy needs an existing file "
                                 "here (see docs/train-your-own.md).")
        if cfg.guidance != 1.0:
            log.warning("--guidance %g: distilled models (DMD2, Nitro) are sampled with guidance 1", cfg.guidance)
        return ComfyBackend.from_files(
            cfg.model, clip_arch=cfg.clip_arch, clip_weights=cfg.clip_weights,
            text_encoders=[p for p in cfg.text_encoders.split(",") if p], clip_type=cfg.clip_type,
            concept_list=cfg.concept_list or CONCEPTS_TSV, neutral_prompts=cfg.neutral_prompts or NEUTRAL_PROMPTS,
            precision="fp32" if cfg.precision == "auto" else cfg.precision, steps=cfg.sampler_steps, guidance=cfg.guidance, form=cfg.form,
            resolution=cfg.resolution or None, grad_checkpoint=cfg.grad_checkpoint,
            timesteps=[int(t) for t in cfg.timesteps.split(",") if t.strip()] or None, ref_cache=os.path.join(cfg.out, "refs"),
        )
    raise SystemExit(f"unknown backend {cfg.backend!r}")


def build(cfg: TrainConfig, backend=None, progress: bool = True) -> Run:
    """Backend, split, embeddings, cached targets, hypernet and optimizer (resumed if asked)."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backend = backend or make_backend(cfg)
    train, holdout = split_concepts([c.name for c in backend.concepts], cfg)
    concepts = train + holdout
    text_emb, image_emb = encode_concepts(backend, concepts, cfg)
    from trainer import distributed

    with distributed.main_first():  # under torchrun rank 0 fills the cache, the others then read it
        targets = load_or_compute_targets(backend, concepts, cfg, progress)
    torch.manual_seed(cfg.seed)
    hn = HyperNet(
        HyperNetConfig(embed_dim=backend.encoder.identity["embed_dim"], hidden=cfg.hidden, depth=cfg.depth, rank=cfg.rank,
                       dropout=cfg.dropout),
        backend.sites,
        family=backend.family,
        encoder=backend.encoder.identity,
    )
    with torch.no_grad():  # modality centering from the training concepts only
        hn.mean_text.copy_(torch.stack([text_emb[c] for c in train]).mean(0))
        hn.mean_image.copy_(torch.cat([image_emb[c] for c in train]).mean(0))
    opt = torch.optim.AdamW(hn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(cfg, backend, train, holdout, hn, opt, text_emb, image_emb, targets, {c: i for i, c in enumerate(concepts)})
    run.shard = distributed.shard()
    run.concept_p = _kind_balanced_probs(run)  # fixed for the run: computed once, not per batch
    os.makedirs(cfg.out, exist_ok=True)
    if distributed.is_main():
        with open(os.path.join(cfg.out, "split.json"), "w") as f:
            json.dump({"train": train, "holdout": holdout}, f, indent=1)
    if cfg.resume:
        load_checkpoint(run)
    return run


# --------------------------------------------------------------------------------------- steps
def _lr_at(cfg: TrainConfig, step: int) -> float:
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def steered_batch_loss(run: Run, concepts: list[str], modalities: list[str], rng: np.random.Generator, grad: bool = True,
                       shard: tuple[int, int] | None = None) -> torch.Tensor:
    """OT loss of one batch: each concept steers its own block of source rows (one sampler run).

    ``shard=(rank, world)`` (data parallel): every draw is that of the whole batch, then only this rank's
    concepts run; the loss is scaled by their share, so the ranks' summed gradients equal one process's."""
    cfg, backend, hn = run.cfg, run.backend, run.hypernet
    emb = torch.stack([
        run.text_emb[c] if m == "text" else run.image_emb[c][int(rng.integers(len(run.image_emb[c])))]
        for c, m in zip(concepts, modalities)
    ])
    P, K = cfg.prompts_per_concept, len(concepts)
    prompts = backend.source_prompts(P * K, rng)
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, P * K)]
    share = 1.0
    if shard is not None:
        from trainer.distributed import concept_slice

        lo, hi = concept_slice(K, *shard)
        share = (hi - lo) / K
        concepts, modalities, emb = concepts[lo:hi], modalities[lo:hi], emb[lo:hi]
        prompts, seeds, K = prompts[lo * P : hi * P], seeds[lo * P : hi * P], hi - lo
    with torch.set_grad_enabled(grad):
        w, b = hn(emb, modalities)  # (K, C)
        if backend.rows_per_prompt == 2:  # [cond rows; uncond rows]: the maps repeat over both halves
            w, b = torch.cat([w, w]), torch.cat([b, b])
        steering = Steering(tuple(backend.sites), w, b)
        with steer(backend.root, [(steering, 1.0)]), capture_pooled(backend.root, backend.sites, rows=backend.cond_rows) as acts:
            backend.run(prompts, seeds, grad=grad)
        idx = torch.tensor([run.index[c] for c in concepts])
        terms = []
        for s in backend.sites:
            tgt = run.targets[s.name][idx].to(acts[s.name][0].device)  # (K, steps, n, C), kept on the CPU between batches
            for t, a in enumerate(acts[s.name]):
                src = a.view(K, P, -1)
                if cfg.loss == "w2_channels":
                    terms.append(w2_quantile(src, tgt[:, t]).mean())
                else:
                    from hypertransport_core import sliced_w2

                    terms.append(torch.stack([sliced_w2(src[k], tgt[k, t]) for k in range(K)]).mean())
        return torch.stack(terms).mean() * share


def _batch_for(run: Run, step: int) -> tuple[list[str], list[str], np.random.Generator]:
    """Concepts, modalities and the RNG of step ``step``: a pure function of (seed, step), so resuming
    replays the same batches."""
    rng = np.random.default_rng([run.cfg.seed, step])
    concepts = [run.train[i] for i in rng.choice(len(run.train), run.cfg.concepts_per_step, replace=False, p=run.concept_p)]
    modalities = ["image" if rng.random() < run.cfg.image_frac else "text" for _ in concepts]
    return concepts, modalities, rng


def _kind_balanced_probs(run: Run) -> np.ndarray | None:
    """Sampling probability of each training concept: kind k gets a share ~ n_k^balance_kinds of a batch,
    split evenly among its concepts (None: uniform, when there is one kind or balance_kinds = 1)."""
    alpha = run.cfg.balance_kinds
    info = getattr(run.backend, "concept_info", None)
    if alpha == 1.0 or info is None:
        return None
    kinds = [getattr(info(c), "kind", "") for c in run.train]
    count = {k: kinds.count(k) for k in set(kinds)}
    if len(count) < 2:
        return None
    p = np.array([count[k] ** alpha / count[k] for k in kinds])
    return p / p.sum()


def train_step(run: Run) -> float:
    """One optimizer step; returns the batch loss."""
    run.hypernet.train()
    for g in run.opt.param_groups:
        g["lr"] = _lr_at(run.cfg, run.step)
    concepts, modalities, rng = _batch_for(run, run.step)
    loss = steered_batch_loss(run, concepts, modalities, rng, shard=run.shard)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.shard is not None:  # sum the ranks' gradients (and losses): equal to one process's batch
        from trainer.distributed import all_reduce_grads

        loss = all_reduce_grads(run.hypernet, loss)
    torch.nn.utils.clip_grad_norm_(run.hypernet.parameters(), 1.0)
    run.opt.step()
    run.step += 1
    return float(loss.detach())


@torch.no_grad()
def evaluate_loss(run: Run, concepts: list[str], modality: str = "text", identity: bool = False, batches: int = 1) -> float:
    """Mean OT loss on ``concepts`` with fixed batches (``identity=True``: no steering, the reference)."""
    run.hypernet.eval()
    losses = []
    K = run.cfg.concepts_per_step
    for i in range(batches):
        rng = np.random.default_rng([run.cfg.seed, 10**6 + i])
        group = [concepts[j % len(concepts)] for j in range(i * K, (i + 1) * K)]
        if identity:
            saved = run.hypernet
            run.hypernet = _IdentityHypernet(saved)
            try:
                losses.append(float(steered_batch_loss(run, group, [modality] * len(group), rng, grad=False)))
            finally:
                run.hypernet = saved
        else:
            losses.append(float(steered_batch_loss(run, group, [modality] * len(group), rng, grad=False)))
    return float(np.mean(losses))


class _IdentityHypernet:
    """Stands in for the hypernet to measure the unsteered loss: w = 1, b = 0."""

    def __init__(self, hn: HyperNet):
        self.hn = hn

    def __call__(self, e, modalities):
        n, C = len(e), self.hn.total_channels
        return torch.ones(n, C), torch.zeros(n, C)


# --------------------------------------------------------------------------------------- LinEAS
def fit_concept_lineas(
    backend, concept: str, targets: dict[str, torch.Tensor], cfg: TrainConfig, config: LinEASConfig | None = None
) -> Steering:
    """The per-concept baseline on the same backend, targets and loss: LinEAS fitting of one concept.

    Args:
        targets: ``{site: (sampler_steps, n_target, C)}`` of this concept (a row of the cache).
    """
    P = cfg.prompts_per_concept
    device = next(backend.root.parameters()).device  # the cache is on the CPU; the loss runs beside the model
    tgt = {k: list(v.to(device)) for k, v in targets.items()}
    salt = _concept_seed(cfg, concept, "lineas")

    def batch_fn(step: int):
        rng = np.random.default_rng([salt, step])
        prompts = backend.source_prompts(P, rng)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, P)]
        return (lambda: backend.run(prompts, seeds, grad=True)), tgt

    return fit_lineas(backend.root, backend.sites, batch_fn, config, label=concept, rows=backend.cond_rows)


# --------------------------------------------------------------------------------------- files
def _ckpt_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out, "checkpoint.safetensors")


def save_checkpoint(run: Run) -> str:
    """Atomic checkpoint: hypernet and optimizer tensors as safetensors; config, step, history as JSON."""
    tensors = {f"model/{k}": v for k, v in run.hypernet.state_dict().items()}
    st = run.opt.state_dict()
    for pid, state in st["state"].items():
        for k, v in state.items():
            tensors[f"opt/{pid}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    meta = {
        "format": "hypertransport.checkpoint",
        "step": str(run.step),
        "config": json.dumps(dataclasses.asdict(run.cfg)),
        "param_groups": json.dumps(st["param_groups"]),
        "history": json.dumps(run.history),
    }
    path = _ckpt_path(run.cfg)
    _atomic_save(tensors, meta, path)
    return path


def load_checkpoint(run: Run) -> None:
    path = _ckpt_path(run.cfg)
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path}. Fix: drop --resume to start fresh, or point --out at the run folder.")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["config"])
    for k in _RESUME_KEYS:
        if saved.get(k, getattr(TrainConfig, k, None)) != getattr(run.cfg, k):
            raise SystemExit(f"--resume: the checkpoint was made with {k}={saved.get(k)!r}, this run has {getattr(run.cfg, k)!r}. "
                             "Fix: use the same value, or start a new --out folder.")
    run.hypernet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    run.opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    run.step = int(meta["step"])
    run.history = json.loads(meta["history"])
    log.info("resumed from %s at step %d", path, run.step)


def save_final(run: Run, seconds: float) -> str:
    path = os.path.join(run.cfg.out, "hypernet.safetensors")
    training = {
        "method": "hypertransport",
        "backend": run.cfg.backend,
        "steps": run.step,
        "seconds": round(seconds, 1),
        "final_loss": next((h["loss"] for h in reversed(run.history) if "loss" in h), None),
        "holdout_loss": run.history[-1].get("holdout_loss") if run.history else None,
        "holdout_loss_unsteered": run.history[-1].get("holdout_loss_unsteered") if run.history else None,
        "train_concepts": run.train,
        "holdout_concepts": run.holdout,
        "config": dataclasses.asdict(run.cfg),
    }
    save_hypernet(path, run.hypernet, training=training)
    return path


# --------------------------------------------------------------------------------------- main
def train(cfg: TrainConfig, backend=None, progress: bool = True) -> Run:
    """Build, train to ``cfg.steps`` (or ``max_minutes``), checkpoint, save the hypernet."""
    t0 = time.perf_counter()
    run = build(cfg, backend, progress)
    from trainer import distributed

    main = distributed.is_main()  # under torchrun only rank 0 writes files
    log_path = os.path.join(cfg.out, "train_log.jsonl") if main else os.devnull
    bar = tqdm(total=cfg.steps, initial=run.step, desc="hypernet", disable=not progress or not main, unit="step")
    with open(log_path, "a") as logf:
        while run.step < cfg.steps:
            loss = train_step(run)
            rec = {"step": run.step, "loss": loss, "lr": run.opt.param_groups[0]["lr"]}
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
                rec["holdout_loss"] = evaluate_loss(run, run.holdout)
            run.history.append(rec)
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
            if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and main:
                save_checkpoint(run)
            if cfg.max_minutes and distributed.any_rank(time.perf_counter() - t0 > 60 * cfg.max_minutes):
                log.warning("stopping at step %d: --max-minutes %.1f reached", run.step, cfg.max_minutes)
                break
    bar.close()
    if main:
        save_checkpoint(run)
    held = evaluate_loss(run, run.holdout, batches=2)
    ident = evaluate_loss(run, run.holdout, identity=True, batches=2)
    run.history.append({"step": run.step, "holdout_loss": held, "holdout_loss_unsteered": ident})
    path = save_final(run, time.perf_counter() - t0) if main else ""
    if main:
        log.info("held-out OT loss %.4g (unsteered %.4g); hypernet -> %s (%.0f s)", held, ident, path, time.perf_counter() - t0)
    return run


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = build_parser(TrainConfig, __doc__.split("\n\n")[0])
    ns = parser.parse_args(argv)
    cfg = resolve(TrainConfig, ns)
    from trainer import distributed

    distributed.setup()  # torchrun: one process group (gloo on CPU, nccl on GPU); nothing otherwise
    try:
        train(cfg)
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
