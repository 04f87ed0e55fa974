"""The HyperTransport nodes (ComfyUI V3 schema). Thin: validate, call the core, patch a clone.

Node ids are permanent. A breaking change gets a new id; the old class stays in
``NODES_DEPRECATED`` with ``is_deprecated=True`` so saved workflows keep loading.
"""

from __future__ import annotations

import math
import os

import torch
from comfy_api.latest import io, ui

from hypertransport_core.concepts import Concept, combine_concepts
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.files import load_hypernet, load_steering, read_header, save_steering
from hypertransport_core.interventions import Steering
from hypertransport_core.sites import block_presets

from . import comfy_clip, feedback, patching
from . import model_files as mf
from .inputs import check_blocks, check_model, parse_batch_strengths, parse_block_strengths, parse_concepts

CATEGORY = "HyperTransport"
LOADERS, CONCEPTS, STEERING, FILES = (f"{CATEGORY}/{c}" for c in ("loaders", "concepts", "steering", "files"))

HyperNetType = io.Custom("HT_HYPERNET")
ConceptType = io.Custom("HT_CONCEPT")
SteeringType = io.Custom("HT_STEERING")

# the slider spans what works (the maps were fitted at 1; past about ±2 images break up); a prompt sent through the API
# may still use up to patching.STRENGTH_RANGE (validate_inputs checks that bound) and gets a warning past ±2
_STRENGTH = dict(default=1.0, min=-3.0, max=3.0, step=0.05)
_STRENGTH_TIP = (
    "How strongly the concept is applied: 0 leaves the model unchanged, 1 the full learned map, above 1 extrapolates; "
    "negative removes it with the inverse map, which pushes away from the concept (towards an opposite); from -1 to 0 it "
    "amplifies no channel. The slider spans -3 to 3 (a prompt sent through the API may use -10 to 10); past about ±2 "
    "images break up, and the node shows a warning."
)
_START_TIP = "Fraction of the sampling at which steering starts (0 = first step)."
_END_TIP = "Fraction of the sampling at which steering stops (1 = last step)."


def _strength_and_range() -> list:
    """The strength slider and the step range, the same on both Apply Steering nodes."""
    return [
        io.Float.Input("strength", tooltip=_STRENGTH_TIP, **_STRENGTH),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=_START_TIP),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=_END_TIP),
    ]


# ---------------------------------------------------------------------------------- helpers ---
def _check_widgets(check) -> bool | str:
    """For ``validate_inputs``: True, or the error message (the prompt is refused before it runs)."""
    try:
        check()
    except HyperTransportError as e:
        return str(e)
    return True


def _strength(strength: float, node: str) -> float:
    return patching.check_strength(strength, f"{node}: strength")


# ------------------------------------------------------------------------------------ nodes ---
class LoadEmbeddedWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportLoadEmbeddedWorld",
            display_name="HyperTransport Load Embedded World",
            category=LOADERS,
            description="Loads the embedded world shipped in this pack: a tiny text-to-image model of 32x32 images of one "
            "coloured, patterned circle, square or triangle, in ComfyUI's own classes (SD UNet, CLIP text, CLIP vision, "
            "pixel-space VAE). Its hypernet, world_hypernet.safetensors, is listed in Load HyperNet. Sample it with an "
            "Empty Latent Image of 256x256 (a 32x32 latent), KSampler euler/simple, 4 steps, cfg 2, then VAE Decode.",
            inputs=[],
            outputs=[
                io.Model.Output(tooltip="The world's diffusion model (ComfyUI's SD UNet in pixel space, flow matching)."),
                io.Clip.Output(tooltip="The world's text encoder (ComfyUI's CLIP text model, HT-World-CLIP's text tower)."),
                io.Vae.Output(tooltip="ComfyUI's pixel-space VAE: the latent is the image."),
                io.ClipVision.Output(tooltip="HT-World-CLIP's image tower, for Encode Reference Image."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from hypertransport_world import model as WM

        with torch.inference_mode(False):  # plain tensors: the world can also be trained through (Fit Steering)
            w = WM.load(mf.WORLD_WEIGHTS)
        return io.NodeOutput(w.model, w.clip, w.vae, w.clip_vision)


class LoadHyperNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportLoadHyperNet",
            display_name="HyperTransport Load HyperNet",
            category=LOADERS,
            description="Loads a HyperTransport hypernetwork (.safetensors from models/hypertransport), checks the "
            "file before reading its tensors, and tells which model family and CLIP encoder it needs.",
            inputs=[
                io.Combo.Input(
                    "hypernet_name",
                    options=mf.list_files(mf.HYPERNET_FOLDER, kind="hypertransport.hypernet"),
                    tooltip="Hypernet file in ComfyUI/models/hypertransport.",
                ),
            ],
            outputs=[
                HyperNetType.Output(
                    display_name="HYPERNET", tooltip="The hypernetwork: maps a concept to steering maps."
                ),
                io.String.Output(display_name="info", tooltip="Model family, encoder and number of sites of the file."),
            ],
        )

    @classmethod
    def validate_inputs(cls, hypernet_name=None) -> bool | str:
        """A missing file is named before the prompt runs (ComfyUI 0.3.75 does not check V3 combo values)."""
        if not isinstance(hypernet_name, str):
            return True

        def check():
            try:
                mf.full_path(mf.HYPERNET_FOLDER, hypernet_name, "Load HyperNet")
            except HyperTransportError as e:
                raise HyperTransportError(
                    f"{str(e).split(' Fix:')[0]} No hypernet for a released model (SDXL/DMD2, PixArt/Nitro, SD1.5, Flux) "
                    "is published yet. Fix: for your model use Fit Steering (HyperTransport templates 3 to 7 show it), train a "
                    "hypernet (docs/train-your-own.md), or pick world_hypernet.safetensors for the embedded world."
                ) from None

        return _check_widgets(check)

    @classmethod
    def execute(cls, hypernet_name) -> io.NodeOutput:
        path = mf.full_path(mf.HYPERNET_FOLDER, hypernet_name, "Load HyperNet")
        read_header(path, expect="hypertransport.hypernet")  # validates without loading tensors
        handle = mf.HyperNetHandle(load_hypernet(path), hypernet_name)
        info = handle.describe()
        feedback.progress_text(info)  # on the node itself: a V3 node's text output is not shown without a web extension
        return io.NodeOutput(handle, info, ui=ui.PreviewText(info))


class EncodeConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportEncodeConcept",
            display_name="HyperTransport Encode Concept",
            category=CONCEPTS,
            description="Encodes a concept phrase with the CLIP text encoder the hypernet was trained with: the "
            "connected CLIP when it holds that encoder, else open_clip weights from the model folders. Several "
            "concepts: one per line (at most 16), weighted as 'text * weight'; a negative weight subtracts.",
            inputs=[
                HyperNetType.Input("hypernet", tooltip="The hypernet whose encoder to use (from Load HyperNet)."),
                io.String.Input(
                    "text",
                    multiline=True,
                    default="watercolor painting",
                    tooltip="The concept, e.g. 'watercolor'. One per line (at most 16); 'watercolor * 0.5' sets a weight "
                    "(-10..10) in the weighted sum of the concepts' embeddings. At most 2,000 characters.",
                ),
                io.Combo.Input(
                    "clip_weights",
                    options=mf.clip_weight_choices(),
                    default=mf.AUTO,
                    tooltip="open_clip weights file (models/clip, models/clip_vision or models/hypertransport);"
                    " 'auto' finds the file named after the hypernet's encoder. Not loaded when the connected "
                    "clip holds the hypernet's text tower.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Optional: ComfyUI's CLIP (e.g. the checkpoint's). When one of its towers (clip_l, "
                    "clip_g) is the hypernet's text encoder (same weights, checked by fingerprint), it encodes the "
                    "concept itself and no open_clip weights are loaded; otherwise a warning is logged and "
                    "clip_weights is used.",
                ),
            ],
            outputs=[ConceptType.Output(display_name="CONCEPT", tooltip="The concept embedding (unit norm).")],
        )

    @classmethod
    def validate_inputs(cls, text=None) -> bool | str:  # one input: ComfyUI pins the message on each input named here
        return True if text is None else _check_widgets(lambda: parse_concepts(text))

    @classmethod
    def execute(cls, hypernet, text, clip_weights=mf.AUTO, clip=None) -> io.NodeOutput:
        parts = parse_concepts(text)
        enc = comfy_clip.text_encoder_for(hypernet, clip, clip_weights, "Encode Concept")
        e = hypernet.net.encode_text(enc, [t for t, _ in parts]).cpu()
        concepts = [(Concept(e[i], "text", enc.identity, t), w) for i, (t, w) in enumerate(parts)]
        if len(concepts) == 1 and concepts[0][1] == 1.0:
            return io.NodeOutput(concepts[0][0])
        return io.NodeOutput(combine_concepts(concepts))


class EncodeReferenceImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportEncodeReferenceImage",
            display_name="HyperTransport Encode Reference Image",
            category=CONCEPTS,
            description="Encodes reference image(s) with the CLIP image encoder of the hypernet (the connected "
            "CLIP_VISION when it is that encoder, else open_clip weights); a batch is averaged. "
            "Any size; grayscale and alpha are handled (alpha composited on a neutral background).",
            inputs=[
                HyperNetType.Input("hypernet", tooltip="The hypernet whose encoder to use (from Load HyperNet)."),
                io.Image.Input("image", tooltip="Reference image or batch of images (averaged into one concept)."),
                io.Combo.Input(
                    "clip_weights",
                    options=mf.clip_weight_choices(),
                    default=mf.AUTO,
                    tooltip="open_clip weights file; 'auto' finds the file named after the hypernet's encoder. "
                    "Not loaded when the connected clip_vision is the hypernet's image tower.",
                ),
                io.ClipVision.Input(
                    "clip_vision",
                    optional=True,
                    tooltip="Optional: ComfyUI's CLIP_VISION (Load CLIP Vision). When it is the hypernet's image "
                    "encoder (same weights, checked by fingerprint), it encodes the image itself and no open_clip "
                    "weights are loaded; otherwise a warning is logged and clip_weights is used.",
                ),
            ],
            outputs=[ConceptType.Output(display_name="CONCEPT", tooltip="The image concept embedding (unit norm).")],
        )

    @classmethod
    def validate_inputs(cls, clip_weights=None) -> bool | str:
        return True if not isinstance(clip_weights, str) else _check_widgets(
            lambda: mf.check_clip_weights(clip_weights, "Encode Reference Image"))

    @classmethod
    def execute(cls, hypernet, image, clip_weights=mf.AUTO, clip_vision=None) -> io.NodeOutput:
        if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
            raise HyperTransportError(
                "Encode Reference Image: expected an IMAGE (B, H, W, C). Fix: connect a Load Image node."
            )
        enc = comfy_clip.image_encoder_for(hypernet, clip_vision, clip_weights, "Encode Reference Image")
        n = image.shape[0] if image.ndim == 4 else 1
        return io.NodeOutput(enc.image_concept(image, label=f"reference image x{n}"))


class CombineConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportCombineConcepts",
            display_name="HyperTransport Combine Concepts",
            category=CONCEPTS,
            description="Weighted sum of up to three concepts (text or image), re-normalized. A negative weight "
            "subtracts: 'a' 1 and 'b' -1 steers towards the difference of a and b.",
            inputs=[
                ConceptType.Input("concept_a", tooltip="First concept."),
                io.Float.Input("weight_a", default=1.0, min=-10.0, max=10.0, step=0.05, tooltip="Weight of concept_a."),
                ConceptType.Input("concept_b", optional=True, tooltip="Second concept (optional)."),
                io.Float.Input(
                    "weight_b",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Weight of concept_b; -1 subtracts it.",
                ),
                ConceptType.Input("concept_c", optional=True, tooltip="Third concept (optional)."),
                io.Float.Input("weight_c", default=1.0, min=-10.0, max=10.0, step=0.05, tooltip="Weight of concept_c."),
            ],
            outputs=[ConceptType.Output(display_name="CONCEPT", tooltip="The combined concept.")],
        )

    @classmethod
    def execute(
        cls, concept_a, weight_a=1.0, concept_b=None, weight_b=1.0, concept_c=None, weight_c=1.0
    ) -> io.NodeOutput:
        parts = [
            (c, float(w))
            for c, w in ((concept_a, weight_a), (concept_b, weight_b), (concept_c, weight_c))
            if c is not None and float(w) != 0.0
        ]
        for _, w in parts:
            if not math.isfinite(w):
                raise HyperTransportError("Combine Concepts: a weight is NaN/Inf. Fix: use finite weights.")
        return io.NodeOutput(combine_concepts(parts))


def _steering_for(hypernet, concept, node: str) -> Steering:
    if not isinstance(concept, Concept):
        raise HyperTransportError(
            f"{node}: the concept input holds a {type(concept).__name__}, not a CONCEPT. Fix: connect Encode Concept, "
            "Encode Reference Image or Combine Concepts."
        )
    steering = hypernet.net.steering(concept)
    steering.meta["hypernet"] = hypernet.name
    return steering


def _source_steering(node: str, hypernet, concept, steering) -> tuple[Steering, str]:
    """The steering to apply and a label: a STEERING as it is, or a HYPERNET's maps for a CONCEPT (exactly one of the two)."""
    if steering is not None and (hypernet is not None or concept is not None):
        raise HyperTransportError(f"{node}: connect either a steering, or a hypernet and a concept, not both. "
                                  "Fix: disconnect one of them.")
    if steering is not None:
        if not isinstance(steering, Steering):
            raise HyperTransportError(
                f"{node}: the steering input holds a {type(steering).__name__}, not a STEERING. Fix: connect Make "
                "Steering, Fit Steering or Load Steering."
            )
        return steering, f"steering {steering.meta.get('file') or steering.meta.get('label') or ''}".strip()
    if hypernet is None or concept is None:
        raise HyperTransportError(f"{node}: nothing to apply. Fix: connect a hypernet and a concept (Load HyperNet, Encode "
                                  "Concept), or a steering (Make, Fit or Load Steering).")
    st = _steering_for(hypernet, concept, node)
    return st, f"hypernet {hypernet.name} ({st.meta.get('label', '')!r})"


class ApplySteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportApplySteering",
            display_name="HyperTransport Apply Steering",
            category=STEERING,
            description="Steers the model towards a concept (strength > 0) or pushes it away (strength < 0), with the "
            "maps a hypernet makes for a concept, or a STEERING (made, fitted or loaded). Patches a clone only; "
            "strength 0 returns the model as is. Over the whole sampling the maps are folded into the norm weights "
            "where possible (free per step). Also: concept slider, style steering, activation steering.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to steer (stacks with LoRAs and other patches)."),
                HyperNetType.Input("hypernet", optional=True,
                                   tooltip="From Load HyperNet (with a concept); must be trained for this model family."),
                ConceptType.Input(
                    "concept", optional=True, tooltip="From Encode Concept, Encode Reference Image or Combine Concepts."
                ),
                *_strength_and_range(),
                SteeringType.Input("steering", optional=True,
                                   tooltip="Instead of hypernet + concept: a STEERING from Make, Fit or Load Steering."),
            ],
            outputs=[io.Model.Output(tooltip="The steered model (a patched clone).")],
        )

    @classmethod
    def validate_inputs(cls, strength=None) -> bool | str:
        # strength only: ComfyUI attaches the message to every input named here, and skips its own min/max
        # check for them (so the bound is checked here, NaN included); start/end are checked when the node runs
        return True if strength is None else _check_widgets(lambda: _strength(strength, "Apply Steering"))

    @classmethod
    def execute(cls, model, hypernet=None, concept=None, strength=1.0, start_percent=0.0, end_percent=1.0,
                steering=None) -> io.NodeOutput:
        node = "Apply Steering"
        lam = _strength(strength, node)
        if lam == 0.0:  # the model as it is (the step range is checked where it is used, in patching.attach)
            return io.NodeOutput(model)
        st, what = _source_steering(node, hypernet, concept, steering)
        check_model(model, hypernet.net.family if steering is None else st.meta.get("family", "generic"),
                    hypernet.net.sites if steering is None else st.sites, what)
        feedback.warn_in_ui(node, patching.extreme_warning([(st, lam)]))
        return io.NodeOutput(
            patching.attach(model, [(st, lam)], start_percent=start_percent, end_percent=end_percent, mode="auto",
                            label=f"{node} ({what})")
        )


class MakeSteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportMakeSteering",
            display_name="HyperTransport Make Steering",
            category=STEERING,
            description="Runs the hypernet once on a concept and outputs its maps (STEERING), to save as a small "
            "file or apply with Apply Steering (Advanced).",
            inputs=[
                HyperNetType.Input("hypernet", tooltip="From Load HyperNet."),
                ConceptType.Input("concept", tooltip="The concept to make maps for."),
            ],
            outputs=[SteeringType.Output(display_name="STEERING", tooltip="Per-site maps for this concept.")],
        )

    @classmethod
    def execute(cls, hypernet, concept) -> io.NodeOutput:
        return io.NodeOutput(_steering_for(hypernet, concept, "Make Steering"))


class SaveSteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportSaveSteering",
            display_name="HyperTransport Save Steering",
            category=FILES,
            description="Saves a STEERING as a small .safetensors file in output/hypertransport_steerings; Load "
            "Steering lists it, and it works without the hypernet or the CLIP weights.",
            is_output_node=True,
            inputs=[
                SteeringType.Input("steering", tooltip="From Make Steering or Load Steering."),
                io.String.Input(
                    "filename_prefix",
                    default="steering",
                    tooltip="File name prefix; a counter is appended (steering_00001_.safetensors).",
                ),
            ],
            outputs=[io.String.Output(display_name="file", tooltip="The saved file name, as Load Steering lists it.")],
        )

    @classmethod
    def execute(cls, steering, filename_prefix="steering") -> io.NodeOutput:
        import folder_paths

        prefix = check_prefix(filename_prefix)
        out_dir = mf.steering_output_dir()
        full, name, counter, sub, _ = folder_paths.get_save_image_path(prefix, out_dir)
        os.makedirs(full, exist_ok=True)
        fname = f"{name}_{counter:05}_.safetensors"
        _save_checked(os.path.join(full, fname), steering)
        rel = os.path.join(sub, fname) if sub else fname
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved {rel}"))


MAX_PREFIX_CHARS = 120


def check_prefix(filename_prefix: str) -> str:
    """Save Steering's ``filename_prefix`` when it names a visible file inside the output folder (``sub/name`` allowed),
    else an error naming the fix: no absolute path, no ``..``, no segment starting with ``.`` (a hidden file Load
    Steering never lists), no control character, at most :data:`MAX_PREFIX_CHARS` characters."""
    prefix = (filename_prefix or "steering").strip() or "steering"
    fix = "Fix: use a plain name like 'steering' or 'styles/watercolor'."
    if len(prefix) > MAX_PREFIX_CHARS:
        raise HyperTransportError(f"Save Steering: filename_prefix has {len(prefix)} characters, more than "
                                  f"{MAX_PREFIX_CHARS}. {fix}")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in prefix):
        raise HyperTransportError(f"Save Steering: filename_prefix {prefix[:60]!r} holds a control character. {fix}")
    if any(ch in '<>:"|?*' for ch in prefix):
        raise HyperTransportError(f"Save Steering: filename_prefix {prefix!r} holds one of < > : \" | ? *, which file "
                                  f"names on Windows cannot. {fix}")
    parts = prefix.replace("\\", "/").split("/")
    if os.path.isabs(prefix) or prefix.startswith(("/", "\\")) or ".." in parts:
        raise HyperTransportError(f"Save Steering: filename_prefix {prefix!r} leaves the output folder. {fix}")
    if any(not p.strip() or p.startswith(".") for p in parts):
        raise HyperTransportError(
            f"Save Steering: filename_prefix {prefix!r} has an empty or hidden ('.'-prefixed) part; Load Steering never "
            f"lists hidden files. {fix}"
        )
    return prefix


def _save_checked(path: str, steering: Steering) -> None:
    """Save, then read the header back: a file Load Steering cannot read is never left behind."""
    save_steering(path, steering)
    try:
        read_header(path, expect="hypertransport.steering")
    except HyperTransportError:
        os.remove(path)
        raise


class LoadSteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportLoadSteering",
            display_name="HyperTransport Load Steering",
            category=FILES,
            description="Loads a saved STEERING file (models/hypertransport_steerings or output/hypertransport_steerings);"
            " no hypernet or CLIP weights needed.",
            inputs=[
                io.Combo.Input(
                    "steering_name",
                    options=mf.list_files(mf.STEERING_FOLDER, kind="hypertransport.steering"),
                    tooltip="Steering file saved by Save Steering.",
                ),
            ],
            outputs=[
                SteeringType.Output(display_name="STEERING", tooltip="The saved per-site maps."),
                io.String.Output(display_name="info", tooltip="Concept label, model family and number of sites."),
            ],
        )

    @classmethod
    def validate_inputs(cls, steering_name=None) -> bool | str:
        """A missing file is named before the prompt runs (ComfyUI 0.3.75 does not check V3 combo values)."""
        if not isinstance(steering_name, str):
            return True
        return _check_widgets(lambda: mf.full_path(mf.STEERING_FOLDER, steering_name, "Load Steering"))

    @classmethod
    def execute(cls, steering_name) -> io.NodeOutput:
        path = mf.full_path(mf.STEERING_FOLDER, steering_name, "Load Steering")
        s = load_steering(path)
        s.meta["file"] = steering_name
        info = (
            f"{steering_name}: concept {s.meta.get('label', '')!r}, model family {s.meta.get('family')}, "
            f"{len(s.sites)} sites"
        )
        return io.NodeOutput(s, info, ui=ui.PreviewText(info))


PRESETS = ("all", "input", "middle", "output", "fine", "coarse", "early", "late")


class ApplySteeringAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportApplySteeringAdvanced",
            display_name="HyperTransport Apply Steering (Advanced)",
            category=STEERING,
            description="Applies a STEERING with the controls of a LoRA or ControlNet: per-block strengths and block "
            "presets, one strength per image of the batch, a mask (steer only a region), a ramp over the steps, "
            "cond/uncond rows, and hooks or folded weights. Patches a clone only; strength 0 returns the model as is.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to steer."),
                SteeringType.Input("steering", optional=True,
                                   tooltip="From Make, Fit or Load Steering (or connect a hypernet and a concept below)."),
                *_strength_and_range(),
                io.Combo.Input(
                    "mode",
                    options=list(patching.MODES),
                    default="auto",
                    tooltip="hooks: forward hooks during the chosen steps; folded: maps written into the "
                    "norms' weights (whole sampling, all rows, one strength, no mask, no ramp; free per step; pooled "
                    "sites stay hooks); auto: folded when that is possible.",
                ),
                io.Combo.Input(
                    "rows",
                    options=list(patching.ROWS),
                    default="all",
                    tooltip="Which batch rows to steer: all (like a LoRA, default), only the positive "
                    "(cond) or only the negative (uncond) prompt's rows.",
                ),
                io.String.Input(
                    "block_strengths",
                    multiline=True,
                    default="",
                    tooltip="Per-block multipliers of strength (-10..10), one 'block: number' per line; a block is "
                    "a site name or a prefix of whole dotted segments ('blocks.2' is block 2, not 20), the longest "
                    "wins, '*' for the rest; e.g. 'input_blocks: 0.5' or 'blocks.2: 0'. Empty: 1 everywhere. "
                    "Load HyperNet's info lists the blocks. At most 20,000 characters.",
                ),
                io.Combo.Input("preset", options=list(PRESETS), default="all", optional=True,
                               tooltip="Steer only a group of blocks: UNets (SD1.5, SDXL, the embedded world) input, middle, "
                               "output, fine (highest resolution) or coarse (lowest); DiTs and Flux early, middle, late. "
                               "block_strengths lines apply on top."),
                io.String.Input("batch_strengths", default="", optional=True,
                                tooltip="One strength per image of the batch, e.g. '-1, 0, 0.5, 1' (a sweep in one "
                                "KSampler run; cond and uncond rows alike), each times strength. Empty: every image "
                                "gets strength. At most 256 numbers (4,000 characters). Needs hooks."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Steer only where the mask is 1 (resized to every site's resolution; token sites "
                              "by token position). Outside it every site's output is the unsteered one, but the model's "
                              "convolutions and attention still carry part of the effect across the border: expect a "
                              "soft seam and some change outside (a blurred mask softens the seam). Needs hooks."),
                io.Combo.Input("ramp", options=list(patching.RAMPS), default="constant", optional=True,
                               tooltip="Over the steered steps: constant strength, ease in (0 at the first step, full "
                               "at the last) or ease out (full, then down to 0). Needs hooks."),
                HyperNetType.Input("hypernet", optional=True,
                                   tooltip="Instead of a steering: a hypernet from Load HyperNet, with a concept."),
                ConceptType.Input("concept", optional=True,
                                  tooltip="With a hypernet: from Encode Concept, Encode Reference Image or Combine Concepts."),
            ],
            outputs=[io.Model.Output(tooltip="The steered model (a patched clone).")],
        )

    @classmethod
    def validate_inputs(cls, strength=None) -> bool | str:
        return True if strength is None else _check_widgets(lambda: _strength(strength, "Apply Steering (Advanced)"))

    @classmethod
    def execute(cls, model, steering=None, strength=1.0, start_percent=0.0, end_percent=1.0, mode="auto", rows="all",
                block_strengths="", preset="all", batch_strengths="", mask=None, ramp="constant", hypernet=None,
                concept=None) -> io.NodeOutput:
        node = "Apply Steering (Advanced)"
        lam = _strength(strength, node)
        mult = parse_block_strengths(block_strengths)
        per_image = parse_batch_strengths(batch_strengths, node)
        if lam == 0.0 or (per_image is not None and not any(per_image)) or (mult and "*" in mult and not any(mult.values())
                                                                            and preset == "all"):
            return io.NodeOutput(model)
        st, what = _source_steering(node, hypernet, concept, steering)
        check_model(model, st.meta.get("family", "generic"), st.sites, what)
        if preset != "all":
            groups = block_presets(st.sites, st.meta.get("family", "generic"))
            if preset not in groups:
                fix = (f"it has {', '.join(groups)}. Fix: pick one of those, or 'all'." if groups else
                       f"its model family ({st.meta.get('family', 'not recorded')}) has no presets. Fix: set preset to "
                       "'all' and name the blocks in block_strengths (Load HyperNet's info lists them).")
                raise HyperTransportError(f"{node}: preset {preset!r} does not apply to this steering's blocks; {fix}")
            mult = {"*": 0.0, **{b: 1.0 for b in groups[preset]}, **mult}
        check_blocks(mult, st.sites)
        base = lam if per_image is None else tuple(lam * v for v in per_image)
        spec = base if not mult else {k: patching.scale_spec(base, v) for k, v in {"*": 1.0, **mult}.items()}
        if mask is not None and (not torch.is_tensor(mask) or mask.ndim not in (2, 3)):
            raise HyperTransportError(f"{node}: the mask input is not a MASK (found {type(mask).__name__}). Fix: connect a "
                                      "mask (Load Image's MASK output, Solid Mask, ...).")
        if mask is not None and not bool(torch.isfinite(mask).all()):
            raise HyperTransportError(f"{node}: the mask holds NaN/Inf values. Fix: connect a mask with values from 0 to 1 "
                                      "(Load Image's MASK output, Solid Mask, ...).")
        region = None if mask is None else (mask[None] if mask.ndim == 2 else mask).float().clamp(0, 1)
        strengths = [lam * v for v in (per_image or (1.0,))]
        every = [(st, x * m) for x in strengths for m in {"*": 1.0, **mult}.values()]
        feedback.warn_in_ui(node, patching.extreme_warning(every))
        return io.NodeOutput(
            patching.attach(
                model, [(st, spec)], start_percent=start_percent, end_percent=end_percent, rows=rows, mode=mode,
                label=f"{node} ({what})", ramp=ramp, per_image=None if per_image is None else len(per_image), region=region,
            )
        )


class FitSteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportFitSteering",
            display_name="HyperTransport Fit Steering (LinEAS)",
            category=STEERING,
            description="Fits one concept's steering on the connected model itself (LinEAS: every norm's map, end to end, "
            "with the optimal-transport loss the hypernet is trained with), for models no hypernet exists for. "
            "Slower than a hypernet (seconds on the embedded world, minutes on SDXL) but needs nothing else; the result "
            "is a small STEERING to apply or save. Progress shows in the queue; Cancel stops it within a step; the same "
            "inputs again reuse the result.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to fit the steering for (the one you will steer)."),
                io.Clip.Input("clip", tooltip="The model's text encoder (it encodes the prompts, as CLIP Text Encode does)."),
                io.String.Input("concept", default="watercolor painting", tooltip="The concept, e.g. 'watercolor'."),
                io.String.Input(
                    "prompts", multiline=True, default="",
                    tooltip="Prompts to fit on, one per line; '{concept}' marks where the concept goes (else ', concept' is "
                    "appended); the prompt without it is the neutral one. Empty: 8 everyday prompts. For the embedded "
                    "world: 'a {concept} circle', 'a {concept} square', 'a {concept} triangle'.",
                ),
                io.Int.Input("steps", default=60, min=1, max=10000, tooltip="Optimizer steps (LinEAS: 50 already works well)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-5, max=1.0, step=0.001, tooltip="Adam learning rate."),
                # no "control after generate": a randomized seed would refit on every Queue and the cache would never hit
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seeds the prompts' order and the noise. The same inputs again reuse the last fit; "
                             "change the seed (or turn refit on) for a new one."),
                io.Int.Input("sampler_steps", default=0, min=0, max=100, optional=True,
                             tooltip="Sampler steps of each fitting generation; 0: the model's own (DMD2: 4, Nitro: 1, the "
                             "embedded world: 4)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="Guidance of the fitting generations; 0: the model's (1 for distilled models, 2 for "
                               "the embedded world)."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=8, optional=True,
                             tooltip="Image side of the fitting generations in pixels; 0: the model's (SDXL/DMD2, PixArt, "
                             "Flux 1024, SD1.5 512, the embedded world 32). Smaller is faster."),
                io.Boolean.Input("refit", default=False, optional=True,
                                 tooltip="On: fit again on every Queue, even with the same inputs. Off: the same inputs "
                                 "reuse the last fit (ComfyUI's cache)."),
            ],
            outputs=[SteeringType.Output(display_name="STEERING", tooltip="The fitted maps for this concept.")],
        )

    @classmethod
    def fingerprint_inputs(cls, refit=False, **_):
        """ComfyUI's ``IS_CHANGED``: NaN (never equal to itself) re-runs the node on every Queue when refit is on."""
        return float("nan") if refit else False

    @classmethod
    def execute(cls, model, clip, concept, prompts="", steps=60, learning_rate=0.01, seed=0, sampler_steps=0,
                cfg=0.0, resolution=0, refit=False) -> io.NodeOutput:
        import time

        import comfy.model_management as mm
        import comfy.utils

        from hypertransport_comfy import fit
        settings = fit.FitSettings(steps=int(steps), lr=float(learning_rate), seed=int(seed), sampler_steps=int(sampler_steps),
                                   cfg=float(cfg), resolution=int(resolution))
        bar = comfy.utils.ProgressBar(int(steps))
        started = time.perf_counter()

        def on_step(step, total, loss):
            mm.throw_exception_if_processing_interrupted()  # Cancel: stops here, nothing is returned or cached
            bar.update_absolute(step, total)
            feedback.progress_text(f"step {step}/{total}, transport loss {loss:.4g}, {time.perf_counter() - started:.0f} s")

        try:
            st = fit.fit_steering(model, clip, concept, prompts, settings, on_step=on_step)
        except SystemExit as e:  # never let an exit reach ComfyUI's prompt worker (it would stop the queue for good)
            raise HyperTransportError(f"Fit Steering: {e}") from None
        return io.NodeOutput(st)


NODES = [
    LoadEmbeddedWorld,
    LoadHyperNet,
    EncodeConcept,
    EncodeReferenceImage,
    CombineConcepts,
    ApplySteering,
    MakeSteering,
    FitSteering,
    SaveSteering,
    LoadSteering,
    ApplySteeringAdvanced,
]
NODES_DEPRECATED: list = []
