"""Expert construction methods and router initialisation: what each produces, and what it computes at init."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import logits, write_stdlib_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.calibration import calibration_batches, load_calibration_texts
from upcycle.cli import main as cli_main
from upcycle.convert import convert
from upcycle.errors import UpcycleError

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-llama"
# The tiny llama/qwen2 cases: hidden 32, intermediate 40, 2 layers (tests/tiny_models.py).
DENSE_SIZE, HIDDEN = 40, 32
MIXTRAL_EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
MIXTRAL_ROUTER = "model.layers.{layer}.block_sparse_moe.gate.weight"
DENSE = "model.layers.{layer}.mlp.{name}_proj.weight"
W = {"gate": "w1", "up": "w3", "down": "w2"}

METHODS = {
    "copy-noise": dict(method="copy", noise=0.01),
    "drop": dict(method="drop", drop_ratio=0.5),
    "granular": dict(method="granular", granularity=2),
    "partition-kmeans": dict(method="partition", partition_method="kmeans", experts=2, top_k=1),
}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}


def _convert(source, output, **settings):
    return convert(source, output, **{"experts": 4, "top_k": 2, "quiet": True, **settings})


def _max_diff(moe: Path, dense: Path, input_ids) -> float:
    return (logits(moe, input_ids) - logits(dense, input_ids)).abs().max().item()


@pytest.mark.parametrize("name", METHODS)
def test_each_method_is_reproducible_from_its_seed(dense_models, tmp_path, name):
    source = dense_models["llama-gqa"]
    first = _tensors(_convert(source, tmp_path / "a", seed=3, **METHODS[name]).output)
    again = _tensors(_convert(source, tmp_path / "b", seed=3, **METHODS[name]).output)
    other = _tensors(_convert(source, tmp_path / "c", seed=4, **METHODS[name]).output)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize(
    ("name", "experts", "top_k", "width"),
    [("copy-noise", 4, 2, 40), ("drop", 4, 2, 40), ("granular", 8, 4, 20), ("partition-kmeans", 2, 1, 20)],
)
def test_each_method_loads_in_stock_transformers_with_documented_shapes(
    dense_models, tmp_path, input_ids, name, experts, top_k, width
):
    summary = _convert(dense_models["llama-gqa"], tmp_path / "moe", **METHODS[name])
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert "auto_map" not in config
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (
        experts,
        top_k,
        width,
    )
    assert config["upcycle"]["method"] == METHODS[name]["method"] == summary.settings["method"]
    assert config["upcycle"]["exact_at_init"] is False
    tensors = _tensors(tmp_path / "moe")
    assert tensors[MIXTRAL_ROUTER.format(layer=1)].shape == (experts, HIDDEN)
    assert tensors[MIXTRAL_EXPERT.format(layer=1, expert=experts - 1, w="w1")].shape == (width, HIDDEN)
    assert tensors[MIXTRAL_EXPERT.format(layer=1, expert=experts - 1, w="w2")].shape == (HIDDEN, width)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")  # no trust_remote_code
    assert torch.isfinite(model(input_ids).logits).all()
    card = (tmp_path / "moe" / "README.md").read_text()
    assert f"| method | {METHODS[name]['method']} |" in card


def test_drop_redraws_exactly_the_ratio_per_expert_and_keeps_the_rest_bit_identical(dense_models, tmp_path):
    source = dense_models["llama-gqa"]
    _convert(source, tmp_path / "moe", method="drop", drop_ratio=0.25)
    dense, moe = _tensors(source), _tensors(tmp_path / "moe")
    for layer in range(2):
        dropped_sets = []
        for expert in range(4):
            kept = torch.ones(DENSE_SIZE, dtype=torch.bool)
            for name, axis in (("gate", 1), ("up", 1), ("down", 0)):
                same = (
                    moe[MIXTRAL_EXPERT.format(layer=layer, expert=expert, w=W[name])]
                    == dense[DENSE.format(layer=layer, name=name)]
                ).all(dim=axis)
                kept &= same
            # One neuron set per expert, whole neurons: every re-drawn neuron differs in all three.
            dropped = (~kept).nonzero().flatten()
            assert len(dropped) == int(0.25 * DENSE_SIZE) == 10
            dropped_sets.append(set(dropped.tolist()))
        assert len({frozenset(s) for s in dropped_sets}) == 4  # each expert draws its own neurons


def test_drop_redraws_from_the_replaced_weights_statistics(dense_models, tmp_path):
    source = dense_models["llama-gqa"]
    _convert(source, tmp_path / "moe", method="drop", drop_ratio=1.0, experts=8, top_k=1)
    dense, moe = _tensors(source), _tensors(tmp_path / "moe")
    gate = dense[DENSE.format(layer=0, name="gate")]
    redrawn = torch.cat([moe[MIXTRAL_EXPERT.format(layer=0, expert=e, w="w1")] for e in range(8)])
    assert redrawn.mean().item() == pytest.approx(gate.mean().item(), abs=0.01)
    assert redrawn.std().item() == pytest.approx(gate.std().item(), rel=0.05)


# Measured and documented in README (Expert methods): granular, G=2, 4 copies, top-1 copy,
class _ScaledSiLU(torch.nn.Module):
    """z -> silu(c z) / c."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.scale * z) / self.scale


def _dense_logits_with_activation(directory: Path, input_ids, activation: torch.nn.Module) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for layer in model.model.layers:
        layer.mlp.act_fn = activation
    with torch.no_grad():
        return model(input_ids).logits


def test_granular_paper_scaling_computes_the_dense_model_with_a_rescaled_silu(dense_models, tmp_path, input_ids):
    # With gate, up and down each x c = G^(1/3) and top-k picking one whole copy (G shards, weight
    # 1/G each), a neuron computes (c^2 / G) silu(c z) (u x) = silu(c z) / c * (u x): exactly the
    # dense FFN with SiLU replaced by z -> silu(c z) / c. SiLU is not homogeneous, so that is not
    # the dense model; the deviation is derived here, not a number from an earlier run.
    source = dense_models["llama-gqa"]
    _convert(source, tmp_path / "moe", method="granular", granularity=2, top_k=1)
    scale = 2 ** (1 / 3)
    expected = _dense_logits_with_activation(source, input_ids, _ScaledSiLU(scale))
    moe_logits = logits(tmp_path / "moe", input_ids)
    torch.testing.assert_close(moe_logits, expected, rtol=0, atol=1e-5)
    assert (moe_logits - logits(source, input_ids)).abs().max() > 1e-3  # and it is not the dense model
    tensors, dense = _tensors(tmp_path / "moe"), _tensors(source)
    shard = dense[DENSE.format(layer=0, name="down")][:, 20:] * scale
    assert torch.allclose(tensors[MIXTRAL_EXPERT.format(layer=0, expert=3, w="w2")], shard)
    router = tensors[MIXTRAL_ROUTER.format(layer=0)]
    for group in range(4):  # virtual groups: both shards of a copy share one router row
        assert torch.equal(router[2 * group], router[2 * group + 1])
    assert not torch.equal(router[0], router[2])


def test_granular_down_scaling_is_exact_at_init(dense_models, tmp_path, input_ids):
    source = dense_models["llama-gqa"]
    summary = _convert(source, tmp_path / "moe", method="granular", granularity=2, granular_scaling="down")
    assert (summary.num_experts, summary.top_k, summary.settings["exact_at_init"]) == (8, 4, True)
    assert _max_diff(tmp_path / "moe", source, input_ids) <= 1e-5


@pytest.mark.parametrize("partition_method", ["random", "kmeans"])
def test_partition_with_uniform_router_and_all_experts_reproduces_dense(
    dense_models, tmp_path, input_ids, partition_method
):
    source = dense_models["llama-gqa"]
    summary = _convert(
        source,
        tmp_path / "moe",
        method="partition",
        partition_method=partition_method,
        experts=2,
        top_k=2,
        router_init="random",
        router_std=0.0,
    )
    assert _max_diff(tmp_path / "moe", source, input_ids) <= 1e-5
    dense, moe = _tensors(source), _tensors(tmp_path / "moe")
    assert summary.total_parameters == sum(t.numel() for t in dense.values()) + 2 * 2 * HIDDEN  # + routers
    gate = dense[DENSE.format(layer=0, name="gate")]
    rows = torch.cat([moe[MIXTRAL_EXPERT.format(layer=0, expert=e, w="w1")] for e in range(2)])
    assert torch.equal(rows.sort(dim=0).values, gate.sort(dim=0).values)  # disjoint, covering neurons


def test_partition_router_defaults_to_neuron_cluster_centroids(dense_models, tmp_path):
    source = dense_models["llama-gqa"]
    summary = _convert(source, tmp_path / "moe", method="partition", partition_method="kmeans", experts=2, top_k=1)
    assert summary.settings["router_init"] == "centroids"
    moe = _tensors(tmp_path / "moe")
    for expert in range(2):
        gate_rows = moe[MIXTRAL_EXPERT.format(layer=1, expert=expert, w="w1")]
        assert torch.allclose(moe[MIXTRAL_ROUTER.format(layer=1)][expert], gate_rows.mean(dim=0))


@pytest.mark.parametrize(
    ("case", "settings"),
    [
        ("qwen2", dict(shared_experts=1)),
        ("llama-gqa", dict(shared_experts=1, target="qwen2_moe")),
        ("qwen2", dict(shared_experts=1, method="granular", granularity=2, granular_scaling="down", top_k=1)),
        (
            "qwen2",
            dict(shared_experts=1, method="partition", experts=1, top_k=1, router_init="random", router_std=0.0),
        ),
    ],
    ids=["qwen2-copy", "llama-to-qwen2moe-copy", "qwen2-granular", "qwen2-partition"],
)
def test_shared_experts_are_exact_at_init(dense_models, tmp_path, input_ids, case, settings):
    source = dense_models[case]
    _convert(source, tmp_path / "moe", **settings)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 20
    assert config["moe_intermediate_size"] == 20
    assert _max_diff(tmp_path / "moe", source, input_ids) <= 1e-5


def test_moe_layers_keep_the_others_dense_and_exact(dense_models, tmp_path, input_ids):
    source = dense_models["qwen2"]
    summary = _convert(source, tmp_path / "moe", moe_layers="every:2")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert summary.moe_layers == [1] and config["mlp_only_layers"] == [0]
    assert DENSE.format(layer=0, name="gate") in _tensors(tmp_path / "moe")
    assert _max_diff(tmp_path / "moe", source, input_ids) <= 1e-5


def _load_cv(directory: Path, texts: list[str], top_k: int) -> float:
    """Coefficient of variation of the experts' token counts (top-k picks), averaged over layers."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    counts = 0
    with torch.no_grad():
        for batch in calibration_batches(tokenizer, texts, max_length=128, batch_size=16):
            router_logits = model(**batch, output_router_logits=True).router_logits
            real = batch["attention_mask"].reshape(-1).bool()
            counts = counts + torch.stack(
                [torch.bincount(r[real].topk(top_k).indices.flatten(), minlength=r.shape[-1]) for r in router_logits]
            )
    counts = counts.float()
    return (counts.std(dim=1, unbiased=False) / counts.mean(dim=1)).mean().item()


def test_kmeans_router_balances_load_better_than_random_on_calibration_text(tmp_path):
    corpus = write_stdlib_corpus(tmp_path / "stdlib.txt")
    settings = dict(experts=8, top_k=2, quiet=True)
    convert(EXAMPLE, tmp_path / "random", **settings)
    summary = convert(
        EXAMPLE, tmp_path / "kmeans", router_init="kmeans", calibration=corpus, calibration_samples=16, **settings
    )
    assert summary.settings["router_init"] == "kmeans" and summary.settings["calibration_samples"] == 16
    texts = load_calibration_texts(corpus, 16)
    random_cv, kmeans_cv = _load_cv(tmp_path / "random", texts, 2), _load_cv(tmp_path / "kmeans", texts, 2)
    print(f"load CV on calibration text: random {random_cv:.3f}, kmeans {kmeans_cv:.3f}")
    assert kmeans_cv < 0.75 * random_cv
    # Copies stay exact whatever the router.
    input_ids = torch.randint(3, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    assert _max_diff(tmp_path / "kmeans", EXAMPLE, input_ids) <= 1e-5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(drop_ratio=0.3), "drop_ratio does not apply to method copy"),
        (dict(method="drop", drop_ratio=1.5), "drop_ratio must be above 0 and at most 1"),
        (dict(method="granular", granularity=3), "do not split into 3 equal expert widths"),
        (dict(method="granular", granularity=4), "grouped matmul"),
        (dict(router_init="kmeans"), "router_init kmeans needs calibration"),
        (dict(router_init="centroids"), "needs method partition"),
        (dict(method="partition", router_init="kmeans", calibration="x.txt"), "use router_init centroids"),
        (dict(shared_experts=1), "mixtral has no shared expert"),
        (dict(moe_layers="0"), "mixtral cannot keep layers dense"),
        (dict(moe_layers="every:x"), "cannot read moe_layers"),
        (dict(moe_layers="0,7"), "names layers [7]"),
    ],
)
def test_bad_method_settings_are_one_line_errors_with_no_output(dense_models, tmp_path, settings, message):
    with pytest.raises(UpcycleError, match=None) as caught:
        _convert(dense_models["llama-gqa"], tmp_path / "moe", **settings)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_exposes_methods_and_records_them(dense_models, tmp_path, capsys):
    code = cli_main(
        [
            "convert",
            str(dense_models["qwen2"]),
            str(tmp_path / "moe"),
            "--method",
            "granular",
            "--granularity",
            "2",
            "--experts",
            "2",
            "--top-k",
            "1",
            "--shared-experts",
            "1",
            "--moe-layers",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    provenance = json.loads((tmp_path / "moe" / "config.json").read_text())["upcycle"]
    assert provenance["method"] == "granular" and provenance["granularity"] == 2
    assert provenance["shared_experts"] == 1 and provenance["moe_layers"] == [1]
    assert provenance["num_experts"] == 2 and provenance["requested_experts"] == 2
    assert (
        cli_main(["convert", str(dense_models["qwen2"]), str(tmp_path / "x"), "--noise", "0.1", "--method", "drop"])
        == 2
    )
    assert "--noise does not apply to --method drop" in capsys.readouterr().err
