"""Node path = trainer path: the same steered generations of the embedded world made twice and measured.

* through a real ComfyUI server: Load Embedded World → Load HyperNet → Encode Concept (with the world's
  CLIP, reused by fingerprint) → Apply Steering → CLIPTextEncode → Empty Latent Image → KSampler →
  VAE Decode → Save Image (a PNG);
* in-process, as the evaluator makes them: the trainer's backend (the same ComfyUI loaders and sampler),
  the hypernet applied with ``hypertransport_core.steer``, the images quantized as Save Image quantizes
  them (``uint8(clip(255 x))``).

:func:`compare` returns one row per (concept, prompt, seed, strength) with both inducements and the
largest pixel difference. Used by ``tests/test_world_nodes.py`` (a few concepts) and
``scripts/compare_nodes_and_trainer.py`` (every held-out concept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPE_PROMPTS = ("a circle", "a square", "a triangle")


@dataclass(frozen=True)
class Item:
    concept: str
    prompt: str
    seed: int
    strength: float


def api_prompt(item: Item, hypernet: str = "world_hypernet.safetensors") -> dict:
    """The API-form graph of one steered generation of the world (what a user would build from the template)."""
    s = {"sampler_name": "euler", "scheduler": "simple", "steps": 4, "cfg": 2.0}
    return {
        "1": {"class_type": "HyperTransportLoadEmbeddedWorld", "inputs": {}},
        "2": {"class_type": "HyperTransportLoadHyperNet", "inputs": {"hypernet_name": hypernet}},
        "3": {"class_type": "HyperTransportEncodeConcept",
              "inputs": {"hypernet": ["2", 0], "text": item.concept, "clip_weights": "auto (match the hypernet's encoder)",
                         "clip": ["1", 1]}},
        "4": {"class_type": "HyperTransportApplySteering",
              "inputs": {"model": ["1", 0], "hypernet": ["2", 0], "concept": ["3", 0], "strength": item.strength,
                         "start_percent": 0.0, "end_percent": 1.0}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": item.prompt, "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": item.seed, **s, "positive": ["5", 0],
                                                   "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "world_check"}},
    }


def server_images(server, items: list[Item], hypernet: str = "world_hypernet.safetensors") -> list[np.ndarray]:
    """``(32, 32, 3)`` uint8 images the server saved, one per item."""
    from PIL import Image

    out = []
    for it in items:
        entry = server.run(api_prompt(it, hypernet))
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"{it}: the server failed: {entry['status']}\n{server.log()[-2000:]}")
        (img,) = entry["outputs"]["10"]["images"]
        out.append(np.asarray(Image.open(server.base / img["type"] / img.get("subfolder", "") / img["filename"]).convert("RGB")))
    return out


def evaluator_images(backend, hypernet, items: list[Item]) -> list[np.ndarray]:
    """The same generations in-process, as the evaluator makes them, quantized as Save Image does."""
    from hypertransport_core import steer

    out = []
    for it in items:
        steering = hypernet.steering(hypernet.text_concept(backend.encoder, it.concept))
        with steer(backend.root, [(steering, it.strength)]):
            img = backend.images([it.prompt], [it.seed])[0]
        out.append(np.clip(255.0 * img.numpy(), 0, 255).astype(np.uint8))
    return out


def compare(server, backend, hypernet, items: list[Item], hypernet_name: str = "world_hypernet.safetensors") -> list[dict]:
    """One row per item: inducement from the server's image and from the evaluator's, the unsteered one
    (strength 0, the evaluator's), and the largest pixel difference between the two images."""
    from hypertransport_world import metrics as M

    a = server_images(server, items, hypernet_name)
    b = evaluator_images(backend, hypernet, items)
    base = evaluator_images(backend, hypernet, [Item(i.concept, i.prompt, i.seed, 0.0) for i in items])
    rows = []
    for it, x, y, z in zip(items, a, b, base):
        rows.append({"concept": it.concept, "prompt": it.prompt, "seed": it.seed, "strength": it.strength,
                     "server": M.inducement(x, it.concept), "evaluator": M.inducement(y, it.concept),
                     "unsteered": M.inducement(z, it.concept),
                     "max_pixel_diff": int(np.abs(x.astype(int) - y.astype(int)).max())})
    return rows
