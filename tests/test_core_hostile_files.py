"""Hostile and damaged files: every one is refused with a clear error before anything is allocated from it.

Memory is measured in a subprocess with a bounded address space, so a regression fails the test instead of
exhausting the machine.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from core_helpers import single_thread  # noqa: F401

from ht_devkit.server import with_metadata
from hypertransport_core import (
    HyperNet,
    HyperNetConfig,
    HyperTransportError,
    Site,
    Steering,
    load_hypernet,
    load_steering,
)
from hypertransport_core.files import MAX_ABS_VALUE, read_header, save_hypernet, save_steering
from hypertransport_core.tensorfile import MAX_HEADER_BYTES, read_layout, write_tensors

ENC = {"arch": "ht-tiny", "fingerprint": "0123456789abcdef", "embed_dim": 16}
SITES = [Site("a.norm", "a.norm", 8, 1, "elementwise"), Site("b@1", "b", 6, -1, "pooled", 1), Site("c", "c", 4)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hypernet(seed=0, **cfg):
    torch.manual_seed(seed)
    hn = HyperNet(HyperNetConfig(embed_dim=16, hidden=12, rank=3, **cfg), SITES, family="flux", encoder=ENC)
    with torch.no_grad():
        for p in hn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hn


def _raw_file(path, header: dict, data: bytes = b"") -> str:
    body = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)
    return str(path)


def _meta_of(path) -> dict:
    return dict(read_layout(path).metadata)


@pytest.fixture
def hn_file(tmp_path):
    p = str(tmp_path / "hn.safetensors")
    save_hypernet(p, _hypernet(), training={"steps": 1})
    return p


@pytest.fixture
def st_file(tmp_path):
    p = str(tmp_path / "st.safetensors")
    save_steering(p, Steering(tuple(SITES), torch.ones(18), torch.zeros(18), {"label": "x", "family": "flux"}))
    return p


# ------------------------------------------------------------------------- header and budget ---
@pytest.mark.parametrize("arch, message", [
    ({"hidden": 1024, "depth": 500, "rank": 3}, "'depth' is 500.*from 1 to 16"),
    ({"hidden": 1024, "depth": 1_000_000, "rank": 3}, "'depth' is 1000000"),
    ({"hidden": 8192, "depth": 16, "rank": 3}, "implies 1,0.*parameters, more than the 400,000,000 allowed"),
    ({"hidden": 12, "depth": 1.5, "rank": 3}, "'depth' is 1.5; a valid file has an integer"),
    ({"hidden": 12, "depth": True, "rank": 3}, "'depth' is True"),
    ({"hidden": -4, "depth": 1, "rank": 3}, "'hidden' is -4"),
    ([1, 2], "'arch' must be a JSON object"),
    ({"hidden": 12, "depth": 1, "rank": 3, "text_templates": "a {}"}, "'text_templates': expected a list"),
    ({"hidden": 12, "depth": 1, "rank": 3, "text_templates": ["a {}"] * 65}, "'text_templates': expected a list of at most 64"),
    ({"hidden": 12, "depth": 1, "rank": 3, "text_templates": ["{0.__class__}"]}, "is not a template"),
    ({"hidden": 12, "depth": 1, "rank": 3, "text_templates": ["a {} {}"]}, "is not a template"),
    ({"hidden": 12, "depth": 1, "rank": 3, "text_templates": ["x" * 300 + "{}"]}, "is not a template"),
    ({"hidden": 12, "depth": 1, "rank": 3, "text_templates": [7]}, "is not a template"),
])
def test_config_checked_before_anything_is_built(hn_file, tmp_path, arch, message):
    p = with_metadata(hn_file, tmp_path / "big.safetensors", arch=arch)
    with pytest.raises(HyperTransportError, match=message):
        load_hypernet(p)


def test_trunk_tensors_must_match_the_recorded_depth(hn_file, tmp_path):
    # a header claiming three trunk layers over a file holding two: refused from the header
    p = with_metadata(hn_file, tmp_path / "deep.safetensors", arch={"hidden": 12, "depth": 3, "rank": 3, "dropout": 0.0})
    with pytest.raises(HyperTransportError, match=r"tensor 'trunk.6.(weight|bias)' is missing \(.* expected from its config"):
        load_hypernet(p)


LOAD_IN_SMALL_ADDRESS_SPACE = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    import torch  # noqa: F401  (imported before the limit: its own mappings are large)
    from hypertransport_core import HyperTransportError, load_hypernet
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    import psutil
    vms = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vms + 300 * 2**20, hard))  # 300 MB more than now
    try:
        load_hypernet({path!r})
    except HyperTransportError as e:
        print("REFUSED", e)
    except MemoryError:
        print("MEMORYERROR")
    print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
""")


@pytest.mark.parametrize("arch", [{"hidden": 1024, "depth": 500, "rank": 3}, {"hidden": 8192, "depth": 16, "rank": 512}])
def test_hostile_config_is_refused_in_a_small_address_space(hn_file, tmp_path, arch):
    p = with_metadata(hn_file, tmp_path / "hostile.safetensors", arch=arch)
    code = LOAD_IN_SMALL_ADDRESS_SPACE.format(repo=REPO, path=p)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in out.stdout, out.stdout + out.stderr
    growth = int(out.stdout.split("GROWTH_KB")[1])
    assert growth < 50_000, growth  # refused from the header: no big allocation


def test_huge_header_length_is_refused_before_reading(tmp_path):
    p = tmp_path / "h.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{" + b" " * 64)
        f.seek(MAX_HEADER_BYTES + 200)
        f.write(b"}")
    with pytest.raises(HyperTransportError, match="header length .* is not at most"):
        load_hypernet(str(p))


def test_sparse_file_with_a_lying_header_is_refused_unread(tmp_path):
    """A 2 GB sparse file whose header describes 16 bytes: the size check refuses it without reading it."""
    p = tmp_path / "sparse.safetensors"
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    _raw_file(p, header)
    with open(p, "r+b") as f:
        f.truncate(2 * 2**30)
    with pytest.raises(HyperTransportError, match="file size: expected .* bytes .*found 2147483648 bytes"):
        read_layout(str(p))


@pytest.mark.parametrize("header, message", [
    ({"__metadata__": [1, 2]}, "metadata must map strings to strings, found list"),
    ({"__metadata__": {"format": 5}}, "metadata must map strings to strings"),
    ({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, "dtype: expected one of .*found I64"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "lacks a dtype, shape or offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, "byte range: expected 8 bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
     "gap or overlap"),
    ([1, 2, 3], "header is a JSON list, not an object"),
])
def test_malformed_headers(tmp_path, header, message):
    p = _raw_file(tmp_path / "m.safetensors", header, b"\0" * 16)
    with pytest.raises(HyperTransportError, match=message):
        load_steering(p)


@pytest.mark.parametrize("field, value, message", [
    ("channel_dim", 7, "'channel_dim' must be 1 .* or -1"),
    ("form", "sideways", "'form' must be one of"),
    ("output_index", -1, "'output_index' must be null or an integer from 0 to 15"),
    ("channels", "8", "'channels' must be an integer from 1 to 65536"),
    ("channels", 0, "'channels' must be an integer"),
    ("channels", 10**9, "'channels' must be an integer"),
    ("name", "", "'name' must be a non-empty string"),
])
def test_site_fields_are_validated(st_file, tmp_path, field, value, message):
    sites = [s.to_dict() for s in SITES]
    sites[0][field] = value
    p = with_metadata(st_file, tmp_path / "s.safetensors", sites=sites)
    with pytest.raises(HyperTransportError, match=message):
        load_steering(p)


def test_duplicate_and_too_many_sites(st_file, tmp_path):
    sites = [s.to_dict() for s in SITES]
    p = with_metadata(st_file, tmp_path / "d.safetensors", sites=sites + sites[:1])
    with pytest.raises(HyperTransportError, match="lists site 'a.norm' twice"):
        load_steering(p)
    many = [{"name": f"s{i}", "channels": 1} for i in range(5000)]
    p = with_metadata(st_file, tmp_path / "many.safetensors", sites=many)
    with pytest.raises(HyperTransportError, match="5000 sites, more than the 4096 allowed"):
        load_steering(p)


# --------------------------------------------------------------------- values and content hash ---
def _flip_byte(path, offset_from_end: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)[0]
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b ^ mask]))


def test_one_flipped_byte_is_refused_by_the_content_hash(hn_file):
    _flip_byte(hn_file, 10, 0x01)  # a low mantissa bit: still a small finite number
    with pytest.raises(HyperTransportError, match="content hash mismatch .*Fix: copy or download it again"):
        load_hypernet(hn_file)


def test_flipped_exponent_bit_is_refused_by_magnitude(st_file):
    _flip_byte(st_file, 1, 0x7E)  # the last float's exponent byte: ~1e37 or similar
    with pytest.raises(HyperTransportError, match="(magnitude .* beyond the 10000|NaN/Inf|content hash)"):
        load_steering(st_file)


def test_float64_beyond_float32_is_refused(tmp_path):
    w = torch.ones(18, dtype=torch.float64)
    w[3] = 1e300  # finite as float64, inf as float32
    meta = {"format": "hypertransport.steering", "format_version": "2", "model_family": '"flux"',
            "sites": json.dumps([s.to_dict() for s in SITES])}
    p = str(tmp_path / "f64.safetensors")
    write_tensors(p, {"w": w, "b": torch.zeros(18, dtype=torch.float64)}, meta)
    with pytest.raises(HyperTransportError, match="tensor 'w' holds NaN/Inf"):
        load_steering(p)


def test_large_finite_value_is_refused(tmp_path):
    b = torch.zeros(18)
    b[2] = 3e38
    p = str(tmp_path / "big.safetensors")
    with pytest.raises(HyperTransportError, match="Load Steering would refuse the file"):  # never written by us
        save_steering(p, Steering(tuple(SITES), torch.ones(18), b, {"family": "flux"}))
    save_steering(p, Steering(tuple(SITES), torch.ones(18), torch.zeros(18), {"family": "flux"}))
    from hypertransport_core.tensorfile import HASH_KEY, write_tensors

    meta = {k: v for k, v in read_layout(p).metadata.items() if k != HASH_KEY}
    write_tensors(p, {"w": torch.ones(18), "b": b}, meta)  # a hostile file: valid hash, huge value
    with pytest.raises(HyperTransportError, match=f"magnitude 3e\\+38, beyond the {MAX_ABS_VALUE:g}"):
        load_steering(p)


def test_half_precision_files_load_as_float32(tmp_path):
    hn = HyperNet(HyperNetConfig(embed_dim=16, hidden=256, rank=8), SITES, family="flux", encoder=ENC)
    p = str(tmp_path / "half.safetensors")
    save_hypernet(p, hn, dtype=torch.float16)
    assert {r.dtype for r in read_layout(p).tensors.values()} == {"F16"}
    loaded = load_hypernet(p)
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
    for k, v in hn.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.half().float(), rtol=0, atol=0)
    full = str(tmp_path / "full.safetensors")
    save_hypernet(full, hn)
    assert os.path.getsize(p) < 0.6 * os.path.getsize(full)


def test_saving_refuses_non_finite_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "keep.safetensors"
    save_hypernet(str(p), _hypernet())
    before = p.read_bytes()
    bad = _hypernet()
    with torch.no_grad():
        bad.offset_w[0] = float("nan")
    with pytest.raises(HyperTransportError, match="refusing to save keep.safetensors: tensor 'offset_w' holds NaN/Inf"):
        save_hypernet(str(p), bad)
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


def test_version_1_files_without_a_hash_still_load_with_a_warning(hn_file, tmp_path, caplog):
    meta = _meta_of(hn_file)
    p = with_metadata(hn_file, tmp_path / "v1.safetensors", format_version=1)
    with open(p, "rb") as f:  # drop the hash, as version 1 files have none
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    del header["__metadata__"]["sha256"]
    _raw_file(p, header, data)
    assert "sha256" in meta
    loaded = load_hypernet(p)
    assert loaded.sites == tuple(SITES)
    assert "saved before content hashes" in caplog.text
    v2 = with_metadata(p, tmp_path / "v2nohash.safetensors", format_version=2)
    with pytest.raises(HyperTransportError, match="'sha256' .* is missing"):
        load_hypernet(v2)


def test_peak_memory_of_loading_stays_near_the_tensor_size(tmp_path):
    """A 32 MB (float32) hypernet loads with a peak of at most its size plus a fixed margin (no memory map,
    no second copy); the float16 file of the same hypernet at most twice its own size plus the margin."""
    sites = [Site(f"s{i}", f"s{i}", 4096) for i in range(8)]
    hn = HyperNet(HyperNetConfig(embed_dim=64, hidden=256, rank=120), sites)
    for dtype, name in ((torch.float32, "f32"), (torch.float16, "f16")):
        p = str(tmp_path / f"{name}.safetensors")
        save_hypernet(p, hn, dtype=dtype)
        tensor_bytes = read_layout(p).tensor_bytes
        code = textwrap.dedent(f"""
            import resource, sys
            sys.path.insert(0, {REPO!r})
            import torch
            from hypertransport_core import load_hypernet
            import hypertransport_core.files  # noqa: F401
            torch.zeros(1)
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hn = load_hypernet({p!r})
            print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        growth = int(out.stdout.split()[-1]) * 1024
        factor = 1 if dtype == torch.float32 else 2
        assert growth < factor * tensor_bytes + 24 * 2**20, (name, growth, tensor_bytes)


@pytest.mark.parametrize("mean,std", [(["x", 0, 0], [1, 1, 1]), ([0.5] * 3, [0, 1, 1]), ([0.5] * 2, [1] * 2),
                                      ([1e300] * 3, [1] * 3), ([0.5] * 3, None), ([True, 0, 0], [1] * 3)])
def test_encoder_normalization_is_checked_in_the_header(tmp_path, mean, std):
    """The image normalization a hypernet records (what the nodes' open_clip path applies) is three plain numbers each."""
    enc = {**ENC, "image_mean": mean, "image_std": std}
    hn = HyperNet(HyperNetConfig(embed_dim=16, hidden=12, rank=3), SITES, family="flux", encoder=enc)
    path = str(tmp_path / "norm.safetensors")
    save_hypernet(path, hn)
    with pytest.raises(HyperTransportError, match="image_mean .* Fix: re-save"):
        read_header(path)


def test_encoder_normalization_round_trips(tmp_path):
    from hypertransport_core.encoders import normalization_of

    enc = {**ENC, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    path = str(tmp_path / "ok.safetensors")
    save_hypernet(path, HyperNet(HyperNetConfig(embed_dim=16, hidden=12, rank=3), SITES, family="flux", encoder=enc))
    assert normalization_of(read_header(path)["encoder"]) == ((0.5,) * 3, (0.5,) * 3)
    assert normalization_of(ENC) == (None, None)  # a file saved before the normalization was recorded
