"""Config dataclasses ↔ config files (JSON or TOML) ↔ ``--flags``, checked up front.

Each field's help text is the comment on its line in the dataclass source, so the defaults and
their documentation stay together (nanoGPT style) and ``--help`` shows both.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
from typing import Any, get_type_hints

import tomllib


def field_help(cls) -> dict[str, str]:
    """``{field: comment}`` read from the ``name: type = default  # comment`` lines of ``cls``."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def check_device(device: str) -> None:
    """``SystemExit`` naming the fix when ``device`` is not a usable torch device here."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"--device={device!r}: not a torch device. Fix: cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise SystemExit(f"--device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s). Fix: --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device={device!r}: only cpu and cuda are supported. Fix: --device cpu.")


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise SystemExit(f"config file {path!r} does not exist. Fix: pass an existing .json or .toml file.")
    with open(path, "rb") as f:
        if path.endswith(".toml"):
            return tomllib.load(f)
        if path.endswith(".json"):
            return json.load(f)
    raise SystemExit(f"config file {path!r}: use a .json or .toml file.")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser(cls, description: str, extra: list[tuple[tuple, dict]] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)  # defaults are written into each help below
    p.add_argument("--config", help="a .json or .toml file with any of the options below (flags override it)")
    helps = field_help(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        text = helps.get(f.name, "")
        kw: dict[str, Any] = {"default": None, "help": text if "(default" in text else f"{text} (default: {default!r})"}
        if t is bool:
            kw["type"], kw["nargs"], kw["const"] = _parse_bool, "?", True
        elif t in (int, float, str):
            kw["type"] = t
        elif "float" in str(t):
            kw["type"] = float
        elif "int" in str(t):
            kw["type"] = int
        else:
            kw["type"] = str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    for args, kw in extra:
        p.add_argument(*args, **kw)
    return p


def resolve(cls, ns: argparse.Namespace):
    """defaults < config file < flags → an instance of ``cls``."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if getattr(ns, "config", None):
        for k, v in load_config_file(ns.config).items():
            k = k.replace("-", "_")
            if k not in names:
                raise SystemExit(f"config file {ns.config!r}: unknown option {k!r}. Known: {sorted(names)}")
            values[k] = v
    for k in names:
        v = getattr(ns, k, None)
        if v is not None:
            values[k] = v
    return cls(**values)
