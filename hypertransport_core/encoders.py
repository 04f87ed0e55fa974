"""Concept encoders: open_clip text and image towers → L2-normalized embeddings in one space.

Weights come from a local file (ComfyUI users keep CLIP weights in its model folders), from an
open_clip ``pretrained`` tag when the user has a network, or from an already built model (the
embedded world's CLIP, random-weight models in tests). Every encoder has an *identity*
(architecture + a fingerprint of its weights) that hypernet files record, so a hypernet can refuse
embeddings from another encoder.

Example::

    >>> enc = ConceptEncoder.from_open_clip("ViT-L-14", weights="models/clip/ViT-L-14.safetensors")
    >>> e = enc.encode_text(["watercolor"])          # (1, 768), unit norm
    >>> enc.concept("watercolor")                    # a Concept
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip_layouts import IMAGE, TEXT, open_clip_image_spec, open_clip_text_spec, open_clip_tower
from .concepts import Concept
from .errors import HyperTransportError

#: an encoder architecture as files record it: a plain open_clip model name, never a loader schema
#: ("hf-hub:…", "local-dir:…") or a path
_ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,99}")
#: config keys that make open_clip fetch files or load code (Hugging Face / timm models and tokenizers)
_LOADER_KEY = re.compile(r"^(hf_|timm_|tokenizer)")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def shipped_archs() -> frozenset[str]:
    """The model configs this version of open_clip ships in its package (``open_clip/model_configs``)."""
    import open_clip

    folder = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    return frozenset(os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith(".json"))


def loader_keys(config: Mapping, where: str = "") -> list[str]:
    """Keys of an open_clip model config (nested) that fetch files or load code: ``hf_*``, ``timm_*``, ``tokenizer*``."""
    out = []
    for k, v in config.items():
        path = f"{where}.{k}" if where else str(k)
        if _LOADER_KEY.match(str(k)):
            out.append(path)
        if isinstance(v, Mapping):
            out += loader_keys(v, path)
    return out


_ARCH_FIX = ("Fix: use a hypernet whose encoder is one of open_clip's architectures (open_clip.list_models()) or the "
             "embedded world's HT-World-CLIP")


def check_arch_name(arch: object) -> str:
    """``arch`` when it is a plain open_clip model name (letters, digits, ``.``, ``_``, ``-``; at most 100), else a
    :class:`HyperTransportError`: a schema such as ``hf-hub:`` or ``local-dir:``, or a path, would let a file choose
    what open_clip fetches or runs."""
    if not isinstance(arch, str) or not _ARCH_NAME.fullmatch(arch):
        raise HyperTransportError(
            f"encoder architecture {str(arch)[:80]!r} is not a plain open_clip model name (schemas such as 'hf-hub:' or "
            f"'local-dir:', paths and other loaders are refused: a file does not choose code). {_ARCH_FIX}."
        )
    return arch


def check_arch(arch: object) -> str:
    """``arch`` when it is an encoder architecture a file may name, else a :class:`HyperTransportError`
    (see :func:`_checked_config`)."""
    _checked_config(arch)
    return arch  # type: ignore[return-value]


def _checked_config(arch: object) -> dict:
    """The open_clip config of ``arch`` once it is checked, else a :class:`HyperTransportError`.

    A file chooses no code and reaches no network: the name is a plain open_clip model name (no ``hf-hub:`` /
    ``local-dir:`` schema, no path), open_clip knows it, its config has no key that loads a Hugging Face or timm model
    or tokenizer (:func:`loader_keys`), and a config that open_clip does not ship (:func:`shipped_archs`: one from a
    model folder) builds within :data:`MAX_CLIP_PARAMETERS`.
    """
    import open_clip

    check_arch_name(arch)
    if arch not in open_clip.list_models():
        raise HyperTransportError(
            f"open_clip has no architecture {arch!r}. {_ARCH_FIX}, or put its open_clip config as {arch}.json in "
            "models/hypertransport."
        )
    config = open_clip.get_model_config(arch) or {}
    bad = loader_keys(config)
    if bad:
        raise HyperTransportError(
            f"the open_clip config of {arch!r} has {', '.join(bad[:4])}: keys that fetch or run a Hugging Face or timm "
            "model or tokenizer, which HyperTransport never lets a file choose (this machine may be offline, and such "
            "code is not ours to run). Fix: use a CLIP with open_clip's own towers and BPE tokenizer (e.g. ViT-L-14, "
            "ViT-bigG-14, or the embedded world's HT-World-CLIP)."
        )
    if arch not in shipped_archs():
        _check_size(arch, config)
    return config


#: the most parameters a CLIP config from a model folder may describe (ViT-bigG-14 has about 2.5 billion)
MAX_CLIP_PARAMETERS = 3_000_000_000


def _check_size(arch: str, config: Mapping) -> None:
    """Build a config from a model folder on the meta device (nothing allocated) and refuse one that does not build
    or exceeds :data:`MAX_CLIP_PARAMETERS`."""
    import open_clip

    try:
        with torch.device("meta"):
            model = open_clip.model.CLIP(int(config["embed_dim"]), dict(config["vision_cfg"]), dict(config["text_cfg"]))
        n = sum(p.numel() for p in model.parameters())
    except Exception as e:  # a malformed config raises many types
        raise HyperTransportError(f"the open_clip config of {arch!r} does not describe a CLIP ({type(e).__name__}: "
                                  f"{str(e)[:80]}). Fix: correct or remove {arch}.json.") from None
    if n > MAX_CLIP_PARAMETERS:
        raise HyperTransportError(f"the open_clip config of {arch!r} describes {n:,} parameters, more than the "
                                  f"{MAX_CLIP_PARAMETERS:,} allowed. Fix: correct or remove {arch}.json.")


def tokenizer_for(arch: str, context_length: int | None = None):
    """open_clip's BPE tokenizer (its vocabulary ships in the package) for a checked ``arch`` (:func:`check_arch`),
    with the config's context length unless ``context_length`` is given; never one a schema, a folder or the Hub
    provides."""
    import open_clip

    ctx = context_length or _checked_config(arch).get("text_cfg", {}).get("context_length", 77)
    if type(ctx) is not int or not 1 <= ctx <= 4096:
        raise HyperTransportError(f"the open_clip config of {arch!r} has context_length {ctx!r}. Fix: an integer such "
                                  "as 77.")
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def _hash_tensors(h, items, sample: int) -> None:
    for name, t in sorted(items):
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue
        h.update(f"{name}:{tuple(t.shape)};".encode())
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // sample)
        h.update(flat[::stride][:sample].to("cpu", torch.float16).numpy().tobytes())


def weights_fingerprint(module: nn.Module, sample: int = 4096) -> str:
    """A short hash of a model's weights: names, shapes and ``sample`` values spread evenly over every
    tensor (rounded to fp16, so fp16 and fp32 copies of one checkpoint agree; a fine-tune that changes
    any part of a tensor changes the sampled values with high probability)."""
    h = hashlib.sha256()
    _hash_tensors(h, module.state_dict().items(), sample)
    return h.hexdigest()[:16]


def tower_fingerprint(state_dict: Mapping[str, torch.Tensor], spec: Mapping, sample: int = 4096) -> str:
    """A short hash of ONE tower: ``spec`` (heads, activation, pooling, image normalization: what the
    weights do not fix, see :mod:`~hypertransport_core.clip_layouts`) plus the tower's weights, hashed as
    :func:`weights_fingerprint` does. ``state_dict`` must be in the canonical (open_clip) layout: map other
    layouts first (:func:`~hypertransport_core.clip_layouts.hf_text_to_open_clip`), so that ComfyUI's copy
    of a tower and open_clip's get one fingerprint."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(spec), sort_keys=True).encode())
    _hash_tensors(h, state_dict.items(), sample)
    return h.hexdigest()[:16]


def text_body(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text tower (open_clip layout) without its ``text_projection``: what an SD1.5 checkpoint's clip_l holds."""
    return {k: v for k, v in state_dict.items() if k != "text_projection"}


def body_spec(spec: Mapping) -> dict:
    return {**dict(spec), "projection": "none"}


def open_clip_tower_fingerprints(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> dict:
    """``{"text_fingerprint", "text_body_fingerprint", "image_fingerprint"}`` of an open_clip ``CLIP`` (``None`` for
    a tower that is not a standard CLIP transformer tower, e.g. a Hugging Face text model or a ResNet image
    tower). The body fingerprint leaves the text projection out (:func:`text_body`)."""
    sd = model.state_dict()
    out = {}
    for tower, spec in ((TEXT, open_clip_text_spec(model)), (IMAGE, open_clip_image_spec(model, mean, std))):
        part = open_clip_tower(sd, tower) if spec is not None else {}
        out[f"{tower}_fingerprint"] = tower_fingerprint(part, spec) if part else None
        if tower == TEXT:
            out["text_body_fingerprint"] = tower_fingerprint(text_body(part), body_spec(spec)) if part else None
    return out


def text_projection(model: nn.Module) -> torch.Tensor | None:
    """An open_clip model's text projection ``(width, d)`` (used as ``x @ P``), or ``None``."""
    p = getattr(model, "text_projection", None)
    if isinstance(p, torch.Tensor) and p.ndim == 2:
        return p.detach()
    if isinstance(p, nn.Linear):  # some configs hold it as a Linear: weight (d, width)
        return p.weight.detach().T
    return None


def _image_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def to_model_input(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float], layout: str = "BHWC"
) -> torch.Tensor:
    """ComfyUI IMAGE (``(B, H, W, C)`` floats in [0, 1]; C = 1, 3 or 4) → normalized ``(B, 3, size, size)``.

    Grayscale is repeated to RGB; an alpha channel is composited over the normalization mean (a
    neutral background); the shorter side is resized to ``size`` (antialiased bicubic) and the
    centre cropped, as CLIP preprocessing does.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise HyperTransportError(
            f"image tensor must be (B, H, W, C), found shape {tuple(images.shape)}. Fix: pass a ComfyUI IMAGE."
        )
    x = images if layout == "BCHW" else images.permute(0, 3, 1, 2)
    x = x.float()
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise HyperTransportError(f"image batch is empty ({tuple(images.shape)}). Fix: connect a loaded image.")
    if not torch.isfinite(x).all():
        raise HyperTransportError("image holds NaN/Inf values. Fix: check the node that produced the image.")
    C = x.shape[1]
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    if C == 1:
        x = x.repeat(1, 3, 1, 1)
    elif C == 2:  # grayscale + alpha
        x = x[:, :1].repeat(1, 3, 1, 1) * x[:, 1:2] + mean_t * (1 - x[:, 1:2])
    elif C == 4:
        x = x[:, :3] * x[:, 3:4] + mean_t * (1 - x[:, 3:4])
    elif C != 3:
        raise HyperTransportError(f"image has {C} channels; expected 1, 2, 3 or 4. Fix: convert it to RGB.")
    x = x.clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return (x - mean_t) / std_t


def concept_texts(texts: Sequence[str] | str) -> list[str]:
    """The stripped concept phrases of ``texts``; raises naming the fix when one is empty."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    texts = [t.strip() for t in texts]
    if not texts or any(not t for t in texts):
        raise HyperTransportError("concept text is empty. Fix: type a concept, e.g. 'watercolor'.")
    return texts


def normalization_of(identity: dict) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` of the image normalization an encoder identity records (``(None, None)`` when it records none,
    as files written before it was recorded). Checked: three finite numbers each, std in (0, 10], mean in [-10, 10]."""
    mean, std = identity.get("image_mean"), identity.get("image_std")
    if mean is None and std is None:
        return None, None

    def ok(v, lo, hi):
        return (isinstance(v, list) and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and lo < x <= hi for x in v))

    if not ok(mean, -10.001, 10) or not ok(std, 0, 10):
        raise HyperTransportError(f"encoder image_mean {str(mean)[:60]} / image_std {str(std)[:60]}: expected three numbers "
                                  "each (std in (0, 10]). Fix: re-save the file with hypertransport_core.")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


class ConceptEncoder:
    """Text and image towers of one open_clip model.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP`` (anything with ``encode_text``/``encode_image``).
        tokenizer: its tokenizer (``open_clip.get_tokenizer(arch)``).
        arch: architecture name recorded in files.
        mean, std: image normalization (OpenAI CLIP's by default).
    """

    def __init__(self, model: nn.Module, tokenizer, arch: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.arch = arch
        pre = getattr(getattr(model, "visual", None), "preprocess_cfg", {}) or {}
        self.mean = tuple(mean or pre.get("mean") or getattr(getattr(model, "visual", None), "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(std or pre.get("std") or getattr(getattr(model, "visual", None), "image_std", None) or OPENAI_STD)
        self.image_size = _image_size(model)
        self._identity: dict | None = None

    @classmethod
    def from_open_clip(
        cls, arch: str, weights: str | None = None, pretrained: str | None = None, device: str | torch.device = "cpu",
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    ) -> ConceptEncoder:
        """Build ``arch`` with open_clip and load ``weights`` (a local ``.safetensors``/``.pt`` file) or a
        ``pretrained`` tag (needs a network). With neither, the weights are random (tests only). ``mean``/``std``: the
        image normalization the weights were trained with (open_clip assumes OpenAI CLIP's for a weights file; a hypernet
        records its encoder's, see :func:`normalization_of`)."""
        import open_clip

        check_arch(arch)
        if weights is not None and not os.path.isfile(weights):
            raise HyperTransportError(
                f"CLIP weights file {weights!r} does not exist. Fix: put the {arch} weights in ComfyUI's models/clip "
                "(or models/hypertransport) folder and select it."
            )
        model = open_clip.create_model(arch, pretrained=weights or pretrained, device=device)
        return cls(model, tokenizer_for(arch), arch, mean=mean, std=std)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, arch: str, **kw) -> ConceptEncoder:
        return cls(model, tokenizer, arch, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def identity(self) -> dict:
        """What hypernet files record and check: ``{"arch", "fingerprint", "embed_dim", "text_fingerprint",
        "image_fingerprint"}``. ``fingerprint`` covers the whole model (checked by
        :meth:`~hypertransport_core.hypernet.HyperNet.check_concept`); the tower fingerprints cover one tower
        each, in open_clip's layout, so the nodes can tell whether ComfyUI's own CLIP / CLIP_VISION holds the
        same text or image tower (:func:`tower_fingerprint`)."""
        if self._identity is None:
            with torch.no_grad():
                d = self.encode_text(["a"]).shape[-1]
            self._identity = {
                "arch": self.arch,
                "fingerprint": weights_fingerprint(self.model),
                "embed_dim": int(d),
                "image_mean": [float(v) for v in self.mean],
                "image_std": [float(v) for v in self.std],
                **open_clip_tower_fingerprints(self.model, self.mean, self.std),
            }
            self._identity = {k: v for k, v in self._identity.items() if v is not None}
        return self._identity

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, d)`` unit-norm text embeddings."""
        tokens = self.tokenizer(concept_texts(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, layout: str = "BHWC") -> torch.Tensor:
        """``(n, d)`` unit-norm image embeddings of a ComfyUI IMAGE batch (see :func:`to_model_input`)."""
        x = to_model_input(images.to(self.device), self.image_size, self.mean, self.std, layout)
        dtype = next(self.model.parameters()).dtype
        return F.normalize(self.model.encode_image(x.to(dtype)).float(), dim=-1)

    def concept(self, text: str) -> Concept:
        """Encode one phrase as a :class:`Concept`."""
        return Concept(self.encode_text([text])[0].cpu(), "text", self.identity, text.strip())

    def image_concept(self, images: torch.Tensor, label: str = "reference image") -> Concept:
        """Encode a batch of reference images; the embeddings are averaged, then re-normalized."""
        e = self.encode_image(images).mean(0)
        return Concept(F.normalize(e, dim=-1).cpu(), "image", self.identity, label)
