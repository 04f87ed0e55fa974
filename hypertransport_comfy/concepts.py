"""What a backend trains on: the concepts, their neutral (source) and concept (target) prompts, reference images.

Two sources share one interface (:class:`ConceptSource`):

* :class:`ListedConcepts`: a concept list file (``concept<TAB>category[<TAB>template]``, see
  ``trainer/data/README.md``) and a file of neutral prompts, for real models; a concept is added to a
  neutral prompt by its category's template;
* :class:`WorldConcepts`: the embedded world's 165 concepts, prompts ``"a {shape}"`` /
  ``"a {concept} {shape}"``, and reference images that are ground-truth renders of the concept.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hypertransport_core.errors import HyperTransportError

DATA = Path(__file__).resolve().parents[1] / "trainer" / "data"  # the training command's shipped lists (a path, not an import)
CONCEPTS_TSV = str(DATA / "concepts.tsv")
NEUTRAL_PROMPTS = str(DATA / "neutral_prompts.txt")
HOLDOUT_TXT = str(DATA / "holdout.txt")

#: Target-prompt templates per concept category (``{prompt}`` a neutral prompt, ``{concept}`` the concept).
#: A third column in the concept file overrides the template of one concept.
TEMPLATES: dict[str, str] = {
    "style": "{prompt}, in the style of {concept}",
    "medium": "{prompt}, {concept}",
    "material": "{prompt}, made of {concept}",
    "object": "{prompt}, with a {concept}",
    "perspective": "{prompt}, {concept}",
    "lighting": "{prompt}, {concept}",
    "mood": "{prompt}, {concept} mood",
    "era": "{prompt}, {concept}",
    "colour": "{prompt}, in {concept} colours",
    "pattern": "{prompt}, covered in a {concept} pattern",
    "weather": "{prompt}, {concept}",
    "place": "{prompt}, in {concept}",
}
DEFAULT_TEMPLATE = "{prompt}, {concept}"


@dataclass(frozen=True)
class ConceptInfo:
    name: str  # the concept's words, what the user types ("dark slate blue", "watercolor")
    kind: str  # "colour" or "pattern" in the world; the category of a concept list
    template: str = DEFAULT_TEMPLATE  # how the concept is added to a neutral prompt


class ConceptSource:
    """The interface: ``concepts``, :meth:`concept_info`, :meth:`source_prompts`, :meth:`target_prompts`,
    and :meth:`reference_images` (``None`` when the model must generate them)."""

    concepts: list[ConceptInfo]

    def concept_info(self, name: str) -> ConceptInfo:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"{name!r} is not a concept of this backend")

    def source_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        raise NotImplementedError

    def target_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        raise NotImplementedError

    def reference_images(self, concept: str, n: int, rng: np.random.Generator) -> torch.Tensor | None:
        """``(n, H, W, 3)`` in [0, 1] showing the concept, or ``None`` (the backend samples the model)."""
        return None


def read_concepts(path: str = CONCEPTS_TSV) -> list[ConceptInfo]:
    """A concept list: tab-separated ``concept<TAB>category[<TAB>template]``, ``#`` comments, a header
    row ``concept\\tcategory`` allowed. See ``trainer/data/README.md``."""
    if not os.path.isfile(path):
        raise HyperTransportError(f"concept list {path!r} does not exist. Fix: pass --concept-list FILE (format: trainer/data/README.md).")
    out: list[ConceptInfo] = []
    seen: set[str] = set()
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or not row[0].strip() or row[0].startswith("#") or (i == 1 and row[0].strip() == "concept"):
                continue
            name = row[0].strip()
            cat = row[1].strip() if len(row) > 1 and row[1].strip() else "other"
            tpl = row[2].strip() if len(row) > 2 and row[2].strip() else TEMPLATES.get(cat, DEFAULT_TEMPLATE)
            if "{prompt}" not in tpl or "{concept}" not in tpl:
                raise HyperTransportError(f"{path}:{i}: template {tpl!r} needs both {{prompt}} and {{concept}}.")
            if name in seen:
                raise HyperTransportError(f"{path}:{i}: concept {name!r} is listed twice. Fix: keep one line per concept.")
            seen.add(name)
            out.append(ConceptInfo(name, cat, tpl))
    if not out:
        raise HyperTransportError(f"concept list {path!r} is empty.")
    return out


def read_prompts(path: str = NEUTRAL_PROMPTS) -> list[str]:
    if not os.path.isfile(path):
        raise HyperTransportError(f"neutral prompt file {path!r} does not exist. Fix: pass --neutral-prompts FILE (one prompt a line).")
    with open(path) as f:
        out = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    if len(out) < 2:
        raise HyperTransportError(f"{path!r}: need at least 2 neutral prompts.")
    return out


class ListedConcepts(ConceptSource):
    """A concept list and neutral prompts (real models)."""

    def __init__(self, concepts: Sequence[ConceptInfo], neutral: Sequence[str]):
        self.concepts, self.neutral = list(concepts), list(neutral)

    @classmethod
    def from_files(cls, concept_list: str = CONCEPTS_TSV, neutral_prompts: str = NEUTRAL_PROMPTS) -> ListedConcepts:
        return cls(read_concepts(concept_list), read_prompts(neutral_prompts))

    def source_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` neutral prompts drawn (with replacement) from the neutral prompt list."""
        return [self.neutral[int(i)] for i in rng.integers(0, len(self.neutral), n)]

    def target_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        """Neutral prompts with the concept added by its category's template."""
        tpl = self.concept_info(concept).template
        return [tpl.format(prompt=p, concept=concept) for p in self.source_prompts(n, rng)]


class WorldConcepts(ConceptSource):
    """The embedded world's concepts (139 colours, 26 patterns) and prompts."""

    def __init__(self):
        from hypertransport_world import scene

        self.S = scene
        self.concepts = [ConceptInfo(c["name"], c["kind"]) for c in scene.CONCEPTS]
        self._by_name = {c.name: c for c in self.concepts}

    def concept_info(self, name: str) -> ConceptInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a concept of the embedded world (hypertransport_world/scene.py)") from None

    def source_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """Neutral prompts: ``"a {shape}"`` (colour and pattern left to the model)."""
        return [self.S.neutral_prompt(str(s)) for s in rng.choice(self.S.SHAPES, n)]

    def target_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        """The same prompts with the concept: ``"a {concept} {shape}"``."""
        return [f"a {concept} {s}" for s in rng.choice(self.S.SHAPES, n)]

    def paired_prompts(self, concept: str, shapes: Sequence[str]) -> tuple[list[str], list[str]]:
        """(neutral, prompted) prompts for the same shapes, for evaluation."""
        return [self.S.neutral_prompt(s) for s in shapes], [f"a {concept} {s}" for s in shapes]

    def reference_images(self, concept: str, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` ground-truth renders showing the concept (other attributes random), ``(n, H, W, 3)`` in [0, 1]."""
        info = self.concept_info(concept)
        kw = {"colours": [concept]} if info.kind == "colour" else {"patterns": [concept]}
        specs = self.S.sample_specs(n, rng, **kw)
        return self.S.render_batch(specs).permute(0, 2, 3, 1)
