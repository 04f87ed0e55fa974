"""The file format: hypernets and single steerings as ``.safetensors`` with JSON metadata. Never pickle.

Metadata (``str -> str``; values are JSON):

============== ==============================================================================
key            value
============== ==============================================================================
format         ``"hypertransport.hypernet"`` or ``"hypertransport.steering"``
format_version ``2`` (``1``: files saved before the content hash; still read)
model_family   site table id (``"sdxl"``, ``"pixart"``, ...)
sites          ``[{"name", "module", "channels", "channel_dim", "form", "output_index"}, ...]``
encoder        ``{"arch", "fingerprint", "embed_dim", ...}`` of the concept encoder
embed_dim      ``d`` (hypernet)
arch           hypernet config (:class:`~hypertransport_core.hypernet.HyperNetConfig`)
training       free-form summary (steps, loss, concepts, time, ...)
label          concept label (steering)
sha256         content hash of the metadata and tensors (:mod:`~hypertransport_core.tensorfile`)
============== ==============================================================================

Loading validates the whole file from its header before anything is allocated
(:func:`read_header`): the safetensors layout (:func:`~hypertransport_core.tensorfile.read_layout`),
every metadata field (types and ranges, :data:`~hypertransport_core.sites.LIMITS`,
:data:`~hypertransport_core.hypernet.CONFIG_LIMITS`), the parameter budget
(:data:`~hypertransport_core.hypernet.MAX_PARAMETERS`), and every tensor's name and shape against the
recorded config and sites. Then tensors are read as float32, checked finite and within
:data:`MAX_ABS_VALUE`, and the content hash is verified. Tensors may be stored as float32, float16 or
bfloat16. Writes are atomic and refuse NaN/Inf.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from .encoders import check_arch_name, normalization_of
from .errors import HyperTransportError, describe_mismatch
from .hypernet import MAX_PARAMETERS, HyperNet, HyperNetConfig
from .interventions import Steering
from .sites import Site, check_site_list
from .tensorfile import HASH_KEY, loads_bounded, read_layout, read_tensors, write_tensors

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HYPERNET = "hypertransport.hypernet"
STEERING = "hypertransport.steering"
_REQUIRED = {
    HYPERNET: ("format_version", "model_family", "sites", "encoder", "embed_dim", "arch"),
    STEERING: ("format_version", "model_family", "sites"),
}
_JSON_KEYS = ("format_version", "sites", "encoder", "embed_dim", "arch", "training", "label", "meta")
#: Largest magnitude a stored tensor may hold (hypernet weights, map parameters): far beyond any trained
#: value (|w| and |b| of trained maps stay within ~10), far below what breaks float32 sampling.
MAX_ABS_VALUE = 1e4
_FIX = "put a HyperTransport .safetensors file in ComfyUI's models/hypertransport folder"


def _err(path: str, msg: str) -> HyperTransportError:
    return HyperTransportError(f"{os.path.basename(str(path))}: {msg}")


def read_header(path: str, expect: str | None = None) -> dict:
    """Validated metadata of a hypernet or steering file, without reading its tensors.

    Args:
        path: the ``.safetensors`` file.
        expect: ``"hypertransport.hypernet"`` or ``"hypertransport.steering"`` to insist on one kind.

    Returns:
        dict with the decoded metadata plus ``"tensors"``: ``{name: shape}``, ``"site_list"``: list of
        :class:`~hypertransport_core.sites.Site` and ``"layout"`` (the checked safetensors layout).
    """
    layout = read_layout(path, what="HyperTransport file", fix=_FIX)
    raw = layout.metadata
    fmt = raw.get("format")
    if fmt not in _REQUIRED:
        raise _err(path, describe_mismatch("metadata key 'format'", f"one of {sorted(_REQUIRED)}", repr(fmt),
                                           "this is not a HyperTransport file; load it with the node made for it"))
    if expect is not None and fmt != expect:
        raise _err(path, describe_mismatch("metadata key 'format'", repr(expect), repr(fmt),
                                           "use Load HyperNet for hypernets and Load Steering for steering files"))
    meta: dict = {"format": fmt}
    for key in _REQUIRED[fmt]:
        if key not in raw:
            raise _err(path, f"metadata key {key!r} is missing. Fix: re-save the file with hypertransport_core.")
    for key, val in raw.items():
        if key in ("format", HASH_KEY):
            continue
        if key in _JSON_KEYS:
            try:
                meta[key] = loads_bounded(val)
            except (ValueError, RecursionError):
                if key == "label":  # files written before labels were JSON-encoded hold the bare text
                    meta[key] = val
                    continue
                raise _err(path, f"metadata key {key!r} is not valid JSON ({val[:60]!r}). Fix: re-save the file.") from None
        else:
            meta[key] = val
    version = meta["format_version"]
    if type(version) is not int or version not in READABLE_VERSIONS:
        fix = "update the HyperTransport node pack" if type(version) is int and version > FORMAT_VERSION else "re-save the file"
        raise _err(path, describe_mismatch("metadata key 'format_version'", f"one of {READABLE_VERSIONS}", version, fix))
    if version >= 2 and HASH_KEY not in raw:
        raise _err(path, "metadata key 'sha256' (the content hash) is missing. Fix: re-save the file with hypertransport_core.")
    if not isinstance(meta["model_family"], str) or not meta["model_family"]:
        raise _err(path, f"metadata key 'model_family' must be a non-empty string, found {meta['model_family']!r}. Fix: re-save the file.")
    for key in ("encoder", "training", "meta"):
        if key in meta and not isinstance(meta[key], dict):
            raise _err(path, f"metadata key {key!r} must be a JSON object, found {type(meta[key]).__name__}. Fix: re-save the file.")
    try:
        if "arch" in meta.get("encoder", {}):
            check_arch_name(meta["encoder"]["arch"])
        normalization_of(meta.get("encoder", {}))
    except HyperTransportError as e:
        raise _err(path, f"metadata key 'encoder': {e}") from None
    if not isinstance(meta["sites"], list) or not meta["sites"]:
        raise _err(path, "metadata key 'sites' must be a non-empty list. Fix: re-save the file.")
    if len(meta["sites"]) > 4096:
        raise _err(path, f"lists {len(meta['sites'])} sites, more than the 4096 allowed. Fix: re-save the file.")
    try:
        sites = [Site.from_dict(d) for d in meta["sites"]]
        check_site_list(sites)
    except HyperTransportError as e:
        raise _err(path, str(e)) from None
    meta["site_list"] = sites
    meta["tensors"] = layout.shapes()
    meta["layout"] = layout
    expected = _expected_shapes(path, fmt, meta)
    if set(expected) != set(meta["tensors"]):
        missing = sorted(set(expected) - set(meta["tensors"]))
        extra = sorted(set(meta["tensors"]) - set(expected))
        what = f"tensor {missing[0]!r} is missing" if missing else f"it holds an unexpected tensor {extra[0]!r}"
        raise _err(path, f"{what} ({len(expected)} tensors expected from its config and sites). Fix: re-save the file.")
    for name, shape in expected.items():
        found = meta["tensors"][name]
        if found != shape:
            raise _err(path, describe_mismatch(f"tensor {name!r} shape", f"{shape} (from {len(sites)} recorded sites)",
                                               found, "the file's tensors do not match its site list; re-save it"))
    return meta


def _expected_shapes(path: str, fmt: str, meta: dict) -> dict[str, tuple]:
    """Every tensor's name and shape implied by the recorded config and sites (nothing allocated)."""
    sites = meta["site_list"]
    total = sum(s.channels for s in sites)
    if fmt == STEERING:
        return {"w": (total,), "b": (total,)}
    if not isinstance(meta["arch"], dict):
        raise _err(path, f"metadata key 'arch' must be a JSON object, found {type(meta['arch']).__name__}. Fix: re-save the file.")
    try:
        cfg = HyperNetConfig.from_dict({**meta["arch"], "embed_dim": meta["embed_dim"]})
    except HyperTransportError as e:
        raise _err(path, str(e)) from None
    n = cfg.num_parameters(sites)
    if n > MAX_PARAMETERS:
        raise _err(path, f"its config implies {n:,} parameters, more than the {MAX_PARAMETERS:,} allowed "
                         f"(depth {cfg.depth}, hidden {cfg.hidden}, rank {cfg.rank}). Fix: the file is corrupt; re-save the hypernet.")
    with torch.device("meta"):
        hn = HyperNet(cfg, sites)
    return {k: tuple(v.shape) for k, v in hn.state_dict().items()}


def _save(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    # Keys read back as JSON are always written as JSON (a label "watercolor" is stored as '"watercolor"').
    md = {k: (json.dumps(v) if k in _JSON_KEYS or not isinstance(v, str) else v) for k, v in meta.items()}
    write_tensors(path, tensors, md)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise HyperTransportError(f"dtype {dtype} cannot be stored. Fix: use torch.float32, torch.float16 or torch.bfloat16.")
    return dtype


def save_hypernet(path: str, hypernet: HyperNet, training: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
    """Write ``hypernet`` (atomically) with its sites, encoder identity, config, ``training`` summary and
    content hash; tensors as ``dtype`` (float32, or float16/bfloat16 for half the size)."""
    meta = {
        "format": HYPERNET,
        "format_version": FORMAT_VERSION,
        "model_family": hypernet.family,
        "sites": [s.to_dict() for s in hypernet.sites],
        "encoder": hypernet.encoder,
        "embed_dim": hypernet.embed_dim,
        "arch": hypernet.config.to_dict(),
        "training": training or {},
    }
    dt = _float_dtype(dtype)
    _save(path, {k: v.to(dt) for k, v in hypernet.state_dict().items()}, meta)


def _read_checked(path: str, meta: dict, device) -> dict[str, torch.Tensor]:
    if meta["format_version"] < 2:
        log.warning("%s: saved before content hashes (format version 1): corruption cannot be detected. "
                    "Re-save it with hypertransport_core to add one.", os.path.basename(path))
    return read_tensors(meta["layout"], max_abs=MAX_ABS_VALUE, device=device)


def load_hypernet(path: str, device: str | torch.device = "cpu") -> HyperNet:
    """Validate and load a hypernet file (see :func:`read_header` for the checks).

    The module is built on the ``meta`` device and takes the file's float32 tensors as its parameters, so
    loading holds one copy of the weights (peak memory: the float32 weights plus a few MB)."""
    meta = read_header(path, expect=HYPERNET)
    cfg = HyperNetConfig.from_dict({**meta["arch"], "embed_dim": meta["embed_dim"]})
    tensors = _read_checked(path, meta, "cpu")
    with torch.device("meta"):
        hn = HyperNet(cfg, meta["site_list"], family=meta["model_family"], encoder=meta["encoder"])
    hn.load_state_dict(tensors, strict=True, assign=True)
    hn.training_summary = meta.get("training", {})
    return hn.to(device).eval()


def save_steering(path: str, steering: Steering, family: str | None = None) -> None:
    """Write one concept's maps (atomically): a small file usable without the hypernet."""
    if steering.w.ndim != 1:
        raise HyperTransportError(
            f"save_steering: the steering holds {steering.w.shape[0]} concepts' maps (w of shape {tuple(steering.w.shape)}); "
            "a steering file holds one. Fix: save each concept's steering on its own (Make Steering per concept), "
            "or combine the concepts first (Combine Concepts)."
        )
    for name, t in (("w", steering.w), ("b", steering.b)):
        big = float(t.detach().float().abs().max()) if t.numel() else 0.0
        if not big <= MAX_ABS_VALUE:  # NaN fails too
            raise HyperTransportError(
                f"save_steering: the steering's {name} holds a value of magnitude {big:.3g}, beyond the {MAX_ABS_VALUE:g} "
                "a steering file may hold (Load Steering would refuse the file). Fix: the hypernet that made it gives "
                "extreme maps for this concept; retrain it or use another concept."
            )
    meta = {
        "format": STEERING,
        "format_version": FORMAT_VERSION,
        "model_family": family or steering.meta.get("family", "generic"),
        "sites": [s.to_dict() for s in steering.sites],
        "encoder": steering.meta.get("encoder", {}),
        "label": steering.meta.get("label", ""),
        "meta": {k: v for k, v in steering.meta.items() if k not in ("encoder", "label")},
    }
    _save(path, {"w": steering.w.float(), "b": steering.b.float()}, meta)


def load_steering(path: str, device: str | torch.device = "cpu") -> Steering:
    """Validate and load a steering file."""
    meta = read_header(path, expect=STEERING)
    t = _read_checked(path, meta, device)
    extra = dict(meta.get("meta") or {})
    extra.update({"label": meta.get("label", ""), "family": meta["model_family"], "encoder": meta.get("encoder", {})})
    return Steering(tuple(meta["site_list"]), t["w"], t["b"], extra)
