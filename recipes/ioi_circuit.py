"""Recipe: the smallest IOI circuit that LRP and the baselines find, with curves and a specificity check.

Generates independent IOI sets from the shipped templates and names (reference prompts to attribute
on, evaluation prompts to measure on), scores MLP neurons, attention heads or MLP weights with LRP,
gradient x activation, activation, Wanda and random scores, prunes each method's lowest-scoring
components on a coarse log-spaced sparsity grid and bisects the threshold crossing, keeps the
largest pruning that keeps 90% of the logit difference, and prints per method (mean ± std over the
sets) the circuit size, the metric the circuit alone keeps, and how much ablating only the circuit
costs against ablating as many random components. Pruned components are zeroed, replaced by their
mean over the reference prompts, or patched from the ABC-corrupted prompts (--ablation). Writes
report.json (with the seconds per stage), report.txt, curves.png, circuit_sizes.png,
composition.png and circuits/ to --output. Runs offline on the embedded models.

    python recipes/ioi_circuit.py                                   # SmolLM2-135M-Instruct, 3 sets of 64
    python recipes/ioi_circuit.py --model gemma3-270m --output runs/ioi-gemma
    python recipes/ioi_circuit.py --granularity heads --ablation mean
    python recipes/ioi_circuit.py --granularity weights --ablation corrupted   # MLP weights; Wanda row-wise
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
