"""Site tables (METHOD §1): listing, family detection, registration and checks, on fake module trees."""

from __future__ import annotations

import pytest
import torch
from core_helpers import TinyNet, sdxl_reference_sites, single_thread  # noqa: F401
from torch import nn

from hypertransport_core import (
    SITE_TABLES,
    HyperTransportError,
    Site,
    SiteRule,
    SiteTable,
    check_sites,
    detect_family,
    list_sites,
    register_table,
)


def test_generic_fallback_finds_every_norm_with_width_and_channel_axis():
    net = TinyNet(c=8, groups=2)
    sites = list_sites(net)  # no family detected → generic
    assert detect_family(net) == "generic"
    assert [s.name for s in sites] == ["gn", "ln1", "ln2"]
    assert [s.channels for s in sites] == [8, 8, 8]
    by = {s.name: s for s in sites}
    assert by["gn"].channel_dim == 1 and by["ln1"].channel_dim == -1
    assert all(s.module == s.name and s.output_index is None for s in sites)
    assert list_sites(net, form="elementwise")[0].form == "elementwise"
    assert [s.name for s in list_sites(net, include=[r"ln\d"])] == ["ln1", "ln2"]
    with pytest.raises(HyperTransportError, match="form"):
        list_sites(net, form="bogus")


def test_widths_of_other_norm_types():
    net = nn.Sequential(nn.BatchNorm2d(5), nn.RMSNorm(7), nn.InstanceNorm2d(3), nn.LayerNorm([4, 6]))
    sites = list_sites(net, "generic")
    assert [(s.channels, s.channel_dim) for s in sites] == [(5, 1), (7, -1), (3, 1), (6, -1)]


class _ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(2, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.out_layers = nn.Sequential(nn.GroupNorm(2, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)


class _FakeUNet(nn.Module):
    """ComfyUI-named UNet skeleton: input_blocks / middle_block / output_blocks / out (+ label_emb for SDXL)."""

    def __init__(self, sdxl: bool):
        super().__init__()
        self.time_embed = nn.Linear(4, 4)
        if sdxl:
            self.label_emb = nn.Sequential(nn.Linear(4, 4))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 8, 3)), nn.Sequential(_ResBlock(8, 16), _Block(16))])
        self.middle_block = nn.Sequential(_ResBlock(16, 16))
        self.output_blocks = nn.ModuleList([nn.Sequential(_ResBlock(32, 8))])
        self.out = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 3))
        self.extra_norm = nn.LayerNorm(8)  # outside the UNet patterns: not a site for sdxl/sd15


def test_detect_sdxl_vs_sd15_and_list_unet_norms():
    assert detect_family(_FakeUNet(sdxl=True)) == "sdxl"
    assert detect_family(_FakeUNet(sdxl=False)) == "sd15"
    sites = list_sites(_FakeUNet(sdxl=True))
    names = [s.name for s in sites]
    assert names == [
        "input_blocks.1.0.in_layers.0",
        "input_blocks.1.0.out_layers.0",
        "input_blocks.1.1.norm1",
        "input_blocks.1.1.norm2",
        "middle_block.0.in_layers.0",
        "middle_block.0.out_layers.0",
        "output_blocks.0.0.in_layers.0",
        "output_blocks.0.0.out_layers.0",
        "out.0",
    ]
    assert [s.channels for s in sites] == [8, 16, 16, 16, 16, 16, 32, 8, 8]
    assert [s.channel_dim for s in sites] == [1, 1, -1, -1, 1, 1, 1, 1, 1]
    assert "extra_norm" in [s.name for s in list_sites(_FakeUNet(sdxl=True), "generic")]


class DoubleStreamBlock(nn.Module):  # noqa: D101 - name matters: the flux table matches it
    def __init__(self, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.img = nn.Linear(hidden_size, hidden_size)
        self.txt = nn.Linear(hidden_size, hidden_size)

    def forward(self, img, txt):
        return self.img(img), self.txt(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.lin = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        return self.lin(x)


class _FakeFlux(nn.Module):
    def __init__(self, h=6):
        super().__init__()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(h) for _ in range(2)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(h) for _ in range(3)])
        self.final_norm = nn.LayerNorm(h)

    def forward(self, img, txt):
        for blk in self.double_blocks:
            img, txt = blk(img, txt)
        x = torch.cat([txt, img], 1)
        for blk in self.single_blocks:
            x = blk(x)
        return x


def test_detect_flux_and_tuple_output_sites():
    net = _FakeFlux()
    assert detect_family(net) == "flux"
    sites = list_sites(net)
    assert [s.name for s in sites] == [
        "double_blocks.0@0",
        "double_blocks.0@1",
        "double_blocks.1@0",
        "double_blocks.1@1",
        "single_blocks.0",
        "single_blocks.1",
        "single_blocks.2",
    ]
    assert all(s.channels == 6 and s.channel_dim == -1 for s in sites)
    assert [s.output_index for s in sites[:2]] == [0, 1]
    check_sites(sites, net)  # widths come from hidden_size


def test_flux_tuple_sites_are_steered_per_stream():
    from hypertransport_core import Steering, steer

    torch.manual_seed(0)
    net = _FakeFlux()
    sites = list_sites(net, include=[r"double_blocks\.0@1"])  # only the txt stream of block 0
    st = Steering(tuple(sites), torch.full((6,), 2.0), torch.zeros(6))
    img, txt = torch.randn(1, 3, 6), torch.randn(1, 2, 6)
    plain = net.double_blocks[0](img, txt)
    with steer(net, [(st, 1.0)]):
        out = net.double_blocks[0](img, txt)
    assert isinstance(out, tuple)
    assert torch.equal(out[0], plain[0])
    torch.testing.assert_close(out[1], 2 * plain[1])
    from hypertransport_core import fold_steering

    patches, rest = fold_steering(net, [(st, 1.0)])
    assert patches == {} and rest == sites  # tuple outputs of blocks cannot be folded into weights


def test_a_region_follows_each_flux_sites_token_layout_from_its_table():
    """The family table says how a token output orders its tokens and at what stride (Flux: patches of 2 latent
    pixels): the image stream is image tokens, the text stream has none, a single-stream block holds the text tokens
    first. A region (left half of an 8x8 latent -> 4x4 = 16 image tokens) steers exactly the image tokens it covers,
    also when the text tokens outnumber them (a stride found from the count alone would then be 1)."""
    from hypertransport_core import Steering
    from hypertransport_core.engine import SteeringPlan, region_for
    from hypertransport_core.sites import token_layout

    net = _FakeFlux()
    sites = {s.name: s for s in list_sites(net)}
    assert [token_layout("flux", sites[n]) for n in ("double_blocks.0@0", "double_blocks.0@1", "single_blocks.0")] == [
        ("image", 2), ("text", 2), ("text_first", 2)]
    assert token_layout("generic", sites["single_blocks.0"]) == ("text_first", 2)  # no family: found in the tables
    assert token_layout("generic", Site("ln9", "ln9", 4)) == ("image", 0)
    region = torch.zeros(1, 1, 8, 8)
    region[..., :4] = 1.0
    img_tokens = region_for(region, torch.zeros(1, 16, 6), -1, 1, ("image", 2)).flatten()
    assert img_tokens.tolist() == ([1.0, 1.0, 0.0, 0.0] * 4)  # 4x4 raster at stride 2
    for text in (5, 512):  # few text tokens, and more than 3x the image tokens (stride 1 would also fit: 64 <= 528)
        single = region_for(region, torch.zeros(1, text + 16, 6), -1, 1, ("text_first", 2)).flatten()
        assert not single[:text].any() and torch.equal(single[text:], img_tokens), text
    odd = torch.ones(1, 1, 7, 9)  # padded up to 8x10 by the patchifier: 4x5 tokens
    assert region_for(odd, torch.zeros(1, 20, 6), -1, 1, ("image", 2)).shape == (1, 20, 1)
    assert not region_for(region, torch.zeros(1, 16, 6), -1, 1, ("text", 2)).any()
    assert not region_for(region, torch.zeros(1, 21, 6), -1, 1, ("image", 0)).any()  # no stride gives 21 image tokens

    for meta in ({"family": "flux"}, {}):  # a steering made in code records no family: the tables still know
        st = Steering((sites["single_blocks.0"],), torch.ones(6), torch.ones(6), meta=meta)
        sm = SteeringPlan.compile([(st, 1.0)]).maps["single_blocks.0"]
        assert sm.tokens == ("text_first", 2)
        out = sm(torch.zeros(1, 512 + 16, 6), region=region)
        assert out[0, :512].abs().sum() == 0 and torch.equal(out[0, 512:, 0], img_tokens)


def test_every_family_entry_holds_its_blocks_presets_and_sampling():
    """One entry per family: the presets, the checkpointed blocks and the sampling the trainer uses come from it."""
    from hypertransport_core.sites import block_presets

    for fam in ("sd15", "sdxl", "pixart", "flux"):
        t = SITE_TABLES[fam]
        assert t.sampling is not None and t.sampling.steps >= 1 and t.checkpoint_blocks, fam
    assert SITE_TABLES["generic"].sampling is None
    flux = list_sites(_FakeFlux())
    assert block_presets(flux, "flux") == {"early": ["double_blocks.0", "double_blocks.1"], "middle": ["single_blocks.0"],
                                           "late": ["single_blocks.1", "single_blocks.2"]}
    assert block_presets(flux, "generic") == {}  # a family without presets has none, whatever its names
    unet = [Site(f"{b}.norm", f"{b}.norm", 4) for b in ("input_blocks.1", "input_blocks.2", "input_blocks.4",
                                                       "middle_block", "output_blocks.0", "output_blocks.3", "out")]
    assert block_presets(unet, "sd15")["coarse"] == ["input_blocks.4", "middle_block", "output_blocks.0"]
    assert block_presets(unet, "sd15")["fine"] == ["input_blocks.1", "input_blocks.2", "output_blocks.3", "out"]
    with pytest.raises(HyperTransportError, match="tokens"):
        register_table(SiteTable("test_badtokens", "x", (SiteRule(".+", tokens=("diagonal",)),)))
    with pytest.raises(HyperTransportError, match="token_stride"):
        register_table(SiteTable("test_badstride", "x", (SiteRule(".+", token_stride=-1),)))
    with pytest.raises(HyperTransportError, match="presets"):
        register_table(SiteTable("test_badpresets", "x", (SiteRule(".+"),), presets="thirds"))
    with pytest.raises(HyperTransportError, match="checkpoint_blocks"):
        register_table(SiteTable("test_badblocks", "x", (SiteRule(".+"),), checkpoint_blocks="(unclosed"))
    assert not {"test_badtokens", "test_badpresets", "test_badblocks"} & set(SITE_TABLES)


def test_register_table_and_unknown_family():
    with pytest.raises(HyperTransportError, match="unknown model family 'nope'"):
        list_sites(TinyNet(), "nope")
    with pytest.raises(HyperTransportError, match="already registered"):
        register_table(SiteTable("sdxl", "dup", (SiteRule(".+"),)))
    with pytest.raises(HyperTransportError, match="form"):
        register_table(SiteTable("test_badform", "x", (SiteRule(".+", form="diagonal"),)))
    with pytest.raises(HyperTransportError, match="pattern"):
        register_table(SiteTable("test_badregex", "x", (SiteRule("(unclosed"),)))
    try:
        t = register_table(SiteTable("test_tiny", "TinyNet layer norms", (SiteRule(r"ln\d", ("LayerNorm",)),), detect=("attn", "ln1")))
        assert SITE_TABLES["test_tiny"] is t
        assert detect_family(TinyNet()) == "test_tiny"
        assert [s.name for s in list_sites(TinyNet())] == ["ln1", "ln2"]
        register_table(SiteTable("test_tiny", "replaced", (SiteRule(r"gn", ("GroupNorm",)),)), replace=True)
        assert [s.name for s in list_sites(TinyNet(), "test_tiny")] == ["gn"]
    finally:
        SITE_TABLES.pop("test_tiny", None)
    assert "test_badform" not in SITE_TABLES and "test_badregex" not in SITE_TABLES


def test_rule_without_a_readable_width_raises():
    table = SiteTable("adhoc", "x", (SiteRule(r"act", ()),))  # SiLU has no width
    with pytest.raises(HyperTransportError, match="channel count of site 'act'"):
        list_sites(TinyNet(), table)


def test_check_sites_missing_and_wrong_width():
    net = TinyNet(c=8)
    sites = list_sites(net)
    check_sites(sites, net)
    with pytest.raises(HyperTransportError, match="'ln9'.*does not have"):
        check_sites([*sites, Site("ln9", "ln9", 8)], net)
    with pytest.raises(HyperTransportError, match=r"'ln1': expected 16 channels.*found 8"):
        check_sites([Site("ln1", "ln1", 16)], net, what="the steering")


def test_reference_tables_match_sdxl_layout():
    sites = sdxl_reference_sites()
    ref = SITE_TABLES["sdxl"].reference
    assert len(sites) == ref["sites"] == 256
    assert sum(s.channels for s in sites) == ref["channels"] == 294080
    assert sum(s.channel_dim == 1 for s in sites) == 46  # GroupNorms
    import re

    rx = re.compile(SITE_TABLES["sdxl"].rules[0].pattern)
    assert all(rx.fullmatch(s.module) for s in sites)


def test_site_dict_round_trip_and_malformed_record():
    s = Site("double_blocks.0@1", "double_blocks.0", 3072, -1, "pooled", 1)
    assert Site.from_dict(s.to_dict()) == s
    with pytest.raises(HyperTransportError, match="malformed"):
        Site.from_dict({"name": "x"})
