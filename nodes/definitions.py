"""The HyperTransport nodes (ComfyUI V3 schema). Thin: validate, call the core, patch a clone.

Node ids are permanent. A breaking change gets a new id; the old class stays in
``NODES_DEPRECATED`` with ``is_deprecated=True`` so saved workflows keep loading.
"""

from __future__ import annotations

import math
import os
import re

import torch
from comfy_api.latest import io, ui

from hypertransport_core.concepts import Concept, combine_concepts
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.files import load_hypernet, load_steering, read_header, save_steering
from hypertransport_core.interventions import Steering
from hypertransport_core.sites import check_sites, detect_family

from . import comfy_clip, patching
from . import model_files as mf

CATEGORY = "HyperTransport"

HyperNetType = io.Custom("HT_HYPERNET")
ConceptType = io.Custom("HT_CONCEPT")
SteeringType = io.Custom("HT_STEERING")

_STRENGTH = dict(default=1.0, min=-10.0, max=10.0, step=0.05)
_STRENGTH_TIP = (
    "How strongly the concept is applied: 0 leaves the model unchanged, 1 the full learned map, "
    "above 1 extrapolates, negative removes the concept (inverse map)."
)
_START_TIP = "Fraction of the sampling at which steering starts (0 = first step)."
_END_TIP = "Fraction of the sampling at which steering stops (1 = last step)."


# ---------------------------------------------------------------------------------- helpers ---
def check_model(model, family: str, sites, what: str) -> None:
    """Refuse, before sampling, a hypernet/steering made for another model family or size."""
    dm = model.get_model_object("diffusion_model")
    found = detect_family(dm)
    if family not in ("generic", found):
        raise HyperTransportError(
            f"{what} was trained for model family {family!r}, but the MODEL is {found!r} "
            f"({type(dm).__name__}). Fix: load a hypernet/steering trained for {found} in Load HyperNet / "
            f"Load Steering, or load a {family} checkpoint in the model loader."
        )
    check_sites(sites, dm, what=what)


_WEIGHTED = re.compile(r"^\((?P<text>.*):\s*(?P<w>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*\)$")


def parse_concepts(text: str) -> list[tuple[str, float]]:
    """One concept per line; ``(text:weight)`` gives a weight (negative subtracts), else weight 1."""
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        m = _WEIGHTED.match(line)
        out.append((m["text"].strip(), float(m["w"])) if m else (line, 1.0))
    if not out or any(not t for t, _ in out):
        raise HyperTransportError(
            "Encode Concept: the concept text is empty. Fix: type a concept, e.g. 'watercolor', one per line, "
            "optionally weighted as '(watercolor:0.7)'."
        )
    return out


def parse_block_strengths(text: str) -> dict[str, float]:
    """``prefix: multiplier`` per line (``*`` = every other site); empty means 1 everywhere."""
    out: dict[str, float] = {}
    for i, line in enumerate((text or "").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, val = line.rpartition(":") if ":" in line else line.rpartition("=")
        try:
            v = float(val)
        except ValueError:
            v = float("nan")
        if not sep or not key.strip() or not math.isfinite(v):
            raise HyperTransportError(
                f"Apply Steering (Advanced): block_strengths line {i} {line!r} is not 'prefix: number'. "
                "Fix: write e.g. 'input_blocks: 0.5' or '*: 1.0', one per line."
            )
        out[key.strip()] = v
    return out


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
class LoadHyperNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportLoadHyperNet",
            display_name="Load HyperNet",
            category=CATEGORY,
            description="Loads a HyperTransport hypernetwork (.safetensors from models/hypertransport), checks the "
            "file before reading its tensors, and tells which model family and CLIP encoder it needs.",
            inputs=[
                io.Combo.Input(
                    "hypernet_name",
                    options=mf.list_files(mf.HYPERNET_FOLDER),
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
    def execute(cls, hypernet_name) -> io.NodeOutput:
        path = mf.full_path(mf.HYPERNET_FOLDER, hypernet_name, "Load HyperNet")
        read_header(path, expect="hypertransport.hypernet")  # validates without loading tensors
        handle = mf.HyperNetHandle(load_hypernet(path), hypernet_name)
        info = handle.describe()
        return io.NodeOutput(handle, info, ui=ui.PreviewText(info))


class EncodeConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportEncodeConcept",
            display_name="Encode Concept",
            category=CATEGORY,
            description="Encodes a concept phrase with the CLIP text encoder the hypernet was trained with: the "
            "connected CLIP when it holds that encoder, else open_clip weights from the model folders. Several "
            "concepts: one per line, weighted as '(text:weight)'; a negative weight subtracts.",
            inputs=[
                HyperNetType.Input("hypernet", tooltip="The hypernet whose encoder to use (from Load HyperNet)."),
                io.String.Input(
                    "text",
                    multiline=True,
                    default="watercolor painting",
                    tooltip="The concept, e.g. 'watercolor'. One per line; '(text:0.5)' sets a weight.",
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
    def validate_inputs(cls, text=None) -> bool | str:
        return True if text is None else _check_widgets(lambda: parse_concepts(text))

    @classmethod
    def execute(cls, hypernet, text, clip_weights=mf.AUTO, clip=None) -> io.NodeOutput:
        parts = parse_concepts(text)
        enc = comfy_clip.text_encoder_for(hypernet, clip, clip_weights, "Encode Concept")
        e = enc.encode_text([t for t, _ in parts]).cpu()
        concepts = [(Concept(e[i], "text", enc.identity, t), w) for i, (t, w) in enumerate(parts)]
        if len(concepts) == 1 and concepts[0][1] == 1.0:
            return io.NodeOutput(concepts[0][0])
        return io.NodeOutput(combine_concepts(concepts))


class EncodeReferenceImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportEncodeReferenceImage",
            display_name="Encode Reference Image",
            category=CATEGORY,
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
            display_name="Combine Concepts",
            category=CATEGORY,
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


def _steering_for(hypernet, concept) -> Steering:
    if not isinstance(concept, Concept):
        raise HyperTransportError("expected a CONCEPT from Encode Concept / Encode Reference Image / Combine Concepts.")
    steering = hypernet.net.steering(concept)
    steering.meta["hypernet"] = hypernet.name
    return steering


class ApplySteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportApplySteering",
            display_name="Apply Steering",
            category=CATEGORY,
            description="Steers the model towards (strength > 0) or away from (strength < 0) a concept, with the "
            "maps the hypernet produces for it. Patches a clone only; strength 0 returns the model as is. "
            "Over the whole sampling the maps are folded into the norm weights where possible (free per step).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to steer (stacks with LoRAs and other patches)."),
                HyperNetType.Input("hypernet", tooltip="From Load HyperNet; must be trained for this model family."),
                ConceptType.Input(
                    "concept", tooltip="From Encode Concept, Encode Reference Image or Combine Concepts."
                ),
                io.Float.Input("strength", tooltip=_STRENGTH_TIP, **_STRENGTH),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=_START_TIP),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=_END_TIP),
            ],
            outputs=[io.Model.Output(tooltip="The steered model (a patched clone).")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, start_percent=None, end_percent=None) -> bool | str:
        def check():
            if strength is not None:
                _strength(strength, "Apply Steering")
            if start_percent is not None and end_percent is not None:
                patching.check_range(start_percent, end_percent)

        return _check_widgets(check)

    @classmethod
    def execute(cls, model, hypernet, concept, strength=1.0, start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        lam = _strength(strength, "Apply Steering")
        patching.check_range(start_percent, end_percent)
        if lam == 0.0:
            return io.NodeOutput(model)
        check_model(model, hypernet.family, hypernet.net.sites, f"hypernet {hypernet.name}")
        steering = _steering_for(hypernet, concept)
        return io.NodeOutput(
            patching.attach(model, [(steering, lam)], start_percent=start_percent, end_percent=end_percent, mode="auto")
        )


class MakeSteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportMakeSteering",
            display_name="Make Steering",
            category=CATEGORY,
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
        return io.NodeOutput(_steering_for(hypernet, concept))


class SaveSteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportSaveSteering",
            display_name="Save Steering",
            category=CATEGORY,
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

        prefix = (filename_prefix or "steering").strip() or "steering"
        if os.path.isabs(prefix) or ".." in prefix.replace("\\", "/").split("/"):
            raise HyperTransportError(
                f"Save Steering: filename_prefix {prefix!r} leaves the output folder. Fix: use a plain name like 'steering'."
            )
        out_dir = mf.steering_output_dir()
        full, name, counter, sub, _ = folder_paths.get_save_image_path(prefix, out_dir)
        os.makedirs(full, exist_ok=True)
        fname = f"{name}_{counter:05}_.safetensors"
        _save_checked(os.path.join(full, fname), steering)
        rel = os.path.join(sub, fname) if sub else fname
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved {rel}"))


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
            display_name="Load Steering",
            category=CATEGORY,
            description="Loads a saved STEERING file (models/hypertransport_steerings or output/hypertransport_steerings);"
            " no hypernet or CLIP weights needed.",
            inputs=[
                io.Combo.Input(
                    "steering_name",
                    options=mf.list_files(mf.STEERING_FOLDER),
                    tooltip="Steering file saved by Save Steering.",
                ),
            ],
            outputs=[
                SteeringType.Output(display_name="STEERING", tooltip="The saved per-site maps."),
                io.String.Output(display_name="info", tooltip="Concept label, model family and number of sites."),
            ],
        )

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


class ApplySteeringAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperTransportApplySteeringAdvanced",
            display_name="Apply Steering (Advanced)",
            category=CATEGORY,
            description="Applies a STEERING with per-block strengths, a choice of cond/uncond rows, and hooks or "
            "folded weights. Patches a clone only; strength 0 returns the model as is.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to steer."),
                SteeringType.Input("steering", tooltip="From Make Steering or Load Steering."),
                io.Float.Input("strength", tooltip=_STRENGTH_TIP, **_STRENGTH),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=_START_TIP),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=_END_TIP),
                io.Combo.Input(
                    "mode",
                    options=list(patching.MODES),
                    default="auto",
                    tooltip="hooks: forward hooks during the chosen steps; folded: maps written into the "
                    "norms' weights (whole sampling, all rows, free per step; pooled sites stay "
                    "hooks); auto: folded when the range is the whole sampling.",
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
                    tooltip="Per-block multipliers of strength, one 'site-name-prefix: number' per line, "
                    "longest prefix wins, '*' for the rest; e.g. 'input_blocks: 0.5' or "
                    "'blocks.2: 0'. Empty: 1 everywhere.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The steered model (a patched clone).")],
        )

    @classmethod
    def validate_inputs(cls, strength=None, start_percent=None, end_percent=None, block_strengths=None) -> bool | str:
        def check():
            if strength is not None:
                _strength(strength, "Apply Steering (Advanced)")
            if start_percent is not None and end_percent is not None:
                patching.check_range(start_percent, end_percent)
            if block_strengths is not None:
                parse_block_strengths(block_strengths)

        return _check_widgets(check)

    @classmethod
    def execute(
        cls,
        model,
        steering,
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
        mode="auto",
        rows="all",
        block_strengths="",
    ) -> io.NodeOutput:
        node = "Apply Steering (Advanced)"
        lam = _strength(strength, node)
        patching.check_range(start_percent, end_percent)
        mult = parse_block_strengths(block_strengths)
        if lam == 0.0 or (mult and all(v == 0.0 for v in mult.values()) and "*" in mult):
            return io.NodeOutput(model)
        if not isinstance(steering, Steering):
            raise HyperTransportError(f"{node}: expected a STEERING from Make Steering or Load Steering.")
        what = f"steering {steering.meta.get('file') or steering.meta.get('label') or ''}".strip()
        check_model(model, steering.meta.get("family", "generic"), steering.sites, what)
        spec = lam if not mult else {k: lam * v for k, v in {"*": 1.0, **mult}.items()}
        return io.NodeOutput(
            patching.attach(
                model, [(steering, spec)], start_percent=start_percent, end_percent=end_percent, rows=rows, mode=mode
            )
        )


NODES = [
    LoadHyperNet,
    EncodeConcept,
    EncodeReferenceImage,
    CombineConcepts,
    ApplySteering,
    MakeSteering,
    SaveSteering,
    LoadSteering,
    ApplySteeringAdvanced,
]
NODES_DEPRECATED: list = []
