"""Every weight stream that leaves the trainer goes through ``on_export_weights`` here, exactly once.

The patched Megatron-Bridge exports (plain, merged, adapter), the merge-on-export stream and the
adapter sync sender call :func:`export_stream`. It returns a :class:`HookedStream`: a consumer that
receives one (the sync sender fed by a patched export) does not chain it a second time, and a
stream built from other exports (merge-on-export reads the adapter and the base-weight exports)
marks its inner exports with :func:`inner_exports` so plugins see the merged tensors, once, rather
than the pieces. Only pluggy is imported here.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from moe_lora_plugins.hooks.context import ExportContext

ExportKind = Literal["full", "merged", "adapter"]

# First model chunks whose exports currently feed another stream (see inner_exports).
_inner: weakref.WeakSet[Any] = weakref.WeakSet()
_inner_strong: list[Any] = []  # chunks that cannot be weakly referenced


class HookedStream(Iterator[Any]):
    """An export stream that already went through the ``on_export_weights`` chain."""

    def __init__(self, items: Iterator[Any], context: ExportContext) -> None:
        self._items = items
        self.context = context

    def __iter__(self) -> HookedStream:
        return self

    def __next__(self) -> Any:
        return next(self._items)

    def close(self) -> None:
        """Close the stream underneath, as upstream's export generator closes: a consumer that stops
        midway releases what the export holds (its ``finally`` blocks run)."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


def _first_chunk(model: Any) -> Any:
    if isinstance(model, (list, tuple)):
        return model[0] if model else None
    return model


def _is_inner(model: Any) -> bool:
    chunk = _first_chunk(model)
    if chunk is None:
        return False
    try:
        return chunk in _inner
    except TypeError:
        return any(chunk is held for held in _inner_strong)


@contextlib.contextmanager
def inner_exports(model: Any) -> Iterator[None]:
    """While open, exports of ``model`` feed another stream and skip the hook (that stream is hooked)."""
    chunk = _first_chunk(model)
    try:
        _inner.add(chunk)
        weak = True
    except TypeError:
        _inner_strong.append(chunk)
        weak = False
    try:
        yield
    finally:
        if weak:
            _inner.discard(chunk)
        else:
            _inner_strong.remove(chunk)


def export_stream(
    items: Iterable[Any],
    kind: ExportKind,
    *,
    model: Any = None,
    bridge: Any = None,
    layout: dict[str, int] | None = None,
    plugin_manager: Any = None,
) -> Iterator[Any]:
    """``items`` through every ``on_export_weights`` implementation, decided when iteration starts.

    Items are the export's own tuples: ``(hf_name, tensor)`` or the slime/miles fork's
    ``(hf_name, tensor, megatron_name)``. An already hooked stream, or an export of a model that is
    inside :func:`inner_exports`, passes through unchanged.
    """
    if isinstance(items, HookedStream):
        return items
    context = ExportContext(kind=kind, model=model, bridge=bridge, layout=dict(layout or {}))

    def run() -> Iterator[Any]:
        if model is not None and _is_inner(model):
            yield from items
            return
        from moe_lora_plugins.hooks.manager import chain_export_weights, get_plugin_manager

        pm = plugin_manager or get_plugin_manager()
        yield from chain_export_weights(pm, items, context)

    return HookedStream(run(), context)
