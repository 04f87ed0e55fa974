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
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # `python trainer/train.py`: the pack's finder resolves its libraries and trainer/ by name
    import importlib.util

    _spec = importlib.util.spec_from_file_location("_hypertransport_pack", os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "__init__.py"), submodule_search_locations=None)  # a plain module: no nodes
    _pack = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_pack)
    _pack.use_libraries("trainer")

import numpy as np
import torch
from tqdm import tqdm

from hypertransport_comfy.backend import ComfyBackend
from hypertransport_comfy.fit import fit_concept_lineas  # noqa: F401  (the per-concept baseline, also T.fit_concept_lineas)
from hypertransport_comfy.targets import compute_targets, concept_seed, load_or_compute_targets
from hypertransport_core import HyperNet, HyperNetConfig, Steering, save_hypernet
from hypertransport_core.encoders import text_projection
from hypertransport_core.engine import MapOutOfRange
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.hypernet import templated_text_embeddings
from hypertransport_core.lineas import steered_loss
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.cli import command
from trainer.config import TrainConfig, build_parser, resolve, train_config_of

log = logging.getLogger("hypertransport.train")

__all__ = ["Run", "TrainConfig", "TrainingDiverged", "build", "compute_targets", "evaluate_loss", "fit_concept_lineas",
           "make_backend", "save_final", "train", "train_config_of", "train_step"]


class TrainingDiverged(HyperTransportError):
    """The loss or the gradient became NaN/Inf: the step is not applied and nothing is saved, so the last
    checkpoint (the last good state) stays as it was."""

    def __init__(self, run, loss: float, grad_norm: float, why: str = ""):
        last = f"step {run.step // run.cfg.ckpt_every * run.cfg.ckpt_every}" if run.cfg.ckpt_every else "the start"
        what = why or f"loss {loss}, gradient norm {grad_norm}"
        super().__init__(
            f"training diverged at step {run.step + 1}: {what}. Nothing was saved; "
            f"{os.path.join(run.cfg.out, 'checkpoint.safetensors')} still holds {last}. Fix: lower --lr (now {run.cfg.lr:g}) "
            "and --resume, or start afresh; check the model and concept files if it happens at once."
        )


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: TrainConfig
    backend: ComfyBackend
    train: list[str]
    holdout: list[str]  # the test concepts: never trained on, never used to choose anything
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
    val: list[str] = field(default_factory=list)  # validation concepts: not trained on, used to choose configurations


# --------------------------------------------------------------------------------------- data
def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def split_concepts(concepts: list, cfg: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) names from the backend's :class:`ConceptInfo` list.

    ``--holdout FILE`` fixes the test list; else ``holdout_frac`` of each kind is drawn with ``--seed``. Then
    ``val_frac`` of each kind's remaining concepts becomes the validation set. Drawing per kind keeps every
    split's share of colours and patterns the same."""
    all_names = [c.name for c in concepts]
    kind = {c.name: getattr(c, "kind", "") for c in concepts}

    def listed(flag: str, path: str) -> list[str]:
        got = read_list(path)
        unknown = [c for c in got if c not in kind]
        if unknown:
            raise HyperTransportError(f"--{flag}: {unknown[:5]} are not concepts of this backend. Fix: check the spelling.")
        return got

    def per_kind(names: list[str], frac: float, rng: np.random.Generator, at_least: int = 0) -> set[str]:
        """round(frac * len(names)) names (at least ``at_least``), each kind's share as close to ``frac`` as
        whole numbers allow (largest remainders), drawn at random within each kind."""
        kinds = list(dict.fromkeys(kind[n] for n in names))
        groups = {k: [n for n in names if kind[n] == k] for k in kinds}
        total = min(len(names), max(at_least, round(frac * len(names))))
        want = {k: int(frac * len(g)) for k, g in groups.items()}
        for k in sorted(kinds, key=lambda k: frac * len(groups[k]) - want[k], reverse=True)[: total - sum(want.values())]:
            want[k] += 1
        return {g[i] for k, g in groups.items() for i in rng.choice(len(g), min(want[k], len(g)), replace=False)}

    names = listed("concepts", cfg.concepts) if cfg.concepts else list(all_names)
    rng = np.random.default_rng(cfg.seed)
    held = set(listed("holdout", cfg.holdout)) if cfg.holdout else per_kind(names, cfg.holdout_frac, rng, at_least=1)
    if not held:
        raise HyperTransportError("no test concepts: --holdout-frac is too small for this concept list. Fix: raise it or pass --holdout FILE.")
    rest = [c for c in names if c not in held]
    val = per_kind(rest, cfg.val_frac, rng) if cfg.val_frac else set()
    train = [c for c in rest if c not in val]
    if len(train) < cfg.concepts_per_step:
        raise HyperTransportError(f"only {len(train)} training concepts for --concepts-per-step {cfg.concepts_per_step}. Fix: lower it "
                         "(or --val-frac / --holdout-frac).")
    return train, [c for c in names if c in val], [c for c in names if c in held]


def encode_concepts(backend, concepts: list[str], cfg: TrainConfig) -> tuple[dict, dict]:
    """Text embedding of each concept name (over ``--text-templates``) and ``n_refs`` single-image embeddings of its
    renders."""
    enc = backend.encoder
    text = templated_text_embeddings(enc.encode_text, concepts, cfg.template_list()).cpu()  # beside the hypernet, which stays on the CPU
    text_emb = {c: text[i] for i, c in enumerate(concepts)}
    image_emb = {}
    for c in concepts:
        refs = backend.reference_images(c, cfg.n_refs, np.random.default_rng(concept_seed(cfg, c, "refs")))
        image_emb[c] = enc.encode_image(refs).cpu()
    return text_emb, image_emb


# --------------------------------------------------------------------------------------- build
def make_backend(cfg: TrainConfig) -> ComfyBackend:
    """The backend ``cfg`` asks for: the embedded world, or a ComfyUI model file."""
    from hypertransport_comfy.comfyui import import_comfyui

    import_comfyui(cpu=None if cfg.device in ("auto", "cuda") or cfg.device.startswith("cuda") else True)
    precision = cfg.precision
    if cfg.backend == "world":
        return ComfyBackend.world(cfg.world_weights, precision="bf16" if precision == "auto" else precision, form=cfg.form,
                                  steps=cfg.sampler_steps, guidance=cfg.guidance)
    if cfg.backend == "comfy":
        for name in ("model", "clip_weights"):
            if not getattr(cfg, name) or not os.path.isfile(getattr(cfg, name)):
                raise HyperTransportError(f"--{name.replace('_', '-')}={getattr(cfg, name)!r}: --backend comfy needs an existing file "
                                 "here (see docs/train-your-own.md).")
        if cfg.guidance != 1.0:
            log.warning("--guidance %g: distilled models (DMD2, Nitro) are sampled with guidance 1", cfg.guidance)
        return ComfyBackend.from_files(
            cfg.model, clip_arch=cfg.clip_arch, clip_weights=cfg.clip_weights,
            text_encoders=[p for p in cfg.text_encoders.split(",") if p], clip_type=cfg.clip_type,
            concept_list=cfg.concept_list or None, neutral_prompts=cfg.neutral_prompts or None,
            precision="fp32" if precision == "auto" else precision, steps=cfg.sampler_steps, guidance=cfg.guidance,
            form=cfg.form, resolution=cfg.resolution or None, grad_checkpoint=cfg.grad_checkpoint,
            timesteps=[int(t) for t in cfg.timesteps.split(",") if t.strip()] or None, ref_cache=os.path.join(cfg.out, "refs"),
        )
    raise HyperTransportError(f"unknown backend {cfg.backend!r}")


def build(cfg: TrainConfig, backend=None, progress: bool = True) -> Run:
    """Backend, split, embeddings, cached targets, hypernet and optimizer (resumed if asked)."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    backend = backend or make_backend(cfg)
    train, val, holdout = split_concepts(backend.concepts, cfg)
    concepts = train + val + holdout
    text_emb, image_emb = encode_concepts(backend, concepts, cfg)
    from trainer import distributed

    with distributed.main_first():  # under torchrun rank 0 fills the cache, the others then read it
        targets = load_or_compute_targets(backend, concepts, cfg, progress)
    torch.manual_seed(cfg.seed)
    proj = text_projection(backend.encoder.model)
    hn = HyperNet(
        HyperNetConfig(embed_dim=backend.encoder.identity["embed_dim"], hidden=cfg.hidden, depth=cfg.depth, rank=cfg.rank,
                       dropout=cfg.dropout, text_width=0 if proj is None else int(proj.shape[0]), text_templates=cfg.template_list()),
        backend.sites,
        family=backend.family,
        encoder=backend.encoder.identity,
    )
    with torch.no_grad():  # modality centering from the training concepts only
        hn.mean_text.copy_(torch.stack([text_emb[c] for c in train]).mean(0))
        hn.mean_image.copy_(torch.cat([image_emb[c] for c in train]).mean(0))
        if proj is not None:  # kept in the file: a text tower without a projection can still encode concepts
            hn.text_projection.copy_(proj.float())
    opt = torch.optim.AdamW(hn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(cfg, backend, train, holdout, hn, opt, text_emb, image_emb, targets, {c: i for i, c in enumerate(concepts)}, val=val)
    run.shard = distributed.shard()
    run.concept_p = _kind_balanced_probs(run)  # fixed for the run: computed once, not per batch
    os.makedirs(cfg.out, exist_ok=True)
    if distributed.is_main():
        with open(os.path.join(cfg.out, "split.json"), "w") as f:
            json.dump({"seed": cfg.seed, "train": train, "val": val, "test": holdout}, f, indent=1)
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
                       shard: tuple[int, int] | None = None, only_step: int | None = None) -> torch.Tensor:
    """OT loss of one batch: each concept steers its own block of source rows in one sampler run; the loss is
    LinEAS's (:func:`hypertransport_core.lineas.steered_loss`), batched over the concepts.

    ``shard=(rank, world)`` (data parallel): every draw is that of the whole batch, then only this rank's
    concepts run; the loss is scaled by their share, so the ranks' summed gradients equal one process's.

    ``only_step=t``: the loss at sampler step ``t`` alone (the sampler stops there); with ``--loss-steps one`` a step
    is drawn for each batch that carries gradients."""
    cfg, backend, hn = run.cfg, run.backend, run.hypernet
    emb = torch.stack([
        run.text_emb[c] if m == "text" else run.image_emb[c][int(rng.integers(len(run.image_emb[c])))]
        for c, m in zip(concepts, modalities)
    ])
    P, K = cfg.prompts_per_concept, len(concepts)
    prompts = backend.source_prompts(P * K, rng)
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, P * K)]
    share, K_all, lo = 1.0, K, 0
    if shard is not None:
        from trainer.distributed import concept_slice

        lo, hi = concept_slice(K, *shard)
        share = (hi - lo) / K
        concepts, modalities, emb = concepts[lo:hi], modalities[lo:hi], emb[lo:hi]
        prompts, seeds, K = prompts[lo * P : hi * P], seeds[lo * P : hi * P], hi - lo
    # --loss-steps one: the loss at one sampler step drawn per batch (drawn last, so the batches are those of "all");
    # its mean over the draw is the loss at every step, and the sampler stops at that step
    only = only_step
    if only is None and grad and cfg.loss_steps == "one":
        only = int(rng.integers(len(backend.sigmas) - 1))
    if grad and cfg.embed_noise:  # drawn last (the batch is that of a run without noise), for the whole batch
        noise = torch.from_numpy(rng.standard_normal((K_all, emb.shape[-1]))[lo : lo + K]).to(emb.dtype)
        emb = torch.nn.functional.normalize(emb + noise * (cfg.embed_noise / emb.shape[-1] ** 0.5), dim=-1)
    with torch.set_grad_enabled(grad):
        w, b = hn(emb, modalities)  # (K, C): concept k steers rows k*P..(k+1)*P-1 of every chunk
        idx = torch.tensor([run.index[c] for c in concepts])
        targets = {s.name: list(run.targets[s.name][idx].transpose(0, 1)) for s in backend.sites}  # per step: (K, n, C)
        if only is not None:
            targets = {k: v[only : only + 1] for k, v in targets.items()}
        loss = steered_loss(backend.root, Steering(tuple(backend.sites), w, b),
                            lambda: backend.run(prompts, seeds, grad=grad, only_step=only), targets, cfg.loss,
                            steer_rows=backend.steer_rows, capture_rows=backend.cond_rows,
                            groups=None if only is None else slice(-1, None))
        return loss * share


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


def train_step(run: Run, clock: dict[str, float] | None = None) -> float:
    """One optimizer step; returns the batch loss. ``clock``: seconds of each phase (``forward``: the hypernet and the
    steered sampler run with the loss; ``backward``; ``optimizer``: clipping and the AdamW step) are added to it."""
    t0 = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal t0
        if clock is not None:
            now = time.perf_counter()
            clock[phase] = clock.get(phase, 0.0) + now - t0
            t0 = now

    run.hypernet.train()
    for g in run.opt.param_groups:
        g["lr"] = _lr_at(run.cfg, run.step)
    concepts, modalities, rng = _batch_for(run, run.step)
    try:
        loss = steered_batch_loss(run, concepts, modalities, rng, shard=run.shard)
    except MapOutOfRange as e:  # the maps left the engine's range: the hypernet's weights blew up
        if run.step == 0:
            raise
        raise TrainingDiverged(run, math.nan, math.nan, f"the hypernet's maps left the engine's range ({str(e).split(' Fix:')[0]})") from None
    lap("forward")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.shard is not None:  # sum the ranks' gradients (and losses): equal to one process's batch
        from trainer.distributed import all_reduce_grads

        loss = all_reduce_grads(run.hypernet, loss)
    lap("backward")
    norm = torch.nn.utils.clip_grad_norm_(run.hypernet.parameters(), 1.0)
    if not (math.isfinite(float(loss.detach())) and math.isfinite(float(norm))):
        raise TrainingDiverged(run, float(loss.detach()), float(norm))
    run.opt.step()
    run.step += 1
    lap("optimizer")
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
# --------------------------------------------------------------------------------------- files
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
        "val_loss": next((h["val_loss"] for h in reversed(run.history) if "val_loss" in h), None),
        "split_seed": run.cfg.seed,
        "train_concepts": run.train,
        "val_concepts": run.val,
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
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps and run.val:
                rec["val_loss"] = evaluate_loss(run, run.val)  # the test concepts are measured once, at the end
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
    final = {"step": run.step}
    if run.val:
        final["val_loss"] = evaluate_loss(run, run.val, batches=2)
    held = final["holdout_loss"] = evaluate_loss(run, run.holdout, batches=2)
    ident = final["holdout_loss_unsteered"] = evaluate_loss(run, run.holdout, identity=True, batches=2)
    run.history.append(final)
    path = save_final(run, time.perf_counter() - t0) if main else ""
    if main:
        log.info("test OT loss %.4g (unsteered %.4g), validation %s; hypernet -> %s (%.0f s)", held, ident,
                 f"{final['val_loss']:.4g}" if run.val else "-", path, time.perf_counter() - t0)
    return run


@command
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
