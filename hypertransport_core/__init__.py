"""HyperTransport core: concept-conditioned activation steering for diffusion models.

Standalone (torch, open_clip, POT, safetensors, einops); never imports ComfyUI.
"""

from .concepts import Concept, combine_concepts
from .encoders import ConceptEncoder, weights_fingerprint
from .engine import Rows, SteeringPlan, apply_map
from .errors import HyperTransportError
from .files import load_hypernet, load_steering, read_header, save_hypernet, save_steering
from .hooks import capture_pooled, fold_steering, folded, steer
from .hypernet import HyperNet, HyperNetConfig
from .interventions import Steering, combine_steerings, effective_affine
from .lineas import LinEASConfig, fit_lineas, steered_loss
from .ot import sliced_w2, transport_loss, w2_per_channel, w2_quantile
from .sites import (
    SITE_TABLES,
    Sampling,
    Site,
    SiteRule,
    SiteTable,
    check_sites,
    detect_family,
    list_sites,
    register_table,
)

__version__ = "0.1.0"

__all__ = [
    "Concept",
    "ConceptEncoder",
    "HyperNet",
    "HyperNetConfig",
    "HyperTransportError",
    "LinEASConfig",
    "Rows",
    "SITE_TABLES",
    "Site",
    "SiteRule",
    "Sampling",
    "SiteTable",
    "Steering",
    "SteeringPlan",
    "apply_map",
    "capture_pooled",
    "check_sites",
    "combine_concepts",
    "combine_steerings",
    "detect_family",
    "effective_affine",
    "fit_lineas",
    "fold_steering",
    "folded",
    "list_sites",
    "load_hypernet",
    "load_steering",
    "read_header",
    "register_table",
    "save_hypernet",
    "save_steering",
    "sliced_w2",
    "steer",
    "steered_loss",
    "transport_loss",
    "w2_per_channel",
    "w2_quantile",
    "weights_fingerprint",
]
