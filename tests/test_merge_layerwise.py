"""Layer-wise calibration (`upcycle.merging.layerwise`): the MoE run one decoder layer at a time gives the
same routing statistics, bit for bit, as the whole model loaded in transformers."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import DENSE_CASES
from transformers import AutoModelForCausalLM

from upcycle.calibration import RoutingRecorder, collect_routing_statistics
from upcycle.convert import convert
from upcycle.merge import merge
from upcycle.merging.calibrate import moe_layer_probe
from upcycle.merging.layerwise import LayerwiseModel
from upcycle.merging.plan import expert_stream
from upcycle.merging.source import open_moe

GLM4 = dict(target="glm4_moe", experts=4, expert_groups=2, top_groups=1, routed_scaling=2.5)
CASES = [(case, None, "all", {}) for case in DENSE_CASES] + [
    ("llama-gqa", "fused", "all", {}),
    ("qwen2", "fused", "all", {}),
    ("qwen2", None, "1", {}),  # layer 0 stays dense inside the MoE
    ("qwen3-head-dim", None, "1-", GLM4),  # sigmoid, group-limited routing with a selection bias
    ("llama-gqa", "fused", "all", GLM4),
]


def batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of random ids, right-padded (the calibration tokenizer pads right)."""
    generator = torch.Generator().manual_seed(3)
    result = []
    for lengths in ((9, 5, 9), (7, 2)):
        ids = torch.randint(3, 97, (len(lengths), max(lengths)), generator=generator)
        mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).long()
        result.append({"input_ids": ids * mask, "attention_mask": mask})
    return result


@pytest.mark.parametrize(
    ("case", "layout", "moe_layers", "target"),
    CASES,
    ids=[f"{c}-{lay}-{m}-{t.get('target', 'natural')}" for c, lay, m, t in CASES],
)
def test_layerwise_statistics_equal_the_whole_model_bitwise(dense_models, tmp_path, case, layout, moe_layers, target):
    convert(
        dense_models[case],
        tmp_path / "moe",
        **{"experts": 3, **target},
        top_k=2,
        method="drop",  # distinct experts, so expert outputs tell them apart
        layout=layout,
        moe_layers=moe_layers,
        quiet=True,
    )
    moe = open_moe(tmp_path / "moe")
    probes = {layer: moe_layer_probe(moe, layer) for layer in moe.moe_layers}
    options = dict(top_k=moe.top_k, normalize_top_k=True, expert_outputs=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype="auto")
    expected = collect_routing_statistics(model, batches(), probes, quiet=True, **options)

    recorder_box = []
    runner = LayerwiseModel(
        moe,
        batches(),
        lambda batch: setattr(recorder_box[0], "mask", batch["attention_mask"].reshape(-1).bool()),
        expert_stream(moe, calibrating=True),
    )
    with RoutingRecorder(runner.model, probes, **options) as recorder:
        recorder_box.append(recorder)
        runner.advance(max(moe.moe_layers))

    assert expected.keys() == recorder.stats.keys() == set(moe.moe_layers)
    for layer, want in expected.items():
        got = recorder.stats[layer]
        assert got.tokens == want.tokens == 9 + 5 + 9 + 7 + 2
        for field in ("selection_counts", "probability_sum", "weight_sum", "expert_output_sum"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (layer, field)
        assert got.shared_gate_sum == want.shared_gate_sum
    # The last layer's experts stay in memory for the merge, as transformers holds them.
    last = max(moe.moe_layers)
    experts = dict(model.get_submodule(moe.module_name(last)).experts.named_parameters())
    size = moe.expert_size
    assert torch.equal(torch.stack(runner.experts(last, "gate")), experts["gate_up_proj"][:, :size])
    assert torch.equal(torch.stack(runner.experts(last, "up")), experts["gate_up_proj"][:, size:])
    assert torch.equal(torch.stack(runner.experts(last, "down")), experts["down_proj"])


def test_calibrated_select_writes_each_layers_own_chosen_expert(tmp_path):
    """`select` returns a view of the calibration's expert stacks, which the next layer is read into: what is
    written for each layer must still be that layer's expert (the merge copies such views before handing them
    to the writer's thread)."""
    example = Path(__file__).parents[1] / "examples" / "tiny-llama"
    convert(example, tmp_path / "moe", experts=3, top_k=2, method="drop", drop_ratio=0.5, quiet=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"calibration text number {i} about the {i % 5} foxes" for i in range(24)))
    summary = merge(tmp_path / "moe", tmp_path / "out", method="select", calibration=corpus, quiet=True)
    moe = open_moe(tmp_path / "moe")
    assert len(moe.moe_layers) > 1
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), framework="pt") as merged:
        for layer in moe.moe_layers:
            chosen = max(range(3), key=lambda expert: summary.expert_weights[layer][expert])
            for projection in ("gate", "up", "down"):
                expert = moe.checkpoint.tensors.get(moe.projection_tensor_names(layer)[projection][chosen])
                written = merged.get_tensor(f"model.layers.{layer}.mlp.{projection}_proj.weight")
                assert torch.equal(written, expert), (layer, projection)
