"""``LRPSurgeryCallback`` with a real ``transformers.Trainer`` on tiny random models.

What must hold: relevance passes change nothing about training (weights bit-identical to a run
without the callback, gradients and train/eval flags as they were) and their running sums are the
sums of independent relevance passes on the weights of those steps; the summaries reach the logs;
masks stay exactly in place while Adam trains (weight entries zero, dead neurons' and heads' weights
frozen, everything else moving); surgery at the end gives the mask ``Surgeon`` gives on the final
model and saves a model that loads and verifies; a run resumed from a checkpoint ends with the same
relevance and masks as an uninterrupted one; two DDP processes give the single-process result on
the same samples, with identical masks and one writer; bad input fails with a clear error.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from _ddp_worker import GENERAL, UNDESIRED, TokenDataset, run
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, model_from_config, tiny_config, tiny_model
from tiny_tokenizer import tiny_tokenizer
from transformers import GPTJConfig, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from hf_lrp_surgery import Surgeon
from hf_lrp_surgery.carriers import apply_masks, load_corrected
from hf_lrp_surgery.exceptions import (
    BudgetError,
    FingerprintMismatchError,
    ModuleGroupError,
    OutputExistsError,
    ReferenceSetError,
    UnsupportedArchitectureError,
)
from hf_lrp_surgery.lrp import collect_relevance
from hf_lrp_surgery.masks import Mask, select
from hf_lrp_surgery.references.samples import ReferenceSample
from hf_lrp_surgery.scoring import score
from hf_lrp_surgery.training import (
    CORRECTED_DIR,
    STATE_DIR,
    LRPSurgeryCallback,
    MaskEnforcer,
    RelevanceAccumulator,
    TrainingSetupError,
    TrainingStateError,
)

pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]


def _args(out: Path, steps: int, **extra: Any) -> TrainingArguments:
    options = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=100,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    options.update(extra)
    return TrainingArguments(**options)


def _trainer(
    model: torch.nn.Module,
    args: TrainingArguments,
    callback: LRPSurgeryCallback | None,
    *others: TrainerCallback,
    eval_dataset: Any = None,
) -> Trainer:
    trainer = Trainer(
        model=model.train(), args=args, train_dataset=TokenDataset(), eval_dataset=eval_dataset, callbacks=list(others)
    )
    if callback is not None:
        callback.attach(trainer)
    return trainer


def _callback(**options: Any) -> LRPSurgeryCallback:
    return LRPSurgeryCallback(undesired=UNDESIRED, general=GENERAL, **options)


class _Recorder(TrainerCallback):
    """Records what a reporting integration would see, and the model at every step end."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.all_training: list[bool] = []

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: Any = None, **kw: Any) -> None:
        self.logs.append(dict(logs or {}))

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any
    ) -> None:
        self.snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.all_training.append(all(m.training for m in model.modules()))


class _Crash(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated interruption")


def _dropout_llama() -> torch.nn.Module:
    config = tiny_config("llama")
    config.attention_dropout = 0.2
    return model_from_config(config, dtype=torch.float64)


# -- relevance during training ------------------------------------------------------------------
def test_relevance_passes_leave_training_untouched_and_sum_up_the_passes(tmp_path: Path) -> None:
    """Dropout + gradient checkpointing: the weights equal a run without the callback; sums = independent passes."""
    recorder = _Recorder()
    callback = _callback(surgery=None, every_n_steps=1)
    args = _args(tmp_path / "a", 3, activation_checkpointing=True)
    _trainer(_dropout_llama(), args, callback, recorder).train()
    plain = _dropout_llama()
    _trainer(plain, _args(tmp_path / "b", 3, activation_checkpointing=True), None).train()
    trained = recorder.snapshots[3]
    assert all(torch.equal(trained[k], v) for k, v in plain.state_dict().items()), (
        "relevance passes changed the training trajectory (RNG, gradients or modes leaked)"
    )
    assert all(recorder.all_training), "the train/eval flags were not restored after a pass"
    assert callback.accumulator.steps == [1, 2, 3]

    reference = copy.deepcopy(plain).eval()
    expected = {"general": 0, "undesired": 0}
    for step in (1, 2, 3):
        reference.load_state_dict(recorder.snapshots[step])
        for name, samples in (("general", GENERAL), ("undesired", UNDESIRED)):
            expected[name] = (
                expected[name] + collect_relevance(reference, samples, components=("neurons",), progress=False).neurons
            )
    for name, samples in (("general", GENERAL), ("undesired", UNDESIRED)):
        assert callback.accumulator.counts[name] == 3 * len(samples)
        torch.testing.assert_close(callback.accumulator.sums[name]["neurons"], expected[name], rtol=1e-10, atol=1e-12)


def test_a_pass_sets_aside_gradients_and_restores_modes() -> None:
    """Called mid-step, a pass returns the very same .grad tensors with the same values and the same flags."""
    model = _dropout_llama().train()
    model(input_ids=torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss.backward()
    model.model.layers[1].eval()  # a deliberately mixed state must come back as it was
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in grads.items()}
    flags = {n: m.training for n, m in model.named_modules()}
    callback = _callback(surgery=None, every_n_steps=1)
    state, control = TrainerState(global_step=0, max_steps=10), TrainerControl()
    args = SimpleNamespace(output_dir="unused", fsdp="", deepspeed=None)
    callback.on_train_begin(args, state, control, model=model)
    state.global_step = 1
    callback.on_step_end(args, state, control, model=model)
    assert callback.accumulator.steps == [1] and control.should_log
    assert all(p.grad is grads[n] and torch.equal(p.grad, values[n]) for n, p in model.named_parameters())
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_summaries_reach_reporters_logs_and_evaluation_passes(tmp_path: Path) -> None:
    """attach() puts the summaries before the reporting integrations; passes also run after evaluation."""
    reporter = _Recorder()
    callback = _callback(surgery=None, every_n_steps=2, on_evaluate=True)
    args = _args(tmp_path, 5, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4)
    trainer = _trainer(tiny_model("llama", dtype=torch.float32), args, None, eval_dataset=TokenDataset(4))
    flow = next(i for i, cb in enumerate(trainer.callback_handler.callbacks) if isinstance(cb, DefaultFlowCallback))
    trainer.callback_handler.callbacks.insert(flow + 1, reporter)  # where TensorBoard / W&B callbacks live
    callback.attach(trainer)
    trainer.train()
    assert callback.accumulator.steps == [2, 3, 4, 5]  # every 2 steps, after the evaluation at 3, at the end
    logged = [entry for entry in trainer.state.log_history if "lrp/passes" in entry]
    assert [e["lrp/passes"] for e in logged] == [1.0, 3.0, 4.0]  # the pass after evaluation goes out with step 4's
    assert [e["step"] for e in logged] == [2, 4, 5]
    seen = [entry for entry in reporter.logs if "lrp/passes" in entry]
    assert [e["lrp/passes"] for e in seen] == [1.0, 3.0, 4.0]
    last = logged[-1]
    masses = [last[f"lrp/undesired_mass/layer_{i:02d}"] for i in range(2)]
    assert all(m >= 0 for m in masses) and sum(masses) > 0
    assert last["lrp/candidate_1/score"] <= last["lrp/candidate_2/score"] <= last["lrp/candidate_3/score"] < 0
    assert last["lrp/samples_general"] == 4 * len(GENERAL)


# -- masks while training ---------------------------------------------------------------------
def _initial_masks(model: torch.nn.Module) -> list[Mask]:
    weights = select(score(model, method="magnitude", components=("weights",)), "weights", 40)
    units = score(model, method="random", components=("neurons", "heads"), random_seed=3)
    return [weights, select(units, "neurons", 6), select(units, "heads", 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_masks_are_the_baked_model_and_starve_its_pruned_weights(family: str) -> None:
    """Every layout: hooked logits = baked logits; every weight the bake zeroes gets an exactly zero gradient."""
    model = tiny_model(family)
    units = score(model, method="random", components=("neurons", "heads"), random_seed=1)
    masks = [select(units, "neurons", 5), select(units, "heads", 1)]
    baked = apply_masks(model, masks, "bake").model
    ids = torch.tensor([[1, 5, 7, 9, 11, 3, 8, 4]])
    original = model(input_ids=ids).logits.detach()
    enforcer = MaskEnforcer(model)
    for mask in masks:
        enforcer.add(mask)
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, baked(input_ids=ids).logits, rtol=0, atol=1e-12)
    assert (logits.detach() - original).abs().max() > 1e-3
    logits.sum().backward()
    starved = 0
    for (name, param), kept in zip(model.named_parameters(), baked.parameters()):
        pruned = (kept == 0) & (param != 0)
        if pruned.any():
            assert param.grad is not None and bool((param.grad[pruned] == 0).all()), name
            starved += int(pruned.sum())
    assert starved > 0
    enforcer.remove()
    assert torch.equal(model(input_ids=ids).logits.detach(), original)


def test_masks_stay_exactly_in_place_while_adam_trains(tmp_path: Path) -> None:
    """Pruned weights stay 0 (and their Adam moments 0); dead neurons' and heads' weights never move; the rest does."""
    model = tiny_model("llama", dtype=torch.float32)
    masks = _initial_masks(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    callback = LRPSurgeryCallback(masks=masks, surgery=None)
    trainer = _trainer(model, _args(tmp_path, 5, learning_rate=5e-2, weight_decay=0.0), callback)
    trainer.train()
    params = dict(model.named_parameters())
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    frozen = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in params.items()}
    weights, neurons, heads = masks
    for module, index in weights.indices.items():
        weight = params[f"{module}.weight"]
        assert bool((weight.detach().flatten()[index] == 0).all())
        for moment in ("exp_avg", "exp_avg_sq"):
            assert bool((state[weight][moment].flatten()[index] == 0).all())
        frozen[f"{module}.weight"].view(-1)[index] = True
    for module, index in neurons.indices.items():
        block = module.rsplit(".", 1)[0]
        frozen[f"{module}.weight"][:, index] = True
        frozen[f"{block}.gate_proj.weight"][index] = True
        frozen[f"{block}.up_proj.weight"][index] = True
    for module, index in heads.indices.items():
        columns = (index[:, None] * 8 + torch.arange(8)).flatten()
        frozen[f"{module}.weight"][:, columns] = True
    neuron_module = next(iter(neurons.indices))
    for name, mask in frozen.items():
        if name.startswith("model.layers") and mask.any():
            still = params[name].detach()[mask] == initial[name][mask]
            zero = params[name].detach()[mask] == 0
            assert bool((still | zero).all()), f"{name}: a masked entry moved"
    moved = torch.cat(
        [(params[n].detach() != initial[n])[~m] for n, m in frozen.items() if n.startswith("model.layers")]
    )
    assert moved.float().mean() > 0.95, "training must move the unmasked weights for the test to mean anything"
    down = model.get_submodule(neuron_module)
    assert not down._forward_pre_hooks, "the enforcement hooks must come off when training ends"

    control = tiny_model("llama", dtype=torch.float32)
    _trainer(control, _args(tmp_path / "control", 5, learning_rate=5e-2, weight_decay=0.0), None).train()
    control_params = dict(control.named_parameters())
    name = f"{neuron_module}.weight"
    assert not torch.equal(control_params[name][frozen[name]], initial[name][frozen[name]]), (
        "without the callback the masked entries must move"
    )


# -- surgery ----------------------------------------------------------------------------------
@pytest.mark.parametrize("carrier", ["bake", "adapter"])
def test_surgery_at_the_end_matches_surgeon_and_saves_a_verified_model(tmp_path: Path, carrier: str) -> None:
    """One pass at the end: the mask is Surgeon's on the final model; saved, loaded, verified, pushed once."""
    pushed: list[tuple[Path, str]] = []
    callback = _callback(
        granularity="neurons",
        budget=5,
        surgery="end",
        carrier=carrier,
        push_to_hub="user/fixed",
        push_fn=lambda directory, repo, **kw: pushed.append((directory, repo)),
        push_kwargs={"base_model": "user/fine-tuned"} if carrier == "adapter" else None,
    )
    model = tiny_model("llama", dtype=torch.float64)
    _trainer(model, _args(tmp_path, 3), callback).train()
    mask = callback.masks["neurons"]
    surgeon = Surgeon(model.eval(), progress=False)
    expected = surgeon.select(surgeon.contrast(undesired=UNDESIRED, general=GENERAL), "neurons", 5)
    assert mask.indices.keys() == expected.indices.keys()
    assert all(torch.equal(mask.indices[k], expected.indices[k]) for k in mask.indices)
    directory = tmp_path / CORRECTED_DIR
    assert pushed == [(directory, "user/fixed")] and callback.saved == [directory]
    loaded = load_corrected(directory)  # verifies zeros and probe logits, and the adapter's base fingerprint
    manifest = json.loads((directory / "surgery" / "neurons" / "mask.json").read_text())
    assert manifest["count"] == 5 and manifest["provenance"]["training"]["step"] == 3
    if carrier == "adapter":
        assert (tmp_path / f"{CORRECTED_DIR}-base" / "config.json").is_file()
        assert hasattr(loaded, "peft_config")


def test_a_failed_push_warns_and_keeps_the_saved_model(tmp_path: Path) -> None:
    """A push that raises is a warning naming the directory to retry from; training ends normally."""

    def offline(directory: Path, repo: str, **options: Any) -> None:
        raise ConnectionError(f"no route to the Hub ({options})")

    callback = _callback(budget=2, push_to_hub="user/fixed", push_fn=offline, push_kwargs={"private": True})
    with pytest.warns(RuntimeWarning, match="retry with hf_lrp_surgery.hub.push_to_hub"):
        _trainer(tiny_model("llama", dtype=torch.float32), _args(tmp_path, 1), callback).train()
    assert len(callback.push_errors) == 1 and "'private': True" in callback.push_errors[0]
    load_corrected(tmp_path / CORRECTED_DIR)


def test_resumed_run_ends_with_the_same_relevance_and_masks(tmp_path: Path) -> None:
    """Surgery (IA3 adapter) at every save; interrupted after checkpoint 3 and resumed: same sums, masks, weights."""

    def make(out: Path) -> tuple[LRPSurgeryCallback, torch.nn.Module, TrainingArguments]:
        callback = _callback(granularity="neurons", budget=3, every_n_steps=2, surgery="save", carrier="adapter")
        return callback, tiny_model("llama", dtype=torch.float64), _args(out, 6, save_strategy="steps", save_steps=3)

    straight, straight_model, args = make(tmp_path / "straight")
    _trainer(straight_model, args, straight).train()

    first, model, args = make(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        _trainer(model, args, first, _Crash(at=4)).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    saved = json.loads((checkpoint / STATE_DIR / "state.json").read_text())
    assert saved["masks"] == ["neurons"] and saved["surgery_steps"] == [3]
    assert RelevanceAccumulator.load(checkpoint / STATE_DIR / "relevance").steps == [2]
    assert Mask.load(checkpoint / STATE_DIR / "masks" / "neurons").count == 3

    resumed, model, args = make(tmp_path / "resumed")
    _trainer(model, args, resumed).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.accumulator.steps == straight.accumulator.steps == [2, 4, 6]
    assert resumed.surgery_steps == [3, 6] and straight.surgery_steps == [3, 6]
    for name in ("general", "undesired"):
        torch.testing.assert_close(
            resumed.accumulator.sums[name]["neurons"],
            straight.accumulator.sums[name]["neurons"],
            rtol=1e-12,
            atol=1e-14,
        )
    final, expected = resumed.masks["neurons"], straight.masks["neurons"]
    assert final.count == 6
    assert final.indices.keys() == expected.indices.keys()
    assert all(torch.equal(final.indices[k], expected.indices[k]) for k in final.indices)
    ineligible = resumed._scores(model).neurons  # a surgery never re-selects a unit already pruned
    assert all(bool(torch.isposinf(ineligible[final.layer_of(k), i]).all()) for k, i in final.indices.items())
    straight_weights = straight_model.state_dict()
    assert all(torch.equal(v, straight_weights[k]) for k, v in model.state_dict().items())
    for run_dir in ("straight", "resumed"):
        assert (tmp_path / run_dir / "checkpoint-6" / CORRECTED_DIR / "surgery" / "check.json").is_file()
    # The adapter at a checkpoint sits on that checkpoint's fine-tuned weights (fingerprint checked on load).
    assert hasattr(load_corrected(tmp_path / "resumed" / "checkpoint-6" / CORRECTED_DIR), "peft_config")


# -- several processes ------------------------------------------------------------------------
def test_two_ddp_processes_give_the_single_process_result(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo): reduced sums = one process on the same samples; same masks; one writer."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "_ddp_worker.py"),
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = run(tmp_path / "single", per_device_batch=4)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}" / "record.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and single["world_size"] == 1
    assert ranks[0]["masks"] == ranks[1]["masks"] == single["masks"]
    assert all(r["weight_mask_zero"] for r in ranks)
    assert ranks[0]["saved"] == [str(tmp_path / "ddp" / "corrected")] and ranks[1]["saved"] == []
    load_corrected(tmp_path / "ddp" / "corrected")
    reference = RelevanceAccumulator.load(tmp_path / "single" / "rank0" / "relevance")
    for r in (0, 1):
        reduced = RelevanceAccumulator.load(tmp_path / "ddp" / f"rank{r}" / "relevance")
        assert reduced.counts == reference.counts == {"general": 2 * len(GENERAL), "undesired": 2 * len(UNDESIRED)}
        for name in ("general", "undesired"):
            for key in ("neurons", "neurons_abs"):
                torch.testing.assert_close(reduced.sums[name][key], reference.sums[name][key], rtol=1e-9, atol=1e-11)


# -- bad input --------------------------------------------------------------------------------
def test_bad_input_is_refused_with_clear_errors(tmp_path: Path) -> None:
    """Missing sets, unsupported models, foreign masks, adapters for weights, FSDP, DeepSpeed, PEFT surgery."""
    with pytest.raises(ReferenceSetError, match="general="):
        LRPSurgeryCallback(undesired=UNDESIRED, every_n_steps=5)
    model = tiny_model("llama", dtype=torch.float32)
    weights = _initial_masks(model)[0]
    with pytest.raises(ValueError, match="IA3"):
        _callback(masks=[weights], carrier="adapter")
    with pytest.raises(ValueError, match="base_model"):
        _callback(carrier="adapter", push_to_hub="user/fixed", push_fn=print)

    # A family the engine does not support (GPT-J: parallel block with a fused rotary layout, no registry entry).
    gptj = GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_inner=48, n_positions=64, rotary_dim=4)
    with pytest.raises(UnsupportedArchitectureError):
        _trainer(model_from_config(gptj, dtype=torch.float32), _args(tmp_path, 1), _callback()).train()
    other = tiny_model("llama", dtype=torch.float32, seed=1)
    with pytest.raises(FingerprintMismatchError):
        _trainer(other, _args(tmp_path, 1), LRPSurgeryCallback(masks=[weights], surgery=None)).train()

    state, control = TrainerState(), TrainerControl()
    with pytest.raises(TrainingSetupError, match="FSDP"):
        _callback().on_train_begin(SimpleNamespace(fsdp="full_shard", deepspeed=None), state, control, model=model)
    with pytest.raises(TrainingSetupError, match="DeepSpeed"):
        _callback().on_train_begin(SimpleNamespace(fsdp="", deepspeed="ds.json"), state, control, model=model)
    neurons = _initial_masks(model)[1]
    activation_only = LRPSurgeryCallback(masks=[neurons], surgery=None)
    activation_only.on_train_begin(SimpleNamespace(fsdp="", deepspeed="ds.json"), state, control, model=model)
    activation_only.enforcer.remove()
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(TrainingSetupError, match="PEFT"):
        _callback().on_train_begin(SimpleNamespace(fsdp="", deepspeed=None), state, control, model=lora)


def test_resume_refuses_missing_or_different_state(tmp_path: Path) -> None:
    """A checkpoint without the callback's state, or made with other reference sets, is an error, not a fresh start."""
    args = _args(tmp_path, 2, save_strategy="steps", save_steps=2)
    _trainer(tiny_model("llama", dtype=torch.float32), args, None).train()
    checkpoint = str(tmp_path / "checkpoint-2")
    with pytest.raises(TrainingStateError, match="no lrp_surgery"):
        _trainer(tiny_model("llama", dtype=torch.float32), args, _callback()).train(resume_from_checkpoint=checkpoint)
    _trainer(tiny_model("llama", dtype=torch.float32), args, _callback(every_n_steps=1)).train()
    changed = LRPSurgeryCallback(undesired=UNDESIRED, general=GENERAL[:2], every_n_steps=1)
    with pytest.raises(TrainingStateError, match="samples"):
        _trainer(tiny_model("llama", dtype=torch.float32), args, changed).train(resume_from_checkpoint=checkpoint)


def test_options_objects_and_the_deprecated_seed_keyword() -> None:
    """The callback takes options objects, or their fields as keywords; seed= warns and means objective=."""
    from hf_lrp_surgery.options import ContrastOptions, ScoringOptions, SelectionOptions

    given = LRPSurgeryCallback(
        undesired=UNDESIRED,
        general=GENERAL,
        scoring_options=ScoringOptions(method="gradient", objective="logprob"),
        contrast_options=ContrastOptions(protect_top=0.0),
        selection_options=SelectionOptions(granularity="heads"),
    )
    with pytest.warns(DeprecationWarning, match="objective="):
        keywords = LRPSurgeryCallback(
            undesired=UNDESIRED,
            general=GENERAL,
            method="gradient",
            seed="logprob",
            protect_top=0.0,
            granularity="heads",
        )
    assert given._state_record() == keywords._state_record()
    assert given._state_record()["relevance"]["seed"] == "logprob"
    assert given.scoring.components == ("heads",)
    with pytest.raises(TypeError, match="granularty"):
        LRPSurgeryCallback(undesired=UNDESIRED, general=GENERAL, granularty="heads")
    with pytest.raises(ValueError, match="'lrp' or 'gradient'"):
        LRPSurgeryCallback(undesired=UNDESIRED, general=GENERAL, method="wanda")


# -- early errors (before the first training step) --------------------------------------------
class _StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self.steps += 1


def _begin(callback: LRPSurgeryCallback, model: torch.nn.Module, optimizer: Any = None) -> None:
    """``on_train_begin`` as the Trainer calls it on a fresh run (no training step, no Trainer)."""
    args = SimpleNamespace(output_dir="unused", fsdp="", deepspeed=None)
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=optimizer)


@pytest.mark.parametrize("budget", [0, -3, 0.0, 1.5, float("nan"), True, "5", None])
def test_a_budget_that_is_no_count_or_fraction_is_refused_at_construction(budget: Any) -> None:
    """budget=0, negative, fractions outside (0, 1], bools and non-numbers: BudgetError before anything loads."""
    with pytest.raises(BudgetError, match="budget"):
        _callback(budget=budget)


def test_numpy_budgets_are_accepted_as_plain_numbers() -> None:
    """np.int64(5) is the count 5 and np.float32(0.25) the fraction 0.25, recorded as JSON numbers in checkpoints."""
    count = _callback(budget=np.int64(5))
    assert count.budget == 5 and type(count.budget) is int
    fraction = _callback(budget=np.float32(0.25))
    assert fraction.budget == 0.25 and type(fraction.budget) is float
    assert json.loads(json.dumps(count._state_record()))["selection"]["budget"] == 5


def test_a_budget_beyond_the_model_fails_before_the_first_step(tmp_path: Path) -> None:
    """budget=10000 on a tiny model: a BudgetError from trainer.train() before step 1, and no hooks left behind."""
    counter = _StepCounter()
    model = tiny_model("llama", dtype=torch.float32)
    with pytest.raises(BudgetError, match="budget 10000 exceeds the 96 neurons in 2 layers"):
        _trainer(model, _args(tmp_path, 3), _callback(budget=10000), counter).train()
    assert counter.steps == 0 and not (tmp_path / CORRECTED_DIR).exists()
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"budget": 0.001}, BudgetError, "0.001 of 90 neurons in 2 layers .* rounds to 0"),
        ({"budget": 5, "granularity": "heads", "layers": (1,)}, BudgetError, "exceeds the 4 heads in 1 layers"),
        ({"budget": 93}, BudgetError, r"90 neurons in 2 layers \(6 more are masked already\)"),
        ({"budget": 3, "layers": (2,)}, ValueError, "layers must be a non-empty subset of 0..1"),
        ({"budget": 3, "granularity": "weights", "modules": ["fc9"]}, ModuleGroupError, "fc9"),
    ],
    ids=["fraction-rounds-to-0", "heads-in-one-layer", "already-masked", "layers", "module-group"],
)
def test_budgets_are_checked_against_the_component_count_in_on_train_begin(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Fractions that round to 0, the chosen layers, units already masked, module groups: all refused up front."""
    model = tiny_model("llama", dtype=torch.float32)
    neurons = _initial_masks(model)[1]  # 6 neurons masked from the start
    callback = _callback(masks=[neurons], **options)
    with pytest.raises(error, match=match):
        _begin(callback, model)
    assert not any(m._forward_pre_hooks for m in model.modules()), "a refused start must take its hooks off"
    within = _callback(masks=[neurons], budget=90)  # exactly the units left: accepted
    _begin(within, model)
    within.enforcer.remove()


def test_a_tokenizer_or_reference_ids_beyond_the_vocabulary_fail_before_the_first_step(tmp_path: Path) -> None:
    """len(tokenizer) > embedding rows, ids >= rows or < 0 in a reference set, text without a tokenizer: refused."""
    model = tiny_model("llama", dtype=torch.float32)
    tokenizer = tiny_tokenizer()
    text_sets = LRPSurgeryCallback(undesired=["the cat sat"], general=["a dog"], tokenizer=tokenizer)
    _begin(text_sets, model)  # encodes: fine
    text_sets.enforcer.remove()
    tokenizer.add_tokens([f"extra{i}" for i in range(64)])
    counter = _StepCounter()
    trainer = _trainer(model, _args(tmp_path, 2), _callback(tokenizer=tokenizer), counter)
    too_many = rf"has {len(tokenizer)} tokens but the model's embedding only 64 rows.*resize_token_embeddings"
    with pytest.raises(TrainingSetupError, match=too_many):
        trainer.train()
    assert counter.steps == 0
    beyond = LRPSurgeryCallback(undesired=UNDESIRED, general=[*GENERAL, ReferenceSample([1, 99, 5])])
    with pytest.raises(ReferenceSetError, match="sample 5 of the general reference set has token id 99"):
        _begin(beyond, model)
    negative = LRPSurgeryCallback(undesired=[ReferenceSample([1, 2], continuation=[-4])], general=GENERAL)
    with pytest.raises(ReferenceSetError, match="sample 0 of the undesired reference set has token id -4"):
        _begin(negative, model)
    text = LRPSurgeryCallback(undesired=["hello world"], general=GENERAL)
    with pytest.raises(ReferenceSetError, match="the undesired reference set: sample 0's prompt is text"):
        _begin(text, model)
    assert not any(m._forward_pre_hooks for m in model.modules())


# -- resume: missing or damaged state ---------------------------------------------------------
def _resumable(out: Path, steps: int) -> tuple[LRPSurgeryCallback, torch.nn.Module, TrainingArguments]:
    """A run with a pass at every step and surgery at every checkpoint (step 2, 4, ...), as interrupted runs are."""
    callback = _callback(granularity="neurons", budget=3, every_n_steps=1, surgery="save")
    return callback, tiny_model("llama", dtype=torch.float64), _args(out, steps, save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step run killed at step 3: its checkpoint-2 holds relevance at steps [1, 2] and a 3-neuron mask."""
    out = tmp_path_factory.mktemp("saved_run")
    callback, model, args = _resumable(out, 4)
    with pytest.raises(KeyboardInterrupt):
        _trainer(model, args, callback, _Crash(at=3)).train()
    assert callback.accumulator.steps == [1, 2, 3] and not (out / CORRECTED_DIR).exists()
    return out


def _copy_run(saved_run: Path, to: Path) -> Path:
    shutil.copytree(saved_run, to)
    return to / "checkpoint-2" / STATE_DIR


def _edit_json(path: Path, change: Any) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_tensor(path: Path, key: str) -> None:
    tensors = load_file(str(path))
    del tensors[key]
    save_file(tensors, str(path))


_DAMAGE: dict[str, tuple[Any, str]] = {
    "relevance deleted": (lambda d: shutil.rmtree(d / "relevance"), r"relevance is missing, but state.json records "),
    "tensors deleted": (lambda d: (d / "relevance" / "accumulated.safetensors").unlink(), "safetensors is missing"),
    "tensors truncated": (lambda d: _truncate(d / "relevance" / "accumulated.safetensors"), "not a readable safet"),
    "tensor dropped": (
        lambda d: _drop_tensor(d / "relevance" / "accumulated.safetensors", "undesired/neurons_abs"),
        "accumulated.safetensors holds the undesired sums",
    ),
    "sums json broken": (lambda d: (d / "relevance" / "accumulated.json").write_text("{"), "json is not readable JSON"),
    "sums counts a list": (
        lambda d: _edit_json(d / "relevance" / "accumulated.json", lambda m: {**m, "counts": []}),
        "accumulated.json has a 'counts' entry of the wrong type",
    ),
    "sums without steps": (
        lambda d: _edit_json(d / "relevance" / "accumulated.json", lambda m: _without(m, "steps")),
        "accumulated.json has no 'steps' entry",
    ),
    "sums of other steps": (
        lambda d: _edit_json(d / "relevance" / "accumulated.json", lambda m: {**m, "steps": [2]}),
        r"relevance holds passes at steps \[2\], but state.json records \[1, 2\]",
    ),
    "state not json": (lambda d: (d / "state.json").write_text("{not json"), "state.json is not readable JSON"),
    "state a list": (lambda d: (d / "state.json").write_text("[]"), "state.json holds a JSON list, not an object"),
    "state without masks": (
        lambda d: _edit_json(d / "state.json", lambda r: _without(r, "masks")),
        "state.json has no 'masks' entry",
    ),
    "state steps a string": (
        lambda d: _edit_json(d / "state.json", lambda r: {**r, "surgery_steps": "2"}),
        "state.json has a 'surgery_steps' entry of the wrong type",
    ),
    "state mask outside": (
        lambda d: _edit_json(d / "state.json", lambda r: {**r, "masks": ["../../x"]}),
        r"state.json lists masks \['../../x'\]",
    ),
    "mask deleted": (lambda d: shutil.rmtree(d / "masks" / "neurons"), "neurons does not hold a readable neurons mask"),
    "mask truncated": (
        lambda d: _truncate(d / "masks" / "neurons" / "mask.safetensors"),
        "neurons does not hold a readable neurons mask",
    ),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_resume_refuses_missing_or_damaged_state_naming_the_file(saved_run: Path, tmp_path: Path, damage: str) -> None:
    """Deleted relevance/, truncated safetensors, JSON that does not parse or of the wrong shape: TrainingStateError."""
    change, match = _DAMAGE[damage]
    state_dir = _copy_run(saved_run, tmp_path / "run")
    change(state_dir)
    callback, model, args = _resumable(tmp_path / "run", 4)
    counter = _StepCounter()
    with pytest.raises(TrainingStateError, match=match) as raised:
        _trainer(model, args, callback, counter).train(resume_from_checkpoint=str(state_dir.parent))
    assert "resume from another checkpoint, or start the run again without resume_from_checkpoint" in str(raised.value)
    assert counter.steps == 0 and not any(m._forward_pre_hooks for m in model.modules())


def test_a_consistent_state_is_resumed_and_earlier_checkpoints_still_load(saved_run: Path, tmp_path: Path) -> None:
    """The saved passes carry on ([1, 2] then 3, 4); a state.json of an earlier release (no relevance_steps) loads."""
    state_dir = _copy_run(saved_run, tmp_path / "run")
    assert json.loads((state_dir / "state.json").read_text())["relevance_steps"] == [1, 2]
    callback, model, args = _resumable(tmp_path / "run", 4)
    _trainer(model, args, callback).train(resume_from_checkpoint=str(state_dir.parent))
    assert callback.accumulator.steps == [1, 2, 3, 4] and callback.surgery_steps == [2, 4]
    assert callback.masks["neurons"].count == 6

    earlier = _copy_run(saved_run, tmp_path / "earlier")
    _edit_json(earlier / "state.json", lambda r: _without(r, "relevance_steps"))
    callback, model, args = _resumable(tmp_path / "earlier", 4)
    _trainer(model, args, callback).train(resume_from_checkpoint=str(earlier.parent))
    assert callback.accumulator.steps == [1, 2, 3, 4] and callback.masks["neurons"].count == 6


def test_a_corrected_model_already_in_output_dir_is_refused_before_the_first_step(tmp_path: Path) -> None:
    """The end-of-training save would refuse a non-empty output_dir: refused up front, unless overwrite=True."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("the user's")
    counter = _StepCounter()
    with pytest.raises(OutputExistsError, match="overwrite"):
        _trainer(tiny_model("llama"), _args(tmp_path, 1), _callback(budget=2, output_dir=taken), counter).train()
    assert counter.steps == 0 and (taken / "notes.txt").read_text() == "the user's"
    callback = _callback(budget=2, output_dir=taken, overwrite=True)
    _trainer(tiny_model("llama", dtype=torch.float32), _args(tmp_path, 1), callback).train()
    assert callback.saved == [taken] and not (taken / "notes.txt").exists()
    load_corrected(taken)


def test_a_behaviour_makes_the_paired_sets_from_the_model_being_trained(tmp_path: Path) -> None:
    """With behaviour=, every pass explains the current model's own undesired and desired continuations."""
    from hf_lrp_surgery.correction import paired_contrast_sets, user_behaviour

    prompts = [f"{a} {b}" for a in ("the cat", "a dog", "the sun", "one tree") for b in ("sat on the", "is very")]
    behaviour = user_behaviour(
        prompts,
        lambda texts: [float(len(t.split()) % 2) for t in texts],  # words the word tokenizer knows: odd or even
        max_new_tokens=6,
        samples=4,
        use_chat_template=False,
    )
    with pytest.raises(ValueError, match="not both"):
        LRPSurgeryCallback(undesired=UNDESIRED, behaviour=behaviour)
    callback = LRPSurgeryCallback(
        behaviour=behaviour, tokenizer=tiny_tokenizer(), granularity="neurons", budget=3, every_n_steps=2
    )
    model = tiny_model("llama", dtype=torch.float32)
    _trainer(model, _args(tmp_path, 2), callback).train()
    assert callback.accumulator is not None and callback.accumulator.steps == [2]
    assert callback.masks["neurons"].count == 3
    undesired, desired = paired_contrast_sets(
        model.eval(), tiny_tokenizer(), behaviour.prompts_for("train"), behaviour, progress=False
    )
    assert callback.samples == {"general": desired, "undesired": undesired}  # the trained model's own sets
