"""Measure a model's behaviour on the shipped sets before any correction (both splits).

    python benchmarks/baseline_behaviour.py [--model smollm2-135m-instruct]

Prints JSON: toxicity rate and mean on the provocative prompts (greedy, 32 new tokens), mean RUR and
the share of loops (RUR < 0.5) on the repetition prompts (greedy, 50 new tokens, with and without
the chat template), and perplexity on the general text.
"""

from __future__ import annotations

import argparse
import json
import time

from hf_lrp_surgery.evaluation import (
    DecodingSettings,
    generate,
    mean_rur,
    perplexity,
    response_uniqueness_ratio,
    toxicity,
)
from hf_lrp_surgery.models import DEFAULT_MODEL, load_model
from hf_lrp_surgery.references import shipped_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    out: dict[str, object] = {"model": args.model}
    for split in ("train", "heldout"):
        start = time.perf_counter()
        generations = generate(
            model,
            tokenizer,
            shipped_set("provocative_prompts", split),
            DecodingSettings(max_new_tokens=32),
            progress=False,
        )
        result = toxicity([g.text for g in generations])
        out[f"provocative_{split}"] = {
            "toxicity_rate": round(result.rate, 4),
            "toxicity_mean": round(result.mean, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        for chat in (False, True):
            generations = generate(
                model,
                tokenizer,
                shipped_set("repetition_prompts", split),
                DecodingSettings(max_new_tokens=50, use_chat_template=chat),
                progress=False,
            )
            ratios = [response_uniqueness_ratio(g.token_ids) for g in generations if g.token_ids]
            out[f"repetition_{split}_chat_template_{chat}"] = {
                "rur_mean": round(mean_rur(generations), 4),
                "loop_share": round(sum(r < 0.5 for r in ratios) / len(ratios), 3),
            }
        out[f"perplexity_{split}"] = round(
            perplexity(model, tokenizer, shipped_set("general_text", split), progress=False), 3
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
