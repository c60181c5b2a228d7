"""Per-bucket staging of an adapter sync: pieces into one flat payload, one payload back into tensors.

The sender lays a bucket's pieces out back to back (each at an offset aligned to its element size,
so a single-dtype adapter needs no padding) and fills one payload on the transport's device with
queued copies: no host synchronisation per piece. The receiver brings a payload to the CPU with
one copy and files every tensor as a view of it: no copy, no device synchronisation per tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from moe_lora_plugins.sync.errors import AdapterSyncError
from moe_lora_plugins.sync.protocol import AdapterPiece, ManifestEntry, dtype_from_name, dtype_name


def aligned(offset: int, alignment: int) -> int:
    """The first offset at or after ``offset`` that is a multiple of ``alignment``."""
    return -(-offset // alignment) * alignment


def bucket_layout(pieces: Sequence[AdapterPiece]) -> tuple[list[ManifestEntry], int]:
    """Manifest entries of one bucket and its payload size: each piece at an offset aligned to its element
    size (padding only where a piece of a smaller element size leaves the offset unaligned)."""
    entries, offset = [], 0
    for piece in pieces:
        offset = aligned(offset, piece.tensor.element_size())
        entries.append(ManifestEntry(piece.name, dtype_name(piece.tensor.dtype), tuple(piece.tensor.shape), offset,
                                     piece.nbytes, piece.shard, tuple(piece.experts), tuple(piece.aliases)))
        offset += piece.nbytes
    return entries, offset


def as_bytes(tensor: Any) -> Any:
    """A flat uint8 view of ``tensor``'s data (a contiguous copy first if it is not contiguous)."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _staging_device(pieces: Sequence[AdapterPiece], device: Any) -> Any:
    """Where to fill the payload: ``device``, or for a CPU payload of GPU-resident pieces their GPU (one
    device-to-host copy of the whole bucket instead of one per piece)."""
    import torch

    device = torch.device(device)
    if device.type != "cpu":
        return device
    gpu = next((p.tensor.device for p in pieces if p.tensor.device.type != "cpu"), None)
    return gpu if gpu is not None else device


def pack_payload(pieces: Sequence[AdapterPiece], entries: Sequence[ManifestEntry], nbytes: int, device: Any) -> Any:
    """One flat uint8 payload of ``nbytes`` on ``device`` holding every piece at its entry's offset.

    On a GPU the copies are queued on the current stream (host-to-device copies of pageable memory are
    staged by the driver, so the pieces may change once this returns); anything queued after them on
    that stream, such as an NCCL send, sees the complete payload. Padding bytes are zero.
    """
    import torch

    stage_on = _staging_device(pieces, device)
    payload = torch.empty(nbytes, dtype=torch.uint8, device=stage_on)
    if stage_on.type == "cpu":
        return fill_host_payload(pieces, entries, payload)
    asynchronous = stage_on.type == "cuda"
    filled = 0
    for piece, entry in zip(pieces, entries, strict=True):
        if entry.offset > filled:
            payload[filled:entry.offset].zero_()
        payload[entry.offset:entry.offset + entry.nbytes].copy_(as_bytes(piece.tensor), non_blocking=asynchronous)
        filled = entry.offset + entry.nbytes
    return payload.to(device)


def fill_host_payload(pieces: Sequence[AdapterPiece], entries: Sequence[ManifestEntry], out: Any) -> Any:
    """Fill the CPU uint8 tensor ``out`` with every piece at its entry's offset and return it.

    CPU pieces are copied with plain memory copies (numpy's, which release the GIL): torch's ``copy_``
    opens a parallel region per piece, which on a busy host costs milliseconds each for hundreds of
    pieces. A bucket of at least :data:`PARALLEL_FILL_BYTES` is split into runs of pieces of about
    equal bytes, copied by :func:`fill_threads` threads at once. Pieces on a GPU are packed there
    first and come over in one device-to-host copy. Padding bytes are zero.
    """
    gpu = next((p.tensor.device for p in pieces if p.tensor.device.type != "cpu"), None)
    if gpu is not None:
        out.copy_(pack_payload(pieces, entries, int(out.numel()), gpu))
        return out
    target = out.numpy()
    spans: list[tuple[int, int, Any]] = []  # (start, stop, source bytes or None for zero padding)
    filled = 0
    for piece, entry in zip(pieces, entries, strict=True):
        if entry.offset > filled:
            spans.append((filled, entry.offset, None))
        spans.append((entry.offset, entry.offset + entry.nbytes, as_bytes(piece.tensor).numpy()))
        filled = entry.offset + entry.nbytes
    if filled < target.shape[0]:
        spans.append((filled, target.shape[0], None))
    threads = fill_threads()
    if threads <= 1 or target.shape[0] < PARALLEL_FILL_BYTES or len(spans) < 2:
        _copy_spans(target, spans)
        return out
    runs = _split_runs(spans, threads)
    for future in [_pool(threads).submit(_copy_spans, target, run) for run in runs]:
        future.result()
    return out


PARALLEL_FILL_BYTES = 8 << 20
"""Buckets of at least this many bytes are filled by several threads (:func:`fill_threads`)."""


def fill_threads() -> int:
    """Threads that fill one host bucket: ``MOELORA_SYNC_FILL_THREADS`` (1 turns threading off), else
    the smaller of 4 and the CPUs this process may run on."""
    import os

    from moe_lora_plugins.envs import parse_fill_threads

    threads = parse_fill_threads(os.environ.get("MOELORA_SYNC_FILL_THREADS"))
    if threads is not None:
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _copy_spans(target: Any, spans: Sequence[tuple[int, int, Any]]) -> None:
    for start, stop, source in spans:
        if source is None:
            target[start:stop] = 0
        else:
            target[start:stop] = source


def _split_runs(spans: list[tuple[int, int, Any]], parts: int) -> list[list[tuple[int, int, Any]]]:
    """``spans`` (in order, back to back) cut into at most ``parts`` runs of about equal bytes."""
    total = spans[-1][1] - spans[0][0]
    runs: list[list[tuple[int, int, Any]]] = [[]]
    for span in spans:
        if runs[-1] and len(runs) < parts and span[0] - spans[0][0] >= total * len(runs) / parts:
            runs.append([])
        runs[-1].append(span)
    return runs


_pools: dict[tuple[int, int], Any] = {}


def _pool(threads: int) -> Any:
    """This process's fill threads (made once per process and size; a forked child makes its own)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    key = (os.getpid(), threads)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="moelora-sync-fill")
    return pool


def host_payload(payload: Any) -> Any:
    """The received payload on the CPU: itself, or one blocking device-to-host copy of the whole bucket."""
    return payload if payload.device.type == "cpu" else payload.cpu()


def tensor_from_payload(payload: Any, entry: ManifestEntry, where: str, typed: dict[Any, Any] | None = None) -> Any:
    """The tensor ``entry`` describes, as a view of the CPU ``payload`` (a copy only where an older
    sender left its offset unaligned for its dtype). ``where`` names the bucket in errors. ``typed``
    (a dict the caller keeps for one payload) holds the payload viewed as each dtype, made once."""
    dtype = dtype_from_name(entry.dtype)
    itemsize = dtype.itemsize
    end = entry.offset + entry.nbytes
    size = int(payload.numel())
    if entry.offset < 0 or end > size:
        raise AdapterSyncError(f"{where}: {entry.name!r} claims bytes {entry.offset}..{end} of a {size}-byte payload")
    numel, strides = _contiguous(entry.shape)
    if entry.nbytes != numel * itemsize:
        raise AdapterSyncError(
            f"{where}: {entry.name!r} announces {entry.nbytes} bytes, but shape {list(entry.shape)} of {entry.dtype} "
            f"needs {numel * itemsize}; the sender's manifest is corrupt"
        )
    if entry.offset % itemsize:
        return payload[entry.offset:end].clone().view(dtype).reshape(entry.shape)
    # One view op per entry: the payload's whole elements as ``dtype`` (made once per bucket), strided to it.
    flat = None if typed is None else typed.get(dtype)
    if flat is None:
        flat = payload[: size - size % itemsize].view(dtype)
        if typed is not None:
            typed[dtype] = flat
    return flat.as_strided(entry.shape, strides, flat.storage_offset() + entry.offset // itemsize)


@functools.lru_cache(maxsize=1 << 12)
def _contiguous(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Element count and contiguous strides of ``shape`` (remembered: an adapter has few distinct shapes)."""
    strides, numel = [], 1
    for dim in reversed(shape):
        strides.append(numel)
        numel *= dim
    return numel, tuple(reversed(strides))
