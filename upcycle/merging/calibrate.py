"""Calibration for `upcycle merge`: run the MoE over text and record each MoE layer's routing.

The MoE runs one decoder layer at a time (`upcycle.merging.layerwise`), in step with the merge:
the merge of layer L asks for layer L's statistics, which runs every batch through the layers up
to L; the experts loaded for that are then merged from memory. Peak memory is one layer's
experts, and the MoE is read once for calibration and merge together.
"""

from __future__ import annotations

import torch

from upcycle.calibration import MoELayerProbe, RoutingRecorder, RoutingStatistics, calibration_batches
from upcycle.checkpoint import TensorStream
from upcycle.errors import UpcycleError
from upcycle.merging.layerwise import LayerwiseModel
from upcycle.merging.source import MoESource


def moe_layer_probe(moe: MoESource, layer: int) -> MoELayerProbe:
    """Return what routing statistics need to know about MoE layer `layer` of `moe`: its block's module name,
    router, shared-expert gate, and for DeepSeek-V3-style routers the selection bias and groups."""
    bias_name = moe.selection_bias_name(layer)
    grouped = moe.family.grouped_router
    return MoELayerProbe(
        moe.module_name(layer),
        moe.router(layer),
        moe.shared_gate(layer),
        selection_bias=moe.checkpoint.tensors.get(bias_name) if bias_name else None,
        groups=int(moe.config.get(grouped.groups, 1)) if grouped else 1,
        top_groups=int(moe.config.get(grouped.top_groups, 1)) if grouped else 1,
    )


class LayerwiseCalibration:
    """Routing statistics of a MoE's layers over calibration texts, computed when first asked for."""

    def __init__(
        self,
        moe: MoESource,
        texts: list[str],
        expert_outputs: bool,
        max_length: int,
        batch_size: int,
        stream: TensorStream,
    ):
        """Tokenize `texts` and prepare the layer-wise run (`expert_outputs`: also every expert's mean output,
        what HC-SMoE groups experts by).

        Raises:
            UpcycleError: the checkpoint has no tokenizer that loads, or the tokenizer gives ids
                outside the model's vocabulary.
        """
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(moe.checkpoint.path)
        except (OSError, ValueError) as err:
            raise UpcycleError(
                f"calibration needs a tokenizer and {moe.name} has none that loads ({str(err).splitlines()[0]}); "
                "save one next to the weights"
            ) from None
        vocab_size = int(moe.config["vocab_size"])
        batches = list(calibration_batches(tokenizer, texts, max_length, batch_size, vocab_size))
        self.tokens = int(sum(int(batch["attention_mask"].sum()) for batch in batches))
        self._moe = moe
        self._runner = LayerwiseModel(moe, batches, self._set_mask, stream)
        probes = {layer: moe_layer_probe(moe, layer) for layer in moe.moe_layers}
        self._recorder = RoutingRecorder(
            self._runner.model,
            probes,
            top_k=moe.top_k,
            normalize_top_k=bool(moe.config.get("norm_topk_prob", True)),
            expert_outputs=expert_outputs,
        )
        self._recorder.__enter__()
        self._done = -1

    def _set_mask(self, batch: dict[str, torch.Tensor]) -> None:
        self._recorder.mask = batch["attention_mask"].reshape(-1).bool()

    def get(self, layer: int) -> RoutingStatistics:
        """Return the statistics of MoE layer `layer`, running the layers up to it first if needed
        (the merge's own progress bar advances meanwhile: calibration is part of each layer's merge)."""
        if layer > self._done:
            self._runner.advance(layer)
            self._done = layer
            if layer >= max(self._moe.moe_layers):
                self._recorder.__exit__()
        return self._recorder.stats[layer]

    def holds(self, tensor: torch.Tensor) -> bool:
        """Return whether `tensor` shares memory the next layer's experts will be read into."""
        return self._runner.holds(tensor)

    def experts(self, layer: int, projection: str) -> list[torch.Tensor]:
        """Return `projection` of every routed expert of `layer` (the layer last run), from memory."""
        return self._runner.experts(layer, projection)
