"""Weight norms per unit, shared by the magnitude and Wanda scorers."""

from __future__ import annotations

import torch
from torch import nn

from hf_lrp_surgery.lrp.architectures import ResolvedArchitecture, parameter


def unit_weight_norms(module: nn.Module, arch: ResolvedArchitecture, groups: int) -> torch.Tensor:
    """L2 norm of the weights that read each input unit of ``module`` (one unit or one head per group)."""
    weight = parameter(module).detach().float().cpu()
    per_input = weight if arch.spec.orientation == "conv1d" else weight.T  # [in, out]
    squares = per_input.pow(2).sum(1)
    if groups > 1:
        squares = squares.unflatten(0, (groups, -1)).sum(1)
    return squares.sqrt()
