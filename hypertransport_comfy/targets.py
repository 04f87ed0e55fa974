"""Target activations: computed once per concept (no gradient, METHOD §3), cached in memory or on disk.

``compute_targets`` samples each concept's target prompts (its words added to neutral prompts) and keeps
the pooled activations of every site at every sampler step, conditional rows only. The cache key covers
the encoder, the model's weights, the concepts, the sites and the sampling settings, so a changed run
recomputes and an unchanged one (a resume, a second run) computes nothing.

* ``--cache memory`` (default): ``<out>/targets.safetensors``, loaded whole;
* ``--cache disk``, for real models whose targets do not fit in memory:

  Target activations carry no gradient and are computed once (METHOD §3). For a real model they do
  not fit in memory: SDXL has 294,080 steered channels, so one concept with 4 steps × 24 target
  prompts is 4 × 24 × 294,080 fp16 values = 56 MB, and 1,000 concepts 56 GB. So:

  * ``<out>/targets/shard-XXXXX.safetensors``: one shard per ``--cache-chunk`` concepts, one fp16 tensor
    per site of shape ``(concepts_in_shard, sampler_steps, n_target, C)``, written atomically;
  * ``<out>/targets/index.json``: the cache key (the same key as the in-memory cache:
    encoder, model weights fingerprint, concept list, sites, seed, n_target, steps, guidance), the
    chunk size and the shards done so far, rewritten (atomically) after each shard, so a run killed while
    filling the cache continues where it stopped;
  * :class:`ShardedTargets` stands in for the ``{site: tensor}`` dict the trainer indexes with
    ``targets[site][rows]``; it reads only the rows asked for, from memory-mapped files.

  A second epoch, a resumed run or a new run on the same model and concepts computes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from hypertransport_core import HyperTransportError, capture_pooled, weights_fingerprint
from hypertransport_core.tensorfile import read_layout, read_tensors, write_tensors

log = logging.getLogger("hypertransport.targets")

INDEX = "index.json"


@dataclass
class TargetSettings:
    """What cached target activations (and a LinEAS fit's batches) depend on; the trainer's ``TargetSettings`` has these
    fields too and is passed as it is."""

    seed: int = 0  # seeds each concept's target prompts and noise
    n_target: int = 16  # target prompts per concept
    sampler_steps: int = 4  # sampler steps per generation
    guidance: float = 2.0  # classifier-free guidance
    prompts_per_concept: int = 2  # source prompts per LinEAS step
    out: str = ""  # folder of the target cache (load_or_compute_targets)
    cache: str = "memory"  # "memory" (one file) or "disk" (shards)
    cache_chunk: int = 4  # concepts per shard (cache "disk")


def concept_seed(cfg: TargetSettings, concept: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{cfg.seed}/{salt}/{concept}".encode()).digest()[:4], "little")


def targets_key(backend, concepts: list[str], cfg: TargetSettings) -> str:
    ident = {
        # the prompts' text encoder's weights (the concept encoder's image side, e.g. its normalization, plays no part)
        "encoder": {k: backend.encoder.identity.get(k) for k in ("arch", "fingerprint")},
        "unet": weights_fingerprint(backend.root),
        "concepts": concepts,
        "sites": [s.name for s in backend.sites],
        **{k: getattr(cfg, k) for k in ("seed", "n_target", "sampler_steps", "guidance")},
        "sampling": [backend.sampler, backend.scheduler, backend.sigmas.tolist(), list(backend.latent_shape), backend.precision],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_targets(backend, concepts: list[str], cfg: TargetSettings, chunk: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
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
            rng = np.random.default_rng(concept_seed(cfg, c, "targets"))
            prompts += backend.target_prompts(c, n, rng)
            seeds += [int(s) for s in rng.integers(0, 2**31 - 1, n)]
        with capture_pooled(backend.root, sites, detach=True, rows=backend.cond_rows) as acts:
            backend.run(prompts, seeds)
        for s in sites:
            per_step = torch.stack(acts[s.name]).cpu()  # (steps, G*n, C); the cache lives in CPU memory or on disk
            out[s.name].append(per_step.view(len(acts[s.name]), len(group), n, -1).transpose(0, 1))
    return {k: torch.cat(v) for k, v in out.items()}


def load_or_compute_targets(backend, concepts: list[str], cfg: TargetSettings, progress: bool = True) -> dict[str, torch.Tensor]:
    """The target cache at ``<out>/targets.safetensors``, recomputed only when its key differs."""
    if cfg.cache == "disk":  # shards under <out>/targets/, read lazily per batch
        return load_or_compute_disk(backend, concepts, cfg, progress)
    path = os.path.join(cfg.out, "targets.safetensors")
    key = targets_key(backend, concepts, cfg)
    if os.path.isfile(path):
        try:
            layout = read_layout(path, what="target cache")
            if layout.metadata.get("key") == key and set(layout.tensors) == {s.name for s in backend.sites}:
                log.info("target activations: reusing %s", path)
                return read_tensors(layout, max_abs=float("inf"))
        except HyperTransportError as e:  # a damaged cache is rebuilt, not trusted
            log.warning("target cache %s is unusable (%s): computing it again", path, e)
    t0 = time.perf_counter()
    targets = compute_targets(backend, concepts, cfg, progress=progress)
    os.makedirs(cfg.out, exist_ok=True)
    write_tensors(path, {k: v.half() for k, v in targets.items()}, {"key": key, "concepts": json.dumps(concepts)})
    log.info("target activations: %d concepts in %.1f s -> %s", len(concepts), time.perf_counter() - t0, path)
    return {k: v.half().float() for k, v in targets.items()}  # same precision as a reloaded cache


def _write_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _SiteRows:
    """``targets[site]``: index with an int, a list or a tensor of concept rows."""

    def __init__(self, owner: ShardedTargets, site: str):
        self.owner, self.site = owner, site

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.owner.concepts), *self.owner.row_shape(self.site))

    def __len__(self) -> int:
        return len(self.owner.concepts)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, int):
            return self.owner.rows(self.site, [idx])[0]
        if isinstance(idx, slice):
            return self.owner.rows(self.site, list(range(len(self)))[idx])
        if torch.is_tensor(idx):
            idx = idx.reshape(-1).tolist()
        return self.owner.rows(self.site, [int(i) for i in idx])


class ShardedTargets(Mapping):
    """Read-only ``{site: rows}`` view of a shard folder (float32 rows, fp16 on disk).

    Args:
        folder: ``<out>/targets``.
        index: the parsed ``index.json``.
        max_open: shard files kept open (memory-mapped) at once.
    """

    def __init__(self, folder: str, index: dict, max_open: int = 64):
        self.folder, self.index, self.max_open = folder, index, max_open
        self.concepts: list[str] = index["concepts"]
        self.sites: list[str] = index["sites"]
        self._where: list[tuple[int, int]] = []
        for si, sh in enumerate(index["shards"]):
            self._where += [(si, j) for j in range(len(sh["concepts"]))]
        if len(self._where) != len(self.concepts):
            raise HyperTransportError(f"target cache {folder}: its index covers {len(self._where)} of {len(self.concepts)} "
                                      "concepts (an incomplete cache). Fix: run the trainer again to finish it, or delete the folder.")
        self._open: OrderedDict[int, object] = OrderedDict()
        self.reads = 0  # rows read so far (tests, logging)

    def _handle(self, si: int):
        h = self._open.get(si)
        if h is None:
            h = safe_open(os.path.join(self.folder, self.index["shards"][si]["file"]), "pt")
            self._open[si] = h
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(si)
        return h

    def row_shape(self, site: str) -> tuple[int, ...]:
        return tuple(self._handle(0).get_slice(site).get_shape()[1:])

    def rows(self, site: str, idx: list[int]) -> torch.Tensor:
        """``(len(idx), steps, n_target, C)`` float32."""
        out = []
        for i in idx:
            si, j = self._where[i]
            out.append(self._handle(si).get_slice(site)[j : j + 1])
        self.reads += len(idx)
        return torch.cat(out).float()

    def __getitem__(self, site: str) -> _SiteRows:
        if site not in self.sites:
            raise KeyError(site)
        return _SiteRows(self, site)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)


def load_or_compute_disk(backend, concepts: list[str], cfg, progress: bool = True) -> ShardedTargets:
    """The shard cache at ``<out>/targets``: reused when its key matches, continued when incomplete,
    rebuilt (old shards deleted) when the key or the chunk size differs."""
    folder = os.path.join(cfg.out, "targets")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, INDEX)
    key = targets_key(backend, concepts, cfg)
    chunk = int(cfg.cache_chunk)
    index = None
    if os.path.isfile(path):
        with open(path) as f:
            index = json.load(f)
        if index.get("key") != key or index.get("chunk") != chunk or index.get("concepts") != concepts:
            log.info("target cache %s was made with other settings: rebuilding it", folder)
            for sh in index.get("shards", []):
                p = os.path.join(folder, sh["file"])
                if os.path.isfile(p):
                    os.remove(p)
            index = None
    if index is None:
        index = {"format": "hypertransport.target_cache", "key": key, "chunk": chunk, "concepts": concepts,
                 "sites": [s.name for s in backend.sites], "shards": []}
        _write_json_atomic(index, path)
    groups = [concepts[i : i + chunk] for i in range(0, len(concepts), chunk)]
    todo = range(len(index["shards"]), len(groups))
    if len(todo):
        t0 = time.perf_counter()
        for gi in tqdm(todo, desc="target shards", disable=not progress, unit="shard"):
            group = groups[gi]
            t = compute_targets(backend, group, cfg, chunk=len(group), progress=False)
            name = f"shard-{gi:05d}.safetensors"
            write_tensors(os.path.join(folder, name), {k: v.half() for k, v in t.items()}, {"key": key, "concepts": json.dumps(group)})
            index["shards"].append({"file": name, "concepts": group})
            _write_json_atomic(index, path)
        log.info("target activations: %d shards (%d concepts) in %.1f s -> %s", len(todo),
                 sum(len(groups[g]) for g in todo), time.perf_counter() - t0, folder)
    else:
        log.info("target activations: reusing %d shards in %s", len(index["shards"]), folder)
    return ShardedTargets(folder, index)
