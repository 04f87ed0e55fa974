"""The file format: hypernets and single steerings as ``.safetensors`` with JSON metadata. Never pickle.

Metadata (``str -> str``; values are JSON):

============== ==============================================================================
key            value
============== ==============================================================================
format         ``"hypertransport.hypernet"`` or ``"hypertransport.steering"``
format_version ``1``
model_family   site table id (``"sdxl"``, ``"pixart"``, ...)
sites          ``[{"name", "module", "channels", "channel_dim", "form", "output_index"}, ...]``
encoder        ``{"arch", "fingerprint", "embed_dim"}`` of the concept encoder
embed_dim      ``d`` (hypernet)
arch           hypernet config (:class:`~hypertransport_core.hypernet.HyperNetConfig`)
training       free-form summary (steps, loss, concepts, time, ...)
label          concept label (steering)
============== ==============================================================================

:func:`read_header` validates a file from its header alone, before any tensor is read; loaders
then check shapes against the recorded sites and refuse NaN/Inf. Writes go to a temporary file in
the same folder and are renamed into place, so an interrupted save leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import HyperTransportError, describe_mismatch
from .hypernet import HyperNet, HyperNetConfig
from .interventions import Steering
from .sites import Site

FORMAT_VERSION = 1
HYPERNET = "hypertransport.hypernet"
STEERING = "hypertransport.steering"
_REQUIRED = {
    HYPERNET: ("format_version", "model_family", "sites", "encoder", "embed_dim", "arch"),
    STEERING: ("format_version", "model_family", "sites"),
}
_JSON_KEYS = ("format_version", "sites", "encoder", "embed_dim", "arch", "training", "label", "meta")


def _err(path: str, msg: str) -> HyperTransportError:
    return HyperTransportError(f"{os.path.basename(str(path))}: {msg}")


def _raw_header(path: str) -> tuple[dict, int]:
    """Parse the safetensors header by hand (so truncation is caught) → (header dict, file size)."""
    if not os.path.isfile(path):
        raise _err(path, f"no such file ({path}). Fix: put the file in ComfyUI's models/hypertransport folder.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _err(path, f"is not a safetensors file ({size} bytes). Fix: re-download or re-export the file.")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > min(size - 8, 100_000_000):
            raise _err(path, "is not a safetensors file (bad header length). Fix: use a .safetensors hypernet/steering file.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _err(path, "is not a safetensors file (header is not JSON). Fix: use a .safetensors file.") from None
    if not isinstance(header, dict):
        raise _err(path, "is not a safetensors file (header is not a JSON object). Fix: use a .safetensors file.")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        for k, v in header.items():
            if k != "__metadata__":
                tuple(int(d) for d in v["shape"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise _err(path, "is not a safetensors file (its header lacks tensor shapes/offsets). Fix: use a .safetensors file.") from None
    if 8 + n + end != size:
        raise _err(
            path,
            describe_mismatch("file size", f"{8 + n + end} bytes (from its header)", f"{size} bytes",
                              "the file is truncated or padded; copy or download it again"),
        )
    return header, size


def read_header(path: str, expect: str | None = None) -> dict:
    """Validated metadata of a hypernet or steering file, without loading tensors.

    Args:
        path: the ``.safetensors`` file.
        expect: ``"hypertransport.hypernet"`` or ``"hypertransport.steering"`` to insist on one kind.

    Returns:
        dict with the decoded metadata plus ``"tensors"``: ``{name: shape}`` and ``"site_list"``:
        list of :class:`~hypertransport_core.sites.Site`.
    """
    header, _ = _raw_header(path)
    raw = header.get("__metadata__") or {}
    fmt = raw.get("format")
    if fmt not in _REQUIRED:
        raise _err(
            path,
            describe_mismatch("metadata key 'format'", f"one of {sorted(_REQUIRED)}", repr(fmt),
                              "this is not a HyperTransport file; load it with the node made for it"),
        )
    if expect is not None and fmt != expect:
        raise _err(
            path,
            describe_mismatch("metadata key 'format'", repr(expect), repr(fmt),
                              "use Load HyperNet for hypernets and Load Steering for steering files"),
        )
    meta: dict = {"format": fmt}
    for key in _REQUIRED[fmt]:
        if key not in raw:
            raise _err(path, f"metadata key {key!r} is missing. Fix: re-save the file with hypertransport_core.")
    for key, val in raw.items():
        if key == "format":
            continue
        if key in _JSON_KEYS:
            try:
                meta[key] = json.loads(val)
            except json.JSONDecodeError:
                if key == "label":  # files written before labels were JSON-encoded hold the bare text
                    meta[key] = val
                    continue
                raise _err(path, f"metadata key {key!r} is not valid JSON ({val[:60]!r}). Fix: re-save the file.") from None
        else:
            meta[key] = val
    version = meta["format_version"]
    if version != FORMAT_VERSION:
        fix = "update the HyperTransport node pack" if isinstance(version, int) and version > FORMAT_VERSION else "re-save the file"
        raise _err(path, describe_mismatch("metadata key 'format_version'", FORMAT_VERSION, version, fix))
    if not isinstance(meta["sites"], list) or not meta["sites"]:
        raise _err(path, "metadata key 'sites' must be a non-empty list. Fix: re-save the file.")
    meta["site_list"] = [Site.from_dict(d) for d in meta["sites"]]
    meta["tensors"] = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    total = sum(s.channels for s in meta["site_list"])
    expected = _expected_shapes(fmt, meta, total)
    for name, shape in expected.items():
        found = meta["tensors"].get(name)
        if found is None:
            raise _err(path, f"tensor {name!r} is missing. Fix: re-save the file; it is incomplete.")
        if found != shape:
            raise _err(
                path,
                describe_mismatch(f"tensor {name!r} shape", f"{shape} (from {len(meta['site_list'])} recorded sites)",
                                  found, "the file's tensors do not match its site list; re-save it"),
            )
    return meta


def _expected_shapes(fmt: str, meta: dict, total: int) -> dict[str, tuple]:
    if fmt == STEERING:
        return {"w": (total,), "b": (total,)}
    cfg = HyperNetConfig.from_dict({**meta["arch"], "embed_dim": meta["embed_dim"]})
    S, H, r = len(meta["sites"]), cfg.hidden, cfg.rank
    return {
        "site_proj": (S, H, 2 * r),
        "channel_w": (total, r),
        "channel_b": (total, r),
        "offset_w": (total,),
        "offset_b": (total,),
        "mean_text": (cfg.embed_dim,),
        "mean_image": (cfg.embed_dim,),
    }


def _load_tensors(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise _err(path, f"tensor {k!r} holds NaN/Inf values. Fix: the file is corrupt or training diverged; retrain or re-export it.")
            out[k] = t
    return out


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _atomic_save(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object], path: str) -> None:
    # Keys read back as JSON are always written as JSON (a label "watercolor" is stored as '"watercolor"').
    md = {k: (json.dumps(v) if k in _JSON_KEYS or not isinstance(v, str) else v) for k, v in meta.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}.safetensors")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=md)
        # safetensors writes 0600 files; give the usual mode of a new file so that other users and
        # processes sharing the models folder can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_hypernet(path: str, hypernet: HyperNet, training: dict | None = None) -> None:
    """Write ``hypernet`` (atomically) with its sites, encoder identity, config and ``training`` summary."""
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
    tensors = {k: v.float() for k, v in hypernet.state_dict().items()}
    _atomic_save(tensors, meta, path)


def load_hypernet(path: str, device: str | torch.device = "cpu") -> HyperNet:
    """Validate and load a hypernet file (see :func:`read_header` for the checks)."""
    meta = read_header(path, expect=HYPERNET)
    cfg = HyperNetConfig.from_dict({**meta["arch"], "embed_dim": meta["embed_dim"]})
    hn = HyperNet(cfg, meta["site_list"], family=meta["model_family"], encoder=meta["encoder"])
    tensors = _load_tensors(path, device)
    try:
        missing, unexpected = hn.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor with another shape than the recorded config gives
        detail = " ".join(str(e).split())
        raise _err(path, f"tensors do not match the recorded hypernet config ({detail[:300]}). Fix: re-save the file.") from None
    if missing or unexpected:
        raise _err(path, f"tensors do not match the hypernet config (missing {missing[:3]}, unexpected {unexpected[:3]}). Fix: re-save the file.")
    hn.training_summary = meta.get("training", {})
    return hn.to(device).eval()


def save_steering(path: str, steering: Steering, family: str | None = None) -> None:
    """Write one concept's maps (atomically): a small file usable without the hypernet."""
    if steering.w.ndim != 1:
        raise HyperTransportError("only a single-concept steering (1-D w, b) can be saved.")
    meta = {
        "format": STEERING,
        "format_version": FORMAT_VERSION,
        "model_family": family or steering.meta.get("family", "generic"),
        "sites": [s.to_dict() for s in steering.sites],
        "encoder": steering.meta.get("encoder", {}),
        "label": steering.meta.get("label", ""),
        "meta": {k: v for k, v in steering.meta.items() if k not in ("encoder", "label")},
    }
    _atomic_save({"w": steering.w.float(), "b": steering.b.float()}, meta, path)


def load_steering(path: str, device: str | torch.device = "cpu") -> Steering:
    """Validate and load a steering file."""
    meta = read_header(path, expect=STEERING)
    t = _load_tensors(path, device)
    extra = dict(meta.get("meta") or {})
    extra.update({"label": meta.get("label", ""), "family": meta["model_family"], "encoder": meta.get("encoder", {})})
    return Steering(tuple(meta["site_list"]), t["w"].float(), t["b"].float(), extra)
