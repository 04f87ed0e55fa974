"""HyperTransport for ComfyUI: the custom-node entry point.

ComfyUI imports this file as a package from ``custom_nodes/<this folder>`` and calls
``comfy_entrypoint`` (V3 node schema). Outside ComfyUI (the trainer, the core's tests, a plain
``import``) ``comfy_api`` is absent and nothing ComfyUI-specific is imported. Inside a ComfyUI too old
for the V3 node API (before 0.3.75's ``comfy_api.latest``), a warning says so and no node is registered.

The pack's libraries, ``hypertransport_core``, ``hypertransport_comfy`` and ``hypertransport_world``, are imported by
their own names (the trainer, the tests and the nodes then share one copy of each class in a process): a finder on
``sys.meta_path`` resolves exactly those three names in the pack's folder (and ``trainer`` for the training command,
:func:`use_libraries`). The folder itself is not put on
``sys.path``, so its other folders (``nodes``, ``trainer``, ``tests`` ...) never shadow or collide with ComfyUI's
modules or another pack's; ComfyUI reaches ``nodes/`` as ``<pack>.nodes``. A copy of the libraries installed in the
environment comes first.
"""

import importlib.abc
import importlib.machinery
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBRARIES = ("hypertransport_core", "hypertransport_comfy", "hypertransport_world")


class _LibraryFinder(importlib.abc.MetaPathFinder):
    """Finds the given top-level folders of the pack by name (their submodules follow their package's path)."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.PathFinder.find_spec(fullname, [_HERE]) if fullname in self.names else None


def use_libraries(*folders: str) -> None:
    """Make the pack's libraries importable by name, and ``folders`` (top-level folders of the pack) too: the
    training command (``python trainer/train.py``) asks for ``"trainer"``; ComfyUI gets the libraries only."""
    have = set()
    for f in sys.meta_path:
        if type(f).__name__ == "_LibraryFinder":  # one finder per name, even if the pack is loaded twice
            have |= set(getattr(f, "names", _LIBRARIES))
    libraries, mine = set(_LIBRARIES) - have, set(folders) - have
    if libraries:  # after the path finders: a copy of the libraries installed in the environment comes first
        sys.meta_path.append(_LibraryFinder(libraries))
    if mine:  # first: the pack's own trainer/, not a package of that name installed in the environment
        sys.meta_path.insert(0, _LibraryFinder(mine))


use_libraries()

try:
    if not __package__:  # loaded by file path (the training command): only the finder is wanted
        raise ImportError
    import comfy_api.latest  # noqa: F401
except ImportError:
    comfy_entrypoint = None
    if __package__ and ("comfy" in sys.modules or "folder_paths" in sys.modules):  # a ComfyUI without the V3 node API
        logging.getLogger("HyperTransport").warning(
            "HyperTransport: this ComfyUI has no V3 node API (comfy_api.latest), so the HyperTransport nodes are not "
            "loaded. Update ComfyUI to 0.3.75 or newer (the pack's pyproject.toml says requires-comfyui >=0.3.75)."
        )
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = None
__all__ = ["comfy_entrypoint"]
