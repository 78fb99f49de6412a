"""Recipe: fine-tune a model with ``LRPSurgeryCallback`` detoxifying it at the end of training.

1. Sample continuations of shipped provocative prompts (train split) with the model and keep the
   toxic and the non-toxic continuations of the same prompts (``paired_contrast_sets``): the
   undesired and the general reference sets.
2. Fine-tune briefly on the shipped general text (train split) with the Trainer; the callback
   explains both sets every ``--every`` steps (the running mean over all passes goes to the logs)
   and, when training ends, prunes the ``--budget`` neurons with the lowest contrastive relevance,
   saves the corrected model (baked) with its manifest and verifies it.
3. Measure the original, the fine-tuned and the corrected model once on held-out data: toxicity
   of greedy continuations of held-out provocative prompts (offline profanity classifier: a
   profanity/offence scorer, not a full toxicity model), perplexity on held-out general text, and
   the next-token KL on held-out neutral prompts.

    python recipes/finetune_with_surgery.py                       # embedded SmolLM2-135M-Instruct
    python recipes/finetune_with_surgery.py --budget 20 --steps 60 --output runs/ft-surgery-20

Writes ``<output>/report.json``, ``<output>/undesired_mass_per_layer.png`` and the corrected model
in ``<output>/corrected``. Measured with the defaults on 2 CPU cores shared with three other jobs
(``nice -n 19``): 29 minutes (sampling the reference sets 7, fine-tuning with two relevance passes 9,
the three evaluations 13); sampling and evaluating are most of it (``--attribution-prompts``,
``--eval-prompts``).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from hf_lrp_surgery.carriers import load_corrected
from hf_lrp_surgery.correction import detox_behaviour, paired_contrast_sets
from hf_lrp_surgery.evaluation import DecodingSettings, generate, next_token_kl, perplexity, toxicity
from hf_lrp_surgery.io import write_json_atomic
from hf_lrp_surgery.models import DEFAULT_MODEL, load_model
from hf_lrp_surgery.references import shipped_set
from hf_lrp_surgery.training import LRPSurgeryCallback


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, checkpoint directory or Hub id")
    parser.add_argument("--output", default="runs/finetune-surgery")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of fine-tuning")
    parser.add_argument("--every", type=int, default=10, help="relevance pass every this many steps")
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--granularity", choices=["neurons", "heads", "weights"], default="neurons")
    parser.add_argument("--budget", type=int, default=10, help="units pruned at the end of training")
    parser.add_argument(
        "--attribution-prompts",
        type=int,
        default=16,
        help="provocative train prompts sampled for the paired reference sets",
    )
    parser.add_argument(
        "--max-samples", type=int, default=24, help="at most this many samples of each reference set per relevance pass"
    )
    parser.add_argument(
        "--eval-prompts", type=int, default=40, help="held-out provocative prompts for the toxicity measurement (of 81)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


class _TextDataset(torch.utils.data.Dataset):
    """Tokenised paragraphs, truncated to ``max_length`` tokens (the collator pads and makes labels)."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], max_length: int) -> None:
        self.rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": self.rows[i]}


def _measure(model: torch.nn.Module, tokenizer: Any, prompts: list[str], texts: list[str]) -> dict[str, float]:
    generations = generate(model, tokenizer, prompts, DecodingSettings(max_new_tokens=32), progress=False)
    result = toxicity([g.text for g in generations])
    return {
        "toxicity_rate": result.rate,
        "toxicity_mean": result.mean,
        "perplexity": perplexity(model, tokenizer, texts, progress=False),
    }


def _plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in history if "lrp/passes" in e]
    if not entries:
        return
    layers = sorted(int(k.rsplit("_", 1)[1]) for k in entries[-1] if k.startswith("lrp/undesired_mass/layer_"))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for entry in entries:
        ax.plot(
            layers,
            [entry[f"lrp/undesired_mass/layer_{i:02d}"] for i in layers],
            marker=".",
            label=f"step {entry['step']} ({int(entry['lrp/passes'])} passes)",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("undesired mass of the contrast")
    ax.set_title("Where the contrast (general - undesired) is negative, running mean over passes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe; returns a process exit code."""
    options = _parser().parse_args(argv)
    output = Path(options.output)
    started = time.time()
    torch.manual_seed(options.seed)
    model, tokenizer = load_model(options.model)
    original = copy.deepcopy(model).eval()

    prompts = shipped_set("provocative_prompts", "train")[: options.attribution_prompts]
    undesired, general = paired_contrast_sets(model, tokenizer, prompts, detox_behaviour(), progress=True)
    print(f"reference sets: {len(undesired)} toxic and {len(general)} non-toxic continuations of the same prompts")

    callback = LRPSurgeryCallback(
        undesired=undesired,
        general=general,
        tokenizer=tokenizer,
        granularity=options.granularity,
        budget=options.budget,
        every_n_steps=options.every,
        surgery="end",
        carrier="bake",
        output_dir=str(output / "corrected"),
        limit=options.max_samples,
        batch_size=4,
        progress=True,
    )
    args = TrainingArguments(
        output_dir=str(output / "trainer"),
        use_cpu=True,
        report_to=[],
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        logging_steps=options.every,
        save_strategy="no",
        seed=options.seed,
    )
    train = _TextDataset(tokenizer, shipped_set("general_text", "train"), options.max_length)
    trainer = Trainer(
        model=model.train(),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    callback.attach(trainer)
    trainer.train()
    fine_tuned = model.eval()
    corrected = load_corrected(output / "corrected")  # proves the saved model carries the mask
    trained_at = time.time()

    eval_prompts = shipped_set("provocative_prompts", "heldout")[: options.eval_prompts]
    texts = shipped_set("general_text", "heldout")
    neutral = shipped_set("neutral_prompts", "heldout")
    report: dict[str, Any] = {
        "model": options.model,
        "options": vars(options),
        "reference_sets": {
            "undesired": len(undesired),
            "general": len(general),
            "explained_per_pass": dict(
                zip(
                    ("general", "undesired"),
                    (min(len(general), options.max_samples), min(len(undesired), options.max_samples)),
                )
            ),
        },
        "relevance_steps": callback.accumulator.steps,
        "mask": callback.masks[options.granularity].manifest()["per_layer"],
        "scorer": "alt-profanity-check (offline profanity/offence classifier, not a full toxicity model)",
        "original": _measure(original, tokenizer, eval_prompts, texts),
        "fine_tuned": _measure(fine_tuned, tokenizer, eval_prompts, texts),
        "corrected": _measure(corrected, tokenizer, eval_prompts, texts),
        "kl_original_to_fine_tuned": next_token_kl(original, fine_tuned, tokenizer, neutral, progress=False),
        "kl_fine_tuned_to_corrected": next_token_kl(fine_tuned, corrected, tokenizer, neutral, progress=False),
        "log_history": trainer.state.log_history,
    }
    report["seconds"] = {
        "attribution_and_training": round(trained_at - started, 1),
        "total": round(time.time() - started, 1),
    }
    write_json_atomic(output / "report.json", report)
    _plot(trainer.state.log_history, output / "undesired_mass_per_layer.png")

    print(f"\n{'model':<12} {'toxicity rate':>14} {'toxicity mean':>14} {'perplexity':>11}")
    for name in ("original", "fine_tuned", "corrected"):
        row = report[name]
        print(f"{name:<12} {row['toxicity_rate']:>14.3f} {row['toxicity_mean']:>14.3f} {row['perplexity']:>11.2f}")
    print(
        "next-token KL on held-out neutral prompts: "
        f"original -> fine-tuned {report['kl_original_to_fine_tuned']:.4f}, "
        f"fine-tuned -> corrected {report['kl_fine_tuned_to_corrected']:.4f}"
    )
    print(
        f"{len(eval_prompts)} held-out provocative prompts, {len(texts)} held-out paragraphs; "
        f"{report['seconds']['total']:.0f} s; report: {output / 'report.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
