"""Hostile input, in-process: the checks behind the server probes of ``test_server_hostile.py``, each on the code
path that would misbehave without it (a file choosing a loader, unbounded JSON, backtracking text parsing, folded
weights that overflow, a growing plan cache, a NaN mask, a steering no file could hold, a hash read whole)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from hypertransport_core.errors import HyperTransportError

WORLD_HYPERNET = Path(__file__).resolve().parents[1] / "hypertransport_world" / "weights" / "world_hypernet.safetensors"


# ------------------------------------------------------------------- encoder architecture ---
@pytest.mark.parametrize("arch", ["hf-hub:laion/evil", "local-dir:/tmp/x", "../x", "a/b", "", "x" * 101, None, 7])
def test_a_loader_or_path_is_never_an_architecture(arch):
    from hypertransport_core.encoders import check_arch, check_arch_name

    for check in (check_arch_name, check_arch):
        with pytest.raises(HyperTransportError, match="not a plain open_clip model name.*Fix"):
            check(arch)


def test_registered_configs_may_not_load_tokenizers_or_models():
    import open_clip
    from open_clip import factory

    from hypertransport_core.encoders import check_arch, shipped_archs, tokenizer_for
    from hypertransport_world import world_clip

    world_clip.register()
    assert check_arch(world_clip.MODEL_NAME) == world_clip.MODEL_NAME
    assert type(tokenizer_for(world_clip.MODEL_NAME, 16)).__name__ == "SimpleTokenizer"
    assert "ViT-B-32" in shipped_archs() and check_arch("ViT-B-32") == "ViT-B-32"
    for key, val in (("hf_tokenizer_name", "someone/evil"), ("tokenizer_kwargs", {"trust_remote_code": True}),
                     ("hf_model_name", "someone/evil")):
        factory._MODEL_CONFIGS["ht-test-evil"] = {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {key: val}}
        try:
            assert "ht-test-evil" in open_clip.list_models()
            with pytest.raises(HyperTransportError, match=f"text_cfg.{key}.*Fix"):
                tokenizer_for("ht-test-evil")
        finally:
            del factory._MODEL_CONFIGS["ht-test-evil"]


def test_a_hypernet_naming_a_loader_is_refused_at_load(tmp_path):
    from hypertransport_core.files import load_hypernet, read_header, save_hypernet

    hn = load_hypernet(str(WORLD_HYPERNET))
    hn.encoder = {**hn.encoder, "arch": "local-dir:/tmp/evil"}
    p = str(tmp_path / "evil.safetensors")
    save_hypernet(p, hn)
    with pytest.raises(HyperTransportError, match="metadata key 'encoder'.*not a plain open_clip model name"):
        read_header(p)


# ------------------------------------------------------------------------- bounded headers ---
def _raw_file(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize("header,expect", [
    (b"[" * 5000 + b"]" * 5000, "JSON nested more than"),
    (b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5001 + b'], "data_offsets": [0, 4]}}', "a number of 5001"),
    (b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "the non-JSON constant NaN"),
])
def test_headers_are_parsed_within_bounds(tmp_path, header, expect):
    from hypertransport_core.tensorfile import read_layout

    with pytest.raises(HyperTransportError, match=f"not bounded JSON: {expect}.*Fix"):
        read_layout(_raw_file(tmp_path / "bad.safetensors", header, b"\0" * 4))


def test_metadata_values_are_parsed_within_bounds(tmp_path):
    from hypertransport_core.files import read_header
    from hypertransport_core.tensorfile import write_tensors

    base = {"format": "hypertransport.steering", "model_family": "sd15", "sites": "[]"}
    for key, val in (("format_version", "1" + "0" * 5000), ("sites", "[" * 5000 + "]" * 5000)):
        p = str(tmp_path / f"{key}.safetensors")
        write_tensors(p, {"w": torch.ones(1), "b": torch.zeros(1)}, {**base, "format_version": "2", key: val})
        with pytest.raises(HyperTransportError, match=f"metadata key '{key}' is not valid JSON.*Fix"):
            read_header(p)


def test_a_wrong_hash_is_refused_before_any_tensor_is_allocated(tmp_path, monkeypatch):
    import hypertransport_core.tensorfile as TF

    p = str(tmp_path / "h.safetensors")
    TF.write_tensors(p, {"w": torch.ones(1000)}, {"k": "v"})
    raw = bytearray(open(p, "rb").read())
    raw[-1] ^= 0x40  # one flipped bit in the last tensor byte
    open(p, "wb").write(bytes(raw))

    def no_allocation(*a, **kw):
        raise AssertionError("a tensor was allocated before the hash was checked")

    monkeypatch.setattr(TF.torch, "empty", no_allocation)
    with pytest.raises(HyperTransportError, match="content hash mismatch.*Fix"):
        TF.read_tensors(TF.read_layout(p))


def test_content_hash_is_the_one_written(tmp_path):
    from hypertransport_core.tensorfile import HASH_KEY, content_hash, read_layout, write_tensors

    p = str(tmp_path / "h.safetensors")
    write_tensors(p, {"a": torch.arange(10.0), "b": torch.ones(3, 2, dtype=torch.float16)}, {"k": "v"})
    layout = read_layout(p)
    assert content_hash(layout) == layout.metadata[HASH_KEY]


# ---------------------------------------------------------------------------- text inputs ---
@pytest.mark.parametrize("text", ["(" + ":" * 2000, "*" * 1999 + " y", "(" + ": " * 999 + ")", "a * " + "1" * 1990 + "x"])
def test_concept_text_is_capped_before_parsing(pack, text):
    parse = pack.nodes.inputs.parse_concepts
    with pytest.raises(HyperTransportError, match="more than the 2,000"):
        parse(text * 600)  # > 1 MB: refused by its length (the server test times the event loop meanwhile)


@pytest.mark.parametrize("text,want", [
    ("watercolor", [("watercolor", 1.0)]),
    ("watercolor * 0.7\nautumn*-1", [("watercolor", 0.7), ("autumn", -1.0)]),
    ("a ** 2", [("a *", 2.0)]),
    ("a * b c", [("a * b c", 1.0)]),
    ("(red: 1.2 )", None),
    ("red * abc", "not a number"),
    ("red * nan", "not a number"),
    ("red * 1e39", "outside"),
])
def test_concept_text_meaning_is_kept(pack, text, want):
    parse = pack.nodes.inputs.parse_concepts
    if want is None:
        with pytest.raises(HyperTransportError, match="prompt emphasis"):
            parse(text)
    elif isinstance(want, str):
        with pytest.raises(HyperTransportError, match=want):
            parse(text)
    else:
        assert parse(text) == want


# -------------------------------------------------------------------------- folded weights ---
def _steering_for(dm, w: float, b: float):
    from hypertransport_core import list_sites
    from hypertransport_core.interventions import Steering

    sites = list_sites(dm, form="elementwise")
    n = sum(s.channels for s in sites)
    return Steering(tuple(sites), torch.full((n,), w), torch.full((n,), b), {"family": "sd15", "label": "x"})


def test_folded_float16_overflow_is_refused_before_sampling(comfy, pack):
    P = pack.nodes.patching
    model = comfy.tiny_sd15(dtype=torch.float16)
    st = _steering_for(model.model.diffusion_model, 1.0, 1e4)
    with pytest.raises(HyperTransportError, match=r"torch.float16.*65504.*Fix"):
        P.attach(model, [(st, 7.0)], mode="folded", label="Apply Steering (Advanced)")
    P.attach(model, [(st, 6.0)], mode="folded", label="Apply Steering (Advanced)")  # 6e4 fits float16: folded


def test_folded_chain_is_bounded_and_outputs_checked(comfy, pack):
    P = pack.nodes.patching
    model = comfy.tiny_sd15()
    st = _steering_for(model.model.diffusion_model, 100.0, 0.0)
    m1 = P.attach(model, [(st, 1.0)], mode="folded", label="node 1")
    m2 = P.attach(m1, [(st, 1.0)], mode="folded", label="node 2")  # 1e4: at the bound
    with pytest.raises(HyperTransportError, match="with the 2 folded steering.s. before it.*1e\\+06.*Fix"):
        P.attach(m2, [(st, 1.0)], mode="folded", label="node 3")
    checks = [w for w in m1.get_wrappers(P._wrappers_mp(), P.WRAPPER_KEY) if isinstance(w, P.FoldedOutputCheck)]
    assert len(checks) == 1 and not P.wrappers_of(m1)  # a check, no hooks
    t = torch.ones(1)
    assert checks[0](lambda x, t: x, torch.ones(2), t) is not None
    with pytest.raises(HyperTransportError, match="produced NaN/Inf"):
        checks[0](lambda x, t: x * float("nan"), torch.ones(2), t)


def test_ramp_plans_are_bounded(comfy, pack):
    P = pack.nodes.patching
    model = comfy.tiny_sd15()
    st = _steering_for(model.model.diffusion_model, 1.5, 0.1)
    w = P.SteeringWrapper([(st, (1.0,) * 16)], ramp="ease in", per_image=16)
    full = w.plan
    for i in range(60):
        w.plan_for(i / 59)
    assert len(w._plans) <= P.RAMP_PLANS and w.plan is full
    a = w.plan_for(0.5).maps
    b = P.SteeringPlan.compile([(st, (0.5,) * 16)]).maps
    assert all(torch.equal(a[k].a, b[k].a) and torch.equal(a[k].c, b[k].c) for k in a)  # still the right plan


# -------------------------------------------------------------------------- smaller points ---
def test_nan_mask_is_refused_as_a_mask(comfy, pack):
    D = pack.nodes.definitions
    model = comfy.tiny_sd15()
    st = _steering_for(model.model.diffusion_model, 1.5, 0.1)
    mask = torch.ones(8, 8)
    mask[0, 0] = float("nan")
    with pytest.raises(HyperTransportError, match="the mask holds NaN/Inf.*Fix"):
        D.ApplySteeringAdvanced.execute(model, st, 1.0, start_percent=0.0, end_percent=1.0, mode="hooks", rows="all",
                                        block_strengths="", mask=mask)


def test_a_steering_no_file_could_hold_is_not_saved(tmp_path):
    from hypertransport_core.files import MAX_ABS_VALUE, save_steering
    from hypertransport_core.interventions import Steering
    from hypertransport_core.sites import Site

    site = Site(name="x", module="x", channels=4, channel_dim=1, form="elementwise")
    p = tmp_path / "s.safetensors"
    with pytest.raises(HyperTransportError, match="Load Steering would refuse the file.*Fix"):
        save_steering(str(p), Steering((site,), torch.full((4,), MAX_ABS_VALUE + 1), torch.zeros(4), {}))
    assert not p.exists()


@pytest.mark.parametrize("prefix", [".", ".hidden", "sub/.x", "a\x00b", "x" * 5000, "/abs", "../up", "a//b", "a:b"])
def test_save_steering_prefix_is_checked(pack, prefix):
    with pytest.raises(HyperTransportError, match="Fix"):
        pack.nodes.definitions.check_prefix(prefix)


@pytest.mark.parametrize("prefix", ["steering", "styles/watercolor", " spaced name "])
def test_save_steering_prefix_plain_names_pass(pack, prefix):
    assert pack.nodes.definitions.check_prefix(prefix) == prefix.strip()


def test_learning_rate_above_one_is_refused_with_its_fix():
    from trainer.config import TrainConfig

    with pytest.raises(HyperTransportError, match=r"--lr=1000000.0: must be in \(0, 1\]"):
        TrainConfig(lr=1e6).check()


def test_command_line_files_and_overrides_give_the_fix(tmp_path):
    from trainer.config import load_config_file, parse_overrides

    for name, text in (("bad.json", "{oops"), ("bad.toml", "steps = = 3"), ("list.json", "[1, 2]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(HyperTransportError, match="Fix"):
            load_config_file(str(tmp_path / name))
    with pytest.raises(HyperTransportError, match="'abc' is not a int.*Fix"):
        parse_overrides(["steps=abc"])


def test_optimizer_flags_and_shapes_in_a_checkpoint_must_be_this_runs():
    from trainer.checkpoint import _param_groups_problem

    live = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]).param_groups
    good = json.loads(json.dumps(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2)),
                                                    torch.nn.Parameter(torch.zeros(3))]).state_dict()["param_groups"]))
    assert _param_groups_problem(good, live) is None
    for change, expect in ((dict(maximize=True), "maximize=True"), (dict(amsgrad=True), "amsgrad=True"),
                           (dict(eps=[1e-8]), "expected a number"), (dict(params=[1, 0]), "as its parameters"),
                           (dict(params=[0, 0]), "as its parameters"), (dict(betas=[0.9, 1.0]), "out of range")):
        bad = [{**good[0], **change}]
        assert expect in (_param_groups_problem(bad, live) or ""), change
