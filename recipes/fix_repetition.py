"""Recipe: stop a model from looping, with attribution-guided pruning measured on held-out prompts.

Samples responses to the shipped repetition-inducing prompts (train split), keeps looping (Response
Uniqueness Ratio < 0.5) and varied (>= 0.7) responses of the same prompts, prunes the attention
heads (the default; neurons and weights on request) that the contrast marks, picks the budget on
validation prompts under the general-behaviour limit, saves the corrected model and reports RUR
before/after on the held-out prompts.

    python recipes/fix_repetition.py                           # embedded SmolLM2-135M-Instruct
    python recipes/fix_repetition.py --granularity weights --modules mlp.up_proj --budgets 1000 3000 7000
"""

from __future__ import annotations

import sys

from hf_lrp_surgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["fix-repetition", *sys.argv[1:]]))
