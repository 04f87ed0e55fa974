"""The embedded world: 32x32 images of one coloured, patterned shape, and their captions.

Concepts come in two kinds: the 139 CSS named colours (exact RGB, aliases removed) and
26 fill patterns that a 32x32 image can show, built from shared parts (line kind x orientation,
lattice kind x scale, gradient x side) so a held-out pattern has relatives among the trained ones. Every pattern is drawn in the object's colour with
a *shade* of it (darker for light colours, lighter for dark ones) covering at most ~45% of the
object, so the per-channel median of the object's pixels is the object colour exactly.

The background is a fixed colour, ``BACKGROUND``, chosen as the RGB point farthest (77 units)
from every colour and every shade, so the object mask is simply "pixels far from the background".

Example::

    rng = np.random.default_rng(0)
    specs = sample_specs(4, rng)
    imgs = render_batch(specs)          # (4, 3, 32, 32) float in [0, 1]
    print([caption(s) for s in specs])
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
SHAPES: list[str] = ["circle", "square", "triangle"]
BACKGROUND: tuple[int, int, int] = (0, 76, 192)
# the mask threshold: half the smallest distance from BACKGROUND to any colour or shade (77)
MASK_THRESHOLD = 38.0

# --------------------------------------------------------------------------- colours
# CSS Color Module Level 4 named colours (lower-case CSS names -> hex)
_CSS = {
    "aliceblue": "f0f8ff",
    "antiquewhite": "faebd7",
    "aqua": "00ffff",
    "aquamarine": "7fffd4",
    "azure": "f0ffff",
    "beige": "f5f5dc",
    "bisque": "ffe4c4",
    "black": "000000",
    "blanchedalmond": "ffebcd",
    "blue": "0000ff",
    "blueviolet": "8a2be2",
    "brown": "a52a2a",
    "burlywood": "deb887",
    "cadetblue": "5f9ea0",
    "chartreuse": "7fff00",
    "chocolate": "d2691e",
    "coral": "ff7f50",
    "cornflowerblue": "6495ed",
    "cornsilk": "fff8dc",
    "crimson": "dc143c",
    "cyan": "00ffff",
    "darkblue": "00008b",
    "darkcyan": "008b8b",
    "darkgoldenrod": "b8860b",
    "darkgray": "a9a9a9",
    "darkgreen": "006400",
    "darkgrey": "a9a9a9",
    "darkkhaki": "bdb76b",
    "darkmagenta": "8b008b",
    "darkolivegreen": "556b2f",
    "darkorange": "ff8c00",
    "darkorchid": "9932cc",
    "darkred": "8b0000",
    "darksalmon": "e9967a",
    "darkseagreen": "8fbc8f",
    "darkslateblue": "483d8b",
    "darkslategray": "2f4f4f",
    "darkslategrey": "2f4f4f",
    "darkturquoise": "00ced1",
    "darkviolet": "9400d3",
    "deeppink": "ff1493",
    "deepskyblue": "00bfff",
    "dimgray": "696969",
    "dimgrey": "696969",
    "dodgerblue": "1e90ff",
    "firebrick": "b22222",
    "floralwhite": "fffaf0",
    "forestgreen": "228b22",
    "fuchsia": "ff00ff",
    "gainsboro": "dcdcdc",
    "ghostwhite": "f8f8ff",
    "gold": "ffd700",
    "goldenrod": "daa520",
    "gray": "808080",
    "green": "008000",
    "greenyellow": "adff2f",
    "grey": "808080",
    "honeydew": "f0fff0",
    "hotpink": "ff69b4",
    "indianred": "cd5c5c",
    "indigo": "4b0082",
    "ivory": "fffff0",
    "khaki": "f0e68c",
    "lavender": "e6e6fa",
    "lavenderblush": "fff0f5",
    "lawngreen": "7cfc00",
    "lemonchiffon": "fffacd",
    "lightblue": "add8e6",
    "lightcoral": "f08080",
    "lightcyan": "e0ffff",
    "lightgoldenrodyellow": "fafad2",
    "lightgray": "d3d3d3",
    "lightgreen": "90ee90",
    "lightgrey": "d3d3d3",
    "lightpink": "ffb6c1",
    "lightsalmon": "ffa07a",
    "lightseagreen": "20b2aa",
    "lightskyblue": "87cefa",
    "lightslategray": "778899",
    "lightslategrey": "778899",
    "lightsteelblue": "b0c4de",
    "lightyellow": "ffffe0",
    "lime": "00ff00",
    "limegreen": "32cd32",
    "linen": "faf0e6",
    "magenta": "ff00ff",
    "maroon": "800000",
    "mediumaquamarine": "66cdaa",
    "mediumblue": "0000cd",
    "mediumorchid": "ba55d3",
    "mediumpurple": "9370db",
    "mediumseagreen": "3cb371",
    "mediumslateblue": "7b68ee",
    "mediumspringgreen": "00fa9a",
    "mediumturquoise": "48d1cc",
    "mediumvioletred": "c71585",
    "midnightblue": "191970",
    "mintcream": "f5fffa",
    "mistyrose": "ffe4e1",
    "moccasin": "ffe4b5",
    "navajowhite": "ffdead",
    "navy": "000080",
    "oldlace": "fdf5e6",
    "olive": "808000",
    "olivedrab": "6b8e23",
    "orange": "ffa500",
    "orangered": "ff4500",
    "orchid": "da70d6",
    "palegoldenrod": "eee8aa",
    "palegreen": "98fb98",
    "paleturquoise": "afeeee",
    "palevioletred": "db7093",
    "papayawhip": "ffefd5",
    "peachpuff": "ffdab9",
    "peru": "cd853f",
    "pink": "ffc0cb",
    "plum": "dda0dd",
    "powderblue": "b0e0e6",
    "purple": "800080",
    "rebeccapurple": "663399",
    "red": "ff0000",
    "rosybrown": "bc8f8f",
    "royalblue": "4169e1",
    "saddlebrown": "8b4513",
    "salmon": "fa8072",
    "sandybrown": "f4a460",
    "seagreen": "2e8b57",
    "seashell": "fff5ee",
    "sienna": "a0522d",
    "silver": "c0c0c0",
    "skyblue": "87ceeb",
    "slateblue": "6a5acd",
    "slategray": "708090",
    "slategrey": "708090",
    "snow": "fffafa",
    "springgreen": "00ff7f",
    "steelblue": "4682b4",
    "tan": "d2b48c",
    "teal": "008080",
    "thistle": "d8bfd8",
    "tomato": "ff6347",
    "turquoise": "40e0d0",
    "violet": "ee82ee",
    "wheat": "f5deb3",
    "white": "ffffff",
    "whitesmoke": "f5f5f5",
    "yellow": "ffff00",
    "yellowgreen": "9acd32",
}
# of two aliases for one RGB, the one kept (others: first alphabetically, "gray" over "grey")
_PREFERRED = {"cyan", "magenta"}
# words the CSS names are made of (the W3C camel-case spellings, e.g. DarkSlateBlue, GoldenRod)
_WORDS = (
    "alice antique aqua aquamarine azure beige bisque black blanched almond blue violet brown "
    "burly wood cadet chartreuse chocolate coral cornflower cornsilk crimson cyan dark golden rod "
    "gray green khaki magenta olive orange orchid red salmon sea slate turquoise deep pink sky "
    "dim dodger fire brick floral white forest fuchsia gainsboro ghost gold honey dew hot indian "
    "indigo ivory lavender blush lawn lemon chiffon light lime linen maroon medium spring "
    "midnight mint cream misty rose moccasin navajo navy old lace drab pale papaya whip peach "
    "puff peru plum powder purple rebecca rosy royal saddle sandy shell sienna silver snow steel "
    "tan teal thistle tomato wheat smoke yellow"
).split()


def _split_words(name: str) -> str:
    """Segment a run-together CSS name into words, fewest words first ("darkslateblue" -> ...)."""
    best: list[list[str] | None] = [None] * (len(name) + 1)
    best[0] = []
    for end in range(1, len(name) + 1):
        for start in range(end):
            w = name[start:end]
            if best[start] is not None and w in _WORDS:
                cand = best[start] + [w]
                if best[end] is None or len(cand) < len(best[end]):
                    best[end] = cand
    if best[-1] is None:
        raise ValueError(f"cannot split CSS colour name {name!r} into known words")
    return " ".join(best[-1])


def _build_colours() -> dict[str, tuple[int, int, int]]:
    by_rgb: dict[tuple[int, int, int], list[str]] = {}
    for name, hx in sorted(_CSS.items()):
        rgb = (int(hx[0:2], 16), int(hx[2:4], 16), int(hx[4:6], 16))
        by_rgb.setdefault(rgb, []).append(name)
    out: dict[str, tuple[int, int, int]] = {}
    for rgb, names in by_rgb.items():
        names = [n for n in names if "grey" not in n] or names
        pref = [n for n in names if n in _PREFERRED]
        out[_split_words((pref or names)[0])] = rgb
    return dict(sorted(out.items()))


COLOURS: dict[str, tuple[int, int, int]] = _build_colours()
COLOUR_NAMES: list[str] = list(COLOURS)
_RGB = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)


def shade_of(rgb) -> np.ndarray:
    """The second colour of a pattern: 45% of the colour if it is light, else 55% toward white."""
    rgb = np.asarray(rgb, dtype=np.float32)
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    light = (lum >= 100.0)[..., None]
    return np.where(light, rgb * 0.45, rgb + (255.0 - rgb) * 0.55)


_SHADE = shade_of(_RGB)

# --------------------------------------------------------------------------- patterns
# Patterns are built from parts a held-out pattern can share with the training ones: a line kind
# (striped / banded / pinstriped) in one of four orientations, a gradient towards one of four
# sides, a lattice kind (dotted / grid / checkered / crosshatched) at a fine or a coarse scale,
# plus "plain" and "outlined". The line coordinate of each orientation, on integer pixels:
ORIENTATIONS: dict[str, str] = {
    "horizontal": "y",
    "vertical": "x",
    "diagonal": "x + y",  # lines running from bottom-left to top-right
    "reverse-diagonal": "x - y",  # lines running from top-left to bottom-right
}
LINE_KINDS: dict[str, tuple[int, int, str]] = {  # kind -> (period, ink width, description)
    "striped": (3, 1, "1-px lines, period 3"),
    "banded": (6, 2, "2-px bands, period 6"),
    "pinstriped": (5, 1, "1-px lines, period 5"),
}
GRADIENT_SIDES: tuple[str, ...] = ("right", "left", "top", "bottom")
LATTICE_KINDS: dict[str, dict[str, tuple[int, str]]] = {  # kind -> scale -> (period, description)
    "dotted": {"fine": (3, "1-px dots on a 3-px lattice"), "coarse": (5, "2x2 spots on a 5-px lattice")},
    "grid": {"fine": (4, "1-px lines both ways, period 4"), "coarse": (6, "1-px lines both ways, period 6")},
    "checkered": {"fine": (6, "2x2 squares in alternate 3x3 cells"), "coarse": (8, "3x3 squares in alternate 4x4 cells")},
    "crosshatched": {"fine": (4, "both diagonals, period 4"), "coarse": (6, "both diagonals, period 6")},
}

# name -> one-line description of the "ink" (shade) pixels; see periodic_ink / ink_template for the rule.
PATTERN_RULES: dict[str, str] = {"plain": "no ink: the whole object in its colour"}
PATTERN_PERIODS: dict[str, int] = {}  # lattice patterns: period of the ink in x and y (for the detector's phases)
for _kind, (_per, _width, _desc) in LINE_KINDS.items():
    for _o, _u in ORIENTATIONS.items():
        PATTERN_RULES[f"{_o}-{_kind}"] = f"{_desc} along {_o} lines ({_u} % {_per} < {_width})"
        PATTERN_PERIODS[f"{_o}-{_kind}"] = _per
for _kind, _scales in LATTICE_KINDS.items():
    for _scale, (_per, _desc) in _scales.items():
        PATTERN_RULES[f"{_scale}-{_kind}"] = _desc
        PATTERN_PERIODS[f"{_scale}-{_kind}"] = _per
for _side in GRADIENT_SIDES:
    PATTERN_RULES[f"{_side}-gradient"] = f"shade rising over the {_side} third of the object"
PATTERN_RULES["outlined"] = "a 1-px outline of the object"
PATTERNS: list[str] = list(PATTERN_RULES)

CONCEPTS: list[dict[str, str]] = [{"name": n, "kind": "colour"} for n in COLOUR_NAMES] + [
    {"name": p, "kind": "pattern"} for p in PATTERNS
]


def _line_coord(orientation: str, x, y):
    return {"horizontal": y, "vertical": x, "diagonal": x + y, "reverse-diagonal": x - y}[orientation]


def periodic_ink(pattern: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ink (bool) of a lattice pattern (one of ``PATTERN_PERIODS``) on integer coordinates ``x, y``
    (any broadcastable shape)."""
    head, _, kind = pattern.rpartition("-")
    if kind in LINE_KINDS and head in ORIENTATIONS:
        per, width, _ = LINE_KINDS[kind]
        return _line_coord(head, x, y) % per < width
    if kind in LATTICE_KINDS and head in LATTICE_KINDS[kind]:
        per = LATTICE_KINDS[kind][head][0]
        if kind == "dotted":
            size = 1 if head == "fine" else 2
            return (x % per < size) & (y % per < size)
        if kind == "grid":
            return (x % per == 0) | (y % per == 0)
        if kind == "checkered":
            cell = per // 2
            return (((x // cell) + (y // cell)) % 2 == 1) & (x % cell < cell - 1) & (y % cell < cell - 1)
        if kind == "crosshatched":
            return ((x + y) % per == 0) | ((x - y) % per == 0)
    raise KeyError(f"{pattern!r} is not a lattice pattern (known: {sorted(PATTERN_PERIODS)})")


def gradient_coord(side: str, xx: torch.Tensor, yy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float (B, H, W): 0 at the object's bounding-box edge opposite ``side``, 1 at ``side``'s edge."""
    H, W = mask.shape[-2:]
    cols, rows = mask.any(1), mask.any(2)  # (B, W), (B, H)
    x0 = torch.where(cols, xx[0], W).min(1).values.float()[:, None, None]
    x1 = torch.where(cols, xx[0], -1).max(1).values.float()[:, None, None]
    y0 = torch.where(rows, yy[:, 0], H).min(1).values.float()[:, None, None]
    y1 = torch.where(rows, yy[:, 0], -1).max(1).values.float()[:, None, None]
    x, y = xx[None].float(), yy[None].float()
    if side == "right":
        return (x - x0) / (x1 - x0).clamp_min(1)
    if side == "left":
        return (x1 - x) / (x1 - x0).clamp_min(1)
    if side == "bottom":
        return (y - y0) / (y1 - y0).clamp_min(1)
    if side == "top":
        return (y1 - y) / (y1 - y0).clamp_min(1)
    raise KeyError(f"gradient side {side!r}: expected one of {GRADIENT_SIDES}")


def erode(mask: torch.Tensor) -> torch.Tensor:
    """4-neighbour binary erosion of a (B, H, W) bool mask (outside the image counts as empty)."""
    m = torch.nn.functional.pad(mask.float()[:, None], (1, 1, 1, 1))
    e = -torch.nn.functional.max_pool2d(-m, 3, 1, 0)  # 8-neighbour min
    return e[:, 0] > 0.5


def ink_template(pattern: str, mask: torch.Tensor, phase: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Float (B, H, W) shade amount of ``pattern`` for object masks ``mask`` (B, H, W) bool."""
    B, H, W = mask.shape
    dev = mask.device
    yy, xx = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    fm = mask.float()
    if pattern == "plain":
        return torch.zeros_like(fm)
    if pattern.endswith("-gradient"):
        u = gradient_coord(pattern[: -len("-gradient")], xx, yy, mask)
        return (3 * u - 2).clamp(0, 1) * fm
    if pattern == "outlined":
        return (mask & ~erode(mask)).float()
    ink = periodic_ink(pattern, xx + phase[0], yy + phase[1])
    return ink[None].float() * fm


# --------------------------------------------------------------------------- specs and captions
@dataclass
class Spec:
    """One image: the object's attributes and which of them its caption names."""

    shape: str
    colour: str
    pattern: str
    cx: float  # centre x in pixels (circle/square centre; triangle's circumscribing centre)
    cy: float
    r: float  # half-size in pixels
    say_colour: bool = True
    say_pattern: bool = True


def sample_specs(
    n: int,
    rng: np.random.Generator,
    p_colour: float = 0.8,
    p_pattern: float = 0.6,
    r_range: tuple[float, float] = (6.0, 11.0),
    shapes: list[str] | None = None,
    colours: list[str] | None = None,
    patterns: list[str] | None = None,
) -> list[Spec]:
    """Draw ``n`` random specs; each caption names colour/pattern with prob ``p_colour/p_pattern``."""
    shapes = shapes or SHAPES
    colours = colours or COLOUR_NAMES
    patterns = patterns or PATTERNS
    out = []
    for _ in range(n):
        r = float(rng.uniform(*r_range))
        cx = float(rng.uniform(r + 1, SIZE - r - 1))
        cy = float(rng.uniform(r + 1, SIZE - r - 1))
        out.append(
            Spec(
                shape=str(rng.choice(shapes)),
                colour=str(rng.choice(colours)),
                pattern=str(rng.choice(patterns)),
                cx=cx,
                cy=cy,
                r=r,
                say_colour=bool(rng.random() < p_colour),
                say_pattern=bool(rng.random() < p_pattern),
            )
        )
    return out


def caption(spec: Spec) -> str:
    """'a {colour} {pattern} {shape}', leaving out what the spec does not name."""
    words = ["a"]
    if spec.say_colour:
        words.append(spec.colour)
    if spec.say_pattern:
        words.append(spec.pattern)
    words.append(spec.shape)
    return " ".join(words)


def parse_caption(text: str) -> dict[str, str | None]:
    """Inverse of :func:`caption` for captions it produced: {'colour', 'pattern', 'shape'}."""
    t = re.sub(r"^an? ", "", text.strip().lower())
    out: dict[str, str | None] = {"colour": None, "pattern": None, "shape": None}
    for s in SHAPES:
        if t.endswith(s):
            out["shape"], t = s, t[: -len(s)].strip()
    for p in sorted(PATTERNS, key=len, reverse=True):
        if t.endswith(p):
            out["pattern"], t = p, t[: -len(p)].strip()
            break
    if t in COLOURS:
        out["colour"] = t
    return out


def neutral_prompt(shape: str) -> str:
    return f"a {shape}"


# --------------------------------------------------------------------------- rendering
def shape_masks(specs: list[Spec]) -> torch.Tensor:
    """Bool (B, 32, 32) object masks (pixel centres inside the shape)."""
    B = len(specs)
    cx = torch.tensor([s.cx for s in specs])[:, None, None]
    cy = torch.tensor([s.cy for s in specs])[:, None, None]
    r = torch.tensor([s.r for s in specs])[:, None, None]
    kind = torch.tensor([SHAPES.index(s.shape) for s in specs])[:, None, None]
    c = torch.arange(SIZE, dtype=torch.float32) + 0.5
    y, x = c[None, :, None], c[None, None, :]
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    h = r * 0.85
    square = ((x - cx).abs() <= h) & ((y - cy).abs() <= h)
    top, bottom = cy - r, cy + 0.8 * r
    t = (y - top) / (bottom - top)
    triangle = (t >= 0) & (t <= 1) & ((x - cx).abs() <= t * r * 1.05)
    masks = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    assert masks.shape == (B, SIZE, SIZE)
    return masks


def render_batch(specs: list[Spec]) -> torch.Tensor:
    """Float (B, 3, 32, 32) images in [0, 1] (exact 8-bit values divided by 255)."""
    mask = shape_masks(specs)
    ink = torch.zeros(mask.shape)
    pidx = [PATTERNS.index(s.pattern) for s in specs]
    for p in set(pidx):
        rows = [i for i, q in enumerate(pidx) if q == p]
        ink[rows] = ink_template(PATTERNS[p], mask[rows])
    cidx = [COLOUR_NAMES.index(s.colour) for s in specs]
    col = torch.from_numpy(_RGB[cidx])[:, :, None, None]
    sh = torch.from_numpy(_SHADE[cidx])[:, :, None, None]
    obj = col + (sh - col) * ink[:, None]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None]
    img = torch.where(mask[:, None], obj, bg)
    return img.round() / 255.0


def render(spec: Spec) -> np.ndarray:
    """uint8 (32, 32, 3) image of one spec."""
    img = render_batch([spec])[0]
    return (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] -> (B, H, W, 3) uint8."""
    return (imgs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


