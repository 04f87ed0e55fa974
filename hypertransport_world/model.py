"""The embedded world as a ComfyUI model, in ComfyUI's own classes.

* diffusion model: ComfyUI's SD UNet (``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``) at
  width 32/64/128, in pixel space (3 channels, 32×32), trained by rectified flow: ComfyUI's flow model
  type (``ModelType.FLOW``: ``x_t = (1 − t) x_0 + t ε``, the model predicts ``ε − x_0``), so the stock
  KSampler samples it. Its module names are the SD1.5 family's, so the project's SD1.5 site table
  finds its 43 norm sites;
* text encoder: ComfyUI's CLIP text model (``comfy.sd1_clip.SDClipModel`` holding a
  ``comfy.clip_model.CLIPTextModel``) with a 3-layer width-128 config and ComfyUI's standard CLIP
  tokenizer (``SDTokenizer``, 16 tokens), carrying HT-World-CLIP's text tower;
* CLIP_VISION: ComfyUI's ``ClipVisionModel`` with HT-World-CLIP's image tower;
* VAE: ComfyUI's pixel-space VAE (``comfy.sd.VAE`` on a ``pixel_space_vae`` state dict:
  ``PixelspaceConversionVAE``, images in [0, 1] ↔ latents in [−1, 1]).

Both CLIP objects are built from one file, ``HT-World-CLIP.safetensors`` (open_clip's layout, which is
also the hypernet's concept encoder), with ComfyUI's own key converters; no weights are stored twice.

Image size: 32×32 pixels. Every concept of the world (139 colours, 26 fill patterns with periods of
3–8 px) is visible at 32×32, and every doubling of the side costs about 4× per sampler step, in the
hypernet trainer (15 minutes on two CPU cores) and in the template workflow (seconds).

Import this module only where ComfyUI can be imported (inside ComfyUI, or after
:func:`hypertransport_comfy.comfyui.import_comfyui`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import comfy.clip_model
import comfy.clip_vision
import comfy.latent_formats
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.utils
import torch
from safetensors import safe_open

from . import world_clip

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(HERE, "weights")
UNET_FILE = "world_unet.safetensors"
CLIP_FILE = f"{world_clip.MODEL_NAME}.safetensors"
HYPERNET_FILE = "world_hypernet.safetensors"
UNET_FORMAT = "ht-world-unet/2"

SIDE = 32  # image side in pixels (= latent side: the VAE is the identity in pixel space)
TOKENS = 16  # the CLIP's context length

#: ComfyUI UNetModel config (SD1.5-style module names; three levels 32/64/128, cross-attention at 16×16 and 8×8,
#: self-attention at 8×8, conditioned on the CLIP's 128-wide token features)
UNET_CONFIG: dict = {
    "image_size": SIDE,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [1, 0, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "disable_self_attentions": [True, True, False],
    "context_dim": world_clip.CLIP_CONFIG["text_cfg"]["width"],
    "num_head_channels": 32,
    "num_heads": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "use_checkpoint": False,
}

_TXT = world_clip.CLIP_CONFIG["text_cfg"]
_VIS = world_clip.CLIP_CONFIG["vision_cfg"]
#: ComfyUI's CLIPTextModel config of HT-World-CLIP's text tower (GELU, as open_clip's default)
TEXT_CONFIG: dict = {
    "hidden_size": _TXT["width"],
    "intermediate_size": int(_TXT["width"] * _TXT["mlp_ratio"]),
    "num_attention_heads": _TXT["heads"],
    "num_hidden_layers": _TXT["layers"],
    "max_position_embeddings": _TXT["context_length"],
    "vocab_size": _TXT["vocab_size"],
    "hidden_act": "gelu",
    "eos_token_id": 49407,
    "bos_token_id": 49406,
    "projection_dim": world_clip.CLIP_CONFIG["embed_dim"],
}
#: ComfyUI's ClipVisionModel config of HT-World-CLIP's image tower (inputs normalized as 2x − 1)
VISION_CONFIG: dict = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": _VIS["width"],
    "image_size": _VIS["image_size"],
    "intermediate_size": int(_VIS["width"] * _VIS["mlp_ratio"]),
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": _VIS["width"] // _VIS["head_width"],
    "num_channels": 3,
    "num_hidden_layers": _VIS["layers"],
    "patch_size": _VIS["patch_size"],
    "projection_dim": world_clip.CLIP_CONFIG["embed_dim"],
    "image_mean": list(world_clip.IMAGE_MEAN),
    "image_std": list(world_clip.IMAGE_STD),
}
VISION_CONFIG_FILE = os.path.join(HERE, "clip_vision_config.json")


@dataclass(frozen=True)
class Sampling:
    """How the world is sampled (the template, the trainer and the evaluator use these)."""

    steps: int = 4
    cfg: float = 2.0
    sampler: str = "euler"
    scheduler: str = "simple"
    side: int = SIDE


SAMPLING = Sampling()


class WorldUNetConfig(comfy.supported_models_base.BASE):
    """The ComfyUI model config of the world's UNet: flow matching (CONST), shift 1, 3-channel pixel latents."""

    unet_config: dict = {}
    unet_extra_config: dict = {}
    sampling_settings = {"shift": 1.0, "multiplier": 1000}
    latent_format = comfy.latent_formats.ChromaRadiance  # 3 channels, identity scaling: pixels in [-1, 1]
    supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]
    memory_usage_factor = 0.1  # ComfyUI's estimate of activation memory per pixel; SD1.5's 2.0 is 20x this tiny model's

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.FLOW


def sdpa_attention(func, *args, **kwargs):
    """``optimized_attention_override``: PyTorch's scaled-dot-product attention (ComfyUI's CUDA default).

    On a CPU ComfyUI defaults to sub-quadratic attention, about 2.5x slower on the world's tiny tensors;
    the world model asks for SDPA through its model options, so the server, the trainer and the evaluator
    compute it the same way on any device."""
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


def new_diffusion_model(dtype: torch.dtype | None = None, device=None, config: dict | None = None) -> comfy.model_base.BaseModel:
    """A ``BaseModel`` with the world's UNet (or another ``config`` of ComfyUI's UNetModel, e.g. a smaller one
    in tests), uninitialised (ComfyUI's layers skip weight init)."""
    cfg = WorldUNetConfig(dict(config or UNET_CONFIG))
    dtype = dtype or torch.float32
    manual_cast = mm.unet_manual_cast(dtype, mm.get_torch_device(), cfg.supported_inference_dtypes)
    cfg.set_inference_dtype(dtype, manual_cast)
    return cfg.get_model({}, "", device=device)


def init_weights_(diffusion_model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """PyTorch's default initialisation for every conv, linear and norm (ComfyUI allocates them empty),
    then zeros on the output convolution and on each residual branch's last layer (the model starts by
    predicting 0 and every block starts as the identity, as in latent-diffusion training)."""
    torch.manual_seed(seed)
    bases = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)
    with torch.no_grad():
        for name, m in diffusion_model.named_modules():
            for base in bases:
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
            if name == "out.2" or name.endswith(".out_layers.3") or name.endswith(".proj_out"):
                for p in m.parameters():
                    p.zero_()
    return diffusion_model


def patcher_for(model: comfy.model_base.BaseModel) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` (the MODEL type) with the world's model options: SDPA attention, and how it is
    sampled (``hypertransport_sampling``: read by Fit Steering, which samples the model as the trainer does)."""
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sdpa_attention
    s = SAMPLING
    patcher.model_options["hypertransport_sampling"] = {"steps": s.steps, "cfg": s.cfg, "sampler": s.sampler,
                                                        "scheduler": s.scheduler, "side": s.side, "latent_shape": [3, s.side, s.side]}
    return patcher


def _check_header(path: str, expect_format: str, what: str) -> dict:
    """Metadata of a world file, after checking it exists and holds ``expect_format``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing. Fix: rebuild the world with `python -m hypertransport_world.build`.")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if meta.get("format") != expect_format:
        raise ValueError(f"{os.path.basename(path)}: metadata 'format' is {meta.get('format')!r}, expected {expect_format!r} "
                         f"({what}). Fix: rebuild the world with `python -m hypertransport_world.build`.")
    return {"meta": meta, "shapes": shapes}


def load_unet(path: str, dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """The world's UNet file → a ComfyUI MODEL. The model is built from :data:`UNET_CONFIG` (not from
    numbers in the file); the file's recorded config and every tensor shape are checked against it before
    any weight is read."""
    head = _check_header(path, UNET_FORMAT, "the world's UNet")
    recorded = json.loads(head["meta"].get("config", "null"))
    if recorded != UNET_CONFIG:
        raise ValueError(f"{os.path.basename(path)}: its UNet config differs from this version's "
                         "(hypertransport_world/model.py). Fix: rebuild the world with `python -m hypertransport_world.build`.")
    dtype = dtype or mm.unet_dtype(supported_dtypes=WorldUNetConfig.supported_inference_dtypes)
    model = new_diffusion_model(dtype, device=mm.unet_offload_device())
    want = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    if head["shapes"] != want:
        bad = sorted(set(want) ^ set(head["shapes"])) or [k for k in want if want[k] != head["shapes"][k]]
        raise ValueError(f"{os.path.basename(path)}: tensors do not match the world UNet (first: {bad[0]!r}). "
                         "Fix: rebuild the world with `python -m hypertransport_world.build`.")
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    model.load_model_weights(sd, "")
    return patcher_for(model)


def save_unet(diffusion_model: torch.nn.Module, path: str, stats: dict | None = None) -> None:
    """Write the UNet's weights (fp16) with its config, atomically."""
    meta = {
        "format": UNET_FORMAT,
        "config": json.dumps(UNET_CONFIG),
        "flow": "ComfyUI ModelType.FLOW (CONST): x_t = (1 - t) x0 + t * noise, output noise - x0, pixels in [-1, 1]",
        "stats": json.dumps(stats or {}),
    }
    world_clip.save_module(diffusion_model, path, meta)


# ------------------------------------------------------------------------------------ CLIP ---
class WorldTokenizerL(comfy.sd1_clip.SDTokenizer):
    """ComfyUI's standard CLIP tokenizer (its bundled BPE vocabulary) with the world's 16-token context."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
        super().__init__(max_length=TOKENS, embedding_directory=embedding_directory, embedding_size=TEXT_CONFIG["hidden_size"],
                         embedding_key="clip_l", tokenizer_data=tokenizer_data)


class WorldTokenizer(comfy.sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, tokenizer=WorldTokenizerL)


class WorldClipL(comfy.sd1_clip.SDClipModel):
    """ComfyUI's ``SDClipModel`` (last hidden state after the final LayerNorm, as SD1.5 uses) of the world config."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        super().__init__(device=device, dtype=dtype, max_length=TOKENS, textmodel_json_config=dict(TEXT_CONFIG),
                         model_options=model_options)


class WorldTextEncoder(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=WorldClipL)


def open_clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    head = _check_header(path, world_clip.FORMAT, "HT-World-CLIP in open_clip's layout")
    want = {k: tuple(v.shape) for k, v in world_clip.build_clip(device="meta").state_dict().items()}
    if head["shapes"] != want:
        raise ValueError(f"{os.path.basename(path)}: tensors do not match HT-World-CLIP's config. "
                         "Fix: rebuild the world with `python -m hypertransport_world.build`.")
    return comfy.utils.load_torch_file(path, safe_load=True)


def _loaded(result, what: str, allowed_missing: tuple[str, ...] = ()) -> None:
    missing, unexpected = result
    missing = [k for k in missing if k not in allowed_missing]
    if missing or unexpected:
        raise ValueError(f"{what}: the converted weights do not fit ComfyUI's class (missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]}). Fix: rebuild the world with `python -m hypertransport_world.build`.")


def text_encoder(open_clip_sd: dict[str, torch.Tensor]) -> comfy.sd.CLIP:
    """A ComfyUI CLIP (the CLIP type) holding HT-World-CLIP's text tower, converted by ComfyUI's own function."""
    from hypertransport_core.clip_layouts import TEXT, open_clip_tower

    text = open_clip_tower(dict(open_clip_sd), TEXT)
    sd = comfy.utils.clip_text_transformers_convert(text, "", "")
    n = sum(v.numel() for v in sd.values())
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(WorldTokenizer, WorldTextEncoder), parameters=n)
    _loaded(clip.load_sd(sd), "HT-World-CLIP text tower")
    return clip


def clip_vision(open_clip_sd: dict[str, torch.Tensor]) -> comfy.clip_vision.ClipVisionModel:
    """A ComfyUI CLIP_VISION holding HT-World-CLIP's image tower, converted by ComfyUI's own function."""
    from hypertransport_core.clip_layouts import IMAGE, open_clip_tower

    sd = comfy.clip_vision.convert_to_transformers(open_clip_tower(dict(open_clip_sd), IMAGE), "visual.")
    cv = comfy.clip_vision.ClipVisionModel(VISION_CONFIG_FILE)
    _loaded(cv.load_sd(sd), "HT-World-CLIP image tower")
    return cv


def pixel_vae() -> comfy.sd.VAE:
    """ComfyUI's pixel-space VAE (what 0.3.75 builds for a state dict holding ``pixel_space_vae``)."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


@dataclass
class WorldModels:
    """What the loader node returns: MODEL, CLIP, VAE, CLIP_VISION (and where they came from)."""

    model: comfy.model_patcher.ModelPatcher
    clip: comfy.sd.CLIP
    vae: comfy.sd.VAE
    clip_vision: comfy.clip_vision.ClipVisionModel
    clip_path: str
    unet_path: str


def load(weights_dir: str = WEIGHTS_DIR, *, unet_dtype: torch.dtype | None = None, unet=None) -> WorldModels:
    """The shipped world (``hypertransport_world/weights``) as ComfyUI objects (``unet``: a MODEL to use
    instead of the shipped UNet, e.g. a smaller random one in tests)."""
    clip_path, unet_path = os.path.join(weights_dir, CLIP_FILE), os.path.join(weights_dir, UNET_FILE)
    sd = open_clip_state_dict(clip_path)
    model = unet if unet is not None else load_unet(unet_path, unet_dtype)
    return WorldModels(model, text_encoder(sd), pixel_vae(), clip_vision(sd), clip_path, unet_path)
