"""The file format: safetensors only, round trips bit for bit, and every bad file refused with a clear message."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from core_helpers import single_thread  # noqa: F401
from safetensors import safe_open
from safetensors.torch import save_file

import hypertransport_core.files as files
from hypertransport_core import (
    HyperNet,
    HyperNetConfig,
    HyperTransportError,
    Site,
    Steering,
    load_hypernet,
    load_steering,
    read_header,
    save_hypernet,
    save_steering,
)

ENC = {"arch": "ht-tiny", "fingerprint": "0123456789abcdef", "embed_dim": 16}
SITES = [Site("a.norm", "a.norm", 8, 1, "elementwise"), Site("b@1", "b", 6, -1, "pooled", 1), Site("c", "c", 4)]


def _hypernet(seed=0):
    torch.manual_seed(seed)
    hn = HyperNet(HyperNetConfig(embed_dim=16, hidden=12, rank=3), SITES, family="flux", encoder=ENC)
    with torch.no_grad():
        for p in hn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        hn.mean_text.normal_()
    return hn


def _steering():
    g = torch.Generator().manual_seed(1)
    return Steering(tuple(SITES), 1 + torch.randn(18, generator=g), torch.randn(18, generator=g),
                    {"label": "watercolor", "family": "flux", "encoder": ENC, "modality": "text", "fit": {"steps": 3}})


def _is_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        first = f.read(1)
    return first == b"{" and n < os.path.getsize(path)


def _rewrite(src, dst, meta_update=None, drop=(), tensors_update=None, rehash=False):
    """Copy a file with altered metadata/tensors (a hand-made bad file); ``rehash``: with a content hash that matches
    the altered content, as a hostile file would carry (so a check other than the hash must refuse it)."""
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_update or {})
    for k in drop:
        meta.pop(k)
    tensors.update(tensors_update or {})
    if rehash:
        from hypertransport_core.tensorfile import HASH_KEY, write_tensors

        meta.pop(HASH_KEY, None)
        write_tensors(dst, tensors, meta, check_finite=False)
        return dst
    save_file(tensors, dst, metadata=meta)
    return dst


@pytest.fixture
def hn_file(tmp_path):
    p = str(tmp_path / "hn.safetensors")
    save_hypernet(p, _hypernet(), training={"steps": 5, "loss": 0.25})
    return p


@pytest.fixture
def st_file(tmp_path):
    p = str(tmp_path / "st.safetensors")
    save_steering(p, _steering())
    return p


def test_hypernet_round_trip_bit_identical(hn_file):
    hn = _hypernet()
    assert _is_safetensors(hn_file)
    loaded = load_hypernet(hn_file)
    assert loaded.sites == hn.sites and loaded.family == "flux" and loaded.encoder == ENC
    assert loaded.config == hn.config and loaded.training_summary == {"steps": 5, "loss": 0.25}
    sd, lsd = hn.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys()
    assert all(torch.equal(sd[k], lsd[k]) for k in sd)
    e = torch.randn(2, 16)
    assert torch.equal(hn.eval()(e)[0], loaded(e)[0])
    meta = read_header(hn_file)
    assert meta["format"] == files.HYPERNET and meta["format_version"] == 2 and meta["embed_dim"] == 16
    assert meta["tensors"]["channel_w"] == (18, 3)


def test_steering_round_trip_bit_identical(st_file):
    st = _steering()
    assert _is_safetensors(st_file)
    loaded = load_steering(st_file)
    assert loaded.sites == st.sites
    assert torch.equal(loaded.w, st.w) and torch.equal(loaded.b, st.b)
    assert loaded.meta == st.meta
    with pytest.raises(HyperTransportError, match="holds 2 concepts' maps.*a steering file holds one. Fix: save each"):
        save_steering(st_file, Steering(tuple(SITES), torch.ones(2, 18), torch.zeros(2, 18)))


@pytest.mark.parametrize("content", [os.urandom(256), b"hello, this is a text file\n" * 10, b"", b"1234", b"\x80\x04\x95pickle"])
def test_not_a_safetensors_file(tmp_path, content):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(HyperTransportError, match=r"bad\.safetensors: is not a safetensors file.*Fix"):
        load_hypernet(str(p))


def test_header_json_without_tensor_records(tmp_path):
    p = tmp_path / "odd.safetensors"
    body = json.dumps({"x": 1}).encode()
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(HyperTransportError, match="odd.safetensors.*Fix"):
        read_header(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(HyperTransportError, match="nothere.safetensors: no such HyperTransport file.*Fix"):
        load_steering(str(tmp_path / "nothere.safetensors"))


def test_truncated_file(hn_file):
    data = open(hn_file, "rb").read()
    with open(hn_file, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(HyperTransportError, match=rf"file size: expected {len(data)} bytes.*found {len(data) - 100} bytes.*Fix"):
        load_hypernet(hn_file)


def test_wrong_format_version(hn_file, tmp_path):
    newer = _rewrite(hn_file, str(tmp_path / "v3.safetensors"), {"format_version": "3"})
    with pytest.raises(HyperTransportError, match=r"'format_version': expected one of \(1, 2\), found 3. Fix: update"):
        load_hypernet(newer)
    older = _rewrite(hn_file, str(tmp_path / "v0.safetensors"), {"format_version": "0"})
    with pytest.raises(HyperTransportError, match=r"expected one of \(1, 2\), found 0. Fix: re-save"):
        load_hypernet(older)
    not_int = _rewrite(hn_file, str(tmp_path / "v2s.safetensors"), {"format_version": '"2"'})
    with pytest.raises(HyperTransportError, match="found 2. Fix: re-save"):
        load_hypernet(not_int)


@pytest.mark.parametrize("key", ["sites", "encoder", "arch", "format_version"])
def test_missing_metadata_key(hn_file, tmp_path, key):
    p = _rewrite(hn_file, str(tmp_path / "m.safetensors"), drop=(key,))
    with pytest.raises(HyperTransportError, match=f"metadata key '{key}' is missing.*Fix"):
        load_hypernet(p)


def test_metadata_not_json_and_not_ours(st_file, tmp_path):
    p = _rewrite(st_file, str(tmp_path / "j.safetensors"), {"sites": "[{oops"})
    with pytest.raises(HyperTransportError, match="'sites' is not valid JSON"):
        load_steering(p)
    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(3)}, plain)  # a safetensors file, but no HyperTransport metadata
    with pytest.raises(HyperTransportError, match="metadata key 'format': expected one of.*found None.*Fix"):
        load_steering(plain)


def test_tensor_shape_mismatch_with_recorded_sites(st_file, hn_file, tmp_path):
    p = _rewrite(st_file, str(tmp_path / "s.safetensors"), tensors_update={"w": torch.ones(20), "b": torch.zeros(20)})
    with pytest.raises(HyperTransportError, match=r"tensor 'w' shape: expected \(18,\) \(from 3 recorded sites\), found \(20,\)"):
        load_steering(p)
    fewer = json.dumps([s.to_dict() for s in SITES[:2]])
    p = _rewrite(hn_file, str(tmp_path / "h.safetensors"), {"sites": fewer})
    with pytest.raises(HyperTransportError, match="shape: expected .*from 2 recorded sites"):
        load_hypernet(p)
    p = _rewrite(hn_file, str(tmp_path / "t.safetensors"), tensors_update={"trunk.0.weight": torch.zeros(12, 17)})
    with pytest.raises(HyperTransportError, match="trunk.0.weight.*Fix"):
        load_hypernet(p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_values(st_file, hn_file, tmp_path, bad):
    w = torch.ones(18)
    w[5] = bad
    p = _rewrite(st_file, str(tmp_path / "n.safetensors"), tensors_update={"w": w}, rehash=True)
    with pytest.raises(HyperTransportError, match="tensor 'w' holds NaN/Inf.*Fix"):
        load_steering(p)
    cw = torch.zeros(18, 3)
    cw[0, 0] = bad
    p = _rewrite(hn_file, str(tmp_path / "hn_nan.safetensors"), tensors_update={"channel_w": cw}, rehash=True)
    with pytest.raises(HyperTransportError, match="'channel_w' holds NaN/Inf"):
        load_hypernet(p)


def test_wrong_kind(st_file, hn_file):
    with pytest.raises(HyperTransportError, match="st.safetensors: metadata key 'format': expected 'hypertransport.hypernet', "
                       "found 'hypertransport.steering'. Fix: use Load HyperNet"):
        load_hypernet(st_file)
    with pytest.raises(HyperTransportError, match="found 'hypertransport.hypernet'"):
        load_steering(hn_file)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")  # half-written temp file
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_steering(str(target), _steering())
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    save_hypernet(str(target), _hypernet())
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError):
        save_hypernet(str(target), _hypernet(seed=9))
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert target.read_bytes() == before
    assert load_hypernet(str(target)).sites == tuple(SITES)


def test_saved_file_permissions_follow_umask(tmp_path):
    p = tmp_path / "perm.safetensors"
    save_steering(str(p), _steering())
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)
