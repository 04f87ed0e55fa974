"""The project's dev kit: what tests, benchmarks, scripts and workflow builders share (not shipped to users).

* :func:`setup_comfy` / :func:`load_pack`: ComfyUI in-process on the CPU (through the one bootstrap,
  :func:`hypertransport_comfy.comfyui.import_comfyui`) and this repository imported as a custom-node package, as
  ComfyUI's ``load_custom_node`` does;
* :mod:`~ht_devkit.tiny`: tiny random-weight models from ComfyUI's own classes, random hypernets, a tiny
  open_clip encoder, model files ComfyUI's loaders detect;
* :mod:`~ht_devkit.server`: a real ComfyUI server on loopback with this pack and test-only nodes;
* :mod:`~ht_devkit.executor`: ComfyUI's real executor, in-process.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from hypertransport_comfy.comfyui import MISSING, REPO, find_comfyui, import_comfyui

from .executor import DummyServer, constant_node, prompt_executor, run_prompt
from .server import Server, free_port, prepare_server_base
from .tiny import (
    FAMILIES,
    TINY_CLIP_ARCH,
    TINY_CLIP_CONFIG,
    TINY_WORLD_UNET,
    HashTextEncoder,
    build_from_file,
    flux_config,
    init_random_,
    patcher_for,
    pixart_config,
    random_cond,
    random_hypernet,
    sample,
    timed,
    tiny_backend,
    tiny_flux,
    tiny_pixart,
    tiny_sd15,
    tiny_sdxl,
    tiny_world,
    tiny_world_backend,
    unet_config,
    write_hypernet,
    write_model_files,
    write_tiny_encoder,
    write_tiny_sd3,
)

PACK_MODULE = "hypertransport_pack"


def setup_comfy(base_directory: str | os.PathLike | None = None):
    """ComfyUI in-process on the CPU, its base directory ``base_directory``. Returns ``comfy.model_management``."""
    return import_comfyui(base_directory=base_directory, cpu=True)


def load_pack(name: str = PACK_MODULE):
    """Import this repository as a ComfyUI custom-node package (``__init__.py`` by file location), as
    ComfyUI's ``load_custom_node`` does for a folder in ``custom_nodes/``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


__all__ = [
    "FAMILIES", "HashTextEncoder", "MISSING", "PACK_MODULE", "REPO", "TINY_CLIP_ARCH", "TINY_CLIP_CONFIG", "TINY_WORLD_UNET", "DummyServer", "Server",
    "build_from_file", "constant_node", "find_comfyui", "flux_config", "free_port", "init_random_", "load_pack",
    "patcher_for", "pixart_config", "prepare_server_base", "prompt_executor", "random_cond", "random_hypernet",
    "run_prompt", "sample", "setup_comfy", "timed", "tiny_backend", "tiny_flux", "tiny_pixart", "tiny_sd15", "tiny_sdxl", "tiny_world", "tiny_world_backend",
    "unet_config", "write_hypernet", "write_model_files", "write_tiny_encoder", "write_tiny_sd3",
]
