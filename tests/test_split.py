"""The concept split: test concepts (held out), a validation set carved from the rest, per kind, seeded."""

from __future__ import annotations

import pytest

from hypertransport_comfy.concepts import ConceptInfo, WorldConcepts
from hypertransport_core.errors import HyperTransportError
from trainer.config import TrainConfig
from trainer.train import split_concepts

WORLD = WorldConcepts().concepts


def _kinds(names):
    kind = {c.name: c.kind for c in WORLD}
    return {k: sum(kind[n] == k for n in names) for k in ("colour", "pattern")}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_disjoint_sets_with_each_kinds_share(seed):
    train, val, test = split_concepts(WORLD, TrainConfig(seed=seed))
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert len(train) + len(val) + len(test) == len(WORLD) == 165
    assert _kinds(test) == {"colour": round(0.25 * 139), "pattern": round(0.25 * 26)}
    rest = {"colour": 139 - _kinds(test)["colour"], "pattern": 26 - _kinds(test)["pattern"]}
    assert _kinds(val) == {k: round(0.15 * n) for k, n in rest.items()}  # here each kind's rounding sums to the total
    assert split_concepts(WORLD, TrainConfig(seed=seed)) == (train, val, test)  # a pure function of the seed


def test_splits_of_different_seeds_differ_and_val_can_be_off():
    t0 = split_concepts(WORLD, TrainConfig(seed=0))[2]
    t1 = split_concepts(WORLD, TrainConfig(seed=1))[2]
    assert len(set(t0) & set(t1)) < len(t0) // 2
    train, val, _ = split_concepts(WORLD, TrainConfig(seed=0, val_frac=0.0))
    assert val == [] and len(train) == 165 - len(t0)


def test_holdout_file_fixes_the_test_set(tmp_path):
    f = tmp_path / "held.txt"
    f.write_text("navy\ncoarse-checkered\n")
    train, val, test = split_concepts(WORLD, TrainConfig(holdout=str(f)))
    assert test == ["navy", "coarse-checkered"] or sorted(test) == ["coarse-checkered", "navy"]
    assert "navy" not in train + val and len(val) == round(0.15 * 163)
    f.write_text("navy\nnot a concept\n")
    with pytest.raises(HyperTransportError, match="not concepts of this backend"):
        split_concepts(WORLD, TrainConfig(holdout=str(f)))


def test_too_few_training_concepts_names_the_fix():
    few = [ConceptInfo(f"c{i}", "colour") for i in range(10)]
    with pytest.raises(HyperTransportError, match="Fix: lower it"):
        split_concepts(few, TrainConfig(concepts_per_step=16))


def test_a_short_list_still_gets_a_test_concept():
    few = [ConceptInfo(n, k) for n, k in (("a", "style"), ("b", "medium"), ("c", "mood"), ("d", "era"), ("e", "style"))]
    train, val, test = split_concepts(few, TrainConfig(concepts_per_step=2, holdout_frac=0.25, val_frac=0.15))
    assert len(test) == 1 and len(train) + len(val) == 4
