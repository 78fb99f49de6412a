"""Where the package's ``evaluate`` modules live (loaded offline with ``evaluate.load(path)``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["EVALUATE_MODULES", "evaluate_module_path"]

#: The ``evaluate`` modules shipped in ``hf_lrp_surgery/evaluate_modules``.
EVALUATE_MODULES = ("response_uniqueness", "distinct_n", "toxicity")

_ROOT = Path(__file__).resolve().parent.parent / "evaluate_modules"


def evaluate_module_path(name: str) -> str:
    """The directory of a shipped ``evaluate`` module, for ``evaluate.load``.

    ``evaluate.load`` given a local directory loads the script of the same name inside it, with no
    network access (a bare name such as ``"toxicity"`` would be looked up on the Hub instead).

    Args:
        name: One of :data:`EVALUATE_MODULES`.

    Returns:
        The module's directory, as an absolute path.

    Raises:
        ValueError: ``name`` is not a shipped module.

    Example:
        >>> import evaluate
        >>> rur = evaluate.load(evaluate_module_path("response_uniqueness"))  # doctest: +SKIP
        >>> rur.compute(predictions=[[1, 1, 2, 3]])  # doctest: +SKIP
        {'rur': 0.75, 'rur_per_prediction': [0.75]}
    """
    if name not in EVALUATE_MODULES:
        raise ValueError(f"no evaluate module named {name!r}; shipped modules: {list(EVALUATE_MODULES)}")
    return str(_ROOT / name)
