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


NODE_CLASS_MAPPINGS = {"HTTestConditioning": HTTestConditioning}
