"""The trainer on real ComfyUI models (tiny random weights, every family), headless, and the round trip
trainer → hypernet file → Load HyperNet / Encode Concept / Apply Steering → ``comfy.sample``."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy

FAMILIES = ["sd15", "sdxl", "pixart", "flux"]
#: family -> (context dim, pooled dim, resolution in pixels) matching the dev kit's tiny models
DIMS = {"sd15": (64, None, 64), "sdxl": (64, 1280, 64), "pixart": (32, None, 320), "flux": (32, 32, 64)}
CONCEPTS = [("oil painting", "medium"), ("cubism", "style"), ("gold", "material"), ("melancholic", "mood"),
            ("bird's-eye view", "perspective"), ("neon lighting", "lighting"), ("polka dot", "pattern"), ("1920s", "era")]
NEUTRAL = ["a house on a hill", "a cat sitting on a chair", "a city street", "a bowl of fruit", "a portrait of a man",
           "a boat on a lake", "a forest path", "a bridge over a river"]


def make_backend(comfy, encoder, family, **kw):
    from hypertransport_comfy.concepts import TEMPLATES, ConceptInfo

    ctx, pooled, res = DIMS[family]
    build = comfy.FAMILIES[family][0]
    concepts = [ConceptInfo(n, c, TEMPLATES[c]) for n, c in CONCEPTS]
    kw.setdefault("steps", 2)
    return comfy.tiny_backend(build(), encoder, ctx, pooled_dim=pooled, concepts=concepts, neutral=NEUTRAL,
                              resolution=res, **kw)


_BACKENDS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _drop():
    yield
    _BACKENDS.clear()


@pytest.fixture(params=FAMILIES)
def fam(request, comfy, encoder):
    torch.set_num_threads(1)
    if request.param not in _BACKENDS:
        _BACKENDS[request.param] = make_backend(comfy, encoder, request.param)
    return _BACKENDS[request.param]


def cfg_for(tmp_path, backend, **kw):
    from trainer.config import TrainConfig

    base = dict(backend="comfy", out=str(tmp_path / "run"), steps=4, n_target=4, concepts_per_step=2, prompts_per_concept=3,
                n_refs=1, sampler_steps=backend.steps, guidance=1.0, ckpt_every=2, eval_every=0, hidden=32, rank=4,
                lr=1e-2, holdout_frac=0.25, image_frac=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_family_defaults_schedules(comfy, encoder):
    from hypertransport_core.sites import SITE_TABLES

    b = make_backend(comfy, encoder, "sdxl", steps=4)  # DMD2: 4 steps at 999, 749, 499, 249
    ms = b.model.model_sampling
    assert b.sigmas.shape == (5,) and float(b.sigmas[-1]) == 0
    for s, t in zip(b.sigmas[:-1], SITE_TABLES["sdxl"].sampling.timesteps[4]):
        assert float(ms.timestep(s)) == pytest.approx(t, abs=0.5)
    one = make_backend(comfy, encoder, "sdxl", steps=1)  # DMD2 1-step at t=399
    assert float(ms.timestep(one.sigmas[0])) == pytest.approx(399, abs=0.5)
    assert make_backend(comfy, encoder, "pixart", steps=1).sigmas.shape == (2,)  # Nitro-1-PixArt: one step


def test_sites_are_the_nodes_sites(fam):
    from hypertransport_core import list_sites

    assert [s.name for s in fam.sites] == [s.name for s in list_sites(fam.patcher.model.diffusion_model, fam.family)]
    assert fam.root is fam.patcher.model.diffusion_model


def test_run_is_deterministic_and_differentiable(fam):
    from hypertransport_core import Steering, capture_pooled, steer

    a = fam.run(["a cat", "a dog"], [1, 2])
    b = fam.run(["a cat", "a dog"], [1, 2])
    assert torch.equal(a, b) and torch.isfinite(a).all()
    C = sum(s.channels for s in fam.sites)
    w = torch.ones(2, C, requires_grad=True)
    with steer(fam.root, [(Steering(tuple(fam.sites), w, torch.zeros(2, C)), 1.0)]), \
            capture_pooled(fam.root, fam.sites) as acts:
        with torch.inference_mode():  # as under ComfyUI's executor: run() must turn gradients back on
            fam.run(["a cat", "a dog"], [1, 2], grad=True)
    loss = sum(x.pow(2).mean() for v in acts.values() for x in v)
    loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in fam.root.parameters())  # the model stays frozen


def test_training_reduces_the_loss(fam, tmp_path):
    from trainer import train as T

    # every sampler step's loss in every batch: 30 steps of the noisier one-step estimator (tests/test_trainer.py checks
    # it is unbiased) reduce it too, by less than the 15 % asked here
    cfg = cfg_for(tmp_path, fam, steps=30, lr=3e-2, n_target=8, prompts_per_concept=6, concepts_per_step=2, loss_steps="all")
    run = T.build(cfg, fam, progress=False)
    before = T.evaluate_loss(run, run.train, batches=2)
    for _ in range(cfg.steps):
        T.train_step(run)
    after = T.evaluate_loss(run, run.train, batches=2)
    assert after < 0.85 * before, (fam.family, before, after)


def test_gradient_checkpointing_gives_the_same_gradients(comfy, encoder, tmp_path):
    from trainer import train as T

    grads = []
    for ckpt in (False, True):
        b = make_backend(comfy, encoder, "sdxl", grad_checkpoint=ckpt)
        assert b.grad_checkpoint == ckpt
        run = T.build(cfg_for(tmp_path / str(ckpt), b, grad_checkpoint=ckpt), b, progress=False)
        with torch.no_grad():
            for p in run.hypernet.parameters():  # a non-identity hypernet, the same for both
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        concepts, mods, rng = T._batch_for(run, 0)
        loss = T.steered_batch_loss(run, concepts, mods, rng)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in run.hypernet.named_parameters() if p.grad is not None})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_autocast_trains(comfy, encoder, tmp_path):
    from trainer import train as T

    b = make_backend(comfy, encoder, "sd15", precision="bf16")
    run = T.train(cfg_for(tmp_path, b, precision="bf16", steps=2), b, progress=False)
    assert all(np.isfinite(h["loss"]) for h in run.history if "loss" in h)


def test_lineas_on_a_comfy_model(comfy, encoder, tmp_path):
    from hypertransport_core import LinEASConfig
    from trainer import train as T

    b = _BACKENDS.get("sd15") or make_backend(comfy, encoder, "sd15")
    cfg = cfg_for(tmp_path, b, n_target=8, prompts_per_concept=6)
    tg = T.compute_targets(b, ["cubism"], cfg, progress=False)
    st = T.fit_concept_lineas(b, "cubism", {k: v[0] for k, v in tg.items()}, cfg, LinEASConfig(steps=3, lr=1e-2))
    assert st.w.shape == (sum(s.channels for s in b.sites),) and not torch.equal(st.w, torch.ones_like(st.w))


def test_round_trip_through_the_nodes(fam, tmp_path, comfy, comfy_base, pack):
    """Train a few steps, load the file with Load HyperNet, steer with Apply Steering, sample with comfy.sample."""
    import folder_paths

    from trainer import train as T

    D = pack.nodes.definitions
    cfg = cfg_for(tmp_path, fam, steps=3, lr=5e-2)
    T.train(cfg, fam, progress=False)
    name = f"trained_{fam.family}.safetensors"
    shutil.copy(os.path.join(cfg.out, "hypernet.safetensors"), comfy_base / "models" / "hypertransport" / name)
    folder_paths.filename_list_cache.clear()
    hn = D.LoadHyperNet.execute(name).args[0]
    assert hn.net.family == fam.family
    concept = D.EncodeConcept.execute(hn, "oil painting").args[0]
    _, ckw, shape = comfy.FAMILIES[fam.family]
    pos, neg = comfy.random_cond(seed=1, **ckw), comfy.random_cond(seed=2, **ckw)
    base = comfy.sample(fam.patcher, pos, neg, seed=3, steps=2, cfg=1.0, latent_shape=shape)
    steered_model = D.ApplySteering.execute(fam.patcher, hn, concept, 1.0).args[0]
    steered = comfy.sample(steered_model, pos, neg, seed=3, steps=2, cfg=1.0, latent_shape=shape)
    assert torch.isfinite(steered).all()
    assert not torch.equal(base, steered)
    same = comfy.sample(D.ApplySteering.execute(fam.patcher, hn, concept, 0.0).args[0], pos, neg, seed=3, steps=2,
                        cfg=1.0, latent_shape=shape)
    assert torch.equal(base, same)
    again = comfy.sample(fam.patcher, pos, neg, seed=3, steps=2, cfg=1.0, latent_shape=shape)
    assert torch.equal(base, again)  # nothing left on the shared model


def write_sd15_files(host, folder):
    """A diffusion-model-only SD1.5 file (320 channels, one level: detected as SD15 by ComfyUI) and a
    random full-size CLIP-L text encoder file (its size is fixed in ComfyUI; 246 MB in fp16)."""
    import comfy.sd1_clip
    import comfy.supported_models as sm
    from safetensors.torch import save_file

    cfg = sm.SD15({**host.unet_config("sd15", 320, 768), "channel_mult": [1], "num_res_blocks": [1],
                   "transformer_depth": [1], "transformer_depth_output": [1, 1]})
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "")
    host.init_random_(model.diffusion_model, 0)
    save_file({k: v.half().contiguous() for k, v in model.diffusion_model.state_dict().items()}, str(folder / "unet.safetensors"))
    te = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    host.init_random_(te.transformer, 1)
    save_file({k: v.half().contiguous() for k, v in te.transformer.state_dict().items()}, str(folder / "clip_l.safetensors"))
    del model, te
    return folder


def test_cli_with_comfy_model_files(comfy, comfy_base, encoder, tmp_path):
    """``python trainer/train.py --backend comfy --model FILE``: ComfyUI's loaders (a diffusion-model-only
    SD1.5 file + a CLIP-L text encoder file, encoded with ``CLIP.encode_from_tokens``), disk cache, resume."""
    import subprocess
    import sys

    from hypertransport_core import read_header

    models = write_sd15_files(comfy, tmp_path)
    concepts = tmp_path / "concepts.tsv"
    concepts.write_text("concept\tcategory\n" + "".join(f"{n}\t{c}\n" for n, c in CONCEPTS))
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("\n".join(NEUTRAL) + "\n")
    out = tmp_path / "run"
    args = [sys.executable, str(comfy.REPO / "trainer" / "train.py"), "--backend", "comfy",
            "--model", str(models / "unet.safetensors"),
            "--text-encoders", str(models / "clip_l.safetensors"), "--clip-type", "stable_diffusion",
            "--clip-arch", str(comfy_base / "models" / "hypertransport" / f"{comfy.TINY_CLIP_ARCH}.json"),
            "--clip-weights", str(comfy_base / "models" / "clip" / f"{comfy.TINY_CLIP_ARCH}.safetensors"),
            "--concept-list", str(concepts), "--neutral-prompts", str(neutral), "--resolution", "64",
            "--sampler-steps", "2", "--guidance", "1", "--steps", "2", "--n-target", "3", "--concepts-per-step", "2",
            "--prompts-per-concept", "2", "--n-refs", "1", "--image-frac", "0", "--hidden", "16", "--rank", "2",
            "--ckpt-every", "1", "--eval-every", "0", "--cache", "disk", "--cache-chunk", "4", "--threads", "1",
            "--out", str(out)]
    env = {**os.environ, "COMFYUI_DIR": str(comfy.find_comfyui())}
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=comfy.REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = read_header(str(out / "hypernet.safetensors"), expect="hypertransport.hypernet")
    assert meta["model_family"] == "sd15" and meta["training"]["steps"] == 2
    assert len(os.listdir(out / "targets")) == 3  # index + 2 shards (8 concepts, 4 a shard)
    refs = {f: os.path.getmtime(out / "refs" / f) for f in os.listdir(out / "refs")}
    assert len(refs) == len(CONCEPTS)  # one file of reference images per concept
    r2 = subprocess.run(args + ["--steps", "3", "--resume"], capture_output=True, text=True, env=env, cwd=comfy.REPO,
                        timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "reusing 2 shards" in r2.stderr and "resumed from" in r2.stderr
    assert {f: os.path.getmtime(out / "refs" / f) for f in os.listdir(out / "refs")} == refs  # reused, not resampled
