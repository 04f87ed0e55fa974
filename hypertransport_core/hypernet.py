"""The hypernetwork: concept embedding → per-channel affine maps for every site (METHOD §5).

Architecture (our choice; the paper fixes only input and output):

.. math::

    x = \\mathrm{normalize}(e - \\mu_{modality}),\\quad h = \\mathrm{MLP}(x) \\in R^{H},\\quad
    k_s = P_s^\\top h \\in R^{2r}\\ (\\text{one code per site}),

    w_{s,c} = 1 + \\beta^w_{s,c} + \\langle U^w_{s,c}, k_s^{w} \\rangle,\\quad
    b_{s,c} = \\beta^b_{s,c} + \\langle U^b_{s,c}, k_s^{b} \\rangle

- a shared trunk (``depth`` layers of width ``hidden``) reads the concept;
- each site gets a rank-``r`` code from its own projection ``P_s`` (``S × H × 2r``);
- each channel has a learned ``r``-vector ``U`` per output (``w`` and ``b``) and a concept-free
  offset ``β`` (what every concept shares, e.g. "more saturated").

Parameters: ``2·C·(r+1) + S·H·2r + trunk``; for SDXL's 256 norm sites (294,080 channels) with
``H=512, r=16`` that is about 15M. ``U`` and ``β`` start at zero, so a new hypernet is exactly the
identity map. ``μ_text`` and ``μ_image`` (buffers, zero unless the trainer fills them) remove each
modality's mean embedding, a correction for CLIP's modality gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .concepts import Concept
from .encoders import concept_texts
from .errors import HyperTransportError
from .interventions import Steering
from .sites import Site


@dataclass
class HyperNetConfig:
    """Size of a hypernet. Every field is stored in the file."""

    embed_dim: int  # d, the concept encoder's embedding width
    hidden: int = 512  # trunk width H
    depth: int = 2  # trunk layers (>= 1)
    rank: int = 16  # rank r of each site's head
    dropout: float = 0.0  # dropout in the trunk while training
    text_width: int = 0  # width of the concept encoder's text tower when the file keeps its text projection (0: none)
    text_templates: tuple[str, ...] = ()  # a text concept is the mean embedding of these phrases ("{}" = the concept); () = the bare text

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.text_templates:  # files without templates stay as they were
            del d["text_templates"]
        else:
            d["text_templates"] = list(self.text_templates)
        return d

    @staticmethod
    def from_dict(d: dict) -> HyperNetConfig:
        """The config recorded in a file, every field checked against :data:`CONFIG_LIMITS`."""
        if not isinstance(d, dict):
            raise HyperTransportError(f"hypernet config must be a JSON object, found {type(d).__name__}. Fix: re-save the hypernet.")
        if "embed_dim" not in d:
            raise HyperTransportError("hypernet config lacks 'embed_dim'. Fix: re-save the hypernet with its config.")
        known = {k: d[k] for k in ("embed_dim", "hidden", "depth", "rank", "dropout", "text_width") if k in d}
        templates = check_templates(d.get("text_templates", []), "hypernet config 'text_templates'")
        for k, v in known.items():
            lo, hi = CONFIG_LIMITS[k]
            ok = (type(v) is int) if k != "dropout" else (isinstance(v, (int, float)) and not isinstance(v, bool))
            if not ok or not lo <= v <= hi:
                raise HyperTransportError(
                    f"hypernet config {k!r} is {v!r}; a valid file has {'an integer' if k != 'dropout' else 'a number'} "
                    f"from {lo} to {hi}. Fix: the file is corrupt or from an incompatible tool; re-save the hypernet."
                )
        return HyperNetConfig(**known, text_templates=templates)

    def num_parameters(self, sites: Sequence[Site]) -> int:
        """Parameters of a hypernet of this config for ``sites``, computed without building it."""
        d, H, r, S = self.embed_dim, self.hidden, self.rank, len(sites)
        C = sum(s.channels for s in sites)
        trunk = (d * H + H) + (self.depth - 1) * (H * H + H) + 2 * H
        return trunk + S * H * 2 * r + 2 * C * r + 2 * C + self.text_width * d


MAX_TEMPLATES, MAX_TEMPLATE_CHARS = 64, 200
MAX_TEMPLATED_PHRASES = 2048  # phrases encoded for one call (concepts × templates), in chunks of 256


def check_templates(templates: object, where: str) -> tuple[str, ...]:
    """Text templates as recorded or given: a list of at most :data:`MAX_TEMPLATES` phrases, each holding ``{}``
    once and no other brace, at most :data:`MAX_TEMPLATE_CHARS` characters."""
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or len(templates) > MAX_TEMPLATES:
        raise HyperTransportError(f"{where}: expected a list of at most {MAX_TEMPLATES} phrases, found {str(templates)[:80]!r}. "
                                  "Fix: give phrases like 'a photo of {}' (or none), or re-save the hypernet.")
    for t in templates:
        if (not isinstance(t, str) or len(t) > MAX_TEMPLATE_CHARS or t.count("{}") != 1
                or t.count("{") != 1 or t.count("}") != 1):
            raise HyperTransportError(f"{where}: {str(t)[:80]!r} is not a template. Fix: each phrase holds '{{}}' once "
                                      f"(where the concept goes), no other brace, at most {MAX_TEMPLATE_CHARS} characters.")
    return tuple(templates)


def templated_text_embeddings(encode_text, texts: Sequence[str], templates: Sequence[str] = ()) -> torch.Tensor:
    """``(n, d)``: each phrase's unit-norm embedding averaged over ``templates`` and re-normalized (prompt
    ensembling, as in CLIP's zero-shot classifiers); the bare phrases when ``templates`` is empty."""
    texts = concept_texts(texts)
    if not templates:
        return encode_text(texts)
    if len(texts) * len(templates) > MAX_TEMPLATED_PHRASES:
        raise HyperTransportError(f"{len(texts)} concepts × {len(templates)} templates = {len(texts) * len(templates)} phrases "
                                  f"to encode, more than {MAX_TEMPLATED_PHRASES}. Fix: encode fewer concepts at once.")
    phrases = [tpl.replace("{}", t) for t in texts for tpl in templates]
    e = torch.cat([encode_text(phrases[i : i + 256]) for i in range(0, len(phrases), 256)])
    return F.normalize(e.reshape(len(texts), len(templates), -1).mean(1), dim=-1)


#: Bounds on a recorded config (inclusive), and on the parameters it implies (checked before building).
CONFIG_LIMITS = {"embed_dim": (1, 8192), "hidden": (1, 8192), "depth": (1, 16), "rank": (1, 512), "dropout": (0.0, 0.99),
                 "text_width": (0, 8192)}
MAX_PARAMETERS = 400_000_000  # 1.6 GB of float32; the default SDXL hypernet has 14.9 M


class HyperNet(nn.Module):
    """Maps ``(B, d)`` concept embeddings to packed maps ``w, b`` of shape ``(B, C_total)``.

    Args:
        config: sizes.
        sites: the sites it steers (order = packing order).
        family: model family id the sites belong to (``"sdxl"``, ...).
        encoder: identity of the concept encoder it was trained with.

    Example::

        >>> hn = HyperNet(HyperNetConfig(embed_dim=512), sites, family="sdxl", encoder=enc.identity)
        >>> steering = hn.steering(concept)          # one forward pass
    """

    def __init__(self, config: HyperNetConfig, sites: Sequence[Site], family: str = "generic", encoder: dict | None = None):
        super().__init__()
        if config.depth < 1 or config.rank < 1 or config.hidden < 1:
            raise HyperTransportError(f"hypernet config {config} needs depth, rank and hidden >= 1.")
        if not sites:
            raise HyperTransportError("a hypernet needs at least one site. Fix: pass list_sites(model).")
        self.config = config
        self.sites = tuple(sites)
        self.family = family
        self.encoder = dict(encoder or {})
        d, H, r = config.embed_dim, config.hidden, config.rank
        total = sum(s.channels for s in sites)
        layers: list[nn.Module] = []
        for i in range(config.depth):
            layers += [nn.Linear(d if i == 0 else H, H), nn.GELU()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
        self.trunk = nn.Sequential(*layers, nn.LayerNorm(H))
        self.site_proj = nn.Parameter(torch.randn(len(sites), H, 2 * r) / H**0.5)
        self.channel_w = nn.Parameter(torch.zeros(total, r))
        self.channel_b = nn.Parameter(torch.zeros(total, r))
        self.offset_w = nn.Parameter(torch.zeros(total))
        self.offset_b = nn.Parameter(torch.zeros(total))
        # Runs of consecutive sites with one width: their heads are (n, W, r) views of the packed
        # parameters, so forward is one batched matmul per run instead of a (B, C, 2r) gather.
        runs: list[tuple[int, int]] = []  # (sites in run, width)
        for s in sites:
            if runs and runs[-1][1] == s.channels:
                runs[-1] = (runs[-1][0] + 1, s.channels)
            else:
                runs.append((1, s.channels))
        self._runs = runs
        self.register_buffer("mean_text", torch.zeros(d))
        self.register_buffer("mean_image", torch.zeros(d))
        if config.text_width:
            # the concept encoder's text projection, kept so that a text tower without one (an SD1.5 checkpoint's
            # clip_l) can still encode concepts: pooled features @ text_projection (open_clip's orientation)
            self.register_buffer("text_projection", torch.zeros(config.text_width, d))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def total_channels(self) -> int:
        return int(self.offset_w.numel())

    def prepare(self, e: torch.Tensor, modality: str | Sequence[str] = "text") -> torch.Tensor:
        """Center by the modality's mean and re-normalize: ``(B, d)``."""
        if e.ndim == 1:
            e = e[None]
        if e.shape[-1] != self.embed_dim:
            raise HyperTransportError(
                f"concept embedding has {e.shape[-1]} dims, the hypernet expects {self.embed_dim}. "
                "Fix: encode the concept with the encoder this hypernet records."
            )
        e = e.to(self.offset_w.device, torch.float32)
        mods = [modality] * e.shape[0] if isinstance(modality, str) else list(modality)
        if len(mods) != e.shape[0] or any(m not in ("text", "image", "mixed") for m in mods):
            raise HyperTransportError(
                f"modality {modality!r} for {e.shape[0]} embeddings: expected 'text', 'image' or 'mixed' (one, or one "
                "per row). Fix: pass the Concept's modality."
            )
        means = {"text": self.mean_text, "image": self.mean_image, "mixed": (self.mean_text + self.mean_image) / 2}
        mu = torch.stack([means[m] for m in mods])
        return F.normalize(e - mu, dim=-1)

    def forward(self, e: torch.Tensor, modality: str | Sequence[str] = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``e`` ``(B, d)`` or ``(d,)`` embeddings; ``modality`` per row or for all.

        Returns: ``(w, b)``, each ``(B, C_total)``.
        """
        h = self.trunk(self.prepare(e, modality))  # (B, H)
        B, r = h.shape[0], self.config.rank
        codes = torch.matmul(h, self.site_proj)  # (S, B, 2r): k_s = P_s^T h, no copy of P
        # Same math as gathering each channel's site code: dw_{b,c} = <U^w_c, k^w_{b,site(c)}>, done
        # per run of equal-width sites as (n, B, r) @ (n, r, W). split (not slicing) keeps the
        # backward to one concatenation per parameter.
        n_sites = [n for n, _ in self._runs]
        widths = [n * W for n, W in self._runs]
        dws, dbs = [], []
        for (n, W), k, uw, ub in zip(
            self._runs,
            torch.split(codes, n_sites, dim=0),
            torch.split(self.channel_w, widths, dim=0),
            torch.split(self.channel_b, widths, dim=0),
        ):
            dws.append(torch.bmm(k[..., :r], uw.view(n, W, r).transpose(1, 2)).transpose(0, 1).reshape(B, n * W))
            dbs.append(torch.bmm(k[..., r:], ub.view(n, W, r).transpose(1, 2)).transpose(0, 1).reshape(B, n * W))
        dw = torch.cat(dws, dim=1) if len(dws) > 1 else dws[0]
        db = torch.cat(dbs, dim=1) if len(dbs) > 1 else dbs[0]
        return 1 + self.offset_w + dw, self.offset_b + db

    def forward_reference(self, e: torch.Tensor, modality: str | Sequence[str] = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` written literally (gathers a ``(B, C, 2r)`` tensor; slow, for tests)."""
        h = self.trunk(self.prepare(e, modality))
        r = self.config.rank
        codes = torch.einsum("bh,shk->bsk", h, self.site_proj)  # (B, S, 2r)
        site_index = torch.repeat_interleave(torch.arange(len(self.sites)), torch.tensor([s.channels for s in self.sites]))
        per_channel = codes[:, site_index.to(codes.device)]  # (B, C, 2r)
        dw = (per_channel[..., :r] * self.channel_w).sum(-1)
        db = (per_channel[..., r:] * self.channel_b).sum(-1)
        return 1 + self.offset_w + dw, self.offset_b + db

    def encode_text(self, encoder, texts: Sequence[str]) -> torch.Tensor:
        """``(n, d)`` unit-norm embeddings of concept phrases as this hypernet was trained on them: each the mean over
        its :attr:`HyperNetConfig.text_templates` (the bare phrase when it records none). ``encoder``: anything with
        ``encode_text`` (a :class:`~hypertransport_core.encoders.ConceptEncoder`, or the nodes' ComfyUI CLIP)."""
        return templated_text_embeddings(encoder.encode_text, texts, self.config.text_templates)

    def text_concept(self, encoder, text: str) -> Concept:
        """One phrase as a text :class:`Concept`, encoded as :meth:`encode_text` does."""
        return Concept(self.encode_text(encoder, [text])[0].cpu(), "text", encoder.identity, text.strip())

    def check_concept(self, concept: Concept) -> None:
        """Raise if ``concept`` came from another encoder than the one this hypernet was trained with."""
        mine, theirs = self.encoder, concept.encoder
        if mine and (mine.get("arch") != theirs.get("arch") or mine.get("fingerprint") != theirs.get("fingerprint")):
            raise HyperTransportError(
                f"the concept was encoded with {theirs.get('arch')} (fingerprint {str(theirs.get('fingerprint'))[:12]}), "
                f"the hypernet was trained with {mine.get('arch')} (fingerprint {str(mine.get('fingerprint'))[:12]}). "
                "Fix: encode the concept with the encoder the hypernet names (Load HyperNet shows it)."
            )

    @torch.no_grad()
    def steering(self, concept: Concept | torch.Tensor, modality: str | None = None, label: str | None = None) -> Steering:
        """The intervention for one concept (one forward pass)."""
        if isinstance(concept, Concept):
            self.check_concept(concept)
            e, modality, label = concept.embedding, modality or concept.modality, label or concept.label
        else:
            e = concept
        was_training = self.training
        self.eval()  # one concept → one answer: no dropout, even on a hypernet that is being trained
        try:
            w, b = self(e.reshape(1, -1), modality or "text")
        finally:
            self.train(was_training)
        meta = {"label": label or "", "family": self.family, "modality": modality or "text", "encoder": self.encoder}
        return Steering(self.sites, w[0].float(), b[0].float(), meta)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
