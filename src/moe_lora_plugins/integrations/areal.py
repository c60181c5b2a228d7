"""AReaL: one vLLM worker extension class that serves AReaL's weight updates and our adapter sync.

AReaL starts its vLLM servers with ``worker_extension_cls`` set to its own
``areal.engine.vllm_ext.vllm_worker_extension.VLLMWorkerExtension`` (``vLLMConfig.worker_extension_cls``
in ``areal/api/cli_args.py``, areal 1.0.4) and calls its ``areal_*`` methods through
``collective_rpc``. vLLM takes one class, so set it to::

    vllm.worker_extension_cls=moe_lora_plugins.integrations.areal.AReaLMoeLoraWorkerExtension

That class derives from ours (``moelora_*``: receive, validate and hot-swap a synced MoE adapter) and
AReaL's (``areal_*`` and ``sync``), so AReaL's own disk / NCCL weight updates keep working and the
trainer can send the adapter with ``moe_lora_plugins.sync.sender.send_lora_adapter`` instead of
AReaL's ``areal_update_weight_lora_xccl`` (which replicates a shared expert adapter into every
expert on the wire and drops router and shared-expert adapters). The two classes must not share a
method name; a clash is refused with both owners named.
"""

from __future__ import annotations

from typing import Any

AREAL_EXTENSION = "areal.engine.vllm_ext.vllm_worker_extension"

_composed: dict[str, type] = {}


def compose_worker_extension(*bases: type, name: str = "ComposedWorkerExtension") -> type:
    """One worker extension class from several; refuse two bases defining the same public method."""
    owners: dict[str, str] = {}
    for base in bases:
        for attr in vars(base):
            if attr.startswith("__"):
                continue
            if attr in owners:
                raise TypeError(
                    f"worker extensions {owners[attr]} and {base.__qualname__} both define {attr!r}: vLLM adds one "
                    "class to the worker's bases, so one would silently hide the other"
                )
            owners[attr] = base.__qualname__
    return type(name, bases, {"__module__": __name__,
                              "__doc__": "vLLM worker extension serving " + ", ".join(b.__qualname__ for b in bases)})


def areal_worker_extension() -> type:
    """``AReaLMoeLoraWorkerExtension``: ours first, then AReaL's (built once; imports AReaL's module)."""
    if "areal" not in _composed:
        import importlib

        from moe_lora_plugins.integrations.vllm_worker import MoeLoraWorkerExtension

        areal = importlib.import_module(AREAL_EXTENSION).VLLMWorkerExtension
        _composed["areal"] = compose_worker_extension(MoeLoraWorkerExtension, areal, name="AReaLMoeLoraWorkerExtension")
    return _composed["areal"]


def __getattr__(name: str) -> Any:
    if name == "AReaLMoeLoraWorkerExtension":
        return areal_worker_extension()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
