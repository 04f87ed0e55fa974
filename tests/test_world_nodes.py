"""Node path = trainer path, measured: the world workflow posted to a real ComfyUI server gives, for held-out
concepts, the images (and so the pixel inducement) the evaluator computes in-process for the same concept,
seed and strength; and steering raises inducement over the unsteered image."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hypertransport_world", "weights")


@pytest.fixture(scope="module")
def world_backend(comfy):
    if not os.path.isfile(os.path.join(SHIPPED, "world_unet.safetensors")):
        pytest.skip("world UNet absent: build it with `python -m hypertransport_world.build --seed 0`")
    from hypertransport_comfy.backend import ComfyBackend

    return ComfyBackend.world(SHIPPED)  # fp32, as ComfyUI's KSampler computes on a CPU


def test_server_images_equal_the_evaluators(comfy_server, world_backend):
    from ht_devkit.world_check import SHAPE_PROMPTS, Item, compare
    from hypertransport_core import load_hypernet

    hn = load_hypernet(os.path.join(SHIPPED, "world_hypernet.safetensors"))
    held = hn.training_summary["holdout_concepts"]
    colours = [c for c in held if "-" not in c and c != "plain"][:2]
    patterns = [c for c in held if "-" in c][:2]
    assert len(colours) == 2 and len(patterns) == 2, held
    items = [Item(c, p, 11 + k, lam) for c in colours + patterns for k, p in enumerate(SHAPE_PROMPTS) for lam in (1.0,)]
    rows = compare(comfy_server, world_backend, hn, items)
    for r in rows:
        assert r["max_pixel_diff"] <= 2, r  # float noise: folded vs hooked norms, batch vs single image
        assert abs(r["server"] - r["evaluator"]) < 0.01, r
    for c in colours + patterns:
        mine = [r for r in rows if r["concept"] == c]
        assert sum(r["server"] for r in mine) > sum(r["unsteered"] for r in mine), mine


def _halves(im, rgb):
    """Colour error of the object's pixels in the left and the right half of a (32, 32, 3) image (NaN where
    the object has no pixel)."""
    import numpy as np

    from hypertransport_world import metrics as M

    obj = M.object_mask(im)
    out = []
    for half in (slice(0, 16), slice(16, 32)):
        m = np.zeros_like(obj)
        m[:, half] = obj[:, half]
        px = im.reshape(-1, 3)[m.reshape(-1)].astype(float)
        out.append(float(np.linalg.norm(np.median(px, 0) - np.asarray(rgb, float))) if len(px) > 8 else float("nan"))
    return out


def test_mask_steers_inside_and_leaves_outside(comfy_server):
    """Regional steering measured on the trained world, through the server: a MASK of the image's left half
    (stock SolidMask + MaskComposite) moves the object's colour towards the concept in that half more than in
    the other, and the other half much less than without the mask. Every site is unsteered outside the mask
    (tests/test_nodes_controls.py); the UNet's convolutions and attention still carry some of the effect across."""
    import numpy as np
    from PIL import Image

    from hypertransport_core import load_hypernet
    from hypertransport_world import scene

    hn = load_hypernet(os.path.join(SHIPPED, "world_hypernet.safetensors"))
    concept = next(c for c in hn.training_summary["holdout_concepts"] if c in scene.COLOURS and min(scene.COLOURS[c]) < 60)
    rgb = scene.COLOURS[concept]

    def graph(mask: bool, strength: float) -> dict:
        g = {
            "1": {"class_type": "HyperTransportLoadEmbeddedWorld", "inputs": {}},
            "2": {"class_type": "HyperTransportLoadHyperNet", "inputs": {"hypernet_name": "world_hypernet.safetensors"}},
            "3": {"class_type": "HyperTransportEncodeConcept",
                  "inputs": {"hypernet": ["2", 0], "text": concept, "clip_weights": "auto (match the hypernet's encoder)",
                             "clip": ["1", 1]}},
            "4": {"class_type": "HyperTransportMakeSteering", "inputs": {"hypernet": ["2", 0], "concept": ["3", 0]}},
            "5": {"class_type": "HyperTransportApplySteeringAdvanced",
                  "inputs": {"model": ["1", 0], "steering": ["4", 0], "strength": strength, "start_percent": 0.0,
                             "end_percent": 1.0, "mode": "auto", "rows": "all", "block_strengths": "", "preset": "all",
                             "batch_strengths": "", "ramp": "constant"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a square", "clip": ["1", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 8}},
            "9": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 21, "steps": 4, "cfg": 2.0,
                                                      "sampler_name": "euler", "scheduler": "simple", "positive": ["6", 0],
                                                      "negative": ["7", 0], "latent_image": ["8", 0], "denoise": 1.0}},
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
            "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": f"mask_{mask}_{strength}"}},
        }
        if mask:
            g["20"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}}
            g["21"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 32}}
            g["22"] = {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0], "x": 0, "y": 0,
                                                                "operation": "add"}}
            g["5"]["inputs"]["mask"] = ["22", 0]
        return g

    errs = {}
    for name, mask, lam in (("unsteered", False, 0.0), ("masked", True, 1.0), ("whole", False, 1.0)):
        entry = comfy_server.run(graph(mask, lam))
        assert entry["status"]["status_str"] == "success", entry["status"]
        ims = [np.asarray(Image.open(comfy_server.base / i["type"] / i.get("subfolder", "") / i["filename"]))
               for i in entry["outputs"]["11"]["images"]]
        errs[name] = np.array([_halves(im, rgb) for im in ims])
    both = ~np.isnan(errs["unsteered"]).any(1) & ~np.isnan(errs["masked"]).any(1) & ~np.isnan(errs["whole"]).any(1)
    assert both.sum() >= 3, errs  # squares crossing the midline
    gain = {k: (errs["unsteered"][both] - errs[k][both]).mean(0) for k in ("masked", "whole")}  # (left, right)
    print(f"mask on the world, {concept!r}: colour error falls by {gain['masked'][0]:.0f} inside the mask and "
          f"{gain['masked'][1]:.0f} outside (whole image: {gain['whole'][0]:.0f} / {gain['whole'][1]:.0f}) RGB units")
    assert gain["masked"][0] > 30 and gain["whole"][1] > 30, gain
    assert gain["masked"][0] > 1.3 * gain["masked"][1] and gain["masked"][1] < 0.6 * gain["whole"][1], gain


def test_the_worlds_clip_and_clip_vision_are_the_shipped_hypernets_encoder(pack, monkeypatch):
    """Encode Concept and Encode Reference Image on the embedded world use the CLIP and CLIP_VISION that Load Embedded
    World returns, never the open_clip fallback (which would load the weights a second time, and warn)."""
    from hypertransport_core import load_hypernet

    D, MF, CC = pack.nodes.definitions, pack.nodes.model_files, pack.nodes.comfy_clip
    _, clip, _, clip_vision = D.LoadEmbeddedWorld.execute().args
    handle = MF.HyperNetHandle(load_hypernet(os.path.join(SHIPPED, "world_hypernet.safetensors")), "world_hypernet.safetensors")

    def fallback(*a, **k):
        raise AssertionError("the open_clip fallback was taken")

    monkeypatch.setattr(MF, "encoder_for", fallback)
    assert isinstance(CC.image_encoder_for(handle, clip_vision, MF.AUTO), CC.ComfyImageEncoder)
    assert isinstance(CC.text_encoder_for(handle, clip, MF.AUTO), CC.ComfyTextEncoder)
    assert handle.net.encoder["image_mean"] == [0.5, 0.5, 0.5] == list(clip_vision.image_mean)


def test_the_shipped_converged_fits_are_the_main_jobs_own(world_backend):
    """The main job's evaluator finds a converged LinEAS fit for each of split 0's hardest test concepts among the
    shipped fits: named by the hash of all a fit depends on, so a change to the world, the sampler or the trainer's
    defaults makes this fail (rebuild: the command in studies/measure.SHIPPED_FITS)."""
    from hypertransport_core import load_steering
    from studies.evaluate import EvalConfig, evaluation_order
    from studies.measure import SHIPPED_FITS, hard_first, lineas_cache_path
    from trainer.config import TrainConfig
    from trainer.train import split_concepts

    tcfg, ecfg = TrainConfig(), EvalConfig()
    _, _, test = split_concepts(world_backend.concepts, tcfg)
    hardest = hard_first(evaluation_order(test), ecfg.lineas_concepts)
    assert len(hardest) == 6 and any(c in ("diagonal-banded", "vertical-pinstriped") for c in hardest)
    for c in hardest:
        path = os.path.join(SHIPPED_FITS, os.path.basename(lineas_cache_path(world_backend, tcfg, c, ecfg.lineas_steps,
                                                                             ecfg.lineas_lr, ".")))
        assert os.path.isfile(path), f"{c}: no shipped fit {path}; rebuild them (studies/measure.py, SHIPPED_FITS)"
        st = load_steering(path)
        assert st.meta["fit"]["steps"] == ecfg.lineas_steps == 120 and st.meta["label"].startswith(c)


def test_the_evaluator_uses_a_shipped_fit_instead_of_fitting(world_backend, monkeypatch):
    from studies.measure import SHIPPED_FITS, lineas_for
    from trainer import train as T
    from trainer.config import TrainConfig

    def no_fit(*a, **k):
        raise AssertionError("fitted although a shipped fit exists")

    monkeypatch.setattr(T, "fit_concept_lineas", no_fit)
    st, secs, _ = lineas_for(world_backend, TrainConfig(), "blue", 120, 1e-2)
    assert st.meta["loaded_from"].startswith(SHIPPED_FITS) and secs > 10  # the time measured when it was fitted
    with pytest.raises(AssertionError, match="fitted although"):
        lineas_for(world_backend, TrainConfig(), "blue", 120, 1e-2, shipped="")  # without it: a fit (refused here)
