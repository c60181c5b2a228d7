"""The wire form of an adapter sync: pieces, bucket plan by bytes, bucket header and manifest.

A sync is, per sender, a run of buckets with sequence numbers 0, 1, 2, ... followed by an end
marker. Each bucket is three messages: a fixed-size int64 header, a JSON manifest (one entry per
tensor piece: name, dtype, shape, byte offset, optional shard or shared-expert description) and
one flat uint8 payload holding the pieces back to back, each at an offset aligned to its element
size (so the receiver can view it in place); a single-dtype adapter has no padding, and wire bytes
equal tensor bytes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.sync.errors import AdapterSyncError

MAGIC = 0x4D4F454C  # "MOEL"
PROTOCOL_VERSION = 1
HEADER_FIELDS = ("magic", "protocol", "version", "seq", "sender", "is_end", "manifest_nbytes", "payload_nbytes")
HEADER_LEN = len(HEADER_FIELDS)
EXPERT_PLACEHOLDER = "{expert}"


@dataclass(frozen=True)
class ShardSpec:
    """This piece is part ``index`` of ``count`` of a tensor split along ``dim`` (TP, expert-TP, EP)."""

    dim: int
    index: int
    count: int

    def to_json(self) -> list[int]:
        return [self.dim, self.index, self.count]

    @classmethod
    def from_json(cls, value: Sequence[int]) -> ShardSpec:
        dim, index, count = value
        return cls(int(dim), int(index), int(count))


@dataclass
class AdapterPiece:
    """One tensor (or one shard of one) that a sender puts on the wire, and the names it serves.

    ``name`` and ``aliases`` are the names the receiver files the tensor under (a LoRA A shared by
    q/k/v, say). A name containing ``{expert}`` stands for one name per index in ``experts``: a
    compact shared-expert tensor travels once and is expanded at the receiver without a copy.
    """

    name: str
    tensor: Any
    shard: ShardSpec | None = None
    experts: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        templated = [n for n in self.names if EXPERT_PLACEHOLDER in n]
        if templated and not self.experts:
            raise ValueError(
                f"piece {templated[0]!r} has the {EXPERT_PLACEHOLDER!r} placeholder but no experts to expand it "
                "to; pass experts=(0, 1, ...)"
            )
        if self.experts and not templated:
            raise ValueError(
                f"piece {self.name!r} lists experts {self.experts[:4]}... but none of its names has the "
                f"{EXPERT_PLACEHOLDER!r} placeholder; name it like '...mlp.experts.{{expert}}.gate_proj.lora_A.weight'"
            )

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def nbytes(self) -> int:
        return int(self.tensor.numel() * self.tensor.element_size())


def expand_names(names: Sequence[str], experts: Sequence[int]) -> list[str]:
    """Every concrete name of a piece: ``{expert}`` names once per expert, the others as they are."""
    out: list[str] = []
    for name in names:
        if EXPERT_PLACEHOLDER in name:
            out.extend(name.replace(EXPERT_PLACEHOLDER, str(e)) for e in experts)
        else:
            out.append(name)
    return out


@functools.lru_cache(maxsize=1 << 14)
def _expanded(names: tuple[str, ...], experts: tuple[int, ...]) -> tuple[str, ...]:
    """:func:`expand_names`, remembered: every sync of one adapter expands the same names."""
    return tuple(expand_names(names, experts))


@dataclass(frozen=True)
class BucketHeader:
    version: int
    seq: int
    sender: int
    is_end: bool
    manifest_nbytes: int
    payload_nbytes: int

    def to_list(self) -> list[int]:
        return [MAGIC, PROTOCOL_VERSION, self.version, self.seq, self.sender, int(self.is_end),
                self.manifest_nbytes, self.payload_nbytes]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> BucketHeader:
        values = [int(v) for v in values]
        if len(values) != HEADER_LEN or values[0] != MAGIC:
            raise AdapterSyncError(
                f"received a bucket header that is not ours: {values}. Sender and receiver must both run "
                "moe-lora-plugins' sync over a group used for nothing else."
            )
        if values[1] != PROTOCOL_VERSION:
            raise AdapterSyncError(
                f"sender speaks sync protocol {values[1]}, this receiver {PROTOCOL_VERSION}: install the same "
                "moe-lora-plugins version on trainer and engine."
            )
        return cls(values[2], values[3], values[4], bool(values[5]), values[6], values[7])


@dataclass
class ManifestEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    shard: ShardSpec | None = None
    experts: tuple[int, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return list(_expanded((self.name, *self.aliases), self.experts))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                               "offset": self.offset, "nbytes": self.nbytes}
        if self.shard is not None:
            out["shard"] = self.shard.to_json()
        if self.experts:
            out["experts"] = list(self.experts)
        if self.aliases:
            out["aliases"] = list(self.aliases)
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ManifestEntry:
        return cls(
            name=value["name"], dtype=value["dtype"], shape=tuple(map(int, value["shape"])),
            offset=int(value["offset"]), nbytes=int(value["nbytes"]),
            shard=ShardSpec.from_json(value["shard"]) if "shard" in value else None,
            experts=tuple(map(int, value.get("experts", ()))),
            aliases=tuple(value.get("aliases", ())),
        )


@dataclass
class Manifest:
    """What a bucket holds; an end marker's manifest carries the sender's totals and the adapter config."""

    entries: list[ManifestEntry] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"entries": [e.to_json() for e in self.entries], "summary": self.summary},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        try:
            value = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterSyncError(f"a bucket manifest could not be decoded ({exc}); the sync is corrupt") from None
        return cls([ManifestEntry.from_json(e) for e in value["entries"]], dict(value.get("summary", {})))


def plan_buckets(sizes: Iterable[int], bucket_bytes: int) -> list[list[int]]:
    """Group items (by index, in order) into buckets of at most ``bucket_bytes``; a bigger item rides alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index, size in enumerate(sizes):
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(index)
        filled += size
    if current:
        buckets.append(current)
    return buckets


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise AdapterSyncError(f"unknown tensor dtype {name!r} in a bucket manifest")
    return dtype
