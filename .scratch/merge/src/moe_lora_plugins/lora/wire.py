"""The compact wire form of a LoRA adapter: every distinct tensor travels once, with a manifest.

A PEFT / vLLM adapter repeats tensors under many names: LoRA A of a fused q/k/v or gate/up module
under each projection, and an expert adapter shared by all experts under each of the E experts (E-fold
bytes on the wire if sent naively). :func:`encode` keeps one tensor per distinct value and a
:class:`WireManifest` that lists the names each one expands to; :func:`decode` rebuilds the name ->
tensor dict at the receiver, where every name of one wire tensor is the *same* tensor object (no copy).

Stable API (used by the vLLM receiver)::

    payload = encode(named_tensors)              # trainer side; payload.tensors: key -> tensor
    payload.wire_bytes, payload.expanded_bytes   # bytes sent vs bytes of the expanded dict
    blob = payload.manifest.to_tensor()          # uint8 tensor, send it like any other tensor
    manifest = WireManifest.from_tensor(blob)    # receiver side
    named = decode(WirePayload(manifest, received_tensors))   # vLLM/PEFT name -> tensor

Several payloads (one per pipeline stage, say) decode together with :func:`decode_many`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from moe_lora_plugins.errors import MoeLoraError

WIRE_VERSION = 1
_EXPERT_NAME = re.compile(r"^(?P<head>.*\.experts\.)(?P<expert>\d+)(?P<tail>\..+)$")
_PLACEHOLDER = "{expert}"


class WireFormatError(MoeLoraError, ValueError):
    """A wire payload that does not match its manifest (missing, extra, reshaped or retyped tensors)."""


@dataclass(frozen=True)
class WireEntry:
    """One tensor on the wire and the names it stands for at the receiver.

    ``names`` are full tensor names; a name containing ``{expert}`` stands for one name per index in
    ``experts`` (a shared expert adapter is one entry whatever E is).
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    names: tuple[str, ...]
    experts: tuple[int, ...] = ()

    def expand(self) -> list[str]:
        out: list[str] = []
        for name in self.names:
            if _PLACEHOLDER in name:
                out.extend(name.replace(_PLACEHOLDER, str(e)) for e in self.experts)
            else:
                out.append(name)
        return out

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "names": list(self.names),
            "experts": _ranges(self.experts),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> WireEntry:
        experts = tuple(e for start, stop in data.get("experts", ()) for e in range(start, stop))
        return cls(data["key"], tuple(data["shape"]), data["dtype"], tuple(data["names"]), experts)


@dataclass(frozen=True)
class WireManifest:
    """The list of wire entries of one payload (JSON-serialisable; travels as a uint8 tensor)."""

    entries: tuple[WireEntry, ...]
    version: int = WIRE_VERSION
    meta: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return [name for entry in self.entries for name in entry.expand()]

    def to_json(self) -> str:
        return json.dumps(
            {"version": self.version, "meta": self.meta, "entries": [e.to_dict() for e in self.entries]},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> WireManifest:
        data = json.loads(text)
        if data.get("version") != WIRE_VERSION:
            raise WireFormatError(
                f"wire manifest version {data.get('version')!r}; this moe-lora-plugins reads version {WIRE_VERSION}. "
                "Run the same moe-lora-plugins version on trainer and engine."
            )
        return cls(
            tuple(WireEntry.from_dict(e) for e in data["entries"]), data["version"], data.get("meta", {})
        )

    def to_tensor(self) -> torch.Tensor:
        """The manifest as a 1-D uint8 tensor (UTF-8 JSON), for transports that only move tensors."""
        return torch.frombuffer(bytearray(self.to_json().encode()), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, blob: torch.Tensor) -> WireManifest:
        return cls.from_json(bytes(blob.cpu().numpy().tobytes()).decode())


@dataclass
class WirePayload:
    """What travels: the manifest and one tensor per wire key."""

    manifest: WireManifest
    tensors: dict[str, torch.Tensor]

    @property
    def wire_bytes(self) -> int:
        """Bytes of the tensors sent (the manifest is :attr:`manifest_bytes`)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def manifest_bytes(self) -> int:
        return len(self.manifest.to_json().encode())

    @property
    def expanded_bytes(self) -> int:
        """Bytes the expanded name -> tensor dict would take if every name were sent on its own."""
        return sum(_numel(e.shape) * _itemsize(e.dtype) * len(e.expand()) for e in self.manifest.entries)


def encode(
    named_tensors: Mapping[str, torch.Tensor],
    *,
    dedupe: Literal["identity", "content"] = "identity",
    meta: Mapping | None = None,
) -> WirePayload:
    """Encode a name -> tensor dict so each distinct tensor travels once.

    :param dedupe: ``"identity"`` merges names bound to the same tensor (same storage, offset, shape,
        stride and dtype; what :func:`moe_lora_plugins.lora.convert.megatron_to_peft` produces for
        shared tensors; O(1) per tensor). ``"content"`` also merges equal tensors that are distinct
        objects (hashes the bytes on the CPU; use it for adapters read back from disk).
    :param meta: free JSON-able data carried in the manifest (adapter config, version, ...).
    """
    if dedupe == "identity":
        groups, first = _identity_groups(named_tensors)
    else:
        groups, first = {}, {}
        for name, tensor in named_tensors.items():
            key = _content_key(tensor)
            if key in groups and not torch.equal(first[key], tensor):
                key = (*key, name)  # hash collision: keep it apart
            groups.setdefault(key, []).append(name)
            first.setdefault(key, tensor)
    entries = []
    tensors: dict[str, torch.Tensor] = {}
    for key, names in groups.items():
        tensor = first[key]
        wire_key = names[0]
        patterns, experts = _compress_names_cached(tuple(names))
        entries.append(WireEntry(wire_key, tuple(tensor.shape), _dtype_name(tensor.dtype), patterns, experts))
        tensors[wire_key] = tensor.contiguous()
    return WirePayload(WireManifest(tuple(entries), meta=dict(meta or {})), tensors)


def decode(payload: WirePayload, *, validate: bool = True) -> dict[str, torch.Tensor]:
    """Expand a payload to the name -> tensor dict; names of one wire tensor share that tensor object.

    With ``validate`` (default) every manifest key must have a tensor of the declared shape and dtype,
    no tensor may be unlisted, and no name may appear twice; the error names the offenders.
    """
    manifest = payload.manifest
    if validate:
        _validate(payload)
    out: dict[str, torch.Tensor] = {}
    for entry in manifest.entries:
        tensor = payload.tensors[entry.key]
        for name in entry.expand():
            if name in out:
                raise WireFormatError(f"tensor name {name!r} appears twice in the wire manifest")
            out[name] = tensor
    return out


def decode_many(payloads: Iterable[WirePayload]) -> dict[str, torch.Tensor]:
    """Decode several payloads (e.g. one per pipeline stage) into one dict; a name sent twice is an error."""
    out: dict[str, torch.Tensor] = {}
    for index, payload in enumerate(payloads):
        for name, tensor in decode(payload).items():
            if name in out:
                raise WireFormatError(
                    f"tensor name {name!r} arrives in more than one payload (payload {index})"
                )
            out[name] = tensor
    return out


def _validate(payload: WirePayload) -> None:
    manifest, tensors = payload.manifest, payload.tensors
    keys = [e.key for e in manifest.entries]
    missing = [k for k in keys if k not in tensors]
    extra = sorted(set(tensors) - set(keys))
    if missing or extra:
        raise WireFormatError(
            f"wire payload does not match its manifest: missing tensors {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all), unlisted tensors {extra[:8]}"
        )
    wrong = [
        f"{e.key}: got {tuple(tensors[e.key].shape)} {_dtype_name(tensors[e.key].dtype)}, "
        f"manifest says {e.shape} {e.dtype}"
        for e in manifest.entries
        if tuple(tensors[e.key].shape) != e.shape or _dtype_name(tensors[e.key].dtype) != e.dtype
    ]
    if wrong:
        raise WireFormatError("wire tensors differ from the manifest: " + "; ".join(wrong[:8]))


@functools.lru_cache(maxsize=65536)
def _compress_names_cached(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """:func:`_compress_names`, remembered: an adapter synced every step has the same name groups."""
    return _compress_names(list(names))


def _identity_groups(named_tensors: Mapping[str, torch.Tensor]) -> tuple[dict[tuple, list[str]], dict[tuple, torch.Tensor]]:
    """Names grouped by :func:`_identity_key`, groups in order of first appearance, names in dict order.

    Names are first grouped by tensor object (a shared expert adapter is one object under E names),
    and the storage key is computed once per object. The grouping by object depends only on the
    names and the objects' ids in order, which an adapter synced every step repeats: it is remembered
    for the last few such sequences, so a repeated sync checks them (two C-level tuple builds) instead
    of a Python step per name.
    """
    values = list(named_tensors.values())
    signature = (tuple(named_tensors), tuple(map(id, values)))
    by_object = _object_groups.get(signature)
    if by_object is None:
        by_object = _group_by_object(named_tensors)
        if len(_object_groups) >= _OBJECT_GROUPS_CACHED:
            _object_groups.pop(next(iter(_object_groups), ()), None)
        _object_groups[signature] = by_object
    groups: dict[tuple, list[str]] = {}
    first: dict[tuple, torch.Tensor] = {}
    merged = False
    for index, names in by_object:
        tensor = values[index]
        key = _identity_key(tensor)
        if key in groups:
            groups[key].extend(names)
            merged = True
        else:
            groups[key] = list(names)
            first[key] = tensor
    if merged:  # distinct objects viewing the same data: names back in dict order
        order = {name: i for i, name in enumerate(named_tensors)}
        for names in groups.values():
            names.sort(key=order.__getitem__)
    return groups, first


_OBJECT_GROUPS_CACHED = 4
# (names, object ids) of an adapter -> its names grouped by object: (index of the first name, names), in order.
_object_groups: dict[tuple[tuple[str, ...], tuple[int, ...]], tuple[tuple[int, tuple[str, ...]], ...]] = {}


def _group_by_object(named_tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[int, tuple[str, ...]], ...]:
    by_object: dict[int, tuple[int, list[str]]] = {}
    for index, (name, tensor) in enumerate(named_tensors.items()):
        group = by_object.get(id(tensor))
        if group is None:
            by_object[id(tensor)] = (index, [name])
        else:
            group[1].append(name)
    return tuple((index, tuple(names)) for index, names in by_object.values())


def _compress_names(names: list[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Fold ``...experts.{e}...`` names that share one expert set into a ``{expert}`` pattern."""
    by_pattern: dict[str, list[int]] = {}
    plain: list[str] = []
    for name in names:
        match = _EXPERT_NAME.match(name)
        if match is None:
            plain.append(name)
        else:
            by_pattern.setdefault(f"{match['head']}{_PLACEHOLDER}{match['tail']}", []).append(
                int(match["expert"])
            )
    expert_sets = {tuple(v) for v in by_pattern.values()}
    if len(by_pattern) == 0 or len(expert_sets) != 1 or all(len(v) == 1 for v in by_pattern.values()):
        return tuple(names), ()
    return tuple(plain) + tuple(by_pattern), expert_sets.pop()


def _ranges(values: tuple[int, ...]) -> list[list[int]]:
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return out


def _identity_key(t: torch.Tensor) -> tuple:
    return (
        t.device.type,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def _content_key(t: torch.Tensor) -> tuple:
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return (tuple(t.shape), t.dtype, hashlib.blake2b(raw.tobytes(), digest_size=16).hexdigest())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
