"""Where upcycle's own code meets a MoPE adapter it did not load, it says what to import (PEFT alone
fails with a bare KeyError: 'MOPE')."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_dense
from transformers import AutoModelForCausalLM

import mope
import upcycle
from upcycle.errors import MOPE_IMPORT_HINT, UpcycleError
from upcycle.inspection import format_report, inspect_source


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("mope-hint")
    base = AutoModelForCausalLM.from_pretrained(make_dense(root / "base", "llama"))
    torch.manual_seed(0)
    model = get_peft_model(base, mope.MoPEConfig(num_experts=2, r=2, target_modules=["gate_proj", "up_proj"]))
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def test_upcycle_load_of_a_mope_adapter_says_what_to_import(adapter):
    with pytest.raises(UpcycleError) as caught:
        upcycle.load(adapter)
    assert MOPE_IMPORT_HINT in str(caught.value) and "upcycle export" in str(caught.value)
    assert mope.MOPE_IMPORT_HINT == MOPE_IMPORT_HINT


def test_inspect_of_a_mope_adapter_says_how_to_load_it(adapter):
    info = inspect_source(adapter)
    assert info["loading"] == MOPE_IMPORT_HINT
    assert "`import mope`, then PeftModel.from_pretrained(base, ADAPTER)" in format_report(info)


def test_recipe_model_path_pointing_at_a_mope_adapter_is_refused_with_the_hint(adapter):
    from upcycle.training.config import ConfigError
    from upcycle.training.model import _auto_config

    with pytest.raises(ConfigError) as caught:
        _auto_config(str(adapter), None, False)
    assert str(caught.value).startswith("model.path:") and MOPE_IMPORT_HINT in str(caught.value)
