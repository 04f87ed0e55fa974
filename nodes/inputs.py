"""What the nodes' widgets and inputs may hold: parsing and checks, each error naming the fix.

Kept apart from the node definitions so the rules are read (and tested) in one place.
"""

from __future__ import annotations

import math

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


MAX_CONCEPT_LINES = 16
MAX_CONCEPT_WEIGHT = 10.0
#: the longest text each text widget takes (checked before any parsing; tooltips state it)
MAX_CONCEPT_CHARS = 2000
MAX_BLOCK_CHARS = 20000
MAX_BATCH_CHARS = 4000
_NUMBER_CHARS = frozenset("0123456789.eE+-")


def check_length(text: str, limit: int, what: str) -> str:
    """``text`` (``""`` for ``None``) when it has at most ``limit`` characters, else an error naming the limit."""
    text = text or ""
    if not isinstance(text, str):
        raise HyperTransportError(f"{what} is a {type(text).__name__}, not text. Fix: type text in the widget.")
    if len(text) > limit:
        raise HyperTransportError(f"{what} has {len(text):,} characters, more than the {limit:,} it takes. "
                                  "Fix: shorten it.")
    return text


def parse_number(token: str) -> float | None:
    """A plain decimal number (``0.7``, ``-1``, ``2e-1``) of at most 32 characters, else ``None`` (no NaN, Inf or
    ``1_000``); linear in the token's length."""
    if not token or len(token) > 32 or not set(token) <= _NUMBER_CHARS:
        return None
    try:
        return float(token)
    except ValueError:
        return None


def _is_emphasis(line: str) -> bool:
    """ComfyUI's prompt emphasis ``(text:1.2)``: parenthesised, and after the last ``:`` at most one token."""
    if len(line) < 3 or line[0] != "(" or line[-1] != ")" or ":" not in line:
        return False
    return len(line[1:-1].rpartition(":")[2].split()) <= 1


def parse_concepts(text: str) -> list[tuple[str, float]]:
    """One concept per line, ``text * weight`` for a weight (negative subtracts), else weight 1.

    The weights mix concept *embeddings* (Combine Concepts' weighted sum), which is not what ComfyUI's
    prompt emphasis ``(word:1.2)`` does to tokens, so that spelling is refused with the fix. At most
    :data:`MAX_CONCEPT_CHARS` characters; parsing is linear in the text's length (it runs while ComfyUI
    validates a prompt, on the server's event loop).
    """
    text = check_length(text, MAX_CONCEPT_CHARS, "Encode Concept: the text")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if _is_emphasis(line):
            raise HyperTransportError(
                f"Encode Concept: {line[:80]!r} looks like ComfyUI's prompt emphasis, which weights tokens; here weights "
                "mix whole concepts. Fix: write the line as 'text * weight', e.g. 'watercolor * 0.7'."
            )
        head, star, tail = line.rpartition("*")
        token = tail.strip()
        if star and token and len(token.split()) == 1:
            w = parse_number(token)
            if w is None:
                raise HyperTransportError(
                    f"Encode Concept: in {line[:80]!r} the weight {token[:40]!r} is not a number. Fix: write e.g. "
                    "'watercolor * 0.7'."
                )
            if not math.isfinite(w) or abs(w) > MAX_CONCEPT_WEIGHT:
                raise HyperTransportError(
                    f"Encode Concept: in {line[:80]!r} the weight {w:g} is outside -{MAX_CONCEPT_WEIGHT:g}..{MAX_CONCEPT_WEIGHT:g}. "
                    "Fix: use a weight like 0.5 or -1."
                )
            out.append((head.strip(), w))
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
    text = check_length(text, MAX_BLOCK_CHARS, "Apply Steering (Advanced): block_strengths")
    for i, line in enumerate(text.splitlines(), 1):
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
    text = check_length(text, MAX_BATCH_CHARS, f"{node}: batch_strengths")
    items = [x.strip() for x in text.replace(";", ",").split(",") if x.strip()]
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
