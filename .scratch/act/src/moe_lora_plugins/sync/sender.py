"""The trainer side of an adapter sync: from an exported adapter to buckets on the wire.

Takes what the export produces (a ``moe_lora_plugins.lora.convert.LoraAdapter``, a PEFT-named
``{name: tensor}`` dict, or an export stream of ``(hf_name, tensor)`` / ``(hf_name, tensor,
megatron_name)`` tuples), keeps the layers this sender owns (one sender per pipeline stage), puts it
in the compact wire form (a tensor shared under several names, like a shared expert adapter,
travels once) and sends it in buckets of at most ``bucket_bytes``.

What is sent leaves the trainer, so it goes through the plugins' ``on_export_weights`` chain (kind
``adapter``) unless it already did: a stream from a patched Megatron-Bridge export arrives hooked and
is not chained twice (``moe_lora_plugins.hooks.streams``; a dict with no ``on_export_weights``
implementation registered skips the per-tensor pass through the empty chain). A plugin's transform is
what the engine receives.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from moe_lora_plugins.sync.protocol import AdapterPiece, paused_gc
from moe_lora_plugins.sync.transport import DEFAULT_BUCKET_BYTES, SendReport, pieces_from_wire, send_adapter

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_PEFT_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def tensors_from_export(stream: Iterable[tuple[Any, ...]]) -> dict[str, Any]:
    """``{peft_name: tensor}`` from an export stream of 2-tuples (upstream) or 3-tuples (slime/miles fork).

    Megatron-Bridge's ``export_adapter_weights`` names are HF module names (``model.layers.0.
    self_attn.q_proj.lora_A.weight``); they get PEFT's ``base_model.model.`` prefix, which the
    receiver and vLLM's loader expect. PEFT's per-adapter segment (``lora_A.default.weight``) is
    dropped: vLLM and the receiver use ``lora_A.weight``.
    """
    from moe_lora_plugins.lora.convert import PEFT_PREFIX

    out: dict[str, Any] = {}
    for item in stream:
        if len(item) not in (2, 3):
            raise ValueError(f"an export stream yields (name, tensor) or (name, tensor, megatron_name), got {len(item)} items")
        name, tensor = item[0], item[1]
        name = _PEFT_ADAPTER_NAME.sub(r".\1.weight", name)
        out[name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name] = tensor
    return out


def hooked_adapter_tensors(adapter: Any) -> dict[str, Any]:
    """``{peft_name: tensor}`` of what a sync sends, after the plugins' ``on_export_weights`` chain.

    ``adapter`` is a ``LoraAdapter``, a ``{name: tensor}`` dict or an export stream; a stream that
    already went through the chain (a patched Megatron-Bridge export) is not chained again.
    """
    from moe_lora_plugins.hooks.streams import export_stream

    if hasattr(adapter, "tensors") and hasattr(adapter, "peft_config"):
        adapter = adapter.tensors
    if isinstance(adapter, Mapping):  # names are the receiver's already: kept as they are
        if not _export_hooks():  # nothing would change it: no per-tensor pass through an empty chain
            return dict(adapter)
        return {item[0]: item[1] for item in export_stream(list(adapter.items()), "adapter")}
    return tensors_from_export(export_stream(adapter, "adapter"))


def _export_hooks() -> bool:
    """Whether any registered plugin implements ``on_export_weights`` (decided per sync, as plugins may change)."""
    from moe_lora_plugins.hooks.manager import get_plugin_manager

    return bool(get_plugin_manager().hook.on_export_weights.get_hookimpls())


@functools.lru_cache(maxsize=1 << 18)
def layer_of(name: str) -> int | None:
    """The decoder layer number in ``name`` (``None`` outside layers); remembered, as the same names
    come back every sync."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=8)
def _names_in_layers(names: tuple[str, ...], layers: frozenset[int]) -> tuple[str, ...]:
    """The names of ``layers`` (remembered: every sync of one adapter filters the same names)."""
    return tuple(name for name in names if layer_of(name) in layers)


def sync_pieces(tensors: Mapping[str, Any], layers: Collection[int] | None = None, compact: bool = True,
                dedupe: str = "identity") -> list[AdapterPiece]:
    """The pieces one sender sends: its layers only (all when ``layers`` is None), in the compact wire form.

    ``dedupe="content"`` also sends equal tensors that are distinct objects once (an export stream yields
    q/k/v's shared LoRA A as three copies)."""
    mine = tensors
    if layers is not None:
        kept = _names_in_layers(tuple(tensors), frozenset(layers))
        if len(kept) != len(tensors):
            mine = {k: tensors[k] for k in kept}
    if not compact:
        return [AdapterPiece(k, v) for k, v in sorted(mine.items())]
    from moe_lora_plugins.lora.wire import encode

    return pieces_from_wire(encode(mine, dedupe=dedupe))


def send_lora_adapter(
    adapter: Any,
    group: Any,
    receivers: Sequence[int],
    *,
    sender: int,
    version: int,
    layers: Collection[int] | None = None,
    config: Mapping[str, Any] | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: Any = "cpu",
    compact: bool = True,
    dedupe: str | None = None,
    shared_memory: Any = None,
) -> SendReport:
    """Send an exported adapter (``LoraAdapter``, ``{name: tensor}`` or export stream) from one trainer rank.

    ``config`` defaults to the ``LoraAdapter``'s PEFT config; with a dict or stream, pass it. ``dedupe``
    defaults to ``"identity"``, and to ``"content"`` for an export stream (whose shared tensors are copies).
    ``shared_memory=True`` moves the bytes through shared memory to a receiver on this host (see
    :func:`moe_lora_plugins.sync.transport.send_adapter`).
    """
    with paused_gc():
        return _send_lora_adapter(adapter, group, receivers, sender, version, layers, config, bucket_bytes, device,
                                  compact, dedupe, shared_memory)


def _send_lora_adapter(adapter: Any, group: Any, receivers: Sequence[int], sender: int, version: int,
                       layers: Collection[int] | None, config: Mapping[str, Any] | None, bucket_bytes: int,
                       device: Any, compact: bool, dedupe: str | None, shared_memory: Any) -> SendReport:
    is_stream = not (hasattr(adapter, "tensors") or isinstance(adapter, Mapping))
    tensors = hooked_adapter_tensors(adapter)
    if config is None and hasattr(adapter, "peft_config"):
        config = adapter.peft_config()
    dedupe = dedupe or ("content" if is_stream else "identity")
    return send_adapter(sync_pieces(tensors, layers, compact, dedupe), group, receivers, sender=sender, version=version,
                        bucket_bytes=bucket_bytes, config=dict(config) if config is not None else None, device=device,
                        shared_memory=shared_memory)
