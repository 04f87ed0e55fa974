"""The site tables of hypertransport_core against ComfyUI's own full-size model classes.

The models are built on the ``meta`` device (shapes only, no memory, no weights); the counts are
METHOD §1's reference numbers.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy


def full_size(comfy, family: str):
    import comfy.supported_models as sm
    import torch

    if family == "sdxl":
        cfg = sm.SDXL(comfy.unet_config("sdxl", 320, 2048, full=True))
    elif family == "sd15":
        cfg = sm.SD15(comfy.unet_config("sd15", 320, 768, full=True))
    elif family == "pixart":
        cfg = sm.PixArtSigma(comfy.pixart_config(True, 1152, 28, 4096, 16))
    elif family == "flux":
        cfg = sm.Flux(comfy.flux_config(3072, 24, 19, 38, 4096, 768))
    else:
        raise ValueError(family)
    cfg.set_inference_dtype(torch.float32, None)
    return cfg.get_model({}, "", device=torch.device("meta")).diffusion_model


@pytest.mark.parametrize(
    "family,sites,channels",
    [
        ("sdxl", 256, 294_080),
        ("sd15", 109, 100_160),
        ("pixart", 57, 65_664),
    ],
)
def test_reference_counts(comfy, family, sites, channels):
    from hypertransport_core.sites import SITE_TABLES, detect_family, list_sites, site_summary

    dm = full_size(comfy, family)
    assert detect_family(dm) == family
    found = list_sites(dm)
    assert site_summary(found) == {"sites": sites, "channels": channels}
    assert SITE_TABLES[family].reference == {"sites": sites, "channels": channels}
    assert len({s.name for s in found}) == len(found)


def test_unet_norms_have_affine_weights_pixart_not(comfy):
    from hypertransport_core.sites import list_sites

    for family, affine in (("sdxl", True), ("sd15", True), ("pixart", False)):
        dm = full_size(comfy, family)
        mods = dict(dm.named_modules())
        for s in list_sites(dm):
            has = getattr(mods[s.module], "weight", None) is not None
            assert has is affine, (family, s.name)


def test_flux_full_size(comfy, capsys):
    """Flux-dev (19 double, 38 single blocks, width 3072): img and txt streams of the double blocks
    and the single blocks' outputs."""
    from hypertransport_core.sites import SITE_TABLES, detect_family, list_sites, site_summary

    dm = full_size(comfy, "flux")
    assert detect_family(dm) == "flux"
    summary = site_summary(list_sites(dm))
    with capsys.disabled():
        print(f"\nFlux-dev full size: {summary['sites']} sites, {summary['channels']:,} channels")
    assert summary == SITE_TABLES["flux"].reference == {"sites": 76, "channels": 76 * 3072}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart", "flux"])
def test_tiny_models_detected(comfy, family):
    from hypertransport_core.sites import detect_family, list_sites

    build, _, _ = comfy.FAMILIES[family]
    dm = build().model.diffusion_model
    assert detect_family(dm) == family and list_sites(dm)
