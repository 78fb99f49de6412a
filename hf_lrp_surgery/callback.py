"""``from hf_lrp_surgery.callback import LRPSurgeryCallback``: see :mod:`hf_lrp_surgery.training`."""

from hf_lrp_surgery.training import LRPSurgeryCallback, MaskEnforcer, TrainingSetupError, TrainingStateError

__all__ = ["LRPSurgeryCallback", "MaskEnforcer", "TrainingSetupError", "TrainingStateError"]
