"""A bad MoPE config fails before any training, with a message that names the problem and the fix."""

import enum
import sys
from pathlib import Path

import pytest
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from mope_testlib import FFN, tiny_llama  # noqa: E402

import mope  # noqa: E402
from mope._peft_type import check_peft_load_hook, ensure_mope_peft_type  # noqa: E402
from upcycle.errors import UpcycleError  # noqa: E402


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 5, "num_experts": 4}, r"top_k=5 must be between 0 \(dense mixture\) and num_experts=4"),
        ({"r": 0}, r"r=0 must be an integer >= 1"),
        ({"num_experts": 0, "top_k": 0}, r"num_experts=0 must be an integer >= 1"),
        ({"router": "bogus"}, r"unknown router 'bogus'; valid kinds: .*topk"),
        ({"router": "soft"}, r"router 'soft' mixes tokens or parameters"),
        ({"router": "dense", "top_k": 2}, r"router='dense' uses every expert; set top_k=0"),
        ({"router_options": {"nope": 1}}, r"cannot build router 'topk': .*does not take option\(s\) nope"),
        ({"routing": "layer"}, r"routing='layer' is not one of"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0 must be in \[0, 1\)"),
        ({"router_noise": -0.1}, r"router_noise=-0.1 must be >= 0"),
        ({"aux_loss_coef": -1.0}, r"aux_loss_coef=-1.0 must be >= 0"),
        ({"num_experts_pattern": {"layers.1": 1}, "top_k": 2}, r"must be an integer >= max\(1, top_k=2\)"),
        ({"num_experts_pattern": {"layers.(": 4}}, r"not a valid regular expression"),
    ],
)
def test_bad_config_values_raise_a_clear_error_before_the_model_is_touched(options, message):
    base = tiny_llama()
    with pytest.raises(mope.MoPEConfigError, match=message) as raised:
        get_peft_model(base, mope.MoPEConfig(target_modules=FFN, **options))
    assert isinstance(raised.value, UpcycleError) and isinstance(raised.value, ValueError)
    assert not any(isinstance(module, mope.MoPELayer) for module in base.modules())


def test_a_target_module_missing_from_the_model_is_reported_by_name():
    with pytest.raises(ValueError, match=r"Target modules \{'w1'\} not found in the base model"):
        get_peft_model(tiny_llama(), mope.MoPEConfig(target_modules=["w1"]))


def test_a_target_that_is_not_a_linear_layer_is_refused():
    with pytest.raises(mope.MoPEConfigError, match=r"model.layers.0.input_layernorm is a LlamaRMSNorm; MoPE adapts"):
        get_peft_model(tiny_llama(), mope.MoPEConfig(target_modules=["input_layernorm"]))


def test_a_peft_whose_peft_type_cannot_be_extended_gets_a_clear_error():
    class ClosedPeftType(enum.Enum):  # not a str enum: the one shape change this code cannot follow
        LORA = "LORA"

    with pytest.raises(mope.MoPEError, match=r"could not add 'MOPE' to peft.utils.PeftType .* peft>=0.21,<0.22"):
        ensure_mope_peft_type(ClosedPeftType)
    assert [member.value for member in ClosedPeftType] == ["LORA"]


def test_a_peft_without_the_load_hook_is_refused_instead_of_loading_random_experts():
    class OldBaseTuner:  # peft 0.20: no _remap_adapter_state_dict_for_load
        pass

    check_peft_load_hook()  # the installed PEFT has it
    with pytest.raises(mope.MoPEError, match=r"no BaseTuner._remap_adapter_state_dict_for_load.* peft>=0.21,<0.22"):
        check_peft_load_hook(OldBaseTuner)


def test_registration_adds_mope_to_peft_once():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PeftType("MOPE") is PeftType.MOPE is ensure_mope_peft_type()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOPE] is mope.MoPEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MOPE] is mope.MoPEModel
    assert [member for member in PeftType if member == "MOPE"] == [PeftType.MOPE]
