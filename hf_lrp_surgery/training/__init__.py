"""Training integration: the ``transformers`` callback, mask enforcement and accumulated relevance."""

from hf_lrp_surgery.exceptions import TrainingSetupError, TrainingStateError
from hf_lrp_surgery.training.accumulate import RelevanceAccumulator
from hf_lrp_surgery.training.callback import CORRECTED_DIR, STATE_DIR, LRPSurgeryCallback
from hf_lrp_surgery.training.enforce import MaskEnforcer, merge_masks

__all__ = [
    "CORRECTED_DIR",
    "LRPSurgeryCallback",
    "MaskEnforcer",
    "RelevanceAccumulator",
    "STATE_DIR",
    "TrainingSetupError",
    "TrainingStateError",
    "merge_masks",
]
