"""Forward passes that hand each batch's unit activations (and optionally their gradients) to a scorer.

Shared by the paired scorers (:mod:`.aura`, :mod:`.repetition_neurons`, :mod:`.patching`). The units
are those of the masks: an MLP neuron is one input feature of the MLP output projection (the
activation the neuron mask zeroes); a head is its slice of the attention output projection's input
(the head's output before ``W_o``), of ``head_dim`` features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_lrp_surgery.lrp.layout import Granularity
from hf_lrp_surgery.lrp.offload import execution_device
from hf_lrp_surgery.references import samples as _samples
from hf_lrp_surgery.references.samples import Encoded, ReferenceSample, encode_sample, make_batch, pad_token_id
from hf_lrp_surgery.scoring.registry import ScoringRequest

#: The component kinds whose activations the passes read.
UNIT_KINDS: tuple[Granularity, ...] = ("neurons", "heads")


@dataclass
class UnitBatch:
    """One batch of a pass.

    Attributes:
        start: Index of the batch's first sample in the encoded list.
        size: Samples in the batch (right-padded, so sample ``b``'s positions are those of its ids).
        values: Kind -> per decoder block the activations, detached: neurons ``[B, T, num_neurons]``,
            heads ``[B, T, num_heads, head_dim]``.
        gradients: The same shapes: the gradient of the batch's objective (see :func:`unit_batches`),
            or ``None`` when not asked for.
    """

    start: int
    size: int
    values: dict[str, list[torch.Tensor]]
    gradients: dict[str, list[torch.Tensor]] | None


def encode_all(request: ScoringRequest, samples: Sequence[ReferenceSample]) -> list[Encoded]:
    """Tokenise samples and locate their explained positions (refusing bad ones by index)."""
    arch = request.arch
    return [encode_sample(s, i, request.tokenizer, arch.max_positions, arch.vocab_size) for i, s in enumerate(samples)]


def explained_positions(sample: ReferenceSample, encoded: Encoded) -> list[int]:
    """The positions a sample's activations are pooled over.

    With a continuation: the positions whose next-token logits the sample explains (every
    continuation token, or only the focused ones), i.e. the activations while the model produces
    those tokens. Without one (a plain text): every token, as AurA pools over a whole sentence.
    """
    if sample.continuation is not None:
        return [position for position, _ in encoded.seeds]
    return list(range(len(encoded.ids)))


def _objective(logits: torch.Tensor, batch: _samples.Batch, objective: str, size: int) -> torch.Tensor:
    """Sum over samples of the mean over each sample's explained tokens of their logit (or log-probability)."""
    rows = logits[batch.seed_rows, batch.seed_positions].double()  # [N, V]
    if objective == "logprob":
        rows = rows.log_softmax(-1)
    tokens = torch.where(batch.seed_tokens == _samples.ARGMAX, rows.detach().argmax(-1), batch.seed_tokens)
    per_seed = rows.gather(-1, tokens[:, None])[:, 0]
    counts = torch.zeros(size, dtype=torch.float64, device=rows.device)
    counts.index_add_(0, batch.seed_rows, torch.ones_like(per_seed))
    return (per_seed / counts[batch.seed_rows]).sum()


def unit_batches(
    request: ScoringRequest,
    encoded: Sequence[Encoded],
    components: Sequence[Granularity],
    *,
    gradients: bool = False,
    description: str | None = None,
) -> Iterator[UnitBatch]:
    """Run the model over encoded samples, batch by batch, and yield the units' activations.

    Args:
        request: The scoring request (model, architecture, tokenizer, batch size, progress).
        encoded: The samples, encoded (:func:`encode_all`).
        components: ``"neurons"`` and/or ``"heads"``.
        gradients: Also differentiate, per batch, ``J = sum over samples of the mean over the sample's
            explained tokens of their logit`` (``options.objective == "logprob"``: log-probability)
            with respect to every activation; the model's parameters get no gradients.
        description: The progress bar's label (default: the request's).

    Yields:
        One :class:`UnitBatch` per batch; its tensors are valid until the next one.
    """
    model, arch = request.model, request.arch
    device = execution_device(arch.token_embedding)
    pad_id = pad_token_id(request.tokenizer, arch.model)
    values: dict[str, list[torch.Tensor]] = {kind: [] for kind in components}
    deltas: dict[str, list[torch.Tensor]] = {kind: [] for kind in components}

    def capture(kind: str) -> Callable[..., tuple | None]:
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            shaped = x.unflatten(-1, (arch.num_heads, -1)) if kind == "heads" else x
            values[kind].append(shaped.detach())
            if not gradients:
                return None
            # A zero leaf added to the activation: its gradient is the activation's, and the graph
            # upstream stays whole (gradients of earlier blocks still flow through this module).
            delta = torch.zeros_like(x, requires_grad=True)
            deltas[kind].append(delta)
            return (x + delta, *args[1:])

        return pre_hook

    modules = {"neurons": [layer.mlp_out for layer in arch.layers], "heads": [layer.o_proj for layer in arch.layers]}
    handles = [m.register_forward_pre_hook(capture(kind)) for kind in components for m in modules[kind]]
    try:
        with tqdm(
            total=len(encoded),
            desc=description or request.description,
            unit="sample",
            disable=not request.progress,
            leave=False,
        ) as bar:
            for start in range(0, len(encoded), request.options.batch_size):
                chunk = encoded[start : start + request.options.batch_size]
                for kind in components:
                    values[kind].clear()
                    deltas[kind].clear()
                batch = make_batch(chunk, pad_id, "right", device)
                grads: dict[str, list[torch.Tensor]] | None = None
                # Gradient mode only around the pass, not across the yield (the caller's mode is its own).
                with torch.enable_grad() if gradients else torch.no_grad():
                    output = model(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                    )
                    if gradients:
                        objective = _objective(output.logits, batch, request.options.objective, len(chunk))
                        found = torch.autograd.grad(objective, [d for kind in components for d in deltas[kind]])
                        grads, offset = {}, 0
                        for kind in components:
                            count = len(deltas[kind])
                            grads[kind] = [
                                g.unflatten(-1, (arch.num_heads, -1)) if kind == "heads" else g
                                for g in found[offset : offset + count]
                            ]
                            offset += count
                    del output
                yield UnitBatch(start, len(chunk), {k: list(v) for k, v in values.items()}, grads)
                bar.update(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
