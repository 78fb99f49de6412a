"""Publishing corrected models: push to a Hub with the card and the mask manifest, and load them back verified.

:func:`push_to_hub` uploads a saved corrected model directory (or saves a
:class:`~hf_lrp_surgery.carriers.CorrectedModel` first) with its ``surgery/`` directory (masks,
manifest, check record) and a model card (:mod:`hf_lrp_surgery.modelcard`). The endpoint and
token come from the standard environment (``HF_ENDPOINT``, ``HF_TOKEN``, or a saved login) or from
arguments (``HfApi(endpoint=..., token=...)``); nothing is hard-coded. A failed push (network,
authentication, conflict, rejected metadata) leaves the local copy as it was and raises
:class:`PushError`, whose message says what went wrong and the exact command that retries it.

:func:`load_from_hub` downloads a published model (``snapshot_download``), the adapter's base model
from the same endpoint, and loads it with :func:`~hf_lrp_surgery.carriers.load_corrected`, which proves
the mask is carried. Stock ``AutoModelForCausalLM.from_pretrained(repo_id)`` loads both forms too
(the adapter form needs ``peft`` installed).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import OfflineModeIsEnabled
from torch import nn

from hf_lrp_surgery.carriers import CHECK_FILE, SURGERY_DIR, CorrectedModel, load_corrected, model_files, read_surgery
from hf_lrp_surgery.exceptions import ModelLoadError, PublishError, PushError
from hf_lrp_surgery.io import write_json_atomic
from hf_lrp_surgery.modelcard import is_hub_id, write_card

__all__ = ["PublishError", "PushError", "load_from_hub", "push_or_warn", "push_to_hub"]

logger = logging.getLogger(__name__)


def _model_files() -> list[str]:
    """Remote files a push replaces, or removes where the local model has none of them.

    The surgery record and every registered carrier's model files, so that a repo switched from one
    carrier to another holds one form.
    """
    return [f"{SURGERY_DIR}/*", *model_files()]


_CHECK_FILE = f"{SURGERY_DIR}/{CHECK_FILE}"
PushReason = Literal["network", "offline", "auth", "conflict", "rejected", "unknown"]


# -- push -------------------------------------------------------------------------------------
def _prepare_adapter_base(directory: Path, carrier: str, saved_base: str | None, base_model: str | None) -> None:
    """Make sure a pushed adapter points at a base model others can load (a Hub id), writing it if given."""
    if carrier != "adapter":
        return
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    target = base_model or config.get("base_model_name_or_path") or saved_base
    if not is_hub_id(target):
        raise PublishError(
            f"the adapter in {directory} names its base model by the local path {target!r}, which nobody loading it "
            "from the Hub can use; pass base_model='<hub id of the base model>' (CLI: --base-model) to write the Hub "
            "id into adapter_config.json and surgery/check.json"
        )
    if config.get("base_model_name_or_path") != target:
        write_json_atomic(config_path, {**config, "base_model_name_or_path": target})
    check = json.loads((directory / _CHECK_FILE).read_text())
    if check.get("base_model_name_or_path") != target:
        write_json_atomic(directory / _CHECK_FILE, {**check, "base_model_name_or_path": target})


def _retry_command(
    directory: Path,
    repo_id: str,
    *,
    private: bool | None,
    revision: str | None,
    create_pr: bool,
    endpoint: str | None,
    base_model: str | None,
    commit_message: str | None,
    card: bool,
    license: str | None,
) -> str:
    parts = ["hf-lrp-surgery", "push", str(directory), repo_id]
    for flag, value in (
        ("--endpoint", endpoint),
        ("--revision", revision),
        ("--base-model", base_model),
        ("--commit-message", commit_message),
        ("--license", license),
    ):
        if value:
            parts += [flag, value]
    parts += ["--private"] if private else []
    parts += ["--create-pr"] if create_pr else []
    parts += [] if card else ["--no-card"]
    return " ".join(shlex.quote(p) for p in parts)


def _explain(err: Exception, endpoint: str, repo_id: str) -> tuple[PushReason, str]:
    """Why a push failed, in words that say what to do."""
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(err, OfflineModeIsEnabled):
        return "offline", "HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls; unset it to push"
    if status == 401:
        return "auth", (
            f"the Hub at {endpoint} refused the credentials (HTTP 401): set HF_TOKEN to a token with write "
            f"access to '{namespace}' (or pass token= / --token, or run `hf auth login`)"
        )
    if status == 403:
        return "auth", (
            f"the token has no write access to '{namespace}' on {endpoint} (HTTP 403): use a token with "
            "write access, or push to a namespace you own"
        )
    if status in (409, 412):
        return "conflict", f"the repo changed while pushing (HTTP {status}: {err}); the retry pushes on top of it"
    if status is not None:
        return "rejected", f"the Hub at {endpoint} answered HTTP {status}: {err}"
    if type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore") or isinstance(err, ConnectionError):
        return "network", (
            f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err}); check the network, "
            "HF_ENDPOINT and any proxy settings"
        )
    if isinstance(err, ValueError):  # huggingface_hub's README metadata validation
        return "rejected", f"the Hub rejected the upload: {err}"
    return "unknown", f"{type(err).__name__}: {err}"


def push_to_hub(
    directory_or_corrected: str | os.PathLike[str] | CorrectedModel,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    card: bool = True,
    tokenizer: Any = None,
    local_dir: str | os.PathLike[str] | None = None,
) -> CommitInfo:
    """Push a corrected model, its mask manifest (``surgery/``) and its model card to a Hub repo.

    The repo is created if needed (``exist_ok``). Remote model files the local model does not have
    (the other carrier's files, an older ``surgery/``) are deleted in the same commit, so the repo
    holds exactly one loadable form; other files (tokenizer, extra documents) are left alone.

    Args:
        directory_or_corrected: A directory written by :func:`~hf_lrp_surgery.carriers.save_corrected`,
            or a :class:`~hf_lrp_surgery.carriers.CorrectedModel` (saved first, see ``local_dir``).
        repo_id: ``namespace/name``.
        private: Create the repo private (ignored when it exists).
        commit_message: The commit summary (default: says what is pushed).
        commit_description: The commit description.
        revision: Branch to push to (default ``main``).
        create_pr: Open a pull request instead of committing to the branch.
        token: A token with write access (default: ``HF_TOKEN`` or the saved login).
        endpoint: The Hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).
        base_model: Hub id of the base model: shown on the card and, for an adapter, written into
            ``adapter_config.json`` and ``surgery/check.json`` where they name something else (e.g. the
            local path it was loaded from), so that others load the adapter on the right base.
        license: The card's license (usually the base model's).
        card: Write (or refresh) ``README.md`` with :func:`~hf_lrp_surgery.modelcard.write_card`
            before pushing; options stored by an earlier ``write_card`` / ``card_from_recipe`` are kept.
        tokenizer: Saved with a ``CorrectedModel`` (ignored for a directory).
        local_dir: Where a ``CorrectedModel`` is saved (default: a temporary directory, removed after a
            successful push and kept after a failed one).

    Returns:
        The ``CommitInfo`` (a ``str``: the commit URL; ``.oid``, ``.repo_url``, ``.pr_url``).

    Raises:
        PushError: The push failed (``reason``: network, offline, auth, conflict, rejected); the
            message names the local copy and the command that retries.
        PublishError: The directory is not a saved corrected model, or an adapter's base model is a
            local path and no ``base_model`` was given (raised before any network call).

    Example:
        >>> push_to_hub("runs/detox/adapter", "me/smollm2-detox-ia3",  # doctest: +SKIP
        ...             base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    """
    temporary: Path | None = None
    if isinstance(directory_or_corrected, CorrectedModel):
        if local_dir is None:
            temporary = Path(tempfile.mkdtemp(prefix="hf_lrp_surgery-push-"))
        directory = Path(local_dir) if local_dir is not None else temporary / repo_id.split("/")[-1]
        directory_or_corrected.save(directory, tokenizer=tokenizer, base_model_name_or_path=base_model)
    else:
        directory = Path(directory_or_corrected)
    try:
        _, carrier, _, saved_base = read_surgery(directory)
        _prepare_adapter_base(directory, carrier, saved_base, base_model)
        if card:
            write_card(directory, repo_id=repo_id, base_model=base_model, license=license)
    except FileNotFoundError as err:
        _remove(temporary)
        raise PublishError(f"{directory} is not a saved corrected model: {err}") from err
    except BaseException:  # a set-up mistake: nothing was pushed, so the temporary copy has nothing to retry
        _remove(temporary)
        raise

    api = HfApi(endpoint=endpoint, token=token)
    what = "IA3 adapter" if carrier == "adapter" else "baked checkpoint"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"hf_lrp_surgery: corrected model ({what}) with its mask manifest",
            commit_description=commit_description,
            delete_patterns=_model_files(),
        )
    except Exception as err:  # every failure becomes one error that keeps the local copy and says how to retry
        reason, why = _explain(err, api.endpoint, repo_id)
        retry = _retry_command(
            directory,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            endpoint=endpoint,
            base_model=base_model,
            commit_message=commit_message,
            card=card,
            license=license,
        )
        raise PushError(
            f"pushing {directory} to {repo_id} failed: {why}. The local copy is intact at {directory}; "
            f"retry with: {retry}",
            reason=reason,
            directory=directory,
            repo_id=repo_id,
            retry_command=retry,
        ) from err
    _remove(temporary)
    return commit


def _remove(temporary: Path | None) -> None:
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)


def push_or_warn(
    directory_or_corrected: str | os.PathLike[str] | CorrectedModel, repo_id: str, **kwargs: Any
) -> CommitInfo | None:
    """:func:`push_to_hub` for a ``TrainerCallback``: a failed push is logged, not raised, so training goes on.

    Call it from the main process only (``state.is_world_process_zero``).

    Args:
        directory_or_corrected: As for :func:`push_to_hub`.
        repo_id: As for :func:`push_to_hub`.
        **kwargs: Any other :func:`push_to_hub` argument.

    Returns:
        The ``CommitInfo``, or ``None`` when the push failed (the warning holds the retry command).

    Raises:
        PublishError, CardError: The model cannot be published as it is (these are bugs in the caller's
            set-up, not transient failures, so they are raised).

    Example:
        >>> push_or_warn(checkpoint_dir, "me/run", commit_message=f"step {state.global_step}")  # doctest: +SKIP
    """
    try:
        return push_to_hub(directory_or_corrected, repo_id, **kwargs)
    except PushError as err:
        logger.warning("%s", err)
        return None


# -- load -------------------------------------------------------------------------------------
def load_from_hub(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    via: Literal["peft", "transformers"] = "peft",
    base_model: str | None = None,
    adapter_enabled: bool = True,
    dtype: torch.dtype | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Download a published corrected model (or take a local directory), load it and verify its mask.

    An adapter's base model is downloaded from the same endpoint with the same token (unless
    ``base_model`` is a local directory).

    Args:
        repo_id_or_path: A Hub repo id pushed by :func:`push_to_hub`, or a local directory.
        revision: Branch, tag or commit of the repo.
        via: For adapters: ``"peft"`` (``PeftModel``) or ``"transformers"`` (integrated adapter).
        base_model: For adapters: load the base model from this Hub id or directory instead of the
            saved one.
        adapter_enabled: ``False`` returns the adapter switched off (the original model's outputs).
        dtype: Load in this dtype (default: as saved).
        token: Token for private repos (default: ``HF_TOKEN`` or the saved login; ``False``: none).
        endpoint: The Hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).
        cache_dir: The download cache (default: the Hub cache).

    Returns:
        The model in eval mode, verified: exact zeros where the manifest says and the probe logits of
        the corrected model.

    Raises:
        ModelLoadError: The repo or its base model cannot be downloaded, or it holds no ``surgery/``.
        MaskVerificationError: The loaded model does not carry its mask.

    Example:
        >>> model = load_from_hub("me/smollm2-detox-ia3")  # doctest: +SKIP
        >>> original = load_from_hub("me/smollm2-detox-ia3", adapter_enabled=False)  # doctest: +SKIP
    """
    api = HfApi(endpoint=endpoint, token=token)

    def download(name: str, rev: str | None) -> Path:
        try:
            return Path(api.snapshot_download(name, revision=rev, cache_dir=cache_dir))
        except Exception as err:  # network, missing repo or revision, auth: one error that names the source
            raise ModelLoadError(f"cannot download {name!r} from {api.endpoint}: {type(err).__name__}: {err}") from err

    local = Path(repo_id_or_path)
    if not local.is_dir():
        local = download(str(repo_id_or_path), revision)
    if not (local / _CHECK_FILE).is_file():
        raise ModelLoadError(
            f"{repo_id_or_path} holds no {_CHECK_FILE}: it was not published by hf_lrp_surgery; load "
            "it with AutoModelForCausalLM.from_pretrained"
        )
    _, carrier, _, saved_base = read_surgery(local)
    base = base_model or saved_base
    if carrier == "adapter" and base is not None and not Path(base).is_dir():
        base = str(download(base, None))
    return load_corrected(local, via=via, base_model=base, adapter_enabled=adapter_enabled, dtype=dtype)
