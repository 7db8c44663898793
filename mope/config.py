"""`MoPEConfig`: the configuration of a mixture of LoRA experts (MoPE) adapter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from mope._peft_type import ensure_mope_peft_type
from mope.errors import MoPEConfigError
from mope.router_kinds import check_router_kind

ROUTING_MODES = ("linear", "block")


@dataclass
class MoPEConfig(PeftConfig):
    """Configuration of a [`MoPEModel`]: mixtures of LoRA experts with a learned router.

    Every adapted linear layer ``W`` gets ``num_experts`` LoRA experts ``(A_i, B_i)`` of rank ``r``.
    A router scores the experts for each token, keeps ``top_k`` of them (all of them when
    ``top_k=0``: a dense soft mixture, MoLoRA/MoV) and the layer computes
    ``W x + (lora_alpha / r) * sum_i g_i(x) B_i A_i dropout(x)``.

    Two routing modes decide where routers live and what they mix:

    - ``routing="linear"`` (MoLoRA, LoRAMoE): every adapted linear layer has its own router that
      reads that layer's input and mixes that layer's experts.
    - ``routing="block"`` (MixLoRA): one router per gated FFN block (a module with ``gate_proj``,
      ``up_proj``, ``down_proj`` and ``act_fn``, as in Llama, Mistral, Qwen, Gemma, Olmo) reads the
      block input and picks experts for ``gate_proj``/``up_proj``/``down_proj`` together. Expert
      ``i`` is the whole FFN with ``W + B_i A_i`` in each adapted projection and the block returns
      ``sum_i g_i(x) FFN_i(x)``, which is exactly a Mixtral-style sparse MoE block: this is the mode
      `mope.export` turns into a stock MoE checkpoint. Targets outside gated FFN blocks (attention
      projections) get a router of their own, as in ``"linear"``.

    Structure options: ``shared_expert`` adds an always-on LoRA of rank ``r`` beside the routed
    ones (with ``routing="block"`` it is part of every FFN expert); ``share_a`` keeps one ``A``
    for all experts and a ``B`` per expert (HydraLoRA); ``num_experts_pattern`` changes the
    expert count per module (MoLA: more experts in higher layers). ``router_noise`` jitters the
    router input while training; ``aux_loss_coef`` and ``z_loss_coef`` weight the load-balancing
    and z-loss terms that `mope.aux_loss` returns.

    What MoPE adapts: ``nn.Linear`` modules (and, with ``routing="block"``, gated FFN blocks), in
    dense and in MoE models: attention projections, dense MLPs, and the shared expert of
    Qwen2-MoE-style models (a gated FFN, so ``routing="block"`` turns it into a mixture). The
    routed experts of transformers-5 MoE models are fused parameters (``mlp.experts.gate_up_proj``
    of shape (E, 2I, H)), not linear modules: ``target_modules`` names such as ``gate_proj`` do
    not reach them (they stay frozen and unadapted), and naming the ``experts`` module itself is
    refused with an error; adapt fused experts with ``peft.LoraConfig(target_parameters=[...])``.

    Raises:
        MoPEConfigError: on ``r < 1``, ``num_experts < 1``, ``top_k`` outside ``[0, num_experts]``,
            an unknown ``routing`` or ``router`` (or router options it rejects), negative loss
            coefficients or noise, or a bad pattern key or value.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match) or a regex of the linear layers to adapt, e.g. "
            "['gate_proj', 'up_proj', 'down_proj']. With routing='block' these names select which "
            "projections of each gated FFN block carry experts."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (as in LoRA)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."},
    )
    num_experts: int = field(default=8, metadata={"help": "Number of routed LoRA experts per adapted module."})
    r: int = field(default=8, metadata={"help": "Rank of each LoRA expert."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: experts are scaled by alpha/r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input (not the router's)."})
    top_k: int = field(
        default=2,
        metadata={"help": "Experts kept per token; 0 means a dense soft mixture over all experts."},
    )
    router: str = field(
        default="topk",
        metadata={
            "help": "Router kind from upcycle.moe.routing (e.g. 'topk', 'noisy_topk'); with top_k=0 the "
            "'dense' router is used whatever this says."
        },
    )
    router_options: dict = field(
        default_factory=dict,
        metadata={"help": "Extra keyword arguments for upcycle.moe.routing.build_router."},
    )
    routing: Literal["linear", "block"] = field(
        default="linear",
        metadata={"help": "'linear': a router per adapted layer; 'block': one router per gated FFN block (MixLoRA)."},
    )
    shared_expert: bool = field(
        default=False, metadata={"help": "Add an always-on LoRA (rank r) beside the routed experts."}
    )
    share_a: bool = field(
        default=False, metadata={"help": "One A shared by all experts, one B per expert (HydraLoRA)."}
    )
    num_experts_pattern: dict = field(
        default_factory=dict,
        metadata={
            "help": "Per-module expert counts: {regex: num_experts}, "
            "matched like LoRA's rank_pattern against "
            "the adapted module's name (the FFN block's name with routing='block'), e.g. "
            "{'layers\\.1\\..*': 16} (MoLA)."
        },
    )
    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Weight of the Switch load-balancing loss in mope.aux_loss."}
    )
    z_loss_coef: float = field(default=0.0, metadata={"help": "Weight of the ST-MoE router z-loss in mope.aux_loss."})
    router_noise: float = field(
        default=0.0,
        metadata={
            "help": "Router jitter while training: the router's input (not the experts') is multiplied by "
            "uniform noise in [1 - router_noise, 1 + router_noise] (Switch Transformer); 0 turns it off. "
            "For learned Gaussian noise on the logits use router='noisy_topk'."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Zero-initialise every B so the adapted model starts equal to the base model."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the MoPE layers to train and save (as in LoRA)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_mope_peft_type()
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        self._validate()

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise MoPEConfigError(f"MoPEConfig: {message}")

        if not isinstance(self.r, int) or self.r < 1:
            fail(f"r={self.r!r} must be an integer >= 1 (the rank of each LoRA expert).")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            fail(f"num_experts={self.num_experts!r} must be an integer >= 1.")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= self.num_experts:
            fail(
                f"top_k={self.top_k!r} must be between 0 (dense mixture) and num_experts={self.num_experts}; "
                "lower top_k or raise num_experts."
            )
        if self.routing not in ROUTING_MODES:
            fail(f"routing={self.routing!r} is not one of {ROUTING_MODES}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.router_noise < 0:
            fail(f"router_noise={self.router_noise!r} must be >= 0.")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                fail(f"{name}={getattr(self, name)!r} must be >= 0 (0 turns the loss off).")
        for pattern, count in self.num_experts_pattern.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                fail(f"num_experts_pattern key {pattern!r} is not a valid regular expression ({exc}).")
            if not isinstance(count, int) or count < max(1, self.top_k):
                fail(f"num_experts_pattern[{pattern!r}]={count!r} must be an integer >= max(1, top_k={self.top_k}).")
        check_router_kind(self, [self.num_experts, *self.num_experts_pattern.values()])
