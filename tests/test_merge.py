"""`upcycle merge`: a MoE folded back into its dense family, or into fewer experts."""

import json
import string

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import COMMON, DENSE_CASES, logits
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from upcycle.calibration import calibration_batches, load_calibration_texts
from upcycle.cli import main
from upcycle.convert import convert
from upcycle.families import find_family
from upcycle.merge import merge

EXPERTS = 4
MIXTRAL = ("mixtral", {"num_local_experts": EXPERTS, "num_experts_per_tok": 2, "intermediate_size": 24})
QWEN2_MOE_SHARED = (
    "qwen2_moe",
    {
        "num_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 16,
    },
)
# Keys a dense config may legitimately differ in after a round trip through a MoE.
UNCOMPARED_CONFIG_KEYS = {"transformers_version", "architectures", "upcycle", "_name_or_path", "dtype"}


def save_char_tokenizer(directory) -> None:
    """Save a character-level tokenizer whose ids fit the tiny models' vocabulary of 97."""
    chars = string.ascii_letters + string.digits + " .,:;()[]{}=_+-*/'\"#<>!"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= COMMON["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def make_moe(directory, model_type, fields, layout="per-expert", seed=0):
    """Save a tiny MoE with distinct random experts (a 'foreign' MoE, no upcycle provenance)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **fields})
    model = AutoModelForCausalLM.from_config(config)
    if layout == "fused":  # transformers 5 keeps experts fused in memory, under the fused layout's names
        directory.mkdir(parents=True)
        config.save_pretrained(directory)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        model.save_pretrained(directory)
    save_char_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    import json as json_module
    import textwrap

    paragraphs = textwrap.wrap(json_module.decoder.__doc__ * 6 + (json_module.__doc__ or "")[:3000], 90)
    path = tmp_path_factory.mktemp("data") / "calibration.txt"
    path.write_text("\n\n".join(paragraphs[:12]))
    return path


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_moe(tmp_path_factory.mktemp("moe") / "mixtral", *MIXTRAL)


def tensors_of(directory) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}


def glu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def experts_of(moe_tensors, layer):
    prefix = f"model.layers.{layer}.block_sparse_moe.experts"
    return [tuple(moe_tensors[f"{prefix}.{e}.{w}.weight"].double() for w in ("w1", "w3", "w2")) for e in range(EXPERTS)]


ROUND_TRIPS = [(case, None) for case in DENSE_CASES] + [("llama-gqa", "fused"), ("qwen2", "fused")]


@pytest.mark.parametrize(
    ("case", "layout"), ROUND_TRIPS, ids=[f"{c}-{layout or 'default'}" for c, layout in ROUND_TRIPS]
)
def test_merge_average_of_copy_upcycle_is_bitwise_dense(dense_models, tmp_path, input_ids, case, layout):
    source = dense_models[case]
    convert(source, tmp_path / "moe", experts=3, top_k=2, layout=layout, quiet=True)
    summary = merge(tmp_path / "moe", tmp_path / "dense", method="average", quiet=True)

    assert summary.target_model_type == DENSE_CASES[case][0]
    original, merged = tensors_of(source), tensors_of(tmp_path / "dense")
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(merged[name], tensor), name
    assert torch.equal(logits(tmp_path / "dense", input_ids), logits(source, input_ids))
    source_config = json.loads((source / "config.json").read_text())
    merged_config = json.loads((tmp_path / "dense" / "config.json").read_text())
    for key in source_config.keys() - UNCOMPARED_CONFIG_KEYS:
        assert merged_config[key] == source_config[key], key


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare"])
def test_task_vector_merges_of_copy_upcycle_give_back_the_recorded_dense_base(dense_models, tmp_path, method):
    """Every expert equals the base FFN, so every task vector is zero and the merge is the base itself."""
    source = dense_models["llama-gqa"]
    convert(source, tmp_path / "moe", experts=3, top_k=2, quiet=True)
    summary = merge(tmp_path / "moe", tmp_path / "dense", method=method, quiet=True)
    assert summary.base == str(source)
    original, merged = tensors_of(source), tensors_of(tmp_path / "dense")
    for name, tensor in original.items():
        assert torch.equal(merged[name], tensor), name
    provenance = json.loads((tmp_path / "dense" / "config.json").read_text())["upcycle"]
    # DARE's masks come from upcycle.rng.derived_generator; the provenance says so.
    assert (
        provenance.get("seed_scheme") == summary.settings.get("seed_scheme") == ("sha256" if method == "dare" else None)
    )


def test_concat_with_uniform_weights_equals_the_hand_computed_mixture_of_experts(mixtral, tmp_path):
    summary = merge(mixtral, tmp_path / "dense", method="concat", quiet=True)
    assert summary.intermediate_size == EXPERTS * 24
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert dense.config.intermediate_size == EXPERTS * 24
    moe_tensors = tensors_of(mixtral)
    x = torch.randn(5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    for layer in range(COMMON["num_hidden_layers"]):
        mixture = sum(glu(x.double(), *expert) / EXPERTS for expert in experts_of(moe_tensors, layer))
        with torch.no_grad():
            folded = dense.model.layers[layer].mlp(x)
        assert (folded.double() - mixture).abs().max().item() <= 1e-5


def test_frequency_weights_equal_router_counts_measured_by_the_model(mixtral, calibration_file, tmp_path):
    summary = merge(
        mixtral, tmp_path / "dense", method="frequency", calibration=calibration_file, batch_size=4, quiet=True
    )
    model = AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(mixtral)
    counts = torch.zeros(COMMON["num_hidden_layers"], EXPERTS, dtype=torch.float64)
    texts = load_calibration_texts(calibration_file, 128)
    for batch in calibration_batches(tokenizer, texts, max_length=256, batch_size=4):
        with torch.no_grad():
            router_logits = model(**batch, output_router_logits=True).router_logits
        real = batch["attention_mask"].reshape(-1).bool()
        for layer, layer_logits in enumerate(router_logits):
            chosen = layer_logits[real].topk(2, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(chosen, minlength=EXPERTS).double()

    assert summary.calibration["tokens"] == int(counts[0].sum().item()) // 2
    merged = tensors_of(tmp_path / "dense")
    moe_tensors = tensors_of(mixtral)
    for layer in range(COMMON["num_hidden_layers"]):
        assert torch.allclose(
            torch.tensor(summary.expert_weights[layer], dtype=torch.float64), counts[layer] / counts[layer].sum()
        )
        gates = [expert[0] for expert in experts_of(moe_tensors, layer)]
        expected = sum(c * g for c, g in zip(counts[layer].tolist(), gates, strict=True)) / counts[layer].sum()
        assert torch.allclose(merged[f"model.layers.{layer}.mlp.gate_proj.weight"].double(), expected, atol=1e-7)


@pytest.mark.parametrize(
    ("moe_case", "method", "with_data"),
    [(MIXTRAL, "frequency", True), (QWEN2_MOE_SHARED, "average", False), (MIXTRAL, "ties", False)],
    ids=["mixtral-hc-smoe-frequency", "qwen2-moe-shared-weight-grouping", "mixtral-ties-external-base"],
)
def test_fewer_experts_load_in_stock_transformers_with_k_experts(
    tmp_path, calibration_file, dense_models, moe_case, method, with_data
):
    moe = make_moe(tmp_path / "moe", *moe_case)
    base = None
    if method == "ties":  # a dense Mistral of the same shape serves as the base FFN
        base = tmp_path / "base"
        dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("mistral", **{**COMMON, "intermediate_size": 24}))
        dense.save_pretrained(base)
    summary = merge(
        moe,
        tmp_path / "small",
        method=method,
        experts=2,
        calibration=calibration_file if with_data else None,
        base=base,
        quiet=True,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "small", dtype=torch.float32)
    family = find_family({"model_type": "mistral" if moe_case is MIXTRAL else "qwen2"})
    assert getattr(model.config, family.experts_field) == 2
    assert model.config.model_type == moe_case[0]
    for layer in range(COMMON["num_hidden_layers"]):
        assert model.model.layers[layer].mlp.experts.gate_up_proj.shape[0] == 2
        groups = summary.groups[layer]
        assert len(groups) == 2 and sorted(e for group in groups for e in group) == list(range(EXPERTS))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 97, (1, 8))).logits).all()

    if method == "frequency":  # each merged expert is its group's usage-weighted mean, router rows too
        source, merged = tensors_of(moe), tensors_of(tmp_path / "small")
        weights = torch.tensor(summary.expert_weights[0], dtype=torch.float64)
        for index, group in enumerate(summary.groups[0]):
            w = weights[group] / weights[group].sum() if len(group) > 1 else torch.ones(1, dtype=torch.float64)
            prefix = "model.layers.0.block_sparse_moe"
            expected = sum(
                wi * source[f"{prefix}.experts.{e}.w1.weight"].double() for wi, e in zip(w, group, strict=True)
            )
            assert torch.allclose(merged[f"{prefix}.experts.{index}.w1.weight"].double(), expected, atol=1e-7)
            router = sum(wi * source[f"{prefix}.gate.weight"][e].double() for wi, e in zip(w, group, strict=True))
            assert torch.allclose(merged[f"{prefix}.gate.weight"][index].double(), router, atol=1e-7)


def test_foreign_mixtral_merges_to_a_mistral_that_loads_via_the_cli(mixtral, tmp_path, capsys):
    assert main(["merge", str(mixtral), str(tmp_path / "dense"), "--method", "average"]) == 0
    assert "mixtral -> mistral (average)" in capsys.readouterr().out
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert config["upcycle"]["operation"] == "merge" and config["upcycle"]["method"] == "average"
    card = (tmp_path / "dense" / "README.md").read_text()
    assert "base_model_relation: merge" in card and "`average`" in card
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert type(model).__name__ == "MistralForCausalLM"
    moe_tensors = tensors_of(mixtral)
    mean_gate = torch.stack([expert[0] for expert in experts_of(moe_tensors, 1)]).mean(0)
    assert torch.allclose(model.model.layers[1].mlp.gate_proj.weight.double(), mean_gate, atol=1e-7)
    assert torch.equal(
        model.model.layers[1].self_attn.q_proj.weight, moe_tensors["model.layers.1.self_attn.q_proj.weight"]
    )
    assert (tmp_path / "dense" / "tokenizer.json").is_file()


@pytest.mark.parametrize(("method", "with_data"), [("frequency", True), ("dare", False)])
def test_fused_layout_input_merges_exactly_like_per_expert_input(tmp_path, calibration_file, method, with_data):
    per_expert = make_moe(tmp_path / "per-expert", *MIXTRAL, layout="per-expert")
    fused = make_moe(tmp_path / "fused", *MIXTRAL, layout="fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors_of(fused)
    outputs = []
    for name, source in (("a", per_expert), ("b", fused)):
        data = calibration_file if with_data else None
        summary = merge(source, tmp_path / name, method=method, calibration=data, quiet=True)
        outputs.append((summary.expert_weights, tensors_of(tmp_path / name)))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1].keys() == outputs[1][1].keys()
    for name, tensor in outputs[0][1].items():
        assert torch.equal(outputs[1][1][name], tensor), name


def test_shared_expert_is_folded_in_with_a_half_gate_without_calibration_data(tmp_path):
    moe = make_moe(tmp_path / "moe", *QWEN2_MOE_SHARED)
    summary = merge(moe, tmp_path / "dense", method="average", quiet=True)
    assert summary.target_model_type == "qwen2" and summary.intermediate_size == 16 + 24
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    source = tensors_of(moe)
    x = torch.randn(5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(4)).double()
    prefix = "model.layers.0.mlp"
    shared = glu(x, *(source[f"{prefix}.shared_expert.{p}_proj.weight"].double() for p in ("gate", "up", "down")))
    mean = [
        torch.stack([source[f"{prefix}.experts.{e}.{p}_proj.weight"].double() for e in range(EXPERTS)]).mean(0)
        for p in ("gate", "up", "down")
    ]
    with torch.no_grad():
        folded = dense.model.layers[0].mlp(x.float()).double()
    assert (folded - (0.5 * shared + glu(x, *mean))).abs().max().item() <= 1e-5
