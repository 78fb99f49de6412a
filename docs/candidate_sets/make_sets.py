"""Fix the train/heldout splits of the authored pools and write the shipped JSON files (no measurement here)."""
import json, random
from pathlib import Path
SEED = 241124
OUT = Path("/work/main/hf_lrp_surgery/data/sets")
W = Path("/tmp/datawork")
def lines(n): return [l.strip() for l in (W / f"{n}.txt").read_text().splitlines() if l.strip()]
pools = {
 "provocative_prompts": (lines("provocative"),
  "Unfinished sentence prefixes (5-15 words) in the style of RealToxicityPrompts - arguments, insults in the making, "
  "angry reviews, trash talk, heated forum replies, rants, reported and quoted confrontations - that invite a rude, "
  "profane or insulting continuation without containing slurs (a few contain mild profanity). Written from scratch "
  "for hf_lrp_surgery (English). Use as plain text completion (no chat template). Train: attribution and tuning; "
  "heldout: honest evaluation only.",
  "The whole pool (182) was piloted once with greedy 32-token continuations before the split was fixed (13.7% toxic); "
  "32 second-person prefixes that the instruct model answered with assistant-style deflection were then rewritten as "
  "reported or narrated confrontations, and the split was fixed; nothing was changed after the split."),
 "neutral_prompts": (lines("neutral"),
  "Neutral sentence prefixes (5-15 words): everyday narration, explanations, reviews, instructions, dialogue openers, "
  "news-like sentences. Written from scratch for hf_lrp_surgery (English). Use as plain text completion; the general-"
  "behaviour counterpart of provocative_prompts (e.g. KL to the original model). Train: tuning; heldout: evaluation only.",
  "The whole pool (184) was piloted once (greedy, 0% toxic) before the split was fixed; no prompt was changed."),
 "repetition_prompts": (lines("repetition"),
  "Short open instructions that tend to make a small instruct model loop or repeat itself: poems with few constraints, "
  "chants, lullabies, songs, lists and enumerations, counting, 'say ...' and 'repeat ...' requests. Written from scratch "
  "for hf_lrp_surgery (English). Meant for use WITH the tokenizer's chat template (without it the model often ends "
  "the turn at once). Train: attribution and tuning; heldout: evaluation only.",
  "The whole pool (129) was piloted once (greedy, 50 tokens, with and without chat template) before the split was "
  "fixed; 26 prompts of kinds that gave short one-line answers (repeat-after-me one-liners, slogans, mottos, "
  "greetings, 'say ...' requests) were replaced by poems, chants, songs and lists on new subjects; nothing was "
  "changed after the split."),
 "general_text": ([p.strip() for p in (W / "general.txt").read_text().split("\n\n") if p.strip()],
  "Original paragraphs (75-115 words) of plain general-domain English prose - science explainers, history, how-to, "
  "news-like reports, short fiction - written from scratch for hf_lrp_surgery; for perplexity (general-behaviour "
  "check). Train: tuning; heldout: evaluation only.",
  "Not piloted; split fixed before any measurement."),
}
for name, (pool, desc, prov) in pools.items():
    assert len(set(pool)) == len(pool)
    order = list(pool)
    random.Random(SEED).shuffle(order)
    half = len(order) // 2
    d = {"description": desc, "version": 1, "split_seed": SEED,
         "split": f"random.Random({SEED}).shuffle(pool); train = first len(pool)//2 items, heldout = the rest; "
                  "fixed before the recorded measurement",
         "provenance": prov, "train": order[:half], "heldout": order[half:]}
    (OUT / f"{name}.json").write_text(json.dumps(d, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(name, len(order[:half]), len(order[half:]))
