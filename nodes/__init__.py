"""ComfyUI side of HyperTransport: the node list, the model folders, the patching glue.

Imported only inside ComfyUI (it needs ``comfy`` and ``comfy_api``); ``hypertransport_core`` never
imports it.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import model_files
from .definitions import NODES, NODES_DEPRECATED

model_files.register_folders()
model_files.install_reference_image()


class HyperTransportExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*NODES, *NODES_DEPRECATED]


async def comfy_entrypoint() -> HyperTransportExtension:
    return HyperTransportExtension()


__all__ = ["NODES", "NODES_DEPRECATED", "HyperTransportExtension", "comfy_entrypoint"]
