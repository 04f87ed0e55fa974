"""Every node through ComfyUI's real graph machinery in-process: ``execution.validate_prompt`` and
``execution.PromptExecutor`` (no HTTP), the pack loaded by ComfyUI's own ``nodes.load_custom_node``.

A tiny SD1.5 UNet and random conditioning come from two test-only nodes registered for the test.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy


SINK: dict = {}


@pytest.fixture(scope="module")
def graph(comfy, comfy_base, encoder, make_hypernet):
    from PIL import Image

    import nodes

    ok = asyncio.run(nodes.load_custom_node(str(comfy.REPO)))
    assert ok and "HyperTransportApplySteering" in nodes.NODE_CLASS_MAPPINGS
    model = comfy.tiny_sd15(seed=3)
    make_hypernet(model, "exec_sd15.safetensors", seed=4)
    make_hypernet(comfy.tiny_sdxl(), "exec_sdxl.safetensors", seed=4)

    class HTTestTinyModel:
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "run"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return (model,)

    class HTTestConditioning:
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "run"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0})}}

        def run(self, seed):
            return (comfy.random_cond("sd15", seed=seed, dim=64),)

    class HTTestSink:
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",), "key": ("STRING", {"default": "out"})}}

        def run(self, samples, key):
            SINK[key] = samples["samples"].clone()
            return ()

    for cls in (HTTestTinyModel, HTTestConditioning, HTTestSink):
        nodes.NODE_CLASS_MAPPINGS[cls.__name__] = cls
    (comfy_base / "input").mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 80, 4), dtype=np.uint8), "RGBA").save(comfy_base / "input" / "ref.png")
    ex = comfy.prompt_executor()

    def run(prompt: dict):
        return comfy.run_prompt(ex, prompt)

    return run


def sampler(model_ref, key):
    return {
        "20": {"class_type": "HTTestConditioning", "inputs": {"seed": 1}},
        "21": {"class_type": "HTTestConditioning", "inputs": {"seed": 2}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "23": {
            "class_type": "KSampler",
            "inputs": {
                "model": model_ref,
                "seed": 5,
                "steps": 2,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["20", 0],
                "negative": ["21", 0],
                "latent_image": ["22", 0],
                "denoise": 1.0,
            },
        },
        "24": {"class_type": "HTTestSink", "inputs": {"samples": ["23", 0], "key": key}},
    }


def test_all_nodes_in_the_real_executor(graph, comfy_base):
    import folder_paths

    first = {
        "1": {"class_type": "HTTestTinyModel", "inputs": {}},
        "2": {"class_type": "HyperTransportLoadHyperNet", "inputs": {"hypernet_name": "exec_sd15.safetensors"}},
        "3": {
            "class_type": "HyperTransportEncodeConcept",
            "inputs": {"hypernet": ["2", 0], "text": "watercolor", "clip_weights": "ht-tiny-clip.safetensors"},
        },
        "4": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "5": {
            "class_type": "HyperTransportEncodeReferenceImage",
            "inputs": {"hypernet": ["2", 0], "image": ["4", 0], "clip_weights": "auto (match the hypernet's encoder)"},
        },
        "6": {
            "class_type": "HyperTransportCombineConcepts",
            "inputs": {"concept_a": ["3", 0], "weight_a": 1.0, "concept_b": ["5", 0], "weight_b": 0.5, "weight_c": 1.0},
        },
        "7": {
            "class_type": "HyperTransportApplySteering",
            "inputs": {
                "model": ["1", 0],
                "hypernet": ["2", 0],
                "concept": ["6", 0],
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "8": {"class_type": "HyperTransportMakeSteering", "inputs": {"hypernet": ["2", 0], "concept": ["3", 0]}},
        "9": {"class_type": "HyperTransportSaveSteering", "inputs": {"steering": ["8", 0], "filename_prefix": "exec"}},
        **sampler(["7", 0], "steered"),
    }
    ex = graph(first)
    assert ex.success, ex.status_messages
    saved = sorted((comfy_base / "output" / "hypertransport_steerings").glob("exec_*.safetensors"))
    assert saved
    folder_paths.filename_list_cache.clear()
    second = {
        "1": {"class_type": "HTTestTinyModel", "inputs": {}},
        "10": {"class_type": "HyperTransportLoadSteering", "inputs": {"steering_name": saved[-1].name}},
        "11": {
            "class_type": "HyperTransportApplySteeringAdvanced",
            "inputs": {
                "model": ["1", 0],
                "steering": ["10", 0],
                "strength": -0.5,
                "start_percent": 0.2,
                "end_percent": 1.0,
                "mode": "auto",
                "rows": "cond",
                "block_strengths": "output_blocks: 2",
            },
        },
        **sampler(["11", 0], "advanced"),
    }
    assert graph(second).success
    plain = {"1": {"class_type": "HTTestTinyModel", "inputs": {}}, **sampler(["1", 0], "plain")}
    assert graph(plain).success
    zero = dict(first)
    zero["7"] = {**first["7"], "inputs": {**first["7"]["inputs"], "strength": 0.0}}
    zero.update(sampler(["7", 0], "zero"))
    assert graph(zero).success
    assert torch.equal(SINK["zero"], SINK["plain"])
    assert not torch.equal(SINK["steered"], SINK["plain"]) and not torch.equal(SINK["advanced"], SINK["plain"])


def test_executor_reports_node_errors(graph):
    bad = {
        "1": {"class_type": "HTTestTinyModel", "inputs": {}},
        "2": {"class_type": "HyperTransportLoadHyperNet", "inputs": {"hypernet_name": "exec_sd15.safetensors"}},
        "3": {
            "class_type": "HyperTransportEncodeConcept",
            "inputs": {"hypernet": ["2", 0], "text": " ", "clip_weights": "auto (match the hypernet's encoder)"},
        },
        "7": {
            "class_type": "HyperTransportApplySteering",
            "inputs": {
                "model": ["1", 0],
                "hypernet": ["2", 0],
                "concept": ["3", 0],
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        **sampler(["7", 0], "bad"),
    }
    import execution

    valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), bad, None))
    assert not valid[0]  # refused before anything runs: a node error on Encode Concept
    (err,) = valid[3]["3"]["errors"]
    assert valid[3]["3"]["class_type"] == "HyperTransportEncodeConcept" and "empty" in err["details"]
    # a hypernet for another family passes validation (the model is only known at run time) and fails
    # in Apply Steering, before sampling starts
    bad["3"]["inputs"]["text"] = "watercolor"
    bad["2"]["inputs"]["hypernet_name"] = "exec_sdxl.safetensors"
    SINK.pop("bad", None)
    ex = graph(bad)
    assert not ex.success and "bad" not in SINK
    errors = [m for m in ex.status_messages if m[0] == "execution_error"]
    assert errors[0][1]["node_type"] == "HyperTransportApplySteering"
    assert "'sdxl'" in errors[0][1]["exception_message"] and "'sd15'" in errors[0][1]["exception_message"]
