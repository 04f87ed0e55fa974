"""The quality studies (LinEAS convergence curve, composition, the split protocol) on the tiny world:
meaningless figures, real code paths; the protocol's report and target table on figures it is given."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from world_helpers import tiny_config

from hypertransport_core import HyperTransportError, Steering, effective_affine, load_hypernet
from hypertransport_core.interventions import removal_floor
from studies import baseline, compose, protocol, removal
from studies.evaluate import EvalConfig, evaluate
from studies.measure import held_loss, lineas_for
from trainer import train as T
from trainer.config import train_config_of

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def world(comfy, tmp_path_factory):
    torch.set_num_threads(1)
    backend = comfy.tiny_world_backend(seed=0, steps=2, guidance=2.0)
    folder = tmp_path_factory.mktemp("studies")
    cfg = tiny_config(folder, steps=2)
    run = T.train(cfg, backend, progress=False)
    return backend, run, os.path.join(cfg.out, "hypernet.safetensors")


def test_lineas_checkpoints_equal_shorter_fits_and_the_curve_is_written(world, tmp_path):
    backend, run, hn = world
    cfg = baseline.CurveConfig(hypernet=hn, n_concepts=2, steps=4, checkpoints="2,4", seeds_per_shape=1, out=str(tmp_path / "c"),
                                 lineas_cache=str(tmp_path / "cache"))
    out = baseline.run_curve(cfg, backend)
    assert len(out["concepts"]) == 2 and set(out["concepts"]) <= set(run.holdout)
    for e in out["concepts"].values():
        assert len(e["inducement"]) == 2 and len(e["held_loss"]) == 2 and len(e["train_loss"]) == 4
    assert out["converged_at"] in (2, 4)
    assert all((tmp_path / "c" / f).stat().st_size > 0 for f in ("curve.json", "curve.md", "curve.png"))
    # the snapshot after 2 of 4 steps is the 2-step fit (constant-lr Adam on the same batches)
    c = next(iter(out["concepts"]))
    tcfg = train_config_of(load_hypernet(hn))
    two, _, _ = lineas_for(backend, tcfg, c, 2, cfg.lr)
    kept, _, final = baseline._fit_with_checkpoints(backend, c, _targets(backend, tcfg, c), tcfg, cfg, [2])
    torch.testing.assert_close(kept[2].w, two.w, rtol=0, atol=1e-6)
    # the curve's full-length fit is in the cache, where the evaluator finds it instead of fitting again
    cached, secs, _ = lineas_for(backend, tcfg, c, 4, cfg.lr, str(tmp_path / "cache"))
    torch.testing.assert_close(cached.w, final.w, rtol=0, atol=1e-6)
    assert len(list((tmp_path / "cache").iterdir())) == 2 and secs > 0


def _targets(backend, tcfg, c):
    from hypertransport_comfy.targets import compute_targets

    return {k: v[0] for k, v in compute_targets(backend, [c], tcfg, progress=False).items()}


def test_held_loss_is_fixed_and_lower_for_the_fit(world):
    backend, run, hn = world
    tcfg = train_config_of(load_hypernet(hn))
    c = run.holdout[0]
    tgt = _targets(backend, tcfg, c)
    fit, _, _ = lineas_for(backend, tcfg, c, 6, 5e-2)
    ident = Steering(fit.sites, torch.ones_like(fit.w), torch.zeros_like(fit.b))
    a, b = held_loss(backend, tcfg, c, tgt, ident), held_loss(backend, tcfg, c, tgt, ident)
    assert a == b  # the same batches every call
    assert held_loss(backend, tcfg, c, tgt, fit) < a


def test_lineas_cache_reuses_a_fit_with_its_measured_time(world, tmp_path):
    backend, run, hn = world
    tcfg = train_config_of(load_hypernet(hn))
    st, secs, tsecs = lineas_for(backend, tcfg, "gold", 2, 1e-2, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1 and secs > 0
    again, secs2, tsecs2 = lineas_for(backend, tcfg, "gold", 2, 1e-2, str(tmp_path))
    torch.testing.assert_close(again.w, st.w)
    assert (secs2, tsecs2) == pytest.approx((secs, tsecs))
    lineas_for(backend, tcfg, "gold", 3, 1e-2, str(tmp_path))  # another step count: another file
    assert len(os.listdir(tmp_path)) == 2


def test_composition_runs_every_method_and_scores_the_mix(world, tmp_path):
    backend, run, hn = world
    cp, cc = compose.choose_pairs(["red", "navy", "gold", "white", "fine-dotted", "coarse-checkered"], 2)
    assert len(cp) == 2 and all(a in compose.scene.COLOURS and b in compose.scene.PATTERNS for a, b in cp)
    assert len(cc) == 1 and not set(cc[0]) & {a for a, _ in cp}
    mix = compose.mix_concept("red", "blue")
    assert mix["rgb"] == (128, 0, 128)
    cfg = compose.ComposeConfig(hypernet=hn, pairs=1, lineas_steps=2, lineas_cache=str(tmp_path / "cache"), seeds_per_shape=1,
                                out=str(tmp_path / "comp"))
    out = compose.compose(cfg, backend)
    for row in out["pairs"]:
        assert set(row["methods"]) == set(compose.METHODS)
    assert (tmp_path / "comp" / "composition.md").read_text().startswith("# Composition")


def test_evaluator_takes_the_split_sweeps_methods_and_says_where_concepts_came_from(world, tmp_path):
    backend, run, hn = world
    res = evaluate(EvalConfig(hypernet=hn, split="val", out=str(tmp_path / "v"), seeds_per_shape=1, lineas_steps=2,
                              lineas_concepts=1, strengths="-1,0,1", sweep_methods="ht_text,ht_image,lineas"),
                   backend=backend, progress=False)
    assert set(res["concepts"]) == set(run.val) and res["split"] == "val"
    assert {e["from"] for e in res["concepts"].values()} == {"val"}
    first = next(iter(res["concepts"].values()))
    assert set(first["sweeps"]) == {"ht_text", "ht_image", "lineas"} and len(first["sweeps"]["lineas"]) == 3
    assert (tmp_path / "v" / "methods_vs_strength.png").stat().st_size > 0
    assert "| val |" in (tmp_path / "v" / "report.md").read_text()
    with pytest.raises(HyperTransportError, match="sweep-methods"):
        EvalConfig(hypernet=hn, sweep_methods="ht_image").check()
    with pytest.raises(HyperTransportError, match="--split"):
        EvalConfig(hypernet=hn, split="holdout").check()


def test_lineas_samples_draw_random_concepts_apart_from_the_hardest():
    from hypertransport_world import scene
    from studies.evaluate import lineas_samples

    names = sorted(scene.COLOURS)[:40] + list(scene.PATTERNS)[:8]
    a = lineas_samples(names, 6, 12, split_seed=0)
    assert len(a["hardest"]) == 6 and len(a["random"]) == 12 and a["random"] <= set(names)
    assert a["random"] == lineas_samples(list(reversed(names)), 6, 12, split_seed=0)["random"]  # whatever the list's order
    assert lineas_samples(names, 0, 12, split_seed=0)["random"] == a["random"]  # the draw ignores how many hardest are fitted
    assert lineas_samples(names, 6, 12, split_seed=1)["random"] != a["random"]  # another split, another draw
    assert lineas_samples(names, 6, 0, split_seed=0)["random"] == set() and lineas_samples(names, 0, 0, 0)["hardest"] == set()
    # a uniform draw: over many splits every concept is picked about 12/48 of the time, patterns no more than colours
    counts = {c: 0 for c in names}
    for seed in range(400):
        for c in lineas_samples(names, 6, 12, split_seed=seed)["random"]:
            counts[c] += 1
    share = np.array(list(counts.values())) / 400
    assert abs(share.mean() - 0.25) < 1e-9 and share.min() > 0.15 and share.max() < 0.35
    assert abs(np.mean([counts[c] for c in scene.PATTERNS if c in counts]) / 400 - 0.25) < 0.06


def test_evaluator_fits_random_and_hardest_concepts_and_measures_both_with_one_estimator(world, tmp_path):
    backend, run, hn = world
    res = evaluate(EvalConfig(hypernet=hn, split="test", out=str(tmp_path / "t"), seeds_per_shape=1, lineas_steps=2,
                              lineas_concepts=1, lineas_random=2, strengths="-1,0,1", held_batches=1),
                   backend=backend, progress=False)
    cs, s = res["concepts"], res["summary"]
    fitted = {c for c in cs if "lineas" in cs[c]["methods"]}
    assert fitted == set(res["lineas_sets"]["hardest"]) | set(res["lineas_sets"]["random"]) and len(res["lineas_sets"]["random"]) == 2
    assert s["on_random"]["n"] == 2 and s["on_hardest"]["n"] == 1
    # the held loss of both methods is the same estimator: measure.held_loss with the same batches, recomputed here
    c = next(iter(fitted))
    hn_obj = load_hypernet(hn)
    tgt = {k: v[0] for k, v in T.compute_targets(backend, [c], train_config_of(hn_obj), progress=False).items()}
    want = held_loss(backend, train_config_of(hn_obj), c, tgt, hn_obj.steering(backend.encoder.concept(c)), batches=1)
    assert cs[c]["held_loss"]["ht_text"] == pytest.approx(want, rel=1e-5)
    assert cs[c]["held_loss"]["lineas"] != pytest.approx(want, rel=1e-3)  # a different steering, measured alike
    for k in ("colour", "pattern"):
        mine = [e["methods"]["ht_text"]["off_kind"] for e in cs.values() if e["kind"] == k]
        if mine:  # the unsteered images are the reference: their off-kind change is exactly 0
            assert s["off_kind_by_kind"][k]["none"] == 0.0
            assert s["off_kind_by_kind"][k]["ht_text"] == pytest.approx(float(np.nanmean(mine)))
    colours = [e["sweep"]["spearman"] for e in cs.values() if e["kind"] == "colour"]
    assert s["spearman_by_kind"]["colour"] == pytest.approx(float(np.mean(colours)))
    report = (tmp_path / "t" / "report.md").read_text()
    assert "randomly drawn" in report and "Spearman by kind" in report and "one estimator" in report


def test_removal_floors_bound_the_inverse_and_the_mirror_continues_the_line():
    from hypertransport_core.sites import Site

    sites = (Site("a", "a", 4),)
    st = Steering(sites, torch.tensor([0.02, -0.05, 0.8, 1.5]), torch.tensor([0.1, -0.2, 0.3, 0.0]))
    default, _ = effective_affine(st.w, st.b, -1.0)
    with removal_floor(0.5):
        a, c = effective_affine(st.w, st.b, -1.0)
    assert a.abs().max() <= 1 / 0.5 + 1e-6 and (a.sign() == st.w.sign()).all()  # divides by ≥ the floor, sign kept
    torch.testing.assert_close(c, -st.b / torch.tensor([0.5, -0.5, 0.8, 1.5]))
    torch.testing.assert_close(a[2:], 1 / st.w[2:])  # |w| above the floor: the exact inverse
    torch.testing.assert_close(effective_affine(st.w, st.b, -1.0)[0], default)  # only inside the block
    with pytest.raises(HyperTransportError, match="removal floor"):
        with removal_floor(1e-4):
            pass
    for lam in (-1.0, -0.5):
        a_m, c_m = effective_affine(removal.mirrored(st).w, removal.mirrored(st).b, -lam)
        torch.testing.assert_close(a_m, 1 + lam * (st.w - 1))
        torch.testing.assert_close(c_m, lam * st.b)
    with pytest.raises(HyperTransportError, match="distinct floors from 0.01"):
        removal.RemovalConfig(floors="0.001").lists()
    with pytest.raises(HyperTransportError, match="below 0"):
        removal.RemovalConfig(negative="0.5").lists()


def test_removal_study_measures_every_rule_on_the_split(world, tmp_path, monkeypatch):
    from hypertransport_core import interventions

    backend, run, hn = world
    seen, real = set(), interventions._floored
    monkeypatch.setattr(interventions, "_floored", lambda w: (seen.add(interventions._FLOOR.get()), real(w))[1])
    cfg = removal.RemovalConfig(hypernet=hn, split="val", floors="0.01,0.5", negative="-1", positive="1", seeds_per_shape=1,
                                grid_concepts=1, out=str(tmp_path / "r"))
    out = removal.run(cfg, backend)
    assert set(out["concepts"]) == set(run.val) and out["rules"] == ["floor 0.01", "floor 0.5", "mirror"]
    for e in out["concepts"].values():
        for r in out["rules"]:
            got = e["rules"][r]
            assert len(got["inducement_neg"]) == 1 and 0 <= got["shape_kept"] <= 1
            assert got["below_0"] == (got["inducement_neg"][0] < e["inducement_0"])
    for r in out["rules"]:  # the summary is the mean over the concepts, rule by rule
        per = [e["rules"][r] for e in out["concepts"].values()]
        assert out["summary"][r]["shape_kept"] == pytest.approx(sum(g["shape_kept"] for g in per) / len(per))
        assert out["summary"][r]["below_0"] == pytest.approx(sum(g["below_0"] for g in per) / len(per))
    assert seen == {0.01, 0.5}  # each rule's floor reached the steering hooks (and the mirror divides by nothing)
    assert "| floor 0.5 |" in (tmp_path / "r" / "removal.md").read_text()
    with pytest.raises(HyperTransportError, match="distinct floors"):
        removal.RemovalConfig(floors="0.5,200").lists()
    assert (tmp_path / "r" / "removal_grid.png").stat().st_size > 0


def test_protocol_overrides_and_report(tmp_path, monkeypatch):
    assert protocol.parse_overrides(["steps=800", "lr=0.001", "resume=false"]) == {"steps": 800, "lr": 0.001, "resume": False}
    with pytest.raises(HyperTransportError, match="Options:"):
        protocol.parse_overrides(["stepz=3"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HyperTransportError, match="nothing evaluated"):
        protocol.report()

    def fake(seed, text, lineas):
        concepts = {"a": {"kind": "colour", "methods": {"ht_text": {"inducement": text}, "lineas": {"inducement": lineas}}},
                    "p": {"kind": "pattern", "methods": {"ht_text": {"inducement": text / 2}, "lineas": {"inducement": lineas}}}}
        methods = {m: {"inducement": 0.5, "shape_kept": 0.97, "seconds_to_intervention": 0.01} for m in
                   ("none", "prompt", "lineas", "ht_text", "ht_image")}
        summary = {"n_concepts": 2, "image_over_text": 0.93, "spearman_mean": 0.96, "negative_moves_away": {"share": 1.0},
                   "methods": methods, "on_random": {"text_over_lineas": text + 0.1}}
        d = tmp_path / "reports" / "protocol" / "t" / f"seed{seed}-test"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"summary": summary, "concepts": concepts, "config": {"lineas_steps": 240}}))

    fake(0, 0.8, 0.8)
    fake(1, 0.6, 0.8)
    text = protocol.report()
    row = next(ln for ln in text.splitlines() if ln.startswith("| HT text / converged LinEAS, all fitted"))
    # split 0: (0.8 + 0.4) / 1.6 = 0.75; split 1: (0.6 + 0.3) / 1.6 = 0.5625; mean 0.656: missed, and said so
    assert "0.750" in row and "0.562" in row and "0.656" in row and "**no**" in row
    row = next(ln for ln in text.splitlines() if ln.startswith("| HT text / converged LinEAS, random concepts"))
    assert "| 0.900 | 0.700 | 0.800 | **no** |" in row  # the evaluator's on_random ratio, per split and mean
    assert "| shape kept at λ = 1 | ≥ 0.95 | 0.970 | 0.970 | 0.970 | yes |" in text


def test_transfer_diagnostic_pairs_each_concept_with_its_nearest_training_concept():
    import torch.nn.functional as F

    from hypertransport_core import HyperNet, HyperNetConfig, Site
    from studies import transfer

    vec = {"red": [1, 0, 0], "crimson": [0.9, 0.1, 0], "blue": [0, 0, 1], "navy": [0, 0.2, 0.9], "teal": [0, 1, 0]}

    class Enc:
        identity = {"arch": "t", "fingerprint": "f", "embed_dim": 3}

        @staticmethod
        def encode_text(texts):
            return F.normalize(torch.tensor([vec[t] for t in texts], dtype=torch.float32), dim=-1)

    hn = HyperNet(HyperNetConfig(embed_dim=3, hidden=4, rank=1), [Site("s", "s", 2, 1)], encoder=Enc.identity)
    sim = transfer.nearest_training_similarity(hn, Enc, ["crimson", "navy", "teal"], ["red", "blue"])
    want = [float(F.normalize(torch.tensor(vec[a], dtype=torch.float32), dim=0) @ F.normalize(torch.tensor(vec[b], dtype=torch.float32), dim=0))
            for a, b in (("crimson", "red"), ("navy", "blue"))]
    assert sim[:2] == pytest.approx(want, abs=1e-6) and sim[2] == pytest.approx(0.0, abs=1e-6)  # teal: near neither

    def entry(none, ht, prompt, lin=None):
        m = {"none": {"inducement": none}, "ht_text": {"inducement": ht}, "prompt": {"inducement": prompt}}
        if lin is not None:
            m["lineas"] = {"inducement": lin}
        return {"kind": "colour", "methods": m}

    results = {"concepts": {"crimson": entry(0.2, 0.6, 1.0, 0.8), "navy": entry(0.2, 0.4, 1.0), "teal": entry(0.2, 0.3, 0.22)}}
    rows = transfer.rows_of(results, sim)
    assert [r["concept"] for r in rows] == ["crimson", "navy", "teal"]
    assert rows[0]["gain_share"] == pytest.approx(0.5) and rows[0]["over_lineas"] == pytest.approx(0.75)
    assert np.isnan(rows[1]["over_lineas"]) and np.isnan(rows[2]["gain_share"])  # no LinEAS; prompting gains too little
    s = transfer.summarize(rows)
    assert s["gain_share"]["n"] == 2 and s["over_lineas"]["n"] == 1 and len(s["thirds"]) == 3
