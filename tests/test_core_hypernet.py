"""The hypernetwork (METHOD §5): identity at init, exact fast forward, trainable, size for SDXL, encoder checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from core_helpers import sdxl_reference_sites, single_thread  # noqa: F401

from hypertransport_core import Concept, HyperNet, HyperNetConfig, HyperTransportError, Site, Steering

ENC = {"arch": "tiny", "fingerprint": "abc123", "embed_dim": 16}


def _sites():
    widths = [8, 8, 8, 12, 4, 4, 8, 12, 12]  # runs of equal widths, and singletons
    return [Site(f"s{i}", f"s{i}", c, 1 if i % 2 else -1) for i, c in enumerate(widths)]


def _hn(seed=0, **kw):
    torch.manual_seed(seed)
    return HyperNet(HyperNetConfig(embed_dim=16, hidden=32, rank=4, **kw), _sites(), family="generic", encoder=ENC)


def _randomize(hn, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (hn.channel_w, hn.channel_b, hn.offset_w, hn.offset_b):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_identity_at_init_exactly():
    hn = _hn()
    e = F.normalize(torch.randn(5, 16), dim=-1)
    w, b = hn(e, ["text", "image", "mixed", "text", "image"])
    assert w.shape == b.shape == (5, hn.total_channels) == (5, 76)
    assert torch.equal(w, torch.ones_like(w)) and torch.equal(b, torch.zeros_like(b))
    st = hn.steering(e[0])
    assert isinstance(st, Steering) and st.sites == hn.sites
    assert torch.equal(st.w, torch.ones(76)) and torch.equal(st.b, torch.zeros(76))


def test_fast_forward_equals_reference_math():
    hn = _hn()
    _randomize(hn)
    e = torch.randn(3, 16)
    w, b = hn(e)
    wr, br = hn.forward_reference(e)
    assert w.abs().sub(1).abs().max() > 1e-2  # not trivially the identity
    torch.testing.assert_close(w, wr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, br, atol=1e-6, rtol=1e-6)
    (w.square().sum() + b.square().sum()).backward()
    fast = {n: p.grad.clone() for n, p in hn.named_parameters()}
    hn.zero_grad()
    wr, br = hn.forward_reference(e)
    (wr.square().sum() + br.square().sum()).backward()
    for n, p in hn.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_trains_and_gradients_reach_every_parameter():
    hn = _hn()
    opt = torch.optim.Adam(hn.parameters(), lr=1e-2)
    e = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    target_w = 1 + 0.5 * torch.randn(4, hn.total_channels, generator=torch.Generator().manual_seed(4))
    losses, grads = [], []
    for _ in range(3):
        w, b = hn(e)
        loss = (w - target_w).square().mean() + (b - 0.3).square().mean()
        opt.zero_grad()
        loss.backward()
        grads.append({n: float(p.grad.abs().sum()) for n, p in hn.named_parameters()})
        opt.step()
        losses.append(float(loss.detach()))
    # heads start at zero, so the trunk/site projections get gradient from the second step on
    assert all(g > 0 for g in grads[-1].values()), grads[-1]
    assert losses[-1] < losses[0]
    w, b = hn(e)
    assert not torch.equal(w, torch.ones_like(w)) and b.abs().max() > 0
    assert not torch.allclose(w[0], w[1])  # concept-dependent


def test_sdxl_reference_size_under_25m():
    sites = sdxl_reference_sites()
    hn = HyperNet(HyperNetConfig(embed_dim=768), sites, family="sdxl")
    n = hn.num_parameters()
    C, S, H, r = 294080, 256, 512, 16
    trunk = 768 * H + H + H * H + H + 2 * H
    assert n == 2 * C * (r + 1) + S * H * 2 * r + trunk
    assert n <= 25_000_000
    assert n * 4 / 2**20 < 100  # MB as float32
    w, b = hn(torch.randn(1, 768))
    assert w.shape == (1, 294080)


def test_steering_refuses_concept_from_another_encoder():
    hn = _hn()
    e = F.normalize(torch.randn(16), dim=-1)
    ok = Concept(e, "text", dict(ENC), "fine")
    st = hn.steering(ok)
    assert st.meta["label"] == "fine" and st.meta["encoder"] == ENC and st.meta["modality"] == "text"
    other = Concept(e, "text", {"arch": "tiny", "fingerprint": "zzz999", "embed_dim": 16}, "other")
    with pytest.raises(HyperTransportError, match="fingerprint zzz999.*trained with tiny"):
        hn.steering(other)
    other_arch = Concept(e, "text", {"arch": "ViT-L-14", "fingerprint": "abc123"}, "x")
    with pytest.raises(HyperTransportError, match="ViT-L-14"):
        hn.steering(other_arch)
    with pytest.raises(HyperTransportError, match="17 dims.*expects 16"):
        hn(torch.randn(1, 17))


def test_modality_centering():
    hn = _hn()
    _randomize(hn)
    mu_t, mu_i = torch.randn(16) * 0.1, torch.randn(16) * 0.1
    hn.mean_text.copy_(mu_t)
    hn.mean_image.copy_(mu_i)
    e = F.normalize(torch.randn(2, 16), dim=-1)
    torch.testing.assert_close(hn.prepare(e, "text"), F.normalize(e - mu_t, dim=-1))
    torch.testing.assert_close(hn.prepare(e, ["image", "mixed"]), F.normalize(e - torch.stack([mu_i, (mu_t + mu_i) / 2]), dim=-1))
    assert hn.prepare(e, "text").norm(dim=-1).sub(1).abs().max() < 1e-6
    wt, _ = hn(e, "text")
    wi, _ = hn(e, "image")
    assert not torch.allclose(wt, wi)
    # an image embedding offset by exactly the modality gap steers like the text embedding
    e_img = e - mu_t + mu_i
    torch.testing.assert_close(hn(e_img, "image")[0], wt, atol=1e-5, rtol=1e-5)
    with pytest.raises(HyperTransportError, match="modality"):
        hn(e, "audio")
    with pytest.raises(HyperTransportError, match="modality"):
        hn(e, ["text"])  # one per row needed


def test_bad_config_and_empty_sites():
    with pytest.raises(HyperTransportError, match="depth"):
        HyperNet(HyperNetConfig(embed_dim=4, depth=0), _sites())
    with pytest.raises(HyperTransportError, match="at least one site"):
        HyperNet(HyperNetConfig(embed_dim=4), [])
    assert HyperNetConfig.from_dict(HyperNetConfig(8, hidden=4).to_dict()) == HyperNetConfig(8, hidden=4)
    with pytest.raises(HyperTransportError, match="embed_dim"):
        HyperNetConfig.from_dict({"hidden": 3})


def test_zero_heads_start_the_trunk_one_step_late_not_dead():
    """U = 0 at init (the identity): the first step reaches the heads and offsets only (the trunk's gradient passes
    through U), the second every parameter. The zero start costs one step, not a dead start."""
    hn = _hn()
    opt = torch.optim.Adam(hn.parameters(), lr=1e-2)
    e = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    target = torch.randn(4, hn.total_channels, generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in hn.named_parameters()}
    moved = []
    for _ in range(2):
        opt.zero_grad()
        w, b = hn(e)
        ((w - target) ** 2 + (b - target) ** 2).mean().backward()
        opt.step()
        moved.append({n for n, p in hn.named_parameters() if not torch.equal(p, before[n])})
    assert moved[0] == {"channel_w", "channel_b", "offset_w", "offset_b"}
    assert moved[1] == set(before)


def test_text_templates_average_the_phrases_and_round_trip(tmp_path):
    from hypertransport_core import load_hypernet, save_hypernet

    seen = []

    class Enc:  # a toy encoder: each phrase its own direction, so the mean is known
        identity = ENC

        @staticmethod
        def encode_text(texts):
            seen.append(list(texts))
            return F.normalize(torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(hash(t) % 2**31))
                                            for t in texts]), dim=-1)

    plain = _hn()
    torch.testing.assert_close(plain.encode_text(Enc, [" red "]), Enc.encode_text(["red"]))  # no templates: the bare text
    hn = _hn(text_templates=("{}", "a {} circle", "a {} square"))
    got = hn.encode_text(Enc, ["red", "dotted"])
    assert seen[-1] == ["red", "a red circle", "a red square", "dotted", "a dotted circle", "a dotted square"]
    want = F.normalize(Enc.encode_text(["red", "a red circle", "a red square"]).mean(0), dim=-1)
    torch.testing.assert_close(got[0], want)
    assert got.shape == (2, 16) and not torch.allclose(got[0], Enc.encode_text(["red"])[0])
    c = hn.text_concept(Enc, "red")
    assert c.modality == "text" and c.label == "red" and torch.equal(c.embedding, got[0])
    with pytest.raises(HyperTransportError, match="empty"):
        hn.encode_text(Enc, ["  "])
    many = _hn(text_templates=tuple(f"{i} {{}}" for i in range(64)))  # as many as a file may hold
    seen.clear()
    assert many.encode_text(Enc, [f"c{i}" for i in range(5)]).shape == (5, 16)
    assert [len(s) for s in seen] == [256, 64]  # encoded in bounded chunks
    with pytest.raises(HyperTransportError, match="33 concepts × 64 templates = 2112 phrases.*Fix: encode fewer"):
        many.encode_text(Enc, [f"c{i}" for i in range(33)])
    p = str(tmp_path / "t.safetensors")
    save_hypernet(p, hn)
    assert load_hypernet(p).config.text_templates == hn.config.text_templates
    save_hypernet(p, plain)  # a file without templates records none (and reads as before)
    assert load_hypernet(p).config.text_templates == () and "text_templates" not in plain.config.to_dict()


def test_steering_is_deterministic_with_dropout_and_keeps_train_mode():
    hn = _hn(dropout=0.5)
    _randomize(hn)
    with torch.no_grad():
        for p in hn.site_proj, hn.channel_w:
            p.normal_()
    hn.train()
    e = F.normalize(torch.randn(16), dim=-1)
    a, b = hn.steering(e), hn.steering(e)
    assert torch.equal(a.w, b.w) and hn.training
    with torch.no_grad():
        w1, w2 = hn(e[None])[0], hn(e[None])[0]
    assert not torch.equal(w1, w2)  # the training forward does use dropout
