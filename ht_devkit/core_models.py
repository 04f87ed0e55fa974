"""Pure-torch helpers (no ComfyUI): tiny module trees borrowing ComfyUI's *names* (``input_blocks``,
``label_emb``, ``double_blocks``) so the site tables can be exercised in milliseconds, and the reference site
list of the full-size SDXL UNet."""

from __future__ import annotations

import torch
from torch import nn

from hypertransport_core import Site


def sdxl_reference_sites() -> list[Site]:
    """The 256 norm sites of ComfyUI's full-size SDXL UNet (46 GroupNorm, 210 LayerNorm), 294,080 channels.

    Derived from the SDXL config (model_channels 320, channel_mult (1, 2, 4), 2 res blocks per level,
    transformer depth 0/2/10, middle 10): each ResBlock has GroupNorms ``in_layers.0`` (input width) and
    ``out_layers.0`` (output width); each SpatialTransformer a GroupNorm ``norm`` and three LayerNorms per
    transformer block; ``out.0`` is the final GroupNorm. Output blocks concatenate the skip connection.
    """
    sites: list[Site] = []

    def gn(name: str, c: int) -> None:
        sites.append(Site(name, name, c, 1, "pooled"))

    def res(prefix: str, cin: int, cout: int) -> None:
        gn(f"{prefix}.in_layers.0", cin)
        gn(f"{prefix}.out_layers.0", cout)

    def transformer(prefix: str, c: int, depth: int) -> None:
        gn(f"{prefix}.norm", c)
        for i in range(depth):
            for k in (1, 2, 3):
                name = f"{prefix}.transformer_blocks.{i}.norm{k}"
                sites.append(Site(name, name, c, -1, "pooled"))

    mult, depth = (320, 640, 1280), (0, 2, 10)
    skips = [320]  # input_blocks.0 (conv_in)
    ch, idx = 320, 1
    for level, (cout, d) in enumerate(zip(mult, depth)):
        for _ in range(2):
            res(f"input_blocks.{idx}.0", ch, cout)
            ch = cout
            if d:
                transformer(f"input_blocks.{idx}.1", ch, d)
            skips.append(ch)
            idx += 1
        if level < 2:  # downsample block
            skips.append(ch)
            idx += 1
    res("middle_block.0", ch, ch)
    transformer("middle_block.1", ch, 10)
    res("middle_block.2", ch, ch)
    idx = 0
    for cout, d in reversed(list(zip(mult, depth))):
        for _ in range(3):
            cin = ch + skips.pop()
            res(f"output_blocks.{idx}.0", cin, cout)
            ch = cout
            if d:
                transformer(f"output_blocks.{idx}.1", ch, d)
            idx += 1
    gn("out.0", 320)
    return sites


class TinyNet(nn.Module):
    """conv → GroupNorm → SiLU → (tokens) → LayerNorm → attention → LayerNorm → back to (B, C, H, W)."""

    def __init__(self, c: int = 8, groups: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.gn = nn.GroupNorm(groups, c)
        self.act = nn.SiLU()
        self.ln1 = nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gn(self.conv(x)))
        B, C, H, W = h.shape
        t = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.ln1(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        t = t + self.proj(self.ln2(t))
        return t.transpose(1, 2).reshape(B, C, H, W)
