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
"""

from peft.utils import register_peft_method

from mope._peft_type import ensure_mope_peft_type
from mope.config import MoPEConfig
from mope.errors import MoPEConfigError, MoPEError, MoPEExportError, MoPEMergeError
from mope.export import export, export_adapter
from mope.layer import GatedFFNBlock, Linear, MoPELayer
from mope.model import MoPEModel
from mope.training import aux_loss, router_stats

__all__ = [
    "GatedFFNBlock",
    "Linear",
    "MoPEConfig",
    "MoPEConfigError",
    "MoPEError",
    "MoPEExportError",
    "MoPELayer",
    "MoPEMergeError",
    "MoPEModel",
    "aux_loss",
    "export",
    "export_adapter",
    "router_stats",
]


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ensure_mope_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is MoPEModel:
        return
    register_peft_method(name="mope", config_cls=MoPEConfig, model_cls=MoPEModel)


_register()
