"""Deprecated: the carriers moved to :mod:`hf_lrp_surgery.carriers` (kept here for one release).

``input_units`` moved to :mod:`hf_lrp_surgery.masks.geometry`, and the ``Carrier`` literal became
:data:`hf_lrp_surgery.carriers.CarrierName` (a registered carrier's name).
"""

from __future__ import annotations

from hf_lrp_surgery._deprecation import moved_names

_NEW_HOMES = {
    "CHECK_FILE": "hf_lrp_surgery.carriers:CHECK_FILE",
    "Carrier": "hf_lrp_surgery.carriers:CarrierName",
    "CorrectedModel": "hf_lrp_surgery.carriers:CorrectedModel",
    "LogitsProbe": "hf_lrp_surgery.carriers:LogitsProbe",
    "SURGERY_DIR": "hf_lrp_surgery.carriers:SURGERY_DIR",
    "apply_masks": "hf_lrp_surgery.carriers:apply_masks",
    "bake": "hf_lrp_surgery.carriers:bake",
    "input_units": "hf_lrp_surgery.masks.geometry:input_units",
    "load_corrected": "hf_lrp_surgery.carriers:load_corrected",
    "read_surgery": "hf_lrp_surgery.carriers:read_surgery",
    "save_corrected": "hf_lrp_surgery.carriers:save_corrected",
    "set_adapter_enabled": "hf_lrp_surgery.carriers:set_adapter_enabled",
    "to_adapter": "hf_lrp_surgery.carriers:to_adapter",
    "verify": "hf_lrp_surgery.carriers:verify",
}
__all__ = sorted(_NEW_HOMES)
__getattr__ = moved_names(__name__, _NEW_HOMES)
