"""Checkpoint I/O: reading (local or Hub, lazy tensors) and writing (one streamed, atomic path)."""

from upcycle.checkpoint.download import looks_like_hub_id, resolve_source
from upcycle.checkpoint.formats import (
    CONFIG_FILE,
    GENERATION_CONFIG,
    SAFETENSORS_INDEX,
    SIDE_FILES,
    TOKENIZER_FILES,
    dtype_name,
    parse_dtype,
)
from upcycle.checkpoint.output import atomic_output_dir, check_output_dir
from upcycle.checkpoint.prefetch import TensorStream
from upcycle.checkpoint.read import LazyTensors, SourceCheckpoint, open_checkpoint
from upcycle.checkpoint.write import (
    PlannedTensor,
    StreamingWriter,
    TensorSpec,
    check_free_space,
    count_parameters,
    parse_shard_size,
    write_checkpoint,
    write_config,
    write_tensors,
)

__all__ = [
    "CONFIG_FILE",
    "GENERATION_CONFIG",
    "SAFETENSORS_INDEX",
    "SIDE_FILES",
    "TOKENIZER_FILES",
    "LazyTensors",
    "PlannedTensor",
    "SourceCheckpoint",
    "StreamingWriter",
    "TensorSpec",
    "TensorStream",
    "atomic_output_dir",
    "check_free_space",
    "check_output_dir",
    "count_parameters",
    "dtype_name",
    "looks_like_hub_id",
    "open_checkpoint",
    "parse_dtype",
    "parse_shard_size",
    "resolve_source",
    "write_checkpoint",
    "write_config",
    "write_tensors",
]
