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

AReaL's weight-update path, switched to our adapter sync. AReaL's trainer sends a LoRA update as
``rollout_engine.update_weights_from_distributed(meta, param_specs)`` (``areal/engine/vllm_remote.py``:
``/areal_set_update_weight_meta_lora`` then ``/areal_update_weights_lora_xccl`` on every server, which
call the worker's ``areal_set_weight_meta_lora`` and ``areal_update_weight_lora_xccl``) while it
broadcasts the tensors on its weight-update group. :func:`send_adapter_update` keeps that call and
that group and sends our sync instead of the broadcast: the one parameter spec it announces is
:data:`SYNC_PARAM`, and the composed class's ``areal_update_weight_lora_xccl`` then receives our
buckets from group rank 0 (AReaL's trainer), validates them against the served model and swaps them
in (``moelora_receive_adapter_on``). Any other announcement goes to AReaL's own method unchanged. A
failed sync returns AReaL's ``(False, message)``, which AReaL's server answers with HTTP 400, so the
trainer's future raises; the adapter served before stays served. :func:`enable_adapter_sync` makes an
AReaL ``MegatronEngine``'s LoRA update (its ``_update_weights_via_registry``) go this way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

AREAL_EXTENSION = "areal.engine.vllm_ext.vllm_worker_extension"
SYNC_PARAM = "moelora.adapter_sync"
"""The one parameter name announced to AReaL's ``areal_set_weight_meta_lora`` when our sync follows."""

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
        composed = compose_worker_extension(MoeLoraWorkerExtension, areal, name="AReaLMoeLoraWorkerExtension")
        composed.areal_update_weight_lora_xccl = _areal_update_weight_lora_xccl(areal.areal_update_weight_lora_xccl)
        _composed["areal"] = composed
    return _composed["areal"]


def _areal_update_weight_lora_xccl(areals_own: Any) -> Any:
    """AReaL's LoRA update RPC, receiving our sync when the trainer announced :data:`SYNC_PARAM`."""

    def areal_update_weight_lora_xccl(self: Any) -> tuple[bool, str]:
        if list(getattr(self, "areal_lora_weight_meta_names", None) or []) != [SYNC_PARAM]:
            return areals_own(self)
        name, lora_int_id = self.areal_lora_name, self.areal_lora_int_id
        try:
            groups = getattr(self, "weight_update_groups", {})
            group_name = self.areal_weight_meta_group_name
            if group_name not in groups:
                raise KeyError(f"no AReaL weight-update group {group_name!r} on this worker (it has "
                               f"{sorted(groups)}); the trainer initializes it with init_weights_update_group")
            report = self.moelora_receive_adapter_on(groups[group_name], name, lora_int_id, [0])
        except Exception as exc:  # AReaL's contract: (False, message), which its server turns into HTTP 400
            return False, f"moe-lora-plugins adapter sync into {name!r} (LoRA id {lora_int_id}) failed: {exc}"
        _forget_older_names(self, name, lora_int_id)
        self.sync()
        return True, f"Success: moe-lora-plugins sync {report['version']}, {report['tensors']} tensors"

    areal_update_weight_lora_xccl.__doc__ = (
        "AReaL's LoRA xccl update; with the moe-lora-plugins announcement it receives, validates and swaps our sync."
    )
    return areal_update_weight_lora_xccl


def _forget_older_names(worker: Any, name: str, lora_int_id: int) -> None:
    """AReaL names each version anew (``policy-v3``) under one LoRA id: drop the staged older ones."""
    from moe_lora_plugins.patches.vllm.tensor_lora import unstage

    served = worker.moelora_served or {}
    for other in [n for n, info in served.items() if n != name and info["lora_int_id"] == lora_int_id]:
        served.pop(other)
        unstage(other)


def send_adapter_update(rollout_engine: Any, group: Any, meta: Any, adapter: Any, *,
                        config: Mapping[str, Any], receivers: Sequence[int] | None = None,
                        layers: Any = None, bucket_bytes: int | None = None) -> Any:
    """Trainer side of one AReaL LoRA weight update, carried by our adapter sync.

    ``rollout_engine`` is AReaL's rollout client (``RemotevLLMEngine``); ``group`` is the weight-update
    group AReaL's trainer made with it (``init_weights_update_group`` + ``init_custom_process_group``,
    trainer rank 0, workers 1..W); ``meta`` is AReaL's ``WeightUpdateMeta`` (``type="xccl"``,
    ``use_lora=True``, ``version`` set); ``adapter`` is what our sender takes (an export stream, a
    ``LoraAdapter`` or ``{peft_name: tensor}``) and ``config`` its PEFT config (``r``, ``lora_alpha``,
    ``target_modules``). Returns our sender's report once every server answered; raises AReaL's
    request error when a server refused the sync (its adapter is then unchanged).
    """
    from areal.api import ParamSpec

    from moe_lora_plugins.sync.sender import send_lora_adapter
    from moe_lora_plugins.sync.transport import DEFAULT_BUCKET_BYTES

    if getattr(meta, "type", None) != "xccl" or not getattr(meta, "use_lora", False):
        raise ValueError(f"send_adapter_update sends LoRA xccl updates; got WeightUpdateMeta(type={meta.type!r}, "
                         f"use_lora={meta.use_lora!r}): build it with type='xccl', use_lora=True")
    if meta.version is None:
        raise ValueError("WeightUpdateMeta.version is None: set it to the training step (AReaL names the served "
                         "adapter by it)")
    allocation = getattr(meta, "gen_allocation", None)
    gen_pp = allocation.parallel.pp_size if allocation is not None else 1
    if gen_pp > 1:
        raise ValueError(f"the inference allocation has pp_size={gen_pp}: AReaL then makes one weight-update group "
                         "per pipeline stage, while the adapter sync sends the whole adapter from one trainer rank "
                         "over one group; run the inference servers with pp_size 1")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise ValueError(f"the adapter config lacks {missing}: pass the PEFT config (r, lora_alpha, target_modules)")
    meta.peft_config = {"r": int(config["r"]), "lora_alpha": config["lora_alpha"],
                        "target_modules": list(config["target_modules"]), "bias": config.get("bias", "none")}
    future = rollout_engine.update_weights_from_distributed(meta, [ParamSpec(name=SYNC_PARAM, shape=(0,),
                                                                             dtype="uint8")])
    receivers = list(range(1, group.size())) if receivers is None else list(receivers)
    report = send_lora_adapter(adapter, group, receivers, sender=0, version=int(meta.version), layers=layers,
                               config=dict(config), bucket_bytes=bucket_bytes or DEFAULT_BUCKET_BYTES)
    future.result()
    return report


def enable_adapter_sync(engine: Any) -> None:
    """Make an AReaL ``MegatronEngine``'s LoRA weight update send our adapter sync.

    Call once after ``engine.initialize(...)`` and ``connect_engine(...)``, with a LoRA engine built through
    Megatron-Bridge (``bridge_type="megatron-bridge"``). Its ``update_weights(meta)`` keeps AReaL's pause,
    barriers and resume; the LoRA step inside (``_update_weights_via_registry``) becomes: export the adapter
    with the bridge's ``export_adapter_weights`` (every rank takes part; it goes through the plugins'
    ``on_export_weights``) and, on the rank holding AReaL's weight-update group, :func:`send_adapter_update`.
    """
    config = engine.config
    if not getattr(config, "use_lora", False):
        raise ValueError("enable_adapter_sync is for LoRA runs: this engine's config has use_lora=False")
    if getattr(engine, "bridge_cls", None) != "megatron-bridge":
        raise ValueError(f"enable_adapter_sync needs the engine built through Megatron-Bridge, not "
                         f"{getattr(engine, 'bridge_cls', None)!r}: set the actor's bridge_type to 'megatron-bridge'")
    peft = {"r": config.lora_rank, "lora_alpha": config.lora_alpha, "bias": "none",
            "target_modules": list(config.target_modules or [])}

    def update_via_adapter_sync(meta: Any) -> None:
        import torch.distributed as dist

        stream = list(engine.bridge.export_adapter_weights(engine.model, cpu=True, show_progress=False))
        if getattr(engine, "weight_update_group", None) is not None and engine.is_pipeline_parallel_head():
            send_adapter_update(engine.rollout_engine, engine.weight_update_group, meta, stream, config=peft)
        dist.barrier(group=engine.cpu_group)

    engine._update_weights_via_registry = update_via_adapter_sync


def __getattr__(name: str) -> Any:
    if name == "AReaLMoeLoraWorkerExtension":
        return areal_worker_extension()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
