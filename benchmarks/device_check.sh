#!/usr/bin/env bash
# GPU check, ready to run: the relevance identities on CUDA (fp32, bf16) and the speed benchmarks,
# in under 5 minutes, with every figure gathered into one JSON.
#
#   benchmarks/device_check.sh [--device cuda[:N]] [--out DIR] [--repeats N] [--skip-speed] [--dry-run]
#
# Steps (each under its own time limit; a failed or timed-out step is recorded and the next one runs):
#   identity       HF_LRP_TEST_DEVICE=<device> pytest tests/device.py (forward invariance, CP conservation,
#                  weight <-> unit sums, device vs CPU float64; fp32 and bf16, 4 families)
#   speed_float32  benchmarks/relevance_speed.py --device <device> --dtype float32 (SmolLM2-135M-Instruct,
#                  the figure BENCHMARKS.md has for the CPU; its memory readings take 12 fresh processes)
#   cost_growth    benchmarks/cost_growth.py on <device>, fp32 and bf16: SmolLM2-1.7B and TinyLlama-1.1B at 1
#                  and 3 layers, 512 and 2,048 tokens, and SmolLM2-1.7B at its full 24 layers at 2,048 tokens
#                  (the check of the per-layer scaling); memory is max_memory_allocated there
# Output: DIR (default: $OUT when set, else benchmarks/results/device_check) holds each step's log and
# JSON, the pytest junit XML, and device_check.json (the summary). Exit status: 0 when every step
# passed, 1 when one failed, 2 for bad arguments, 3 when there is no CUDA device.
set -uo pipefail

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

DEVICE=cuda
OUT_DIR="${OUT:-benchmarks/results/device_check}"
REPEATS=3
SKIP_SPEED=0
DRY_RUN=0
PYTHON="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) [[ $# -ge 2 ]] || { echo "device_check.sh: --device needs a value" >&2; exit 2; }; DEVICE="$2"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --out) [[ $# -ge 2 ]] || { echo "device_check.sh: --out needs a value" >&2; exit 2; }; OUT_DIR="$2"; shift 2 ;;
        --out=*) OUT_DIR="${1#*=}"; shift ;;
        --repeats) [[ $# -ge 2 ]] || { echo "device_check.sh: --repeats needs a value" >&2; exit 2; }; REPEATS="$2"; shift 2 ;;
        --repeats=*) REPEATS="${1#*=}"; shift ;;
        --skip-speed) SKIP_SPEED=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "device_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ ! "$DEVICE" =~ ^cuda(:[0-9]+)?$ ]]; then
    echo "device_check.sh: --device must be cuda or cuda:N, got '$DEVICE' (the CPU figures come from the ordinary benchmarks)" >&2
    exit 2
fi
if [[ ! "$REPEATS" =~ ^[1-9][0-9]*$ ]]; then
    echo "device_check.sh: --repeats must be a positive integer, got '$REPEATS'" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2

# Fail fast, by name, where there is no GPU: nothing below is meaningful on the CPU.
if ! "$PYTHON" - "$DEVICE" <<'PY'
import sys

import torch

name = sys.argv[1]
if not torch.cuda.is_available():
    sys.exit(
        f"device_check.sh: no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees "
        "none on this machine. Run it on a GPU machine (nothing here was measured)."
    )
index = torch.device(name).index or 0
if index >= torch.cuda.device_count():
    sys.exit(f"device_check.sh: {name} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
print(f"device_check.sh: {name} = {torch.cuda.get_device_name(index)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
then
    exit 3
fi

mkdir -p "$OUT_DIR" || exit 2
declare -A STATUS SECONDS_TAKEN
STEPS=()
run_step() {  # run_step NAME LIMIT_S COMMAND...
    local name="$1" limit="$2"
    shift 2
    STEPS+=("$name")
    echo "== $name (limit ${limit}s): $*"
    if [[ $DRY_RUN -eq 1 ]]; then
        STATUS[$name]=dry-run
        SECONDS_TAKEN[$name]=0
        return
    fi
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    SECONDS_TAKEN[$name]=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then STATUS[$name]=passed; elif [[ $rc -eq 124 || $rc -eq 137 ]]; then STATUS[$name]=timed-out; else STATUS[$name]="failed (rc $rc)"; fi
    echo "   ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s (log: $OUT_DIR/$name.log)"
}

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
run_step identity 80 env HF_LRP_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest tests/device.py -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/identity_tests.xml"
if [[ $SKIP_SPEED -eq 0 ]]; then
    run_step speed_float32 110 "$PYTHON" benchmarks/relevance_speed.py --device "$DEVICE" --dtype float32 \
        --repeats "$REPEATS" --json "$OUT_DIR/relevance_speed_float32.json"
    run_step cost_growth 90 "$PYTHON" benchmarks/cost_growth.py --device "$DEVICE" \
        --models smollm2-1.7b,tinyllama-1.1b --dtypes float32,bfloat16 --seq-lens 512,2048 --layers 1,3 --skip "" \
        --check-model smollm2-1.7b --check-seq-len 2048 --repeats "$REPEATS" --output "$OUT_DIR/cost_growth.json"
fi

STATUS_LINES=""
for name in "${STEPS[@]}"; do
    STATUS_LINES+="$name	${STATUS[$name]}	${SECONDS_TAKEN[$name]}"$'\n'
done
STATUS_LINES="$STATUS_LINES" "$PYTHON" - "$OUT_DIR" "$DEVICE" <<'PY'
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

out, device = Path(sys.argv[1]), sys.argv[2]
summary = {"device": device, "steps": {}}
for line in os.environ["STATUS_LINES"].strip().splitlines():
    name, status, seconds = line.split("\t")
    summary["steps"][name] = {"status": status, "seconds": int(seconds)}
junit = out / "identity_tests.xml"
if junit.is_file():
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["identity_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
for dtype in ("float32", "bfloat16"):
    path = out / f"relevance_speed_{dtype}.json"
    if path.is_file():
        speed = json.loads(path.read_text())
        summary[f"relevance_speed_{dtype}"] = {
            k: speed[k]
            for k in ("device", "median_seconds", "peak_memory_mib", "time_ratio_vs_grad_all",
                      "time_ratio_vs_grad_prunable", "extra_memory_vs_grad_prunable_in_fp32_copies")
        }
path = out / "cost_growth.json"
if path.is_file():
    growth = json.loads(path.read_text())
    summary["cost_growth_full_depth"] = [
        {k: v for k, v in entry.items() if k.startswith(("model", "dtype", "seq_len", "time_ratio", "memory_ratio"))}
        for entry in growth.get("full_depth", [])
    ]
    summary["cost_growth_depth_check"] = growth.get("depth_check", [])
(out / "device_check.json").write_text(json.dumps(summary, indent=1))
print(f"device_check.sh: summary in {out / 'device_check.json'}")
PY
for name in "${STEPS[@]}"; do
    [[ "${STATUS[$name]}" == passed || "${STATUS[$name]}" == dry-run ]] || exit 1
done
exit 0
