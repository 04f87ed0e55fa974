"""Which modules of a diffusion model are steered ("sites"), and everything else the project knows of a model
family, from one table entry per family.

A *site* is one module whose output gets a per-channel affine map. Each model family is one
:class:`SiteTable` entry in :data:`SITE_TABLES`: how to recognise it, its sites (name patterns, accepted
module types, how each output is laid out, its token layout), its blocks (per-block strengths and their
presets, gradient checkpointing), the norms it changes in place, and how its (distilled) model is sampled
(:class:`Sampling`). Adding a family means adding an entry, not touching hook, trainer or node code. Module
names are those of the module tree handed in: for ComfyUI that is ``model.model.diffusion_model``
(ldm-style names such as ``input_blocks.1.0.in_layers.0``).

Example::

    >>> sites = list_sites(unet)                # family detected from the module tree
    >>> sites[0].name, sites[0].channels
    ('input_blocks.1.0.in_layers.0', 320)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from .errors import HyperTransportError

#: How a map is applied to a spatial output ``(B, C, H, W)``: on the spatial mean of each channel,
#: the difference added everywhere (Lin-AcT/LinEAS), or at every position (foldable into a norm).
FORMS = ("pooled", "elementwise")

#: Module class names treated as normalization layers (matched anywhere in the class's MRO, so
#: ComfyUI's ``comfy.ops.*.GroupNorm`` subclasses count).
NORM_TYPES = ("GroupNorm", "LayerNorm", "RMSNorm", "BatchNorm2d", "InstanceNorm2d")

#: Class names whose channel axis is 1 (``(B, C, ...)``); every other site is channel-last.
_CHANNEL_FIRST_TYPES = ("GroupNorm", "BatchNorm2d", "InstanceNorm2d", "Conv2d")

#: How a token output ``(B, N, C)`` orders its tokens (what a region mask needs): ``"image"``: image tokens only,
#: in raster order at some stride (UNet transformer blocks, DiT patches); ``"text_first"``: the text tokens, then
#: the image tokens (Flux's single-stream blocks); ``"text"``: no image tokens (Flux's text stream).
TOKEN_LAYOUTS = ("image", "text_first", "text")

#: How a family's blocks are grouped into named presets for the per-block strengths (:func:`block_presets`):
#: ``"unet"``: input / middle / output and, by resolution, fine / coarse; ``"sequence"``: early / middle / late
#: thirds of the block sequence; ``""``: none.
PRESET_KINDS = ("unet", "sequence", "")


@dataclass(frozen=True)
class Site:
    """One steered output.

    Attributes:
        name: unique id, the module path, with ``@i`` appended when element ``i`` of a tuple output
            is meant (Flux double blocks return ``(img, txt)``).
        module: module path inside the model.
        channels: ``C``, the width of the map.
        channel_dim: 1 for ``(B, C, ...)`` outputs, -1 for ``(..., C)`` outputs.
        form: ``"pooled"`` or ``"elementwise"`` (only matters for outputs with spatial axes).
        output_index: which element of a tuple output, or ``None`` for a tensor output.
    """

    name: str
    module: str
    channels: int
    channel_dim: int = -1
    form: str = "pooled"
    output_index: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Site:
        """A site from its file record, every field checked (type, range; see :data:`LIMITS`)."""

        def bad(why: str) -> HyperTransportError:
            return HyperTransportError(
                f"site record {str(d)[:120]!r} is malformed: {why}. "
                "Fix: re-save the file with the current version of hypertransport_core."
            )

        if not isinstance(d, dict):
            raise bad(f"expected a JSON object, found {type(d).__name__}")
        name, module = d.get("name"), d.get("module", d.get("name"))
        for key, v in (("name", name), ("module", module)):
            if not isinstance(v, str) or not 0 < len(v) <= LIMITS["name_length"]:
                raise bad(f"{key!r} must be a non-empty string of at most {LIMITS['name_length']} characters")
        channels = d.get("channels")
        if type(channels) is not int or not 1 <= channels <= LIMITS["site_channels"]:
            raise bad(f"'channels' must be an integer from 1 to {LIMITS['site_channels']}, found {channels!r}")
        channel_dim = d.get("channel_dim", -1)
        if type(channel_dim) is not int or channel_dim not in (1, -1):
            raise bad(f"'channel_dim' must be 1 (channels first) or -1 (channels last), found {channel_dim!r}")
        form = d.get("form", "pooled")
        if form not in FORMS:
            raise bad(f"'form' must be one of {FORMS}, found {form!r}")
        idx = d.get("output_index")
        if idx is not None and (type(idx) is not int or not 0 <= idx < 16):
            raise bad(f"'output_index' must be null or an integer from 0 to 15, found {idx!r}")
        return Site(name, module, channels, channel_dim, form, idx)


#: Bounds on what a file may declare (checked before anything is allocated from it). The largest model
#: the project knows, SDXL, has 256 sites and 294,080 channels; Flux-dev 76 sites of width 3072.
LIMITS = {
    "sites": 4096,
    "site_channels": 65536,
    "channels": 4_194_304,
    "name_length": 256,
}


def check_site_list(sites: Sequence[Site], what: str = "the file") -> None:
    """Raise if a site list is empty, too long, too wide in total, or names a site twice."""
    if not sites:
        raise HyperTransportError(f"{what} lists no sites. Fix: re-save it with its site list.")
    if len(sites) > LIMITS["sites"]:
        raise HyperTransportError(f"{what} lists {len(sites)} sites, more than the {LIMITS['sites']} allowed. Fix: re-save it.")
    total = sum(s.channels for s in sites)
    if total > LIMITS["channels"]:
        raise HyperTransportError(f"{what} declares {total:,} channels, more than the {LIMITS['channels']:,} allowed. "
                                  "Fix: re-save it with its real site list.")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise HyperTransportError(f"{what} lists site {dup!r} twice. Fix: re-save it with a deduplicated site list.")


@dataclass(frozen=True)
class SiteRule:
    """Modules matching ``pattern`` (a regex, full match on the module path) become sites.

    Attributes:
        pattern: regex over module paths.
        types: accepted class names (any class in the module's MRO); empty accepts any module.
        form: form for spatial outputs (token outputs are always mapped at every token).
        outputs: tuple elements to steer for modules returning tuples; ``(None,)`` for a tensor.
        width_attr: attribute holding the width for modules that are not norms/linears/convs.
        channel_dim: force the channel axis; ``None`` infers it from the module type.
        tokens: the token layout of each output (:data:`TOKEN_LAYOUTS`), one per entry of ``outputs`` or one for
            all; it only matters for token outputs under a region mask.
        token_stride: latent pixels per image token (a DiT's patch size: Flux and PixArt 2; the latent is padded up
            to a multiple of it); 0 when it varies by block (a UNet's levels): found from the token count.
    """

    pattern: str
    types: tuple[str, ...] = NORM_TYPES
    form: str = "pooled"
    outputs: tuple[int | None, ...] = (None,)
    width_attr: str | None = None
    channel_dim: int | None = None
    tokens: tuple[str, ...] = ("image",)
    token_stride: int = 0

    def tokens_of(self, output_index: int | None) -> tuple[str, int]:
        """The token layout of one of this rule's outputs and the rule's token stride."""
        kind = self.tokens[0] if len(self.tokens) == 1 else self.tokens[self.outputs.index(output_index)]
        return kind, self.token_stride


@dataclass(frozen=True)
class Sampling:
    """How a family's (distilled) model is sampled when the trainer and Fit Steering run it.

    Attributes:
        steps: default number of sampler steps.
        timesteps: fixed discrete timesteps per step count (the distillation's own), else the
            ``scheduler`` spaces the sigmas.
        sampler: ComfyUI sampler name: ``"lcm"`` (predict x0, re-noise to the next sigma: DMD2 /
            consistency style) or ``"euler"``.
        scheduler: ComfyUI scheduler used when no fixed timesteps are given.
        resolution: image side in pixels.
        extra: conditioning extras every prompt gets (Flux: the distilled guidance value).
        note: where the numbers come from.
    """

    steps: int
    timesteps: dict[int, tuple[int, ...]] = field(default_factory=dict)
    sampler: str = "euler"
    scheduler: str = "simple"
    resolution: int = 1024
    extra: dict = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class SiteTable:
    """Everything the project knows of one model family (one entry of :data:`SITE_TABLES`).

    Attributes:
        family: short id stored in files (``"sdxl"``, ``"sd15"``, ``"pixart"``, ``"flux"``, ...).
        description: one line for users.
        rules: the sites: rules tried in order; a module is a site by its first matching rule.
        detect: module paths that must all exist for :func:`detect_family` to pick this table.
        detect_absent: module paths that must not exist (tells SD1.5 from SDXL).
        reference: counts for the full-size model, ``{"sites": n, "channels": c}``, for docs/tests.
        presets: how its blocks group into presets (:data:`PRESET_KINDS`).
        checkpoint_blocks: regex (full match) of the blocks whose activations gradient checkpointing recomputes.
        inplace_norms: regex of norms whose input the model changes in place after the norm ran (Flux:
            ``x += ...`` after ``pre_norm(x)``); while gradients flow they see a copy. ``""``: none.
        sampling: how the trainer and Fit Steering sample the model; ``None``: they cannot run it.
    """

    family: str
    description: str
    rules: tuple[SiteRule, ...]
    detect: tuple[str, ...] = ()
    detect_absent: tuple[str, ...] = ()
    reference: dict = field(default_factory=dict)
    presets: str = ""
    checkpoint_blocks: str = ""
    inplace_norms: str = ""
    sampling: Sampling | None = None


_UNET_NORMS = SiteRule(r"(input_blocks|middle_block|output_blocks|out)(\..+)?", NORM_TYPES, "pooled")
_UNET_BLOCKS = r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)"

SITE_TABLES: dict[str, SiteTable] = {}


def register_table(table: SiteTable, *, replace: bool = False) -> SiteTable:
    """Add a family's table (checked: valid regexes and forms). Returns the table."""
    if table.family in SITE_TABLES and not replace:
        raise HyperTransportError(
            f"site table {table.family!r} is already registered. Fix: pass replace=True or pick another family id."
        )
    regexes = [(f"rule pattern {r.pattern!r}", r.pattern) for r in table.rules]
    regexes += [(f"{name} {getattr(table, name)!r}", getattr(table, name)) for name in ("checkpoint_blocks", "inplace_norms")]
    for what, pattern in regexes:
        try:
            re.compile(pattern)
        except re.error as e:
            raise HyperTransportError(
                f"site table {table.family!r}: {what} is not a valid regex ({e}). Fix: correct the pattern."
            ) from None
    for r in table.rules:
        if r.form not in FORMS:
            raise HyperTransportError(f"rule {r.pattern!r}: form {r.form!r} is not one of {FORMS}.")
        if not set(r.tokens) <= set(TOKEN_LAYOUTS) or len(r.tokens) not in (1, len(r.outputs)):
            raise HyperTransportError(f"rule {r.pattern!r}: tokens {r.tokens!r} must be one of {TOKEN_LAYOUTS}, "
                                      "once or once per output. Fix: give one layout, or one per entry of outputs.")
        if type(r.token_stride) is not int or not 0 <= r.token_stride <= 64:
            raise HyperTransportError(f"rule {r.pattern!r}: token_stride {r.token_stride!r} must be an integer from 0 "
                                      "to 64. Fix: the patch size of a DiT, or 0 to find it from the token count.")
    if table.presets not in PRESET_KINDS:
        raise HyperTransportError(f"site table {table.family!r}: presets {table.presets!r} is not one of {PRESET_KINDS}. "
                                  "Fix: 'unet', 'sequence' or '' (none).")
    SITE_TABLES[table.family] = table
    return table


register_table(
    SiteTable(
        "sdxl",
        "SDXL UNet and its distillations (DMD2, Lightning, Turbo) in ComfyUI naming: every GroupNorm/LayerNorm",
        (_UNET_NORMS,),
        detect=("input_blocks", "label_emb"),
        reference={"sites": 256, "channels": 294080},
        presets="unet",
        checkpoint_blocks=_UNET_BLOCKS,
        # DMD2 (tianweiy/DMD2): 4-step generator at timesteps 999, 749, 499, 249; 1-step at 399. cfg 1.
        sampling=Sampling(4, {4: (999, 749, 499, 249), 1: (399,)}, "lcm", "sgm_uniform", 1024,
                          note="DMD2 (SDXL distilled): 4 steps at its fixed timesteps, or 1 step at t=399, cfg 1"),
    )
)
register_table(
    SiteTable(
        "sd15",
        "SD1.5 UNet in ComfyUI naming: every GroupNorm/LayerNorm",
        (_UNET_NORMS,),
        detect=("input_blocks",),
        detect_absent=("label_emb",),
        reference={"sites": 109, "channels": 100160},
        presets="unet",
        checkpoint_blocks=_UNET_BLOCKS,
        sampling=Sampling(4, {}, "euler", "simple", 512, note="SD1.5: 4-step Euler on the simple schedule"),
    )
)
register_table(
    SiteTable(
        "pixart",
        "PixArt-Alpha/Sigma and Nitro-1-PixArt DiT in ComfyUI naming: the blocks' norm1/norm2 and the final norm",
        (SiteRule(r"blocks\.\d+\.norm[12]|final_layer\.norm_final", ("LayerNorm",), token_stride=2),),
        detect=("blocks", "t_block", "y_embedder"),
        reference={"sites": 57, "channels": 65664},
        presets="sequence",
        checkpoint_blocks=r"blocks\.\d+",
        # Nitro-1-PixArt (AMD): one step from pure noise; cfg 1. [ours: t=999 as the single timestep]
        sampling=Sampling(1, {1: (999,)}, "lcm", "simple", 1024, note="Nitro-1-PixArt: 1 step, cfg 1"),
    )
)
register_table(
    SiteTable(
        "flux",
        "Flux DiT in ComfyUI naming: outputs of the double-stream blocks (img and txt streams) and single-stream blocks",
        (
            SiteRule(r"double_blocks\.\d+", ("DoubleStreamBlock",), outputs=(0, 1), width_attr="hidden_size",
                     tokens=("image", "text"), token_stride=2),
            SiteRule(r"single_blocks\.\d+", ("SingleStreamBlock",), width_attr="hidden_size", tokens=("text_first",),
                     token_stride=2),
        ),
        detect=("double_blocks", "single_blocks"),
        reference={"sites": 2 * 19 + 38, "channels": (2 * 19 + 38) * 3072},
        presets="sequence",
        checkpoint_blocks=r"(double_blocks|single_blocks)\.\d+",
        inplace_norms=r"(double_blocks|single_blocks)\.\d+\..*norm.*",
        sampling=Sampling(4, {}, "euler", "simple", 1024, {"guidance": 3.5},
                          note="Flux: 4-step Euler on the simple schedule, distilled guidance 3.5"),
    )
)
register_table(
    SiteTable(
        "generic",
        "any model: every normalization layer",
        (SiteRule(r".+", NORM_TYPES),),
    )
)


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def _width(module: nn.Module, rule: SiteRule, path: str) -> int:
    if rule.width_attr is not None:
        w = getattr(module, rule.width_attr, None)
    elif isinstance(module, nn.GroupNorm):
        w = module.num_channels
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        w = module.normalized_shape[-1]
    elif isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)):
        w = module.num_features
    elif isinstance(module, nn.Linear):
        w = module.out_features
    elif isinstance(module, nn.Conv2d):
        w = module.out_channels
    else:  # custom norms (Flux RMSNorm keeps a `scale` vector) or anything with a 1-D weight
        p = getattr(module, "weight", None)
        if p is None:
            p = getattr(module, "scale", None)
        w = p.shape[-1] if p is not None and p.ndim == 1 else None
    if not isinstance(w, int) or w <= 0:
        raise HyperTransportError(
            f"cannot tell the channel count of site {path!r} ({type(module).__name__}). "
            "Fix: give its SiteRule a width_attr naming the attribute that holds the width."
        )
    return w


def _channel_dim(module: nn.Module, rule: SiteRule) -> int:
    if rule.channel_dim is not None:
        return rule.channel_dim
    return 1 if _class_names(module) & set(_CHANNEL_FIRST_TYPES) else -1


def get_table(family: str | SiteTable) -> SiteTable:
    """The registered table for ``family`` (a table passes through)."""
    if isinstance(family, SiteTable):
        return family
    try:
        return SITE_TABLES[family]
    except KeyError:
        raise HyperTransportError(
            f"unknown model family {family!r}; known: {sorted(SITE_TABLES)}. "
            "Fix: use one of those or register a SiteTable for it with register_table()."
        ) from None


def detect_family(model: nn.Module) -> str:
    """The first registered family whose ``detect`` paths exist in ``model`` (``"generic"`` if none)."""
    names = {n for n, _ in model.named_modules()}
    for t in SITE_TABLES.values():
        if t.detect and all(p in names for p in t.detect) and not any(p in names for p in t.detect_absent):
            return t.family
    return "generic"


def list_sites(
    model: nn.Module,
    family: str | SiteTable | None = None,
    *,
    form: str | None = None,
    include: Iterable[str] | None = None,
) -> list[Site]:
    """The sites of ``model`` with their widths, in module order.

    Args:
        model: the module tree (for ComfyUI, ``model_patcher.model.diffusion_model``).
        family: a registered family id or a :class:`SiteTable`; ``None`` detects it.
        form: override every rule's form for spatial sites (``"pooled"`` or ``"elementwise"``).
        include: optional regexes; keep only sites whose name matches one of them.

    Returns:
        list of :class:`Site`.
    """
    table = get_table(family if family is not None else detect_family(model))
    if form is not None and form not in FORMS:
        raise HyperTransportError(f"form {form!r} is not one of {FORMS}. Fix: pass 'pooled' or 'elementwise'.")
    rules = [(re.compile(r.pattern), r) for r in table.rules]
    keep = [re.compile(p) for p in include] if include is not None else None
    sites: list[Site] = []
    for path, module in model.named_modules():
        if not path:
            continue
        for rx, rule in rules:
            if not rx.fullmatch(path) or (rule.types and not (_class_names(module) & set(rule.types))):
                continue
            width = _width(module, rule, path)
            for idx in rule.outputs:
                name = path if idx is None else f"{path}@{idx}"
                if keep is not None and not any(k.fullmatch(name) or k.search(name) for k in keep):
                    continue
                sites.append(Site(name, path, width, _channel_dim(module, rule), form or rule.form, idx))
            break
    return sites


def check_sites(expected: Sequence[Site], model: nn.Module, *, what: str = "the hypernet") -> None:
    """Raise if ``model`` lacks any of ``expected`` sites or has them at another width.

    The message names the first missing/mismatched site, both widths and the fix.
    """
    modules = dict(model.named_modules())
    for s in expected:
        m = modules.get(s.module)
        if m is None:
            raise HyperTransportError(
                f"{what} steers site {s.name!r}, which this model does not have "
                f"({len(expected)} sites expected). Fix: use a hypernet/steering trained for this model family."
            )
        try:
            width = _width(m, SiteRule(".*", (), width_attr="hidden_size" if hasattr(m, "hidden_size") else None), s.module)
        except HyperTransportError:
            continue  # unknown width: the first forward pass checks the shape instead
        if width != s.channels:
            raise HyperTransportError(
                f"site {s.name!r}: expected {s.channels} channels (as {what} records), found {width}. "
                "Fix: use a hypernet/steering trained for this model (same architecture and size)."
            )


def site_summary(sites: Sequence[Site]) -> dict:
    """``{"sites": n, "channels": c}``."""
    return {"sites": len(sites), "channels": sum(s.channels for s in sites)}


def _block_of(name: str) -> str:
    """The top-level block a site belongs to: ``input_blocks.4``, ``middle_block``, ``out``, ``blocks.12``,
    ``double_blocks.3`` (a numbered container keeps its number)."""
    parts = name.split("@")[0].split(".")
    numbered = parts[0].endswith("blocks") and len(parts) > 1 and parts[1].isdigit()  # input_blocks.4, blocks.12
    return ".".join(parts[:2]) if numbered else parts[0]


def block_names(sites: Sequence[Site]) -> list[str]:
    """The top-level blocks of a site list, in order (what per-block strengths and presets name)."""
    return list(dict.fromkeys(_block_of(s.name) for s in sites))


def _thirds(blocks: list[str]) -> dict[str, list[str]]:
    n = len(blocks)
    a, b = round(n / 3), round(2 * n / 3)
    return {"early": blocks[:a], "middle": blocks[a:b], "late": blocks[b:]}


def block_presets(sites: Sequence[Site], family: str | SiteTable) -> dict[str, list[str]]:
    """Named groups of blocks for the per-block strengths, by the family's :attr:`SiteTable.presets`.

    ``"unet"`` (SD1.5, SDXL and their distillations, the embedded world): ``input``, ``middle``, ``output``, and
    by resolution ``fine`` (the first input level, the last output level and the final norm) and
    ``coarse`` (the deepest input and output levels and the middle block); the levels are read from the
    input blocks' numbering (a downsampling block holds no norm, so it leaves a gap). ``"sequence"`` (PixArt,
    Flux): ``early``, ``middle``, ``late`` thirds of the numbered block sequence (a block outside it, such as
    PixArt's final layer, goes to ``late``). An unknown family has none. Returns ``{preset: [block, ...]}``.
    """
    kind = get_table(family).presets if isinstance(family, SiteTable) or family in SITE_TABLES else ""
    blocks = block_names(sites)
    if kind == "unet":
        return _unet_presets(blocks)
    seq = [b for b in blocks if b.split(".")[-1].isdigit()]
    if kind == "sequence" and seq:
        out = _thirds(seq)
        out["late"] += [b for b in blocks if b not in seq]  # PixArt's final_layer
        return out
    return {}


def _unet_presets(blocks: list[str]) -> dict[str, list[str]]:
    inputs = [b for b in blocks if b.startswith("input_blocks.")]
    if not inputs:
        return {}
    idx = sorted(int(b.split(".")[1]) for b in inputs)
    levels: list[list[int]] = []
    for i in idx:
        if levels and i == levels[-1][-1] + 1:
            levels[-1].append(i)
        else:
            levels.append([i])
    per_out = len(levels[0]) + 1
    outputs = [b for b in blocks if b.startswith("output_blocks.")]
    L = len(levels)

    def out_level(b: str) -> int:
        return L - 1 - int(b.split(".")[1]) // per_out

    presets = {
        "input": inputs,
        "middle": [b for b in blocks if b == "middle_block"],
        "output": outputs + [b for b in blocks if b == "out"],
        "fine": [f"input_blocks.{i}" for i in levels[0]] + [b for b in outputs if out_level(b) == 0]
        + [b for b in blocks if b == "out"],
        "coarse": [f"input_blocks.{i}" for i in levels[-1]] + [b for b in blocks if b == "middle_block"]
        + [b for b in outputs if out_level(b) == L - 1],
    }
    return {k: v for k, v in presets.items() if v}


def token_layout(family: str | SiteTable, site: Site) -> tuple[str, int]:
    """How ``site``'s token output orders its tokens (:data:`TOKEN_LAYOUTS`) and its token stride, from the rule that
    made it: ``family``'s, or, for a steering that records no known family, the first rule of any table that
    matches the site; ``("image", 0)`` when none does."""
    if isinstance(family, SiteTable) or (family in SITE_TABLES and family != "generic"):
        tables = [get_table(family)]
    else:
        tables = [t for t in SITE_TABLES.values() if t.family != "generic"]
    for table in tables:
        for rule in table.rules:
            if re.fullmatch(rule.pattern, site.module) and site.output_index in rule.outputs:
                return rule.tokens_of(site.output_index)
    return "image", 0


def describe_blocks(sites: Sequence[Site], family: str | SiteTable) -> str:
    """One line naming a site list's blocks (numbered runs shortened) and its presets."""
    runs: list[list[str]] = []
    for b in block_names(sites):
        head = b.rsplit(".", 1)[0] if b.rsplit(".", 1)[-1].isdigit() else None
        if runs and head and runs[-1][0].rsplit(".", 1)[0] == head:
            runs[-1].append(b)
        else:
            runs.append([b])
    parts = [r[0] if len(r) == 1 else f"{r[0]}…{r[-1].rsplit('.', 1)[-1]}" for r in runs]
    presets = block_presets(sites, family)
    return f"blocks {', '.join(parts)}" + (f"; presets {', '.join(presets)}" if presets else "")
