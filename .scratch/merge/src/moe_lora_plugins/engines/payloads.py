"""Engine payloads for full (merged) weights: byte-bounded chunks for SGLang and vLLM, and the
pause / update / resume bracket around a running engine.

Framework-free: tensors in, plain dicts and lists out. The SGLang shapes follow sglang 0.5.23:
``Engine.update_weights_from_tensor(named_tensors, load_format, flush_cache)`` with
``load_format="flattened_bucket"`` takes per-rank payloads of ``{"flattened_tensor", "metadata"}``
(one uint8 tensor of all bytes plus per-tensor name / shape / dtype / byte offsets);
``Engine.update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache, load_format)``
announces what the trainer then broadcasts on the group made by ``init_weights_update_group``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from moe_lora_plugins.errors import MoeLoraError

logger = logging.getLogger("moe_lora_plugins.engines")

DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024
WEIGHT_UPDATE_GROUP = "weight_update_group"


class PayloadError(MoeLoraError, ValueError):
    """A weight payload cannot be built as asked."""


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def chunk_by_bytes(
    weights: Iterable[tuple[Any, ...]], max_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a weight stream into lists of ``(name, tensor)`` of at most ``max_bytes`` each.

    A tensor larger than ``max_bytes`` travels alone in its own chunk. Order is kept and the stream is
    consumed lazily, so at most one chunk is alive at a time. Extra tuple items (the Megatron name of
    3-tuples) are dropped: engines take ``(name, tensor)``.
    """
    if max_bytes <= 0:
        raise PayloadError(f"chunk size must be positive, got max_bytes={max_bytes}")
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for item in weights:
        name, tensor = item[0], item[1]
        nbytes = tensor_nbytes(tensor)
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


@dataclass(frozen=True)
class BucketEntry:
    """Where one tensor lies in a flattened bucket (SGLang's ``FlattenedTensorMetadata`` fields)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def flattened_bucket(
    named_tensors: list[tuple[str, torch.Tensor]], metadata_type: Callable[..., Any] = BucketEntry
) -> dict[str, Any]:
    """One ``{"flattened_tensor": uint8, "metadata": [entry]}`` bucket, as SGLang's
    ``load_format="flattened_bucket"`` reads it. Offsets are in bytes; dtypes may differ per tensor.

    ``metadata_type`` builds each entry from ``(name, shape, dtype, start_idx, end_idx, numel)``. For a
    payload that SGLang deserializes pass ``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata``:
    SGLang's safe unpickler refuses every other class (checked against sglang 0.5.23).
    """
    if not named_tensors:
        raise PayloadError("cannot build an empty flattened bucket")
    pieces: list[torch.Tensor] = []
    metadata: list[BucketEntry] = []
    offset = 0
    for name, tensor in named_tensors:
        if offset % tensor.element_size():
            raise PayloadError(
                f"{name}: byte offset {offset} is not aligned to its dtype {tensor.dtype}; put tensors of "
                "wider dtypes first or bucket dtypes separately"
            )
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        pieces.append(flat)
        metadata.append(metadata_type(name, tensor.shape, tensor.dtype, offset, offset + flat.numel(), flat.numel()))
        offset += flat.numel()
    return {"flattened_tensor": torch.cat(pieces), "metadata": metadata}


def unflatten_bucket(bucket: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` list a flattened bucket holds (views into its byte tensor)."""
    data = bucket["flattened_tensor"]
    return [
        (m.name, data[m.start_idx : m.end_idx].view(m.dtype).reshape(m.shape)) for m in bucket["metadata"]
    ]


def sglang_tensor_update_calls(
    weights: Iterable[tuple[Any, ...]],
    max_bytes: int = DEFAULT_CHUNK_BYTES,
    tp_size: int = 1,
    serialize: Callable[[Any], Any] | None = None,
    metadata_type: Callable[..., Any] = BucketEntry,
) -> Iterator[dict[str, Any]]:
    """Keyword arguments of ``Engine.update_weights_from_tensor``, one call per chunk of at most ``max_bytes``.

    Each call carries one flattened bucket per engine TP rank (``serialize`` turns it into SGLang's
    ``MultiprocessingSerializer`` bytes; without it the bucket dict is passed as is, for in-process
    engines; see :func:`flattened_bucket` for ``metadata_type``). The cache is flushed only after the
    last chunk.
    """
    chunks = chunk_by_bytes(weights, max_bytes)
    current = next(chunks, None)
    while current is not None:
        following = next(chunks, None)
        bucket = flattened_bucket(current, metadata_type)
        payload = serialize(bucket) if serialize is not None else bucket
        yield {
            "named_tensors": [payload] * tp_size,
            "load_format": "flattened_bucket",
            "flush_cache": following is None,
        }
        current = following


@dataclass(frozen=True)
class DistributedUpdate:
    """One ``update_weights_from_distributed`` call: the announcement, then the tensors to broadcast."""

    request: dict[str, Any]
    tensors: list[torch.Tensor]


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: what SGLang resolves with ``getattr(torch, name)``."""
    return str(dtype).removeprefix("torch.")


def sglang_distributed_updates(
    weights: Iterable[tuple[Any, ...]],
    max_bytes: int = DEFAULT_CHUNK_BYTES,
    group_name: str = WEIGHT_UPDATE_GROUP,
) -> Iterator[DistributedUpdate]:
    """Per chunk: the keyword arguments of ``Engine.update_weights_from_distributed`` (names, dtypes as
    strings, shapes as lists) and the tensors the trainer then broadcasts from its rank 0, in that order."""
    chunks = chunk_by_bytes(weights, max_bytes)
    current = next(chunks, None)
    while current is not None:
        following = next(chunks, None)
        yield DistributedUpdate(
            request={
                "names": [name for name, _ in current],
                "dtypes": [dtype_name(t.dtype) for _, t in current],
                "shapes": [list(t.shape) for _, t in current],
                "group_name": group_name,
                "flush_cache": following is None,
            },
            tensors=[t for _, t in current],
        )
        current = following


def sglang_init_group_kwargs(
    master_address: str, master_port: int, engine_world_size: int, group_name: str = WEIGHT_UPDATE_GROUP,
    backend: str = "nccl",
) -> dict[str, Any]:
    """Keyword arguments of ``Engine.init_weights_update_group``: the trainer is rank 0 of a group of
    ``1 + engine_world_size`` ranks, the engine's ranks start at offset 1."""
    if engine_world_size < 1:
        raise PayloadError(f"engine_world_size must be >= 1, got {engine_world_size}")
    if not 0 < master_port < 65536:
        raise PayloadError(f"master_port must be a TCP port (1..65535), got {master_port}")
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": 1,
        "world_size": 1 + engine_world_size,
        "group_name": group_name,
        "backend": backend,
    }


@contextlib.contextmanager
def paused_generation(engine: Any, pause: str = "pause_generation", resume: str = "continue_generation") -> Iterator[Any]:
    """Pause the engine's generation for a weight sync and always resume it, also when the sync fails.

    ``pause`` / ``resume`` name the engine's methods. The defaults are SGLang's names: sglang 0.5.23 serves
    them as the HTTP endpoints ``/pause_generation`` and ``/continue_generation`` (its ``Engine`` class has
    no such methods), so pass a client whose methods POST there. vLLM's AsyncLLM uses
    ``pause_generation`` / ``resume_generation``. A failing resume after a failing sync is logged and the
    sync's error is the one raised.
    """
    getattr(engine, pause)()
    try:
        yield engine
    except BaseException:
        try:
            getattr(engine, resume)()
        except Exception:
            logger.exception("moe-lora-plugins: resuming generation after a failed weight sync also failed")
        raise
    else:
        getattr(engine, resume)()
