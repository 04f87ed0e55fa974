"""Shared fixtures. ComfyUI fixtures skip (with the reason) when no ComfyUI tree is found.

* ``comfy``: ComfyUI imported in-process on the CPU, its base directory a session temp folder
  (so ``folder_paths`` finds the test's model files); returns the dev kit :mod:`ht_devkit`.
* ``pack``: this repository imported as a custom-node package, as ComfyUI does.
* ``encoder``: a tiny random open_clip encoder written to the temp ``models/clip``.
* ``make_hypernet``: writes a random-but-nonzero hypernet for a model into ``models/hypertransport``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # hypertransport_core; appended so ComfyUI's `nodes` keeps precedence
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ht_devkit  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny test models are far faster on one thread, and the machine's cores are shared: oversubscribed
# BLAS threads made a 25 ms sample take a second. HT_TEST_THREADS overrides.
try:
    import torch

    torch.set_num_threads(int(os.environ.get("HT_TEST_THREADS", "1")))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy_inprocess_base")


@pytest.fixture(scope="session")
def comfy(comfy_base):
    if ht_devkit.find_comfyui() is None:
        pytest.skip(ht_devkit.MISSING)
    ht_devkit.setup_comfy(base_directory=comfy_base)
    import folder_paths

    assert Path(folder_paths.models_dir) == comfy_base / "models", (
        "folder_paths was imported before the test base directory was set"
    )
    return ht_devkit


@pytest.fixture(scope="session")
def pack(comfy):
    return comfy.load_pack()


@pytest.fixture(scope="session")
def encoder(comfy, comfy_base):
    enc = comfy.write_tiny_encoder(comfy_base)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    return enc


@pytest.fixture(scope="session")
def make_hypernet(comfy, comfy_base, encoder):
    """``make_hypernet(patcher, name, **kw) -> file name`` (kw: family, form, seed, scale)."""
    import folder_paths

    def make(patcher, name, **kw):
        comfy.write_hypernet(comfy_base, name, patcher.model.diffusion_model, encoder.identity, **kw)
        folder_paths.filename_list_cache.clear()
        return name

    return make


@pytest.fixture(scope="session")
def comfy_server(comfy, tmp_path_factory):
    """ONE real ComfyUI server for every end-to-end test: this pack symlinked into its custom_nodes,
    random model files, hypernets and images under a throw-away --base-directory."""
    base = tmp_path_factory.mktemp("comfy_server_base")
    names = comfy.prepare_server_base(base)
    server = comfy.Server(base)
    server.names = names
    yield server
    server.stop()
