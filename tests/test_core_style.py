"""The core stays standalone (never imports ComfyUI), lint-clean, and small concept helpers behave."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from core_helpers import single_thread  # noqa: F401

import hypertransport_core
from hypertransport_core import Concept, HyperTransportError, combine_concepts

CORE = pathlib.Path(hypertransport_core.__file__).parent
ROOT = CORE.parent


def test_core_never_imports_comfy():
    pattern = re.compile(r"^\s*(import comfy|from comfy)", re.M)
    offenders = [p.name for p in CORE.glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
    code = "import sys, hypertransport_core; print(any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_public_api_is_exported():
    for name in hypertransport_core.__all__:
        assert hasattr(hypertransport_core, name), name
    assert issubclass(HyperTransportError, ValueError)
    assert (CORE / "py.typed").exists()


@pytest.mark.skipif(shutil.which("ruff") is None and not (pathlib.Path(sys.executable).parent / "ruff").exists(), reason="ruff not installed")
def test_ruff_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    files = [str(CORE), *map(str, sorted((ROOT / "tests").glob("test_core_*.py"))), str(ROOT / "tests" / "core_helpers.py")]
    out = subprocess.run([ruff, "check", *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _concept(seed, modality="text", fp="f1"):
    e = F.normalize(torch.randn(8, generator=torch.Generator().manual_seed(seed)), dim=0)
    return Concept(e, modality, {"arch": "a", "fingerprint": fp}, f"c{seed}")


def test_combine_concepts():
    a, b = _concept(0), _concept(1, "image")
    c = combine_concepts([(a, 1.0), (b, -0.5)])
    torch.testing.assert_close(c.embedding, F.normalize(a.embedding - 0.5 * b.embedding, dim=0))
    assert c.modality == "mixed" and c.parts == (("c0", "text", 1.0), ("c1", "image", -0.5))
    raw = combine_concepts([(a, 2.0)], normalize=False)
    torch.testing.assert_close(raw.embedding, 2 * a.embedding)
    assert combine_concepts([(a, 1.0), (_concept(2), 1.0)]).modality == "text"
    with pytest.raises(HyperTransportError, match="different encoders"):
        combine_concepts([(a, 1.0), (_concept(3, fp="f2"), 1.0)])
    with pytest.raises(HyperTransportError, match="cancel out"):
        combine_concepts([(a, 1.0), (a, -1.0)])
    with pytest.raises(HyperTransportError, match="at least one"):
        combine_concepts([])


def test_concept_validation():
    with pytest.raises(HyperTransportError, match="modality"):
        Concept(torch.ones(4), "audio", {})
    with pytest.raises(HyperTransportError, match="1-D"):
        Concept(torch.ones(2, 4), "text", {})
    with pytest.raises(HyperTransportError, match="NaN"):
        Concept(torch.tensor([1.0, float("nan")]), "text", {})
