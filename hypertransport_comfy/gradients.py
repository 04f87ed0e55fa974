"""Gradients through a ComfyUI model while training maps: block checkpointing and the in-place guard.

Which blocks and norms these are is the family's entry of ``SITE_TABLES`` (``checkpoint_blocks``, ``inplace_norms``).

* :func:`enable_gradient_checkpointing`: recompute each top-level block's activations in the backward pass
  (less memory), with the steering and capture hooks inside the block re-installed for the recomputation;
* :func:`inplace_guard`: ComfyUI's Flux blocks change a norm's input in place after the norm ran, which
  breaks autograd; while gradients flow, those norms see a copy of their input.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict

import torch

from hypertransport_core.engine import hook_handles
from hypertransport_core.sites import SITE_TABLES


def enable_gradient_checkpointing(root: torch.nn.Module, family: str) -> int:
    """Recompute each top-level block's activations in the backward pass instead of keeping them.

    Forward (and pre-forward) hooks registered *inside* a block (steering, capture) are snapshotted at forward time and
    re-installed during the recomputation, so the recomputed graph is the steered one even though
    the ``steer`` context has closed by the time ``backward`` runs. Returns the number of blocks wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    table = SITE_TABLES.get(family)
    rx = re.compile(table.checkpoint_blocks if table is not None and table.checkpoint_blocks else r"$^")
    n = 0
    for name, m in root.named_modules():
        if not rx.fullmatch(name) or getattr(m, "_ht_ckpt", False):
            continue
        orig = m.forward

        def fwd(*a, _orig=orig, _m=m, **k):
            if not torch.is_grad_enabled():
                return _orig(*a, **k)
            snap = [(sub, OrderedDict(sub._forward_hooks), OrderedDict(sub._forward_pre_hooks)) for sub in _m.modules()
                    if sub is not _m and (sub._forward_hooks or sub._forward_pre_hooks)]

            def body(*a2, **k2):
                saved = [(sub, sub._forward_hooks, sub._forward_pre_hooks) for sub, _, _ in snap]
                try:
                    for sub, hooks, pre in snap:
                        sub._forward_hooks, sub._forward_pre_hooks = OrderedDict(hooks), OrderedDict(pre)
                    return _orig(*a2, **k2)
                finally:
                    for sub, hooks, pre in saved:
                        sub._forward_hooks, sub._forward_pre_hooks = hooks, pre

            return checkpoint(body, *a, use_reentrant=False, **k)

        m.forward = fwd
        m._ht_ckpt = True
        n += 1
    return n


def _clone_input(_module, args):
    if torch.is_grad_enabled() and args and torch.is_tensor(args[0]) and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


@contextlib.contextmanager
def inplace_guard(root: torch.nn.Module, family: str):
    """While active, the norms the family's table lists as changed in place (``inplace_norms``) see a copy of their
    input when gradients flow (removed on exit: nothing stays on a shared model)."""
    table = SITE_TABLES.get(family)
    rx = table.inplace_norms if table is not None else ""
    with hook_handles() as handles:
        if rx:
            r = re.compile(rx)
            for name, m in root.named_modules():
                if r.fullmatch(name) and "Norm" in type(m).__name__:
                    handles.append(m.register_forward_pre_hook(_clone_input))
        yield
