"""Trainer and evaluator on the tiny world (the world's CLIP and VAE with a small random UNet, in ComfyUI's
classes, sampled by ComfyUI's sampler): fast, meaningless images, real code paths."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from world_helpers import CONCEPTS, tiny_config

from hypertransport_comfy import targets as TG
from hypertransport_core import load_hypernet, read_header
from hypertransport_core.errors import HyperTransportError
from studies.evaluate import EvalConfig, evaluate
from trainer import train as T

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def backend(comfy):
    torch.set_num_threads(1)
    return comfy.tiny_world_backend(seed=0, steps=2, guidance=2.0)


def _cfg(tmp_path, **kw) -> T.TrainConfig:
    return tiny_config(tmp_path, **kw)


def test_training_reduces_the_transport_loss(backend, tmp_path):
    # enough samples per concept that the distributions differ by more than sampling noise
    cfg = _cfg(tmp_path, steps=30, lr=5e-3, image_frac=0.0, n_target=16, prompts_per_concept=8, concepts_per_step=2)
    run = T.build(cfg, backend, progress=False)
    before = T.evaluate_loss(run, run.train, batches=3)
    assert before == pytest.approx(T.evaluate_loss(run, run.train, identity=True, batches=3), rel=1e-5)  # identity at init
    for _ in range(cfg.steps):
        T.train_step(run)
    after = T.evaluate_loss(run, run.train, batches=3)
    assert after < 0.7 * before, (before, after)


def test_text_templates_are_trained_on_and_recorded(backend, tmp_path):
    from hypertransport_core import load_hypernet

    cfg = _cfg(tmp_path, steps=1, text_templates="{}|a {} circle|a {} square")
    run = T.build(cfg, backend, progress=False)
    enc = backend.encoder
    c = run.train[0]
    want = torch.nn.functional.normalize(enc.encode_text([c, f"a {c} circle", f"a {c} square"]).mean(0), dim=-1)
    torch.testing.assert_close(run.text_emb[c], want.cpu())  # what the hypernet is trained on
    T.train(cfg, backend, progress=False)
    hn = load_hypernet(os.path.join(cfg.out, "hypernet.safetensors"))
    assert hn.config.text_templates == ("{}", "a {} circle", "a {} square")  # what the nodes then encode with
    torch.testing.assert_close(hn.encode_text(enc, [c])[0], want.cpu())


def test_embedding_noise_perturbs_training_batches_only(backend, tmp_path):
    import copy

    runs = [T.build(_cfg(tmp_path / f"n{x}", steps=1, embed_noise=x), backend, progress=False) for x in (0.0, 0.5)]
    for r in runs:  # heads away from zero, so that the embedding matters to the loss
        torch.manual_seed(0)
        with torch.no_grad():
            r.hypernet.channel_w.normal_(0, 0.3)
        r.hypernet.load_state_dict(runs[0].hypernet.state_dict())
    concepts, modalities, rng = T._batch_for(runs[0], 3)
    loss = {(x, grad): float(T.steered_batch_loss(r, concepts, modalities, copy.deepcopy(rng), grad=grad).detach())
            for x, r in zip((0.0, 0.5), runs) for grad in (False, True)}
    assert loss[(0.0, False)] == loss[(0.5, False)]  # evaluation sees the embeddings as they are
    assert loss[(0.5, True)] != pytest.approx(loss[(0.0, True)], rel=1e-5)  # training sees them perturbed
    with pytest.raises(HyperTransportError, match="embed-noise"):
        T.TrainConfig(embed_noise=-1).check()


def test_batches_balance_concept_kinds(backend, tmp_path):
    # tiny config: 7 colours and 3 patterns; train on all of them (a --holdout file naming one colour)
    held = tmp_path / "held.txt"
    held.write_text("navy\n")
    shares = {}
    for alpha in (0.0, 0.5, 1.0):
        run = T.build(_cfg(tmp_path, holdout=str(held), balance_kinds=alpha, concepts_per_step=4, val_frac=0.0), backend,
                      progress=False)
        kinds = [backend.concept_info(c).kind for c in run.train]
        n_pat, n_col = kinds.count("pattern"), kinds.count("colour")
        p = T._kind_balanced_probs(run)
        if alpha == 1.0:
            assert p is None  # uniform over concepts = proportional to each kind's size
        else:
            want = n_pat**alpha / (n_pat**alpha + n_col**alpha)
            assert sum(pi for pi, k in zip(p, kinds) if k == "pattern") == pytest.approx(want)
        drawn = [backend.concept_info(c).kind for step in range(300) for c in T._batch_for(run, step)[0]]
        shares[alpha] = drawn.count("pattern") / len(drawn)
        first = T._batch_for(run, 7)
        run.step, run.history = 123, [0.5]  # the run's state moves on (as on resume): the batch of a step does not
        assert T._batch_for(run, 7)[:2] == first[:2] and T._batch_for(run, 8)[0] != first[0]  # a function of (seed, step)
    assert shares[0.0] > shares[0.5] > shares[1.0]
    assert shares[1.0] == pytest.approx(3 / 9, abs=0.05)
    with pytest.raises(HyperTransportError, match="balance-kinds"):
        _cfg(tmp_path, balance_kinds=2.0).check()


def test_split_holds_out_concepts_and_file_format(backend, tmp_path):
    cfg = _cfg(tmp_path, steps=2)
    run = T.train(cfg, backend, progress=False)
    assert set(run.train).isdisjoint(run.holdout) and len(run.holdout) >= 0.2 * len(CONCEPTS)
    assert run.val and set(run.val).isdisjoint(run.train + run.holdout)
    meta = read_header(os.path.join(cfg.out, "hypernet.safetensors"), expect="hypertransport.hypernet")
    assert meta["model_family"] == "sd15"  # the world's UNet is ComfyUI's SD UNet: the SD1.5 site table
    assert meta["training"]["holdout_concepts"] == run.holdout and meta["training"]["val_concepts"] == run.val
    assert [s.name for s in meta["site_list"]] == [s.name for s in backend.sites]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert (split["train"], split["val"], split["test"]) == (run.train, run.val, run.holdout)


def test_holdout_file_is_respected(backend, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("navy\ncoarse-checkered\n")
    run = T.build(_cfg(tmp_path, holdout=str(held)), backend, progress=False)
    assert run.holdout == ["navy", "coarse-checkered"]
    assert "navy" not in run.train + run.val


def test_target_cache_is_reused(backend, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=1)
    T.build(cfg, backend, progress=False)
    calls = []
    monkeypatch.setattr(TG, "compute_targets", lambda *a, **k: calls.append(1))
    T.build(cfg, backend, progress=False)
    assert calls == []


def test_resume_after_interruption_matches_uninterrupted(backend, tmp_path):
    full = T.train(_cfg(tmp_path / "a"), backend, progress=False)

    cfg = _cfg(tmp_path / "b")
    real_step, n = T.train_step, {"k": 0}

    def dying_step(run):
        if n["k"] == 4:  # killed after the checkpoint at step 3, in the middle of the run
            raise KeyboardInterrupt
        n["k"] += 1
        return real_step(run)

    T.train_step = dying_step
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(cfg, backend, progress=False)
    finally:
        T.train_step = real_step
    resumed = T.train(_cfg(tmp_path / "b", resume=True), backend, progress=False)
    assert resumed.step == full.step == 6
    a, b = full.hypernet.state_dict(), resumed.hypernet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    loaded = load_hypernet(os.path.join(cfg.out, "hypernet.safetensors"))
    torch.testing.assert_close(loaded.offset_w, full.hypernet.offset_w.detach(), rtol=0, atol=1e-6)


def test_resume_refuses_a_different_config(backend, tmp_path):
    T.train(_cfg(tmp_path, steps=3), backend, progress=False)
    with pytest.raises(HyperTransportError, match="rank"):
        T.build(_cfg(tmp_path, steps=3, rank=2, resume=True), backend, progress=False)


def test_bad_flags_name_the_fix(tmp_path):
    with pytest.raises(HyperTransportError, match="holdout-frac"):
        T.TrainConfig(holdout_frac=1.5).check()
    with pytest.raises(HyperTransportError, match="lr"):
        T.TrainConfig(lr=0).check()
    with pytest.raises(HyperTransportError, match="does not exist"):
        T.TrainConfig(holdout=str(tmp_path / "nope.txt")).check()
    with pytest.raises(HyperTransportError, match="dropout"):
        T.TrainConfig(dropout=1.0).check()
    with pytest.raises(HyperTransportError, match=r"--text-templates=.*'a \{\} \{\}' is not a template.*Fix"):
        T.TrainConfig(text_templates="{}|a {} {}").check()
    listed = T.TrainConfig(text_templates=["{}", "a photo of {}"])  # as a TOML or JSON config file gives it
    listed.check()
    assert listed.template_list() == ("{}", "a photo of {}") == T.TrainConfig(text_templates="{}|a photo of {}").template_list()
    with pytest.raises(HyperTransportError, match="--text-templates=5.*Fix|give '\\|'-separated"):
        T.TrainConfig(text_templates=5).check()
    with pytest.raises(HyperTransportError, match="Fix: cpu, cuda or cuda:N"):
        T.TrainConfig(device="gpu0").check()
    if not torch.cuda.is_available():
        with pytest.raises(HyperTransportError, match="0 CUDA device.*Fix: --device cpu"):
            T.TrainConfig(device="cuda").check()
        with pytest.raises(HyperTransportError, match="Fix: --device cpu"):
            EvalConfig(hypernet=__file__, device="cuda").check()


def test_dropout_is_recorded_and_the_training_device_is_not_carried_over(backend, tmp_path):
    T.train(_cfg(tmp_path, steps=1, dropout=0.2), backend, progress=False)
    hn = load_hypernet(os.path.join(str(tmp_path / "run"), "hypernet.safetensors"))
    assert hn.config.dropout == 0.2 and not hn.training  # loaded for use: dropout off
    hn.training_summary["config"]["device"] = "cuda:3"  # as a GPU run records it
    assert T.train_config_of(hn).device == "auto"  # the default, not the recorded cuda:3


def test_config_file_and_flags(tmp_path):
    from trainer.config import build_parser, resolve

    f = tmp_path / "c.toml"
    f.write_text('steps = 7\nlr = 0.5\n')
    ns = build_parser(T.TrainConfig, "x").parse_args(["--config", str(f), "--lr", "0.25"])
    cfg = resolve(T.TrainConfig, ns)
    assert (cfg.steps, cfg.lr) == (7, 0.25)


def test_evaluator_on_a_tiny_config(backend, tmp_path):
    cfg = _cfg(tmp_path, steps=2)
    run = T.train(cfg, backend, progress=False)
    ecfg = EvalConfig(hypernet=os.path.join(cfg.out, "hypernet.safetensors"), out=str(tmp_path / "rep"), seeds_per_shape=1,
                      lineas_steps=2, lineas_concepts=1, strengths="-1,0,1")
    res = evaluate(ecfg, backend=backend, progress=False)
    assert set(res["concepts"]) == set(run.holdout)
    from studies.measure import hard_first

    fitted = [c for c, e in res["concepts"].items() if "lineas" in e["methods"]]
    assert fitted == hard_first(list(res["concepts"]), 1)  # one LinEAS fit, on the hardest concept (a pattern if any)
    first = res["concepts"][fitted[0]]
    assert set(first["methods"]) == {"none", "prompt", "lineas", "ht_text", "ht_image"}
    assert len(first["sweep"]["inducement"]) == 3
    for f in ("results.json", "report.md", "strength_grid.png", "strength_curves.png", "methods.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    assert "Spearman" in (tmp_path / "rep" / "report.md").read_text()
    # --concepts evaluates any list of the world's concepts
    lst = tmp_path / "mine.txt"
    lst.write_text("gold\n")
    res2 = evaluate(EvalConfig(hypernet=ecfg.hypernet, out=str(tmp_path / "rep2"), concepts=str(lst), seeds_per_shape=1,
                               lineas_concepts=0, lineas_steps=1, strengths="0,1"), backend=backend, progress=False)
    assert list(res2["concepts"]) == ["gold"]
    # --lineas-concepts -1: no LinEAS fit at all (a quick evaluation)
    res3 = evaluate(EvalConfig(hypernet=ecfg.hypernet, out=str(tmp_path / "rep3"), concepts=str(lst), seeds_per_shape=1,
                               lineas_concepts=-1, strengths="0,1"), backend=backend, progress=False)
    assert "lineas" not in res3["concepts"]["gold"]["methods"] and "on_lineas_concepts" not in res3["summary"]
    _check_reference(res, ecfg.hypernet, tmp_path)


def _check_reference(res, hypernet, tmp_path):
    """A run is compared with a reference of the same split, concepts and images, and only with one."""
    import json

    from studies.evaluate import compare_to_reference, reference_figures

    ours = reference_figures(res, hypernet)
    assert len(ours["hypernet_sha256"]) == 64  # the hash the hypernet file records
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(ours))
    assert compare_to_reference(ours, str(path)) == [f"- This is the hypernet `{path}` describes (the same file)."]
    other = {**ours, "hypernet_sha256": "0" * 64, "hypernet_steps": 500,
             "figures": {**ours["figures"], "ht_text": ours["figures"]["ht_text"] - 0.25}}
    path.write_text(json.dumps(other))
    (line,) = compare_to_reference(ours, str(path))
    assert "(500 steps" in line and f"HT text inducement {ours['figures']['ht_text']:.3f} vs " in line and "(+0.250)" in line
    path.write_text(json.dumps({**ours, "concepts": ours["concepts"][:-1]}))
    assert compare_to_reference(ours, str(path))[0].startswith("- Not compared")
    for bad in ({"removal_floor": "one"}, {"concepts": 3}, {"hypernet_steps": None}):
        path.write_text(json.dumps({**ours, **bad}))
        assert "not a figures file" in compare_to_reference(ours, str(path))[0], bad
    path.write_text("{broken")
    assert "not a figures file" in compare_to_reference(ours, str(path))[0]
    assert compare_to_reference(ours, str(tmp_path / "absent.json")) == []


# ------------------------------------------------------------------------- divergence and damaged checkpoints
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(backend, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, steps=6, ckpt_every=2)
    real = T.steered_batch_loss
    n = {"calls": 0}

    def poisoned(run, *a, **kw):
        loss = real(run, *a, **kw)
        n["calls"] += 1
        return loss * float("nan") if run.step == 3 else loss

    monkeypatch.setattr(T, "steered_batch_loss", poisoned)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    with pytest.raises(HyperTransportError, match=r"training diverged at step 4: loss nan.*still holds step 2.*Fix: lower --lr"):
        T.train(cfg, backend, progress=False)
    from hypertransport_core.tensorfile import read_layout

    assert read_layout(str(ckpt)).metadata["step"] == "2"  # the step-2 checkpoint, not overwritten
    assert not (tmp_path / "run" / "hypernet.safetensors").exists()
    monkeypatch.setattr(T, "steered_batch_loss", real)
    resumed = T.train(_cfg(tmp_path, steps=6, ckpt_every=2, resume=True), backend, progress=False)
    assert resumed.step == 6


def _damaged_checkpoints(good: str, folder):
    """(name, writer) pairs: each writes a damaged copy of the checkpoint ``good`` to ``folder``."""
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    from hypertransport_core.tensorfile import write_tensors

    data = open(good, "rb").read()
    with safe_open(good, "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    nan = dict(tensors)
    k = next(k for k in nan if k.startswith("model/"))
    nan[k] = nan[k].clone()
    nan[k].view(-1)[0] = float("nan")
    return {
        "truncated": lambda p: p.write_bytes(data[: len(data) // 2]),
        "empty": lambda p: p.write_bytes(b""),
        "text": lambda p: p.write_text("this is not a checkpoint\n" * 20),
        "nan weight": lambda p: write_tensors(str(p), nan, _nohash(meta), check_finite=False),
        "no optimizer": lambda p: save_file({k: v for k, v in tensors.items() if k.startswith("model/")}, str(p), metadata=meta),
        "other format": lambda p: save_file(tensors, str(p), metadata={**meta, "format": "something.else"}),
        "bad json": lambda p: save_file(tensors, str(p), metadata={**meta, "config": "{oops"}),
        "header length": lambda p: p.write_bytes(struct.pack("<Q", 2**40) + data[8:]),
        "nan betas": lambda p: write_tensors(str(p), tensors, _groups(meta, lambda g: g.update(betas=["NaN", 0.99]))),
        "betas of one": lambda p: write_tensors(str(p), tensors, _groups(meta, lambda g: g.update(betas=[1.0, 0.99]))),
        "group not an object": lambda p: write_tensors(str(p), tensors, {**_nohash(meta), "param_groups": "[7]"}),
        "params not a list": lambda p: write_tensors(str(p), tensors, _groups(meta, lambda g: g.update(params="x"))),
        "extra group key": lambda p: write_tensors(str(p), tensors, _groups(meta, lambda g: g.update(evil=1))),
    }


def _nohash(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "sha256"}


def _groups(meta: dict, change) -> dict:
    """``meta`` with its first optimizer param group changed by ``change`` (and no hash: write_tensors adds a valid
    one, as a hostile file would carry)."""
    import json

    groups = json.loads(meta["param_groups"])
    change(groups[0])
    return {**_nohash(meta), "param_groups": json.dumps(groups).replace('"NaN"', "NaN")}


def test_resume_from_damaged_checkpoints_names_the_file_and_the_fix(backend, tmp_path):
    T.train(_cfg(tmp_path / "good", steps=2), backend, progress=False)
    good = str(tmp_path / "good" / "run" / "checkpoint.safetensors")
    shared = str(tmp_path / "good" / "concepts.txt")  # the same concept file: only the damage differs
    for name, write in _damaged_checkpoints(good, tmp_path).items():
        folder = tmp_path / name.replace(" ", "_")
        cfg = _cfg(folder, steps=3, resume=True, concepts=shared)
        (folder / "run").mkdir(parents=True, exist_ok=True)
        ckpt = folder / "run" / "checkpoint.safetensors"
        write(ckpt)
        before = ckpt.read_bytes()
        with pytest.raises(HyperTransportError) as e:
            T.build(cfg, backend, progress=False)
        msg = str(e.value)
        assert str(ckpt) in msg and "Fix:" in msg and "Traceback" not in msg, (name, msg)
        assert ckpt.read_bytes() == before, name  # the damaged file is left for the user to inspect
    assert "NaN/Inf" in _resume_message(backend, tmp_path, "nan weight")
    assert "betas=[1.0, 0.99] is out of range" in _resume_message(backend, tmp_path, "betas of one")
    assert "evil" in _resume_message(backend, tmp_path, "extra group key")


def _resume_message(backend, tmp_path, name):
    with pytest.raises(HyperTransportError) as e:
        T.build(_cfg(tmp_path / name.replace(" ", "_"), steps=3, resume=True, concepts=str(tmp_path / "good" / "concepts.txt")),
                backend, progress=False)
    return str(e.value)


def test_step_clock_and_flops_for_the_training_benchmark(backend, tmp_path):
    """What benchmarks/bench_train.py prints: the phases of a step add up to the step, and the FLOP count is the
    model's (it doubles when the batch's source rows double)."""
    import sys
    import time

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_train

    flops = {}
    for p in (2, 4):
        run = T.build(_cfg(tmp_path / f"p{p}", steps=5, prompts_per_concept=p, concepts_per_step=2, image_frac=0.0,
                           loss_steps="all"),  # every step alike: the count depends on the rows only
                      backend, progress=False)
        flops[p] = bench_train.step_flops(run)
    assert flops[2] > 0 and flops[4] == pytest.approx(2 * flops[2], rel=0.1), flops
    clock: dict = {}
    t0 = time.perf_counter()
    T.train_step(run, clock)
    total = time.perf_counter() - t0
    assert set(clock) == {"forward", "backward", "optimizer"} and all(v > 0 for v in clock.values())
    assert sum(clock.values()) == pytest.approx(total, rel=0.05)
    assert bench_train.parse_variant("fp32:precision=fp32,steps=3") == ("fp32", {"precision": "fp32", "steps": 3})
    assert bench_train.parse_variant("a:loss_steps=one,budget=90") == ("a", {"loss_steps": "one", "budget": 90.0})
    with pytest.raises(HyperTransportError, match="budget must be a positive"):
        bench_train.parse_variant("a:budget=soon")
    with pytest.raises(HyperTransportError, match="NAME:key=value"):
        bench_train.parse_variant("no-colon")


def test_one_step_loss_is_an_unbiased_estimate_of_the_all_steps_loss(backend, tmp_path):
    """--loss-steps one: the loss at step t (the sampler stopped after t, only t backpropagated) is the t-th term of
    the all-steps loss, so its mean over the drawn t is that loss, and so is its gradient; it runs t + 1 model calls."""
    run = T.build(_cfg(tmp_path, steps=5, image_frac=0.0, concepts_per_step=2, loss_steps="one"), backend, progress=False)
    with torch.no_grad():  # a hypernet that steers (a fresh one is the identity)
        g = torch.Generator().manual_seed(0)
        for p in (run.hypernet.channel_w, run.hypernet.channel_b, run.hypernet.offset_b):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    concepts = run.train[:2]

    def loss_and_grad(only_step):
        run.hypernet.zero_grad(set_to_none=True)
        calls = []
        h = backend.root.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            loss = T.steered_batch_loss(run, concepts, ["text", "text"], np.random.default_rng(7), only_step=only_step)
        finally:
            h.remove()
        loss.backward()
        return float(loss.detach()), run.hypernet.channel_w.grad.clone(), len(calls)

    n_steps = len(backend.sigmas) - 1
    assert n_steps == 2
    run.cfg.loss_steps = "all"
    full, full_grad, full_calls = loss_and_grad(None)
    per_step = [loss_and_grad(t) for t in range(n_steps)]
    assert np.mean([p[0] for p in per_step]) == pytest.approx(full, rel=1e-4)
    mean_grad = sum(p[1] for p in per_step) / n_steps
    assert float((mean_grad - full_grad).norm()) < 1e-4 * float(full_grad.norm()), "a step's gradient is lost or doubled"
    assert per_step[0][0] != pytest.approx(per_step[1][0], rel=1e-3)  # the steps' terms differ: the draw matters
    calls = [p[2] for p in per_step]
    # step 0 stops the sampler before step 1 (a guided step with gradients is 2 model calls, one without 1)
    assert calls[0] == full_calls // n_steps and calls[0] < calls[1] <= full_calls
    run.cfg.loss_steps = "one"  # a drawn step: one of the terms above
    drawn = float(T.steered_batch_loss(run, concepts, ["text", "text"], np.random.default_rng(7)).detach())
    assert any(drawn == pytest.approx(p[0], rel=1e-4) for p in per_step)
    with pytest.raises(HyperTransportError, match="loss-steps"):
        T.TrainConfig(loss_steps="some").check()


@pytest.mark.slow
def test_gpu_train_world_script_trains_the_shipped_recipe_for_two_steps_on_the_cpu(tmp_path):
    """scripts/gpu_train_world.sh, the one-GPU route to the shipped recipe, run as written on the CPU for 2 steps (on 8
    of the world's concepts, so the targets take seconds): it writes a hypernet and logs the held-out loss line."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("tomato\ngold\nnavy\nplum\nteal\nsalmon\norchid\nkhaki\n")
    flags = (f"--val-frac 0 --steps 2 --eval-every 0 --max-minutes 0 --concepts {concepts} --concepts-per-step 2 "
             "--n-target 2 --n-refs 1 --threads 1")
    env = {**os.environ, "DEVICE": "cpu", "EVAL": "0", "OUT": str(tmp_path / "out"), "LIMIT": "600",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "scripts/gpu_train_world.sh", f"shipped:{flags}"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=900)
    log = (tmp_path / "out" / "shipped" / "log.txt").read_text() if (tmp_path / "out" / "shipped" / "log.txt").exists() else ""
    assert r.returncode == 0 and (tmp_path / "out" / "shipped" / "hypernet.safetensors").is_file(), r.stdout + r.stderr + log[-3000:]
    assert load_hypernet(str(tmp_path / "out" / "shipped" / "hypernet.safetensors")).family == "sd15"
