"""The logits probe: a fixed random input whose logits recognise the corrected model after loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_lrp_surgery.exceptions import MaskVerificationError
from hf_lrp_surgery.lrp.architectures import parameter, resolve, unwrap_model
from hf_lrp_surgery.lrp.offload import execution_device

__all__ = ["LogitsProbe", "probe_logits"]

_PROBE_LENGTH = 16
_PROBE_VOCAB = 128


# -- probe ------------------------------------------------------------------------------------
def _vocab_size(model: nn.Module) -> int:
    lm: Any = unwrap_model(model)  # a PreTrainedModel
    return int(parameter(lm.get_output_embeddings()).shape[0])


@torch.no_grad()
def probe_logits(model: nn.Module, input_ids: list[int], vocab_ids: list[int]) -> torch.Tensor:
    """The logits of ``model`` at every probe position for the kept vocabulary entries, as float64 on the CPU."""
    device = execution_device(resolve(model).token_embedding)
    ids = torch.tensor([input_ids], device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    return logits[:, vocab_ids].double().cpu()


@dataclass(frozen=True)
class LogitsProbe:
    """Logits of the original and the corrected model on a fixed probe, to recognise the corrected model.

    Attributes:
        input_ids: The probe tokens (seeded, so every copy of a model sees the same).
        vocab_ids: The vocabulary entries whose logits are kept.
        original: ``[len(input_ids)][len(vocab_ids)]`` logits of the base model.
        corrected: The same for the corrected model.
        dtype: The dtype the logits were computed in.
    """

    input_ids: list[int]
    vocab_ids: list[int]
    original: list[list[float]]
    corrected: list[list[float]]
    dtype: str

    @staticmethod
    def positions(model: nn.Module, seed: int = 0) -> tuple[list[int], list[int]]:
        """The probe's token ids and kept vocabulary ids for ``model``'s vocabulary."""
        generator = torch.Generator().manual_seed(seed)
        vocab = _vocab_size(model)
        input_ids = torch.randint(0, vocab, (_PROBE_LENGTH,), generator=generator).tolist()
        vocab_ids = torch.randperm(vocab, generator=generator)[:_PROBE_VOCAB].sort().values.tolist()
        return input_ids, vocab_ids

    def check(self, model: nn.Module) -> float:
        """Compare ``model``'s probe logits with the corrected model's.

        Returns:
            The largest absolute logit difference to the corrected model.

        Raises:
            MaskVerificationError: The logits are not the corrected model's (beyond a tolerance set by
                the model's dtype), or are closer to the original model's.
        """
        logits = probe_logits(model, self.input_ids, self.vocab_ids)
        corrected, original = torch.tensor(self.corrected), torch.tensor(self.original)
        to_corrected = float((logits - corrected).abs().max())
        to_original = float((logits - original).abs().max())
        half = ("torch.bfloat16", "torch.float16")
        low_precision = self.dtype in half or str(resolve(model).embedding_weight.dtype) in half
        tolerance = (0.05 if low_precision else 1e-4) * (1.0 + float(corrected.abs().max()))
        if to_corrected > tolerance or (to_original < to_corrected and self.original != self.corrected):
            raise MaskVerificationError(
                f"the model's probe logits differ from the corrected model's by {to_corrected:.3g} (tolerance "
                f"{tolerance:.3g}; to the original model: {to_original:.3g}): this is not the corrected model. "
                "Was the adapter dropped or disabled, or the base model swapped?"
            )
        return to_corrected
