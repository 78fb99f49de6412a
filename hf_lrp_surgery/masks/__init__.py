"""Pruning masks: selection from scores, the mask value object with its manifest, and its geometry.

* :mod:`~hf_lrp_surgery.masks.mask`: :class:`Mask` (counts, union, complement, scales, files).
* :mod:`~hf_lrp_surgery.masks.selection`: :func:`select`, the lowest-scoring components in a budget.
* :mod:`~hf_lrp_surgery.masks.geometry`: :func:`zeroed_entries`, the weight entries a mask zeroes (or scales).
* :mod:`~hf_lrp_surgery.masks.soft`: :func:`dampening_scales`, scales for soft masks.
"""

from hf_lrp_surgery.lrp.layout import Granularity
from hf_lrp_surgery.masks.geometry import ZeroedEntry, input_scales, input_units, zeroed_entries
from hf_lrp_surgery.masks.mask import Mask
from hf_lrp_surgery.masks.selection import Scope, select
from hf_lrp_surgery.masks.soft import dampening_scales, hard_part, mask_from_scales

__all__ = [
    "Granularity",
    "Mask",
    "Scope",
    "ZeroedEntry",
    "dampening_scales",
    "hard_part",
    "input_scales",
    "input_units",
    "mask_from_scales",
    "select",
    "zeroed_entries",
]
