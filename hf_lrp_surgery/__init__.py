"""hf_lrp_surgery: attribution-guided model surgery for Hugging Face language models."""

__version__ = "0.1.0"
