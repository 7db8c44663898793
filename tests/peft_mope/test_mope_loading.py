"""Loading a saved MoPE adapter: weights that do not match adapter_config.json are refused (never
randomly initialised experts), and a MoPE adapter is recognisable before PEFT is asked to load it."""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from mope_testlib import FFN, input_ids, logits, mope_model, tiny_llama  # noqa: E402

import mope  # noqa: E402
from upcycle.errors import UpcycleError  # noqa: E402


def _saved(tmp_path: Path, **config) -> Path:
    directory = tmp_path / "adapter"
    mope_model(**config).save_pretrained(directory)
    return directory


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("saved", "edited", "message"),
    [
        (
            {"routing": "block"},
            {"routing": "linear"},
            r"MoPE weight\(s\) the config asks for that are not in the file \(model\.layers\.0\.mlp\.down_proj\.mope_A;"
            r".*MoPE weight\(s\) in the file have no place .*\(model\.layers\.0\.mlp\.mope_A\.down_proj;"
            r".*The file holds routing='block' weights .* but the config says routing='linear'",
        ),
        (
            {"routing": "linear"},
            {"routing": "block"},
            r"The file holds routing='linear' weights .* but the config says routing='block'",
        ),
        (
            {"num_experts": 4},
            {"num_experts": 8},
            r"have other shapes \(model\.layers\.0\.mlp\.down_proj\.mope_A: \(4, 2, 48\) in the file, "
            r"\(8, 2, 48\) from the config",
        ),
        ({"r": 2}, {"r": 4}, r"mope_A: \(4, 2, 48\) in the file, \(4, 4, 48\) from the config"),
        ({"shared_expert": False}, {"shared_expert": True}, r"not in the file \(.*mope_shared_A"),
    ],
)
def test_an_adapter_whose_config_no_longer_matches_its_weights_is_refused(tmp_path, saved, edited, message):
    directory = _saved(tmp_path, **saved)
    _edit_config(directory, **edited)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # refused before PEFT's "missing adapter keys" warning
        with pytest.raises(mope.MoPELoadError, match=message) as raised:
            PeftModel.from_pretrained(tiny_llama(), str(directory))
    text = str(raised.value)
    assert "does not match its adapter_config.json" in text and "randomly initialised" in text
    assert "Fix: restore the adapter_config.json saved with these weights" in text and "\n" not in text
    assert isinstance(raised.value, mope.MoPEError) and isinstance(raised.value, UpcycleError)


def test_load_adapter_onto_an_existing_model_is_checked_too(tmp_path):
    directory = _saved(tmp_path, num_experts=4)
    _edit_config(directory, num_experts=6)
    model = mope_model()
    with pytest.raises(mope.MoPELoadError, match=r"adapter 'second' does not match.*\(4, 2, 48\) in the file"):
        model.load_adapter(str(directory), adapter_name="second")


def test_a_matching_adapter_still_loads_exactly(tmp_path):
    model = mope_model(routing="block", shared_expert=True, share_a=True, target_modules=[*FFN, "q_proj"])
    model.save_pretrained(tmp_path / "adapter")
    ids = input_ids()
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    loaded.load_adapter(str(tmp_path / "adapter"), adapter_name="again")
    assert set(loaded.peft_config) == {"default", "again"}


def test_is_mope_adapter_reads_the_peft_type_of_a_directory_a_file_or_a_dict(tmp_path):
    directory = _saved(tmp_path)
    assert mope.is_mope_adapter(directory) and mope.is_mope_adapter(str(directory))
    assert mope.is_mope_adapter(directory / "adapter_config.json")
    assert mope.is_mope_adapter(json.loads((directory / "adapter_config.json").read_text()))

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    assert not mope.is_mope_adapter(tmp_path / "lora") and not mope.is_mope_adapter({"peft_type": "LORA"})
    assert not mope.is_mope_adapter(tmp_path / "missing") and not mope.is_mope_adapter("someone/hub-adapter")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_bytes(b"\xff not json")
    (tmp_path / "list.json").write_text("[]")
    assert not mope.is_mope_adapter(tmp_path / "bad") and not mope.is_mope_adapter(tmp_path / "list.json")


def test_the_import_hint_names_the_fix():
    assert mope.MOPE_IMPORT_HINT == (
        "this is a MoPE adapter: `import mope` before PeftModel.from_pretrained (it registers the MOPE PEFT type)"
    )
