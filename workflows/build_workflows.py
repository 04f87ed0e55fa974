"""The workflow templates, described once in Python and serialized by ComfyUI's own frontend.

* ``workflows/<title>.json``: the UI form you drag into ComfyUI. ComfyUI's template browser lists this folder
  (under "HyperTransport", ``locales/en/main.json``) and shows each file's name as its title and description,
  so the names say what a template does and what it needs, numbered in the order to try them.
* ``workflows/<title>.jpg``: its thumbnail in the template browser.
* ``workflows/api/<slug>.json``: the API form (``POST /prompt``), used by the end-to-end tests.
* ``docs/NODES.md``: every node's inputs and outputs, from the server's ``/object_info``.

The graphs are built in a real ComfyUI server's page (headless Chromium driven by Playwright,
:mod:`ht_devkit.browser`): the frontend creates each node, so widget order, defaults and links are what
ComfyUI itself writes; nodes are laid out on a grid of cells from their real sizes (so nothing overlaps), the
view is framed on the results, and ``app.graphToPrompt()`` gives both forms. Regenerate after editing::

    .venv/bin/python workflows/build_workflows.py               # writes the files
    .venv/bin/python workflows/build_workflows.py --check       # exit 1 if the files are stale
    .venv/bin/python workflows/build_workflows.py --thumbnails  # also the thumbnails of the templates that
                                                                # cannot run here (tests/test_webui.py takes the others')
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REFERENCE_IMAGE = "hypertransport_reference.png"  # shipped in nodes/assets, copied into ComfyUI's input folder

FILES_SDXL = """- models/checkpoints/sd_xl_base_1.0.safetensors  (SDXL base 1.0, stabilityai/stable-diffusion-xl-base-1.0)
- models/loras/dmd2_sdxl_4step_lora_fp16.safetensors  (DMD2 4-step LoRA, tianweiy/DMD2)"""
SDXL_SAMPLING = "DMD2 samples in 4 steps with cfg 1 (lcm sampler, sgm_uniform scheduler)."
FIT_SDXL = """Fit Steering fits the concept's maps on your model itself (LinEAS): no hypernet needed. The first Queue fits
(60 steps of 4-step generations at 1024 px: minutes on a GPU); later Queues with the same inputs reuse the fit.
Save Steering keeps the result as a small file (Load Steering reads it back)."""
HYPERNET_SDXL = """NO HYPERNET FOR SDXL IS PUBLISHED YET. This template needs one you train yourself (docs/train-your-own.md:
`python trainer/train.py --backend comfy ...`); until then Load HyperNet reports the missing file before anything
runs. With the model alone you can steer today: templates 4 to 6 use Fit Steering."""

SDXL_NOTE = f"""{HYPERNET_SDXL}
Files this workflow needs (put them where ComfyUI looks):
{FILES_SDXL}
- models/hypertransport/hypertransport_sdxl_dmd2.safetensors  (a HyperTransport hypernet trained for SDXL)
- the CLIP weights the hypernet was trained with (Load HyperNet's info names them), in open_clip format,
  e.g. models/clip/ViT-L-14.safetensors; 'auto' in Encode Concept finds a file named after the architecture.
{SDXL_SAMPLING}"""

REFERENCE_NOTE = f"""{SDXL_NOTE}
The reference image ({REFERENCE_IMAGE}) ships with this pack and is copied into ComfyUI's input folder."""

SDXL_FIT_NOTE = f"""Needs SDXL and the DMD2 LoRA; no hypernet (none for SDXL is published yet).
{FIT_SDXL}
Files this workflow needs (put them where ComfyUI looks):
{FILES_SDXL}
{SDXL_SAMPLING} Top: steered by the fitted concept; bottom: the same seed unsteered."""

SDXL_SWEEP_NOTE = f"""Needs SDXL and the DMD2 LoRA; no hypernet. One fitted concept at five strengths in ONE KSampler run:
Apply Steering (Advanced) gives each image of the batch its own strength ('batch_strengths').
{FIT_SDXL}
Files this workflow needs:
{FILES_SDXL}"""

SDXL_COMBINE_NOTE = f"""Needs SDXL and the DMD2 LoRA; no hypernet. Two concepts fitted, then applied one after the other:
watercolor at +1 and autumn colours at -0.5 (chained Apply Steering nodes compose their maps exactly).
{FIT_SDXL}
Files this workflow needs:
{FILES_SDXL}"""

PIXART_NOTE = """Needs Nitro-1-PixArt, its T5-XXL text encoder and the SDXL VAE; no hypernet (none for PixArt is published
yet): Fit Steering fits the concept on your model itself (minutes on a GPU; later Queues reuse the fit).
Files this workflow needs:
- models/diffusion_models/nitro_1_pixart.safetensors  (Nitro-1-PixArt, amd/Nitro-1, a 1-step PixArt-Sigma distillation;
  any PixArt-Sigma checkpoint works with more steps)
- models/text_encoders/t5xxl_fp16.safetensors  (T5-XXL, the PixArt text encoder)
- models/vae/sdxl_vae.safetensors  (PixArt-Sigma uses the SDXL VAE)"""

WORLD_NOTE = """The embedded world ships with this pack: nothing to download.
It is a tiny text-to-image model of 32x32 images (one coloured, patterned circle, square or triangle), in
ComfyUI's own classes, with its HyperTransport hypernet (world_hypernet.safetensors, listed by Load HyperNet).
Its concepts are 139 CSS colours ("tomato", "slate blue") and 26 fill patterns ("coarse-checkered",
"diagonal-striped", "left-gradient"). Top to bottom: the same four seeds unsteered, steered by the phrase at
strengths -1, 0.5 and 1, and steered by the reference image (made here by the world itself from its prompt,
shown below). Both the phrase and the reference image's colour are test concepts: the hypernet never saw them.
Negative strength applies the inverse map: it pushes away from the concept, towards an opposite colour, and
keeps the object. Images are upscaled 8x (nearest) to be seen."""

WORLD_CONCEPT = "tomato"  # a test concept of the shipped hypernet: held out of its training and of every choice
WORLD_REFERENCE_CONCEPT = "medium violet red"  # also a test concept; the reference image shows it
WORLD_REFERENCE_PROMPT = f"a {WORLD_REFERENCE_CONCEPT} square"
WORLD_STRENGTHS = (-1.0, 0.5, 1.0)
WORLD = dict(sampler="euler", scheduler="simple", steps=4, cfg=2.0, seed=7)


@dataclass
class Node:
    """One node: ``inputs`` holds widget values and links ``(node id, output slot)``; ``cell`` is its ``(column,
    row)`` on the layout grid (nodes sharing a cell stack in the order listed); ``size`` only where the frontend's
    own would not do (notes, image previews)."""

    id: int
    type: str
    inputs: dict = field(default_factory=dict)
    cell: tuple[int, int] = (0, 0)
    title: str | None = None
    size: tuple[int, int] | None = None
    collapsed: bool = False  # shown as its title bar only (the world templates' per-row sampler, decode and upscale)
    aside: bool = False  # an image preview that is not one of the results the template opens framed on


def L(node: int, slot: int = 0) -> tuple[int, int]:
    return (node, slot)


def note(id_: int, text: str, cell, title: str = "About this template", size=(560, 330)) -> Node:
    return Node(id_, "Note", {"text": text}, cell, title, size)


def ksampler(id_, model, cell, *, seed=1, steps=4, cfg=1.0, sampler="lcm", scheduler="sgm_uniform", positive=L(6),
             negative=L(7), latent=L(8), title=None) -> Node:
    return Node(id_, "KSampler", {"model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                                  "scheduler": scheduler, "positive": positive, "negative": negative,
                                  "latent_image": latent, "denoise": 1.0}, cell, title)


def fit(id_, model, clip, concept, cell, title=None) -> Node:
    return Node(id_, "HyperTransportFitSteering",
                {"model": model, "clip": clip, "concept": concept, "prompts": "", "steps": 60, "learning_rate": 0.01,
                 "seed": 0, "sampler_steps": 0, "cfg": 0.0, "resolution": 0, "refit": False}, cell, title)


def apply(id_, model, cell, *, steering=None, hypernet=None, concept=None, strength=1.0, title=None) -> Node:
    links = {"steering": steering} if steering else {"hypernet": hypernet, "concept": concept}
    return Node(id_, "HyperTransportApplySteering",
                {"model": model, **links, "strength": strength, "start_percent": 0.0, "end_percent": 1.0}, cell, title)


def advanced(id_, model, steering, strengths, cell, title="one strength per image") -> Node:
    return Node(id_, "HyperTransportApplySteeringAdvanced",
                {"model": model, "steering": steering, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                 "mode": "auto", "rows": "all", "block_strengths": "", "preset": "all",
                 "batch_strengths": ", ".join(f"{s:g}" for s in strengths), "ramp": "constant"}, cell, title)


def encode(id_, hypernet, text, cell, clip=None, title=None) -> Node:
    inputs = {"hypernet": hypernet, "text": text, "clip_weights": "auto (match the hypernet's encoder)"}
    return Node(id_, "HyperTransportEncodeConcept", {**inputs, **({"clip": clip} if clip else {})}, cell, title)


# ----------------------------------------------------------------------------------------- SDXL + DMD2 ---
def _sdxl(latent_batch: int = 1, latent_title: str | None = None) -> list[Node]:
    """Checkpoint 2 (col 0), DMD2 LoRA 3, prompts 6/7 and latent 8 (col 2)."""
    return [
        Node(2, "CheckpointLoaderSimple", {"ckpt_name": "sd_xl_base_1.0.safetensors"}, (0, 0)),
        Node(3, "LoraLoaderModelOnly",
             {"model": L(2, 0), "lora_name": "dmd2_sdxl_4step_lora_fp16.safetensors", "strength_model": 1.0}, (0, 1)),
        Node(6, "CLIPTextEncode", {"text": "a photo of a lighthouse on a cliff at sunset", "clip": L(2, 1)}, (2, 0), "Positive"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (2, 1), "Negative"),
        Node(8, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": latent_batch}, (2, 2), latent_title),
    ]


def sdxl_fit_steering() -> list[Node]:
    return _sdxl() + [
        note(1, SDXL_FIT_NOTE, (3, 1)),
        fit(5, L(3), L(2, 1), "watercolor painting", (1, 0), "Fit Steering (LinEAS)"),
        Node(17, "HyperTransportSaveSteering", {"steering": L(5), "filename_prefix": "sdxl_watercolor"}, (1, 1)),
        apply(11, L(3), (3, 0), steering=L(5)),
        ksampler(9, L(11), (4, 0), title="steered"),
        ksampler(19, L(3), (4, 1), title="unsteered"),
        Node(10, "VAEDecode", {"samples": L(9), "vae": L(2, 2)}, (5, 0)),
        Node(20, "VAEDecode", {"samples": L(19), "vae": L(2, 2)}, (5, 1)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_fit"}, (6, 0), "watercolor painting, +1",
             (420, 460)),
        Node(21, "PreviewImage", {"images": L(20)}, (6, 1), "unsteered", (420, 460)),
    ]


SWEEP = (-1.0, 0.0, 0.5, 1.0, 1.5)


def strength_sweep() -> list[Node]:
    """One fitted concept at five strengths in ONE KSampler run: a batch of five latents, one strength each."""
    return _sdxl(len(SWEEP), f"{len(SWEEP)} images, one per strength") + [
        note(1, SDXL_SWEEP_NOTE, (3, 1)),
        fit(5, L(3), L(2, 1), "watercolor painting", (1, 0), "Fit Steering (LinEAS)"),
        advanced(11, L(3), L(5), SWEEP, (3, 0)),
        ksampler(9, L(11), (4, 0)),
        Node(10, "VAEDecode", {"samples": L(9), "vae": L(2, 2)}, (5, 0)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_sweep"}, (6, 0),
             "strengths " + ", ".join(f"{s:g}" for s in SWEEP), (900, 460)),
    ]


def combine_concepts() -> list[Node]:
    """Two fitted concepts applied one after the other (+1 and -0.5): their maps compose."""
    return _sdxl() + [
        note(1, SDXL_COMBINE_NOTE, (3, 2)),
        fit(5, L(3), L(2, 1), "watercolor painting", (1, 0), "Fit: watercolor painting"),
        fit(14, L(3), L(2, 1), "autumn colors", (1, 1), "Fit: autumn colors"),
        Node(16, "HyperTransportSaveSteering", {"steering": L(5), "filename_prefix": "sdxl_watercolor"}, (1, 2)),
        Node(17, "HyperTransportSaveSteering", {"steering": L(14), "filename_prefix": "sdxl_autumn"}, (1, 2)),
        apply(11, L(3), (3, 0), steering=L(5), strength=1.0, title="watercolor, +1"),
        apply(15, L(11), (3, 1), steering=L(14), strength=-0.5, title="minus autumn colors, -0.5"),
        ksampler(9, L(15), (4, 0)),
        Node(10, "VAEDecode", {"samples": L(9), "vae": L(2, 2)}, (5, 0)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_combined"}, (6, 0),
             "watercolor minus autumn", (420, 460)),
    ]


def pixart_nitro() -> list[Node]:
    return [
        note(1, PIXART_NOTE, (3, 1)),
        Node(2, "UNETLoader", {"unet_name": "nitro_1_pixart.safetensors", "weight_dtype": "default"}, (0, 0)),
        Node(3, "CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "pixart", "device": "default"}, (0, 1)),
        Node(18, "VAELoader", {"vae_name": "sdxl_vae.safetensors"}, (0, 2)),
        fit(5, L(2), L(3), "pixel art", (1, 0), "Fit Steering (LinEAS)"),
        Node(17, "HyperTransportSaveSteering", {"steering": L(5), "filename_prefix": "pixart_pixel_art"}, (1, 1)),
        Node(6, "CLIPTextEncode", {"text": "a cozy cabin in a snowy forest", "clip": L(3)}, (2, 0), "Positive"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(3)}, (2, 1), "Negative"),
        Node(8, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (2, 2)),
        apply(11, L(2), (3, 0), steering=L(5)),
        ksampler(9, L(11), (4, 0), steps=1, sampler="euler", scheduler="simple"),
        Node(10, "VAEDecode", {"samples": L(9, 0), "vae": L(18)}, (5, 0)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_pixart"}, (6, 0), "pixel art, +1",
             (420, 460)),
    ]


def _sdxl_hypernet(note_text: str) -> list[Node]:
    return _sdxl() + [
        note(1, note_text, (3, 1), size=(560, 400)),
        Node(4, "HyperTransportLoadHyperNet", {"hypernet_name": "hypertransport_sdxl_dmd2.safetensors"}, (0, 2)),
        ksampler(9, L(11), (4, 0)),
        Node(10, "VAEDecode", {"samples": L(9, 0), "vae": L(2, 2)}, (5, 0)),
    ]


def text_steering_sdxl_dmd2() -> list[Node]:
    return _sdxl_hypernet(SDXL_NOTE) + [
        encode(5, L(4), "watercolor painting", (1, 2)),
        apply(11, L(3), (3, 0), hypernet=L(4), concept=L(5)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_text"}, (6, 0), None, (420, 460)),
    ]


def reference_image_steering() -> list[Node]:
    return _sdxl_hypernet(REFERENCE_NOTE) + [
        Node(13, "LoadImage", {"image": REFERENCE_IMAGE}, (1, 0), "Reference image"),
        Node(5, "HyperTransportEncodeReferenceImage",
             {"hypernet": L(4), "image": L(13, 0), "clip_weights": "auto (match the hypernet's encoder)"}, (1, 2)),
        apply(11, L(3), (3, 0), hypernet=L(4), concept=L(5)),
        Node(12, "SaveImage", {"images": L(10), "filename_prefix": "hypertransport_image"}, (6, 0), None, (420, 460)),
    ]


# --------------------------------------------------------------------------------- the embedded world ---
def _world_and_concept() -> list[Node]:
    """Nodes 2, 4, 5 of the world templates (column 0): the shipped world, its hypernet, WORLD_CONCEPT encoded."""
    return [
        Node(2, "HyperTransportLoadEmbeddedWorld", {}, (0, 0), "Embedded world (shipped)"),
        Node(4, "HyperTransportLoadHyperNet", {"hypernet_name": "world_hypernet.safetensors"}, (0, 1)),
        encode(5, L(4), WORLD_CONCEPT, (0, 2), clip=L(2, 1), title="Concept (a phrase)"),
    ]


def _result_row(r: int, model, title: str, first_col: int, *, latent=L(8), seed=7) -> list[Node]:
    """KSampler → VAE Decode → 8x upscale → preview, in row ``r`` from column ``first_col``."""
    k, d, u, p = 30 + r, 40 + r, 50 + r, 70 + r
    sampler = ksampler(k, model, (first_col, r), **{**WORLD, "seed": seed}, latent=latent)
    sampler.collapsed = True
    return [
        sampler,
        Node(d, "VAEDecode", {"samples": L(k), "vae": L(2, 2)}, (first_col, r), collapsed=True),
        Node(u, "ImageScaleBy", {"image": L(d), "upscale_method": "nearest-exact", "scale_by": 8.0}, (first_col, r),
             collapsed=True),
        Node(p, "PreviewImage", {"images": L(u)}, (first_col + 1, r), title, (560, 190)),
    ]


def world_steering() -> list[Node]:
    """The template that runs with no download: the embedded world, steered by a phrase and by an image."""
    nodes = [
        note(1, WORLD_NOTE, (0, 6), size=(560, 380)),
        *_world_and_concept(),
        Node(6, "CLIPTextEncode", {"text": "a circle", "clip": L(2, 1)}, (1, 0), "Prompt"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (1, 1), "Negative (empty)"),
        Node(8, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 4}, (1, 2), "4 seeds (a 32x32 latent)"),
        Node(60, "CLIPTextEncode", {"text": WORLD_REFERENCE_PROMPT, "clip": L(2, 1)}, (1, 5), "Reference prompt"),
        Node(61, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 1}, (1, 5)),
        ksampler(62, L(2, 0), (3, 5), **{**WORLD, "seed": 3}, positive=L(60), negative=L(7), latent=L(61),
                 title="draws the reference"),
        Node(63, "VAEDecode", {"samples": L(62), "vae": L(2, 2)}, (3, 5), collapsed=True),
        Node(65, "ImageScaleBy", {"image": L(63), "upscale_method": "nearest-exact", "scale_by": 8.0}, (3, 5),
             collapsed=True),
        Node(66, "PreviewImage", {"images": L(65)}, (4, 5), "the reference image", (560, 190), aside=True),
        Node(64, "HyperTransportEncodeReferenceImage",
             {"hypernet": L(4), "image": L(63), "clip_weights": "auto (match the hypernet's encoder)", "clip_vision": L(2, 3)},
             (2, 5)),
    ]
    nodes[[n.id for n in nodes].index(62)].collapsed = True
    rows = [("unsteered", L(2, 0))]
    for i, s in enumerate(WORLD_STRENGTHS):
        nodes.append(apply(20 + i, L(2, 0), (2, 1 + i), hypernet=L(4), concept=L(5), strength=s, title=f"strength {s:+g}"))
        rows.append((f"{WORLD_CONCEPT}, strength {s:+g}", L(20 + i)))
    nodes.append(apply(24, L(2, 0), (2, 4), hypernet=L(4), concept=L(64), title="steered by the reference image"))
    rows.append(("reference image, strength +1", L(24)))
    for r, (title, model) in enumerate(rows):
        nodes += _result_row(r, model, title, 3)
    return nodes


WORLD_SWEEP = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
WORLD_SWEEP_NOTE = """One concept at six strengths in ONE KSampler run, on the embedded world (nothing to download): Apply
Steering (Advanced) gives each image of the batch its own strength ('batch_strengths'), the cond and uncond rows
of each image alike. ComfyUI draws different noise for each image of a batch, so the six objects differ in shape
and place; the colour is what the strength moves. Negative strength pushes away from the concept (towards an
opposite), 0 is the model unchanged, above 1 extrapolates. Images are upscaled 8x (nearest) to be seen."""


def world_strength_sweep() -> list[Node]:
    """The batch-strength control on the world: six strengths, one per image, one sampler run."""
    return [
        note(1, WORLD_SWEEP_NOTE, (0, 3)),
        *_world_and_concept(),
        Node(13, "HyperTransportMakeSteering", {"hypernet": L(4), "concept": L(5)}, (1, 3)),
        Node(6, "CLIPTextEncode", {"text": "a circle", "clip": L(2, 1)}, (1, 0), "Prompt"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (1, 1), "Negative (empty)"),
        Node(8, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": len(WORLD_SWEEP)}, (1, 2),
             f"{len(WORLD_SWEEP)} images, one per strength"),
        advanced(11, L(2, 0), L(13), WORLD_SWEEP, (2, 0)),
        ksampler(9, L(11), (3, 0), **{**WORLD, "seed": 11}),
        Node(10, "VAEDecode", {"samples": L(9), "vae": L(2, 2)}, (4, 0)),
        Node(14, "ImageScaleBy", {"image": L(10), "upscale_method": "nearest-exact", "scale_by": 8.0}, (4, 0)),
        Node(12, "PreviewImage", {"images": L(14)}, (5, 0), "strengths " + ", ".join(f"{s:g}" for s in WORLD_SWEEP),
             (660, 300)),
    ]


FIT_NOTE = """Fit Steering needs no hypernet: it fits the concept's maps on the connected model itself (LinEAS), here the
embedded world shipped with this pack (nothing to download). On the world a fit of 60 steps takes about 50 s on two
CPU cores; on SDXL expect minutes on a GPU. The result is a STEERING: apply it, or save it with Save Steering and
share the small file. The same inputs again reuse the fit (no second run); turn 'refit' on to fit anew.
Prompt lines: '{concept}' marks where the concept goes; the line without it is the neutral prompt.
For your own model, swap Load Embedded World for your checkpoint (templates 4 to 7 do)."""


def fit_steering() -> list[Node]:
    nodes = [
        note(1, FIT_NOTE, (0, 2)),
        Node(2, "HyperTransportLoadEmbeddedWorld", {}, (0, 0), "Embedded world (shipped)"),
        Node(3, "HyperTransportFitSteering",
             {"model": L(2, 0), "clip": L(2, 1), "concept": WORLD_CONCEPT,
              "prompts": "a {concept} circle\na {concept} square\na {concept} triangle", "steps": 60,
              "learning_rate": 0.01, "seed": 0, "sampler_steps": 0, "cfg": 0.0, "resolution": 0, "refit": False}, (1, 0),
             "Fit (LinEAS)"),
        Node(4, "HyperTransportSaveSteering", {"steering": L(3), "filename_prefix": "world_" + WORLD_CONCEPT.replace(" ", "_")},
             (1, 2)),
        Node(6, "CLIPTextEncode", {"text": "a circle", "clip": L(2, 1)}, (0, 1), "Prompt"),
        Node(7, "CLIPTextEncode", {"text": "", "clip": L(2, 1)}, (0, 1), "Negative (empty)"),
        Node(8, "EmptyLatentImage", {"width": 256, "height": 256, "batch_size": 4}, (1, 1), "4 seeds (a 32x32 latent)"),
        apply(11, L(2, 0), (2, 1), steering=L(3), title="steered by the fitted steering"),
    ]
    nodes += _result_row(0, L(2, 0), "unsteered", 3)
    nodes += _result_row(1, L(11), f"fitted {WORLD_CONCEPT}, strength +1", 3)
    return nodes


@dataclass(frozen=True)
class Template:
    slug: str  # workflows/api/<slug>.json; what tests and scripts name it by
    title: str  # workflows/<title>.json: the template browser shows the file name as title and description
    build: object
    runs_here: bool  # needs nothing beyond the pack (the embedded world)


TEMPLATES = [
    Template("world_steering", "1 Embedded world, steer by a phrase or an image (runs now)", world_steering, True),
    Template("world_strength_sweep", "2 Embedded world, six strengths in one run (runs now)", world_strength_sweep, True),
    Template("fit_steering", "3 Embedded world, Fit Steering with no hypernet (runs now)", fit_steering, True),
    Template("sdxl_fit_steering", "4 SDXL DMD2, Fit Steering then apply (needs SDXL and the DMD2 LoRA)",
             sdxl_fit_steering, False),
    Template("strength_sweep", "5 SDXL DMD2, strength sweep of a fitted concept (needs SDXL and DMD2)", strength_sweep, False),
    Template("combine_concepts", "6 SDXL DMD2, two fitted concepts combined (needs SDXL and DMD2)", combine_concepts, False),
    Template("pixart_nitro", "7 PixArt Nitro, Fit Steering then apply (needs Nitro 1 PixArt and T5)", pixart_nitro, False),
    Template("text_steering_sdxl_dmd2", "8 SDXL DMD2, steer by a phrase (needs a hypernet you train)",
             text_steering_sdxl_dmd2, False),
    Template("reference_image_steering", "9 SDXL DMD2, steer by a reference image (needs a hypernet you train)",
             reference_image_steering, False),
]
BY_SLUG = {t.slug: t for t in TEMPLATES}
RESULT_TYPES = ("PreviewImage", "SaveImage")


def ui_path(slug: str) -> Path:
    return HERE / f"{BY_SLUG[slug].title}.json"


# The page-side builder: nodes made by the frontend, widget values set by name, links made by input name, a grid
# layout from the nodes' real sizes, the view framed on the results (or the whole graph when it fits at a readable
# scale), then app.graphToPrompt(): {workflow (the UI form), output (the API form)}.
JS_BUILD = r"""
async ([spec, frame]) => {
  const g = app.graph; g.clear();
  const made = {};
  for (const n of spec) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error(`unknown node type ${n.type}`);
    node.id = n.id; g.add(node);
    if (n.title) node.title = n.title;
    if (n.size) node.size = [...n.size];
    if (n.collapsed) node.collapse(true);
    made[n.id] = node;
  }
  // a collapsed node is drawn min(its width, its title's + 60) wide: 240 holds the short titles used collapsed
  const T = LiteGraph.NODE_TITLE_HEIGHT, GAP_X = 50, GAP_Y = 30, COLLAPSED_W = 240;
  const sizeOf = node => node.flags.collapsed ? [Math.min(node.size[0], COLLAPSED_W), 0] : node.size;
  for (const n of spec) {
    const node = made[n.id];
    for (const [k, v] of Object.entries(n.widgets)) {
      const w = n.type === "Note" ? node.widgets[0] : (node.widgets || []).find(w => w.name === k);
      if (!w) throw new Error(`${n.type} ${n.id} has no widget ${k}`);
      w.value = v;
    }
    const ctl = (node.widgets || []).find(w => w.name === "control_after_generate");
    if (ctl) ctl.value = "fixed";  // a template shows what its Note describes
  }
  for (const n of spec) for (const [input, [src, slot]] of Object.entries(n.links)) {
    if (!made[src].connect(slot, made[n.id], input)) throw new Error(`cannot link ${src}:${slot} to ${n.id}.${input}`);
  }
  const colW = {}, rowH = {}, cellH = {};
  for (const n of spec) {
    const [c, r] = n.cell, s = sizeOf(made[n.id]), key = `${c},${r}`;
    colW[c] = Math.max(colW[c] || 0, s[0]);
    cellH[key] = (cellH[key] || 0) + s[1] + T + GAP_Y;
    rowH[r] = Math.max(rowH[r] || 0, cellH[key]);
  }
  const xs = {}, ys = {}; let x = 0, y = 0;
  for (const c of Object.keys(colW).map(Number).sort((a, b) => a - b)) { xs[c] = x; x += colW[c] + GAP_X; }
  for (const r of Object.keys(rowH).map(Number).sort((a, b) => a - b)) { ys[r] = y; y += rowH[r]; }
  const used = {};
  for (const n of spec) {
    const [c, r] = n.cell, key = `${c},${r}`;
    made[n.id].pos = [xs[c], ys[r] + T + (used[key] || 0)];
    used[key] = (used[key] || 0) + sizeOf(made[n.id])[1] + T + GAP_Y;
  }
  const box = nodes => {
    const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - T));
    const x1 = Math.max(...nodes.map(n => n.pos[0] + sizeOf(n)[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + sizeOf(n)[1]));
    return [x0, y0, x1 - x0, y1 - y0];
  };
  const fit = ([x0, y0, w, h]) => Math.min(1, frame.width / w, frame.height / h);
  const all = box(Object.values(made));
  let b = all, s = fit(b), left, top;
  if (s >= frame.min_scale) {
    left = frame.left + (frame.width - b[2] * s) / 2; top = frame.top + (frame.height - b[3] * s) / 2;
  } else {  // too small to read: the results at the right, as much of what feeds them to their left, from the top
    b = box(spec.filter(n => n.result).map(n => made[n.id]));
    s = Math.min(frame.min_scale, fit(b));
    left = frame.left + frame.width - b[2] * s;
    top = frame.top + Math.min(0, frame.height - (b[1] + b[3] - all[1]) * s);  // the graph's top row, if the results fit
    b = [b[0], all[1] - (top - frame.top) / s, b[2], b[3]];
    top = frame.top;
  }
  g.extra = {...(g.extra || {}), ds: {scale: s, offset: [left / s - b[0], top / s - b[1]]}};
  app.canvas.ds.scale = s; app.canvas.ds.offset = [left / s - b[0], top / s - b[1]];
  app.canvas.setDirty(true, true);
  const {workflow, output} = await app.graphToPrompt();
  // as Export writes it: JSON.stringify drops what is undefined (Playwright would hand it over as null)
  return {workflow: JSON.parse(JSON.stringify(workflow)), output: JSON.parse(JSON.stringify(output))};
}
"""

#: where a template opens: its view is framed in this part of a 1920x1080 window (clear of the workflow tab's title at
#: the top left, the Run bar at the top right and the minimap at the bottom right), on the whole graph when that is
#: readable (scale >= min_scale: below 8/14 the frontend draws nodes without their text), else on its results
FRAME = {"left": 80, "top": 150, "width": 1500, "height": 800, "min_scale": 0.6}


def spec_of(nodes: list[Node]) -> list[dict]:
    return [{"id": n.id, "type": n.type, "title": n.title, "size": list(n.size) if n.size else None, "cell": list(n.cell),
             "collapsed": n.collapsed, "result": n.type in RESULT_TYPES and not n.aside,
             "widgets": {k: v for k, v in n.inputs.items() if not isinstance(v, tuple)},
             "links": {k: list(v) for k, v in n.inputs.items() if isinstance(v, tuple)}} for n in nodes]


def overlaps(workflow: dict) -> list[tuple]:
    """Pairs of nodes whose rectangles (title bar included) intersect."""
    T = 30

    def size(n):  # as the layout counts a collapsed node (its titles are short enough for 240)
        return (min(n["size"][0], 240), 0) if n.get("flags", {}).get("collapsed") else n["size"]

    r = [(n["id"], n["pos"][0], n["pos"][1] - T, n["pos"][0] + size(n)[0], n["pos"][1] + size(n)[1])
         for n in workflow["nodes"]]
    return [(a[0], b[0]) for i, a in enumerate(r) for b in r[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


def nodes_doc(object_info: dict) -> str:
    """``docs/NODES.md``: every node of the pack, its inputs and outputs, as the server describes them."""
    lines = ["# Nodes", "", "Generated from the server's `/object_info` by `workflows/build_workflows.py`; do not edit by hand.", ""]
    for node_id, d in object_info.items():
        if not node_id.startswith("HyperTransport") or d.get("deprecated"):
            continue
        lines += [f"## {d['display_name']}", "", f"`{node_id}` (category {d['category']})", "", d["description"], "",
                  "| input | type | default / range | what it does |", "| --- | --- | --- | --- |"]
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                typ = spec[0] if isinstance(spec[0], str) else "COMBO"
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                rng = [f"{k} {opts[k]!r}" for k in ("default", "min", "max") if opts.get(k) is not None]
                opt = " (optional)" if section == "optional" else ""
                tip = (opts.get("tooltip") or "").replace("|", "\\|").replace("\n", " ")
                lines.append(f"| `{name}`{opt} | {typ} | {', '.join(rng)} | {tip} |")
        lines += ["", "| output | type | what it is |", "| --- | --- | --- |"]
        tips = d.get("output_tooltips") or [""] * len(d["output"])
        for name, typ, tip in zip(d["output_name"], d["output"], tips):
            lines.append(f"| {name} | {typ} | {tip or ''} |")
        lines.append("")
    return "\n".join(lines)


def reference_image():
    """The shipped reference image (a watercolour wash on paper, drawn here from a fixed seed): a PIL image."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(20261207)
    n = 384
    yy, xx = np.mgrid[0:n, 0:n] / n
    paper = np.full((n, n, 3), 242.0) + rng.normal(0, 3, (n, n, 1))
    img = paper.copy()
    for colour in ([214, 96, 77], [244, 165, 96], [90, 140, 190], [120, 170, 110], [200, 120, 160], [250, 210, 120]):
        for _ in range(3):
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.12, 0.3)
            d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r + rng.normal(0, 0.05, (n, n))
            alpha = np.clip(1.2 - d, 0, 1) ** 0.7 * rng.uniform(0.35, 0.6)
            edge = np.exp(-((d - 1.0) ** 2) / 0.004) * 0.25  # pigment gathers at a wash's edge
            a = np.clip(alpha + edge, 0, 0.9)[..., None]
            img = img * (1 - a) + np.array(colour) * a * (img / 255.0)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(1.2))


def render(page, url: str) -> dict[Path, str]:
    """Every generated text file, built in ``page``, the frontend of the server at ``url``."""
    import urllib.request

    from ht_devkit.browser import dumps

    with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
        info = json.loads(r.read())
    files = {REPO / "docs" / "NODES.md": nodes_doc(info)}
    for t in TEMPLATES:
        out = page.evaluate(JS_BUILD, [spec_of(t.build()), FRAME])
        bad = overlaps(out["workflow"])
        if bad:
            raise RuntimeError(f"{t.slug}: nodes overlap: {bad}")
        files[HERE / f"{t.title}.json"] = dumps(out["workflow"])
        files[HERE / "api" / f"{t.slug}.json"] = dumps(out["output"])
    return files


def thumbnails(page, files: dict[Path, str], slugs) -> None:
    """``workflows/<title>.jpg`` for ``slugs``: the template just built (``files``) as it opens (framed), cropped to its
    graph."""
    from ht_devkit.browser import clamped, graph_nodes, load_workflow, screen_box, write_thumbnail

    png = Path(tempfile.mkdtemp(prefix="ht_thumbnail_")) / "shot.png"
    for slug in slugs:
        t = BY_SLUG[slug]
        load_workflow(page, json.loads(files[HERE / f"{t.title}.json"]), t.title)
        page.screenshot(path=str(png), clip=clamped(screen_box(page, graph_nodes(page))))
        write_thumbnail(png, HERE / f"{t.title}.jpg")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the files on disk")
    ap.add_argument("--thumbnails", action="store_true", help="also write the thumbnails of the templates that cannot run here")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))  # a development script: ht_devkit and the pack from this checkout
    from ht_devkit.server import Server, link_pack

    base = Path(tempfile.mkdtemp(prefix="ht_workflows_"))
    link_pack(base)  # the pack alone: the graphs name model files that need not exist
    server = Server(base)
    try:
        from ht_devkit.browser import comfy_page

        with comfy_page(server.url) as page:  # one browser for the files and the thumbnails
            files = render(page, server.url)
            if a.thumbnails and not a.check:
                thumbnails(page, files, [t.slug for t in TEMPLATES if not t.runs_here])
    finally:
        server.stop()
    image = reference_image()
    asset = REPO / "nodes" / "assets" / REFERENCE_IMAGE
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    from PIL import Image, ImageChops

    if not asset.exists() or ImageChops.difference(Image.open(asset).convert("RGB"), image).getbbox() is not None:
        stale.append(asset)
    known = {p for p in files} | {HERE / f"{t.title}.jpg" for t in TEMPLATES}
    extra = [p for p in list(HERE.glob("*.json")) + list(HERE.glob("*.jpg")) + list((HERE / "api").glob("*.json"))
             if p not in known]
    if a.check:
        for p in stale:
            print(f"stale: {p.relative_to(REPO)}")
        for p in extra:
            print(f"not generated (remove it): {p.relative_to(REPO)}")
        return 1 if stale or extra else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p == asset:
            image.save(p, optimize=True)
        else:
            p.write_text(files[p])
        print(f"wrote {p.relative_to(REPO)}")
    for p in extra:
        p.unlink()
        print(f"removed {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
