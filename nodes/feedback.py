"""Messages a ComfyUI user sees on the node itself, not only in the server's log.

ComfyUI's web UI shows a node's *progress text* inside the node (``PromptServer.send_progress_text``): the pack uses it
for what a user must see without opening the log: a hypernet's description, a fit's loss, a fallback, a warning.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def warn_in_ui(node: str, warning: str | None) -> None:
    """A warning shown on the running node in the web UI and written to the log (nothing when ``warning`` is None)."""
    if warning:
        log.warning("%s: %s", node, warning)
        progress_text(f"warning: {warning}")


def progress_text(text: str) -> None:
    """Show ``text`` under the running node in ComfyUI's web UI (nothing outside a server)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        ctx = get_executing_context()
        if ctx is not None and getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except Exception:  # a display nicety: never let it fail a fit
        log.debug("progress text not sent", exc_info=True)
