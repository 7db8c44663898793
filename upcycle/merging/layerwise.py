"""Running a MoE checkpoint's decoder layers one at a time, each loaded only while it runs.

Calibrating a merge needs the hidden states that reach every MoE block, which loading the whole
model in transformers gives at the cost of the whole model in memory (15.6 GB of RSS for a
1B-shaped 8-expert MoE, scripts/bench/scale.py). `LayerwiseModel` builds the model on the meta
device instead, lets transformers' own forward compute each layer's inputs once (embeddings,
rotary position embeddings, the causal and sliding-window masks) with every decoder layer
replaced by a recorder, and then runs the calibration batches through one real layer at a time,
loaded from the checkpoint, in order. A layer's routed experts are kept, fused as transformers
holds them, until the next layer is loaded, so the merge reads them from memory instead of disk.
The layer computation is transformers' own module, so the hidden states, and the statistics, are
the same bits as a whole-model forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from upcycle.checkpoint import TensorStream
from upcycle.errors import UpcycleError
from upcycle.merging.source import PROJECTIONS, MoESource, fused_projection


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


class _LayerRecorder(torch.nn.Module):
    """Stands in for a decoder layer: records the keyword arguments the model passes it, returns its input."""

    def __init__(self, calls: list[dict], last: bool):
        super().__init__()
        self.calls = calls
        self.last = last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Record the call and return `hidden_states` (raise `_StopForward` after the last layer needed).

        Raises:
            UpcycleError: the model passes positional arguments beyond the hidden states.
        """
        if args:
            raise UpcycleError(
                "the model passes its decoder layers positional arguments; layer-wise calibration cannot replay them"
            )
        self.calls.append({"hidden_states": hidden_states, **kwargs})
        if self.last:
            raise _StopForward
        return hidden_states


class LayerwiseModel:
    """The decoder layers of the MoE `moe`, run on calibration batches one layer at a time (see module doc).

    `advance(layer)` runs every batch through the decoder layers up to and including `layer`;
    `experts(layer, projection)` then returns that projection of the layer's routed experts from
    memory. `model` is the meta-device model whose MoE blocks hooks can be attached to.
    """

    def __init__(
        self,
        moe: MoESource,
        batches: list[dict[str, torch.Tensor]],
        on_batch: Callable[[dict[str, torch.Tensor]], None],
        stream: TensorStream,
    ):
        """Build the skeleton and record every layer's inputs for each of `batches`.

        `on_batch(batch)` is called before each batch goes through a layer (e.g. to set a mask).

        Raises:
            UpcycleError: the model's modules do not match the checkpoint's tensors.
        """
        from transformers import AutoModelForCausalLM

        from upcycle.merging.source import moe_config_object

        stream.request(moe.expert_read_order(moe.moe_layers[0]))  # read while the skeleton is built
        self.moe = moe
        self.batches = batches
        self.on_batch = on_batch
        self._stream = stream
        config = moe_config_object(moe.config)
        dtype = moe.checkpoint.tensors.dtype(moe.layout.router.format(layer=moe.moe_layers[0]))
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        base = self.model.base_model
        self._layers_name = next(name for name, module in self.model.named_modules() if module is base.layers)
        self._layers = base.layers
        self._materialize(base.get_input_embeddings())
        if isinstance(getattr(base, "rotary_emb", None), torch.nn.Module):  # its buffers are computed, not stored
            base.rotary_emb = type(base.rotary_emb)(config=base.config)
        self._next = 0
        self._held: dict[str, torch.Tensor] = {}
        # The fused stacks the last layer's experts were copied into, refilled by the next layer: fresh ones
        # cost a page fault per 4 KiB and the kernel zeroing them (805 MB a layer at the 1B shape; with the
        # copy, 18% of merge frequency's samples in scripts/bench/scale.py).
        self._stacks: dict[str, torch.Tensor] = {}
        self._inputs = self._record_layer_inputs(base)

    def _materialize(self, module: torch.nn.Module) -> None:
        """Load `module`'s parameters from the checkpoint (memory-mapped: only the pages used are read)."""
        prefix = next(name for name, candidate in self.model.named_modules() if candidate is module)
        tensors = self.moe.checkpoint.tensors
        state = {}
        for name in module.state_dict():
            full = f"{prefix}.{name}"
            if full not in tensors:
                raise UpcycleError(f"{self.moe.name} has no tensor {full}, which layer-wise calibration needs")
            state[name] = tensors.get(full)
        module.load_state_dict(state, strict=True, assign=True)

    @torch.no_grad()
    def _record_layer_inputs(self, base: torch.nn.Module) -> list[list[dict]]:
        """Return, per batch, the arguments of every decoder layer's call (the first holds the hidden states)."""
        real = list(self._layers)
        calls: list[dict] = []
        count = max(self.moe.moe_layers) + 1
        recorders = [_LayerRecorder(calls, last=index == count - 1) for index in range(len(real))]
        inputs = []
        try:
            for index, recorder in enumerate(recorders):
                self._layers[index] = recorder
            for batch in self.batches:
                calls.clear()
                try:
                    base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                except _StopForward:
                    pass
                inputs.append(list(calls))
        finally:
            for index, layer in enumerate(real):
                self._layers[index] = layer
        return inputs

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        """Run every batch through the decoder layers not run yet, up to and including `layer`."""
        while self._next <= layer:
            index = self._next
            module = self._layers[index]
            self._load_layer(index, module)
            for batch, calls in zip(self.batches, self._inputs, strict=True):
                self.on_batch(batch)
                arguments = dict(calls[index])
                hidden = module(arguments.pop("hidden_states"), **arguments)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                if index + 1 < len(calls):
                    calls[index + 1]["hidden_states"] = hidden
                calls[index] = {}
            module.to("meta")
            self._next += 1

    def holds(self, tensor: torch.Tensor) -> bool:
        """Return whether `tensor` shares the memory of the experts' stacks, which the next layer overwrites."""
        address = tensor.untyped_storage().data_ptr()
        return any(stack.untyped_storage().data_ptr() == address for stack in self._stacks.values())

    def experts(self, layer: int, projection: str) -> list[torch.Tensor]:
        """Return `projection` of every routed expert of `layer`, the last layer run, from memory; each
        projection once, in the order gate, up, down."""
        if layer != self._next - 1:
            raise RuntimeError(f"layer {layer} is not the last layer run ({self._next - 1})")
        if projection == "down":
            return list(self._held.pop("down"))
        # Handed over after their last use (up, then down), so memory goes as soon as the merge drops them.
        gate_up = self._held["gate_up"] if projection == "gate" else self._held.pop("gate_up")
        return fused_projection(gate_up, projection, self.moe.expert_size)

    def _load_layer(self, index: int, module: torch.nn.Module) -> None:
        """Load decoder layer `index` from the checkpoint, its routed experts fused as transformers holds them.

        Parameters are found under their own name on disk; inside the MoE block, those that are not
        (the disk names differ by layout and family) are the fused experts (`gate_up_proj`,
        `down_proj`) and the router, the block's one (experts, hidden) matrix.

        Raises:
            UpcycleError: a parameter has no counterpart in the checkpoint.
        """
        moe = self.moe
        tensors = moe.checkpoint.tensors
        prefix = f"{self._layers_name}.{index}"
        block = f"{moe.module_name(index)}."
        self._held = {}  # the previous layer's experts go before this layer's arrive
        if index in moe.moe_layers:
            self._held = self._read_experts(index)
        state = {}
        for name, current in module.state_dict().items():
            full = f"{prefix}.{name}"
            if full in tensors:
                state[name] = tensors.get(full)
            elif full.startswith(block) and name.endswith("gate_up_proj") and "gate_up" in self._held:
                state[name] = self._held["gate_up"]
            elif full.startswith(block) and name.endswith("down_proj") and "down" in self._held:
                state[name] = self._held["down"]
            elif full.startswith(block) and tuple(current.shape) == (moe.num_experts, moe.hidden_size):
                state[name] = moe.router(index)
            else:
                raise UpcycleError(f"{moe.name} has no tensor for {full}, which layer-wise calibration needs")
        module.load_state_dict(state, strict=True, assign=True)

    def _read_experts(self, layer: int) -> dict[str, torch.Tensor]:
        """Return {"gate_up": (E, 2I, H), "down": (E, H, I)} of `layer`, read through the stream (into the
        previous layer's stacks where the shapes agree: nothing may hold them any more, see `holds`)."""
        moe, size = self.moe, self.moe.expert_size
        following = [later for later in moe.moe_layers if later > layer]
        if following:
            self._stream.request(moe.expert_read_order(following[0]))
        names = moe.projection_tensor_names(layer)
        if moe.layout.fused:
            return {"gate_up": self._stream.take(names["gate"][0]), "down": self._stream.take(names["down"][0])}
        experts, spare, self._stacks = moe.num_experts, self._stacks, {}
        for projection in PROJECTIONS:
            for expert in range(experts):
                tensor = self._stream.take(names[projection][expert])
                key = "down" if projection == "down" else "gate_up"
                if key not in self._stacks:
                    shape = (experts, *tensor.shape) if key == "down" else (experts, 2 * size, tensor.shape[1])
                    reused = spare.get(key)
                    fits = reused is not None and reused.shape == shape and reused.dtype == tensor.dtype
                    self._stacks[key] = reused if fits else torch.empty(shape, dtype=tensor.dtype)
                rows = slice(None) if key == "down" else slice(0, size) if projection == "gate" else slice(size, None)
                self._stacks[key][expert, rows] = tensor
                self._stream.release([tensor])  # copied: its memory serves the next read
        return dict(self._stacks)
