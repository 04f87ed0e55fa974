"""Target activations on disk, in safetensors shards, read per batch (``--cache disk``).

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

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open
from tqdm import tqdm

from hypertransport_core.files import _atomic_save

log = logging.getLogger("hypertransport.cache")

INDEX = "index.json"


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
            raise ValueError(f"{folder}: the index covers {len(self._where)} of {len(self.concepts)} concepts (incomplete cache)")
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
    from trainer import train as T  # the trainer's own target computation (tests count its calls)

    folder = os.path.join(cfg.out, "targets")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, INDEX)
    key = T.targets_key(backend, concepts, cfg)
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
            t = T.compute_targets(backend, group, cfg, chunk=len(group), progress=False)
            name = f"shard-{gi:05d}.safetensors"
            _atomic_save({k: v.half().contiguous() for k, v in t.items()}, {"key": key, "concepts": json.dumps(group)},
                         os.path.join(folder, name))
            index["shards"].append({"file": name, "concepts": group})
            _write_json_atomic(index, path)
        log.info("target activations: %d shards (%d concepts) in %.1f s -> %s", len(todo),
                 sum(len(groups[g]) for g in todo), time.perf_counter() - t0, folder)
    else:
        log.info("target activations: reusing %d shards in %s", len(index["shards"]), folder)
    return ShardedTargets(folder, index)
