"""A trainer backend for real ComfyUI models, used headless as a library (no server, no graph).

The diffusion model is loaded with ComfyUI's own loaders (``comfy.sd.load_checkpoint_guess_config``,
falling back to a diffusion-model-only file plus ``comfy.sd.load_clip`` text encoders), prompts are
encoded with the model's own text encoder (``CLIP.encode_from_tokens``), and sampling is a short
loop over the model's own ``model_sampling`` sigmas that calls ``BaseModel.apply_model`` once per
step, with the schedule the model was distilled for (:data:`FAMILY_DEFAULTS`). Sites are named
relative to ``model.model.diffusion_model``, exactly as the nodes name them, so a hypernet trained
here loads in the Apply Steering node.

Gradients: ComfyUI runs nodes under ``torch.inference_mode()``; :meth:`ComfyBackend.run` turns
inference mode off and gradients on (as ``comfy_extras/nodes_train.py`` does) while the model's
own parameters stay frozen, so gradients reach only the hypernet (or LinEAS maps) through the
steering hooks. Latents are detached between steps: every step's activations see the maps of that
step only (METHOD §3).

Example (real files)::

    backend = ComfyBackend.from_files("models/checkpoints/dmd2_sdxl_4step.safetensors",
                                      clip_arch="ViT-L-14", clip_weights="models/clip/ViT-L-14.safetensors")
    imgs = backend.run(["a photo of a house"], [0])   # latents (B, C, h, w)
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from hypertransport_core import ConceptEncoder, Site, detect_family, list_sites, weights_fingerprint
from hypertransport_core.encoders import to_model_input
from hypertransport_core.files import _atomic_save
from trainer.backends import ConceptInfo

log = logging.getLogger("hypertransport.comfy_backend")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "trainer" / "data"
CONCEPTS_TSV = str(DATA / "concepts.tsv")
NEUTRAL_PROMPTS = str(DATA / "neutral_prompts.txt")
HOLDOUT_TXT = str(DATA / "holdout.txt")


@dataclass(frozen=True)
class FamilyDefaults:
    """How a family's (distilled) model is sampled.

    Attributes:
        steps: default number of sampler steps.
        timesteps: fixed discrete timesteps per step count (the distillation's own), else ``None``
            and the ``scheduler`` spaces the sigmas.
        sampler: ``"lcm"`` (predict x0, re-noise to the next sigma: DMD2 / consistency style) or ``"euler"``.
        scheduler: ComfyUI scheduler name used when no fixed timesteps are given.
        resolution: image side in pixels (latent side = resolution / 8).
        extra: conditioning extras every prompt gets (Flux: the distilled guidance value).
        note: where the numbers come from.
    """

    steps: int
    timesteps: dict[int, tuple[int, ...]] = field(default_factory=dict)
    sampler: str = "euler"
    scheduler: str = "simple"
    resolution: int = 1024
    extra: dict = field(default_factory=dict)
    note: str = ""


FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    # DMD2 (tianweiy/DMD2): 4-step generator at timesteps 999, 749, 499, 249; 1-step at 399. cfg 1.
    "sdxl": FamilyDefaults(4, {4: (999, 749, 499, 249), 1: (399,)}, "lcm", "sgm_uniform", 1024,
                           note="DMD2 (SDXL distilled): 4 steps at its fixed timesteps, or 1 step at t=399, cfg 1"),
    # Nitro-1-PixArt (AMD): one step from pure noise; cfg 1. [ours: t=999 as the single timestep]
    "pixart": FamilyDefaults(1, {1: (999,)}, "lcm", "simple", 1024, note="Nitro-1-PixArt: 1 step, cfg 1"),
    "sd15": FamilyDefaults(4, {}, "euler", "simple", 512, note="SD1.5: 4-step Euler on the simple schedule"),
    "flux": FamilyDefaults(4, {}, "euler", "simple", 1024, {"guidance": 3.5},
                           note="Flux: 4-step Euler on the simple schedule, distilled guidance 3.5"),
}

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


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class ComfyConcept(ConceptInfo):
    template: str = DEFAULT_TEMPLATE  # how the concept is added to a neutral prompt


def read_concepts(path: str = CONCEPTS_TSV) -> list[ComfyConcept]:
    """A concept list: tab-separated ``concept<TAB>category[<TAB>template]``, ``#`` comments, a header
    row ``concept\\tcategory`` allowed. See ``trainer/data/README.md``."""
    if not os.path.isfile(path):
        raise SystemExit(f"concept list {path!r} does not exist. Fix: pass --concept-list FILE (format: trainer/data/README.md).")
    out: list[ComfyConcept] = []
    seen: set[str] = set()
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or not row[0].strip() or row[0].startswith("#") or (i == 1 and row[0].strip() == "concept"):
                continue
            name = row[0].strip()
            cat = row[1].strip() if len(row) > 1 and row[1].strip() else "other"
            tpl = row[2].strip() if len(row) > 2 and row[2].strip() else TEMPLATES.get(cat, DEFAULT_TEMPLATE)
            if "{prompt}" not in tpl or "{concept}" not in tpl:
                raise SystemExit(f"{path}:{i}: template {tpl!r} needs both {{prompt}} and {{concept}}.")
            if name in seen:
                raise SystemExit(f"{path}:{i}: concept {name!r} is listed twice. Fix: keep one line per concept.")
            seen.add(name)
            out.append(ComfyConcept(name, cat, tpl))
    if not out:
        raise SystemExit(f"concept list {path!r} is empty.")
    return out


def read_prompts(path: str = NEUTRAL_PROMPTS) -> list[str]:
    if not os.path.isfile(path):
        raise SystemExit(f"neutral prompt file {path!r} does not exist. Fix: pass --neutral-prompts FILE (one prompt a line).")
    with open(path) as f:
        out = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    if len(out) < 2:
        raise SystemExit(f"{path!r}: need at least 2 neutral prompts.")
    return out


# -------------------------------------------------------------------------------------- ComfyUI
def find_comfyui() -> Path | None:
    """``$COMFYUI_DIR``, the ComfyUI holding this repo in ``custom_nodes/``, or ``<repo>/.comfyui/ComfyUI``."""
    cands = [Path(os.environ["COMFYUI_DIR"])] if os.environ.get("COMFYUI_DIR") else []
    if REPO.parent.name == "custom_nodes":
        cands.append(REPO.parent.parent)
    cands.append(REPO / ".comfyui" / "ComfyUI")
    for c in cands:
        if (c / "comfy").is_dir() and (c / "main.py").is_file():
            return c.resolve()
    return None


def import_comfy():
    """Import ComfyUI as a library (idempotent). Returns ``comfy.model_management``."""
    if "comfy.model_management" in sys.modules:
        return sys.modules["comfy.model_management"]
    root = find_comfyui()
    if root is None:
        raise SystemExit("ComfyUI not found. Fix: set COMFYUI_DIR to your ComfyUI folder (or run scripts/get_comfyui.sh).")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management as mm

    return mm


# ---------------------------------------------------------------------------------- text encoders
class ComfyTextEncoder:
    """Prompts → ComfyUI conditioning extras (``{"cross_attn": (1, T, C), "pooled_output": ..., ...}``) with
    the model's own text encoder (``comfy.sd.CLIP``); results cached per prompt (neutral prompts repeat)."""

    def __init__(self, clip, cache_size: int = 4096):
        self.clip, self.cache, self.cache_size = clip, OrderedDict(), cache_size

    def __call__(self, prompt: str) -> dict:
        if prompt in self.cache:
            self.cache.move_to_end(prompt)
            return self.cache[prompt]
        with torch.inference_mode(False), torch.no_grad():
            out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        d = {"cross_attn": cond.cpu(), **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in out.items()}}
        self.cache[prompt] = d
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return d


class HashTextEncoder:
    """Tests only: a fixed random token embedding per prompt (seeded by a hash of the text), so tiny
    random-weight models need no real text encoder. Equal prompts give equal conditioning."""

    def __init__(self, dim: int, tokens: int = 8, pooled_dim: int | None = None):
        self.dim, self.tokens, self.pooled_dim = dim, tokens, pooled_dim

    def __call__(self, prompt: str) -> dict:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % 2**63
        g = torch.Generator().manual_seed(seed)
        d = {"cross_attn": torch.randn((1, self.tokens, self.dim), generator=g)}
        if self.pooled_dim:
            d["pooled_output"] = torch.randn((1, self.pooled_dim), generator=g)
        return d


# ------------------------------------------------------------------------------ gradient checkpoints
_CKPT_BLOCKS = {
    "sdxl": r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)",
    "sd15": r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)",
    "pixart": r"blocks\.\d+",
    "flux": r"(double_blocks|single_blocks)\.\d+",
}


def enable_gradient_checkpointing(root: torch.nn.Module, family: str) -> int:
    """Recompute each top-level block's activations in the backward pass instead of keeping them.

    Forward (and pre-forward) hooks registered *inside* a block (steering, capture) are snapshotted at forward time and
    re-installed during the recomputation, so the recomputed graph is the steered one even though
    the ``steer`` context has closed by the time ``backward`` runs. Returns the number of blocks wrapped.
    """
    import re

    from torch.utils.checkpoint import checkpoint

    rx = re.compile(_CKPT_BLOCKS.get(family, r"$^"))
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


#: Norms whose input the model then changes in place (Flux blocks: ``x += ...`` after ``pre_norm(x)``):
#: with gradients on, their input is cloned, or autograd finds the saved input modified.
_INPLACE_GUARDED = {"flux": r"(double_blocks|single_blocks)\.\d+\..*norm.*"}


def _clone_input(_module, args):
    if torch.is_grad_enabled() and args and torch.is_tensor(args[0]) and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


@contextlib.contextmanager
def inplace_guard(root: torch.nn.Module, family: str):
    """While active, the norms listed in :data:`_INPLACE_GUARDED` see a copy of their input when
    gradients flow (removed on exit: nothing stays on a shared model)."""
    import re

    rx = _INPLACE_GUARDED.get(family)
    handles = []
    try:
        if rx:
            r = re.compile(rx)
            for name, m in root.named_modules():
                if r.fullmatch(name) and "Norm" in type(m).__name__:
                    handles.append(m.register_forward_pre_hook(_clone_input))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------- backend
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ComfyBackend:
    """What ``trainer/train.py`` needs from a model (see :class:`trainer.backends.WorldBackend`), for a
    ComfyUI ``ModelPatcher``.

    Args:
        patcher: a ComfyUI ``ModelPatcher`` (from ``comfy.sd`` loaders or built in tests).
        text: prompt → conditioning extras (:class:`ComfyTextEncoder` for real models).
        encoder: the concept encoder (open_clip, :class:`~hypertransport_core.ConceptEncoder`).
        concepts: the concept list; ``neutral``: the neutral prompts.
        family: site table / sampling defaults; detected from the module tree when ``None``.
        steps: sampler steps (``None``: the family's default); ``timesteps`` overrides the schedule.
        guidance: classifier-free guidance (1: cond only, as distilled models are sampled).
        resolution: image side in pixels (``None``: the family's default).
        form: site form for spatial sites ("pooled" or "elementwise").
        precision: "fp32", "bf16" or "fp16" autocast of the diffusion model's forward.
        grad_checkpoint: recompute block activations in backward (less memory, one more forward per block);
            the block forwards stay wrapped on the model (a no-op without gradients).
        vae: a ``comfy.sd.VAE`` for reference images (else a cheap latent→RGB preview is used).
        ref_cache: folder keeping each concept's reference images at the concept encoder's input size
            (``--backend comfy`` sets ``<out>/refs``): a resumed run does not sample them again.
    """

    def __init__(self, patcher, text, encoder: ConceptEncoder, concepts: Sequence[ConceptInfo], neutral: Sequence[str], *,
                 family: str | None = None, steps: int | None = None, timesteps: Sequence[int] | None = None,
                 guidance: float = 1.0, resolution: int | None = None, form: str = "pooled", precision: str = "fp32",
                 grad_checkpoint: bool = False, vae=None, ref_cache: str | None = None):
        mm = import_comfy()
        self.patcher, self.text, self.encoder, self.vae, self.ref_cache = patcher, text, encoder, vae, ref_cache
        self._fingerprint: str | None = None
        self.model = patcher.model  # comfy.model_base.BaseModel
        self.root = self.model.diffusion_model
        self.family = family or detect_family(self.root)
        if self.family not in FAMILY_DEFAULTS:
            raise SystemExit(f"model family {self.family!r} has no sampling defaults; known: {sorted(FAMILY_DEFAULTS)}.")
        self.defaults = FAMILY_DEFAULTS[self.family]
        self.steps = int(steps or self.defaults.steps)
        self.guidance = float(guidance)
        self.resolution = int(resolution or self.defaults.resolution)
        if precision not in _DTYPES:
            raise SystemExit(f"--precision {precision!r}: use one of {sorted(_DTYPES)}.")
        self.precision = precision
        self.concepts = list(concepts)
        self.neutral = list(neutral)
        self.model.requires_grad_(False)
        self.model.eval()
        with torch.inference_mode(False):
            mm.load_models_gpu([patcher], force_full_load=True)
        self.device = next(self.root.parameters()).device
        self.sites: list[Site] = list_sites(self.root, self.family, form=form)
        self.sigmas = self._schedule(timesteps)
        self.grad_checkpoint = bool(grad_checkpoint) and enable_gradient_checkpointing(self.root, self.family) > 0

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_files(cls, model: str, *, clip_arch: str, clip_weights: str, text_encoders: Sequence[str] = (),
                   clip_type: str = "stable_diffusion", concept_list: str = CONCEPTS_TSV, neutral_prompts: str = NEUTRAL_PROMPTS,
                   precision: str = "fp32", **kw) -> ComfyBackend:
        """Load a checkpoint (or a diffusion-model-only file plus ``text_encoders``) with ComfyUI's loaders."""
        import_comfy()
        import comfy.sd

        if not os.path.isfile(model):
            raise SystemExit(f"--model {model!r} does not exist. Fix: point it at a checkpoint or diffusion model .safetensors.")
        opts = {} if precision == "fp32" else {"dtype": _DTYPES[precision]}
        out = comfy.sd.load_checkpoint_guess_config(model, output_vae=True, output_clip=True, model_options=opts)
        if out is None:
            raise SystemExit(f"--model {model!r}: ComfyUI cannot tell the model type. Fix: use a checkpoint ComfyUI's loaders accept.")
        patcher, clip, vae = out[0], out[1], out[2]
        if clip is None:  # a diffusion-model-only file: its VAE is a placeholder, the text encoders come apart
            vae = None
            if not text_encoders:
                raise SystemExit(f"--model {model!r} holds no text encoder. Fix: pass --text-encoders FILE[,FILE] "
                                 "(e.g. clip_l + clip_g for SDXL, t5xxl for PixArt, clip_l + t5xxl for Flux).")
            try:
                ctype = comfy.sd.CLIPType[clip_type.upper()]
            except KeyError:
                raise SystemExit(f"--clip-type {clip_type!r}: use one of {[t.name.lower() for t in comfy.sd.CLIPType]}.") from None
            clip = comfy.sd.load_clip(list(text_encoders), clip_type=ctype)
        if not os.path.isfile(clip_weights):
            raise SystemExit(f"--clip-weights {clip_weights!r} does not exist. Fix: download the open_clip weights of "
                             f"{clip_arch} (e.g. ViT-L-14 open_clip_pytorch_model.bin or .safetensors) and pass the path.")
        if clip_arch.endswith(".json"):  # an open_clip model config file (architectures open_clip does not ship)
            import open_clip

            if not os.path.isfile(clip_arch):
                raise SystemExit(f"--clip-arch {clip_arch!r}: config file not found.")
            open_clip.add_model_config(clip_arch)
            clip_arch = os.path.splitext(os.path.basename(clip_arch))[0]
        enc = ConceptEncoder.from_open_clip(clip_arch, weights=clip_weights, device="cpu")
        return cls(patcher, ComfyTextEncoder(clip), enc, read_concepts(concept_list), read_prompts(neutral_prompts),
                   precision=precision, vae=vae, **kw)

    @classmethod
    def tiny(cls, patcher, encoder: ConceptEncoder, context_dim: int, *, pooled_dim: int | None = None,
             concepts: Sequence[ConceptInfo] | None = None, neutral: Sequence[str] | None = None, **kw) -> ComfyBackend:
        """Tests: a tiny random-weight ComfyUI model with prompt-hash text conditioning
        (:class:`HashTextEncoder` of width ``context_dim``; ``pooled_dim`` for SDXL (1280) and Flux)."""
        return cls(patcher, HashTextEncoder(context_dim, pooled_dim=pooled_dim), encoder,
                   concepts if concepts is not None else read_concepts(),
                   neutral if neutral is not None else read_prompts(), **kw)

    # -- schedule ---------------------------------------------------------------------------
    def _schedule(self, timesteps: Sequence[int] | None) -> torch.Tensor:
        """Sigmas of the sampler, ending with 0: the distillation's fixed timesteps, else a ComfyUI scheduler."""
        import comfy.samplers

        ms = self.model.model_sampling
        ts = tuple(timesteps) if timesteps else self.defaults.timesteps.get(self.steps)
        if ts:
            if len(ts) != self.steps:
                raise SystemExit(f"{len(ts)} timesteps given for {self.steps} steps. Fix: give one timestep per step.")
            sig = torch.stack([ms.sigma(torch.tensor(float(t))).float().reshape(()) for t in ts])
            return torch.cat([sig, torch.zeros(1)]).cpu()
        return comfy.samplers.calculate_sigmas(ms, self.defaults.scheduler, self.steps).float().cpu()

    # -- prompts ------------------------------------------------------------------------------
    def concept_info(self, name: str) -> ConceptInfo:
        for c in self.concepts:
            if c.name == name:
                return c
        raise KeyError(f"{name!r} is not in the concept list")

    def source_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` neutral prompts drawn (with replacement) from the neutral prompt list."""
        return [self.neutral[int(i)] for i in rng.integers(0, len(self.neutral), n)]

    def target_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        """Neutral prompts with the concept added by its category's template."""
        tpl = getattr(self.concept_info(concept), "template", DEFAULT_TEMPLATE)
        return [tpl.format(prompt=p, concept=concept) for p in self.source_prompts(n, rng)]

    def reference_images(self, concept: str, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` images ``(n, H, W, 3)`` in [0, 1] the model makes for the concept's prompts (image-embedding inputs)."""
        path = None
        if self.ref_cache:
            if self._fingerprint is None:
                self._fingerprint = weights_fingerprint(self.root)
            ident = json.dumps({"concept": concept, "n": n, "rng": rng.bit_generator.state, "model": self._fingerprint,
                                "sigmas": self.sigmas.tolist(), "resolution": self.resolution, "guidance": self.guidance,
                                "template": getattr(self.concept_info(concept), "template", ""),
                                "size": self.encoder.image_size}, sort_keys=True, default=str)
            path = os.path.join(self.ref_cache, hashlib.sha256(ident.encode()).hexdigest()[:24] + ".safetensors")
            if os.path.isfile(path):
                with safe_open(path, "pt") as f:
                    return f.get_tensor("images").float()
        prompts = self.target_prompts(concept, n, rng)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, n)]
        with torch.no_grad():
            imgs = self.decode(self.run(prompts, seeds))
        if path is None:
            return imgs
        # resized and cropped exactly as the encoder's preprocessing would (it is then a no-op), kept as fp16
        small = to_model_input(imgs, self.encoder.image_size, (0.0,) * 3, (1.0,) * 3).permute(0, 2, 3, 1).half()
        _atomic_save({"images": small}, {"concept": concept}, path)
        return small.float()

    # -- sampling -----------------------------------------------------------------------------
    @property
    def rows_per_prompt(self) -> int:
        return 1 if self.guidance == 1.0 else 2

    def cond_rows(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.rows_per_prompt == 1 else a[: a.shape[0] // 2]

    def latent_shape(self) -> tuple[int, int, int]:
        c = int(self.model.latent_format.latent_channels)
        side = max(1, self.resolution // 8)
        return c, side, side

    def _conds(self, prompts: Sequence[str], noise: torch.Tensor) -> dict:
        """``apply_model`` keyword arguments for a batch: each prompt through the model's own
        ``extra_conds`` (as ComfyUI's samplers do), then concatenated with the cond classes' rules."""
        per: list[dict] = []
        h, w = noise.shape[-2] * 8, noise.shape[-1] * 8
        for i, p in enumerate(prompts):
            params = {**self.defaults.extra, **self.text(p), "device": self.device, "noise": noise[i : i + 1],
                      "width": w, "height": h, "prompt_type": "positive"}
            params.setdefault("target_width", w)
            params.setdefault("target_height", h)
            per.append(self.model.extra_conds(**params))
        out = {}
        for k in per[0]:
            objs = [d[k] for d in per]
            first = objs[0]
            if all(first.can_concat(o) for o in objs[1:]):
                out[k] = first.concat(objs[1:])
            else:  # token counts differ (DiT conds concatenate as plain tensors): zero-pad to the longest
                ts = [o.cond for o in objs]
                T = max(t.shape[1] for t in ts)
                out[k] = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, T - t.shape[1])) for t in ts])
        return out

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def run(self, prompts: Sequence[str], seeds: Sequence[int], grad: bool = False) -> torch.Tensor:
        """Sample latents ``(B, C, h, w)`` (model space, the final x0 estimate); hooks the caller set on
        ``root`` are active. ``grad=True`` builds the graph through the model at every step."""
        B = len(prompts)
        C, h, w = self.latent_shape()
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        noise = torch.cat([torch.randn((1, C, h, w), generator=g) for g in gens]).to(self.device)
        ms = self.model.model_sampling
        sigmas = self.sigmas.to(self.device)
        with torch.inference_mode(False), torch.set_grad_enabled(grad), inplace_guard(self.root, self.family):
            kw = self._conds(prompts, noise)
            if self.rows_per_prompt == 2:
                un = self._conds([""] * B, noise)
                kw = {k: (torch.cat([v, un[k]]) if torch.is_tensor(v) else v) for k, v in kw.items()}
            max_denoise = float(sigmas[0]) >= float(ms.sigma_max) - 1e-4
            x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise)
            denoised = x
            topts = dict(self.patcher.model_options.get("transformer_options", {}))
            for i in range(len(sigmas) - 1):
                s = sigmas[i]
                xin = torch.cat([x, x]) if self.rows_per_prompt == 2 else x
                sig = s.expand(xin.shape[0])
                topts.update({"sigmas": sig, "sample_sigmas": sigmas,
                              "cond_or_uncond": [0] if self.rows_per_prompt == 1 else [0, 1]})
                with self._autocast():
                    out = self.model.apply_model(xin, sig, transformer_options=topts, **kw)
                out = out.detach().float()
                if self.rows_per_prompt == 2:
                    c, u = out.chunk(2)
                    out = u + self.guidance * (c - u)
                denoised = out
                nxt = sigmas[i + 1]
                if float(nxt) == 0:
                    x = denoised
                elif self.defaults.sampler == "lcm":
                    fresh = torch.cat([torch.randn((1, C, h, w), generator=g) for g in gens]).to(self.device)
                    x = ms.noise_scaling(nxt, fresh, denoised)
                else:  # Euler on the probability-flow ODE
                    x = x + (x - denoised) / s * (nxt - s)
                x = x.detach()
        return denoised.detach()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``(B, H, W, 3)`` in [0, 1]: the VAE when there is one, else ComfyUI's latent preview factors."""
        if self.vae is not None:
            with torch.inference_mode(False), torch.no_grad():
                return self.vae.decode(self.model.process_latent_out(latents)).float().clamp(0, 1)[..., :3].cpu()
        lf = self.model.latent_format
        f = torch.tensor(lf.latent_rgb_factors, dtype=torch.float32, device=latents.device)  # (C, 3)
        img = torch.einsum("bchw,cr->bhwr", self.model.process_latent_out(latents).float(), f)
        if getattr(lf, "latent_rgb_factors_bias", None) is not None:
            img = img + torch.tensor(lf.latent_rgb_factors_bias, device=latents.device)
        return ((img + 1) / 2).clamp(0, 1).cpu()
