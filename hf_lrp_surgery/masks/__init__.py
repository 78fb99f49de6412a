"""Pruning masks: selection from scores, the mask value object with its manifest, and its geometry.

* :mod:`~hf_lrp_surgery.masks.mask`: :class:`Mask` (counts, union, complement, files).
* :mod:`~hf_lrp_surgery.masks.selection`: :func:`select`, the lowest-scoring components in a budget.
* :mod:`~hf_lrp_surgery.masks.geometry`: :func:`zeroed_entries`, the weight entries a mask zeroes.
"""

from hf_lrp_surgery.lrp.layout import Granularity
from hf_lrp_surgery.masks.geometry import ZeroedEntry, input_units, zeroed_entries
from hf_lrp_surgery.masks.mask import Mask
from hf_lrp_surgery.masks.selection import Scope, select

__all__ = ["Granularity", "Mask", "Scope", "ZeroedEntry", "input_units", "select", "zeroed_entries"]
