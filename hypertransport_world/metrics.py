"""Pixel metrics of the embedded world (no learned judge).

Every function takes one image as uint8 (H, W, 3), float (H, W, 3) in [0, 255], or a torch float
tensor (3, H, W) in [0, 1] (what the sampler returns, one row at a time).

- Object mask: pixels farther than ``MASK_THRESHOLD`` (38 RGB units) from the fixed background,
  largest 4-connected component.
- Colour: per-channel median of the object's interior (mask eroded by 1 px; patterns cover < 50%
  of it, so on ground truth this is the object colour exactly).
- Shape: bounding-box fill ratio (square ~1.0, circle ~0.79, triangle ~0.5).
- Pattern: the "ink" map (distance of each interior pixel from the object colour) correlated with
  each pattern's template at every lattice phase; the score is the best Pearson correlation, in
  [0, 1]. 'outlined' compares shade-coloured pixels on the border and inside; 'plain' is
  ``1 - best other score``.

Example::

    from hypertransport_world import metrics as M
    M.colour_error(img, (255, 0, 0)), M.shape_of(img), M.pattern_of(img), M.inducement(img, "red")
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from . import scene as W

COLOUR_TOLERANCE = 40.0  # RGB units: a colour "hit"
MAX_RGB_DISTANCE = float(np.sqrt(3) * 255)
PLAIN_MAX_SCORE = 0.3  # an object whose best non-plain pattern scores at most this is plain


def as_rgb255(img) -> np.ndarray:
    """Any supported image -> float64 (H, W, 3) in [0, 255]."""
    if isinstance(img, torch.Tensor):
        a = img.detach().float().cpu()
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
            a = a.permute(1, 2, 0)
        arr = a.numpy().astype(np.float64)
        return arr * 255.0 if arr.max() <= 1.0 + 1e-6 else arr
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64)
    arr = arr.astype(np.float64)
    return arr * 255.0 if arr.max() <= 1.0 + 1e-6 else arr


def object_mask(img) -> np.ndarray:
    """Bool (H, W): the largest 4-connected blob of pixels far from the background colour."""
    a = as_rgb255(img)
    far = np.linalg.norm(a - np.array(W.BACKGROUND, dtype=np.float64), axis=-1) > W.MASK_THRESHOLD
    lab, n = ndimage.label(far)
    if n <= 1:
        return far
    sizes = ndimage.sum(far, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def object_colour(img, mask: np.ndarray | None = None) -> np.ndarray | None:
    """Per-channel median RGB (3,) of the object's interior, or None if there is no object.

    The interior is the mask eroded by one pixel (so an outline or blurred edges do not count),
    or the whole mask when erosion leaves nothing.
    """
    a = as_rgb255(img)
    m = object_mask(a) if mask is None else mask
    if not m.any():
        return None
    inner = ndimage.binary_erosion(m, structure=np.ones((3, 3)))
    return np.median(a[inner if inner.sum() >= 3 else m], axis=0)


def colour_error(img, colour_rgb) -> float:
    """Euclidean RGB distance between the object's median colour and ``colour_rgb`` (0..441.7).

    No object at all counts as the maximum distance.
    """
    c = object_colour(img)
    if c is None:
        return MAX_RGB_DISTANCE
    return float(np.linalg.norm(c - np.asarray(colour_rgb, dtype=np.float64)))


def colour_hit(img, colour_rgb, tol: float = COLOUR_TOLERANCE) -> bool:
    """True when the object's colour is within ``tol`` (40) RGB units of ``colour_rgb``."""
    return colour_error(img, colour_rgb) <= tol


def fill_ratio(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    return float(mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)))


def shape_of(img) -> str | None:
    """'square' (bbox fill > 0.9), 'circle' (> 0.64) or 'triangle'; None if no object."""
    m = object_mask(img)
    if m.sum() < 4:
        return None
    f = fill_ratio(m)
    return "square" if f > 0.9 else "circle" if f > 0.64 else "triangle"


def position_of(img) -> tuple[float, float] | None:
    """Centroid (x, y) of the object mask in pixel units (pixel centres at +0.5); None if empty."""
    m = object_mask(img)
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


_LATTICE: tuple[list[str], np.ndarray] | None = None


def _lattice_templates() -> tuple[list[str], np.ndarray]:
    """Every lattice pattern at every phase on the full image: (names (N,), bool (N, H, W))."""
    global _LATTICE
    if _LATTICE is None:
        yy, xx = torch.meshgrid(torch.arange(W.SIZE), torch.arange(W.SIZE), indexing="ij")
        names, temps = [], []
        for p, per in W.PATTERN_PERIODS.items():
            for dx in range(per):
                for dy in range(per):
                    names.append(p)
                    temps.append(W.periodic_ink(p, xx + dx, yy + dy).numpy())
        _LATTICE = (names, np.stack(temps))
    return _LATTICE


def _corrs(vals: np.ndarray, temps: np.ndarray) -> np.ndarray:
    """Pearson correlation of vals (K,) with each row of temps (N, K); 0 for constant rows."""
    a = vals - vals.mean()
    t = temps - temps.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum() * (t * t).sum(1))
    return np.where(den > 1e-9, (t @ a) / np.maximum(den, 1e-9), 0.0)


def _interior(m: np.ndarray) -> np.ndarray:
    inner = ndimage.binary_erosion(m, structure=np.ones((3, 3)))
    return inner if inner.sum() >= 4 else m


def _outline_score(a: np.ndarray, m: np.ndarray, c: np.ndarray) -> float:
    """Share of border pixels that look like the shade, minus the same share inside.

    A border pixel counts as shade when it is within 80 RGB units of ``shade_of(c)`` and closer to
    it than to the segment from the object colour to the background (which is what a blurred edge
    looks like), so soft edges do not read as an outline.
    """
    sh = W.shade_of(c).astype(np.float64)
    bg = np.array(W.BACKGROUND, dtype=np.float64)

    def shade_like(px: np.ndarray) -> np.ndarray:
        d_sh = np.linalg.norm(px - sh, axis=-1)
        seg = bg - c
        t = np.clip(((px - c) @ seg) / max(seg @ seg, 1e-9), 0, 1)
        d_seg = np.linalg.norm(px - (c + t[:, None] * seg), axis=-1)
        return (d_sh < 2 * COLOUR_TOLERANCE) & (d_sh < d_seg)

    best = 0.0
    for k in (1, 2):  # a crisp 1-px outline, or a soft one spread over the outer 2 px
        core = ndimage.binary_erosion(m, structure=np.ones((3, 3)), iterations=k)
        border = m & ~core
        if core.sum() < 4 or not border.any():
            continue
        best = max(best, float(shade_like(a[border]).mean() - shade_like(a[core]).mean()))
    return best


def pattern_scores(img) -> dict[str, float]:
    """Score in [0, 1] of every pattern in ``W.PATTERNS`` for the image's object.

    Lattice patterns and gradients: the best Pearson correlation (over a lattice pattern's
    phases) between the ink map and the pattern's template on the object's interior (mask eroded
    by one pixel, so soft edges do not count). 'outlined': see ``_outline_score``. 'plain':
    ``1 - max(other scores)``.
    """
    a = as_rgb255(img)
    m = object_mask(a)
    out = {p: 0.0 for p in W.PATTERNS}
    if m.sum() < 4:
        return out
    inner = _interior(m)
    c = object_colour(a, m)
    ink = np.linalg.norm(a - c, axis=-1)
    vals = ink[inner]
    if vals.std() > 1e-6:
        names, temps = _lattice_templates()
        for p, v in zip(names, _corrs(vals, temps[:, inner].astype(np.float64))):
            out[p] = max(out[p], float(v))
        mt = torch.from_numpy(m)[None]  # gradients: the renderer's own template on this object's mask
        extra = [(g, W.ink_template(g, mt)[0].numpy()[inner]) for g in W.PATTERNS if g.endswith("-gradient")]
        t = np.stack([e for _, e in extra]).astype(np.float64)
        for (p, _), v in zip(extra, _corrs(vals, t)):
            out[p] = max(out[p], float(v))
    out["outlined"] = _outline_score(a, m, c)
    out = {p: min(max(v, 0.0), 1.0) for p, v in out.items()}
    out["plain"] = 1.0 - max(v for p, v in out.items() if p != "plain")
    return out


def pattern_of(img) -> str | None:
    """The detected pattern: the best-scoring one ('plain' when no other pattern scores above
    ``PLAIN_MAX_SCORE``); None if there is no object."""
    s = pattern_scores(img)
    if all(v == 0.0 for v in s.values()):
        return None
    best = max((p for p in s if p != "plain"), key=s.get)
    return best if s[best] > PLAIN_MAX_SCORE else "plain"


def pattern_score(img, pattern: str) -> float:
    """Score in [0, 1] of one pattern (see :func:`pattern_scores`)."""
    if pattern not in W.PATTERNS:
        raise KeyError(f"unknown pattern {pattern!r}; known: {W.PATTERNS}")
    return pattern_scores(img)[pattern]


def _concept(concept) -> dict:
    if isinstance(concept, dict):
        return concept
    if concept in W.COLOURS:
        return {"name": concept, "kind": "colour"}
    if concept in W.PATTERNS:
        return {"name": concept, "kind": "pattern"}
    if concept in W.SHAPES:
        return {"name": concept, "kind": "shape"}
    raise KeyError(f"unknown concept {concept!r}: not a colour, pattern or shape of the world")


def inducement(img, concept) -> float:
    """How much of ``concept`` the image shows, in [0, 1] (higher = more).

    colour: ``max(0, 1 - colour_error / 200)`` (0.8 at the 40-unit hit tolerance);
    pattern: ``pattern_score``; shape: 1 if ``shape_of`` matches else 0.
    ``concept`` is a name or a ``{"name", "kind"}`` dict from ``W.CONCEPTS``.
    """
    c = _concept(concept)
    if c["kind"] == "colour":
        return max(0.0, 1.0 - colour_error(img, W.COLOURS[c["name"]]) / 200.0)
    if c["kind"] == "pattern":
        return pattern_score(img, c["name"])
    if c["kind"] == "shape":
        return float(shape_of(img) == c["name"])
    raise KeyError(f"unknown concept kind {c['kind']!r}; expected 'colour', 'pattern' or 'shape'")


def off_kind_change(img, ref, kind: str) -> float:
    """How much steering towards a concept of ``kind`` changed the *other* kind of the object, ``img`` against the
    unsteered ``ref`` of the same seed, in [0, 1] (0: untouched; NaN when either image has no object):

    * ``"colour"``: the largest change of any pattern's score (:func:`pattern_scores`, 'plain' left out): a colour
      that draws stripes moves it;
    * ``"pattern"``: the object's colour shift, ``|colour - colour_ref| / 200`` in RGB units (the scale of colour
      inducement), capped at 1.
    """
    if kind == "colour":
        a, b = as_rgb255(img), as_rgb255(ref)
        if object_mask(a).sum() < 4 or object_mask(b).sum() < 4:
            return float("nan")
        s, r = pattern_scores(a), pattern_scores(b)
        return float(max(abs(s[p] - r[p]) for p in s if p != "plain"))
    if kind == "pattern":
        c, r = object_colour(img), object_colour(ref)
        if c is None or r is None:
            return float("nan")
        return float(min(1.0, np.linalg.norm(np.asarray(c, float) - np.asarray(r, float)) / 200.0))
    raise KeyError(f"off_kind_change: kind {kind!r} has no other kind to measure; expected 'colour' or 'pattern'")

