"""Publishing corrected models: push to a Hub with the card and the mask manifest, and load them back verified.

:func:`push_to_hub` uploads a saved corrected model directory (or saves a
:class:`~hf_lrp_surgery.carriers.CorrectedModel` first) with its ``surgery/`` directory (masks,
manifest, check record) and a model card (:mod:`hf_lrp_surgery.modelcard`). The endpoint and
token come from the standard environment (``HF_ENDPOINT``, ``HF_TOKEN``, or a saved login) or from
arguments (``HfApi(endpoint=..., token=...)``); nothing is hard-coded. The upload is built in a
staging copy next to the local directory (hard links, so GB-size weights are not copied; only the
small files that change are rewritten): the card, the adapter's Hub base and the public names of
local paths are written there, and the local directory is never written, whether the push fails or
succeeds. Nothing uploaded names a local absolute path: the base model's path becomes its Hub id
(``base_model``), any other one its bare name (``./name``). A failed push (network, authentication,
conflict, rejected metadata) raises :class:`PushError`, whose message says what went wrong and the
exact command that retries it.

:func:`load_from_hub` downloads a published model (``snapshot_download``), the adapter's base model
from the same endpoint, and loads it with :func:`~hf_lrp_surgery.carriers.load_corrected`, which proves
the mask is carried. Stock ``AutoModelForCausalLM.from_pretrained(repo_id)`` loads both forms too
(the adapter form needs ``peft`` installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import OfflineModeIsEnabled
from torch import nn

from hf_lrp_surgery._deprecation import moved_names
from hf_lrp_surgery.carriers import (
    CHECK_FILE,
    SURGERY_DIR,
    CorrectedModel,
    get_carrier,
    load_corrected,
    model_files,
    read_surgery,
)
from hf_lrp_surgery.exceptions import ModelLoadError, PublishError, PushError
from hf_lrp_surgery.io import staging_directory, write_json_atomic, write_text_atomic
from hf_lrp_surgery.modelcard import is_hub_id, write_card

__all__ = ["PublishError", "PushError", "load_from_hub", "push_to_hub"]


def _model_files() -> list[str]:
    """Remote files a push replaces, or removes where the local model has none of them.

    The surgery record and every registered carrier's model files, so that a repo switched from one
    carrier to another holds one form.
    """
    return [f"{SURGERY_DIR}/*", *model_files()]


_CHECK_FILE = f"{SURGERY_DIR}/{CHECK_FILE}"
PushReason = Literal["network", "offline", "auth", "conflict", "rejected", "unknown"]


# -- push -------------------------------------------------------------------------------------
_BASE_KEY = "base_model_name_or_path"
# A local absolute path inside a string: "/..." or "~/..." at the start or after a space, "=", a quote,
# a backquote or "(" (so URLs and repo-relative paths such as "surgery/x.png" never match).
_LOCAL_PATH = re.compile(r"(?<![^\s='\"`(])~?/[^\s'\"`()]+")


def _hub_base(directory: Path, carrier: str, saved_base: str | None, base_model: str | None) -> str | None:
    """The Hub id that names the base model in the upload; refuses an adapter whose base is a local path.

    Args:
        directory: The local corrected model (only read).
        carrier: Its carrier's name.
        saved_base: The base model recorded in ``surgery/check.json``.
        base_model: The Hub id the caller gave, if any.

    Returns:
        ``base_model``, or for an adapter the Hub id its config (or check record) names.

    Raises:
        PublishError: An adapter names its base by a local path and no ``base_model`` was given.
    """
    config_name = get_carrier(carrier).base_config
    if config_name is None:  # the saved model stands alone
        return base_model
    config = json.loads((directory / config_name).read_text())
    target = base_model or config.get(_BASE_KEY) or saved_base
    if not is_hub_id(target):
        raise PublishError(
            f"the adapter in {directory} names its base model by the local path {target!r}, which nobody loading it "
            "from the Hub can use; pass base_model='<hub id of the base model>' (CLI: --base-model) to write the Hub "
            "id into the uploaded adapter_config.json and surgery/check.json"
        )
    return target


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``, or copy it where linking is impossible."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


@contextlib.contextmanager
def _upload_copy(directory: Path) -> Iterator[Path]:
    """A copy of ``directory`` to build the upload in, removed on exit.

    Files are hard links (copies where the file system has none), so weights cost nothing to stage.
    Everything written into the copy goes through ``os.replace`` (the atomic writers), which replaces
    a link instead of writing through it, so the local files are never touched. The copy is a sibling
    named like every staging directory of :mod:`hf_lrp_surgery.io`, so one left by a killed process
    is removed by the next push or save next to it; where the parent is read-only it goes to the
    system's temporary directory.

    Args:
        directory: The local corrected model.

    Yields:
        The staging directory (``.git`` left out, as ``upload_folder`` ignores it).
    """
    source = Path(os.path.abspath(directory))
    try:
        staging = staging_directory(source)
    except OSError:
        staging = Path(tempfile.mkdtemp(prefix="hf_lrp_surgery-push-"))
    try:
        for folder, subfolders, files in os.walk(source, followlinks=True):
            subfolders[:] = [name for name in subfolders if name != ".git"]
            target = staging / Path(folder).relative_to(source)
            target.mkdir(exist_ok=True)
            for name in files:
                _link_or_copy(Path(folder) / name, target / name)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """``value`` (parsed JSON) with ``change`` applied to every string in it."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {key: _map_strings(item, change) for key, item in value.items()}
    return value


def _replace_all(text: str, names: Mapping[str, str]) -> str:
    """``text`` with every key of ``names`` replaced by its value."""
    for local in sorted(names, key=len, reverse=True):  # longest first: a path before its parents
        text = text.replace(local, names[local])
    return text


def _publish_names(root: Path, carrier: str, hub_base: str | None) -> None:
    """Rewrite an upload copy so that it names no local absolute path, and an adapter names its Hub base.

    The files hf_lrp_surgery writes (``surgery/**/*.json``, ``adapter_config.json``) are searched for
    local absolute paths; the base model's (``base_model_name_or_path``) becomes ``hub_base`` when
    there is one, any other one ``./`` and its last component. The same replacements are made in
    ``README.md``. Tokenizer and model files are left alone (tokens may look like paths).

    Args:
        root: The upload copy (see :func:`_upload_copy`).
        carrier: The carrier's name.
        hub_base: The base model's Hub id (see :func:`_hub_base`).
    """
    config_name = get_carrier(carrier).base_config
    own = [root / config_name] if config_name else []
    documents = {path: json.loads(path.read_text()) for path in [*own, *sorted((root / SURGERY_DIR).rglob("*.json"))]}
    found: set[str] = set()

    def collect(text: str) -> str:
        found.update(_LOCAL_PATH.findall(text))
        if text.startswith(("/", "~/")) and "\n" not in text:  # a whole path, spaces and all
            found.add(text)
        return text

    for document in documents.values():
        _map_strings(document, collect)
    bases = {documents[path].get(_BASE_KEY) for path in (*own, root / _CHECK_FILE)}
    names = {path: hub_base if hub_base and path in bases else f"./{Path(path).name}" for path in found}
    for path, document in documents.items():
        public = _map_strings(document, lambda text: _replace_all(text, names))
        if own and path in (*own, root / _CHECK_FILE):
            public[_BASE_KEY] = hub_base
        if public != document:
            write_json_atomic(path, public)
    readme = root / "README.md"
    if readme.is_file() and names:
        text = readme.read_text(encoding="utf-8")
        public_text = _replace_all(text, names)
        if public_text != text:
            write_text_atomic(readme, public_text)


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

    The upload is built in a staging copy (hard links; only the rewritten small files are new): the
    card, the adapter's Hub base and the public names of local paths go there, never into the local
    directory, which is left exactly as it was whether the push fails or succeeds (so a model saved
    with a local base path still loads offline with ``load_corrected``). Run
    :func:`~hf_lrp_surgery.modelcard.write_card` to keep a card locally. In everything uploaded
    (``surgery/*.json``, ``adapter_config.json``, ``README.md``) a local absolute path is replaced:
    the base model's by its Hub id (``base_model``, or the adapter's saved Hub id), any other by
    ``./`` and its last component.

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
        base_model: Hub id of the base model: shown on the card, written into the uploaded
            ``adapter_config.json`` and ``surgery/check.json`` of an adapter where they name something
            else (e.g. the local path it was loaded from), so that others load the adapter on the right
            base, and in place of the base model's local path in every uploaded file.
        license: The card's license (usually the base model's).
        card: Upload a fresh ``README.md`` built by :func:`~hf_lrp_surgery.modelcard.write_card` (in the
            staging copy); options stored by an earlier ``write_card`` / ``card_from_recipe`` are kept.
            ``False`` uploads the directory's README as it is (local paths replaced).
        tokenizer: Saved with a ``CorrectedModel`` (ignored for a directory).
        local_dir: Where a ``CorrectedModel`` is saved, without a card (default: a temporary directory,
            removed after a successful push and kept after a failed one).

    Returns:
        The ``CommitInfo`` (a ``str``: the commit URL; ``.oid``, ``.repo_url``, ``.pr_url``).

    Raises:
        PushError: The push failed (``reason``: network, offline, auth, conflict, rejected); the
            message names the local copy (unchanged) and the command that retries.
        PublishError: The directory is not a saved corrected model, or an adapter's base model is a
            local path and no ``base_model`` was given (raised before any network call).
        CardError: The card cannot be built (see :func:`~hf_lrp_surgery.modelcard.write_card`).

    Example:
        >>> push_to_hub("runs/detox/adapter", "me/smollm2-detox-ia3",  # doctest: +SKIP
        ...             base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    """
    temporary: Path | None = None
    if isinstance(directory_or_corrected, CorrectedModel):
        if local_dir is None:
            temporary = Path(tempfile.mkdtemp(prefix="hf_lrp_surgery-push-"))
            directory = temporary / repo_id.split("/")[-1]
        else:
            directory = Path(local_dir)
        directory_or_corrected.save(directory, tokenizer=tokenizer, base_model_name_or_path=base_model)
    else:
        directory = Path(directory_or_corrected)
    api = HfApi(endpoint=endpoint, token=token)
    with contextlib.ExitStack() as stack:
        try:
            _, carrier, _, saved_base = read_surgery(directory)
            hub_base = _hub_base(directory, carrier, saved_base, base_model)
            upload = stack.enter_context(_upload_copy(directory))
            _publish_names(upload, carrier, hub_base)
            if card:
                write_card(upload, repo_id=repo_id, base_model=base_model, license=license)
        except FileNotFoundError as err:
            _remove(temporary)
            raise PublishError(f"{directory} is not a saved corrected model: {err}") from err
        except BaseException:  # a set-up mistake: nothing was pushed, so the temporary copy has nothing to retry
            _remove(temporary)
            raise
        carrier_card = get_carrier(carrier).card
        what = carrier_card.kind if carrier_card else carrier
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=upload,
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
    cache = None if cache_dir is None else Path(cache_dir)

    def download(name: str, rev: str | None) -> Path:
        try:
            return Path(api.snapshot_download(name, revision=rev, cache_dir=cache))
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
    if get_carrier(carrier).base_config and base is not None and not Path(base).is_dir():
        base = str(download(base, None))
    return load_corrected(local, via=via, base_model=base, adapter_enabled=adapter_enabled, dtype=dtype)


__getattr__ = moved_names(__name__, {"register": "hf_lrp_surgery.cli.hub:register"})
