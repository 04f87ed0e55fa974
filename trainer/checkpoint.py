"""Training checkpoints: self-describing, atomic, and validated before a run resumes from them.

A checkpoint (``<out>/checkpoint.safetensors``) holds the hypernet's tensors (``model/<name>``), the
optimizer's state (``opt/<param index>/<name>``), and as JSON metadata the config, the step, the optimizer's
param groups and the loss history. It is written through :func:`~hypertransport_core.tensorfile.write_tensors`
(atomic, content hash, refuses NaN/Inf), so a diverged run never replaces the last good checkpoint.

:func:`load_checkpoint` checks, before restoring anything: the file's layout, its format key, the
metadata's JSON types, the step, every setting that changes what the checkpoint means (the config keys in
:data:`trainer.config.RESUME_KEYS`), that every tensor the run's hypernet and optimizer hold is present
with its shape and no other, that every value is finite, and the content hash. Every refusal names the
file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import torch

from hypertransport_core import HyperTransportError
from hypertransport_core.tensorfile import loads_bounded, read_layout, read_tensors, write_tensors
from trainer.config import RESUME_KEYS, TrainConfig

log = logging.getLogger("hypertransport.checkpoint")

FORMAT = "hypertransport.checkpoint"


def checkpoint_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out, "checkpoint.safetensors")


def save_checkpoint(run) -> str:
    """Write the run's checkpoint atomically; raises (leaving the previous checkpoint) if a tensor is NaN/Inf."""
    tensors = {f"model/{k}": v for k, v in run.hypernet.state_dict().items()}
    st = run.opt.state_dict()
    for pid, state in st["state"].items():
        for k, v in state.items():
            tensors[f"opt/{pid}/{k}"] = v.float() if torch.is_tensor(v) else torch.tensor(float(v))
    meta = {
        "format": FORMAT,
        "step": str(run.step),
        "config": json.dumps(dataclasses.asdict(run.cfg)),
        "param_groups": json.dumps(st["param_groups"]),
        "history": json.dumps(run.history),
    }
    path = checkpoint_path(run.cfg)
    write_tensors(path, tensors, meta)
    return path


def _expected(run) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this run holds: the hypernet's, and AdamW's step/exp_avg/exp_avg_sq per parameter."""
    out = {f"model/{k}": tuple(v.shape) for k, v in run.hypernet.state_dict().items()}
    params = [p for g in run.opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        out[f"opt/{i}/step"] = ()
        out[f"opt/{i}/exp_avg"] = tuple(p.shape)
        out[f"opt/{i}/exp_avg_sq"] = tuple(p.shape)
    return out


def _finite_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _param_groups_problem(groups: list, live: list) -> str | None:
    """Why the saved optimizer ``param_groups`` cannot be loaded into ``live`` ones (``None``: they can): the same
    keys, as many parameters per group, finite hyperparameters in their ranges (betas in [0, 1), eps > 0, lr >= 0)."""
    offset = 0
    for i, (g, ref) in enumerate(zip(groups, live)):
        if not isinstance(g, dict):
            return f"group {i} is a JSON {type(g).__name__}, not an object"
        if set(g) != set(ref):
            return f"group {i} has keys {sorted(g)[:8]}, this run's optimizer {sorted(ref)[:8]}"
        params = g["params"]
        ids = list(range(offset, offset + len(ref["params"])))  # how torch numbers the parameters of the groups
        offset += len(ids)
        if params != ids:
            return f"group {i} lists {params!r:.60} as its parameters, this run's optimizer {ids!r:.60}"
        for k, v in g.items():
            want = ref[k]
            if k == "params":
                continue
            if want is None or isinstance(want, bool):  # flags change what is optimised: they must be this run's
                if v != want or type(v) is not type(want):
                    return f"group {i} {k}={v!r:.40}, this run's optimizer has {want!r}"
                continue
            if not isinstance(want, (int, float, tuple, list)):
                continue
            if isinstance(want, (tuple, list)) != isinstance(v, (tuple, list)):
                return f"group {i} {k}={v!r:.40}, expected {'a list' if isinstance(want, (tuple, list)) else 'a number'}"
            vals = list(v) if isinstance(v, (list, tuple)) else [v]
            if isinstance(want, (tuple, list)) and len(vals) != len(want):
                return f"group {i} {k}={v!r:.40}, expected {len(want)} numbers"
            if not all(_finite_number(x) for x in vals):
                return f"group {i} {k}={v!r:.40} is not finite"
            lo_ok = {"betas": all(0 <= x < 1 for x in vals), "eps": all(x > 0 for x in vals)}.get(k, all(x >= 0 for x in vals))
            if not lo_ok:
                return f"group {i} {k}={v!r:.40} is out of range"
    return None


def load_checkpoint(run) -> None:
    """Restore ``run`` from its checkpoint (see the module docstring for what is checked first)."""
    path = checkpoint_path(run.cfg)
    fix_fresh = "drop --resume to start afresh (or point --out at the run folder that holds the checkpoint)"

    def refuse(why: str, fix: str = fix_fresh) -> HyperTransportError:
        return HyperTransportError(f"--resume: checkpoint {path} {why}. Fix: {fix}.")

    if not os.path.isfile(path):
        raise refuse("does not exist")
    try:
        layout = read_layout(path, what="checkpoint", fix=fix_fresh)
    except HyperTransportError as e:
        raise refuse(f"cannot be used: {e}", f"{fix_fresh}; delete the damaged file") from None
    meta = layout.metadata
    if meta.get("format") != FORMAT:
        raise refuse(f"is not a training checkpoint (metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        step = int(meta["step"])
        saved = loads_bounded(meta["config"])
        groups = loads_bounded(meta["param_groups"])
        history = loads_bounded(meta["history"])
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise refuse(f"has unreadable metadata ({type(e).__name__}: {e})", f"{fix_fresh}; delete the damaged file") from None
    if not isinstance(saved, dict) or not isinstance(groups, list) or not isinstance(history, list):
        raise refuse("has metadata of the wrong JSON types (config object, param_groups and history lists)")
    if not 0 <= step <= run.cfg.steps:
        raise refuse(f"is at step {step}, outside this run's 0..{run.cfg.steps}",
                     "pass --steps at least the checkpoint's step, or start afresh")
    for k in RESUME_KEYS:
        if saved.get(k, getattr(TrainConfig, k, None)) != getattr(run.cfg, k):
            raise refuse(f"was made with {k}={saved.get(k)!r}, this run has {getattr(run.cfg, k)!r}",
                         "use the same value, or start a new --out folder")
    want = _expected(run)
    got = layout.shapes()
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise refuse(f"does not hold this run's tensors (missing {missing[:3]}, unexpected {extra[:3]})")
    bad = [k for k in want if want[k] != got[k]]
    if bad:
        raise refuse(f"holds {bad[0]!r} of shape {got[bad[0]]}, this run's is {want[bad[0]]}")
    if len(groups) != len(run.opt.param_groups):
        raise refuse(f"has {len(groups)} optimizer param groups, this run {len(run.opt.param_groups)}")
    problem = _param_groups_problem(groups, run.opt.param_groups)
    if problem:
        raise refuse(f"has unusable optimizer settings: {problem}", f"{fix_fresh}; delete the damaged file")
    try:
        tensors = read_tensors(layout, max_abs=float("inf"))
    except HyperTransportError as e:
        raise refuse(f"cannot be used: {e}", f"{fix_fresh}; delete the damaged file") from None
    run.hypernet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v.reshape(()) if name == "step" else v
    run.opt.load_state_dict({"state": state, "param_groups": groups})
    run.step = step
    run.history = history
    log.info("resumed from %s at step %d", path, run.step)
