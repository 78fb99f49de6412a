"""Circuit discovery: next-token tasks (IOI and user-given), attribution-guided pruning to the
smallest circuit that keeps the task (neurons, heads or weights; zero, mean or corrupted
ablation), and comparison with baseline scores."""

from hf_lrp_surgery.circuits.ablation import ABLATIONS, Ablation, AblationKind, PreparedTask
from hf_lrp_surgery.circuits.compare import CircuitComparison, compare_methods, specificity
from hf_lrp_surgery.circuits.discovery import (
    CIRCUIT_SCOPES,
    Circuit,
    CircuitDiscoveryError,
    CircuitScope,
    CurvePoint,
    NoCircuitError,
    PruningCurve,
    ablated,
    default_scope,
    discover_circuit,
    pruning_curve,
    sparsity_grid,
    task_scores,
)
from hf_lrp_surgery.circuits.tasks import (
    NextTokenExample,
    NextTokenTask,
    TaskMetrics,
    evaluate_task,
    ioi_sets,
    ioi_task,
    load_task,
    metrics_from_logits,
    next_token_task,
)

__all__ = [
    "ABLATIONS",
    "Ablation",
    "AblationKind",
    "CIRCUIT_SCOPES",
    "Circuit",
    "CircuitScope",
    "CircuitComparison",
    "CircuitDiscoveryError",
    "CurvePoint",
    "NextTokenExample",
    "NextTokenTask",
    "NoCircuitError",
    "PreparedTask",
    "PruningCurve",
    "TaskMetrics",
    "ablated",
    "compare_methods",
    "default_scope",
    "discover_circuit",
    "evaluate_task",
    "ioi_sets",
    "ioi_task",
    "load_task",
    "metrics_from_logits",
    "next_token_task",
    "pruning_curve",
    "sparsity_grid",
    "specificity",
    "task_scores",
]
