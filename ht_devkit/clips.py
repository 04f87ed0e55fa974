"""Tiny open_clip CLIPs converted into ComfyUI's own CLIP / CLIP_VISION classes, with ComfyUI's own converters
(``comfy.utils.clip_text_transformers_convert``, ``comfy.clip_vision.convert_to_transformers``): an SD1.5-style
``comfy.sd.CLIP`` (``SD1ClipModel``, clip_l), an SDXL-style one (clip_l and clip_g) and a ``ClipVisionModel``.
Tiny sizes come in through ComfyUI's ``<name>_model_config`` model options and a JSON config file."""

from __future__ import annotations

import json
import uuid

import torch

ARCH = "ht-reuse-clip"
NOFILE_ARCH = "ht-reuse-nofile"  # registered, but no weights file anywhere
CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
#: ComfyUI text-model config of the same sizes (over ComfyUI's own sd1_clip_config.json / clip_config_bigg.json)
TE_CFG = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "hidden_act": "quick_gelu",
    "max_position_embeddings": 77,
    "eos_token_id": 49407,
}
CV_CFG = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 64,
    "image_size": 32,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 16,
    "projection_dim": 32,
}

def _open_clip_model(seed):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(ARCH, pretrained=None).eval()


def _text_sd(model) -> dict:
    """The text tower in ComfyUI's layout, converted by ComfyUI's own function."""
    import comfy.utils

    from hypertransport_core.clip_layouts import open_clip_tower

    sd = {k: v.clone() for k, v in open_clip_tower(model.state_dict(), "text").items()}
    return comfy.utils.clip_text_transformers_convert(sd, "", "")


def _vision_sd(model) -> dict:
    import comfy.clip_vision

    sd = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("visual.")}
    return comfy.clip_vision.convert_to_transformers(sd, "visual.")


def _check_loaded(result):
    missing, unexpected = result
    if missing or unexpected:
        raise AssertionError(f"weights do not fit ComfyUI's class: missing {missing[:3]}, unexpected {unexpected[:3]}")


def comfy_sd15_clip(model, dtype=None, te_cfg=TE_CFG):
    """``comfy.sd.CLIP`` with an ``SD1ClipModel`` (clip_l) holding ``model``'s text tower."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget

    opts = {"clip_l_model_config": dict(te_cfg)}
    if dtype is not None:
        opts["dtype"] = dtype
    clip = comfy.sd.CLIP(ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel), model_options=opts)
    _check_loaded(clip.load_sd(_text_sd(model)))
    return clip


def comfy_sdxl_clip(model_l, model_g):
    """``comfy.sd.CLIP`` with an ``SDXLClipModel``: clip_l from ``model_l``, clip_g from ``model_g`` (fp16)."""
    import comfy.sd
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget

    opts = {"clip_l_model_config": dict(TE_CFG), "clip_g_model_config": dict(TE_CFG)}
    clip = comfy.sd.CLIP(ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel), model_options=opts)
    _check_loaded(clip.cond_stage_model.clip_l.load_sd(_text_sd(model_l)))
    _check_loaded(clip.cond_stage_model.clip_g.load_sd(_text_sd(model_g)))
    return clip


def comfy_clip_vision(model, tmp_path, cfg=CV_CFG, fp32=False):
    """``comfy.clip_vision.ClipVisionModel`` from a JSON config of the tiny sizes, holding ``model``'s image tower
    (in ComfyUI's text-encoder dtype for this device, fp16 on the CPU; ``fp32=True`` casts it before loading)."""
    import comfy.clip_vision

    path = tmp_path / f"cv_{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    if fp32:
        cv.model.float()
    _check_loaded(cv.load_sd(_vision_sd(model)))
    return cv
