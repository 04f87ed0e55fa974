"""The trainer's one backend: a ComfyUI model, loaded by ComfyUI's loaders and sampled by ComfyUI's sampler.

Everything the trainer and the evaluator do to a model goes through :class:`ComfyBackend`: its
steerable module tree (``root`` = ``model.diffusion_model``, the tree the nodes steer), its sites (the
family's site table), its concept encoder, its concept source (:mod:`hypertransport_comfy.concepts`), and
:meth:`ComfyBackend.run`, which samples a batch of prompts exactly as CLIPTextEncode → KSampler do
(:mod:`hypertransport_comfy.sampling`), with the caller's hooks active. The same class serves

* the embedded world (:meth:`ComfyBackend.world`): ComfyUI's UNet, CLIP and pixel-space VAE classes loaded
  from ``hypertransport_world/weights`` (:mod:`hypertransport_world.model`, what the loader node returns),
  Euler on ComfyUI's simple schedule, 4 steps, guidance 2;
* real checkpoints (:meth:`ComfyBackend.from_files`): ComfyUI's ``load_checkpoint_guess_config`` or a
  diffusion-model file plus ``load_clip`` text encoders, sampled with the schedule the model was distilled
  for (the family's :class:`~hypertransport_core.sites.Sampling`, in its entry of ``SITE_TABLES``).

Rows: ComfyUI runs the conditional and unconditional rows of a guided step as chunks of one batch, in an
order it reports as ``transformer_options["cond_or_uncond"]``. While :meth:`run` samples, a forward
pre-hook on ``root`` reads it at every call, so that :meth:`steer_rows` (maps of K concepts repeat in
every chunk) and :meth:`cond_rows` (the loss compares conditional rows only) know the layout. The hook
is removed when sampling ends.

Gradients: ComfyUI runs nodes under ``torch.inference_mode()``; :meth:`run` turns inference mode off, and
``grad=True`` runs ComfyUI's own sampler function without its ``no_grad`` decorator, every model call on
a detached input (each step's activations see that step's maps only, METHOD §3). The loss compares the
conditional rows only, so with guidance a ``CALC_COND_BATCH`` wrapper (:func:`uncond_without_grad`, on
a clone of the patcher used for these runs) computes the unconditional rows in a call of their own with
gradients off: the same outputs, half the backward pass. The model's own parameters stay frozen:
gradients reach only the hypernet (or LinEAS maps) through the steering hooks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from hypertransport_comfy import sampling
from hypertransport_comfy.comfyui import import_comfyui
from hypertransport_comfy.concepts import ConceptSource, ListedConcepts, WorldConcepts
from hypertransport_comfy.gradients import enable_gradient_checkpointing, inplace_guard
from hypertransport_core import SITE_TABLES, ConceptEncoder, Rows, Site, detect_family, list_sites, weights_fingerprint
from hypertransport_core.encoders import to_model_input
from hypertransport_core.engine import hook_handles
from hypertransport_core.errors import HyperTransportError
from hypertransport_core.tensorfile import read_layout, read_tensors, write_tensors

log = logging.getLogger("hypertransport.backend")


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def uncond_without_grad(executor, model, conds, x_in, timestep, model_options):
    """``CALC_COND_BATCH`` wrapper: while gradients are on, the conditional rows run with them and the
    unconditional rows (which no loss reads) in a second call without; otherwise one call, as ComfyUI does."""
    if not torch.is_grad_enabled() or len(conds) != 2 or conds[0] is None or conds[1] is None:
        return executor(model, conds, x_in, timestep, model_options)
    cond = executor(model, [conds[0], None], x_in, timestep, model_options)
    with torch.no_grad():
        uncond = executor(model, [None, conds[1]], x_in, timestep, model_options)
    return [cond[0], uncond[1]]


class _CallContext:
    """``cond_or_uncond`` of the model call in progress (a forward pre-hook on the diffusion model reads
    it from the call's ``transformer_options``)."""

    def __init__(self):
        self.cond_or_uncond: list[int] = [0]

    def pre_hook(self, _module, _args, kwargs):
        topts = kwargs.get("transformer_options") or {}
        self.cond_or_uncond = list(topts.get("cond_or_uncond") or [0])

    def steer(self) -> Rows:
        return Rows(chunks=len(self.cond_or_uncond))

    def cond(self) -> Rows:
        return Rows(chunks=len(self.cond_or_uncond), keep=tuple(c == 0 for c in self.cond_or_uncond))


class ComfyBackend:
    """A ComfyUI ``ModelPatcher`` as the trainer and the evaluator use it (see the module docstring).

    Args:
        patcher: a ComfyUI ``ModelPatcher`` (the MODEL type).
        text: prompt → ``[cond, extras]`` as CLIPTextEncode outputs it (:class:`hypertransport_comfy.sampling.PromptEncoder`).
        encoder: the concept encoder (open_clip, :class:`~hypertransport_core.ConceptEncoder`); ``None`` for a
            per-concept fit, which needs none.
        source: concepts and prompts (:mod:`hypertransport_comfy.concepts`).
        family: site table / sampling defaults; detected from the module tree when ``None``.
        steps: sampler steps (``None``: the family's default); ``timesteps`` overrides the schedule.
        guidance: classifier-free guidance (1: cond only, as distilled models are sampled).
        resolution: image side in pixels (``None``: the family's default); ``latent_shape`` overrides the
            latent shape it implies (``(C, resolution/8, resolution/8)``).
        sampler, scheduler: ComfyUI names (``None``: the family's).
        form: site form for spatial sites ("pooled" or "elementwise").
        precision: "fp32", "bf16" or "fp16" autocast around sampling (fp32: exactly what ComfyUI computes).
        grad_checkpoint: recompute block activations in backward (less memory, one more forward per block).
        vae: a ``comfy.sd.VAE`` for images (else a cheap latent→RGB preview is used).
        ref_cache: folder keeping each concept's generated reference images (``--backend comfy``: ``<out>/refs``).
    """

    def __init__(self, patcher, text: Callable[[str], list], encoder: ConceptEncoder | None, source: ConceptSource, *,
                 family: str | None = None, steps: int | None = None, timesteps: Sequence[int] | None = None,
                 guidance: float = 1.0, resolution: int | None = None, latent_shape: tuple[int, int, int] | None = None,
                 sampler: str | None = None, scheduler: str | None = None, form: str = "pooled", precision: str = "fp32",
                 grad_checkpoint: bool = False, vae=None, ref_cache: str | None = None):
        mm = import_comfyui()
        self.patcher, self.text, self.encoder, self.source, self.vae, self.ref_cache = patcher, text, encoder, source, vae, ref_cache
        self._fingerprint: str | None = None
        self.model = patcher.model  # comfy.model_base.BaseModel
        self.root = self.model.diffusion_model
        self.family = family or detect_family(self.root)
        table = SITE_TABLES.get(self.family)
        if table is None or table.sampling is None:
            what = f"{type(self.model).__name__} ({type(self.root).__name__})"
            known = sorted(f for f, t in SITE_TABLES.items() if t.sampling is not None)
            raise HyperTransportError(
                f"the model is {what}, a family HyperTransport has no site table or sampling defaults for "
                f"(detected: {self.family!r}); it steers {', '.join(known)}. Fix: load a model of one of "
                "those families (SD3, AuraFlow, Lumina, Wan or Qwen-Image models cannot be steered yet)."
            )
        self.defaults = table.sampling
        self.steps = int(steps or self.defaults.steps)
        self.guidance = float(guidance or 1.0)
        self.sampler = sampler or self.defaults.sampler
        self.scheduler = scheduler or self.defaults.scheduler
        self.resolution = int(resolution or self.defaults.resolution)
        c = int(self.model.latent_format.latent_channels)
        self.latent_shape = tuple(latent_shape) if latent_shape else (c, max(1, self.resolution // 8), max(1, self.resolution // 8))
        if precision not in _DTYPES:
            raise HyperTransportError(f"--precision {precision!r}: use one of {sorted(_DTYPES)}.")
        self.precision = precision
        self.model.requires_grad_(False)
        self.model.eval()
        with torch.inference_mode(False):
            mm.load_models_gpu([patcher], force_full_load=True)
        self.device = next(self.root.parameters()).device
        self.sites: list[Site] = list_sites(self.root, self.family, form=form)
        self.sigmas = sampling.sigmas_for(patcher, self.scheduler, self.steps, timesteps or self.defaults.timesteps.get(self.steps))
        self.grad_checkpoint = bool(grad_checkpoint) and enable_gradient_checkpointing(self.root, self.family) > 0
        self._call = _CallContext()
        import comfy.patcher_extension as pe

        self._grad_patcher = patcher.clone()  # the same model; its guided calls carry gradients on the cond rows only
        self._grad_patcher.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "hypertransport_trainer", uncond_without_grad)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def world(cls, weights: str | None = None, *, precision: str = "fp32", form: str = "pooled", steps: int | None = None,
              guidance: float | None = None, models=None) -> ComfyBackend:
        """The embedded world, loaded exactly as the "Load Embedded World" node loads it (``models``: an
        already loaded :class:`hypertransport_world.model.WorldModels`, e.g. a tiny random one in tests)."""
        import_comfyui()
        from hypertransport_world import model as WM
        from hypertransport_world import world_clip

        models = models or WM.load(weights or WM.WEIGHTS_DIR)
        world_clip.register()
        enc = ConceptEncoder.from_open_clip(world_clip.MODEL_NAME, weights=models.clip_path, mean=world_clip.IMAGE_MEAN,
                                            std=world_clip.IMAGE_STD)
        s = WM.SAMPLING
        return cls(models.model, sampling.PromptEncoder(models.clip), enc, WorldConcepts(), steps=steps or s.steps,
                   guidance=s.cfg if guidance is None else guidance, sampler=s.sampler, scheduler=s.scheduler,
                   latent_shape=(3, s.side, s.side), resolution=s.side, form=form, precision=precision, vae=models.vae)

    @classmethod
    def from_files(cls, model: str, *, clip_arch: str, clip_weights: str, text_encoders: Sequence[str] = (),
                   clip_type: str = "stable_diffusion", concept_list: str | None = None, neutral_prompts: str | None = None,
                   precision: str = "fp32", **kw) -> ComfyBackend:
        """Load a checkpoint (or a diffusion-model-only file plus ``text_encoders``) with ComfyUI's loaders."""
        import_comfyui()
        import comfy.sd

        if not os.path.isfile(model):
            raise HyperTransportError(f"--model {model!r} does not exist. Fix: point it at a checkpoint or diffusion model .safetensors.")
        opts = {} if precision == "fp32" else {"dtype": _DTYPES[precision]}
        out = comfy.sd.load_checkpoint_guess_config(model, output_vae=True, output_clip=True, model_options=opts)
        if out is None:
            raise HyperTransportError(f"--model {model!r}: ComfyUI cannot tell the model type. Fix: use a checkpoint ComfyUI's loaders accept.")
        patcher, clip, vae = out[0], out[1], out[2]
        if clip is None:  # a diffusion-model-only file: its VAE is a placeholder, the text encoders come apart
            vae = None
            if not text_encoders:
                raise HyperTransportError(f"--model {model!r} holds no text encoder. Fix: pass --text-encoders FILE[,FILE] "
                                 "(e.g. clip_l + clip_g for SDXL, t5xxl for PixArt, clip_l + t5xxl for Flux).")
            try:
                ctype = comfy.sd.CLIPType[clip_type.upper()]
            except KeyError:
                raise HyperTransportError(f"--clip-type {clip_type!r}: use one of {[t.name.lower() for t in comfy.sd.CLIPType]}.") from None
            clip = comfy.sd.load_clip(list(text_encoders), clip_type=ctype)
        if not os.path.isfile(clip_weights):
            raise HyperTransportError(f"--clip-weights {clip_weights!r} does not exist. Fix: download the open_clip weights of "
                             f"{clip_arch} (e.g. ViT-L-14 open_clip_pytorch_model.bin or .safetensors) and pass the path.")
        if clip_arch.endswith(".json"):  # an open_clip model config file (architectures open_clip does not ship)
            import open_clip

            if not os.path.isfile(clip_arch):
                raise HyperTransportError(f"--clip-arch {clip_arch!r}: config file not found.")
            open_clip.add_model_config(clip_arch)
            clip_arch = os.path.splitext(os.path.basename(clip_arch))[0]
        enc = ConceptEncoder.from_open_clip(clip_arch, weights=clip_weights, device="cpu")
        source = ListedConcepts.from_files(*(p for p in (concept_list, neutral_prompts) if p))
        return cls(patcher, sampling.PromptEncoder(clip), enc, source, precision=precision, vae=vae, **kw)

    # -- concepts ----------------------------------------------------------------------------
    @property
    def concepts(self):
        return self.source.concepts

    def concept_info(self, name: str):
        return self.source.concept_info(name)

    def source_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        return self.source.source_prompts(n, rng)

    def target_prompts(self, concept: str, n: int, rng: np.random.Generator) -> list[str]:
        return self.source.target_prompts(concept, n, rng)

    def reference_images(self, concept: str, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` images ``(n, H, W, 3)`` in [0, 1] showing the concept: the source's (world renders), else the
        model's own for the concept's prompts (cached in ``ref_cache``)."""
        given = self.source.reference_images(concept, n, rng)
        if given is not None:
            return given
        path = None
        if self.ref_cache:
            if self._fingerprint is None:
                self._fingerprint = weights_fingerprint(self.root)
            ident = json.dumps({"concept": concept, "n": n, "rng": rng.bit_generator.state, "model": self._fingerprint,
                                "sigmas": self.sigmas.tolist(), "shape": self.latent_shape, "guidance": self.guidance,
                                "template": self.concept_info(concept).template, "size": self.encoder.image_size},
                               sort_keys=True, default=str)
            path = os.path.join(self.ref_cache, hashlib.sha256(ident.encode()).hexdigest()[:24] + ".safetensors")
            if os.path.isfile(path):
                return read_tensors(read_layout(path, what="reference image cache"), max_abs=1.0)["images"]
        prompts = self.target_prompts(concept, n, rng)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, n)]
        imgs = self.images(prompts, seeds)
        if path is None:
            return imgs
        # resized and cropped exactly as the encoder's preprocessing would (it is then a no-op), kept as fp16
        small = to_model_input(imgs, self.encoder.image_size, (0.0,) * 3, (1.0,) * 3).permute(0, 2, 3, 1).half()
        write_tensors(path, {"images": small}, {"concept": concept})
        return small.float()

    # -- sampling -----------------------------------------------------------------------------
    @property
    def rows_per_prompt(self) -> int:
        """Chunks each model call holds: 2 with guidance (cond and uncond), else 1."""
        return 1 if self.guidance == 1.0 else 2

    def steer_rows(self) -> Rows:
        """The row layout of the model call in progress (for maps of K concepts: repeat in every chunk)."""
        return self._call.steer()

    def cond_rows(self) -> Rows:
        """The conditional rows of the model call in progress (what the loss compares)."""
        return self._call.cond()

    def _cond(self, prompt: str) -> list:
        cond, extras = self.text(prompt)
        return [cond, {**self.defaults.extra, **extras}]

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def run(self, prompts: Sequence[str], seeds: Sequence[int], grad: bool = False, only_step: int | None = None) -> torch.Tensor:
        """Sample latents ``(B, C, h, w)`` (the model's latent space, as KSampler outputs them) for ``prompts``,
        one seed each; hooks the caller set on ``root`` are active. ``grad=True`` builds one graph per step.

        ``only_step=t`` (with ``grad``): the sampler stops after step ``t`` (it returns the latents at the next sigma)
        and only that step's model call builds a graph: a loss at one step needs nothing after it."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
        sigmas, grad_from = self.sigmas, 0
        if only_step is not None:
            if not grad or not 0 <= only_step < len(self.sigmas) - 1:
                raise ValueError(f"only_step={only_step} needs grad=True and a step in [0, {len(self.sigmas) - 1})")
            sigmas, grad_from = self.sigmas[: only_step + 2], only_step
        with torch.inference_mode(False):  # ComfyUI's executor runs nodes in inference mode: plain tensors here
            noise = sampling.seeded_noise(seeds, self.latent_shape)
            positive = sampling.batch_conditioning([self._cond(p) for p in prompts])
            negative = sampling.batch_conditioning([self._cond("")]) if self.rows_per_prompt == 2 else None
            with hook_handles() as handles, inplace_guard(self.root, self.family), self._autocast():
                handles.append(self.root.register_forward_pre_hook(self._call.pre_hook, with_kwargs=True))
                return sampling.sample(self._grad_patcher if grad else self.patcher, positive, negative, noise, sigmas,
                                       self.guidance, self.sampler, grad=grad, seed=int(seeds[0]), grad_from=grad_from)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``(B, H, W, 3)`` in [0, 1]: the VAE when there is one (VAE Decode), else ComfyUI's
        latent preview factors."""
        if self.vae is not None:
            with torch.inference_mode(False), torch.no_grad():
                return self.vae.decode(latents).float().clamp(0, 1)[..., :3].cpu()
        lf = self.model.latent_format
        f = torch.tensor(lf.latent_rgb_factors, dtype=torch.float32, device=latents.device)  # (C, 3)
        img = torch.einsum("bchw,cr->bhwr", latents.float(), f)
        if getattr(lf, "latent_rgb_factors_bias", None) is not None:
            img = img + torch.tensor(lf.latent_rgb_factors_bias, device=latents.device)
        return ((img + 1) / 2).clamp(0, 1).cpu()

    def images(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """``(B, H, W, 3)`` in [0, 1]: :meth:`run` then :meth:`decode`, without gradients."""
        with torch.no_grad():
            return self.decode(self.run(prompts, seeds))
