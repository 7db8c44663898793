"""Read the weights of a dense FFN module, whatever its attribute names, into one shape.

A small table of the layouts Hugging Face models use; `DenseFFN` is what `MoE.from_dense`
copies into every expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from upcycle.errors import UpcycleError

__all__ = ["DenseFFN", "read_dense_ffn"]

# (gate, up, down) projections of GLU FFNs: Llama/Mistral/Qwen/Gemma/Olmo..., Mixtral-style w1/w3/w2.
GLU_NAMES: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# (fused gate_up, down) of GLU FFNs with the gate rows first: Phi-3.
FUSED_GLU_NAMES: tuple[tuple[str, str], ...] = (("gate_up_proj", "down_proj"),)
# (up, down) of plain MLPs: OPT/Phi/CLIP fc1/fc2, GPT-2 c_fc/c_proj (Conv1D), GPT-NeoX, GPT-J...
PLAIN_NAMES: tuple[tuple[str, str], ...] = (
    ("fc1", "fc2"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("fc_in", "fc_out"),
    ("up_proj", "down_proj"),
)
ACTIVATION_NAMES: tuple[str, ...] = ("act_fn", "activation_fn", "act", "activation", "activation_func")


@dataclass
class DenseFFN:
    """A dense FFN's weights in `nn.Linear` orientation.

    Attributes:
        in_weight: (2I, H) with gate rows first when ``gated``, else (I, H).
        in_bias: (2I,) / (I,) or None.
        down_weight: (H, I).
        down_bias: (H,) or None.
        gated: GLU (``down(act(gate x) * up x)``) or plain (``down(act(up x))``).
        activation: the module's activation callable.
    """

    in_weight: torch.Tensor
    in_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    gated: bool
    activation: Callable[[torch.Tensor], torch.Tensor]

    @property
    def hidden_size(self) -> int:
        return self.down_weight.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down_weight.shape[1]


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of an `nn.Linear` or a GPT-2 style `Conv1D` (stored (in, out))."""
    weight = module.weight
    if type(module).__name__ == "Conv1D":
        weight = weight.T
    return weight.detach(), None if getattr(module, "bias", None) is None else module.bias.detach()


def _activation(ffn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    for name in ACTIVATION_NAMES:
        activation = getattr(ffn, name, None)
        if callable(activation):
            return activation
    raise UpcycleError(
        f"cannot find the activation of {type(ffn).__name__} (looked for {', '.join(ACTIVATION_NAMES)}); "
        "pass activation= explicitly."
    )


def read_dense_ffn(ffn: nn.Module, activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DenseFFN:
    """Read a dense FFN module's projections and activation.

    Args:
        ffn: e.g. a `LlamaMLP`, `Phi3MLP`, `GPT2MLP`, `PhiMLP`.
        activation: overrides the activation found on the module.

    Returns:
        The `DenseFFN`.

    Raises:
        UpcycleError: when the module matches none of the known layouts or has no activation.
    """
    act = activation

    def resolved_activation() -> Callable[[torch.Tensor], torch.Tensor]:
        return act if act is not None else _activation(ffn)

    for gate_name, up_name, down_name in GLU_NAMES:
        if all(hasattr(ffn, name) for name in (gate_name, up_name, down_name)):
            gate, gate_bias = _linear_weight(getattr(ffn, gate_name))
            up, up_bias = _linear_weight(getattr(ffn, up_name))
            down, down_bias = _linear_weight(getattr(ffn, down_name))
            in_bias = None if gate_bias is None else torch.cat([gate_bias, up_bias])
            return DenseFFN(torch.cat([gate, up]), in_bias, down, down_bias, True, resolved_activation())
    for gate_up_name, down_name in FUSED_GLU_NAMES:
        if hasattr(ffn, gate_up_name) and hasattr(ffn, down_name):
            gate_up, gate_up_bias = _linear_weight(getattr(ffn, gate_up_name))
            down, down_bias = _linear_weight(getattr(ffn, down_name))
            return DenseFFN(gate_up, gate_up_bias, down, down_bias, True, resolved_activation())
    for up_name, down_name in PLAIN_NAMES:
        if hasattr(ffn, up_name) and hasattr(ffn, down_name):
            up, up_bias = _linear_weight(getattr(ffn, up_name))
            down, down_bias = _linear_weight(getattr(ffn, down_name))
            return DenseFFN(up, up_bias, down, down_bias, False, resolved_activation())
    known = list(GLU_NAMES + FUSED_GLU_NAMES + PLAIN_NAMES)
    raise UpcycleError(
        f"{type(ffn).__name__} has none of the known FFN layouts {known}; "
        "build the MoE with MoE(...) and copy its weights, or rename the projections."
    )
