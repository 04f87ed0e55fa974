"""What the nodes' widgets and inputs may hold: parsing and checks, each error naming the fix.

Kept apart from the node definitions so the rules are read (and tested) in one place.
"""

from __future__ import annotations

import math
import re

from hypertransport_core.errors import HyperTransportError
from hypertransport_core.interventions import block_matches
from hypertransport_core.sites import check_sites, detect_family

from . import patching


def check_model(model, family: str, sites, what: str) -> None:
    """Refuse, before sampling, a hypernet/steering made for another model family or size."""
    dm = model.get_model_object("diffusion_model")
    found = detect_family(dm)
    if family not in ("generic", found):
        raise HyperTransportError(
            f"{what} was trained for model family {family!r}, but the MODEL is {found!r} "
            f"({type(dm).__name__}). Fix: load a hypernet/steering trained for {found} in Load HyperNet / "
            f"Load Steering, or load a {family} checkpoint in the model loader."
        )
    check_sites(sites, dm, what=what)


_NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
_WEIGHTED = re.compile(r"^(?P<text>.*?)\s*\*\s*(?P<w>\S+)$")
_EMPHASIS = re.compile(r"^\(.*:\s*\S*\s*\)$")
MAX_CONCEPT_LINES = 16
MAX_CONCEPT_WEIGHT = 10.0


def parse_concepts(text: str) -> list[tuple[str, float]]:
    """One concept per line, ``text * weight`` for a weight (negative subtracts), else weight 1.

    The weights mix concept *embeddings* (Combine Concepts' weighted sum), which is not what ComfyUI's
    prompt emphasis ``(word:1.2)`` does to tokens, so that spelling is refused with the fix.
    """
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        if _EMPHASIS.match(line):
            raise HyperTransportError(
                f"Encode Concept: {line!r} looks like ComfyUI's prompt emphasis, which weights tokens; here weights mix "
                "whole concepts. Fix: write the line as 'text * weight', e.g. 'watercolor * 0.7'."
            )
        m = _WEIGHTED.match(line)
        if m:
            if not re.fullmatch(_NUMBER, m["w"]):
                raise HyperTransportError(
                    f"Encode Concept: in {line!r} the weight {m['w']!r} is not a number. Fix: write e.g. 'watercolor * 0.7'."
                )
            w = float(m["w"])
            if not math.isfinite(w) or abs(w) > MAX_CONCEPT_WEIGHT:
                raise HyperTransportError(
                    f"Encode Concept: in {line!r} the weight {w:g} is outside -{MAX_CONCEPT_WEIGHT:g}..{MAX_CONCEPT_WEIGHT:g}. "
                    "Fix: use a weight like 0.5 or -1."
                )
            out.append((m["text"].strip(), w))
        else:
            out.append((line, 1.0))
        if len(out) > MAX_CONCEPT_LINES:
            raise HyperTransportError(
                f"Encode Concept: more than {MAX_CONCEPT_LINES} concept lines. Fix: combine at most {MAX_CONCEPT_LINES} "
                "concepts in one node (chain Combine Concepts for more)."
            )
    if not out or any(not t for t, _ in out):
        raise HyperTransportError(
            "Encode Concept: the concept text is empty. Fix: type a concept, e.g. 'watercolor', one per line, "
            "optionally weighted as 'watercolor * 0.7'."
        )
    return out


def parse_block_strengths(text: str) -> dict[str, float]:
    """``block: multiplier`` per line (``*`` = every other site); empty means 1 everywhere. A block is a site
    name or a prefix of whole dotted segments (``blocks.2`` is block 2, never block 20)."""
    out: dict[str, float] = {}
    lo, hi = patching.STRENGTH_RANGE
    for i, line in enumerate((text or "").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, val = line.rpartition(":") if ":" in line else line.rpartition("=")
        try:
            v = float(val)
        except ValueError:
            v = float("nan")
        if not sep or not key.strip() or not math.isfinite(v):
            raise HyperTransportError(
                f"Apply Steering (Advanced): block_strengths line {i} {line!r} is not 'block: number'. "
                "Fix: write e.g. 'input_blocks: 0.5' or '*: 1.0', one per line."
            )
        if not lo <= v <= hi:
            raise HyperTransportError(
                f"Apply Steering (Advanced): block_strengths line {i} gives {key.strip()!r} the multiplier {v:g}, outside "
                f"{lo:g}..{hi:g}. Fix: use a multiplier like 0.5 (or 0 to switch the block off)."
            )
        out[key.strip()] = v
    return out


def check_blocks(mult: dict[str, float], sites) -> None:
    """Refuse a block name that matches no site (a typo would otherwise steer that block at full strength)."""
    names = [s.name for s in sites]
    for key in mult:
        if key != "*" and not any(block_matches(key, n) for n in names):
            tops = sorted({n.split(".")[0].split("@")[0] for n in names})
            raise HyperTransportError(
                f"Apply Steering (Advanced): block {key!r} matches none of the steering's {len(names)} sites. "
                f"Fix: use a site name or a prefix of whole dotted segments, e.g. {', '.join(tops[:6])} "
                "(Load HyperNet's info lists the blocks)."
            )


def parse_batch_strengths(text: str, node: str) -> tuple[float, ...] | None:
    """``"-1, 0, 0.5, 1"`` → one strength per image of the batch (``None`` when empty)."""
    items = [x.strip() for x in (text or "").replace(";", ",").split(",") if x.strip()]
    if not items:
        return None
    try:
        vals = tuple(float(x) for x in items)
    except ValueError:
        raise HyperTransportError(f"{node}: batch_strengths {text!r} is not a comma-separated list of numbers. "
                                  "Fix: write e.g. '-1, 0, 0.5, 1' (one per image of the batch).") from None
    lo, hi = patching.STRENGTH_RANGE
    if len(vals) > 256 or not all(lo <= v <= hi for v in vals):  # NaN fails the range test too
        raise HyperTransportError(f"{node}: batch_strengths {text!r}: at most 256 numbers from {lo:g} to {hi:g}. "
                                  "Fix: write e.g. '-1, 0, 0.5, 1'.")
    return vals
