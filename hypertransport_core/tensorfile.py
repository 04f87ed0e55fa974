"""Bounded reading and atomic writing of ``.safetensors`` files (never pickle).

Reading is done in two stages, so that nothing is allocated from a number in a file before it is checked:

1. :func:`read_layout` parses the header by hand: its length is bounded (:data:`MAX_HEADER_BYTES`)
   before it is read, it must be a JSON object of tensor records and ``str → str`` metadata, every
   record's dtype must be a float type we read (:data:`DTYPES`), its shape non-negative integers, its
   byte range exactly ``numel × itemsize``, the ranges must tile the data section without gaps or
   overlaps, and the file size must equal the header's account of it;
2. :func:`read_tensors` (after the caller has checked names, shapes and a memory budget against the
   layout) reads each tensor with plain file reads (no memory map, so pages of the file do not add to
   the process's memory), converts it to float32 in bounded chunks, refuses NaN/Inf and values beyond
   ``max_abs``, and checks the content hash.

The content hash (``metadata["sha256"]``) covers the metadata (without the hash itself) and every
tensor's name, dtype, shape and bytes. :func:`write_tensors` records it, refuses non-finite tensors and
writes through a temporary file in the destination folder that is renamed into place, so an interrupted
or refused write leaves no half-written file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import HyperTransportError, describe_mismatch

#: the header of every file this project writes is a few hundred KB at most (safetensors itself caps it at 100 MB)
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: safetensors dtype code -> (torch dtype, bytes per element); only float tensors are read
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F64": (torch.float64, 8),
}
_CODES = {v[0]: k for k, v in DTYPES.items()}
HASH_KEY = "sha256"
_CHUNK_BYTES = 8 * 1024 * 1024  # conversion to float32 goes through chunks of at most this many raw bytes


@dataclass(frozen=True)
class TensorRecord:
    dtype: str  # safetensors code, one of DTYPES
    shape: tuple[int, ...]
    begin: int  # byte offsets inside the data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Layout:
    """What a safetensors header says, checked for consistency with itself and with the file size."""

    path: str
    size: int  # file size in bytes
    data_start: int  # 8 + header length
    metadata: dict[str, str]
    tensors: dict[str, TensorRecord]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def tensor_bytes(self) -> int:
        return self.size - self.data_start

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.shape for k, r in self.tensors.items()}

    def float32_bytes(self, names=None) -> int:
        """Bytes of the named tensors once converted to float32."""
        return sum(4 * self.tensors[k].numel for k in (names if names is not None else self.tensors))


def _err(path: str, msg: str) -> HyperTransportError:
    return HyperTransportError(f"{os.path.basename(str(path))}: {msg}")


#: the deepest nesting and the longest number a header's JSON may hold (a safetensors header nests 3 deep, a
#: HyperTransport metadata value 4; a shape or offset has at most 20 digits)
MAX_JSON_DEPTH = 16
MAX_NUMBER_CHARS = 32
# a string (one that never closes runs to the end of the text, so every character is scanned once) or a bracket
_BRACKETS = re.compile(r'"(?:[^"\\]|\\[\s\S]?)*(?:"|\Z)|[\[\]{}]')


def _bounded_number(kind):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
        x = kind(text)
        if kind is float and not math.isfinite(x):
            raise ValueError(f"the number {text} overflows")
        return x

    return parse


def _refuse_constant(name: str):
    raise ValueError(f"the non-JSON constant {name}")


def loads_bounded(text: str | bytes):
    """``json.loads`` for text read from a file: nesting at most :data:`MAX_JSON_DEPTH` (checked in one linear scan
    before parsing, so a deep file cannot exhaust the stack), numbers at most :data:`MAX_NUMBER_CHARS` characters,
    no NaN/Infinity. Raises ``ValueError`` saying which bound was crossed."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    depth = 0
    for m in _BRACKETS.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} deep")
        elif ch in "]}":
            depth -= 1
    return json.loads(text, parse_int=_bounded_number(int), parse_float=_bounded_number(float),
                      parse_constant=_refuse_constant)


def read_layout(path: str, *, what: str = "file", fix: str = "use a .safetensors file made by HyperTransport") -> Layout:
    """The checked header of ``path`` (see the module docstring); reads only the header."""
    if not os.path.isfile(path):
        raise _err(path, f"no such {what} ({path}). Fix: {fix}.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _err(path, f"is not a safetensors file ({size} bytes). Fix: {fix}.")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            limit = f"at most {MAX_HEADER_BYTES} bytes and within the file's {size} bytes"
            raise _err(path, f"is not a safetensors file (its header length {n} is not {limit}). Fix: {fix}.")
        raw = f.read(n)
    try:
        header = loads_bounded(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = str(e).split(":")[0] if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)) else str(e)
        raise _err(path, f"is not a safetensors file (its header is not bounded JSON: {why[:80]}). Fix: {fix}.") from None
    if not isinstance(header, dict):
        raise _err(path, f"is not a safetensors file (header is a JSON {type(header).__name__}, not an object). Fix: {fix}.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _err(path, f"its metadata must map strings to strings, found {type(meta).__name__} "
                         f"{str(meta)[:80]!r}. Fix: re-save the file with hypertransport_core.")
    tensors: dict[str, TensorRecord] = {}
    for name, rec in header.items():
        try:
            dtype, shape, (begin, end) = rec["dtype"], rec["shape"], rec["data_offsets"]
            ok = isinstance(dtype, str) and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
            ok = ok and type(begin) is int and type(end) is int and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _err(path, f"is not a safetensors file (tensor record {name!r} lacks a dtype, shape or offsets). Fix: {fix}.")
        if dtype not in DTYPES:
            raise _err(path, describe_mismatch(f"tensor {name!r} dtype", f"one of {sorted(DTYPES)}", dtype,
                                               "HyperTransport files hold float tensors only; re-save the file"))
        r = TensorRecord(dtype, tuple(shape), begin, end)
        if r.end - r.begin != r.numel * DTYPES[dtype][1]:
            raise _err(path, describe_mismatch(f"tensor {name!r} byte range", f"{r.numel * DTYPES[dtype][1]} bytes for shape {r.shape}",
                                               f"{r.end - r.begin} bytes", "the file is corrupt; copy or download it again"))
        tensors[name] = r
    pos = 0
    for name, r in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if r.begin != pos:
            raise _err(path, f"tensor {name!r} starts at byte {r.begin} of the data, expected {pos} (gap or overlap). "
                             "Fix: the file is corrupt; copy or download it again.")
        pos = r.end
    if 8 + n + pos != size:
        raise _err(path, describe_mismatch("file size", f"{8 + n + pos} bytes (from its header)", f"{size} bytes",
                                           "the file is truncated or padded; copy or download it again"))
    return Layout(str(path), size, 8 + n, meta, tensors)


def _canonical_meta(meta: Mapping[str, str]) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k != HASH_KEY}, sort_keys=True).encode()


def _tensor_prefix(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    return f"{name}|{dtype}|{list(shape)}|".encode()


def read_tensors(layout: Layout, *, max_abs: float = 1e4, device: str | torch.device = "cpu",
                 require_hash: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of ``layout`` as float32, checked finite and ``|x| <= max_abs``, with the content hash verified.

    Call it only after checking ``layout`` (names, shapes, memory budget). Peak memory: the float32 tensors
    plus one chunk of :data:`_CHUNK_BYTES`. The hash is checked first, in a pass of its own over the file
    (:func:`content_hash`), so a damaged file is refused before any tensor is allocated.
    """
    if sys.byteorder != "little":  # pragma: no cover
        raise HyperTransportError("reading safetensors files needs a little-endian machine.")
    want = layout.metadata.get(HASH_KEY)
    if want is None and require_hash:
        raise _err(layout.path, "records no content hash. Fix: re-save it with hypertransport_core.")
    out: dict[str, torch.Tensor] = {}
    with open(layout.path, "rb") as f:  # one handle for both passes: a file renamed over it meanwhile is not read
        if os.fstat(f.fileno()).st_size != layout.size:
            raise _err(layout.path, "changed while it was read. Fix: load it again once it is fully written.")
        if want is not None:
            got = content_hash(layout, f)
            if got != want:
                raise _err(layout.path, f"content hash mismatch (recorded {want[:12]}…, computed {got[:12]}…): the file "
                                        "changed after it was saved (a flipped byte, a partial copy). Fix: copy or download it again.")
        for name, r in sorted(layout.tensors.items()):
            dtype, item = DTYPES[r.dtype]
            f.seek(layout.data_start + r.begin)
            flat = torch.empty(r.numel, dtype=torch.float32)
            nonfinite, big = 0, 0.0
            for lo, buf in _chunks(f, r, layout.path):  # checked chunk by chunk: no full-size temporary
                part = flat[lo : lo + len(buf) // item]
                part.copy_(torch.frombuffer(buf, dtype=dtype))
                finite = torch.isfinite(part)
                nonfinite += int(part.numel() - finite.sum())
                if part.numel():
                    big = max(big, float(part.abs().max()))
            if nonfinite:
                raise _err(layout.path, f"tensor {name!r} holds NaN/Inf at {nonfinite} of {r.numel} values. "
                                        "Fix: the file is corrupt or its training diverged; retrain or re-export it.")
            if big > max_abs:
                raise _err(layout.path, f"tensor {name!r} holds a value of magnitude {big:.3g}, beyond the {max_abs:g} a "
                                        "valid file holds. Fix: the file is corrupt; retrain or re-export it.")
            out[name] = flat.view(r.shape).to(device)
    return out


def _chunks(f, r: TensorRecord, path: str):
    """``(first element, bytes)`` of one tensor's data, read from ``f`` (positioned at its start) in chunks of at
    most :data:`_CHUNK_BYTES`."""
    item = DTYPES[r.dtype][1]
    step = max(1, _CHUNK_BYTES // item)
    for lo in range(0, r.numel, step):
        k = min(step, r.numel - lo)
        buf = bytearray(f.read(k * item))
        if len(buf) != k * item:
            raise _err(path, "ended before its tensors did (truncated while reading). Fix: copy the file again.")
        yield lo, buf


def content_hash(layout: Layout, f=None) -> str:
    """The content hash of a file (its metadata without the hash, every tensor's name, dtype, shape and bytes),
    read in chunks (from ``f``, an open binary handle of it, when given): memory stays at one chunk whatever the
    file's size."""
    if f is None:
        with open(layout.path, "rb") as fh:
            return content_hash(layout, fh)
    h = hashlib.sha256(_canonical_meta(layout.metadata))
    for name, r in sorted(layout.tensors.items()):
        h.update(_tensor_prefix(name, r.dtype, r.shape))
        f.seek(layout.data_start + r.begin)
        for _, buf in _chunks(f, r, layout.path):
            h.update(buf)
    return h.hexdigest()


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


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def write_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                  check_finite: bool = True) -> None:
    """Write ``tensors`` (float16/bfloat16/float32/float64) with ``metadata`` and its content hash, atomically.

    Raises :class:`HyperTransportError` naming the tensor when one holds NaN/Inf (``check_finite``); the
    destination is then left as it was.
    """
    from safetensors.torch import save_file

    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise HyperTransportError("safetensors metadata maps strings to strings. Fix: JSON-encode the values.")
    items = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    h = hashlib.sha256(_canonical_meta(metadata))
    for name in sorted(items):
        t = items[name]
        if t.dtype not in _CODES:
            raise HyperTransportError(f"tensor {name!r} has dtype {t.dtype}; HyperTransport files hold float16, bfloat16, "
                                      "float32 or float64 tensors. Fix: convert it.")
        if check_finite and not bool(torch.isfinite(t).all()):
            raise HyperTransportError(f"refusing to save {os.path.basename(path)}: tensor {name!r} holds NaN/Inf. "
                                      "Fix: the values diverged; lower the learning rate or start from the last good checkpoint.")
        h.update(_tensor_prefix(name, _CODES[t.dtype], tuple(t.shape)))
        h.update(_raw_bytes(t))
    md = {**metadata, HASH_KEY: h.hexdigest()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}.safetensors")
    try:
        save_file(items, tmp, metadata=md)
        # safetensors writes 0600 files; give the usual mode of a new file so that other users and
        # processes sharing the models folder can read it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_tensors`' temporary files (or another hidden file)."""
    return os.path.basename(name).startswith(".")


__all__ = ["DTYPES", "HASH_KEY", "Layout", "MAX_HEADER_BYTES", "content_hash", "loads_bounded", "TensorRecord", "is_temporary", "read_layout", "read_tensors",
           "write_tensors"]
