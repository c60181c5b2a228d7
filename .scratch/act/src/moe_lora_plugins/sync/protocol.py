"""The wire form of an adapter sync: pieces, bucket plan by bytes, bucket header and manifest.

A sync is, per sender, a run of buckets with sequence numbers 0, 1, 2, ... followed by an end
marker. Each bucket is three messages: a fixed-size int64 header, a JSON manifest (one entry per
tensor piece: name, dtype, shape, byte offset, optional shard or shared-expert description) and
one flat uint8 payload holding the pieces back to back, each at an offset aligned to its element
size (so the receiver can view it in place); a single-dtype adapter has no padding, and wire bytes
equal tensor bytes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.sync.errors import AdapterSyncError

MAGIC = 0x4D4F454C  # "MOEL"
PROTOCOL_VERSION = 2  # 2: a manifest entry lists its experts as ranges ("expert_ranges")
HEADER_FIELDS = ("magic", "protocol", "version", "seq", "sender", "is_end", "manifest_nbytes", "payload_nbytes")
HEADER_LEN = len(HEADER_FIELDS)
EXPERT_PLACEHOLDER = "{expert}"

# The protocol's limits. A receiver allocates what a header announces, so every size and count it reads
# is bounded here before anything is allocated, and the sender refuses to send beyond them.
MAX_MANIFEST_BYTES = 64 << 20  # one bucket's JSON manifest (~200 bytes per piece: ~300k pieces)
MAX_PAYLOAD_BYTES = 8 << 30  # one bucket's payload: a bucket is bucket_bytes, or one piece larger than that
MAX_SEQUENCE = (1 << 31) - 1  # bucket sequence numbers and sync versions
MAX_SENDERS = 1 << 16
MAX_TENSOR_DIMS = 8
MAX_EXPERTS = 1 << 16
MANIFEST_CACHE_ENTRIES = 64  # parsed manifests remembered by their bytes (every sync repeats them) ...
MANIFEST_CACHE_MAX_BYTES = 1 << 20  # ... if at most this large (64 MiB held at most)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block (reference counting still frees everything).

    A sync makes and drops tens of thousands of small containers (one per expanded name); with the
    collector running, each 700 of them start a collection and every tenth of those walks the whole
    heap of the host process (a trainer or an engine: hundreds of thousands of objects), so on a busy
    heap most of a sync went to collections that found nothing. The temporaries are gone before the
    block ends, so no work is deferred except for what the sync keeps. Nested use is fine.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def check_bound(where: str, field_name: str, value: Any, low: int, high: int, limit_name: str = "") -> int:
    """``value`` as an int in ``low..high``, or an :class:`AdapterSyncError` naming the field and the bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterSyncError(f"{where}: {field_name}={value!r} is not an integer; the sync is corrupt")
    if not low <= value <= high:
        bound = f" ({limit_name})" if limit_name else ""
        raise AdapterSyncError(
            f"{where}: {field_name}={value} is outside {low}..{high}{bound}; the sender is not speaking this "
            "protocol or the sync is corrupt (send buckets of at most the limit: a smaller bucket_bytes)"
        )
    return value


@dataclass(frozen=True)
class ShardSpec:
    """This piece is part ``index`` of ``count`` of a tensor split along ``dim`` (TP, expert-TP, EP)."""

    dim: int
    index: int
    count: int

    def to_json(self) -> list[int]:
        return [self.dim, self.index, self.count]

    @classmethod
    def from_json(cls, value: Sequence[int], where: str = "manifest", ndim: int = MAX_TENSOR_DIMS) -> ShardSpec:
        if not isinstance(value, list) or len(value) != 3:
            raise AdapterSyncError(f"{where}: shard={value!r} is not [dim, index, count]; the sync is corrupt")
        dim, index, count = value
        count = check_bound(where, "shard count", count, 1, MAX_EXPERTS)
        return cls(check_bound(where, "shard dim", dim, 0, max(ndim - 1, 0)),
                   check_bound(where, "shard index", index, 0, count - 1), count)


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

    def check_limits(self, where: str = "bucket header") -> BucketHeader:
        """Itself, once every field is inside the protocol's limits (else an error naming the field)."""
        check_bound(where, "version", self.version, 0, MAX_SEQUENCE)
        check_bound(where, "seq", self.seq, 0, MAX_SEQUENCE)
        check_bound(where, "sender", self.sender, 0, MAX_SENDERS - 1, "MAX_SENDERS - 1")
        check_bound(where, "manifest_nbytes", self.manifest_nbytes, 0, MAX_MANIFEST_BYTES, "MAX_MANIFEST_BYTES")
        check_bound(where, "payload_nbytes", self.payload_nbytes, 0, MAX_PAYLOAD_BYTES, "MAX_PAYLOAD_BYTES")
        return self

    @classmethod
    def from_list(cls, values: Sequence[int]) -> BucketHeader:
        """Parse a received header; every size is bounded by the protocol's limits before anything is allocated."""
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
        where = "received bucket header"
        check_bound(where, "is_end", values[5], 0, 1)
        return cls(values[2], values[3], values[4], bool(values[5]), values[6], values[7]).check_limits(where)


@dataclass(frozen=True)
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
    def names(self) -> tuple[str, ...]:
        return _expanded((self.name, *self.aliases), self.experts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                               "offset": self.offset, "nbytes": self.nbytes}
        if self.shard is not None:
            out["shard"] = self.shard.to_json()
        if self.experts:
            out["expert_ranges"] = _expert_runs(self.experts)  # tuples: JSON arrays all the same
        if self.aliases:
            out["aliases"] = list(self.aliases)
        return out

    @classmethod
    def from_json(cls, value: dict[str, Any], where: str = "manifest entry") -> ManifestEntry:
        """Parse one received entry; names are strings, sizes and indices inside the protocol's limits."""
        if not isinstance(value, dict):
            raise AdapterSyncError(f"{where}: an entry is a JSON {type(value).__name__}, not an object")
        name = value.get("name")
        if not isinstance(name, str) or not name:
            raise AdapterSyncError(f"{where}: name={name!r} is not a tensor name; the sync is corrupt")
        where = f"{where} {name!r}"
        dtype = value.get("dtype")
        if not isinstance(dtype, str):
            raise AdapterSyncError(f"{where}: dtype={dtype!r} is not a dtype name; the sync is corrupt")
        shape = value.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS:
            raise AdapterSyncError(
                f"{where}: shape={shape!r} is not a list of at most {MAX_TENSOR_DIMS} sizes; the sync is corrupt"
            )
        dims = tuple(check_bound(where, f"shape[{i}]", d, 0, MAX_PAYLOAD_BYTES) for i, d in enumerate(shape))
        if "experts" in value and "expert_ranges" in value:
            raise AdapterSyncError(f"{where}: has both experts and expert_ranges; the sync is corrupt")
        if "expert_ranges" in value:
            experts = _experts_from_ranges(value["expert_ranges"], where)
        else:
            listed = value.get("experts", [])
            if not isinstance(listed, list) or len(listed) > MAX_EXPERTS:
                raise AdapterSyncError(f"{where}: experts is not a list of at most {MAX_EXPERTS} indices")
            experts = tuple(check_bound(where, f"experts[{i}]", e, 0, MAX_EXPERTS - 1) for i, e in enumerate(listed))
        aliases = value.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise AdapterSyncError(f"{where}: aliases={aliases!r} is not a list of tensor names")
        return cls(
            name=name, dtype=dtype, shape=dims,
            offset=check_bound(where, "offset", value.get("offset"), 0, MAX_PAYLOAD_BYTES, "MAX_PAYLOAD_BYTES"),
            nbytes=check_bound(where, "nbytes", value.get("nbytes"), 0, MAX_PAYLOAD_BYTES, "MAX_PAYLOAD_BYTES"),
            shard=ShardSpec.from_json(value["shard"], where, len(dims)) if "shard" in value else None,
            experts=experts,
            aliases=tuple(aliases),
        )


def expert_ranges(experts: Sequence[int]) -> list[list[int]]:
    """``experts`` as ``[start, stop)`` runs of consecutive indices (128 experts: ``[[0, 128]]``)."""
    runs: list[list[int]] = []
    for e in experts:
        if runs and runs[-1][1] == e:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1])
    return runs


@functools.lru_cache(maxsize=1 << 10)
def _expert_runs(experts: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """:func:`expert_ranges` of one entry's experts, remembered (every bucket of a sync repeats them)."""
    return tuple((start, stop) for start, stop in expert_ranges(experts))


def _experts_from_ranges(value: Any, where: str) -> tuple[int, ...]:
    """The expert indices of a received ``expert_ranges`` list, every bound and the total count checked."""
    if not isinstance(value, list) or len(value) > MAX_EXPERTS:
        raise AdapterSyncError(f"{where}: expert_ranges is not a list of at most {MAX_EXPERTS} [start, stop] pairs")
    experts: list[int] = []
    for i, run in enumerate(value):
        if not isinstance(run, list) or len(run) != 2:
            raise AdapterSyncError(f"{where}: expert_ranges[{i}]={run!r} is not [start, stop]; the sync is corrupt")
        start = check_bound(where, f"expert_ranges[{i}] start", run[0], 0, MAX_EXPERTS - 1)
        stop = check_bound(where, f"expert_ranges[{i}] stop", run[1], start + 1, MAX_EXPERTS)
        if len(experts) + stop - start > MAX_EXPERTS:
            raise AdapterSyncError(f"{where}: expert_ranges name more than MAX_EXPERTS={MAX_EXPERTS} experts")
        experts.extend(range(start, stop))
    return tuple(experts)


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
        """Parse and check a received manifest. A manifest whose bytes equal one parsed before (every sync of
        one adapter repeats its manifests) reuses that parse; its entries are immutable."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise AdapterSyncError(
                f"a bucket manifest of {len(raw)} bytes exceeds MAX_MANIFEST_BYTES={MAX_MANIFEST_BYTES}; send "
                "smaller buckets (bucket_bytes)"
            )
        raw = bytes(raw)
        parsed = _parsed_manifests.get(raw)
        if parsed is None:
            parsed = cls._parse(raw)
            if len(raw) <= MANIFEST_CACHE_MAX_BYTES:
                if len(_parsed_manifests) >= MANIFEST_CACHE_ENTRIES:
                    _parsed_manifests.pop(next(iter(_parsed_manifests), b""), None)
                _parsed_manifests[raw] = parsed
        entries, summary = parsed
        return cls(list(entries), json.loads(summary))

    @staticmethod
    def _parse(raw: bytes) -> tuple[tuple[ManifestEntry, ...], str]:
        try:
            value = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterSyncError(f"a bucket manifest could not be decoded ({exc}); the sync is corrupt") from None
        if not isinstance(value, dict) or not isinstance(value.get("entries"), list):
            raise AdapterSyncError("a bucket manifest is not an object with an 'entries' list; the sync is corrupt")
        summary = value.get("summary", {})
        if not isinstance(summary, dict):
            raise AdapterSyncError(f"a bucket manifest's summary is a JSON {type(summary).__name__}, not an object")
        entries = tuple(ManifestEntry.from_json(e, f"manifest entry {i}") for i, e in enumerate(value["entries"]))
        return entries, json.dumps(summary)  # each decode gets a fresh summary dict of its own


# Parsed manifests by their bytes (insertion order: the oldest is dropped first).
_parsed_manifests: dict[bytes, tuple[tuple[ManifestEntry, ...], str]] = {}


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
