"""hf_lrp_surgery: attribution-guided model surgery for Hugging Face language models."""

__version__ = "0.1.0"

from hf_lrp_surgery.apply import CorrectedModel, apply_masks, load_corrected, verify  # noqa: E402
from hf_lrp_surgery.masks import Mask, select  # noqa: E402
from hf_lrp_surgery.scoring import Scores, contrast, score  # noqa: E402
from hf_lrp_surgery.surgeon import Surgeon  # noqa: E402

__all__ = ["CorrectedModel", "Mask", "Scores", "Surgeon", "__version__", "apply_masks", "contrast",
           "load_corrected", "score", "select", "verify"]
