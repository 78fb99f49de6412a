"""How masks are carried by a model: a registry of carriers and the saved corrected-model format.

* :mod:`~hf_lrp_surgery.carriers.bake`: zeros in the weights (an ordinary checkpoint).
* :mod:`~hf_lrp_surgery.carriers.ia3`: neuron and head masks as a PEFT IA3 adapter (switchable off).
* :mod:`~hf_lrp_surgery.carriers.hooks`: forward pre-hooks on a model in memory (training, circuits).
* :mod:`~hf_lrp_surgery.carriers.probe`: the logits probe that recognises a corrected model.
* :mod:`~hf_lrp_surgery.carriers.corrected`: :func:`apply_masks`, save, load and :func:`verify`.

A new carrier is one module with a :class:`Carrier` subclass plus one :func:`register_carrier` line below.
"""

from hf_lrp_surgery.carriers.bake import BakeCarrier, bake
from hf_lrp_surgery.carriers.corrected import (
    CHECK_FILE,
    SURGERY_DIR,
    CarrierName,
    CorrectedModel,
    apply_masks,
    load_corrected,
    read_surgery,
    save_corrected,
    set_adapter_enabled,
    verify,
)
from hf_lrp_surgery.carriers.hooks import HooksCarrier, MaskHooks
from hf_lrp_surgery.carriers.ia3 import AdapterCarrier, to_adapter
from hf_lrp_surgery.carriers.probe import LogitsProbe
from hf_lrp_surgery.carriers.registry import (
    CARRIERS,
    Carrier,
    CarrierCard,
    LoadOptions,
    get_carrier,
    model_files,
    register_carrier,
    unregister_carrier,
)

register_carrier(BakeCarrier())
register_carrier(AdapterCarrier())
register_carrier(HooksCarrier())

__all__ = [
    "CARRIERS",
    "CHECK_FILE",
    "SURGERY_DIR",
    "AdapterCarrier",
    "BakeCarrier",
    "Carrier",
    "CarrierCard",
    "CarrierName",
    "CorrectedModel",
    "HooksCarrier",
    "LoadOptions",
    "LogitsProbe",
    "MaskHooks",
    "apply_masks",
    "bake",
    "get_carrier",
    "load_corrected",
    "model_files",
    "read_surgery",
    "register_carrier",
    "save_corrected",
    "set_adapter_enabled",
    "to_adapter",
    "unregister_carrier",
    "verify",
]
