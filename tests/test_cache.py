"""The disk target cache (``--cache disk``): shards, lazy reads, reuse across epochs and runs, resume of a
half-filled cache, and training identical to the in-memory cache. On the tiny world (the world's CLIP and VAE
with a small random UNet, in ComfyUI's classes)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from world_helpers import CONCEPTS, tiny_config

from hypertransport_comfy import targets as TG
from hypertransport_comfy.targets import ShardedTargets
from trainer import train as T

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def backend(comfy):
    torch.set_num_threads(1)
    return comfy.tiny_world_backend(seed=0, steps=2, guidance=2.0)


def _cfg(tmp_path, **kw) -> T.TrainConfig:
    return tiny_config(tmp_path, **{"cache": "disk", "cache_chunk": 3, **kw})


def _count_calls(monkeypatch):
    calls = []
    real = TG.compute_targets

    def counting(backend, concepts, cfg, **kw):
        calls.append(list(concepts))
        return real(backend, concepts, cfg, **kw)

    monkeypatch.setattr(TG, "compute_targets", counting)
    return calls


def test_shards_on_disk_and_equal_to_the_memory_cache(backend, tmp_path):
    cfg = _cfg(tmp_path, cache_chunk=4)  # the memory cache computes 4 concepts a batch: same batches, same bits
    run = T.build(cfg, backend, progress=False)
    assert isinstance(run.targets, ShardedTargets)
    index = json.loads((tmp_path / "run" / "targets" / "index.json").read_text())
    assert index["key"] == TG.targets_key(backend, run.train + run.val + run.holdout, cfg)
    assert [s["file"] for s in index["shards"]] == [f"shard-{i:05d}.safetensors" for i in range(3)]  # 10 concepts / 4
    mem = TG.load_or_compute_targets(backend, run.train + run.val + run.holdout, _cfg(tmp_path / "m", cache="memory"), progress=False)
    rows = torch.tensor([0, 4, 9])
    for s in backend.sites:
        torch.testing.assert_close(run.targets[s.name][rows], mem[s.name][rows], rtol=0, atol=0)
        assert run.targets[s.name].shape == mem[s.name].shape


def test_second_epoch_and_second_run_compute_nothing(backend, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    cfg = _cfg(tmp_path, steps=8)  # 7 training concepts, 3 a step: 8 steps are more than 3 epochs
    run = T.train(cfg, backend, progress=False)
    assert len(calls) == 4 and sorted(c for g in calls for c in g) == sorted(CONCEPTS)  # each concept once
    assert run.targets.reads > 0
    calls.clear()
    T.build(_cfg(tmp_path, steps=8, resume=True), backend, progress=False)
    assert calls == []


def test_half_filled_cache_continues(backend, tmp_path, monkeypatch):
    real = TG.compute_targets
    n = {"k": 0}

    def dies_on_third(*a, **kw):
        if n["k"] == 2:
            raise KeyboardInterrupt  # killed while filling the cache
        n["k"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(TG, "compute_targets", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        T.build(_cfg(tmp_path), backend, progress=False)
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(TG, "compute_targets", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    T.build(_cfg(tmp_path), backend, progress=False)
    assert len(calls) == 2  # shards 2 and 3 only


def test_other_settings_rebuild_the_cache(backend, tmp_path, monkeypatch):
    T.build(_cfg(tmp_path), backend, progress=False)
    calls = _count_calls(monkeypatch)
    T.build(_cfg(tmp_path, n_target=5), backend, progress=False)
    assert len(calls) == 4
    files = sorted(os.listdir(tmp_path / "run" / "targets"))
    assert files == ["index.json"] + [f"shard-{i:05d}.safetensors" for i in range(4)]


def test_disk_cache_trains_like_the_memory_cache(backend, tmp_path):
    a = T.train(_cfg(tmp_path / "a", cache="memory"), backend, progress=False)
    b = T.train(_cfg(tmp_path / "b", cache="disk", cache_chunk=4), backend, progress=False)
    for k, v in a.hypernet.state_dict().items():
        torch.testing.assert_close(v, b.hypernet.state_dict()[k], rtol=0, atol=1e-7, msg=k)
