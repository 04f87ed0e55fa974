"""Evaluate steering on the embedded world: held-out concepts, five methods, a strength sweep.

    python studies/evaluate.py                                   # runs/world/hypernet.safetensors
    python studies/evaluate.py --hypernet FILE --concepts my_concepts.txt --out reports/mine

For each concept (default: the hypernet's held-out concepts, which it never saw) and each method

- ``none``: the neutral prompt ``"a {shape}"``, no steering;
- ``prompt``: the concept written into the prompt, ``"a {concept} {shape}"``;
- ``lineas``: per-concept LinEAS maps fitted on that concept (the baseline being amortized);
- ``ht_text``: the hypernet applied to the concept's text embedding;
- ``ht_image``: the hypernet applied to the embedding of one reference image showing the concept;

it generates the same seeds and reports *concept inducement* (from pixels: the world's
``metrics.inducement``; and the world CLIP's image-text cosine), *content preservation* (shape class
and position unchanged from the unsteered image of the same seed) and the *time to obtain the
intervention*. A strength sweep (λ from −1 to 1.5) of ``ht_text`` gives inducement per λ and its
Spearman correlation with λ. Writes ``results.json``, ``report.md`` and PNG grids and curves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from scipy.stats import spearmanr

from hypertransport_comfy.backend import ComfyBackend
from hypertransport_comfy.comfyui import check_device
from hypertransport_comfy.targets import compute_targets, concept_seed
from hypertransport_core import Steering
from hypertransport_core.errors import HyperTransportError
from hypertransport_world import scene
from studies.measure import EvalSet, hard_first, held_loss, lineas_for, mean_inducement, open_study, steered_images
from trainer.cli import command
from trainer.config import SHIPPED_HYPERNET, WORLD_WEIGHTS, build_parser, default_hypernet, resolve
from trainer.train import read_list

log = logging.getLogger("hypertransport.evaluate")

METHODS = ("none", "prompt", "lineas", "ht_text", "ht_image")
#: The shipped hypernet's figures on its split's test concepts (what a run of this evaluator is compared with).
SHIPPED_FIGURES = os.path.splitext(SHIPPED_HYPERNET)[0] + ".figures.json"
#: The figures a reference holds: HT's own, which need no LinEAS fit (so any evaluator run can be compared).
REFERENCE_KEYS = ("ht_text", "ht_image", "image_over_text", "spearman_mean", "negative_share", "shape_kept")
SPLITS = {"test": "holdout_concepts", "val": "val_concepts", "train": "train_concepts"}


def provenance(summary: dict) -> dict[str, str]:
    """concept -> "test" / "val" / "train": where the hypernet's training put it."""
    return {c: name for name, key in SPLITS.items() for c in summary.get(key, [])}


@dataclass
class EvalConfig:
    hypernet: str = ""  # the hypernet file to evaluate (default: runs/world/hypernet.safetensors, else the shipped one)
    world_weights: str = WORLD_WEIGHTS  # folder with the world's models
    concepts: str = ""  # file of concepts to evaluate, one per line (default: the hypernet's --split list)
    split: str = "test"  # which of the hypernet's concept sets: "test" (held out: the figures to report), "val" (validation: choose configurations on it) or "train"
    out: str = "reports/world"  # report folder
    seeds_per_shape: int = 2  # images per shape per concept and method (3 shapes)
    strengths: str = "-1,-0.5,0,0.5,1,1.5"  # strength sweep
    sweep_methods: str = "ht_text"  # methods swept over the strengths: any of ht_text, ht_image, lineas (lineas where fitted)
    lineas_concepts: int = 6  # concepts that also get a LinEAS fit (patterns and saturated colours first; 0 = all, -1 = none)
    lineas_random: int = 0  # and this many drawn at random (seeded by the split seed): the ratio for an ordinary concept
    held_batches: int = 2  # fixed source batches of 8 prompts for the held OT loss of HT and LinEAS (one estimator for both; 0 = skip)
    lineas_steps: int = 120  # LinEAS optimizer steps per concept (120: converged, docs/results.md#baseline-lineas-to-convergence; fits shipped in hypertransport_world/weights/lineas are used as they are)
    lineas_lr: float = 1e-2  # LinEAS learning rate
    lineas_cache: str = ""  # folder keeping LinEAS fits for reuse (named by all they depend on; "" = fit every time)
    max_concepts: int = 0  # evaluate only the first N concepts (0 = all)
    grid_concepts: int = 10  # concepts shown in the strength grid PNG
    threads: int = 0  # torch CPU threads (0 = default)
    device: str = "auto"  # where ComfyUI runs the world: "auto" (CUDA when available), "cpu" or "cuda"
    precision: str = "fp32"  # "fp32": what ComfyUI's KSampler computes on a CPU (the node comparison needs it); "bf16" autocast is faster
    reference: str = SHIPPED_FIGURES  # figures to compare with (default: the shipped hypernet's; "" = none)
    save_reference: str = ""  # also write this run's HT figures there, as a reference for later runs (how the shipped file is made)

    def check(self) -> None:
        self.hypernet = self.hypernet or default_hypernet()
        if not os.path.isfile(self.hypernet):
            raise HyperTransportError(f"--hypernet {self.hypernet!r} does not exist. Fix: train one with `python trainer/train.py` "
                             "or pass the path of a hypernet file.")
        if self.concepts and not os.path.isfile(self.concepts):
            raise HyperTransportError(f"--concepts {self.concepts!r} does not exist. Fix: a text file, one concept per line.")
        try:
            self.strength_list()
        except ValueError:
            raise HyperTransportError(f"--strengths {self.strengths!r}: give comma-separated numbers, e.g. -1,0,1") from None
        if self.seeds_per_shape < 1 or self.lineas_steps < 1:
            raise HyperTransportError("--seeds-per-shape and --lineas-steps must be at least 1.")
        bad = [m for m in self.sweep_method_list() if m not in ("ht_text", "ht_image", "lineas")]
        if bad or "ht_text" not in self.sweep_method_list():
            raise HyperTransportError(f"--sweep-methods {self.sweep_methods!r}: a list of ht_text (required), ht_image, lineas.")
        if self.split not in SPLITS:
            raise HyperTransportError(f"--split {self.split!r}: use one of {', '.join(SPLITS)}.")
        if self.device != "auto":
            check_device(self.device)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise HyperTransportError(f"--precision {self.precision!r}: use fp32, bf16 or fp16.")

    def strength_list(self) -> list[float]:
        return [float(x) for x in self.strengths.split(",") if x.strip()]

    def sweep_method_list(self) -> list[str]:
        return [m.strip() for m in self.sweep_methods.split(",") if m.strip()]


def image_metrics(backend: ComfyBackend, imgs: torch.Tensor, concept: str, ref: torch.Tensor, concept_emb: torch.Tensor,
                  shapes=None) -> dict:
    """Per-image inducement, CLIP score, and content kept relative to ``ref`` (the unsteered images), and
    (given the prompts' ``shapes``) whether the prompted shape was drawn; images ``(B, H, W, 3)`` in [0, 1] as
    VAE Decode outputs them."""
    from hypertransport_world import metrics as M

    ind = [M.inducement(im, concept) for im in imgs]  # per image: the mean is measure.mean_inducement
    with torch.no_grad():
        img_emb = backend.encoder.encode_image(imgs)
        clip = (img_emb @ concept_emb).tolist()
        # a second, learned view of content: the world CLIP's zero-shot shape class, steered vs unsteered
        shape_txt = backend.encoder.encode_text([f"a {s}" for s in scene.SHAPES])
        ref_shape = (backend.encoder.encode_image(ref) @ shape_txt.T).argmax(1)
        shape_kept_clip = ((img_emb @ shape_txt.T).argmax(1) == ref_shape).float().tolist()
    shape_kept, moved = [], []
    for im, r in zip(imgs, ref):
        s0, s1 = M.shape_of(r), M.shape_of(im)
        shape_kept.append(float(s0 is not None and s0 == s1))
        p0, p1 = M.position_of(r), M.position_of(im)
        moved.append(float(np.hypot(p0[0] - p1[0], p0[1] - p1[1])) if p0 is not None and p1 is not None else float("nan"))
    out = {"inducement": ind, "clip": clip, "shape_kept": shape_kept, "shape_kept_clip": shape_kept_clip, "position_shift": moved}
    if shapes is not None:
        out["shape_correct"] = [float(M.shape_of(im) == s) for im, s in zip(imgs, shapes)]
    kind = backend.concept_info(concept).kind
    if kind in ("colour", "pattern"):  # specificity: how much the other kind moved
        out["off_kind"] = [M.off_kind_change(im, r, kind) for im, r in zip(imgs, ref)]
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return float(np.mean(xs)) if xs else float("nan")


def evaluation_order(listed: list[str]) -> list[str]:
    """A split's list in a seeded random order, so that "the first N" (LinEAS, grid) mixes kinds and names."""
    listed = list(listed)
    return [listed[i] for i in np.random.default_rng(0).permutation(len(listed))]


def lineas_samples(concepts: list[str], n_hardest: int, n_random: int, split_seed: int) -> dict[str, set[str]]:
    """The concepts LinEAS is fitted on: ``{"hardest": the n_hardest of hard_first, "random": n_random drawn at random}``
    (the random draw is seeded by the split seed alone, so it is the same whatever the hardest are)."""
    rng = np.random.default_rng([int(split_seed), 20261207])
    pool = sorted(concepts)
    pick = rng.choice(len(pool), min(max(0, n_random), len(pool)), replace=False) if n_random > 0 else []
    return {"hardest": set(hard_first(concepts, n_hardest)) if n_hardest else set(), "random": {pool[i] for i in pick}}


def _grid_concepts(concepts: list[str], backend, n: int) -> set[str]:
    """The concepts shown in the strength grid: the first ``n``, with up to 3 of each kind the first ``n``
    would leave out (so a grid of a mostly-colour list still shows its patterns)."""
    first = list(concepts[:n])
    kind = {c: backend.concept_info(c).kind for c in concepts}
    missing = [c for k in dict.fromkeys(kind.values()) if k not in {kind[x] for x in first}
               for c in [x for x in concepts if kind[x] == k][:3]]
    keep = first[: max(0, n - len(missing))] + missing[:n]
    return set(keep)


def evaluate(cfg: EvalConfig, backend: ComfyBackend | None = None, progress: bool = True) -> dict:
    cfg.check()
    hn, tcfg, backend = open_study(cfg, backend)
    hn.check_concept(backend.encoder.concept("red"))  # refuses a hypernet trained with another encoder
    if cfg.concepts:
        concepts = read_list(cfg.concepts)
    else:
        concepts = evaluation_order(hn.training_summary.get(SPLITS[cfg.split], []))
    if not concepts:
        raise HyperTransportError(f"no concepts to evaluate: the hypernet records no {cfg.split} list. Fix: pass --concepts FILE "
                         "(or --split test).")
    unknown = [c for c in concepts if c not in {x.name for x in backend.concepts}]
    if unknown:
        raise HyperTransportError(f"--concepts: {unknown[:5]} are not concepts of the embedded world. Fix: check the spelling "
                         "(colours are CSS names split into words, e.g. 'dark slate blue').")
    if cfg.max_concepts:
        concepts = concepts[: cfg.max_concepts]
    seen = set(hn.training_summary.get("train_concepts", []))
    origin = provenance(hn.training_summary)
    grid_set = _grid_concepts(concepts, backend, cfg.grid_concepts)
    n_lineas = len(concepts) if cfg.lineas_concepts == 0 else max(0, min(cfg.lineas_concepts, len(concepts)))
    lineas_sets = lineas_samples(concepts, n_lineas, cfg.lineas_random, hn.training_summary.get("split_seed", tcfg.seed))
    with_lineas = set().union(*lineas_sets.values())
    es = EvalSet.default(cfg.seeds_per_shape)
    shapes, seeds = list(es.shapes), list(es.seeds)
    os.makedirs(cfg.out, exist_ok=True)

    base = steered_images(backend, es, [])
    lam_list = cfg.strength_list()
    results = {"config": dataclasses.asdict(cfg), "train_config": dataclasses.asdict(tcfg), "concepts": {},
               "lineas_sets": {k: sorted(v) for k, v in lineas_sets.items()},
               "strengths": lam_list, "held_out": [c for c in concepts if c not in seen], "split": cfg.split,
               "split_seed": hn.training_summary.get("split_seed", tcfg.seed)}
    grid_rows = []
    t_start = time.perf_counter()
    for ci, concept in enumerate(concepts):
        c0 = time.perf_counter()
        emb = hn.encode_text(backend.encoder, [concept])[0]
        entry: dict = {"kind": backend.concept_info(concept).kind, "seen_in_training": concept in seen,
                       "from": origin.get(concept, "not in the hypernet's split"), "methods": {}}
        steerings: dict[str, tuple[Steering, float]] = {}
        # ht_text: time from the concept's words to its intervention (encode + one hypernet pass)
        t = time.perf_counter()
        steerings["ht_text"] = (hn.steering(hn.text_concept(backend.encoder, concept)), time.perf_counter() - t)
        ref_img = backend.reference_images(concept, 1, np.random.default_rng(concept_seed(tcfg, concept, "eval-ref")))
        t = time.perf_counter()
        steerings["ht_image"] = (hn.steering(backend.encoder.image_concept(ref_img, concept)), time.perf_counter() - t)
        if concept in with_lineas:
            st, t_fit, t_targets = lineas_for(backend, tcfg, concept, cfg.lineas_steps, cfg.lineas_lr, cfg.lineas_cache)
            steerings["lineas"] = (st, t_fit + t_targets)
            entry["lineas_target_seconds"] = t_targets
            if "loaded_from" in st.meta:
                entry["lineas_loaded_from"] = st.meta["loaded_from"]
            entry["lineas_sets"] = [k for k, v in lineas_sets.items() if concept in v]
            if cfg.held_batches:  # one estimator for both methods: the same prompts, seeds, counts and precision
                tgt = {k: v[0] for k, v in compute_targets(backend, [concept], tcfg, progress=False).items()}
                entry["held_loss"] = {m: held_loss(backend, tcfg, concept, tgt, steerings[m][0], batches=cfg.held_batches)
                                      for m in ("lineas", "ht_text")}
        imgs = {"none": base, "prompt": backend.images(backend.source.paired_prompts(concept, shapes)[1], seeds)}
        for name, (st, _) in steerings.items():
            imgs[name] = steered_images(backend, es, [(st, 1.0)])
        for name, im in imgs.items():
            m = image_metrics(backend, im, concept, base, emb, shapes)
            entry["methods"][name] = {k: _mean(v) for k, v in m.items()}
            entry["methods"][name]["seconds_to_intervention"] = steerings[name][1] if name in steerings else 0.0
        # strength sweeps: ht_text always (its grid row is shown), the other methods when asked
        sweeps, grid = {}, []
        for name in cfg.sweep_method_list():
            if name not in steerings:
                continue
            ind = []
            for lam in lam_list:  # λ = 0 is the unsteered model bit for bit and λ = 1 was sampled above: reused
                im = base if lam == 0.0 else imgs[name] if lam == 1.0 else steered_images(backend, es, [(steerings[name][0], lam)])
                ind.append(mean_inducement(im, concept))
                if name == "ht_text":
                    grid.append(im[0])
            sweeps[name] = ind
        sweep = sweeps["ht_text"]
        rho = spearmanr(lam_list, sweep).statistic if np.std(sweep) > 0 else 0.0
        entry["sweep"] = {"inducement": sweep, "spearman": float(rho)}
        entry["sweeps"] = sweeps
        if concept in grid_set:
            grid_rows.append((concept, grid, imgs["prompt"][0], steerings.get("lineas", (None,))[0] and imgs["lineas"][0]))
        results["concepts"][concept] = entry
        log.info("[%d/%d] %s (%s): ind none %.3f prompt %.3f lineas %s text %.3f image %.3f | spearman %.2f (%.1f s)",
                 ci + 1, len(concepts), concept, entry["from"], entry["methods"]["none"]["inducement"], entry["methods"]["prompt"]["inducement"],
                 f"{entry['methods']['lineas']['inducement']:.3f}" if "lineas" in entry["methods"] else "-",
                 entry["methods"]["ht_text"]["inducement"], entry["methods"]["ht_image"]["inducement"], rho,
                 time.perf_counter() - c0)
    results["summary"] = summarize(results)
    results["seconds"] = time.perf_counter() - t_start
    mine = reference_figures(results, cfg.hypernet)
    results["against_reference"] = compare_to_reference(mine, cfg.reference)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if cfg.save_reference:
        tmp = f"{cfg.save_reference}.tmp"
        with open(tmp, "w") as f:
            json.dump(mine, f, indent=1)
        os.replace(tmp, cfg.save_reference)  # a reader never sees half a file
    write_figures(results, grid_rows, cfg)
    write_report(results, cfg)
    return results


def reference_figures(results: dict, hypernet: str) -> dict:
    """What a later run is compared with: the split, its concepts, the hypernet (its content hash, steps) and HT's
    figures. The hash is the one the hypernet file records and its loading verified (only its header is read)."""
    from hypertransport_core.interventions import REMOVAL_FLOOR
    from hypertransport_core.tensorfile import HASH_KEY, read_layout

    s = results["summary"]
    figs = {"ht_text": s["methods"]["ht_text"]["inducement"], "ht_image": s["methods"]["ht_image"]["inducement"],
            "image_over_text": s["image_over_text"], "spearman_mean": s["spearman_mean"],
            "negative_share": s.get("negative_moves_away", {}).get("share", float("nan")),
            "shape_kept": s["methods"]["ht_text"]["shape_kept"]}
    return {"format": "hypertransport.eval_reference", "split": results["split"], "split_seed": results["split_seed"],
            "concepts": sorted(results["concepts"]), "strengths": results["strengths"],
            "seeds_per_shape": results["config"]["seeds_per_shape"], "precision": results["config"]["precision"],
            "removal_floor": REMOVAL_FLOOR, "hypernet_sha256": read_layout(hypernet, what="hypernet").metadata.get(HASH_KEY, ""),
            "hypernet_steps": results["train_config"]["steps"], "figures": figs}


_SAME = ("split", "split_seed", "concepts", "strengths", "seeds_per_shape", "precision", "removal_floor")  # what must match


def compare_to_reference(ours: dict, path: str) -> list[str]:
    """Markdown lines: this run's figures ``ours`` (:func:`reference_figures`) beside the reference's (``path``), or
    why they do not compare."""
    if not path or not os.path.isfile(path):
        return []
    if os.path.getsize(path) > 1 << 20:
        return [f"- Reference `{path}` is over 1 MB: not read (a reference is a few KB; rewrite it with --save-reference)."]
    try:
        with open(path) as f:
            ref = json.load(f)
        figs = {k: float(ref["figures"][k]) for k in REFERENCE_KEYS}
        same = tuple(ref[k] for k in _SAME)
        # every field a message below prints, read (and typed) here, so a malformed file is refused, not a crash
        n_ref, floor_ref = len(ref["concepts"]), float(ref["removal_floor"])
        sha_ref, steps_ref = str(ref["hypernet_sha256"]), int(ref["hypernet_steps"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"- Reference `{path}` is not a figures file ({type(e).__name__}: {e}); rewrite it with --save-reference."]
    rel = os.path.relpath(path)
    path = path if rel.startswith("..") else rel
    if same != tuple(ours[k] for k in _SAME):
        return [f"- Not compared with `{path}`: it holds split {ref['split']!r} of seed {ref['split_seed']} "
                f"({n_ref} concepts, {ref['precision']}, removal floor {floor_ref:g}), this run "
                f"split {ours['split']!r} of seed {ours['split_seed']} ({len(ours['concepts'])} concepts, {ours['precision']}, "
                f"removal floor {ours['removal_floor']:g}), or other strengths / images per concept."]
    if ours["hypernet_sha256"] and ours["hypernet_sha256"] == sha_ref:
        return [f"- This is the hypernet `{path}` describes (the same file)."]
    names = {"ht_text": "HT text inducement", "ht_image": "HT image inducement", "image_over_text": "image / text",
             "spearman_mean": "Spearman", "negative_share": "λ < 0 below λ = 0", "shape_kept": "shape kept"}
    mine = ours["figures"]
    cells = "; ".join(f"{names[k]} {mine[k]:.3f} vs {figs[k]:.3f} ({mine[k] - figs[k]:+.3f})" for k in REFERENCE_KEYS)
    return [f"- This run ({ours['hypernet_steps']} training steps) against the reference hypernet "
            f"({steps_ref} steps, `{path}`), same concepts and images: {cells}."]


def summarize(results: dict) -> dict:
    cs = results["concepts"]
    lam = results["strengths"]

    def avg(method, key, names=None):
        names = names or list(cs)
        return _mean([cs[c]["methods"][method][key] for c in names if method in cs[c]["methods"]])

    with_lineas = [c for c in cs if "lineas" in cs[c]["methods"]]
    out: dict = {"n_concepts": len(cs), "n_lineas": len(with_lineas), "methods": {}}
    for m in METHODS:
        out["methods"][m] = {k: avg(m, k) for k in ("inducement", "clip", "shape_kept", "shape_kept_clip", "shape_correct",
                                                     "position_shift", "seconds_to_intervention", "off_kind")}

    def against_lineas(names: list[str]) -> dict:
        ind_l, ind_t, ind_n = (avg(m, "inducement", names) for m in ("lineas", "ht_text", "none"))
        held = [cs[c]["held_loss"] for c in names if "held_loss" in cs[c]]
        got = {"n": len(names), "lineas": ind_l, "ht_text": ind_t, "none": ind_n,
               "text_over_lineas": ind_t / ind_l if ind_l else float("nan"),
               "text_gain_over_lineas_gain": (ind_t - ind_n) / (ind_l - ind_n) if ind_l != ind_n else float("nan")}
        if held:
            got["held_loss"] = {m: _mean([h[m] for h in held]) for m in ("lineas", "ht_text")}
            got["held_loss_text_over_lineas"] = got["held_loss"]["ht_text"] / got["held_loss"]["lineas"]
        return got

    if with_lineas:
        out["on_lineas_concepts"] = against_lineas(with_lineas)
        for name in ("hardest", "random"):  # the hardest concepts, and an ordinary (random) sample of them
            names = [c for c in with_lineas if name in cs[c].get("lineas_sets", [])]
            if names:
                out[f"on_{name}"] = against_lineas(names)
        pats = [c for c in with_lineas if cs[c]["kind"] == "pattern"]
        if pats:
            out["on_lineas_patterns"] = against_lineas(pats)
    kinds = sorted({cs[c]["kind"] for c in cs})
    out["spearman_by_kind"] = {k: _mean([cs[c]["sweep"]["spearman"] for c in cs if cs[c]["kind"] == k]) for k in kinds}
    out["off_kind_by_kind"] = {k: {m: avg(m, "off_kind", [c for c in cs if cs[c]["kind"] == k]) for m in METHODS}
                               for k in kinds if k in ("colour", "pattern")}
    ind_t, ind_i, ind_n = avg("ht_text", "inducement"), avg("ht_image", "inducement"), avg("none", "inducement")
    out["image_over_text"] = ind_i / ind_t if ind_t else float("nan")
    out["image_gain_over_text_gain"] = (ind_i - ind_n) / (ind_t - ind_n) if ind_t != ind_n else float("nan")
    out["spearman_mean"] = _mean([cs[c]["sweep"]["spearman"] for c in cs])
    i0 = lam.index(0.0) if 0.0 in lam else None
    neg = [i for i, x in enumerate(lam) if x < 0]
    if i0 is not None and neg:
        below = [cs[c]["sweep"]["inducement"][neg[0]] < cs[c]["sweep"]["inducement"][i0] for c in cs]
        out["negative_moves_away"] = {"share": float(np.mean(below)),
                                      "mean_inducement_at_min": _mean([cs[c]["sweep"]["inducement"][neg[0]] for c in cs]),
                                      "mean_inducement_at_0": _mean([cs[c]["sweep"]["inducement"][i0] for c in cs])}
    out["sweep_mean"] = [_mean([cs[c]["sweep"]["inducement"][i] for c in cs]) for i in range(len(lam))]
    return out


def write_figures(results: dict, grid_rows, cfg: EvalConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = results["strengths"]
    cs = results["concepts"]
    # strength grid: one row per concept, columns = strengths, then the prompted image for reference
    if grid_rows:
        fig, axes = plt.subplots(len(grid_rows), len(lam) + 1, figsize=(1.2 * (len(lam) + 1), 1.3 * len(grid_rows)), squeeze=False)
        for r, (concept, ims, prompted, _) in enumerate(grid_rows):
            for j, im in enumerate(list(ims) + [prompted]):
                ax = axes[r][j]
                ax.imshow(im.clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"λ={lam[j]:g}" if j < len(lam) else "prompt", fontsize=8)
            axes[r][0].set_ylabel(concept, fontsize=7, rotation=0, ha="right", va="center")
        fig.suptitle("HyperTransport from text, held-out concepts: strength sweep (same seed per row)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out, "strength_grid.png"), dpi=110)
        plt.close(fig)
    # curves
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c in cs:
        ax.plot(lam, cs[c]["sweep"]["inducement"], color="0.8", lw=0.7)
    ax.plot(lam, results["summary"]["sweep_mean"], color="C0", lw=2.5, label="mean over concepts")
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("strength λ"), ax.set_ylabel("concept inducement (pixels)")
    ax.set_title(f"Strength sweep, mean Spearman {results['summary']['spearman_mean']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "strength_curves.png"), dpi=110)
    plt.close(fig)
    # inducement vs λ per method, prompting as a line
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = {"ht_text": "HT from text", "ht_image": "HT from one image", "lineas": "LinEAS (scaled by λ)"}
    for i, (m, label) in enumerate(labels.items()):
        curves = [e["sweeps"][m] for e in cs.values() if m in e.get("sweeps", {})]
        if curves:
            ax.plot(lam, np.mean(curves, axis=0), color=f"C{i}", lw=2, marker="o", ms=3, label=f"{label} ({len(curves)})")
    ax.axhline(results["summary"]["methods"]["prompt"]["inducement"], color="k", ls="--", lw=1, label="prompting")
    ax.axhline(results["summary"]["methods"]["none"]["inducement"], color="0.6", ls=":", lw=1, label="unsteered")
    ax.set_xlabel("strength λ"), ax.set_ylabel("concept inducement (pixels)")
    ax.set_title("Inducement vs strength, by method (mean over concepts)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "methods_vs_strength.png"), dpi=110)
    plt.close(fig)
    # methods
    ms = [m for m in METHODS if not np.isnan(results["summary"]["methods"][m]["inducement"])]
    fig, axs = plt.subplots(1, 2, figsize=(8, 3))
    axs[0].bar(ms, [results["summary"]["methods"][m]["inducement"] for m in ms], color=[f"C{i}" for i in range(len(ms))])
    axs[0].set_title("concept inducement (pixels)", fontsize=9)
    axs[1].bar(ms, [results["summary"]["methods"][m]["shape_kept"] for m in ms], color=[f"C{i}" for i in range(len(ms))])
    axs[1].set_title("shape kept vs unsteered", fontsize=9)
    for a in axs:
        a.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out, "methods.png"), dpi=110)
    plt.close(fig)


def write_report(results: dict, cfg: EvalConfig) -> None:
    s = results["summary"]
    n_loaded = sum("lineas_loaded_from" in e for e in results["concepts"].values())
    lines = [
        "# HyperTransport on the embedded world: evaluation",
        "",
        f"Hypernet: `{cfg.hypernet}`. Split: `{results['split']}` of seed {results['split_seed']} "
        f"({'--concepts ' + cfg.concepts if cfg.concepts else 'the hypernet' + chr(39) + 's list'}). "
        f"Concepts: {s['n_concepts']} ({len(results['held_out'])} never seen by the hypernet); "
        f"LinEAS ({cfg.lineas_steps} steps) fitted on {s['n_lineas']} of them, patterns and saturated colours first. Images per concept and method: {3 * cfg.seeds_per_shape}. "
        f"Evaluation took {results['seconds']:.0f} s."
        + (f" {n_loaded} of the LinEAS fits were loaded from earlier runs (shipped or cached): their time to intervention is"
           " the one measured when they were fitted." if n_loaded else ""),
        "",
        "| method | inducement (pixels) | CLIP score | shape kept (pixels) | shape kept (CLIP) | prompted shape drawn | position shift (px) | time to intervention (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        r = s["methods"][m]
        lines.append(f"| {m} | {r['inducement']:.3f} | {r['clip']:.3f} | {r['shape_kept']:.3f} | {r['shape_kept_clip']:.3f} | "
                     f"{r['shape_correct']:.3f} | {r['position_shift']:.2f} | {r['seconds_to_intervention']:.4g} |")
    lines += ["", "Shape kept: the steered image's shape class equals the unsteered image's (same seed), read from pixels "
              "(bounding-box fill of the object mask) or by the world CLIP zero-shot. Prompted shape drawn: the pixel class "
              "equals the prompt's shape. The pixel classifier itself errs on some generated shapes (and an object close to "
              "the background colour loses pixels), so compare with the `none` and `prompt` rows (prompting changes only the "
              "colour/pattern words)."]
    lines += ["", "## Acceptance figures", ""]
    for key, what in (("on_lineas_concepts", "LinEAS concepts"), ("on_hardest", "hardest (patterns and saturated colours)"),
                      ("on_random", "randomly drawn"), ("on_lineas_patterns", "LinEAS patterns")):
        if key in s:
            o = s[key]
            held = (f"; held OT loss HT {o['held_loss']['ht_text']:.4f} vs LinEAS {o['held_loss']['lineas']:.4f} "
                    f"(ratio {o['held_loss_text_over_lineas']:.2f}, one estimator)" if "held_loss" in o else "")
            lines.append(f"- On the {o['n']} {what}: HT-from-text inducement {o['ht_text']:.3f} vs LinEAS {o['lineas']:.3f} "
                         f"(ratio **{o['text_over_lineas']:.3f}**; gain over no steering {o['text_gain_over_lineas_gain']:.3f} "
                         f"of LinEAS's), no steering {o['none']:.3f}{held}.")
    if s.get("spearman_by_kind"):
        lines.append("- Spearman by kind: " + ", ".join(f"{k} **{v:.3f}**" for k, v in s["spearman_by_kind"].items()) + ".")
    for kind, row in s.get("off_kind_by_kind", {}).items():
        other = "pattern scores" if kind == "colour" else "colour"
        lines.append(f"- Specificity, steering a {kind}: change of the {other} (0 = untouched) " +
                     ", ".join(f"{m} {v:.3f}" for m, v in row.items() if v == v) + ".")
    lines.append(f"- From a reference image vs from text: ratio **{s['image_over_text']:.3f}** "
                 f"(gain over no steering: {s['image_gain_over_text_gain']:.3f} of text's).")
    lines.append(f"- Inducement vs λ: mean Spearman **{s['spearman_mean']:.3f}**.")
    if "negative_moves_away" in s:
        n = s["negative_moves_away"]
        lines.append(f"- Negative λ: inducement at λ={results['strengths'][0]:g} below λ=0 for {100 * n['share']:.0f}% of concepts "
                     f"(mean {n['mean_inducement_at_min']:.3f} vs {n['mean_inducement_at_0']:.3f}).")
    lines.append(f"- Shape kept at λ=1 (HT from text): **{s['methods']['ht_text']['shape_kept']:.3f}** from pixels, "
                 f"{s['methods']['ht_text']['shape_kept_clip']:.3f} by CLIP (prompting: {s['methods']['prompt']['shape_kept']:.3f} / "
                 f"{s['methods']['prompt']['shape_kept_clip']:.3f}); the prompted shape drawn: {s['methods']['ht_text']['shape_correct']:.3f} "
                 f"(unsteered {s['methods']['none']['shape_correct']:.3f}, prompting {s['methods']['prompt']['shape_correct']:.3f}).")
    lines += results.get("against_reference", [])
    lines += ["", "Mean inducement per λ: " + ", ".join(f"{lam:g}: {v:.3f}" for lam, v in zip(results["strengths"], s["sweep_mean"])), "",
              "![strength grid](strength_grid.png)", "", "![strength curves](strength_curves.png)", "",
              "![methods vs strength](methods_vs_strength.png)", "", "![methods](methods.png)", "",
              "## Per concept", "", "| concept | from | kind | none | prompt | LinEAS | HT text | HT image | Spearman |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c, e in results["concepts"].items():
        m = e["methods"]
        li = f"{m['lineas']['inducement']:.3f}" if "lineas" in m else "-"
        lines.append(f"| {c} | {e['from']} | {e['kind']} | {m['none']['inducement']:.3f} | {m['prompt']['inducement']:.3f} | {li} | "
                     f"{m['ht_text']['inducement']:.3f} | {m['ht_image']['inducement']:.3f} | {e['sweep']['spearman']:.2f} |")
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


@command
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    ns = build_parser(EvalConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    cfg = resolve(EvalConfig, ns)
    res = evaluate(cfg)
    print(json.dumps(res["summary"], indent=1))
    for line in res["against_reference"]:
        print(line[2:])
    print(f"report: {os.path.join(cfg.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
