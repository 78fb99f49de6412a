"""Mask selection from constructed scores with known order, and the Mask value: counts, manifest, files.

Selection is checked on hand-made scores (ties, protected ``+inf``, layer and module restrictions)
over a small hand-made layout, and over the real layouts of tiny llama and opt models for module
groups. The fingerprint checks use real tiny models.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

import hf_lrp_surgery.masks.mask as masks_module
from hf_lrp_surgery.exceptions import (
    BudgetError,
    FingerprintMismatchError,
    MaskManifestError,
    ModuleGroupError,
    NonFiniteScoreError,
)
from hf_lrp_surgery.fingerprint import fingerprint
from hf_lrp_surgery.lrp import resolve
from hf_lrp_surgery.masks import Mask, dampening_scales, hard_part, mask_from_scales, select
from hf_lrp_surgery.options import SCOPES, SelectionOptions
from hf_lrp_surgery.scoring import Layout, Scores

INF = float("inf")

#: Two blocks of four neurons and two heads; one "weight matrix" per block.
LAYOUT = Layout(
    num_layers=2,
    num_neurons=4,
    num_heads=2,
    neuron_modules=("blocks.0.mlp.out", "blocks.1.mlp.out"),
    head_modules=("blocks.0.attn.o", "blocks.1.attn.o"),
    weight_modules={"blocks.0.mlp.out": (0, "mlp.out"), "blocks.1.mlp.out": (1, "mlp.out")},
)
N0, N1 = LAYOUT.neuron_modules
H0, H1 = LAYOUT.head_modules


@functools.cache
def _model(family: str = "llama", seed: int = 0) -> nn.Module:
    """A cached tiny fp32 model (tests that change it work on a copy)."""
    return tiny_model(family, dtype=torch.float32, seed=seed)


def _scores(
    neurons: list[list[float]] | None = None,
    heads: list[list[float]] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    layout: Layout = LAYOUT,
    model: nn.Module | None = None,
) -> Scores:
    """Scores with the given values, on ``layout``, fingerprinted as the tiny llama (or ``model``)."""
    return Scores(
        method="lrp",
        settings={"method": "lrp", "aggregation": "signed"},
        fingerprint=fingerprint(model or _model()),
        layout=layout,
        num_samples=4,
        neurons=None if neurons is None else torch.tensor(neurons),
        heads=None if heads is None else torch.tensor(heads),
        weights=dict(weights or {}),
    )


def _picked(mask: Mask) -> dict[str, list[int]]:
    """Module -> pruned indices as a list."""
    return {name: idx.tolist() for name, idx in mask.indices.items()}


# -- selection ---------------------------------------------------------------------------------------
def test_global_picks_the_k_lowest_with_stable_ties() -> None:
    """Global scope: the k lowest over all layers; equal scores are taken in position order."""
    scores = _scores([[3.0, 1.0, 2.0, 1.0], [1.0, 5.0, 0.0, 2.0]])
    # flat order: 0.0 (1, 2), then the 1.0s at (0, 1), (0, 3), (1, 0) in position order, then 2.0 ...
    assert _picked(select(scores, "neurons", 1)) == {N1: [2]}
    assert _picked(select(scores, "neurons", 3)) == {N0: [1, 3], N1: [2]}
    assert _picked(select(scores, "neurons", 4)) == {N0: [1, 3], N1: [0, 2]}
    assert _picked(select(scores, "neurons", 5)) == {N0: [1, 2, 3], N1: [0, 2]}  # first of the 2.0s: (0, 2)
    mask = select(scores, "neurons", 8)
    assert _picked(mask) == {N0: [0, 1, 2, 3], N1: [0, 1, 2, 3]}
    assert all(idx.dtype == torch.int64 for idx in mask.indices.values())


def test_global_heads_and_negative_scores() -> None:
    """Heads are selected the same way; negative scores are the lowest."""
    scores = _scores(heads=[[-1.0, 4.0], [-3.0, 0.5]])
    assert _picked(select(scores, "heads", 2)) == {H0: [0], H1: [0]}
    assert _picked(select(scores, "heads", 3)) == {H0: [0], H1: [0, 1]}


def test_per_layer_spreads_the_budget_and_takes_each_layers_lowest() -> None:
    """per_layer: the budget split over layers by eligible size; within a layer its lowest are taken."""
    scores = _scores([[0.1, 0.2, 0.3, 0.4], [9.0, 8.0, 7.0, 6.0]])
    assert _picked(select(scores, "neurons", 4)) == {N0: [0, 1, 2, 3]}  # global: all from layer 0
    assert _picked(select(scores, "neurons", 4, scope="per_layer")) == {N0: [0, 1], N1: [2, 3]}
    # 3 over two equal layers: 1.5 each, the extra one to the first layer (largest remainders, then order)
    mask = select(scores, "neurons", 3, scope="per_layer")
    assert mask.per_layer() == [2, 1] and _picked(mask) == {N0: [0, 1], N1: [3]}
    # eligible size counts: layer 1 has 3 protected neurons, so layer 0 (4 eligible) gets 4 of 5
    protected = _scores([[0.1, 0.2, 0.3, 0.4], [9.0, INF, INF, INF]])
    mask = select(protected, "neurons", 5, scope="per_layer")
    assert _picked(mask) == {N0: [0, 1, 2, 3], N1: [0]}
    # 4 over 4 + 2 eligible: exact shares 2.67 and 1.33 -> 2 + 1, the extra one to the larger remainder
    uneven = _scores([[0.4, 0.3, 0.2, 0.1], [INF, 0.0, -1.0, INF]])
    mask = select(uneven, "neurons", 4, scope="per_layer")
    assert mask.per_layer() == [3, 1] and _picked(mask) == {N0: [1, 2, 3], N1: [2]}


def test_per_layer_weights_are_spread_over_matrices_by_size() -> None:
    """For weights, per_layer spreads over weight matrices in proportion to their sizes (real llama layout)."""
    model = _model()
    layout = Layout.of(resolve(model))
    generator = torch.Generator().manual_seed(0)
    values = {
        name: torch.rand(model.get_submodule(name).weight.shape, generator=generator) for name in layout.weight_modules
    }
    scores = _scores(weights=values, layout=layout)
    total = sum(v.numel() for v in values.values())
    mask = select(scores, "weights", 0.25, scope="per_layer")
    assert mask.count == total // 4
    for name, value in values.items():
        expected = torch.sort(value.flatten(), stable=True).indices[: value.numel() // 4].sort().values
        assert torch.equal(mask.indices[name], expected), name
    # global: the k lowest over all matrices together
    glob = select(scores, "weights", 1000)
    flat = torch.cat([v.flatten() for v in values.values()])
    threshold = flat.sort().values[999]
    assert glob.count == 1000
    for name, value in values.items():
        expected = (value.flatten() <= threshold).nonzero().flatten()
        assert torch.equal(glob.indices.get(name, torch.zeros(0, dtype=torch.int64)), expected), name


def test_fraction_budgets() -> None:
    """A float budget is a fraction of the eligible (unprotected) components, rounded."""
    scores = _scores([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    assert select(scores, "neurons", 0.25).count == 2
    assert _picked(select(scores, "neurons", 1.0)) == {N0: [0, 1, 2, 3], N1: [0, 1, 2, 3]}
    protected = _scores([[0.1, INF, 0.3, INF], [0.5, 0.6, INF, INF]])  # 4 eligible
    mask = select(protected, "neurons", 0.5)
    assert _picked(mask) == {N0: [0, 2]}
    assert mask.provenance["selection"]["budget"] == 0.5 and mask.provenance["selection"]["count"] == 2
    assert _picked(select(protected, "neurons", 1.0)) == {N0: [0, 2], N1: [0, 1]}


def test_layers_restriction() -> None:
    """layers= restricts selection to those blocks, even if others score lower."""
    scores = _scores([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    mask = select(scores, "neurons", 2, layers=[1])
    assert _picked(mask) == {N1: [0, 1]} and mask.per_layer() == [0, 2]
    assert mask.provenance["selection"]["layers"] == [1]
    assert select(scores, "neurons", 1.0, layers=[1]).count == 4  # fraction of the chosen layers only
    with pytest.raises(BudgetError):
        select(scores, "neurons", 5, layers=[1])
    for bad in ([], [2], [-1]):
        with pytest.raises(ValueError, match="layers"):
            select(scores, "neurons", 1, layers=bad)


def _weight_scores(family: str) -> tuple[Scores, dict[str, int]]:
    """Zero weight scores on a tiny model's real layout, and each module's size."""
    model = _model(family)
    layout = Layout.of(resolve(model))
    values = {name: torch.zeros(model.get_submodule(name).weight.shape) for name in layout.weight_modules}
    return _scores(weights=values, layout=layout, model=model), {k: v.numel() for k, v in values.items()}


@pytest.mark.parametrize(
    ("family", "modules", "expected"),
    [
        (
            "llama",
            "mlp.*",
            ["model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"],
        ),
        ("llama", "down_proj", ["model.layers.{i}.mlp.down_proj"]),
        ("llama", ["q_proj", "mlp.up_proj"], ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.mlp.up_proj"]),
        (
            "llama",
            "self_attn.*",
            [
                "model.layers.{i}.self_attn.q_proj",
                "model.layers.{i}.self_attn.k_proj",
                "model.layers.{i}.self_attn.v_proj",
                "model.layers.{i}.self_attn.o_proj",
            ],
        ),
        ("opt", "fc1", ["model.decoder.layers.{i}.fc1"]),
        ("opt", "fc*", ["model.decoder.layers.{i}.fc1", "model.decoder.layers.{i}.fc2"]),
    ],
)
def test_weight_module_groups(family: str, modules: Any, expected: list[str]) -> None:
    """modules= by role glob, last name or list: with budget 1.0 exactly the matching matrices are pruned whole."""
    scores, sizes = _weight_scores(family)
    mask = select(scores, "weights", 1.0, modules=modules)
    names = [pattern.format(i=i) for i in range(2) for pattern in expected]
    assert sorted(mask.indices) == sorted(names)
    assert mask.per_module() == {name: sizes[name] if name in names else 0 for name in sizes}
    assert mask.count == sum(sizes[n] for n in names)
    assert set(mask.provenance["module_sizes"]) == set(names)


def test_weight_full_module_name_and_layers() -> None:
    """A full module name selects that matrix alone; modules= combines with layers=."""
    scores, sizes = _weight_scores("llama")
    mask = select(scores, "weights", 10, modules="model.layers.1.self_attn.q_proj")
    assert list(mask.indices) == ["model.layers.1.self_attn.q_proj"]
    assert mask.indices["model.layers.1.self_attn.q_proj"].tolist() == list(range(10))
    mask = select(scores, "weights", 1.0, modules="down_proj", layers=[1])
    assert list(mask.indices) == ["model.layers.1.mlp.down_proj"]
    assert mask.count == sizes["model.layers.1.mlp.down_proj"] and mask.per_layer() == [0, mask.count]
    assert mask.provenance["selection"]["modules"] == "down_proj"


def test_protected_components_are_never_selected() -> None:
    """+inf scores are excluded, however large the budget (up to the eligible count)."""
    scores = _scores([[INF, 5.0, INF, 7.0], [INF, INF, 6.0, INF]])
    for scope in ("global", "per_layer"):
        mask = select(scores, "neurons", 3, scope=scope)
        assert _picked(mask) == {N0: [1, 3], N1: [2]}
    weights = {N0: torch.tensor([[INF, 1.0], [2.0, INF]]), N1: torch.tensor([[INF, INF], [INF, 0.0]])}
    mask = select(_scores(weights=weights), "weights", 1.0)
    assert _picked(mask) == {N0: [1, 2], N1: [3]}


def test_budget_errors() -> None:
    """0, negatives, bools, fractions > 1 or rounding to 0, and budgets above the eligible count -> BudgetError."""
    scores = _scores([[0.1, INF, 0.3, 0.4], [0.5, 0.6, 0.7, INF]])  # 6 eligible
    for bad in (0, -3, True, False, 1.5, 0.0, -0.5, 0.05, "3", None):
        with pytest.raises(BudgetError):
            select(scores, "neurons", bad)
    with pytest.raises(BudgetError, match="rounds to 0"):
        select(scores, "neurons", 0.05)  # 0.3 of a neuron
    with pytest.raises(BudgetError, match="exceeds the 6"):
        select(scores, "neurons", 7)  # 8 neurons, but 2 are protected
    assert select(scores, "neurons", 6).count == 6
    assert issubclass(BudgetError, ValueError)


def test_selection_argument_errors() -> None:
    """Unknown group -> ModuleGroupError listing the groups; modules= with neurons, bad scope -> ValueError;
    NaN -> NonFiniteScoreError; an unscored kind -> KeyError."""
    scores, _ = _weight_scores("llama")
    with pytest.raises(ModuleGroupError, match="mlp.down_proj") as info:
        select(scores, "weights", 1, modules="ffn.*")
    for group in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert group in str(info.value)
    with pytest.raises(ModuleGroupError):
        select(scores, "weights", 1, modules=["down_proj", "nothing"])
    opt_scores, _ = _weight_scores("opt")
    with pytest.raises(ModuleGroupError, match="fc1"):
        select(opt_scores, "weights", 1, modules="mlp.*")  # OPT has no mlp.* roles
    neurons = _scores([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    with pytest.raises(ValueError, match="modules="):
        select(neurons, "neurons", 1, modules="mlp.*")
    with pytest.raises(ValueError, match="scope"):
        select(neurons, "neurons", 1, scope="per_module")
    with pytest.raises(KeyError, match="heads"):
        select(neurons, "heads", 1)
    with pytest.raises(NonFiniteScoreError):
        select(_scores([[0.1, float("nan"), 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]), "neurons", 1)


# -- the Mask value ----------------------------------------------------------------------------------
def _neuron_mask() -> Mask:
    """3 neurons pruned on the constructed layout: (0, 1), (0, 3), (1, 2)."""
    return select(_scores([[3.0, 1.0, 2.0, 1.0], [1.5, 5.0, 0.0, 2.0]]), "neurons", 3)


def test_mask_counts_and_dense() -> None:
    """count, per_layer, per_module and dense agree with the picked indices."""
    mask = _neuron_mask()
    assert mask.count == 3 and mask.per_layer() == [2, 1]
    assert mask.per_module() == {N0: 2, N1: 1}
    assert mask.dense(N0, 4).tolist() == [False, True, False, True]
    assert mask.dense(N1, 4).tolist() == [False, False, True, False]
    heads = select(_scores(heads=[[0.0, 1.0], [2.0, 3.0]]), "heads", 1)
    assert heads.per_module() == {H0: 1, H1: 0} and heads.dense(H1, 2).tolist() == [False, False]
    assert mask.layer_of(N1) == 1 and mask.carriers() == LAYOUT.neuron_modules


def test_mask_manifest_fields() -> None:
    """The manifest carries granularity, counts, fingerprint, layout and provenance (method + selection)."""
    mask = select(_scores([[3.0, 1.0, 2.0, 1.0], [1.5, 5.0, 0.0, 2.0]]), "neurons", 3, scope="per_layer")
    manifest = mask.manifest()
    assert manifest["granularity"] == "neurons" and manifest["count"] == 3
    assert manifest["per_layer"] == [2, 1] and manifest["per_module"] == {N0: 2, N1: 1}
    assert manifest["units_per_module"] == 4
    assert manifest["fingerprint"] == fingerprint(_model()).to_dict()
    assert manifest["layout"] == LAYOUT.to_dict()
    assert manifest["provenance"]["scores"] == {
        "method": "lrp",
        "settings": {"method": "lrp", "aggregation": "signed"},
        "num_samples": 4,
    }
    assert manifest["provenance"]["selection"] == {
        "granularity": "neurons",
        "budget": 3,
        "count": 3,
        "scope": "per_layer",
        "modules": None,
        "layers": None,
    }
    json.dumps(manifest)  # serialisable


def test_mask_rejects_bad_indices() -> None:
    """Indices on a module the layout lacks, or not 1-D int64, are refused."""
    fp = fingerprint(_model())
    with pytest.raises(ValueError, match="does not have"):
        Mask("neurons", fp, LAYOUT, {"blocks.9.mlp.out": torch.tensor([0])})
    with pytest.raises(ValueError, match="int64"):
        Mask("neurons", fp, LAYOUT, {N0: torch.tensor([0], dtype=torch.int32)})
    with pytest.raises(ValueError, match="granularity"):
        Mask("layers", fp, LAYOUT, {})


def test_mask_save_load_round_trip(tmp_path: Path) -> None:
    """save/load keeps indices, granularity, fingerprint, layout, provenance and creation time."""
    scores, _ = _weight_scores("opt")
    for value in scores.weights.values():
        value.copy_(torch.arange(value.numel(), dtype=value.dtype).reshape(value.shape).flip(0))
    for mask in (_neuron_mask(), select(scores, "weights", 0.1, modules="fc*", scope="per_layer")):
        directory = mask.save(tmp_path / mask.granularity)
        loaded = Mask.load(directory)
        assert loaded.indices.keys() == mask.indices.keys()
        assert all(torch.equal(loaded.indices[k], mask.indices[k]) for k in mask.indices)
        assert (loaded.granularity, loaded.fingerprint, loaded.layout) == (
            mask.granularity,
            mask.fingerprint,
            mask.layout,
        )
        assert loaded.provenance == mask.provenance and loaded.created == mask.created
        assert loaded.count == mask.count and loaded.per_layer() == mask.per_layer()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neurons", "weights"]
    with pytest.raises(FileNotFoundError, match="mask"):
        Mask.load(tmp_path)


def test_load_refuses_a_tampered_manifest(tmp_path: Path) -> None:
    """A manifest whose count disagrees with the tensors, or of an unknown version, is refused."""
    _neuron_mask().save(tmp_path / "mask")
    meta_path = tmp_path / "mask" / "mask.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "count": 4}))
    with pytest.raises(ValueError, match="says 4 pruned units, the tensors hold 3"):
        Mask.load(tmp_path / "mask")
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version"):
        Mask.load(tmp_path / "mask")


def test_check_model_refuses_other_models() -> None:
    """check_model passes on its model and raises on another seed, a changed weight or another family."""
    mask = _neuron_mask()
    mask.check_model(_model())
    mask.check_model(copy.deepcopy(_model()).double())  # dtype does not change the fingerprint
    with pytest.raises(FingerprintMismatchError, match="different weights"):
        mask.check_model(_model(seed=1))
    changed = copy.deepcopy(_model())
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    with pytest.raises(FingerprintMismatchError, match="different weights"):
        mask.check_model(changed)
    with pytest.raises(FingerprintMismatchError, match="different architecture"):
        mask.check_model(_model("opt"))


def test_failing_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing save creates no directory and leaves an older mask there intact."""
    old = _neuron_mask()
    old.save(tmp_path / "kept")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(masks_module, "save_file", broken)
    new = select(_scores([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]), "neurons", 1)
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "kept", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    monkeypatch.undo()
    kept = Mask.load(tmp_path / "kept")
    assert _picked(kept) == _picked(old) and kept.created == old.created


def test_summary_lists_every_layer() -> None:
    """summary() has the header and one row per layer with its count, total and share."""
    text = _neuron_mask().summary()
    lines = text.splitlines()
    assert lines[0].startswith("3 neurons pruned") and "scores: lrp" in lines[0]
    assert fingerprint(_model()).short() in lines[0]
    assert lines[2].split() == ["0", "2", "4", "50.00%"]
    assert lines[3].split() == ["1", "1", "4", "25.00%"]
    assert len(lines) == 2 + LAYOUT.num_layers
    scores, sizes = _weight_scores("llama")
    weights = select(scores, "weights", 1.0, modules="down_proj", layers=[1])
    rows = [line.split() for line in weights.summary().splitlines()[2:]]
    size = sizes["model.layers.1.mlp.down_proj"]
    assert rows == [["0", "0", "-", "-"], ["1", str(size), str(size), "100.00%"]]


# -- geometry ---------------------------------------------------------------------------------------
def test_union_complement_and_units_per_layer() -> None:
    """union() merges units of one granularity, complement() is the rest, units_per_layer() the totals."""
    mask = _neuron_mask()
    other = select(_scores([[9.0, 9.0, 9.0, 0.0], [9.0, 9.0, 9.0, 9.0]]), "neurons", 1)
    merged = mask.union(other)
    assert merged.count == len({(n, i) for m in (mask, other) for n, ids in _picked(m).items() for i in ids})
    assert merged.provenance == {"merged": [mask.provenance, other.provenance]}
    rest = mask.complement()
    assert rest.count == 8 - mask.count and rest.provenance == {"complement_of": mask.provenance}
    assert mask.union(rest).count == 8
    assert mask.units_per_layer() == [4, 4]
    with pytest.raises(ValueError, match="cannot merge"):
        mask.union(select(_scores(heads=[[0.0, 1.0], [2.0, 3.0]]), "heads", 1))
    scores, sizes = _weight_scores("llama")
    weights = select(scores, "weights", 10, modules="down_proj", layers=[1])
    assert weights.units_per_layer() == [0, sizes["model.layers.1.mlp.down_proj"]]
    with pytest.raises(ValueError, match="total="):
        weights.complement()


def test_moved_names_warn_from_their_old_places() -> None:
    from hf_lrp_surgery.carriers import apply_masks
    from hf_lrp_surgery.training import merge_masks

    with pytest.warns(DeprecationWarning, match="hf_lrp_surgery.carriers.apply_masks"):
        from hf_lrp_surgery.apply import apply_masks as old
    assert old is apply_masks
    mask = _neuron_mask()
    with pytest.warns(DeprecationWarning, match="union"):
        assert _picked(merge_masks(mask, mask)) == _picked(mask)


# -- per-row scope (weights) ---------------------------------------------------------------------
def _random_weight_scores(family: str, seed: int = 0) -> tuple[Scores, dict[str, torch.Tensor]]:
    """Random weight scores on a tiny model's real layout (stored orientation), fingerprinted as it."""
    model = _model(family)
    layout = Layout.of(resolve(model))
    generator = torch.Generator().manual_seed(seed)
    values = {
        name: torch.rand(model.get_submodule(name).weight.shape, generator=generator) for name in layout.weight_modules
    }
    return _scores(weights=values, layout=layout, model=model), values


def _row_counts(mask: Mask, name: str, shape: torch.Size, *, conv1d: bool) -> torch.Tensor:
    """Pruned entries per output feature (row of a Linear weight, column of a Conv1D weight)."""
    dense = torch.zeros(shape.numel(), dtype=torch.bool)
    dense[mask.indices.get(name, torch.zeros(0, dtype=torch.int64))] = True
    dense = dense.reshape(shape)
    return dense.sum(0) if conv1d else dense.sum(1)


def test_per_row_prunes_the_same_fraction_of_every_output_row() -> None:
    """A fractional budget: every row prunes floor or ceil of its share (±1), its lowest entries."""
    scores, values = _random_weight_scores("llama")
    assert scores.layout.weight_orientation == "linear"
    mask = select(scores, "weights", 0.3, scope="per_row")
    total = sum(v.numel() for v in values.values())
    assert mask.count == round(0.3 * total) and mask.provenance["selection"]["scope"] == "per_row"
    counts = torch.cat([_row_counts(mask, n, v.shape, conv1d=False) for n, v in values.items()])
    # rows of different widths prune the same fraction: within one entry of 0.3 * width
    widths = torch.cat([torch.full((v.shape[0],), v.shape[1]) for v in values.values()])
    assert bool(((counts - 0.3 * widths).abs() < 1).all())
    for name, value in values.items():  # ranked within the row: the pruned entries are the row's lowest
        per_row = _row_counts(mask, name, value.shape, conv1d=False)
        dense = torch.zeros(value.numel(), dtype=torch.bool)
        dense[mask.indices[name]] = True
        for row in range(value.shape[0]):
            lowest = torch.sort(value[row], stable=True).indices[: int(per_row[row])]
            assert torch.equal(dense.reshape(value.shape)[row].nonzero().flatten(), lowest.sort().values)


def test_per_row_never_takes_protected_entries_and_spreads_by_eligible_count() -> None:
    scores, values = _random_weight_scores("llama", seed=1)
    name = next(iter(values))
    protected = values[name].clone()
    protected[0, :] = INF  # a fully protected row
    protected[1, : protected.shape[1] // 2] = INF  # half protected
    scores.weights[name] = protected
    mask = select(scores, "weights", 0.5, scope="per_row", modules=[name])
    picked = mask.indices[name]
    assert not bool(torch.isinf(protected.flatten()[picked]).any())
    counts = _row_counts(mask, name, protected.shape, conv1d=False)
    assert int(counts[0]) == 0
    eligible = torch.isfinite(protected).sum(1)
    assert bool(((counts - 0.5 * eligible).abs() < 1).all())
    assert mask.count == round(0.5 * int(eligible.sum()))


def test_per_row_on_conv1d_ranks_along_the_output_axis() -> None:
    """GPT-2's Conv1D stores [in, out]: an output row is a column of the stored matrix."""
    scores, values = _random_weight_scores("gpt2")
    assert scores.layout.weight_orientation == "conv1d"
    mask = select(scores, "weights", 0.25, scope="per_row")
    for name, value in values.items():
        counts = _row_counts(mask, name, value.shape, conv1d=True)
        assert bool(((counts - 0.25 * value.shape[0]).abs() < 1).all()), name
        dense = torch.zeros(value.numel(), dtype=torch.bool)
        dense[mask.indices[name]] = True
        column = int(counts.argmax())
        lowest = torch.sort(value[:, column], stable=True).indices[: int(counts[column])]
        assert torch.equal(dense.reshape(value.shape)[:, column].nonzero().flatten(), lowest.sort().values)


def test_per_row_refusals_and_older_layouts() -> None:
    neurons = _scores([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    with pytest.raises(ValueError, match="per_row.*neurons have no rows"):
        select(neurons, "neurons", 1, scope="per_row")
    with pytest.raises(ValueError, match="per_row"):
        SelectionOptions(granularity="heads", scope="per_row")
    assert "per_row" in SCOPES
    scores, _ = _random_weight_scores("llama")
    data = scores.layout.to_dict()
    data.pop("weight_orientation")
    older = Layout.from_dict(data)  # a layout saved before the orientation was recorded
    assert older.weight_orientation is None and older == scores.layout
    with pytest.raises(ValueError, match="score the model again"):
        select(replace(scores, layout=older), "weights", 0.1, scope="per_row")


# -- soft masks ----------------------------------------------------------------------------------
def test_soft_mask_scales_are_validated_and_round_trip(tmp_path: Path) -> None:
    mask = _neuron_mask()  # (0, 1), (0, 3), (1, 2)
    soft = mask.with_scales({N0: [0.0, 0.5], N1: [0.25]}, how="constant")
    assert soft.soft and not mask.soft and soft.dampened == 2 and soft.count == 3
    assert soft.scale_of(N0).tolist() == [0.0, 0.5] and mask.scale_of(N0).tolist() == [0.0, 0.0]
    assert soft.provenance["dampening"] == "constant" and soft.with_scales(None).scales is None
    assert "dampening" not in soft.with_scales(None).provenance
    for bad, problem in (
        ({N0: [0.0, 1.0], N1: [0.25]}, r"outside \[0, 1\)"),
        ({N0: [0.0, -0.1], N1: [0.25]}, r"outside \[0, 1\)"),
        ({N0: [0.0, float("nan")], N1: [0.25]}, r"outside \[0, 1\)"),
        ({N0: [0.0], N1: [0.25]}, "1 values for 2 indices"),
        ({N0: [0.0, 0.5]}, "exactly the modules"),
    ):
        with pytest.raises(MaskManifestError, match=problem):
            mask.with_scales(bad)  # type: ignore[arg-type]
    directory = soft.save(tmp_path / "soft")
    manifest = json.loads((directory / "mask.json").read_text())
    assert manifest["soft"] is True and manifest["dampened"] == 2
    loaded = Mask.load(directory)
    assert loaded.scales is not None and soft.scales is not None
    assert all(torch.equal(loaded.scales[k], soft.scales[k]) for k in soft.scales)
    assert Mask.load(mask.save(tmp_path / "hard")).scales is None


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ({"scale:blocks.0.mlp.out": torch.tensor([0.0, 1.5])}, r"outside \[0, 1\)"),
        ({"scale:blocks.0.mlp.out": torch.tensor([0.0, 0.5, 0.5])}, "3 values for 2 indices"),
        ({"scale:blocks.0.mlp.out": torch.tensor([0.0, 0.5], dtype=torch.float64)}, "float32"),
        ({"scale:blocks.0.mlp.out": torch.tensor([0.0, 0.0])}, "dampened"),
    ],
)
def test_a_damaged_scales_file_is_refused(tamper: dict[str, torch.Tensor], problem: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = _neuron_mask().with_scales({N0: [0.0, 0.5], N1: [0.25]}).save(tmp_path / "soft")
    tensors = load_file(str(directory / "mask.safetensors"))
    save_file({**tensors, **tamper}, str(directory / "mask.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MaskManifestError, match=problem):
        Mask.load(directory)


def test_soft_and_hard_flags_must_agree_and_older_masks_load_hard(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = _neuron_mask().with_scales({N0: [0.0, 0.5], N1: [0.25]}).save(tmp_path / "soft")
    tensors = load_file(str(directory / "mask.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("scale:")}, str(directory / "mask.safetensors"))
    with pytest.raises(MaskManifestError, match="says the mask is soft, the tensors lack scales"):
        Mask.load(directory)
    hard = _neuron_mask().save(tmp_path / "hard")
    manifest = json.loads((hard / "mask.json").read_text())
    for key in ("soft", "dampened"):  # a manifest of an earlier release
        manifest.pop(key)
    manifest["layout"].pop("weight_orientation")
    (hard / "mask.json").write_text(json.dumps(manifest))
    older = Mask.load(hard)
    assert older.scales is None and older.layout == LAYOUT


def test_union_of_soft_masks_takes_the_smaller_scale_and_complement_refuses() -> None:
    mask = _neuron_mask()  # (0, 1), (0, 3), (1, 2)
    a = mask.with_scales({N0: [0.5, 0.25], N1: [0.75]})
    other = select(_scores([[9.0, 0.0, 9.0, 0.5], [9.0, 9.0, 9.0, 9.0]]), "neurons", 2)  # (0, 1), (0, 3)
    b = other.with_scales({N0: [0.125, 0.5]})
    merged = a.union(b)
    assert _picked(merged) == {N0: [1, 3], N1: [2]} and merged.scales is not None
    assert merged.scales[N0].tolist() == [0.125, 0.25] and merged.scales[N1].tolist() == [0.75]
    hard_union = a.union(other)  # a hard mask's units count as 0
    assert hard_union.scales is not None and hard_union.scales[N0].tolist() == [0.0, 0.0]
    assert a.union(a).scales is not None and torch.equal(a.union(a).scales[N1], a.scale_of(N1))
    assert mask.union(other).scales is None
    with pytest.raises(ValueError, match="soft mask has no complement"):
        a.complement()
    assert a.with_scales(None).complement().count == 8 - 3


def test_dampening_scales_constant_and_relevance() -> None:
    scores = _scores([[3.0, 1.0, 2.0, 1.0], [1.5, 5.0, 0.0, 2.0]])
    mask = select(scores, "neurons", 3)  # scores 1.0 (0, 1), 1.0 (0, 3), 0.0 (1, 2); first kept: 1.5
    constant = dampening_scales(mask, scores, "constant:0.25")
    assert constant[N0].tolist() == [0.25, 0.25] and dampening_scales(mask, scores, 0.5)[N1].tolist() == [0.5]
    relevance = dampening_scales(mask, scores, "relevance")
    # alpha = (s - s_min) / (t - s_min) with s_min = 0.0 (the most undesired) and t = 1.5 (the first kept unit)
    assert relevance[N1].tolist() == [0.0]
    torch.testing.assert_close(relevance[N0], torch.tensor([1.0 / 1.5, 1.0 / 1.5]))
    soft = select(scores, "neurons", 3, dampen="relevance")
    assert soft.scales is not None and torch.equal(soft.scales[N0], relevance[N0])
    assert soft.provenance["selection"]["dampen"] == "relevance"
    assert SelectionOptions(dampen=0.5).select(scores, 3).scale_of(N0).tolist() == [0.5, 0.5]
    every = select(scores, "neurons", 8)  # nothing left out: t is the highest selected score
    assert float(max(s.max() for s in dampening_scales(every, scores, "relevance").values())) < 1.0
    for bad in ("constant:1.0", "constant:x", 1.5, -0.1, "median", True):
        with pytest.raises(ValueError, match="dampening must be"):
            dampening_scales(mask, scores, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dampening must be"):
        SelectionOptions(dampen="linear")


def test_hard_part_keeps_the_scale_zero_units() -> None:
    soft = _neuron_mask().with_scales({N0: [0.0, 0.5], N1: [0.0]})
    hard = hard_part(soft)
    assert not hard.soft and _picked(hard) == {N0: [1], N1: [2]}
    plain = _neuron_mask()
    assert hard_part(plain) is plain


def test_mask_from_dense_scales_takes_the_units_below_one() -> None:
    """Dense per-unit scales (AurA's form: 1 = untouched) become the soft mask of the units below 1."""
    scores = _scores([[3.0, 1.0, 2.0, 1.0], [1.5, 5.0, 0.0, 2.0]])
    soft = mask_from_scales(scores, "neurons", {N0: torch.tensor([1.0, 0.5, 1.0, 0.0])}, how="aura")
    assert _picked(soft) == {N0: [1, 3]} and soft.scale_of(N0).tolist() == [0.5, 0.0]
    assert soft.provenance["dampening"] == "aura" and soft.dampened == 1
    for bad, problem in (
        ({N0: torch.ones(3)}, "one per neuron"),
        ({H0: torch.ones(4)}, "carries none"),
        ({N0: torch.tensor([1.0, 1.5, 1.0, 1.0])}, r"in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=problem):
            mask_from_scales(scores, "neurons", bad)
