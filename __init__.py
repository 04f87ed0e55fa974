"""HyperTransport for ComfyUI: the custom-node entry point.

ComfyUI imports this file as a package from ``custom_nodes/<this folder>`` and calls
``comfy_entrypoint`` (V3 node schema). Outside ComfyUI (the trainer, the core's tests, a plain
``import``) ``comfy_api`` is absent and nothing ComfyUI-specific is imported. Inside a ComfyUI too old
for the V3 node API (before 0.3.75's ``comfy_api.latest``), a warning says so and no node is registered.

The pack's folder is appended to ``sys.path`` so that ``hypertransport_core`` (and the pack's other
top-level packages) are imported by their own names: the trainer, the tests and the nodes then share one
copy of each class in a process. Appended, never prepended, so ComfyUI's own ``nodes`` module keeps
precedence over this pack's ``nodes/`` folder, which ComfyUI reaches as ``<pack>.nodes``.
"""

import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

try:
    import comfy_api.latest  # noqa: F401
except ImportError:
    comfy_entrypoint = None
    if "comfy" in sys.modules or "folder_paths" in sys.modules:  # inside a ComfyUI without the V3 node API
        logging.getLogger("HyperTransport").warning(
            "HyperTransport: this ComfyUI has no V3 node API (comfy_api.latest), so the HyperTransport nodes are not "
            "loaded. Update ComfyUI to 0.3.75 or newer (the pack's pyproject.toml says requires-comfyui >=0.3.75)."
        )
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = None
__all__ = ["comfy_entrypoint"]
