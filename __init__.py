"""HyperTransport for ComfyUI: the custom-node entry point.

ComfyUI imports this file as a package from ``custom_nodes/<this folder>`` and calls
``comfy_entrypoint`` (V3 node schema). Outside ComfyUI (the trainer, the core's tests, a plain
``import``) ``comfy_api`` is absent and nothing ComfyUI-specific is imported.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    # `hypertransport_core` is imported by its own name, so the trainer, the tests and the nodes share
    # one copy. Appended, not prepended: ComfyUI's own `nodes` module must keep precedence over our
    # `nodes/` folder.
    sys.path.append(_HERE)

try:
    import comfy_api.latest  # noqa: F401
except ImportError:  # not running inside ComfyUI
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = None
__all__ = ["comfy_entrypoint"]
