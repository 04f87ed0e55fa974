"""The example workflows, described once in Python and written in both forms ComfyUI uses.

* ``workflows/<name>.json``: the UI (LiteGraph) form you drag into ComfyUI; ComfyUI's template
  browser lists this folder under the pack's name.
* ``workflows/api/<name>.json``: the API form (``POST /prompt``), used by the end-to-end tests.
* ``docs/NODES.md``: every node's inputs and outputs, from the node schemas.

Regenerate after editing (needs a ComfyUI, found as :func:`hypertransport_comfy.comfyui.find_comfyui` finds it, to read
the nodes' widget order)::

    .venv/bin/python workflows/build_workflows.py          # writes the files
    .venv/bin/python workflows/build_workflows.py --check  # exit 1 if the files are stale
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SDXL_NOTE = """NO HYPERNET FOR SDXL IS PUBLISHED YET. This template needs one you train yourself (docs/train-your-own.md:
`python trainer/train.py --backend comfy ...`); until then Load HyperNet reports the missing file before anything
runs. With the model alone you can steer today: Fit Steering fits a concept on your model (the fit_steering
template shows it on the embedded world: swap its Load Embedded World for your checkpoint).
Files this workflow needs (put them where ComfyUI looks):
- models/checkpoints/sd_xl_base_1.0.safetensors  (SDXL base 1.0, stabilityai/stable-diffusion-xl-base-1.0)
- models/loras/dmd2_sdxl_4step_lora_fp16.safetensors  (DMD2 4-step LoRA, tianweiy/DMD2)
- models/hypertransport/hypertransport_sdxl_dmd2.safetensors  (a HyperTransport hypernet trained for SDXL)
- the CLIP weights the hypernet was trained with (Load HyperNet's info names them), in open_clip format,
  e.g. models/clip/ViT-L-14.safetensors; 'auto' in Encode Concept finds a file named after the architecture.
DMD2 samples in 4 steps with cfg 1 (lcm sampler, sgm_uniform scheduler)."""

PIXART_NOTE = """NO HYPERNET FOR PIXART IS PUBLISHED YET. This template needs one you train yourself (docs/train-your-own.md);
until then Load HyperNet reports the missing file before anything runs. With the model alone, Fit Steering fits a
concept on your model today (see the fit_steering template).
Files this workflow needs:
- models/diffusion_models/nitro_1_pixart.safetensors  (Nitro-1-PixArt, amd/Nitro-1, a 1-step PixArt-Sigma distillation;
  any PixArt-Sigma checkpoint works with more steps)
- models/text_encoders/t5xxl_fp16.safetensors  (T5-XXL, the PixArt text encoder)
- models/vae/sdxl_vae.safetensors  (PixArt-Sigma uses the SDXL VAE)
- models/hypertransport/hypertransport_pixart.safetensors  (a hypernet trained for PixArt)
- the hypernet's CLIP weights (see Load HyperNet's info), e.g. models/clip/ViT-L-14.safetensors."""

WORLD_NOTE = """The embedded world ships with this pack: nothing to download.
It is a tiny text-to-image model of 32x32 images (one coloured, patterned circle, square or triangle), in
ComfyUI's own classes, with its HyperTransport hypernet (world_hypernet.safetensors, listed by Load HyperNet).
Its concepts are 139 CSS colours ("tomato", "slate blue") and 26 fill patterns ("coarse-checkered",
"diagonal-striped", "left-gradient"). Top to bottom: the same four seeds unsteered, steered by the phrase at
strengths -1, 0.5 and 1, and steered by a reference image (made here by the world itself from its prompt).
Both the phrase and the reference image's colour are test concepts: the hypernet never saw them in training.
Negative strength applies the inverse map: it pushes away from the concept, towards an opposite colour, and
keeps the object (from -1 to 0 it amplifies no channel). Images are upscaled 8x (nearest) to be seen."""

WORLD_CONCEPT = "tomato"  # a test concept of the shipped hypernet: held out of its training and of every choice
WORLD_REFERENCE_CONCEPT = "medium violet red"  # also a test concept; the reference image shows it
WORLD_REFERENCE_PROMPT = f"a {WORLD_REFERENCE_CONCEPT} square"
WORLD_STRENGTHS = (-1.0, 0.5, 1.0)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass
class Node:
    id: int
    type: str
    inputs: dict = field(default_factory=dict)  # widget values, or (node_id, slot) links
    pos: tuple[int, int] = (0, 0)
    title: str | None = None
    size: tuple[int, int] | None = None


def L(node: int, slot: int = 0) -> tuple[int, int]:
    return (node, slot)


def _sdxl_base(note: str = SDXL_NOTE) -> list[Node]:
    return [
        Node(1, "Note", {"text": note}, (1300, 420), "Model files", (660, 360)),
        Node(2, "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, (0, 0)),
        Node(
            3,
            "LoraLoaderModelOnly",
            {"model": L(2, 0), "lora_name": "dmd2_sdxl_4step_lora_fp16.safetensors", "strength_model": 1.0},
            (0, 200),
        ),
        Node(4, "HyperTransportLoadHyperNet", {"hypernet_name": "hypertransport_sdxl_dmd2.safetensors"}, (0, 400)),
        Node(
            6,
            "CLIPTextEncode",
            {"text": "a photo of a lighthouse on a cliff at sunset", "clip": L(2, 1)},
            (860, 300),
            "Positive",
        ),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (860, 540), "Negative"),
        Node(8, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (860, 780)),
        Node(10, "VAEDecode", {"samples": L(9, 0), "vae": L(2, 2)}, (1740, 0)),
    ]


def _ksampler(
    id_,
    model,
    pos=(1300, 0),
    seed=1,
    steps=4,
    cfg=1.0,
    sampler="lcm",
    scheduler="sgm_uniform",
    positive=L(6),
    negative=L(7),
    latent=L(8),
) -> Node:
    return Node(
        id_,
        "KSampler",
        {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": sampler,
            "scheduler": scheduler,
            "positive": positive,
            "negative": negative,
            "latent_image": latent,
            "denoise": 1.0,
        },
        pos,
    )


def text_steering_sdxl_dmd2() -> list[Node]:
    return _sdxl_base() + [
        Node(
            5,
            "HyperTransportEncodeConcept",
            {"hypernet": L(4), "text": "watercolor painting", "clip_weights": "auto (match the hypernet's encoder)"},
            (420, 400),
        ),
        Node(
            11,
            "HyperTransportApplySteering",
            {
                "model": L(3),
                "hypernet": L(4),
                "concept": L(5),
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
            (420, 0),
        ),
        _ksampler(9, L(11)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_text"}, (1740, 140)),
    ]


def reference_image_steering() -> list[Node]:
    return _sdxl_base() + [
        Node(13, "LoadImage", {"image": "example.png"}, (0, 600), "Reference image"),
        Node(
            5,
            "HyperTransportEncodeReferenceImage",
            {"hypernet": L(4), "image": L(13, 0), "clip_weights": "auto (match the hypernet's encoder)"},
            (420, 400),
        ),
        Node(
            11,
            "HyperTransportApplySteering",
            {
                "model": L(3),
                "hypernet": L(4),
                "concept": L(5),
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
            (420, 0),
        ),
        _ksampler(9, L(11)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_image"}, (1740, 140)),
    ]


STRENGTHS = (-1.0, 0.0, 0.5, 1.0, 1.5)


def strength_sweep() -> list[Node]:
    """One concept at five strengths in ONE KSampler run: a batch of five latents, one strength each."""
    nodes = [n for n in _sdxl_base() if n.id not in (8,)]
    nodes += [
        Node(5, "HyperTransportEncodeConcept",
             {"hypernet": L(4), "text": "watercolor painting", "clip_weights": "auto (match the hypernet's encoder)"},
             (420, 400)),
        Node(13, "HyperTransportMakeSteering", {"hypernet": L(4), "concept": L(5)}, (420, 640)),
        Node(11, "HyperTransportApplySteeringAdvanced",
             {"model": L(3), "steering": L(13), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "mode": "auto",
              "rows": "all", "block_strengths": "", "preset": "all", "batch_strengths": ", ".join(f"{s:g}" for s in STRENGTHS),
              "ramp": "constant"}, (420, 0), "one strength per image"),
        Node(8, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": len(STRENGTHS)}, (860, 780),
             f"{len(STRENGTHS)} images, one per strength"),
        _ksampler(9, L(11)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_sweep"}, (1740, 140)),
    ]
    return nodes


FIT_NOTE = """Fit Steering needs no hypernet: it fits the concept's maps on the connected model itself (LinEAS), here the
embedded world shipped with this pack (nothing to download). On the world a fit of 60 steps takes about half a
minute on two CPU cores; on SDXL expect minutes on a GPU. The result is a STEERING: apply it, or save it with
Save Steering and share the small file. The same inputs again reuse the fit (no second run).
Prompt lines: '{concept}' marks where the concept goes; the line without it is the neutral prompt."""


def fit_steering() -> list[Node]:
    world = dict(sampler="euler", scheduler="simple", steps=4, cfg=2.0, seed=7)
    nodes = [
        Node(1, "Note", {"text": FIT_NOTE}, (0, 520), "About this workflow", (520, 260)),
        Node(2, "HyperTransportLoadEmbeddedWorld", {}, (0, 0), "Embedded world (shipped)"),
        Node(3, "HyperTransportFitSteering",
             {"model": L(2, 0), "clip": L(2, 1), "concept": WORLD_CONCEPT,
              "prompts": "a {concept} circle\na {concept} square\na {concept} triangle", "steps": 60,
              "learning_rate": 0.01, "seed": 0, "sampler_steps": 0, "cfg": 0.0, "resolution": 0, "refit": False}, (0, 200),
             "Fit (LinEAS)"),
        Node(4, "HyperTransportSaveSteering", {"steering": L(3), "filename_prefix": "world_" + WORLD_CONCEPT.replace(" ", "_")}, (420, 520)),
        Node(6, "CLIPTextEncode", {"text": "a circle", "clip": L(2, 1)}, (420, 0), "Prompt"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (420, 220), "Negative (empty)"),
        Node(8, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 4}, (420, 400), "4 seeds (a 32x32 latent)"),
        Node(11, "HyperTransportApplySteering",
             {"model": L(2, 0), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "steering": L(3)}, (840, 240),
             "steered by the fitted steering"),
    ]
    for r, (title, model) in enumerate((("unsteered", L(2, 0)), (f"fitted {WORLD_CONCEPT}, strength +1", L(11)))):
        k, d, u, p = 30 + r, 40 + r, 50 + r, 70 + r
        y = r * 260
        nodes.append(_ksampler(k, model, pos=(1260, y), **world))
        nodes.append(Node(d, "VAEDecode", {"samples": L(k), "vae": L(2, 2)}, (1680, y)))
        nodes.append(Node(u, "ImageScaleBy", {"image": L(d), "upscale_method": "nearest-exact", "scale_by": 8.0}, (1920, y)))
        nodes.append(Node(p, "PreviewImage", {"images": L(u)}, (2160, y), title, (420, 220)))
    return nodes


def combine_concepts() -> list[Node]:
    return _sdxl_base() + [
        Node(
            5,
            "HyperTransportEncodeConcept",
            {"hypernet": L(4), "text": "watercolor painting", "clip_weights": "auto (match the hypernet's encoder)"},
            (420, 400),
        ),
        Node(
            14,
            "HyperTransportEncodeConcept",
            {"hypernet": L(4), "text": "autumn colors", "clip_weights": "auto (match the hypernet's encoder)"},
            (420, 640),
        ),
        Node(
            15,
            "HyperTransportCombineConcepts",
            {"concept_a": L(5), "weight_a": 1.0, "concept_b": L(14), "weight_b": -0.5, "weight_c": 1.0},
            (420, 880),
            "watercolor minus autumn",
        ),
        Node(
            11,
            "HyperTransportApplySteering",
            {
                "model": L(3),
                "hypernet": L(4),
                "concept": L(15),
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
            (420, 0),
        ),
        Node(16, "HyperTransportMakeSteering", {"hypernet": L(4), "concept": L(15)}, (860, 1020)),
        Node(
            17,
            "HyperTransportSaveSteering",
            {"steering": L(16), "filename_prefix": "watercolor_minus_autumn"},
            (1300, 1020),
        ),
        _ksampler(9, L(11)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_combined"}, (1740, 140)),
    ]


def pixart_nitro() -> list[Node]:
    return [
        Node(1, "Note", {"text": PIXART_NOTE}, (1300, 420), "Model files", (660, 360)),
        Node(2, "UNETLoader", {"unet_name": "nitro_1_pixart.safetensors", "weight_dtype": "default"}, (0, 0)),
        Node(3, "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"}, (0, 200)),
        Node(18, "VAELoader", {"vae_name": "sdxl_vae.safetensors"}, (0, 600)),
        Node(4, "HyperTransportLoadHyperNet", {"hypernet_name": "hypertransport_pixart.safetensors"}, (0, 330)),
        Node(
            5,
            "HyperTransportEncodeConcept",
            {"hypernet": L(4), "text": "pixel art", "clip_weights": "auto (match the hypernet's encoder)"},
            (420, 400),
        ),
        Node(
            11,
            "HyperTransportApplySteering",
            {
                "model": L(2),
                "hypernet": L(4),
                "concept": L(5),
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
            (420, 0),
        ),
        Node(6, "CLIPTextEncode", {"text": "a cozy cabin in a snowy forest", "clip": L(3)}, (860, 300), "Positive"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(3)}, (860, 540), "Negative"),
        Node(8, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (860, 780)),
        _ksampler(9, L(11), steps=1, cfg=1.0, sampler="euler", scheduler="simple"),
        Node(10, "VAEDecode", {"samples": L(9, 0), "vae": L(18)}, (1740, 0)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_pixart"}, (1740, 140)),
    ]


def _world_and_concept(concept_y: int) -> list[Node]:
    """Nodes 2, 4, 5 of the world templates: the shipped world, its hypernet, and WORLD_CONCEPT encoded."""
    return [
        Node(2, "HyperTransportLoadEmbeddedWorld", {}, (0, 0), "Embedded world (shipped)"),
        Node(4, "HyperTransportLoadHyperNet", {"hypernet_name": "world_hypernet.safetensors"}, (0, 260)),
        Node(5, "HyperTransportEncodeConcept",
             {"hypernet": L(4), "text": WORLD_CONCEPT, "clip_weights": "auto (match the hypernet's encoder)", "clip": L(2, 1)},
             (0, concept_y), "Concept (a phrase)"),
    ]


def world_steering() -> list[Node]:
    """The template that runs with no download: the embedded world, steered by a phrase and by an image."""
    world = dict(sampler="euler", scheduler="simple", steps=4, cfg=2.0, seed=7)
    nodes = [
        Node(1, "Note", {"text": WORLD_NOTE}, (0, 760), "About this template", (520, 300)),
        *_world_and_concept(concept_y=420),
        Node(6, "CLIPTextEncode", {"text": "a circle", "clip": L(2, 1)}, (420, 0), "Prompt"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (420, 220), "Negative (empty)"),
        Node(8, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 4}, (420, 440), "4 seeds (a 32x32 latent)"),
        Node(60, "CLIPTextEncode", {"text": WORLD_REFERENCE_PROMPT, "clip": L(2, 1)}, (420, 640), "Reference prompt"),
        Node(61, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, (420, 860)),
        _ksampler(62, L(2, 0), pos=(840, 640), positive=L(60), negative=L(7), latent=L(61), **{**world, "seed": 3}),
        Node(63, "VAEDecode", {"samples": L(62), "vae": L(2, 2)}, (1260, 640), "Reference image"),
        Node(64, "HyperTransportEncodeReferenceImage",
             {"hypernet": L(4), "image": L(63), "clip_weights": "auto (match the hypernet's encoder)", "clip_vision": L(2, 3)},
             (1260, 780)),
    ]
    rows = [("unsteered", L(2, 0))]
    for i, s in enumerate(WORLD_STRENGTHS):
        nodes.append(Node(20 + i, "HyperTransportApplySteering",
                          {"model": L(2, 0), "hypernet": L(4), "concept": L(5), "strength": s, "start_percent": 0.0,
                           "end_percent": 1.0}, (840, i * 200), f"strength {s:+g}"))
        rows.append((f"{WORLD_CONCEPT}, strength {s:+g}", L(20 + i)))
    nodes.append(Node(24, "HyperTransportApplySteering",
                      {"model": L(2, 0), "hypernet": L(4), "concept": L(64), "strength": 1.0, "start_percent": 0.0,
                       "end_percent": 1.0}, (1680, 780), "steered by the reference image"))
    rows.append(("reference image, strength +1", L(24)))
    for r, (title, model) in enumerate(rows):
        k, d, u, p = 30 + r, 40 + r, 50 + r, 70 + r
        y = r * 240
        nodes.append(_ksampler(k, model, pos=(2100, y), **world))
        nodes.append(Node(d, "VAEDecode", {"samples": L(k), "vae": L(2, 2)}, (2520, y)))
        nodes.append(Node(u, "ImageScaleBy", {"image": L(d), "upscale_method": "nearest-exact", "scale_by": 8.0}, (2760, y)))
        nodes.append(Node(p, "PreviewImage", {"images": L(u)}, (3000, y), title, (420, 220)))
    return nodes


WORLD_SWEEP = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
WORLD_SWEEP_NOTE = """One concept at six strengths in ONE KSampler run, on the embedded world (nothing to download): Apply
Steering (Advanced) gives each image of the batch its own strength ('batch_strengths'), the cond and uncond rows
of each image alike. ComfyUI draws different noise for each image of a batch, so the six objects differ in shape
and place; the colour is what the strength moves. Negative strength pushes away from the concept (towards an
opposite), 0 is the model unchanged, above 1 extrapolates. Images are upscaled 8x (nearest) to be seen."""


def world_strength_sweep() -> list[Node]:
    """The batch-strength control on the world: six strengths, one per image, one sampler run."""
    world = dict(sampler="euler", scheduler="simple", steps=4, cfg=2.0, seed=11)
    return [
        Node(1, "Note", {"text": WORLD_SWEEP_NOTE}, (0, 560), "About this template", (520, 260)),
        *_world_and_concept(concept_y=400),
        Node(13, "HyperTransportMakeSteering", {"hypernet": L(4), "concept": L(5)}, (420, 560)),
        Node(11, "HyperTransportApplySteeringAdvanced",
             {"model": L(2, 0), "steering": L(13), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "mode": "auto",
              "rows": "all", "block_strengths": "", "preset": "all", "batch_strengths": ", ".join(f"{s:g}" for s in WORLD_SWEEP),
              "ramp": "constant"}, (840, 0), "one strength per image"),
        Node(6, "CLIPTextEncode", {"text": "a circle", "clip": L(2, 1)}, (420, 0), "Prompt"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (420, 220), "Negative (empty)"),
        Node(8, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": len(WORLD_SWEEP)}, (420, 400),
             f"{len(WORLD_SWEEP)} images, one per strength"),
        _ksampler(9, L(11), pos=(1260, 0), **world),
        Node(10, "VAEDecode", {"samples": L(9), "vae": L(2, 2)}, (1680, 0)),
        Node(14, "ImageScaleBy", {"image": L(10), "upscale_method": "nearest-exact", "scale_by": 8.0}, (1680, 140)),
        Node(12, "PreviewImage", {"images": L(14)}, (1920, 0),
             "strengths " + ", ".join(f"{s:g}" for s in WORLD_SWEEP), (640, 300)),
    ]


WORKFLOWS = {
    "world_steering": world_steering,
    "world_strength_sweep": world_strength_sweep,
    "fit_steering": fit_steering,
    "text_steering_sdxl_dmd2": text_steering_sdxl_dmd2,
    "reference_image_steering": reference_image_steering,
    "strength_sweep": strength_sweep,
    "combine_concepts": combine_concepts,
    "pixart_nitro": pixart_nitro,
}

UI_ONLY = {"Note", "MarkdownNote"}


def to_api(nodes: list[Node]) -> dict:
    """API form: ``{id: {"class_type", "inputs"}}`` with links as ``[id, slot]``; UI-only nodes dropped."""
    out = {}
    for n in nodes:
        if n.type in UI_ONLY:
            continue
        inputs = {k: [str(v[0]), v[1]] if isinstance(v, tuple) else v for k, v in n.inputs.items()}
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def _spec(node_info: dict, name: str):
    for section in ("required", "optional"):
        if name in node_info["input"].get(section, {}):
            return node_info["input"][section][name]
    return None


def _is_widget(spec) -> bool:
    t = spec[0]
    return isinstance(t, (list, tuple)) or t in WIDGET_TYPES


def to_ui(nodes: list[Node], object_info: dict) -> dict:
    """The LiteGraph form the ComfyUI frontend loads (format version 0.4)."""
    links, ui_nodes, link_id = [], [], 0
    by_id = {n.id: n for n in nodes}
    out_links: dict[tuple[int, int], list[int]] = {}
    pending = []
    for n in nodes:
        for k, v in n.inputs.items():
            if isinstance(v, tuple):
                link_id += 1
                src = by_id[v[0]]
                typ = object_info[src.type]["output"][v[1]]
                links.append([link_id, v[0], v[1], n.id, None, typ, k])
                out_links.setdefault(v, []).append(link_id)
                pending.append(links[-1])
    for order, n in enumerate(nodes):
        entry = {
            "id": n.id,
            "type": n.type,
            "pos": list(n.pos),
            "size": list(n.size or (340, 130)),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": [],
        }
        if n.title:
            entry["title"] = n.title
        if n.type in UI_ONLY:
            entry["widgets_values"] = [n.inputs["text"]]
            entry["color"], entry["bgcolor"] = "#432", "#653"
            ui_nodes.append(entry)
            continue
        info = object_info[n.type]
        names = list(info["input"].get("required", {})) + list(info["input"].get("optional", {}))
        for name in names:
            spec = _spec(info, name)
            if _is_widget(spec):
                default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                if default is None and isinstance(spec[0], (list, tuple)) and spec[0]:
                    default = spec[0][0]
                entry["widgets_values"].append(n.inputs.get(name, default))
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    entry["widgets_values"].append("fixed")
            else:
                link = next((lk for lk in pending if lk[3] == n.id and lk[6] == name), None)
                slot = len(entry["inputs"])
                if link is not None:
                    link[4] = slot
                entry["inputs"].append({"name": name, "type": spec[0], "link": link[0] if link else None})
        for slot, typ in enumerate(info["output"]):
            entry["outputs"].append(
                {
                    "name": info["output_name"][slot],
                    "type": typ,
                    "links": out_links.get((n.id, slot), []),
                    "slot_index": slot,
                }
            )
        ui_nodes.append(entry)
    return {
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": link_id,
        "nodes": ui_nodes,
        "links": [lk[:6] for lk in links],
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.65, "offset": [120, 400]}},
        "version": 0.4,
    }


def nodes_doc(node_classes) -> str:
    """``docs/NODES.md``: every node, its inputs and outputs, from the schemas themselves."""
    lines = [
        "# Nodes",
        "",
        "Generated from the node schemas by `workflows/build_workflows.py`; do not edit by hand.",
        "",
    ]
    for cls in node_classes:
        sch = cls.define_schema()
        lines += [
            f"## {sch.display_name}",
            "",
            f"`{sch.node_id}` (category {sch.category})",
            "",
            sch.description,
            "",
            "| input | type | default / range | what it does |",
            "| --- | --- | --- | --- |",
        ]
        for i in sch.inputs:
            d = i.as_dict()
            typ = i.get_io_type()
            rng = []
            for key in ("default", "min", "max"):
                if d.get(key) is not None:
                    rng.append(f"{key} {d[key]!r}")
            opt = " (optional)" if i.optional else ""
            tip = (i.tooltip or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{i.id}`{opt} | {typ} | {', '.join(rng)} | {tip} |")
        lines += ["", "| output | type | what it is |", "| --- | --- | --- |"]
        for o in sch.outputs:
            lines.append(f"| {o.display_name or o.get_io_type()} | {o.get_io_type()} | {o.tooltip or ''} |")
        lines.append("")
    return "\n".join(lines)


def object_info_inprocess() -> dict:
    """``/object_info`` for the node types the workflows use, from an in-process ComfyUI."""
    import asyncio
    import tempfile

    sys.path.insert(0, str(REPO))
    import ht_devkit

    ht_devkit.setup_comfy(base_directory=tempfile.mkdtemp(prefix="ht_wf_"))
    import logging

    import nodes

    logging.disable(logging.WARNING)  # ComfyUI's notes on optional extras (torchaudio, ...) are not ours
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        logging.disable(logging.NOTSET)
    pack = ht_devkit.load_pack()
    for cls in pack.nodes.NODES:
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls
    wanted = {n.type for f in WORKFLOWS.values() for n in f()} - UI_ONLY
    info = {"__nodes_doc__": nodes_doc(pack.nodes.NODES)}
    for t in sorted(wanted):
        cls = nodes.NODE_CLASS_MAPPINGS[t]
        it = cls.INPUT_TYPES()
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        info[t] = {
            "input": {k: it.get(k, {}) for k in ("required", "optional")},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(names),
        }
    return info


def render(object_info: dict) -> dict[Path, str]:
    files = {REPO / "docs" / "NODES.md": object_info["__nodes_doc__"]}
    for name, build in WORKFLOWS.items():
        nodes = build()
        files[HERE / f"{name}.json"] = json.dumps(to_ui(nodes, object_info), indent=1) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(to_api(nodes), indent=1) + "\n"
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk")
    a = ap.parse_args(argv)
    files = render(object_info_inprocess())
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if a.check:
        for p in stale:
            print(f"stale: {p.relative_to(REPO)}")
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(files[p])
        print(f"wrote {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
