"""mope: mixtures of LoRA experts as a PEFT method.

Importing this package registers the method with PEFT, so ``get_peft_model(model, MoPEConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work like for LoRA::

    import mope
    from peft import PeftModel, get_peft_model

    model = get_peft_model(base, mope.MoPEConfig(num_experts=8, r=8, top_k=2,
                                                 target_modules=["gate_proj", "up_proj", "down_proj"]))
    loss = task_loss + mope.aux_loss(model)            # router load balancing (+ z-loss)
    model.save_pretrained("adapter/")                  # adapter_config.json: peft_type "MOPE"
    model = PeftModel.from_pretrained(base, "adapter/")
    mope.export(model, "mixtral/")                     # routing="block" on Llama/Mistral -> Mixtral

Loading a saved adapter checks that the file's weights are exactly those its adapter_config.json
builds (routing, num_experts, r, share_a, shared_expert, targets) and raises `MoPELoadError` when
they are not, instead of PEFT's warning and randomly initialised experts.

Without ``import mope``, ``PeftModel.from_pretrained`` of a MoPE adapter fails inside PEFT with a
bare ``KeyError: 'MOPE'``. Code that loads adapters it did not create checks first with
``mope.is_mope_adapter(path_or_config_dict)`` (reads ``adapter_config.json``, no network) and
imports mope, or raises with ``mope.MOPE_IMPORT_HINT``, the message to show users.
"""

from peft.utils import register_peft_method

from mope._peft_type import check_peft_load_hook, ensure_mope_peft_type
from mope.config import MoPEConfig
from mope.errors import MoPEConfigError, MoPEError, MoPEExportError, MoPELoadError, MoPEMergeError
from mope.export import export, export_adapter
from mope.layer import GatedFFNBlock, Linear, MoPELayer
from mope.loading import is_mope_adapter
from mope.model import MoPEModel
from mope.training import aux_loss, router_stats
from upcycle.errors import MOPE_IMPORT_HINT

__all__ = [
    "MOPE_IMPORT_HINT",
    "GatedFFNBlock",
    "Linear",
    "MoPEConfig",
    "MoPEConfigError",
    "MoPEError",
    "MoPEExportError",
    "MoPELayer",
    "MoPELoadError",
    "MoPEMergeError",
    "MoPEModel",
    "aux_loss",
    "export",
    "export_adapter",
    "is_mope_adapter",
    "router_stats",
]


def _register() -> None:
    """Register MoPE with PEFT (config, tuner and the "MOPE" PeftType), once per process."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    check_peft_load_hook()
    peft_type = ensure_mope_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is MoPEModel:
        return
    register_peft_method(name="mope", config_cls=MoPEConfig, model_cls=MoPEModel)


_register()
