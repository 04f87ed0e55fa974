"""CLIP towers in one canonical layout, so one model held in two layouts gets one fingerprint.

The canonical layout is open_clip's: its parameter names (``token_embedding.weight``,
``transformer.resblocks.0.attn.in_proj_weight``, ``visual.conv1.weight``, ...) and its tensor
orientation (fused ``in_proj`` for q/k/v, ``text_projection`` and ``visual.proj`` as ``(width, dim)``
matrices used as ``x @ proj``). ComfyUI (and Hugging Face ``transformers``) hold the same weights as
``text_model.encoder.layers.0.self_attn.q_proj.weight`` etc., with separate q/k/v and the
projections as ``nn.Linear`` weights (transposed). The functions here map such a state dict back.

Weights alone do not fix what a tower computes: the number of attention heads, the MLP activation
(OpenAI's CLIPs use QuickGELU, most LAION ones GELU), the pooling, and for images the input
normalization. :func:`text_spec` / :func:`image_spec` describe that, and a tower fingerprint
(:func:`hypertransport_core.encoders.tower_fingerprint`) hashes both.

Pure functions over state dicts and plain values: no ComfyUI import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

TEXT, IMAGE = "text", "image"
TOWERS = (TEXT, IMAGE)

#: canonical (open_clip) names of the text tower: exact names and prefixes
_TEXT_EXACT = ("token_embedding.weight", "positional_embedding", "text_projection")
_TEXT_PREFIX = ("transformer.", "ln_final.")
_IMAGE_PREFIX = ("visual.",)

#: unmapped keys are kept under this prefix, so extra weights make a fingerprint differ (never a false match)
UNMAPPED = "unmapped:"

_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def open_clip_tower(state_dict: Mapping[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """The part of an open_clip ``CLIP`` state dict that belongs to ``tower`` (``"text"`` or ``"image"``).

    ``logit_scale``/``logit_bias`` and the other tower are left out.
    """
    if tower == TEXT:
        return {k: v for k, v in state_dict.items() if k in _TEXT_EXACT or k.startswith(_TEXT_PREFIX)}
    if tower == IMAGE:
        return {k: v for k, v in state_dict.items() if k.startswith(_IMAGE_PREFIX)}
    from .errors import HyperTransportError

    raise HyperTransportError(f"open_clip_tower: tower {tower!r} is not one of {TOWERS}. Fix: pass 'text' or 'image'.")


def _encoder_layers(sd: Mapping[str, torch.Tensor], src: str, dst: str, out: dict, used: set) -> None:
    """``{src}encoder.layers.i.*`` (separate q/k/v) → ``{dst}transformer.resblocks.i.*`` (fused in_proj)."""
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        m = _LAYER.match(k[len(src) :])
        if not m:
            continue
        i, mod, kind = int(m[1]), m[2], m[3]
        if mod in _QKV:
            qkv.setdefault((i, kind), {})[mod] = v
            used.add(k)
        elif mod in _BLOCK:
            out[f"{dst}transformer.resblocks.{i}.{_BLOCK[mod]}.{kind}"] = v
            used.add(k)
    for (i, kind), parts in qkv.items():
        if len(parts) != 3:  # a partial attention: leave the pieces unmapped (no match)
            for mod, v in parts.items():
                out[f"{UNMAPPED}{src}encoder.layers.{i}.{mod}.{kind}"] = v
            continue
        out[f"{dst}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[m] for m in _QKV], dim=0)


def _rename(sd: Mapping[str, torch.Tensor], table: Mapping[str, str], out: dict, used: set) -> None:
    for src, dst in table.items():
        if src in sd:
            out[dst] = sd[src]
            used.add(src)


def hf_text_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model in ComfyUI's / ``transformers``' layout → open_clip's text tower layout.

    Input keys: ``text_model.embeddings.{token,position}_embedding.weight``,
    ``text_model.encoder.layers.i.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.*``,
    ``text_model.final_layer_norm.*``, ``text_projection.weight`` (as ComfyUI's ``CLIPTextModel`` or
    ``transformers.CLIPTextModelWithProjection`` hold them). Keys it does not know are kept under
    :data:`UNMAPPED`, so a model with extra weights never fingerprints like one without.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    _rename(
        state_dict,
        {
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
        },
        out,
        used,
    )
    _encoder_layers(state_dict, "text_model.", "", out, used)
    if "text_projection.weight" in state_dict:
        out["text_projection"] = state_dict["text_projection.weight"].transpose(0, 1)
        used.add("text_projection.weight")
    for k, v in state_dict.items():
        if k not in used and not k.startswith(UNMAPPED) and torch.is_tensor(v):
            out.setdefault(f"{UNMAPPED}{k}", v)
    return out


def hf_vision_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP vision model in ComfyUI's / ``transformers``' layout → open_clip's ``visual.*`` layout.

    Input keys: ``vision_model.embeddings.{class_embedding,patch_embedding.weight,position_embedding.weight}``,
    ``vision_model.pre_layrnorm.*``, ``vision_model.encoder.layers.i.*``, ``vision_model.post_layernorm.*``,
    ``visual_projection.weight``. A LLaVA ``multi_modal_projector.*`` (it does not touch the image
    embedding) is dropped; other unknown keys are kept under :data:`UNMAPPED`.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    _rename(
        state_dict,
        {
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
            "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        },
        out,
        used,
    )
    _encoder_layers(state_dict, "vision_model.", "visual.", out, used)
    if "visual_projection.weight" in state_dict:
        out["visual.proj"] = state_dict["visual_projection.weight"].transpose(0, 1)
        used.add("visual_projection.weight")
    for k, v in state_dict.items():
        if k in used or k.startswith("multi_modal_projector.") or not torch.is_tensor(v):
            continue
        out.setdefault(f"{UNMAPPED}{k}", v)
    return out


# ------------------------------------------------------------------------------- specs -------
def _act_name(act) -> str:
    """Canonical name of an MLP activation module or function (``quick_gelu``, ``gelu``, ``gelu_tanh``)."""
    name = type(act).__name__ if isinstance(act, torch.nn.Module) else getattr(act, "__name__", repr(act))
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    return name


def text_spec(heads: int, act: str, pool: str = "argmax", causal: bool = True) -> dict:
    """What a text tower computes beyond its weights. ``act``: ``quick_gelu``, ``gelu`` or ``gelu_tanh``."""
    return {"tower": TEXT, "heads": int(heads), "act": str(act), "pool": str(pool), "causal": bool(causal)}


def image_spec(heads: int, act: str, mean: Sequence[float], std: Sequence[float], pool: str = "tok") -> dict:
    """What an image tower computes beyond its weights, input normalization included (rounded to 1e-4)."""
    return {
        "tower": IMAGE,
        "heads": int(heads),
        "act": str(act),
        "pool": str(pool),
        "mean": [round(float(x), 4) for x in mean],
        "std": [round(float(x), 4) for x in std],
    }


def _block_spec(transformer) -> tuple[int, str] | None:
    blocks = getattr(transformer, "resblocks", None)
    if not blocks:
        return None
    b = blocks[0]
    heads = getattr(getattr(b, "attn", None), "num_heads", None)
    act = getattr(getattr(b, "mlp", None), "gelu", None)
    if heads is None or act is None:
        return None
    return int(heads), _act_name(act)


def open_clip_text_spec(model) -> dict | None:
    """:func:`text_spec` of an open_clip ``CLIP``; ``None`` for text towers of another structure (HF text models)."""
    hs = _block_spec(getattr(model, "transformer", None))
    if hs is None or not torch.is_tensor(getattr(model, "positional_embedding", None)):
        return None
    return text_spec(
        hs[0], hs[1], getattr(model, "text_pool_type", "argmax"), getattr(model, "attn_mask", None) is not None
    )


def open_clip_image_spec(model, mean: Sequence[float], std: Sequence[float]) -> dict | None:
    """:func:`image_spec` of an open_clip ViT image tower; ``None`` for other towers (ResNet, timm)."""
    visual = getattr(model, "visual", None)
    hs = _block_spec(getattr(visual, "transformer", None))
    if hs is None:
        return None
    pool = "attn" if getattr(visual, "attn_pool", None) is not None else getattr(visual, "pool_type", "tok")
    return image_spec(hs[0], hs[1], mean, std, pool)
