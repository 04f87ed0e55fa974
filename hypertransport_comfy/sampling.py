"""Sample a batch of prompts with ComfyUI's own sampler, what the KSampler node runs, with or without gradients.

* :class:`PromptEncoder`: a prompt → what ``CLIPTextEncode`` outputs (``[cond, extras]``), cached;
* :func:`batch_conditioning`: per-prompt conditionings → one CONDITIONING whose batch rows are the prompts
  (token counts reconciled by ComfyUI's own rule, ``CONDCrossAttn.concat``);
* :func:`seeded_noise`: each row's noise exactly as KSampler makes it for a one-image latent and that seed;
* :func:`sample`: ``comfy.sample.sample_custom`` (ComfyUI's guider: conditioning, CFG, the model patcher's
  wrappers, ``model_sampling``) with ComfyUI's k-diffusion sampler; ``grad=True`` runs the same sampler
  function without its ``torch.no_grad`` decorator, each model call seeing a detached input, so that
  steering hooks inside the model build one graph per step (nothing flows through the trajectory).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hypertransport_core.errors import HyperTransportError
from hypertransport_core.lru import LRU


class PromptEncoder:
    """Prompt → ``[cond (1, T, C), extras]`` exactly as ComfyUI's ``CLIPTextEncode`` node returns it, cached
    (neutral prompts repeat across steps and concepts)."""

    def __init__(self, clip, cache_size: int = 4096):
        self.clip, self.cache = clip, LRU(cache_size)

    def __call__(self, prompt: str) -> list:
        hit = self.cache.get(prompt)
        if hit is not None:
            return hit
        with torch.inference_mode(False), torch.no_grad():
            out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        return self.cache.put(prompt, [cond.cpu(), {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in out.items()}])


def batch_conditioning(items: Sequence[list]) -> list:
    """``[[cond, extras], ...]`` (one per prompt, batch 1 each) → a CONDITIONING of one entry with batch
    ``len(items)``: row i is prompt i. Tensors in the extras (pooled outputs) are stacked the same way;
    other extras must agree across prompts."""
    import comfy.conds

    if not items:
        raise HyperTransportError("no prompts to sample. Fix: pass at least one prompt.")
    conds = [comfy.conds.CONDCrossAttn(c) for c, _ in items]
    first = conds[0]
    if not all(first.can_concat(o) for o in conds[1:]):
        raise HyperTransportError("prompts with conditioning of different widths cannot share a batch. "
                                  "Fix: encode every prompt with the same text encoder.")
    cond = first.concat(conds[1:]) if len(conds) > 1 else first.cond
    extras: dict = {}
    for k, v in items[0][1].items():
        vals = [e.get(k) for _, e in items]
        if torch.is_tensor(v):
            extras[k] = torch.cat(vals)
        elif all(x == v for x in vals):
            extras[k] = v
        else:
            raise HyperTransportError(f"prompts disagree on conditioning option {k!r} ({vals[:3]}). Fix: sample them separately.")
    return [[cond, extras]]


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``(B, *shape)``: row i is ``comfy.sample.prepare_noise`` of a one-image latent with seed ``seeds[i]``,
    i.e. the noise a KSampler with that seed and batch size 1 starts from."""
    import comfy.sample

    one = torch.zeros((1, *shape))
    return torch.cat([comfy.sample.prepare_noise(one, int(s)) for s in seeds])


def sigmas_for(patcher, scheduler: str, steps: int, timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """The sampler's sigmas, ending with 0: ``timesteps`` (a distillation's fixed ones) when given, else
    ComfyUI's ``scheduler`` over ``steps`` (what KSampler computes for denoise 1)."""
    import comfy.samplers

    ms = patcher.get_model_object("model_sampling")
    if timesteps:
        if len(timesteps) != steps:
            raise HyperTransportError(f"{len(timesteps)} timesteps given for {steps} steps. Fix: give one timestep per step.")
        sig = torch.stack([ms.sigma(torch.tensor(float(t))).float().reshape(()) for t in timesteps])
        return torch.cat([sig, torch.zeros(1)]).cpu()
    return comfy.samplers.calculate_sigmas(ms, scheduler, steps).float().cpu()


class _DetachedStep:
    """Wraps the sampler's model: every call gets a detached input and gives a detached output, with
    gradients on inside, so hooks in the model keep the graph of that one call. Calls before ``grad_from``
    (the sampler steps whose loss is not wanted) run without gradients."""

    def __init__(self, model, grad_from: int = 0):
        self._model, self._grad_from, self._calls = model, grad_from, 0

    def __getattr__(self, name):  # samplers read model.inner_model...model_sampling
        return getattr(self._model, name)

    def __call__(self, x, sigma, **kwargs):
        grad = self._calls >= self._grad_from
        self._calls += 1
        with torch.set_grad_enabled(grad):
            out = self._model(x.detach(), sigma, **kwargs)
        return out.detach()


ONE_CALL_SAMPLERS = ("euler", "lcm")  # one model call per step: call i is step i


def sampler_object(name: str, grad: bool = False, grad_from: int = 0):
    """ComfyUI's ``KSAMPLER`` for ``name``; ``grad=True``: the same k-diffusion function run with gradients
    (its ``__wrapped__``, i.e. without the ``@torch.no_grad()`` decorator) on :class:`_DetachedStep`, the model
    calls before ``grad_from`` without them."""
    import comfy.k_diffusion.sampling as kd
    import comfy.samplers

    if not grad:
        return comfy.samplers.ksampler(name)
    fn = getattr(kd, f"sample_{name}", None)
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        raise HyperTransportError(f"ComfyUI's sampler {name!r} cannot run with gradients here (no undecorated "
                                  "k-diffusion function). Fix: train with 'euler' or 'lcm'.")

    if grad_from and name not in ONE_CALL_SAMPLERS:
        raise HyperTransportError(f"ComfyUI's sampler {name!r} calls the model more than once a step, so a loss at one step "
                                  f"cannot be told from its calls. Fix: train with one of {ONE_CALL_SAMPLERS}, or --loss-steps all.")

    def with_grad(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw):
        return inner(_DetachedStep(model, grad_from), x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **kw)

    return comfy.samplers.KSAMPLER(with_grad)


def sample(patcher, positive: list, negative: list | None, noise: torch.Tensor, sigmas: torch.Tensor, cfg: float,
           sampler: str = "euler", *, grad: bool = False, seed: int = 0, grad_from: int = 0) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` (the model's latent space, as KSampler outputs them), from ``noise`` over
    ``sigmas``. Runs outside inference mode (ComfyUI's executor runs nodes inside it). ``grad_from``: with
    ``grad``, the model calls before it run without gradients."""
    import comfy.sample

    latent = torch.zeros_like(noise)
    with torch.inference_mode(False):
        return comfy.sample.sample_custom(patcher, noise, cfg, sampler_object(sampler, grad, grad_from), sigmas, positive,
                                          negative if negative is not None else positive, latent,
                                          disable_pbar=True, seed=int(seed))


def generate(patcher, vae, encode: PromptEncoder, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, cfg: float,
             sampler: str, scheduler: str, latent_shape: tuple[int, ...], batch: int = 64) -> torch.Tensor:
    """Images ``(B, H, W, 3)`` in [0, 1], as CLIPTextEncode → KSampler (one image per seed, empty negative
    prompt) → VAE Decode make them, in batches of ``batch`` prompts."""
    sigmas = sigmas_for(patcher, scheduler, steps)
    negative = batch_conditioning([encode("")])
    out = []
    for lo in range(0, len(prompts), batch):
        ps, ss = list(prompts[lo : lo + batch]), list(seeds[lo : lo + batch])
        latents = sample(patcher, batch_conditioning([encode(p) for p in ps]), negative, seeded_noise(ss, latent_shape),
                         sigmas, cfg, sampler, seed=ss[0])
        with torch.inference_mode(False), torch.no_grad():
            out.append(vae.decode(latents).float().cpu()[..., :3])
    return torch.cat(out)
