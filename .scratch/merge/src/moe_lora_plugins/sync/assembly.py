"""Receiver-side assembly: buckets from several senders into one PEFT-named adapter on the CPU.

Checks the protocol as buckets arrive (one version per sync, sequence numbers 0, 1, 2 ... per
sender with no duplicate or gap, no piece twice), stages each bucket on the CPU with one copy and
files its tensors as views of it, joins TP / expert-TP / EP shards along their dimension once all
parts arrived, and expands compact shared-expert tensors to one name per expert without copying.
``finish`` refuses a sync whose senders have not all sent their end marker.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.sync.errors import AdapterSyncError, IncompleteSyncError
from moe_lora_plugins.sync.protocol import BucketHeader, Manifest, ManifestEntry
from moe_lora_plugins.sync.staging import host_payload, tensor_from_payload


@functools.lru_cache(maxsize=1 << 14)
def _repeats(names: tuple[str, ...]) -> bool:
    """Whether a name occurs twice in one entry's names (remembered: every sync repeats its entries)."""
    return len(set(names)) != len(names)


@dataclass
class ReceivedAdapter:
    """A complete adapter as received: tensors on the CPU, the sender's PEFT config and wire figures."""

    tensors: dict[str, Any]
    config: dict[str, Any]
    version: int
    wire_bytes: int
    buckets: int
    senders: int


@dataclass
class _SenderState:
    next_seq: int = 0
    ended: bool = False
    buckets: int = 0
    payload_bytes: int = 0


@dataclass
class _ShardSet:
    count: int
    dim: int
    parts: dict[int, Any] = field(default_factory=dict)


class AdapterAssembler:
    """Collects the buckets of one sync (one ``version``) from ``num_senders`` senders."""

    def __init__(self, num_senders: int, version: int | None = None) -> None:
        if num_senders < 1:
            raise ValueError(f"a sync needs at least one sender, got {num_senders}")
        self.num_senders = num_senders
        self.version = version
        self._senders = {s: _SenderState() for s in range(num_senders)}
        self._tensors: dict[str, Any] = {}
        self._shards: dict[str, _ShardSet] = {}
        self._config: dict[str, Any] | None = None
        self.wire_bytes = 0

    def add_bucket(self, header: BucketHeader, manifest: Manifest, payload: Any) -> None:
        """Take one bucket (or end marker); ``payload`` is a flat uint8 tensor of ``header.payload_nbytes``.

        The assembler owns ``payload`` from here on: a CPU payload is kept and its tensors are views of it
        (a GPU payload is copied to the CPU once), so the caller must not reuse or change it.
        """
        header.check_limits(f"sender {header.sender} bucket {header.seq}")
        state = self._check_header(header)
        if header.is_end:
            if header.payload_nbytes or manifest.entries:
                raise AdapterSyncError(
                    f"sender {header.sender}'s end marker carries payload_nbytes={header.payload_nbytes} and "
                    f"{len(manifest.entries)} manifest entries; an end marker carries neither"
                )
            self._end(header, manifest, state)
            return
        if int(payload.numel()) != header.payload_nbytes:
            raise AdapterSyncError(
                f"sender {header.sender} bucket {header.seq}: payload has {int(payload.numel())} bytes, the header "
                f"announced {header.payload_nbytes}"
            )
        payload = host_payload(payload)
        typed: dict[Any, Any] = {}
        for entry in manifest.entries:
            self._stage(header, entry, payload, typed)
        state.next_seq += 1
        state.buckets += 1
        state.payload_bytes += header.payload_nbytes
        self.wire_bytes += header.payload_nbytes

    def _check_header(self, header: BucketHeader) -> _SenderState:
        if self.version is None:
            self.version = header.version
        if header.version != self.version:
            raise AdapterSyncError(
                f"sender {header.sender} sent a bucket of sync version {header.version} into sync version "
                f"{self.version}: two syncs are interleaved on one group. Finish one sync before starting the next."
            )
        state = self._senders.get(header.sender)
        if state is None:
            raise AdapterSyncError(
                f"bucket from sender {header.sender}, but this sync expects senders 0..{self.num_senders - 1}"
            )
        if state.ended:
            raise AdapterSyncError(
                f"sender {header.sender} sent bucket {header.seq} after its end marker; the sync is corrupt"
            )
        if header.seq != state.next_seq:
            kind = "duplicated" if header.seq < state.next_seq else "out-of-order (a bucket is missing)"
            raise AdapterSyncError(
                f"{kind} bucket from sender {header.sender}: sequence number {header.seq}, expected "
                f"{state.next_seq}. Each sender must send every bucket exactly once, numbered from 0."
            )
        return state

    def _end(self, header: BucketHeader, manifest: Manifest, state: _SenderState) -> None:
        summary = manifest.summary
        announced = summary.get("buckets")
        if announced != state.buckets or summary.get("payload_bytes") != state.payload_bytes:
            raise AdapterSyncError(
                f"sender {header.sender}'s end marker announces {announced} bucket(s) / "
                f"{summary.get('payload_bytes')} bytes, but {state.buckets} / {state.payload_bytes} arrived"
            )
        config = summary.get("config")
        if config is not None and not isinstance(config, dict):
            raise AdapterSyncError(
                f"sender {header.sender}'s end marker carries config={config!r}, which is not a JSON object"
            )
        if config is not None:
            if self._config is not None and config != self._config:
                raise AdapterSyncError(
                    f"senders disagree on the adapter config: {self._config} vs {config} (sender {header.sender})"
                )
            self._config = dict(config)
        state.ended = True

    def _stage(self, header: BucketHeader, entry: ManifestEntry, payload: Any, typed: dict[Any, Any]) -> None:
        tensor = tensor_from_payload(payload, entry, f"sender {header.sender} bucket {header.seq}", typed)
        if entry.shard is None:
            self._put_all(entry.names, tensor, header)
            return
        shard = entry.shard
        shard_set = self._shards.setdefault(entry.name, _ShardSet(shard.count, shard.dim))
        if (shard_set.count, shard_set.dim) != (shard.count, shard.dim):
            raise AdapterSyncError(
                f"{entry.name!r}: shards disagree on the split ({shard_set.count} along dim {shard_set.dim} vs "
                f"{shard.count} along dim {shard.dim})"
            )
        if shard.index in shard_set.parts:
            raise AdapterSyncError(
                f"{entry.name!r}: shard {shard.index} of {shard.count} arrived twice (sender {header.sender}, "
                f"bucket {header.seq})"
            )
        shard_set.parts[shard.index] = tensor
        if len(shard_set.parts) == shard_set.count:
            import torch

            parts = [shard_set.parts[i] for i in range(shard_set.count)]
            del self._shards[entry.name]
            whole = torch.cat(parts, dim=shard_set.dim)
            self._put_all(entry.names, whole, header)

    def _put_all(self, names: tuple[str, ...], tensor: Any, header: BucketHeader) -> None:
        """File ``tensor`` under every name (one shared-expert piece: E names, one tensor)."""
        if not self._tensors.keys().isdisjoint(names) or _repeats(names):
            twice = sorted(self._tensors.keys() & set(names))
            name = twice[0] if twice else next(n for n in names if names.count(n) > 1)
            raise AdapterSyncError(
                f"{name!r} arrived twice (second time from sender {header.sender}, bucket {header.seq}); every "
                "tensor must be sent by exactly one sender"
            )
        self._tensors.update(dict.fromkeys(names, tensor))

    def buckets_from(self, sender: int) -> int:
        return self._senders[sender].buckets

    def unfinished_senders(self) -> list[int]:
        return [s for s, state in self._senders.items() if not state.ended]

    def progress(self) -> str:
        return ", ".join(
            f"sender {s}: {st.buckets} bucket(s){' + end' if st.ended else ''}" for s, st in self._senders.items()
        )

    def finish(self) -> ReceivedAdapter:
        """The assembled adapter; raises if a sender has not ended or a sharded tensor is incomplete."""
        unfinished = self.unfinished_senders()
        if unfinished:
            raise IncompleteSyncError(
                f"sync version {self.version} stopped before the end marker of sender(s) {unfinished} "
                f"({self.progress()}); nothing was activated"
            )
        if self._shards:
            missing = {name: sorted(set(range(s.count)) - set(s.parts)) for name, s in self._shards.items()}
            raise IncompleteSyncError(f"sharded tensors are missing parts (name: missing shard indices): {missing}")
        return ReceivedAdapter(
            tensors=dict(self._tensors),
            config=dict(self._config or {}),
            version=int(self.version or 0),
            wire_bytes=self.wire_bytes,
            buckets=sum(s.buckets for s in self._senders.values()),
            senders=self.num_senders,
        )
