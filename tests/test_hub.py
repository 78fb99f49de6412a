"""Publishing: model cards, push to a Hub and loading back, against a Hub-protocol server on 127.0.0.1.

A tiny random Llama is corrected (10 neurons and 2 heads), measured before and after with the
evaluation harness, and laid out like a recipe's output (``report.json``, plots, ``mask/``,
``baked/``, ``adapter/``). The fake Hub (``hub_server.FakeHub``) runs in this process; the client
side runs in a subprocess (``python tests/test_hub.py WORKDIR``) with ``HF_ENDPOINT`` pointing at it,
because huggingface_hub binds its endpoint and offline flag at import and the suite runs with
``HF_HUB_OFFLINE=1``. The subprocess pushes the base model with the stock client, pushes both forms
with :func:`push_to_hub` and the ``push`` command, loads them back with stock ``from_pretrained`` /
``PeftModel.from_pretrained`` and with :func:`load_from_hub`, parses the cards with
``ModelCard.load``, and tries an unreachable endpoint, a rejected token and rejected card metadata,
also with an adapter saved with a local base path (whose local copy must not change, pushed or
not). This process checks the logits against the local corrected models, the cards' metadata
against the report, the server's state, and that no uploaded file names a local path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
BASE = "tester/tiny-base"
BAKED = "tester/tiny-baked"
ADAPTER = "tester/tiny-adapter"
FROM_MEMORY = "tester/tiny-from-memory"
LOCAL_BASE = "tester/tiny-adapter-saved-with-a-local-base"
REJECTED = "tester/tiny-rejected"
PROBE = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 30, 31, 32]])
SAMPLES = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12], [1, 20, 21, 22, 23]]
PROMPTS = ["the cat sat on the", "hello world", "the dog was very", "one two three", "a big red", "the sun and"]
TOLERANCE = 1e-5


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def _digest(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``directory`` except ``skip`` (paths relative to it)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and str(p.relative_to(directory)) not in skip
    }


def _staging_left(directory: Path) -> list[str]:
    """Staging copies of ``directory`` left next to it (``.NAME.tmp-PID-*``)."""
    return [p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}.")]


def _with_local_base(adapter: Path, copy: Path, base: Path) -> Path:
    """A copy of ``adapter`` whose config and check record name its base by the absolute path ``base``."""
    shutil.copytree(adapter, copy)
    for name in ("adapter_config.json", "surgery/check.json"):
        record = json.loads((copy / name).read_text())
        (copy / name).write_text(json.dumps({**record, "base_model_name_or_path": str(base.resolve())}, indent=2))
    return copy


def _holding(files: dict[str, bytes], text: str) -> list[str]:
    """The files whose bytes contain ``text``."""
    return sorted(path for path, content in files.items() if text.encode() in content)


# -- the corrected tiny model, laid out like a recipe's output ---------------------------------
@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> dict[str, Any]:
    """A recipe output directory built from real measurements, and the local logits of every form."""
    from tiny_models import tiny_model
    from tiny_tokenizer import WORDS, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from hf_lrp_surgery.carriers import apply_masks
    from hf_lrp_surgery.correction import FrontierPoint, RecipeResult, repetition_behaviour
    from hf_lrp_surgery.evaluation import generate, next_token_kl, perplexity
    from hf_lrp_surgery.masks import select
    from hf_lrp_surgery.plots import plot_frontier, plot_mask_per_layer
    from hf_lrp_surgery.scoring import score

    work = tmp_path_factory.mktemp("hub")
    tokenizer = tiny_tokenizer()
    base = tiny_model("llama", dtype=torch.float32)
    base.resize_token_embeddings(len(WORDS))
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    model = AutoModelForCausalLM.from_pretrained(work / "base").eval()
    scores = score(model, SAMPLES, components=("neurons", "heads"), progress=False)
    masks = [select(scores, "neurons", 10), select(scores, "heads", 2)]
    baked = apply_masks(model, masks, "bake")
    adapter = apply_masks(model, masks, "adapter")

    behaviour = repetition_behaviour(max_new_tokens=8, use_chat_template=False)
    before = behaviour.measure(generate(model, tokenizer, PROMPTS, behaviour.decoding, progress=False))
    after = behaviour.measure(generate(baked.model, tokenizer, PROMPTS, behaviour.decoding, progress=False))
    ppl_before = perplexity(model, tokenizer, PROMPTS, progress=False)
    ppl_after = perplexity(baked.model, tokenizer, PROMPTS, progress=False)
    kl = next_token_kl(model, baked.model, tokenizer, PROMPTS, progress=False)
    frontier = [
        FrontierPoint(0, before, 0.0, ppl_before, 0.0, True),
        FrontierPoint(12, after, kl, ppl_after, ppl_after / ppl_before - 1, True),
    ]
    result = RecipeResult(
        "repetition",
        {
            "budgets": [12],
            "granularity": "neurons",
            "method": "lrp",
            "normalize": "total",
            "protect_top": 0.05,
            "seed": "logit",
            "limits": {"max_kl": 10.0, "max_perplexity_increase": 10.0},
            "scope": "global",
            "modules": None,
            "decoding": behaviour.decoding.to_dict(),
        },
        {"undesired": 3, "desired": 3},
        frontier,
        12,
        {
            "before": {**before, "perplexity": ppl_before},
            "after": {
                **after,
                "perplexity": ppl_after,
                "kl": kl,
                "perplexity_increase": ppl_after / ppl_before - 1,
                "within_limits": True,
            },
        },
    )
    out = work / "recipe"
    out.mkdir()
    (out / "report.json").write_text(json.dumps(result.to_json(), indent=2))
    plot_frontier(frontier, behaviour.primary, out / "effect_vs_budget.png", chosen=12)
    plot_mask_per_layer(masks, out / "mask_per_layer.png")
    masks[0].save(out / "mask")
    baked.save(out / "baked", tokenizer=tokenizer)
    adapter.save(out / "adapter", tokenizer=tokenizer, base_model_name_or_path=BASE)
    logits = {"original": _logits(model), "baked": _logits(baked.model), "adapter": _logits(adapter.model)}
    assert (logits["baked"] - logits["original"]).abs().max() > 1e-3, "the masks must change the output"
    return {"work": work, "dir": out, "report": result.to_json(), "masks": masks, "logits": logits}


# -- cards, locally ---------------------------------------------------------------------------
def test_recipe_cards_carry_metadata_results_and_mask(recipe: dict[str, Any], tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from hf_lrp_surgery.modelcard import CARD_MARKER, card_from_recipe

    out = tmp_path / "recipe"
    shutil.copytree(recipe["dir"], out)
    assert "More Information Needed" in (out / "adapter" / "README.md").read_text(), "PEFT writes its template first"
    (out / "baked" / "README.md").write_text("---\nlicense: mit\n---\nNotes a person wrote about this model.\n")
    written = card_from_recipe(out, base_model=BASE, repo_ids={"baked": BAKED, "adapter": ADAPTER})
    assert set(written) == {"baked", "adapter"}
    report = recipe["report"]
    for form, relation, repo in (("baked", "finetune", BAKED), ("adapter", "adapter", ADAPTER)):
        card = ModelCard.load(written[form])
        data = card.data
        assert data.base_model == BASE and data.base_model_relation == relation
        assert {"hf-lrp-surgery", "lrp", "pruning", "repetition-reduction"} <= set(data.tags)
        assert not any(t.startswith("base_model:") for t in data.tags)
        assert data.model_name == repo.split("/")[1]
        values = {(r.metric_type, r.metric_config): r.metric_value for r in data.eval_results}
        for key in ("rur_mean", "loop_rate", "perplexity"):
            assert values[(key, None)] == pytest.approx(report["heldout"]["after"][key])
            assert values[(key, "before")] == pytest.approx(report["heldout"]["before"][key])
        assert values[("kl", None)] == pytest.approx(report["heldout"]["after"]["kl"])
        assert {r.dataset_split for r in data.eval_results} == {"heldout"}
        text = card.text
        assert text.lstrip().startswith(CARD_MARKER) and "More Information Needed" not in text
        assert f'from_pretrained("{repo}")' in text and "hf-lrp-surgery fix-repetition" in text
        for layer, count in enumerate(recipe["masks"][0].per_layer()):
            assert f"| {layer} | {count} | 48 |" in text
        for layer, count in enumerate(recipe["masks"][1].per_layer()):
            assert f"| {layer} | {count} | 4 |" in text
        for plot in ("effect_vs_budget.png", "mask_per_layer.png"):
            assert f"(surgery/{plot})" in text and (out / form / "surgery" / plot).is_file()
        assert json.loads((out / form / "surgery" / "report.json").read_text()) == report
    adapter_card = ModelCard.load(written["adapter"])
    assert adapter_card.data.library_name == "peft" and "peft" in adapter_card.data.tags
    baked_card = ModelCard.load(written["baked"])
    assert baked_card.data.license == "mit" and "Notes a person wrote about this model." in baked_card.text

    # Rebuilding (as a push does, with the stored options) changes nothing and keeps the person's notes once.
    from hf_lrp_surgery.modelcard import write_card

    first = written["baked"].read_text()
    write_card(out / "baked")
    assert written["baked"].read_text() == first and first.count("Notes a person wrote") == 1


@pytest.mark.parametrize(
    "behaviour,options",
    [
        ("toxicity", {"focus": False, "scorer": "unitary/toxic-bert", "threshold": 0.7}),
        ("repetition", {"focus": True, "decoding": {"use_chat_template": False}}),
    ],
)
def test_recipe_command_in_the_card_repeats_the_run(behaviour: str, options: dict[str, Any]) -> None:
    """The card's reproduce command parses with the CLI and gives back the run's settings."""
    import shlex

    from hf_lrp_surgery.cli import build_parser
    from hf_lrp_surgery.modelcard import _recipe_command

    settings = {
        "model": "smollm2-135m-instruct",
        "budgets": [10, 50],
        "granularity": "neurons",
        "method": "wanda",
        "normalize": "layer",
        "protect_top": 0.1,
        "seed": "logprob",
        "scope": "per_layer",
        "limits": {"max_kl": 0.01, "max_perplexity_increase": 0.02},
        **options,
    }
    command = _recipe_command({"behaviour": behaviour, "settings": settings}, "org/base")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.model, args.budgets, args.method, args.normalize) == (
        "smollm2-135m-instruct",
        [10, 50],
        "wanda",
        "layer",
    )
    assert (args.protect_top, args.objective, args.scope, args.max_kl) == (0.1, "logprob", "per_layer", 0.01)
    renamed = {**{k: v for k, v in settings.items() if k != "seed"}, "objective": "logprob"}  # a newer report
    assert "--objective logprob" in _recipe_command({"behaviour": behaviour, "settings": renamed}, "org/base")
    assert args.no_focus is not settings["focus"] and args.base_model_id == "org/base"
    if behaviour == "toxicity":
        assert (args.scorer, args.threshold) == ("unitary/toxic-bert", 0.7)
    else:
        assert args.no_chat_template


def test_a_new_behaviour_reaches_the_card_through_the_report(recipe: dict[str, Any], tmp_path: Path) -> None:
    """The card knows no behaviour by name: tags, goal, metrics, scorer and command come from report.json."""
    from huggingface_hub import ModelCard

    from hf_lrp_surgery.modelcard import _recipe_command, write_card

    toy = {
        "name": "toy-keyword",
        "command": "fix-toy",
        "tags": ["toy-fix"],
        "goal": "say bad less often",
        "prompt_set": "toy_prompts",
        "metrics": [{"key": "bad_rate", "title": "Share saying bad", "lower_is_better": True, "dataset": None}],
        "primary": "bad_rate",
        "scorer": "Keyword scorer, threshold {threshold}.",
        "options": [
            {
                "flag": "--threshold",
                "parameter": "threshold",
                "setting": "threshold",
                "default": 0.5,
                "help": "",
                "kind": "float",
            }
        ],
    }
    heldout = {"before": {"bad_rate": 0.5, "perplexity": 30.0}, "after": {"bad_rate": 0.25, "perplexity": 31.0}}
    report = {
        **recipe["report"],
        "behaviour": "toy-keyword",
        "behaviour_metadata": toy,
        "heldout": heldout,
        "settings": {**recipe["report"]["settings"], "threshold": 0.7},
    }
    baked = tmp_path / "baked"
    shutil.copytree(recipe["dir"] / "baked", baked)
    card = ModelCard.load(write_card(baked, report=report))
    assert "toy-fix" in card.data.tags and "repetition-reduction" not in card.data.tags
    values = {(r.metric_type, r.metric_config, r.dataset_type): r.metric_value for r in card.data.eval_results}
    assert values[("bad_rate", None, "hf_lrp_surgery/toy_prompts")] == 0.25
    assert values[("bad_rate", "before", "hf_lrp_surgery/toy_prompts")] == 0.5
    assert "pruned to say bad less often" in card.text
    assert "| Share saying bad | `toy_prompts` | 0.5 | 0.25 |" in card.text
    assert "Keyword scorer, threshold 0.7." in card.text
    command = _recipe_command(report, "org/base")
    assert command.startswith("hf-lrp-surgery fix-toy ") and "--threshold 0.7" in command


def test_card_command_writes_a_card_into_each_form(
    recipe: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from huggingface_hub import ModelCard

    from hf_lrp_surgery.cli.hub import register

    out = tmp_path / "recipe"
    shutil.copytree(recipe["dir"], out)
    parser = argparse.ArgumentParser(prog="hf-lrp-surgery")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["card", str(out), "--base-model", BASE, "--adapter-repo-id", ADAPTER, "--license", "mit"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    for form in ("baked", "adapter"):
        assert str(out / form / "README.md") in printed
        assert ModelCard.load(out / form / "README.md").data.license == "mit"
    assert f'"{ADAPTER}"' in (out / "adapter" / "README.md").read_text()
    assert "<namespace>/<repo-name>" in (out / "baked" / "README.md").read_text(), "no repo id given for baked/"


def test_cards_refuse_what_cannot_be_published(recipe: dict[str, Any], tmp_path: Path) -> None:
    from hf_lrp_surgery.exceptions import CardError, PublishError
    from hf_lrp_surgery.hub import push_to_hub
    from hf_lrp_surgery.modelcard import card_from_recipe, write_card

    with pytest.raises(CardError, match="not a saved corrected model"):
        write_card(recipe["work"] / "base")
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "report.json").write_text(json.dumps({**recipe["report"], "chosen_budget": 0}))
    with pytest.raises(CardError, match="no budget within"):
        card_from_recipe(empty)
    # An adapter that names its base by a local path cannot be loaded by anyone else: refused before any upload.
    local = tmp_path / "adapter"
    shutil.copytree(recipe["dir"] / "adapter", local)
    config = json.loads((local / "adapter_config.json").read_text())
    (local / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path)}))
    check = json.loads((local / "surgery" / "check.json").read_text())
    (local / "surgery" / "check.json").write_text(json.dumps({**check, "base_model_name_or_path": str(tmp_path)}))
    before = _digest(local)
    with pytest.raises(PublishError, match="local path"):
        push_to_hub(local, ADAPTER, endpoint="http://127.0.0.1:9")
    assert _digest(local) == before


def test_push_without_network_access_says_why(recipe: dict[str, Any], tmp_path: Path) -> None:
    """This process runs with huggingface_hub's offline flag (as the suite does) or, without it, no server."""
    from huggingface_hub import constants

    from hf_lrp_surgery.exceptions import PushError
    from hf_lrp_surgery.hub import push_to_hub

    local = tmp_path / "baked"
    shutil.copytree(recipe["dir"] / "baked", local)
    with pytest.raises(PushError) as caught:
        push_to_hub(local, BAKED, endpoint=f"http://127.0.0.1:{_free_port()}", card=False)
    expected = ("offline", "HF_HUB_OFFLINE") if constants.HF_HUB_OFFLINE else ("network", "cannot reach")
    assert caught.value.reason == expected[0] and expected[1] in str(caught.value)
    assert f"hf-lrp-surgery push {local} {BAKED}" in str(caught.value)
    assert _digest(local) == _digest(recipe["dir"] / "baked")


class _StubApi:
    """Stands in for ``HfApi``: keeps what ``upload_folder`` was given, and rejects the upload if told to."""

    endpoint = "http://stub.invalid"
    uploads: list[dict[str, Any]] = []
    reject = False

    def __init__(self, endpoint: str | None = None, token: str | None = None) -> None:
        pass

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        pass

    def upload_folder(self, *, folder_path: Path, **kwargs: Any) -> str:
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
        _StubApi.uploads.append(
            {
                "folder": folder,
                "contents": {name: path.read_bytes() for name, path in files.items()},
                "inodes": {name: path.stat().st_ino for name, path in files.items()},
            }
        )
        if _StubApi.reject:
            raise ValueError("the stub Hub rejects this upload")
        return "http://stub.invalid/commit/0"


def test_push_uploads_a_linked_staging_copy_with_public_names(
    recipe: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights are hard links, only the rewritten small files are new, and the local files never change."""
    from hf_lrp_surgery import hub as hub_module
    from hf_lrp_surgery.carriers import load_corrected
    from hf_lrp_surgery.exceptions import PushError
    from hf_lrp_surgery.modelcard import card_from_recipe

    monkeypatch.setattr(hub_module, "HfApi", _StubApi)
    monkeypatch.setattr(_StubApi, "uploads", [])
    base = str(recipe["work"] / "base")
    out = tmp_path / "recipe"
    shutil.copytree(recipe["dir"], out)
    report = json.loads((out / "report.json").read_text())
    report["settings"]["model"] = base  # the recipe ran on a local directory: its reproduce command names it
    (out / "report.json").write_text(json.dumps(report))
    card_from_recipe(out)
    assert f"--model {base}" in (out / "baked" / "README.md").read_text()
    adapter = _with_local_base(out / "adapter", tmp_path / "adapter", recipe["work"] / "base")

    for directory, base_model, public_base in ((out / "baked", None, "./base"), (adapter, BASE, BASE)):
        before = _digest(directory)
        hub_module.push_to_hub(directory, BAKED, base_model=base_model)
        upload = _StubApi.uploads[-1]
        assert upload["folder"].parent == directory.parent and upload["folder"].name.startswith(f".{directory.name}.")
        assert _digest(directory) == before and not _staging_left(directory)
        weights = "model.safetensors" if base_model is None else "adapter_model.safetensors"
        assert upload["inodes"][weights] == (directory / weights).stat().st_ino, "weights are linked, not copied"
        assert upload["inodes"]["tokenizer.json"] == (directory / "tokenizer.json").stat().st_ino
        assert upload["inodes"]["surgery/check.json"] != (directory / "surgery" / "check.json").stat().st_ino
        assert not _holding(upload["contents"], str(tmp_path)) and not _holding(upload["contents"], base)
        assert json.loads(upload["contents"]["surgery/check.json"])["base_model_name_or_path"] == public_base
        for name in ("README.md", "surgery/card.json"):
            assert f"--model {public_base}" in upload["contents"][name].decode(), name
        assert json.loads(upload["contents"]["surgery/report.json"])["settings"]["model"] == public_base
    assert json.loads(upload["contents"]["adapter_config.json"])["base_model_name_or_path"] == BASE
    assert load_corrected(adapter).base_model.model.config.name_or_path == base, "the local copy is unchanged"

    # A rejected upload: the same, and an error that says the local copy is intact (now it is).
    monkeypatch.setattr(_StubApi, "reject", True)
    before = _digest(adapter)
    with pytest.raises(PushError, match="local copy is intact") as caught:
        hub_module.push_to_hub(adapter, BAKED, base_model=BASE)
    assert caught.value.reason == "rejected" and caught.value.directory == adapter
    assert _digest(adapter) == before and not _staging_left(adapter)


# -- the round trip through the fake Hub ------------------------------------------------------
@pytest.fixture(scope="module")
def hub() -> Any:
    from hub_server import FakeHub

    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def published(recipe: dict[str, Any], hub: Any) -> dict[str, Any]:
    """Run the client side in a subprocess; returns its results, the logits it saw and the wall time."""
    from safetensors.torch import load_file

    from hf_lrp_surgery.modelcard import card_from_recipe

    card_from_recipe(recipe["dir"], base_model=BASE, repo_ids={"baked": BAKED, "adapter": ADAPTER})
    work = recipe["work"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_TOKEN_PATH",
            "HF_HUB_ETAG_TIMEOUT",
        )
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(work / "hf_home"),
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=hub.token,
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(work)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {
        "results": json.loads((work / "results.json").read_text()),
        "logits": load_file(work / "logits.safetensors"),
        "seconds": time.perf_counter() - start,
    }


def test_both_forms_load_from_the_hub_with_stock_loaders(recipe: dict[str, Any], published: dict[str, Any]) -> None:
    local, hub_logits = recipe["logits"], published["logits"]
    assert torch.equal(hub_logits["baked_transformers"], local["baked"])
    for name in ("adapter_transformers", "adapter_peft", "memory_peft"):
        assert (hub_logits[name] - local["adapter"]).abs().max() <= TOLERANCE, name
        assert (hub_logits[name] - local["baked"]).abs().max() <= TOLERANCE, name
    for name in ("adapter_transformers_off", "adapter_peft_off"):
        assert torch.equal(hub_logits[name], local["original"]), name


def test_load_from_hub_verifies_and_switches_the_adapter_off(recipe: dict[str, Any], published: dict[str, Any]) -> None:
    local, hub_logits, results = recipe["logits"], published["logits"], published["results"]
    assert torch.equal(hub_logits["verified_baked"], local["baked"])
    assert (hub_logits["verified_adapter"] - local["adapter"]).abs().max() <= TOLERANCE
    assert (hub_logits["verified_adapter_transformers"] - local["adapter"]).abs().max() <= TOLERANCE
    assert torch.equal(hub_logits["verified_adapter_off"], local["original"])
    not_published = results["not_published"]
    assert not_published["type"] == "ModelLoadError" and "surgery/check.json" in not_published["message"]
    # The baked repo is private: without a token it is not found, with one it loads.
    assert results["private_without_token"]["type"] == "ModelLoadError"
    assert "RepositoryNotFoundError" in results["private_without_token"]["message"]


def test_pushed_cards_parse_back_with_metadata(recipe: dict[str, Any], published: dict[str, Any]) -> None:
    report = recipe["report"]
    for repo, relation, library in ((BAKED, "finetune", "transformers"), (ADAPTER, "adapter", "peft")):
        data = published["results"]["cards"][repo]
        assert data["base_model"] == BASE and data["base_model_relation"] == relation
        assert data["library_name"] == library and data["pipeline_tag"] == "text-generation"
        assert {"hf-lrp-surgery", "lrp", "pruning", "repetition-reduction"} <= set(data["tags"])
        (index,) = data["model-index"]
        assert index["name"] == repo.split("/")[1]
        metrics = {(m["type"], m.get("config")): m["value"] for r in index["results"] for m in r["metrics"]}
        assert metrics[("rur_mean", None)] == pytest.approx(report["heldout"]["after"]["rur_mean"])
        assert metrics[("rur_mean", "before")] == pytest.approx(report["heldout"]["before"]["rur_mean"])
        assert metrics[("kl", None)] == pytest.approx(report["heldout"]["after"]["kl"])
        datasets = {(r["dataset"]["type"], r["dataset"]["split"]) for r in index["results"]}
        assert datasets == {
            (f"hf_lrp_surgery/{name}", "heldout") for name in ("repetition_prompts", "general_text", "neutral_prompts")
        }
    # A pushed CorrectedModel without a report still gets a card with the base model and its relation.
    memory = published["results"]["cards"][FROM_MEMORY]
    assert memory["base_model"] == BASE and memory["base_model_relation"] == "adapter" and "model-index" not in memory


def test_the_hub_holds_the_manifest_and_exactly_one_form(
    recipe: dict[str, Any], published: dict[str, Any], hub: Any
) -> None:
    baked, adapter = hub.repos[BAKED], hub.repos[ADAPTER]
    assert baked.private and not adapter.private
    local = _digest(recipe["dir"] / "baked", skip=("surgery/check.json",))
    remote = {
        p: hashlib.sha256(c).hexdigest()
        for p, c in baked.files("main").items()
        if p not in (".gitattributes", "surgery/check.json")
    }
    assert remote == local, "the baked repo must hold exactly the local directory, surgery/ included"
    # ... except the local path of the base model in check.json, which becomes its bare name.
    check = json.loads((recipe["dir"] / "baked" / "surgery" / "check.json").read_text())
    assert check["base_model_name_or_path"] == str(recipe["work"] / "base")
    remote_check = json.loads(baked.files("main")["surgery/check.json"])
    assert remote_check == {**check, "base_model_name_or_path": "./base"}
    files = adapter.files("main")
    assert {
        "surgery/neurons/mask.json",
        "surgery/heads/mask.safetensors",
        "surgery/check.json",
        "surgery/report.json",
        "surgery/effect_vs_budget.png",
        "adapter_config.json",
        "adapter_model.safetensors",
    } <= set(files)
    # The adapter repo first got the baked model by mistake; the adapter push removed the baked files.
    assert not {"model.safetensors", "config.json", "generation_config.json"} & set(files)
    assert any(
        m == "hf_lrp_surgery: corrected model (baked checkpoint) with its mask manifest"
        for m in adapter.messages.values()
    )
    assert adapter.messages[adapter.head] == "adapter via the CLI"
    assert published["results"]["cli_rc"] == 0 and ADAPTER in published["results"]["cli_stdout"]


def test_failed_pushes_keep_the_local_copy_and_say_how_to_retry(published: dict[str, Any], hub: Any) -> None:
    results = published["results"]
    unreachable, auth = results["unreachable"], results["auth"]
    assert unreachable["type"] == "PushError" and unreachable["reason"] == "network"
    assert "cannot reach the Hub" in unreachable["message"] and "local copy is intact" in unreachable["message"]
    assert unreachable["retry_command"].startswith("hf-lrp-surgery push ")
    assert unreachable["retry_command"] in unreachable["message"] and "--endpoint" in unreachable["retry_command"]
    assert unreachable["unchanged"] and unreachable["seconds"] < 60
    assert auth["type"] == "PushError" and auth["reason"] == "auth" and "HTTP 401" in auth["message"]
    assert "HF_TOKEN" in auth["message"] and auth["retry_command"] in auth["message"] and auth["unchanged"]
    assert "hf_wrong_token" not in auth["message"], "a token must never appear in an error message"
    assert "tester/never-created" not in hub.repos


def test_a_push_never_changes_the_local_directory(recipe: dict[str, Any], published: dict[str, Any], hub: Any) -> None:
    """An adapter saved with a local base path, pushed with --base-model: unreachable, rejected, then pushed."""
    results, local, hub_logits = published["results"], recipe["logits"], published["logits"]
    unreachable, rejected = results["unreachable_adapter"], results["rejected"]
    assert unreachable["type"] == "PushError" and unreachable["reason"] == "network" and unreachable["unchanged"]
    assert "local copy is intact" in unreachable["message"] and f"--base-model {BASE}" in unreachable["message"]
    assert rejected["type"] == "PushError" and rejected["reason"] == "rejected" and rejected["unchanged"]
    assert "the Hub rejected" in rejected["message"] and "local copy is intact" in rejected["message"]
    assert list(hub.repos[REJECTED].messages.values()) == ["initial commit"], "the rejected commit changed nothing"
    # The local copy still names its local base, so it loads offline after the failures as before them.
    assert (hub_logits["local_base_after_failures"] - local["adapter"]).abs().max() <= TOLERANCE
    # The successful push leaves it as it was too, and the Hub copy names the Hub base and loads from there.
    assert results["pushed_unchanged"]
    assert (hub_logits["verified_local_base"] - local["adapter"]).abs().max() <= TOLERANCE


def test_no_uploaded_file_names_a_local_path(recipe: dict[str, Any], published: dict[str, Any], hub: Any) -> None:
    local_prefix = str(recipe["work"].resolve().parent)
    for repo_id in (BAKED, ADAPTER, FROM_MEMORY, LOCAL_BASE):
        files = hub.repos[repo_id].files("main")
        assert not _holding(files, local_prefix), repo_id
        assert not _holding(files, "hf_lrp_surgery-push-"), repo_id
    files = hub.repos[LOCAL_BASE].files("main")
    for name in ("adapter_config.json", "surgery/check.json"):
        assert json.loads(files[name])["base_model_name_or_path"] == BASE, name
    assert "base_model: tester/tiny-base" in files["README.md"].decode()


def test_fake_hub_rejects_what_the_hub_rejects(hub: Any) -> None:
    """The test double refuses what the real Hub refuses where the code relies on it."""
    import urllib.error
    import urllib.request

    def call(
        method: str, path: str, body: Any = None, token: str | None = hub.token, content_type: str = "application/json"
    ) -> int:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(
            hub.url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})},
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    create = {"name": "honesty", "organization": None}
    assert call("POST", "/api/repos/create", create, token=None) == 401
    assert call("POST", "/api/repos/create", create, token="hf_wrong") == 401
    assert call("POST", "/api/repos/create", {"name": "x", "organization": "someone-else"}) == 403
    assert call("POST", "/api/repos/create", {**create, "visibility": "private"}) == 200
    assert call("POST", "/api/repos/create", create) == 409
    assert call("GET", "/api/models/tester/honesty/revision/main", token=None) == 401  # private
    head = hub.repos["tester/honesty"].head

    def commit(*lines: dict[str, Any]) -> int:
        return call(
            "POST",
            "/api/models/tester/honesty/commit/main",
            b"".join(json.dumps(x).encode() + b"\n" for x in lines),
            content_type="application/x-ndjson",
        )

    header = {"key": "header", "value": {"summary": "s", "parentCommit": head}}
    assert commit({"key": "header", "value": {"summary": "s", "parentCommit": "0" * 40}}) == 412
    assert commit(header, {"key": "lfsFile", "value": {"path": "a.bin", "algo": "sha256", "oid": "0" * 64}}) == 400
    assert commit(header, _file_line("README.md", "---\nbase_model: nobody/nothing\n---\ntext\n")) == 400
    assert hub.repos["tester/honesty"].head == head, "rejected commits must change nothing"
    assert commit(header, _file_line("a.txt", "hello")) == 200 and hub.repos["tester/honesty"].head != head


def _file_line(path: str, text: str) -> dict[str, Any]:
    """One NDJSON commit line adding a regular file."""
    content = base64.b64encode(text.encode()).decode()
    return {"key": "file", "value": {"path": path, "encoding": "base64", "content": content}}


# -- the client side (run as a subprocess) ----------------------------------------------------
def _error(err: Exception) -> dict[str, Any]:
    return {
        "type": type(err).__name__,
        "message": str(err),
        "reason": getattr(err, "reason", None),
        "retry_command": getattr(err, "retry_command", None),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client(work: Path) -> None:
    """Push, fail, push again, load back; write ``results.json`` and ``logits.safetensors`` into ``work``."""
    import argparse
    import contextlib
    import io

    from huggingface_hub import HfApi, ModelCard
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from hf_lrp_surgery.carriers import apply_masks, load_corrected, set_adapter_enabled
    from hf_lrp_surgery.cli.hub import register
    from hf_lrp_surgery.exceptions import ModelLoadError, PushError
    from hf_lrp_surgery.hub import load_from_hub, push_to_hub
    from hf_lrp_surgery.masks import Mask

    torch.set_num_threads(1)
    recipe = work / "recipe"
    results: dict[str, Any] = {}
    logits: dict[str, torch.Tensor] = {}
    api = HfApi()
    api.create_repo(BASE, exist_ok=True)
    api.upload_folder(repo_id=BASE, folder_path=work / "base", commit_message="the base model")

    # Failures first: nothing may change, locally (names and bytes, no staging copy left) or remotely. The
    # adapter saved with a local base path is the case where a push used to rewrite the local config.
    local_base = _with_local_base(recipe / "adapter", work / "adapter-local-base", work / "base")
    nowhere = f"http://127.0.0.1:{_free_port()}"
    for name, directory, repo_id, kwargs in (
        ("unreachable", recipe / "baked", BAKED, {"endpoint": nowhere}),
        ("auth", recipe / "baked", "tester/never-created", {"token": "hf_wrong_token"}),
        ("unreachable_adapter", local_base, LOCAL_BASE, {"endpoint": nowhere, "base_model": BASE}),
        ("rejected", local_base, REJECTED, {"base_model": "tester/not-on-this-hub"}),
    ):
        before = _digest(directory)
        start = time.perf_counter()
        try:
            push_to_hub(directory, repo_id, **kwargs)
            results[name] = {"type": None}
        except PushError as err:
            results[name] = _error(err)
        results[name]["seconds"] = time.perf_counter() - start
        results[name]["unchanged"] = _digest(directory) == before and not _staging_left(directory)
    logits["local_base_after_failures"] = _logits(load_corrected(local_base))  # still loads offline, on the local base
    before = _digest(local_base)
    push_to_hub(local_base, LOCAL_BASE, base_model=BASE)
    results["pushed_unchanged"] = _digest(local_base) == before and not _staging_left(local_base)

    push_to_hub(recipe / "baked", BAKED, private=True)
    push_to_hub(recipe / "baked", ADAPTER, card=False)  # the wrong form first: the adapter push must clean it up
    parser = argparse.ArgumentParser(prog="hf-lrp-surgery")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["push", str(recipe / "adapter"), ADAPTER, "--commit-message", "adapter via the CLI"])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        results["cli_rc"] = args.handler(args)
    results["cli_stdout"] = stdout.getvalue()
    model = AutoModelForCausalLM.from_pretrained(work / "base").eval()
    corrected = apply_masks(
        model, [Mask.load(recipe / "baked" / "surgery" / g) for g in ("neurons", "heads")], "adapter"
    )
    push_to_hub(corrected, FROM_MEMORY, base_model=BASE)

    # Stock loaders on repo ids.
    logits["baked_transformers"] = _logits(AutoModelForCausalLM.from_pretrained(BAKED).eval())
    via_transformers = AutoModelForCausalLM.from_pretrained(ADAPTER).eval()
    logits["adapter_transformers"] = _logits(via_transformers)
    set_adapter_enabled(via_transformers, False)
    logits["adapter_transformers_off"] = _logits(via_transformers)
    via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER).eval()
    logits["adapter_peft"] = _logits(via_peft)
    with via_peft.disable_adapter():
        logits["adapter_peft_off"] = _logits(via_peft)
    memory = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), FROM_MEMORY).eval()
    logits["memory_peft"] = _logits(memory)

    # Verified loading from repo ids.
    logits["verified_baked"] = _logits(load_from_hub(BAKED))
    logits["verified_adapter"] = _logits(load_from_hub(ADAPTER))
    logits["verified_adapter_transformers"] = _logits(load_from_hub(FROM_MEMORY, via="transformers"))
    logits["verified_adapter_off"] = _logits(load_from_hub(ADAPTER, adapter_enabled=False))
    logits["verified_local_base"] = _logits(load_from_hub(LOCAL_BASE))
    for name, call in (
        ("not_published", lambda: load_from_hub(BASE)),
        ("private_without_token", lambda: load_from_hub(BAKED, token=False, cache_dir=work / "empty")),
    ):
        try:
            call()
            results[name] = {"type": None}
        except ModelLoadError as err:
            results[name] = _error(err)

    results["cards"] = {repo: ModelCard.load(repo).data.to_dict() for repo in (BAKED, ADAPTER, FROM_MEMORY)}
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    save_file({k: v.contiguous() for k, v in logits.items()}, str(work / "logits.safetensors"))


if __name__ == "__main__":
    _client(Path(sys.argv[1]))
