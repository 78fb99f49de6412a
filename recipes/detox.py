"""Recipe: detoxify a model with attribution-guided pruning, measured on held-out prompts.

Samples continuations of the shipped provocative prompts (train split), keeps the toxic and the
non-toxic continuations of the same prompts, prunes the MLP neurons whose contrastive relevance
marks them as toxic-only, picks the budget on validation prompts under a general-behaviour limit
(KL <= 0.02, perplexity +<= 3% by default), saves the corrected model (IA3 adapter and baked) and
reports toxicity before/after on the held-out prompts.

    python recipes/detox.py                                    # embedded SmolLM2-135M-Instruct
    python recipes/detox.py --model gemma3-270m --output runs/detox-gemma
    python recipes/detox.py --method wanda --output runs/detox-wanda   # a baseline, same protocol
"""

from __future__ import annotations

import sys

from hf_lrp_surgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["detox", *sys.argv[1:]]))
