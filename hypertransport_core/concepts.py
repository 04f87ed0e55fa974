"""A concept: an L2-normalized CLIP embedding plus where it came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import HyperTransportError

MODALITIES = ("text", "image", "mixed")


@dataclass(frozen=True)
class Concept:
    """What Encode Concept / Encode Reference Image produce and a hypernet consumes.

    Attributes:
        embedding: ``(d,)`` float32, L2-normalized.
        modality: ``"text"``, ``"image"`` or ``"mixed"`` (a combination of both).
        encoder: the encoder's identity (``{"arch", "fingerprint", "embed_dim"}``), checked by the hypernet.
        label: human-readable description.
        parts: for combinations, ``[(label, modality, weight), ...]``.
    """

    embedding: torch.Tensor
    modality: str
    encoder: dict
    label: str = ""
    parts: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise HyperTransportError(f"concept modality {self.modality!r} is not one of {MODALITIES}.")
        if self.embedding.ndim != 1:
            raise HyperTransportError(f"concept embedding must be 1-D (d,), found shape {tuple(self.embedding.shape)}.")
        if not torch.isfinite(self.embedding).all():
            raise HyperTransportError("concept embedding holds NaN/Inf. Fix: re-encode the concept (check the encoder weights).")


def _same_encoder(a: dict, b: dict) -> bool:
    return a.get("arch") == b.get("arch") and a.get("fingerprint") == b.get("fingerprint")


def combine_concepts(parts: Sequence[tuple[Concept, float]], *, normalize: bool = True) -> Concept:
    """Weighted sum of concept embeddings (a negative weight subtracts), re-normalized by default.

    All parts must come from one encoder.
    """
    if not parts:
        raise HyperTransportError("nothing to combine. Fix: connect at least one CONCEPT with a non-zero weight.")
    enc = parts[0][0].encoder
    for c, _ in parts[1:]:
        if not _same_encoder(c.encoder, enc):
            raise HyperTransportError(
                f"concepts from different encoders cannot be combined: {enc.get('arch')} vs {c.encoder.get('arch')}. "
                "Fix: encode every concept with the encoder of one hypernet."
            )
    e = sum(float(w) * c.embedding.float() for c, w in parts)
    norm = float(e.norm())
    if norm < 1e-8:
        raise HyperTransportError(
            "the weighted concepts cancel out (zero embedding). Fix: change the weights so they do not sum to nothing."
        )
    if normalize:
        e = e / norm
    modalities = {c.modality for c, _ in parts}
    modality = modalities.pop() if len(modalities) == 1 else "mixed"
    label = " ".join(f"{w:+g}*{c.label}" for c, w in parts)
    flat = tuple(p for c, w in parts for p in (c.parts or ((c.label, c.modality, 1.0),)) for p in [(p[0], p[1], p[2] * w)])
    return Concept(e, modality, enc, label, flat)
