"""Test-only nodes for the HyperTransport end-to-end tests (ht_devkit; symlinked into a test server's custom_nodes)."""
import torch


class HTTestConditioning:
    """Random CONDITIONING of a given width: stands in for text encoders too large to fake (CLIP-G, T5-XXL)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""}), "seed": ("INT", {"default": 0}),
                             "dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, text, seed, dim, tokens):
        g = torch.Generator().manual_seed(seed + len(text))
        return ([[torch.randn((1, tokens, dim), generator=g), {}]],)


class _RandomCLIP:
    """What Fit Steering uses of a ``comfy.sd.CLIP`` (``tokenize``, ``encode_from_tokens``, a ``cond_stage_model`` to
    fingerprint): random conditioning of a given width, seeded by the text, as :class:`HTTestConditioning` gives."""

    def __init__(self, dim: int, tokens: int):
        self.dim, self.tokens = dim, tokens
        self.cond_stage_model = torch.nn.Linear(1, dim)

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, text, return_pooled=False, return_dict=False):
        g = torch.Generator().manual_seed(7 + len(text))
        cond = torch.randn((1, self.tokens, self.dim), generator=g)
        return {"cond": cond} if return_dict else ((cond, None) if return_pooled else cond)


class HTTestCLIP:
    """A CLIP output of random conditioning: stands in for the text encoders a Fit Steering template's model has."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dim": ("INT", {"default": 768, "min": 1, "max": 8192}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, dim, tokens):
        return (_RandomCLIP(dim, tokens),)


NODE_CLASS_MAPPINGS = {"HTTestConditioning": HTTestConditioning, "HTTestCLIP": HTTestCLIP}
