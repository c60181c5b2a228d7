"""Moving an adapter sync over a torch.distributed process group (gloo on the CPU, NCCL on GPUs).

Senders (trainer ranks, e.g. one per pipeline stage) and receivers (engine workers) share a group
made for the sync alone. Every sender sends each of its buckets to every receiver point to point:
header, manifest, payload. A receiver takes the senders' streams one after another and feeds an
:class:`AdapterAssembler`. The group is any object with torch's ``ProcessGroup`` ``send`` / ``recv``
methods, addressed with ranks of that group; :func:`new_sync_group` makes one without touching
the default process group (an engine worker already has one of its own).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.sync.assembly import AdapterAssembler, ReceivedAdapter
from moe_lora_plugins.sync.errors import AdapterSyncError, IncompleteSyncError
from moe_lora_plugins.sync.protocol import (
    HEADER_LEN,
    MAX_PAYLOAD_BYTES,
    AdapterPiece,
    BucketHeader,
    Manifest,
    paused_gc,
    plan_buckets,
)
from moe_lora_plugins.sync.staging import bucket_layout, fill_host_payload, pack_payload

DEFAULT_BUCKET_BYTES = 64 << 20


def new_sync_group(host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                   timeout_s: float = 300.0) -> Any:
    """A process group of ``world_size`` ranks rendezvousing at ``host:port``, outside the default group.

    Rank 0 hosts the TCP store. ``backend`` is ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors).
    """
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
    if backend == "gloo":
        return dist.ProcessGroupGloo(dist.PrefixStore("moelora-sync", store), rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(dist.PrefixStore("moelora-sync", store), rank, world_size, options)
    raise ValueError(f"sync backend must be 'gloo' or 'nccl', not {backend!r}")


@dataclass(frozen=True)
class SendReport:
    sender: int
    buckets: int
    payload_bytes: int
    tensors: int


def _send(group: Any, tensor: Any, dst: int) -> None:
    group.send([tensor], dst, 0).wait()


def _recv(group: Any, tensor: Any, src: int) -> None:
    group.recv([tensor], src, 0).wait()


def pack_bucket(pieces: Sequence[AdapterPiece], device: Any = "cpu") -> tuple[Manifest, Any]:
    """The manifest and the flat uint8 payload of one bucket, filled on ``device`` (see ``staging``)."""
    entries, nbytes = bucket_layout(pieces)
    return Manifest(entries), pack_payload(pieces, entries, nbytes, device)


def send_adapter(
    pieces: Iterable[AdapterPiece],
    group: Any,
    receivers: Sequence[int],
    *,
    sender: int,
    version: int,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    config: dict[str, Any] | None = None,
    device: Any = "cpu",
    wait_for_ack: bool = True,
    shared_memory: Any = None,
) -> SendReport:
    """Send this sender's pieces in buckets of at most ``bucket_bytes``, then its end marker.

    ``sender`` numbers the senders of one sync 0..S-1 (for example the pipeline stage); ``version``
    is the sync's sequence number (the training step). ``config`` is the PEFT adapter config (r,
    lora_alpha, target_modules, ...); every sender that passes one must pass the same. With
    ``wait_for_ack`` it returns once every receiver confirmed the buckets it received. Each bucket is
    filled on ``device`` with one queued copy per piece (see ``staging``); the pieces may change once
    this returns. A bucket exceeds ``bucket_bytes`` only by alignment padding (less than one element
    per piece, none for a single-dtype adapter) or when a single piece is larger.

    ``shared_memory`` (a :class:`moe_lora_plugins.sync.shm.SharedPayloadWriter`, or ``True`` for this
    process's) sends each bucket's bytes through a shared-memory segment instead of the group: for a
    receiver on the same host, which then views the tensors in place; only headers, manifests and
    acknowledgements cross the group. One receiver only.
    """
    with paused_gc():
        return _send_adapter(pieces, group, receivers, sender, version, bucket_bytes, config, device, wait_for_ack,
                             shared_memory)


def _send_adapter(pieces: Iterable[AdapterPiece], group: Any, receivers: Sequence[int], sender: int, version: int,
                  bucket_bytes: int, config: dict[str, Any] | None, device: Any, wait_for_ack: bool,
                  shared_memory: Any) -> SendReport:
    import torch

    writer = _writer(shared_memory, receivers)
    pieces = list(pieces)
    if bucket_bytes > MAX_PAYLOAD_BYTES:
        raise ValueError(f"bucket_bytes={bucket_bytes} exceeds the protocol's MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}")
    oversized = [(p.name, p.nbytes) for p in pieces if p.nbytes > MAX_PAYLOAD_BYTES]
    if oversized:
        raise ValueError(
            f"piece {oversized[0][0]!r} has {oversized[0][1]} bytes, more than the protocol's MAX_PAYLOAD_BYTES="
            f"{MAX_PAYLOAD_BYTES}; send it in shards (AdapterPiece(shard=ShardSpec(...)))"
        )
    buckets = plan_buckets((p.nbytes for p in pieces), bucket_bytes)
    total = 0
    for seq, indices in enumerate(buckets):
        bucket = [pieces[i] for i in indices]
        if writer is None:
            manifest, payload = pack_bucket(bucket, device)
            nbytes = int(payload.numel())
        else:
            entries, nbytes = bucket_layout(bucket)
            ref, segment_bytes = writer.acquire(nbytes)
            fill_host_payload(bucket, entries, segment_bytes)
            manifest, payload = Manifest(entries, {"shm": ref.to_json()}), None
        header = BucketHeader(version, seq, sender, False, 0, nbytes)
        send_bucket(group, receivers, header, manifest, payload, device)
        total += nbytes
    summary: dict[str, Any] = {"buckets": len(buckets), "payload_bytes": total, "tensors": len(pieces)}
    if config is not None:
        summary["config"] = config
    if writer is not None:
        summary["shm_writer"] = writer.key
    send_bucket(group, receivers, BucketHeader(version, len(buckets), sender, True, 0, 0), Manifest([], summary),
                 None, device)
    if wait_for_ack:
        for src in receivers:
            ack = torch.zeros(1, dtype=torch.int64, device=device)
            _recv(group, ack, src)
            if int(ack.item()) != len(buckets):
                raise AdapterSyncError(
                    f"receiver at group rank {src} acknowledged {int(ack.item())} bucket(s) of sender {sender}, "
                    f"{len(buckets)} were sent"
                )
            if writer is not None:
                writer.released(_recv_released(group, src, device))
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # pinned pieces are read by queued copies
    return SendReport(sender, len(buckets), total, len(pieces))


def _writer(shared_memory: Any, receivers: Sequence[int]) -> Any:
    if shared_memory is None or shared_memory is False:
        return None
    if len(receivers) != 1:
        raise ValueError(
            f"a shared-memory sync has one receiver, got {len(receivers)} ({list(receivers)}); send to several "
            "receivers over the group (shared_memory=None)"
        )
    from moe_lora_plugins.sync.shm import default_writer

    return default_writer() if shared_memory is True else shared_memory


def _recv_released(group: Any, src: int, device: Any) -> list[int]:
    import torch

    count = torch.zeros(1, dtype=torch.int64, device=device)
    _recv(group, count, src)
    if int(count.item()) == 0:
        return []
    numbers = torch.zeros(int(count.item()), dtype=torch.int64, device=device)
    _recv(group, numbers, src)
    return [int(n) for n in numbers.tolist()]


def _send_released(group: Any, dst: int, numbers: list[int], device: Any) -> None:
    import torch

    _send(group, torch.tensor([len(numbers)], dtype=torch.int64, device=device), dst)
    if numbers:
        _send(group, torch.tensor(numbers, dtype=torch.int64, device=device), dst)


def send_bucket(group: Any, receivers: Sequence[int], header: BucketHeader, manifest: Manifest,
                payload: Any, device: Any = "cpu") -> None:
    """Send one bucket (header, manifest, payload) to every receiver; the header's manifest size is filled in.
    A ``None`` payload stays off the group (a shared-memory bucket: the manifest says where it lies)."""
    import torch

    raw = manifest.encode()
    header = BucketHeader(header.version, header.seq, header.sender, header.is_end, len(raw),
                          header.payload_nbytes).check_limits("bucket to send")
    header_tensor = torch.tensor(header.to_list(), dtype=torch.int64, device=device)
    manifest_tensor = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
    for dst in receivers:
        _send(group, header_tensor, dst)
        _send(group, manifest_tensor, dst)
        if header.payload_nbytes and payload is not None:
            _send(group, payload, dst)


def receive_adapter(group: Any, senders: Sequence[int], *, version: int | None = None,
                    device: Any = "cpu", shared_memory: Any = None) -> ReceivedAdapter:
    """Receive one sync from the given sender ranks (in the order of their sender numbers) and assemble it.

    Tensors are staged on the CPU whatever ``device`` the transport uses. A transport failure before
    every end marker arrived raises :class:`IncompleteSyncError`, naming what had arrived. Buckets a
    sender put in shared memory are viewed in place through ``shared_memory`` (a
    :class:`moe_lora_plugins.sync.shm.SharedPayloadReader`; this process's when ``None``).
    """
    with paused_gc():
        return _receive_adapter(group, senders, version, device, shared_memory)


def _receive_adapter(group: Any, senders: Sequence[int], version: int | None, device: Any,
                     shared_memory: Any) -> ReceivedAdapter:
    import torch

    from moe_lora_plugins.sync.shm import SegmentRef, default_reader

    reader = shared_memory or default_reader()
    assembler = AdapterAssembler(len(senders), version)
    for sender, src in enumerate(senders):
        ended = False
        while not ended:
            try:
                header_tensor = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
                _recv(group, header_tensor, src)
                header = BucketHeader.from_list(header_tensor.cpu().tolist())
                manifest_tensor = torch.empty(header.manifest_nbytes, dtype=torch.uint8, device=device)
                _recv(group, manifest_tensor, src)
                manifest = Manifest.decode(bytes(manifest_tensor.cpu().numpy().tobytes()))
                shm = None if header.is_end else manifest.summary.get("shm")
                if shm is not None:
                    ref = SegmentRef.from_json(shm)
                    payload = reader.open(ref, writer_key=ref.path.rsplit("-", 1)[0])
                else:
                    payload = torch.empty(header.payload_nbytes, dtype=torch.uint8, device=device)
                    if header.payload_nbytes:
                        _recv(group, payload, src)
            except AdapterSyncError:
                raise
            except Exception as exc:  # the transport itself failed: a sender died or the group timed out
                raise IncompleteSyncError(
                    f"the sync stopped before the end marker of the sender at group rank {src} "
                    f"({assembler.progress()}): {type(exc).__name__}: {exc}. Nothing was activated; check the "
                    "trainer rank's log and retry the sync on a fresh group."
                ) from exc
            if header.sender != sender:
                raise AdapterSyncError(
                    f"group rank {src} sent buckets as sender {header.sender}, but the receiver lists it as sender "
                    f"{sender} (senders={list(senders)}); pass the senders' group ranks in sender-number order"
                )
            assembler.add_bucket(header, manifest, payload)
            ended = header.is_end
            writer_key = manifest.summary.get("shm_writer") if ended else None
        _send(group, torch.tensor([assembler.buckets_from(sender)], dtype=torch.int64, device=device), src)
        if writer_key is not None:
            _send_released(group, src, reader.take_released(writer_key), device)
    return assembler.finish()


def adapter_pieces(tensors: dict[str, Any]) -> list[AdapterPiece]:
    """Whole, unsharded pieces for a plain PEFT-named ``{name: tensor}`` adapter."""
    return [AdapterPiece(name, tensor) for name, tensor in tensors.items()]


def pieces_from_wire(payload: Any) -> list[AdapterPiece]:
    """Pieces for a compact ``moe_lora_plugins.lora.wire.WirePayload``: each distinct tensor travels once."""
    pieces = []
    for entry in payload.manifest.entries:
        pieces.append(AdapterPiece(entry.names[0], payload.tensors[entry.key], experts=tuple(entry.experts),
                                   aliases=tuple(entry.names[1:])))
    return pieces
