"""hf_lrp_surgery: attribution-guided model surgery for Hugging Face language models."""

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.carriers import CorrectedModel, apply_masks, load_corrected, verify
from hf_lrp_surgery.hub import load_from_hub, push_to_hub
from hf_lrp_surgery.masks import Mask, select
from hf_lrp_surgery.models import load_model
from hf_lrp_surgery.scoring import Scores, contrast, score
from hf_lrp_surgery.surgeon import Surgeon

__all__ = [
    "CorrectedModel",
    "LRPSurgeryCallback",
    "Mask",
    "Scores",
    "Surgeon",
    "__version__",
    "apply_masks",
    "contrast",
    "load_corrected",
    "load_from_hub",
    "load_model",
    "push_to_hub",
    "score",
    "select",
    "verify",
]


def __getattr__(name: str) -> object:
    """``LRPSurgeryCallback`` is imported on first use (it pulls in the Trainer machinery)."""
    if name == "LRPSurgeryCallback":
        from hf_lrp_surgery.training import LRPSurgeryCallback

        return LRPSurgeryCallback
    raise AttributeError(f"module 'hf_lrp_surgery' has no attribute {name!r}")
