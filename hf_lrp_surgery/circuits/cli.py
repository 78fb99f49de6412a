"""Deprecated: the ``circuit`` command moved to :mod:`hf_lrp_surgery.cli.circuits` (kept for one release)."""

from hf_lrp_surgery._deprecation import moved_names

__getattr__ = moved_names(
    __name__, {name: f"hf_lrp_surgery.cli.circuits:{name}" for name in ("register", "run_circuit")}
)
