"""Fit Steering (LinEAS) through ComfyUI's real executor: a steering fitted on the connected model, with
ComfyUI's progress bar, Cancel, the result reused for the same inputs, no copy of the model, and models whose
weights are inference tensors (as ComfyUI's loaders leave them). On the embedded world: the node's steering
induces the concept as the evaluator's LinEAS does."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

pytestmark = pytest.mark.comfy

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hypertransport_world", "weights")
SINK: dict = {}


@pytest.fixture(scope="module")
def setup(comfy, comfy_base):
    import nodes
    from ht_devkit import clips

    assert asyncio.run(nodes.load_custom_node(str(comfy.REPO)))
    import open_clip

    cfg = comfy_base / "models" / "hypertransport" / f"{clips.ARCH}.json"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(__import__("json").dumps(clips.CFG))
    open_clip.add_model_config(str(cfg))
    clip = clips.comfy_sd15_clip(comfy.init_random_(clips._open_clip_model(0), seed=11), dtype=torch.float32)
    with torch.inference_mode():  # as the executor leaves a loader's weights: inference tensors
        frozen = comfy.tiny_sd15(seed=5, context_dim=32)
    plain = comfy.tiny_sd15(seed=5, context_dim=32)
    assert any(p.is_inference() for p in frozen.model.diffusion_model.parameters())

    def source(name, rtype, value):
        cls = type(name, (), {"RETURN_TYPES": (rtype,), "FUNCTION": "run", "CATEGORY": "testing",
                              "INPUT_TYPES": classmethod(lambda c: {"required": {}}), "run": lambda self: (value,)})
        nodes.NODE_CLASS_MAPPINGS[name] = cls

    source("HTFitFrozenModel", "MODEL", frozen)
    source("HTFitPlainModel", "MODEL", plain)
    source("HTFitClip", "CLIP", clip)

    class HTFitSink:
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"steering": ("HT_STEERING",), "key": ("STRING", {"default": "s"})}}

        def run(self, steering, key):
            SINK[key] = steering
            return ()

    nodes.NODE_CLASS_MAPPINGS["HTFitSink"] = HTFitSink
    ex = comfy.prompt_executor()
    return {"run": lambda p: comfy.run_prompt(ex, p), "ex": ex, "frozen": frozen, "plain": plain, "clip": clip}


def _graph(model_node: str, key: str, steps: int = 3, concept: str = "watercolor", seed: int = 0) -> dict:
    return {
        "1": {"class_type": model_node, "inputs": {}},
        "2": {"class_type": "HTFitClip", "inputs": {}},
        "3": {"class_type": "HyperTransportFitSteering",
              "inputs": {"model": ["1", 0], "clip": ["2", 0], "concept": concept, "prompts": "", "steps": steps,
                         "learning_rate": 0.05, "seed": seed, "sampler_steps": 2, "cfg": 1.0, "resolution": 64}},
        "4": {"class_type": "HTFitSink", "inputs": {"steering": ["3", 0], "key": key}},
    }


def test_fit_through_the_executor_on_inference_tensors(setup, monkeypatch):
    import comfy.utils

    from hypertransport_comfy import targets

    progress = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append((value, total)))
    calls = []
    real = targets.compute_targets
    monkeypatch.setattr(targets, "compute_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        setup["run"](_graph("HTFitFrozenModel", "frozen", steps=3))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    st = SINK["frozen"]
    assert st.meta["family"] == "sd15" and st.meta["label"] == "watercolor" and st.meta["fit"]["steps"] == 3
    assert not torch.equal(st.w, torch.ones_like(st.w)) and torch.isfinite(st.w).all()
    assert progress[-1] == (3, 3) and len(progress) >= 3  # ComfyUI's progress bar, step by step
    dm = setup["frozen"].model.diffusion_model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in dm.modules())  # nothing left on the model
    assert not setup["frozen"].weight_wrapper_patches  # the identity weight wrappers went on a clone
    assert calls == [1]


def test_same_inputs_reuse_the_result(setup, monkeypatch):
    from hypertransport_comfy import fit, targets

    calls = []
    real = targets.compute_targets
    monkeypatch.setattr(targets, "compute_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = fit.fit_steering(setup["plain"], setup["clip"], "oil painting", "", fit.FitSettings(steps=2, sampler_steps=2, cfg=1.0, resolution=64))
    b = fit.fit_steering(setup["plain"], setup["clip"], "oil painting", "", fit.FitSettings(steps=2, sampler_steps=2, cfg=1.0, resolution=64))
    assert a is b and calls == [1]
    lora = setup["plain"].clone()  # the same model with a weight patch is another model
    key = next(k for k in lora.model.state_dict() if k.endswith("in_layers.2.weight"))
    lora.add_patches({key: (torch.full_like(lora.model.state_dict()[key], 0.01),)}, 1.0)
    c = fit.fit_steering(lora, setup["clip"], "oil painting", "", fit.FitSettings(steps=2, sampler_steps=2, cfg=1.0, resolution=64))
    assert c is not a and calls == [1, 1]


def test_cancel_stops_within_a_step_and_keeps_nothing(setup):
    import comfy.model_management as mm

    from hypertransport_comfy import fit

    seen = []

    def on_step(step, total, loss):
        seen.append(step)
        if step == 2:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    before = len(fit._CACHE)
    with pytest.raises(mm.InterruptProcessingException):
        fit.fit_steering(setup["plain"], setup["clip"], "a sunset", "", fit.FitSettings(steps=50, sampler_steps=2, cfg=1.0, resolution=64),
                         on_step=on_step)
    mm.interrupt_current_processing(False)
    assert seen == [0, 1, 2]  # stopped at the step it was asked to
    assert len(fit._CACHE) == before  # nothing half-done is kept


def test_bad_fit_inputs_name_the_fix(setup):
    from hypertransport_comfy import fit

    with pytest.raises(ValueError, match="concept is empty"):
        fit.fit_steering(setup["plain"], setup["clip"], "  ", "")
    with pytest.raises(ValueError, match="lr .* must be in"):
        fit.fit_steering(setup["plain"], setup["clip"], "x", "", fit.FitSettings(lr=5.0))
    with pytest.raises(ValueError, match="at most 64"):
        fit.fit_steering(setup["plain"], setup["clip"], "x", "\n".join(["a {concept} cat"] * 65))
    assert fit.parse_prompts("a {concept} circle\na house", "red") == (["a circle", "a house"], ["a red circle", "a house, red"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "world_unet.safetensors")), reason="world UNet absent")
def test_world_fit_induces_like_the_evaluators_lineas(setup, comfy):
    """On the embedded world, through the executor: Load Embedded World → Fit Steering → the steering's images
    induce the concept about as much as the evaluator's LinEAS fit's (same steps and learning rate)."""
    import numpy as np

    from hypertransport_comfy.backend import ComfyBackend
    from hypertransport_comfy.targets import compute_targets
    from hypertransport_core import LinEASConfig, steer
    from hypertransport_world import metrics as M
    from trainer.config import TrainConfig
    from trainer.train import fit_concept_lineas

    concept, steps = "tomato", 40
    g = {
        "1": {"class_type": "HyperTransportLoadEmbeddedWorld", "inputs": {}},
        "3": {"class_type": "HyperTransportFitSteering",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "concept": concept,
                         "prompts": "a {concept} circle\na {concept} square\na {concept} triangle", "steps": steps,
                         "learning_rate": 0.01, "seed": 0}},
        "4": {"class_type": "HTFitSink", "inputs": {"steering": ["3", 0], "key": "world"}},
    }
    setup["run"](g)
    node = SINK["world"]
    backend = ComfyBackend.world(SHIPPED)
    cfg = TrainConfig(n_target=24, prompts_per_concept=3, sampler_steps=4, guidance=2.0)
    tg = compute_targets(backend, [concept], cfg, progress=False)
    ref = fit_concept_lineas(backend, concept, {k: v[0] for k, v in tg.items()}, cfg, LinEASConfig(steps=steps, lr=0.01))
    prompts, seeds = ["a circle", "a square", "a triangle"] * 2, list(range(500, 506))
    base = np.mean([M.inducement(im, concept) for im in backend.images(prompts, seeds)])
    ind = {}
    for name, st in (("node", node), ("evaluator", ref)):
        with steer(backend.root, [(st, 1.0)]):
            ind[name] = np.mean([M.inducement(im, concept) for im in backend.images(prompts, seeds)])
    assert ind["node"] > base + 0.15 and ind["evaluator"] > base + 0.15, (base, ind)
    assert abs(ind["node"] - ind["evaluator"]) < 0.1, (base, ind)
    print(f"Fit Steering on the world, {concept!r}: unsteered {base:.3f}, node {ind['node']:.3f}, evaluator {ind['evaluator']:.3f}")
