"""Encode concepts with ComfyUI's own CLIP / CLIP_VISION objects when they hold the hypernet's encoder.

A hypernet records its encoder's identity, with one fingerprint per tower (``text_fingerprint``,
``image_fingerprint``, see :func:`hypertransport_core.encoders.tower_fingerprint`). ComfyUI keeps
CLIP text towers in a ``CLIP`` (SD1.5: ``clip_l``; SDXL: ``clip_l`` and ``clip_g``; SD3/Flux: their
``clip_*``) and image towers in a ``CLIP_VISION``, in the Hugging Face layout. The fingerprint of
such a tower is computed after mapping its state dict back to open_clip's layout
(:mod:`hypertransport_core.clip_layouts`); when it equals the hypernet's, the concept is encoded by
ComfyUI's own module, on the device ComfyUI's model management loads it to: no open_clip model is
built and no second copy of the weights is made. The result is what open_clip's
``encode_text``/``encode_image`` give: the final-LN EOT token times ``text_projection`` (images:
the projected class token), L2-normalized.

Tokens come from open_clip's tokenizer for the hypernet's architecture (no weights; the same BPE
vocabulary as ComfyUI's), not from ComfyUI's prompt tokenizer, whose ``(word:1.2)`` weighting,
``embedding:`` syntax and 75-token chunking would change the tokens.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hypertransport_core.clip_layouts import (
    IMAGE,
    TEXT,
    hf_text_to_open_clip,
    hf_vision_to_open_clip,
    image_spec,
    text_spec,
)
from hypertransport_core.concepts import Concept
from hypertransport_core.encoders import (
    body_spec,
    concept_texts,
    text_body,
    to_model_input,
    tokenizer_for,
    tower_fingerprint,
)
from hypertransport_core.errors import HyperTransportError

from . import feedback
from . import model_files as mf

log = logging.getLogger(__name__)

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tower module -> {spec json: fingerprint}
_TOKENIZERS: dict[tuple[str, int], object] = {}
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------- towers ---
@dataclass
class Tower:
    """One CLIP tower inside a ComfyUI object: where it is, and its fingerprint (or why it has none)."""

    name: str  # "clip_l", "clip_g", "clip_vision"
    module: torch.nn.Module  # SDClipModel (text) or CLIPVisionModelProjection (image)
    fingerprint: str | None
    why_not: str = ""  # when fingerprint is None
    body_fingerprint: str | None = None  # text towers: the tower without its projection (SD1.5 checkpoints hold none)

    def describe(self) -> str:
        return f"{self.name} (fingerprint {self.fingerprint})" if self.fingerprint else f"{self.name} ({self.why_not})"


def _act_name(fn) -> str:
    import comfy.clip_model

    names = {id(f): k for k, f in comfy.clip_model.ACTIVATIONS.items()}
    name = names.get(id(fn), getattr(fn, "__name__", repr(fn)))
    return {"gelu_pytorch_tanh": "gelu_tanh"}.get(name, name)


def _patched(patcher, prefix: str) -> bool:
    """Whether ``patcher`` carries weight patches (a LoRA, CLIP hooks) on keys under ``prefix``."""
    keys = set(getattr(patcher, "patches", {}) or {})
    for hp in (getattr(patcher, "hook_patches", {}) or {}).values():
        keys |= set(hp)
    return any(isinstance(k, str) and k.startswith(prefix) for k in keys)


def _own_weights(patcher) -> None:
    """Make the shared module hold this patcher's weights: another clone may have patched them in place."""
    import comfy.model_management as mm

    current = getattr(patcher.model, "current_weight_patches_uuid", None)
    if current is not None and current != patcher.patches_uuid:
        mm.load_model_gpu(patcher)


def _fingerprint(module: torch.nn.Module, patcher, spec: dict, canonical, part=None) -> str:
    """The tower's fingerprint (of ``part(state dict)`` when given), cached per module object and spec (ComfyUI never
    reloads weights into a live CLIP)."""
    key = json.dumps(spec, sort_keys=True)
    with _LOCK:
        hit = _FINGERPRINTS.get(module, {}).get(key)
    if hit is not None:
        return hit
    _own_weights(patcher)
    with torch.no_grad():
        sd = canonical(module.state_dict())
        fp = tower_fingerprint(part(sd) if part else sd, spec)
    with _LOCK:
        _FINGERPRINTS.setdefault(module, {})[key] = fp
    return fp


def text_towers(clip) -> list[Tower]:
    """Every CLIP text tower of a ComfyUI ``CLIP`` with its fingerprint (``clip_l``, ``clip_g``, ...)."""
    import comfy.clip_model
    import comfy.sd1_clip

    csm = getattr(clip, "cond_stage_model", None)
    patcher = getattr(clip, "patcher", None)
    if csm is None or patcher is None:
        raise HyperTransportError("Encode Concept: the clip input is not a ComfyUI CLIP. Fix: connect a CLIP output.")
    out = []
    for name, m in csm.named_modules():
        tr = getattr(m, "transformer", None)
        if not (isinstance(m, comfy.sd1_clip.SDClipModel) and isinstance(tr, comfy.clip_model.CLIPTextModel)):
            continue
        label = name or "clip"
        prefix = f"{name}.transformer." if name else "transformer."
        if _patched(patcher, prefix):
            out.append(Tower(label, m, None, "carries weight patches (a LoRA or CLIP hooks): not the plain encoder"))
            continue
        layer = tr.text_model.encoder.layers[0]
        spec = text_spec(layer.self_attn.heads, _act_name(layer.mlp.activation), "argmax", True)
        body = _fingerprint(tr, patcher, body_spec(spec), hf_text_to_open_clip, text_body)
        out.append(Tower(label, m, _fingerprint(tr, patcher, spec, hf_text_to_open_clip), body_fingerprint=body))
    return out


def image_tower(clip_vision) -> Tower:
    """The image tower of a ComfyUI ``CLIP_VISION`` with its fingerprint."""
    import comfy.clip_model

    model, patcher = getattr(clip_vision, "model", None), getattr(clip_vision, "patcher", None)
    if model is None or patcher is None:
        raise HyperTransportError(
            "Encode Reference Image: the clip_vision input is not a ComfyUI CLIP_VISION. Fix: connect Load CLIP Vision."
        )
    vm = getattr(model, "vision_model", None)
    if not isinstance(model, comfy.clip_model.CLIPVisionModelProjection) or getattr(vm, "output_layernorm", True):
        return Tower("clip_vision", model, None, f"a {type(model).__name__} that is not a CLIP ViT image tower")
    if not isinstance(getattr(model, "visual_projection", None), torch.nn.Module):
        return Tower("clip_vision", model, None, "has no visual projection (not a CLIP image tower)")
    if _patched(patcher, ""):
        return Tower("clip_vision", model, None, "carries weight patches: not the plain encoder")
    layer = vm.encoder.layers[0]
    spec = image_spec(
        layer.self_attn.heads, _act_name(layer.mlp.activation), clip_vision.image_mean, clip_vision.image_std
    )
    return Tower("clip_vision", model, _fingerprint(model, patcher, spec, hf_vision_to_open_clip))


# --------------------------------------------------------------------------------- encoders ---
def _tokenizer(arch: str, context_length: int):
    """open_clip's tokenizer for ``arch`` (BPE files only, no weights), the name checked first
    (:func:`~hypertransport_core.encoders.check_arch`: a file never chooses a loader or code)."""
    key = (arch, context_length)
    with _LOCK:
        if key in _TOKENIZERS:
            return _TOKENIZERS[key]
    mf.ensure_arch(arch)
    tok = tokenizer_for(arch, context_length)
    with _LOCK:
        _TOKENIZERS[key] = tok
    return tok


class ComfyTextEncoder:
    """Encodes text with a text tower of a ComfyUI ``CLIP`` (the same interface the nodes use of
    :class:`~hypertransport_core.encoders.ConceptEncoder`)."""

    def __init__(self, clip, tower: Tower, identity: dict, projection: torch.Tensor | None = None):
        self.clip, self.tower, self.identity, self.projection = clip, tower, dict(identity), projection

    def describe(self) -> str:
        how = "with the hypernet's own text projection" if self.projection is not None else ""
        return f"ComfyUI CLIP {self.tower.name} {how}".strip()

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        """``(n, d)`` unit-norm embeddings, as open_clip's ``encode_text`` gives them."""
        import comfy.model_management as mm

        texts = concept_texts(texts)
        tr = self.tower.module.transformer
        n_pos = tr.text_model.embeddings.position_embedding.weight.shape[0]
        tokens = _tokenizer(self.identity.get("arch", ""), n_pos)(list(texts))
        mm.load_model_gpu(self.clip.patcher)  # as CLIP.encode_from_tokens does: ComfyUI picks the device
        device = tr.get_input_embeddings().weight.device
        eot = tokens.argmax(dim=-1)  # open_clip's 'argmax' pooling: the EOT token has the highest id
        _, _, projected, pooled = tr(
            tokens.to(device), None, num_tokens=(eot + 1).tolist(), intermediate_output=None, dtype=torch.float32
        )
        if self.projection is not None:  # the tower has no projection of its own (SD1.5): the hypernet's
            projected = pooled.float() @ self.projection.to(pooled.device, torch.float32)
        return F.normalize(projected.float(), dim=-1).cpu()

    def concept(self, text: str) -> Concept:
        return Concept(self.encode_text([text])[0], "text", self.identity, text.strip())


class ComfyImageEncoder:
    """Encodes images with a ComfyUI ``CLIP_VISION``, preprocessed as the open_clip path does
    (:func:`~hypertransport_core.encoders.to_model_input`: alpha composited, shorter side resized, centre crop)."""

    def __init__(self, clip_vision, tower: Tower, identity: dict):
        self.cv, self.tower, self.identity = clip_vision, tower, dict(identity)

    def describe(self) -> str:
        return "ComfyUI CLIP_VISION"

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        import comfy.model_management as mm

        mm.load_model_gpu(self.cv.patcher)  # as ClipVisionModel.encode_image does
        x = to_model_input(images.to(self.cv.load_device), self.cv.image_size, self.cv.image_mean, self.cv.image_std)
        out = self.cv.model(pixel_values=x.float(), intermediate_output=-2)
        return F.normalize(out[2].float(), dim=-1).cpu()

    def image_concept(self, images: torch.Tensor, label: str = "reference image") -> Concept:
        e = self.encode_image(images).mean(0)
        return Concept(F.normalize(e, dim=-1), "image", self.identity, label)


# ---------------------------------------------------------------------------------- choice ---
def _choose(handle, obj, what: str, tower_kind: str, towers, make, clip_weights: str, node: str):
    if obj is None:
        return mf.encoder_for(handle, clip_weights, node)
    want = (handle.net.encoder or {}).get(f"{tower_kind}_fingerprint")
    body = (handle.net.encoder or {}).get(f"{tower_kind}_body_fingerprint")
    proj = getattr(handle.net, "text_projection", None) if tower_kind == TEXT else None
    arch = (handle.net.encoder or {}).get("arch", "?")
    if want:
        found = towers()
        for t in found:
            if t.fingerprint == want:
                return make(t, None)
        for t in found:  # the same tower without its projection (ComfyUI leaves an SD1.5 clip_l's unloaded)
            if body and proj is not None and t.body_fingerprint == body:
                log.info("%s: %s is the hypernet's text tower without its projection: using the projection the "
                         "hypernet file keeps.", node, t.name)
                return make(t, proj)
        held = ", ".join(t.describe() for t in found) or "no CLIP tower"
        why = (
            f"the connected {what} is not the hypernet's encoder: hypernet {handle.name} needs {arch} with "
            f"{tower_kind}_fingerprint {want}, the {what} holds {held}"
        )
    else:
        why = (
            f"hypernet {handle.name} records no {tower_kind}_fingerprint (saved before per-tower fingerprints), "
            f"so the connected {what} cannot be matched to its encoder {arch}"
        )
    feedback.warn_in_ui(node, f"{why}. Using open_clip weights from the model folders instead.")
    try:
        return mf.encoder_for(handle, clip_weights, node)
    except HyperTransportError as e:
        problem = str(e).removeprefix(f"{node}: ").split(" Fix:")[0].rstrip(". ")
        raise HyperTransportError(
            f"{node}: {why}; and the open_clip path failed too: {problem}. Fix, either: connect the {what} that "
            f"holds the hypernet's {tower_kind} tower ({arch}), or put {arch}'s open_clip weights in models/clip "
            f"(e.g. models/clip/{arch}.safetensors; clip_weights picks the file)."
        ) from e


def text_encoder_for(handle, clip, clip_weights: str, node: str = "Encode Concept"):
    """ComfyUI's ``clip`` when one of its text towers is the hypernet's, else the open_clip weights."""
    return _choose(handle, clip, "CLIP", TEXT, lambda: text_towers(clip),
                   lambda t, proj: ComfyTextEncoder(clip, t, handle.net.encoder, proj), clip_weights, node)


def image_encoder_for(handle, clip_vision, clip_weights: str, node: str = "Encode Reference Image"):
    """ComfyUI's ``clip_vision`` when it is the hypernet's image tower, else the open_clip weights."""
    return _choose(handle, clip_vision, "CLIP_VISION", IMAGE, lambda: [image_tower(clip_vision)],
                   lambda t, _proj: ComfyImageEncoder(clip_vision, t, handle.net.encoder), clip_weights, node)
