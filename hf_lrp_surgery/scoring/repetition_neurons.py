"""Repetition neurons: units whose activation rises once a sequence starts repeating itself.

Hiraoka and Inui, "Repetition Neurons: How Do Language Models Produce Repetitions?", NAACL 2025
(arXiv 2410.13497). Written for this project from the paper's description: a unit's score is its
mean activation after the onset of a repetition minus its mean activation before it, over looping
samples; deactivating the top-K units cut repetition by 25-35% in the paper.

Here:

* **Which samples.** The undesired set only (the looping continuations); the general set is read by
  nothing (the method compares positions within repeating samples, not sets) and only counted.
* **The onset** of a sample is its first focused continuation token (the repetition recipe focuses
  the undesired samples on the tokens that repeat an earlier one, so this is where the loop starts),
  or, for a sample without focus, the first token that repeats an earlier token of its continuation
  (of the text, for a sample without continuation).
* **Before / after.** A token's activation is read at the position that predicts it (the position
  whose logits the recipe explains): *before* are the positions predicting the tokens from the first
  of the sequence up to the onset, *after* those predicting the onset and everything that follows.
  Each sample's two means are taken over its own positions and the differences averaged over the
  samples (a long loop weighs no more than a short one); samples without onset, or with nothing before
  it, are left out and counted in the settings.
* **Which activation.** A neuron is an input feature of the MLP output projection (the neuron masks'
  unit); a head is scored by the L2 norm of its output. Weights are refused.
* **The score** is ``-(mean after - mean before)`` (higher = keep): pruning the lowest takes the
  top-K repetition neurons.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_lrp_surgery.exceptions import ReferenceSetError
from hf_lrp_surgery.references.samples import Encoded, ReferenceSample
from hf_lrp_surgery.scoring._units import UNIT_KINDS, encode_all, unit_batches
from hf_lrp_surgery.scoring.registry import ScoringRequest, register_scorer
from hf_lrp_surgery.scoring.scores import Scores

__all__ = ["repetition_neurons", "repetition_onset"]


def repetition_onset(token_ids: Sequence[int]) -> int | None:
    """The index of the first token that already occurred earlier in the sequence (``None``: no repetition).

    The same rule as the repetition behaviour's focus (``correction.repeated_positions``), first index only.

    Example:
        >>> repetition_onset([5, 6, 7, 6, 7]), repetition_onset([1, 2, 3])
        (3, None)
    """
    seen: set[int] = set()
    for j, token in enumerate(token_ids):
        if token in seen:
            return j
        seen.add(token)
    return None


def _split(sample: ReferenceSample, encoded: Encoded, index: int) -> tuple[list[int], list[int]] | None:
    """``(before, after)`` positions of one sample (``encoded`` without focus), or ``None`` if it has no onset.

    The position predicting sequence token ``j`` is ``start + j - 1`` where the sequence starts at
    ``start`` (the continuation: after the prompt; a plain text: at 0, whose first token nothing predicts).
    """
    if sample.continuation is not None:
        start = encoded.seeds[0][0] + 1  # the prompt's length: the first seed predicts continuation token 0
        first = 0
    else:
        start, first = 0, 1
    sequence = encoded.ids[start:]
    onset = min(sample.focus) if sample.focus is not None else repetition_onset(sequence)
    if onset is not None and not 0 <= onset < len(sequence):
        raise ReferenceSetError(
            f"sample {index}: focus index {onset} lies outside the continuation's {len(sequence)} tokens"
        )
    if onset is None or onset <= first:
        return None
    before = [start + j - 1 for j in range(first, onset)]
    after = [start + j - 1 for j in range(onset, len(sequence))]
    return before, after


@register_scorer(
    "repetition_neurons",
    description="-(mean activation after the onset of a repetition - before it), looping samples "
    "(Hiraoka & Inui, NAACL 2025)",
    paired=True,
    components=UNIT_KINDS,
)
def repetition_neurons(request: ScoringRequest) -> Scores:
    """``-(mean after onset - mean before onset)`` per neuron and/or head, over the undesired (looping) samples.

    Args:
        request: A paired request (``samples``: the looping set; ``general_samples`` only counted).

    Returns:
        Scores of the asked neurons and/or heads (higher = keep).

    Raises:
        ReferenceSetError: No undesired sample has an onset with a token before it, or a focus index
            lies outside its continuation.

    Example:
        >>> scores = score_pair(model, loops, fine, tokenizer, method="repetition_neurons")  # doctest: +SKIP
    """
    components = [c for c in UNIT_KINDS if c in request.options.components]
    # Without focus, so that the whole continuation is read (the focus only marks the onset).
    unfocused = [ReferenceSample(s.prompt, s.continuation, s.target) for s in request.samples]
    encoded = encode_all(request, unfocused)
    splits = [_split(s, e, i) for i, (s, e) in enumerate(zip(request.samples, encoded))]
    used = [i for i, split in enumerate(splits) if split is not None]
    if not used:
        raise ReferenceSetError(
            f"none of the {len(request.samples)} undesired samples repeats a token after at least one token "
            "(or is focused after its first token), so no onset of a repetition can be located; give looping "
            "continuations (e.g. the repetition recipe's undesired set)"
        )
    kept = [encoded[i] for i in used]
    total: dict[str, torch.Tensor] = {}
    for batch in unit_batches(request, kept, components, description=f"{request.description} (undesired)"):
        for b in range(batch.size):
            before, after = splits[used[batch.start + b]]  # type: ignore[misc]
            for kind in components:
                rows = []
                for layer in batch.values[kind]:
                    values = layer[b].double()
                    values = values.norm(dim=-1) if kind == "heads" else values
                    rows.append((values[after].mean(0) - values[before].mean(0)).cpu())
                delta = torch.stack(rows)
                total[kind] = total[kind] + delta if kind in total else delta
    scores = request.new_scores(
        {
            "method": "repetition_neurons",
            "components": list(request.options.components),
            "undesired_samples": len(request.samples),
            "samples_with_onset": len(used),
            "general_samples": len(request.general_samples),
            "general_set": "not read (the method compares positions within the looping samples)",
            "activation": "neurons: input of the MLP output projection; heads: L2 norm of the head's output",
            "onset": "first focused continuation token, else the first token repeating an earlier one",
            "score": "-(mean after onset - mean before onset), per sample, averaged over samples",
        }
    )
    for name, value in total.items():
        setattr(scores, name, (-value / len(used)).float())
    return scores
