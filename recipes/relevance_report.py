"""Recipe: a relevance report for any supported model (the README's main job, from Python).

Continues a few prompts greedily, explains ``prompt + continuation`` with AttnLRP and prints the most
relevant input tokens, MLP neurons and attention heads; saves JSON, text, a per-layer plot and the
relevance tensors.

    python recipes/relevance_report.py                          # embedded SmolLM2-135M-Instruct
    python recipes/relevance_report.py --model gemma3-270m --output runs/gemma-report
    python recipes/relevance_report.py --model path/to/checkpoint --prompts my_prompts.txt
"""

from __future__ import annotations

import sys

from hf_lrp_surgery.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
