"""Find ComfyUI and import it as a library (headless, in this process): the one bootstrap.

The trainer, the world build, the benchmarks, the scripts and the dev kit all go through
:func:`import_comfyui`. Which ComfyUI (first found wins):

1. ``$COMFYUI_DIR``;
2. the ComfyUI holding this pack, when the repository sits in ``<ComfyUI>/custom_nodes/``;
3. ``<repo>/.comfyui/ComfyUI`` (what ``scripts/get_comfyui.sh`` unpacks).

Inside a running ComfyUI (``comfy`` already imported) nothing is imported again.

Import-order rules it follows (ComfyUI 0.3.75):

* ``comfy.model_management`` reads ``comfy.cli_args.args`` when it is imported, so ``args.cpu`` and
  ``args.base_directory`` are set first;
* ``nodes.py`` puts ``<ComfyUI>/comfy`` first on ``sys.path``: ComfyUI's top-level ``utils`` package is
  imported before ``nodes`` (else ``import server`` fails later);
* this repository has a ``nodes/`` folder too: ComfyUI's directory goes to the front of ``sys.path``, so
  ``import nodes`` means ComfyUI's ``nodes.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypertransport_core.errors import HyperTransportError

REPO = Path(__file__).resolve().parents[1]

MISSING = (
    "ComfyUI not found (looked at $COMFYUI_DIR, the ComfyUI holding this repository in custom_nodes/, and "
    f"{REPO / '.comfyui' / 'ComfyUI'}). Fix: set COMFYUI_DIR to your ComfyUI folder, or run `bash scripts/get_comfyui.sh`."
)


def find_comfyui() -> Path | None:
    """The ComfyUI folder to use (see the module docstring), or ``None``."""
    cands = [Path(os.environ["COMFYUI_DIR"])] if os.environ.get("COMFYUI_DIR") else []
    if REPO.parent.name == "custom_nodes":
        cands.append(REPO.parent.parent)
    cands.append(REPO / ".comfyui" / "ComfyUI")
    for c in cands:
        if (c / "comfy").is_dir() and (c / "main.py").is_file():
            return c.resolve()
    return None


def import_comfyui(*, base_directory: str | os.PathLike | None = None, cpu: bool | None = None):
    """Import ComfyUI in-process (idempotent) and return ``comfy.model_management``.

    Args:
        base_directory: ComfyUI's ``--base-directory`` (models, input and output folders); only
            honoured on the first import.
        cpu: ComfyUI's ``--cpu``; ``None`` means "when no CUDA device is present".

    Raises ``HyperTransportError`` naming the fix when no ComfyUI is found.
    """
    if "comfy.model_management" in sys.modules:
        return sys.modules["comfy.model_management"]
    root = find_comfyui()
    if root is None:
        raise HyperTransportError(MISSING)
    if "nodes" in sys.modules and not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(str(root)):
        del sys.modules["nodes"]  # this repository's nodes/ was imported by its bare name: ComfyUI's is meant
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    import comfy.cli_args
    import torch

    args = comfy.cli_args.args
    args.cpu = (not torch.cuda.is_available()) if cpu is None else bool(cpu)
    args.disable_all_custom_nodes = True  # a library import loads no custom nodes (the tests load the pack themselves)
    if base_directory is not None:
        args.base_directory = str(base_directory)
    import comfy.model_management as mm
    import utils.extra_config  # noqa: F401  (ComfyUI's utils package: must precede `import nodes`)

    return mm


def check_device(device: str) -> None:
    """``HyperTransportError`` naming the fix when ``device`` is not a usable torch device here."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HyperTransportError(f"--device={device!r}: not a torch device. Fix: cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise HyperTransportError(f"--device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s). Fix: --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise HyperTransportError(f"--device={device!r}: only cpu and cuda are supported. Fix: --device cpu.")
