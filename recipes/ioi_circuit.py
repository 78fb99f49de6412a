"""Recipe: the smallest IOI circuit that LRP and the baselines find, with curves and a specificity check.

Generates independent IOI sets from the shipped templates and names (reference prompts to attribute
on, evaluation prompts to measure on), scores MLP neurons (or heads) with LRP, gradient x activation,
activation, Wanda and random scores, prunes each method's lowest-scoring components on a log-spaced
sparsity grid, keeps the largest pruning that keeps 90% of the logit difference, and prints the
circuit size per method (mean ± std over the sets). Writes report.json, report.txt, curves.png,
circuit_sizes.png, composition.png and circuits/ to --output. Runs offline on the embedded models.

    python recipes/ioi_circuit.py                                   # SmolLM2-135M-Instruct, 3 sets of 64
    python recipes/ioi_circuit.py --model gemma3-270m --output runs/ioi-gemma
    python recipes/ioi_circuit.py --granularity heads --scope per_layer
"""

from __future__ import annotations

import argparse
import sys

from hf_lrp_surgery.cli.circuits import register
from hf_lrp_surgery.exceptions import SurgeryError


def main(argv: list[str]) -> int:
    """Parse ``hf-lrp-surgery circuit`` options (defaults: IOI on the embedded SmolLM2) and run them."""
    parser = argparse.ArgumentParser(prog="ioi_circuit.py")
    circuit = register(parser.add_subparsers(dest="command"))
    circuit.set_defaults(output="runs/ioi-circuit")
    args = parser.parse_args(["circuit", *argv])
    try:
        return int(args.handler(args))
    except (SurgeryError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
