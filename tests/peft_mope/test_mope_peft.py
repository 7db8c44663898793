"""MoPE behaves as a PEFT method: save/load, disable_adapter, trainability, aux loss, statistics."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from mope_testlib import FFN, input_ids, logits, mope_model, tiny_llama  # noqa: E402

import mope  # noqa: E402


def test_saved_adapter_reloads_in_a_fresh_process_with_identical_outputs(tmp_path):
    ids = input_ids()
    expected = {}
    for routing in ("linear", "block"):
        model = mope_model(routing=routing, shared_expert=True, target_modules=[*FFN, "q_proj"])
        model.save_pretrained(tmp_path / routing)
        expected[routing] = logits(model, ids)
        saved = json.loads((tmp_path / routing / "adapter_config.json").read_text())
        assert saved["peft_type"] == "MOPE" and saved["routing"] == routing
        assert (tmp_path / routing / "adapter_model.safetensors").is_file()
    torch.save(ids, tmp_path / "ids.pt")

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import mope
        from peft import PeftModel
        from mope_testlib import tiny_llama
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        for routing in ("linear", "block"):
            model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path)!r} + "/" + routing).eval()
            assert type(model.peft_config["default"]).__name__ == "MoPEConfig"
            with torch.no_grad():
                torch.save(model(input_ids=ids).logits, {str(tmp_path)!r} + f"/{{routing}}.pt")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    for routing in ("linear", "block"):
        reloaded = torch.load(tmp_path / f"{routing}.pt")
        assert torch.equal(reloaded, expected[routing]), routing


def test_disable_adapter_gives_the_base_model_logits():
    ids = input_ids()
    base_logits = logits(tiny_llama(), ids)
    for routing in ("linear", "block"):
        model = mope_model(routing=routing, target_modules=[*FFN, "v_proj"])
        assert not torch.allclose(logits(model, ids), base_logits)
        with model.disable_adapter():
            assert torch.equal(logits(model, ids), base_logits)


def test_zero_initialised_experts_start_as_the_base_model():
    ids = input_ids()
    for routing in ("linear", "block"):
        model = mope_model(routing=routing, init_weights=True)
        torch.testing.assert_close(logits(model, ids), logits(tiny_llama(), ids), rtol=0, atol=1e-6)


def test_gradients_reach_routers_and_experts_but_not_base_weights():
    for routing in ("linear", "block"):
        model = mope_model(routing=routing, shared_expert=True, target_modules=[*FFN, "o_proj"]).train()
        ids = input_ids()
        loss = model(input_ids=ids, labels=ids).loss + mope.aux_loss(model)
        loss.backward()
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
        assert trainable and all(".mope_" in name for name in trainable)
        assert any("mope_router" in name for name in trainable)
        assert all(p.grad is None for p in frozen.values())
        for name, parameter in trainable.items():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        assert not any("mope_" in name for name in frozen)


def test_aux_loss_equals_a_hand_computation():
    model = mope_model(num_experts=4, top_k=2, aux_loss_coef=0.3, z_loss_coef=0.05)
    inputs = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, mope.Linear)
    ]
    model(input_ids=input_ids())
    for hook in hooks:
        hook.remove()

    expected = 0.0
    for name, x in inputs.items():
        router = model.get_submodule(name).mope_router["default"]
        router_logits = x.reshape(-1, x.shape[-1]) @ router.weight.T  # (T, E)
        probs = torch.softmax(router_logits, dim=-1)
        chosen = probs.topk(2, dim=-1).indices
        fraction = torch.stack([(chosen == e).sum() for e in range(4)]).float() / chosen.numel()
        balance = 4 * (fraction * probs.mean(0)).sum()
        z_loss = (torch.logsumexp(router_logits, dim=-1) ** 2).mean()
        expected = expected + 0.3 * balance + 0.05 * z_loss
    assert len(inputs) == 6
    torch.testing.assert_close(mope.aux_loss(model), expected, rtol=1e-5, atol=1e-6)


def test_aux_loss_leaves_padding_out_when_given_the_attention_mask():
    model = mope_model(num_experts=4, top_k=2, aux_loss_coef=1.0)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    model(input_ids=input_ids(batch=2, seq=6), attention_mask=mask)
    real = mask.reshape(-1).bool()
    expected = 0.0
    for module in model.modules():
        if isinstance(module, mope.Linear):
            routing = module.last_routing["default"]
            probs, chosen = routing.router_probs[real], routing.expert_indices[real]
            fraction = torch.stack([(chosen == e).sum() for e in range(4)]).float() / chosen.numel()
            expected = expected + 4 * (fraction * probs.mean(0)).sum()
    masked = mope.aux_loss(model, attention_mask=mask)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked, mope.aux_loss(model))


def test_router_stats_report_the_load_of_every_router():
    model = mope_model(num_experts=4, top_k=2, routing="block")
    ids = input_ids(batch=2, seq=5)
    model(input_ids=ids)
    stats = mope.router_stats(model)
    assert sorted(stats) == [f"base_model.model.model.layers.{i}.mlp" for i in range(2)]
    for entry in stats.values():
        assert entry["tokens_per_expert"].sum() == 10 * 2
        torch.testing.assert_close(entry["load_fraction"].sum(), torch.tensor(1.0))
        torch.testing.assert_close(entry["mean_prob"].sum(), torch.tensor(1.0))


def test_block_mixture_equals_the_sum_of_weighted_ffn_experts():
    model = mope_model(routing="block", num_experts=3, top_k=2, share_a=True, shared_expert=True)
    block = model.get_submodule("base_model.model.model.layers.0.mlp")
    mlp = block.get_base_layer()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routing = block.mope_router["default"](x)
        expected = torch.zeros(5, 32)
        for expert in range(3):
            weight = {p: getattr(mlp, p).weight + block.expert_delta_weights("default", p)[expert] for p in FFN}
            ffn = F.linear(
                F.silu(F.linear(x, weight["gate_proj"])) * F.linear(x, weight["up_proj"]), weight["down_proj"]
            )
            gate = (routing.expert_weights * (routing.expert_indices == expert)).sum(-1, keepdim=True)
            expected += gate * ffn
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_linear_mixture_equals_the_sum_of_weighted_lora_experts():
    model = mope_model(num_experts=3, top_k=2, lora_alpha=4, r=2)
    layer = model.get_submodule("base_model.model.model.layers.1.mlp.up_proj")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        routing = layer.mope_router["default"](x)
        expected = layer.get_base_layer()(x)
        for expert in range(3):
            delta = layer.mope_B["default"][expert] @ layer.mope_A["default"][expert] * 2.0
            gate = (routing.expert_weights * (routing.expert_indices == expert)).sum(-1, keepdim=True)
            expected += gate * (x @ delta.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
