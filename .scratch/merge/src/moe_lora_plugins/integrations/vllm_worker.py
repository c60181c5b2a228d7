"""The vLLM worker extension that receives, validates and hot-swaps a synced LoRA adapter.

Enable it with ``--worker-extension-cls moe_lora_plugins.integrations.vllm_worker.MoeLoraWorkerExtension``
(or ``LLM(worker_extension_cls=...)``) and call its methods through ``collective_rpc``. vLLM adds
the class to the worker's bases, so every attribute is prefixed ``moelora_``. Importing this module
activates the suite (role ``vllm``) in the worker process, which is what brings the tensor-LoRA
and CPU MoE-LoRA patches there.

One sync, engine side (workers take group ranks 0..W-1, trainer senders W..W+S-1)::

    engine.collective_rpc("moelora_init_sync_group", args=(host, port, 0, W + S))   # once
    async with paused_generation(engine):                                          # AsyncLLM
        await engine.collective_rpc("moelora_receive_adapter", args=("policy", 1, [W, ..., W + S - 1], step))
    receive_adapter(llm, "policy", 1, [W, ..., W + S - 1], step)                     # or an offline LLM
    # requests name it with lora_request("policy", 1)

Both forms drop vLLM's prefix cache with the swap: an in-place swap keeps the adapter's name and
path, which is all vLLM hashes, so a cached prompt would otherwise reuse KV of the old adapter.

and on each trainer sender (one per pipeline stage)::

    group = new_sync_group(host, port, W + stage, W + S)                          # once
    send_lora_adapter(adapter, group, list(range(W)), sender=stage, version=step, layers=my_layers)

A sync is: receive every sender's buckets (staged on the CPU), validate against the engine's LoRA
limits and the served model (every layer / expert / projection, shapes, dtype, sync complete),
then swap in place under a stable LoRA id, pinned. Any failure leaves the adapter being served
untouched and raises an error that names what was missing or wrong.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from moe_lora_plugins.activation import activate

logger = logging.getLogger("moe_lora_plugins.vllm_worker")

activate(role="vllm")


def _engine_lora_dtype(worker: Any) -> Any:
    import torch

    dtype = worker.vllm_config.lora_config.lora_dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return worker.vllm_config.model_config.dtype
    return getattr(torch, dtype)


def _group_device(group: Any) -> str:
    """Where a sync over ``group`` is staged: CUDA for an NCCL group, the CPU otherwise."""
    if type(group).__name__ == "ProcessGroupNCCL":
        return "cuda"
    backend_name = getattr(group, "_get_backend_name", None) or getattr(group, "name", None)
    try:
        return "cuda" if callable(backend_name) and "nccl" in str(backend_name()).lower() else "cpu"
    except Exception:  # a group object without a backend name: a CPU (gloo) group
        return "cpu"


def _lora_manager(worker: Any) -> Any:
    manager = getattr(worker.model_runner, "lora_manager", None)
    if manager is None:
        raise RuntimeError(
            "this vLLM engine was started without LoRA; start it with enable_lora=True (--enable-lora) and "
            "max_lora_rank >= the trainer's LoRA rank to receive adapters"
        )
    return manager


class MoeLoraWorkerExtension:
    """Worker-side adapter sync for vLLM (``--worker-extension-cls``); every attribute is ``moelora_``-prefixed."""

    moelora_sync_group: Any = None
    moelora_served: dict[str, dict[str, Any]] | None = None

    # -- transport ---------------------------------------------------------------------------

    def moelora_init_sync_group(self, host: str, port: int, first_rank: int, world_size: int,
                                backend: str = "gloo", timeout_s: float = 300.0) -> int:
        """Join the sync group (engine workers + trainer sender ranks); call on every worker at once.

        Worker ``i`` of the engine (vLLM's global worker rank) takes group rank ``first_rank + i``;
        returns it. Senders send to every worker's group rank.
        """
        from moe_lora_plugins.sync.transport import new_sync_group

        rank = first_rank + int(getattr(self, "rank", 0))
        self.moelora_sync_group = new_sync_group(host, port, rank, world_size, backend, timeout_s)
        return rank

    def moelora_close_sync_group(self) -> None:
        self.moelora_sync_group = None

    def moelora_receive_adapter(self, name: str, lora_int_id: int, senders: Sequence[int],
                                version: int | None = None) -> dict[str, Any]:
        """Receive one sync from ``senders`` (group ranks, in sender order), validate it, swap it in."""
        from moe_lora_plugins.sync.errors import AdapterSyncError

        if self.moelora_sync_group is None:
            raise RuntimeError("no sync group: call moelora_init_sync_group on every worker first")
        try:
            return self.moelora_receive_adapter_on(self.moelora_sync_group, name, lora_int_id, senders, version)
        except AdapterSyncError as exc:
            # Messages may still be in flight on this group: it cannot carry another sync.
            self.moelora_sync_group = None
            raise type(exc)(f"{exc} The sync group was closed; call moelora_init_sync_group again.") from exc

    def moelora_receive_adapter_on(self, group: Any, name: str, lora_int_id: int, senders: Sequence[int],
                                   version: int | None = None) -> dict[str, Any]:
        """Receive one sync over ``group`` (any process group holding this worker and the senders, e.g. a
        host's own weight-update group), validate it and swap it in; the group is left to its owner."""
        from moe_lora_plugins.sync.transport import receive_adapter

        received = receive_adapter(group, list(senders), version=version, device=_group_device(group))
        if not received.config:
            raise ValueError(
                f"sync {received.version} carried no adapter config: the trainer must pass config= (r, lora_alpha, "
                "target_modules) to send_adapter on at least one sender"
            )
        return self.moelora_swap_adapter(name, lora_int_id, received.tensors, received.config,
                                         received.version, received.wire_bytes, received.buckets)

    def moelora_load_adapter_dir(self, name: str, lora_int_id: int, path: str, version: int = 0) -> dict[str, Any]:
        """Disk fallback: read a PEFT directory, validate it and swap it in place like a synced adapter."""
        from moe_lora_plugins.lora.formats import read_peft_dir

        tensors, config = read_peft_dir(path)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return self.moelora_swap_adapter(name, lora_int_id, tensors, config, version, nbytes, 0)

    # -- validation and activation -------------------------------------------------------------

    def moelora_validate(self, name: str, tensors: dict[str, Any], config: dict[str, Any]) -> None:
        """Raise ``AdapterValidationError`` unless the adapter fits the engine and the served model."""
        from moe_lora_plugins.patches.vllm.tensor_lora import peft_helper_for
        from moe_lora_plugins.sync.errors import AdapterValidationError
        from moe_lora_plugins.sync.validation import check_adapter, expected_adapter

        manager = _lora_manager(self)
        try:
            peft_helper_for(manager, config)
        except ValueError as exc:
            raise AdapterValidationError(
                [f"{exc} (engine limits: max_lora_rank={manager.lora_config.max_lora_rank}); start the engine "
                 "with a larger --max-lora-rank or train with a smaller rank"],
                f"adapter {name!r}",
            ) from None
        hf_config = self.vllm_config.model_config.hf_text_config.to_dict()
        expected = expected_adapter(hf_config, config, _engine_lora_dtype(self))
        check_adapter(tensors, expected, f"adapter {name!r}")

    def moelora_swap_adapter(self, name: str, lora_int_id: int, tensors: dict[str, Any], config: dict[str, Any],
                             version: int, wire_bytes: int, buckets: int) -> dict[str, Any]:
        """Validate, then replace the adapter served as ``name`` / ``lora_int_id`` in place, pinned."""
        from vllm.lora.request import LoRARequest

        from moe_lora_plugins.patches.vllm.tensor_lora import StagedAdapter, adapter_path, stage, unstage

        self.moelora_validate(name, tensors, config)
        served = self.moelora_served if self.moelora_served is not None else {}
        current = served.get(name)
        if current is not None and current["lora_int_id"] != lora_int_id:
            raise ValueError(
                f"adapter {name!r} is served under LoRA id {current['lora_int_id']}; a sync cannot move it to id "
                f"{lora_int_id}. Keep one stable id per adapter name."
            )
        previous = stage(StagedAdapter(name, tensors, config, version, wire_bytes))
        request = LoRARequest(name, lora_int_id, adapter_path(name), load_inplace=True)
        try:
            self.add_lora(request)
            self.pin_lora(lora_int_id)
        except Exception:
            unstage(name, previous)
            if previous is not None and lora_int_id not in self.list_loras():
                self.add_lora(request)
                self.pin_lora(lora_int_id)
            raise
        served[name] = {"lora_int_id": lora_int_id, "version": version, "wire_bytes": wire_bytes}
        self.moelora_served = served
        _announce(name, lora_int_id, version, wire_bytes)
        return {"name": name, "lora_int_id": lora_int_id, "version": version, "wire_bytes": wire_bytes,
                "buckets": buckets, "tensors": len(tensors)}

    # -- engine lifecycle ----------------------------------------------------------------------

    def moelora_reload_weights(self, *args: Any, **kwargs: Any) -> list[str]:
        """``reload_weights`` (which drops every LoRA adapter), then re-add and re-pin the synced ones."""
        self.reload_weights(*args, **kwargs)
        return self.moelora_readd_adapters()

    def moelora_readd_adapters(self) -> list[str]:
        """Re-add and pin every synced adapter that the engine no longer holds (after a weight reload)."""
        from vllm.lora.request import LoRARequest

        from moe_lora_plugins.patches.vllm.tensor_lora import adapter_path

        readded = []
        loaded = self.list_loras()
        for name, info in sorted((self.moelora_served or {}).items()):
            if info["lora_int_id"] in loaded:
                continue
            self.add_lora(LoRARequest(name, info["lora_int_id"], adapter_path(name)))
            self.pin_lora(info["lora_int_id"])
            readded.append(name)
        return readded

    def moelora_remove_adapter(self, name: str) -> bool:
        """Stop serving a synced adapter: drop it from the engine and from this worker's staging."""
        from moe_lora_plugins.patches.vllm.tensor_lora import unstage

        info = (self.moelora_served or {}).pop(name, None)
        unstage(name)
        return info is not None and self.remove_lora(info["lora_int_id"])

    def moelora_patch_status(self) -> dict[str, str]:
        """Each moe-lora-plugins patch's status in this worker process (``applied``, ``pending``, ...)."""
        from moe_lora_plugins.activation import get_registry

        return {row["id"]: row["status"] for row in get_registry().rows()}

    def moelora_adapter_status(self) -> dict[str, Any]:
        """What this worker serves: adapter name -> id, sync version, wire bytes, loaded or not."""
        loaded = self.list_loras()
        return {name: {**info, "loaded": info["lora_int_id"] in loaded}
                for name, info in (self.moelora_served or {}).items()}


def _announce(name: str, lora_int_id: int, version: int, nbytes: int) -> None:
    from moe_lora_plugins.hooks.manager import get_plugin_manager

    get_plugin_manager().hook.on_adapter_activated(
        adapter_name=name, adapter_id=lora_int_id, version=version, nbytes=nbytes
    )


def receive_adapter(llm: Any, name: str, lora_int_id: int, senders: Sequence[int],
                    version: int | None = None) -> dict[str, Any]:
    """One sync into an offline ``vllm.LLM``: receive, validate and swap on every worker, then drop
    the prefix cache.

    vLLM keys cached KV blocks by the request's LoRA name and path, which an in-place swap keeps, so
    without the reset a prompt seen before the sync would reuse KV computed with the old adapter.
    (An ``AsyncLLM`` is covered by :func:`paused_generation`, which clears the cache while paused.)
    Returns the first worker's report.
    """
    report = llm.collective_rpc("moelora_receive_adapter", args=(name, lora_int_id, list(senders), version))[0]
    _reset_prefix_cache(llm, name)
    return report


def load_adapter_dir(llm: Any, name: str, lora_int_id: int, path: str, version: int = 0) -> dict[str, Any]:
    """The disk fallback into an offline ``vllm.LLM``, with the same prefix-cache reset as :func:`receive_adapter`."""
    report = llm.collective_rpc("moelora_load_adapter_dir", args=(name, lora_int_id, path, version))[0]
    _reset_prefix_cache(llm, name)
    return report


def _reset_prefix_cache(llm: Any, name: str) -> None:
    if llm.reset_prefix_cache() is False:
        raise RuntimeError(
            f"adapter {name!r} was swapped in, but vLLM refused to reset its prefix cache (requests were running), "
            "so prompts cached before the swap could reuse KV of the old adapter. Swap between generate() calls, "
            "or use paused_generation() with an AsyncLLM."
        )


def lora_request(name: str, lora_int_id: int) -> Any:
    """The ``LoRARequest`` that generation requests use to name a synced adapter."""
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.patches.vllm.tensor_lora import adapter_path

    return LoRARequest(name, lora_int_id, adapter_path(name))


def register_served_adapter(serving_models: Any, name: str, lora_int_id: int) -> Any:
    """Enter a synced adapter in vLLM's OpenAI ``OpenAIServingModels`` table so API requests can name it."""
    request = lora_request(name, lora_int_id)
    table = serving_models.lora_requests
    existing = table.get(name)
    if existing is not None and existing.lora_int_id != lora_int_id:
        raise ValueError(
            f"the OpenAI server already serves {name!r} as LoRA id {existing.lora_int_id}, not {lora_int_id}"
        )
    table[name] = request
    return request


def _bind_known(method: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(method).parameters
    return {k: v for k, v in wanted.items() if k in parameters}


@contextlib.asynccontextmanager
async def paused_generation(engine: Any, *, abort_in_flight: bool = False) -> AsyncIterator[None]:
    """Pause an ``AsyncLLM`` around a swap and resume it afterwards, with the installed signature.

    vLLM 0.33 takes ``pause_generation(*, mode=..., clear_cache=...)``; older releases take
    ``wait_for_inflight_requests``. In-flight requests finish (or are aborted) first.
    """
    wanted = {"mode": "abort" if abort_in_flight else "wait", "wait_for_inflight_requests": not abort_in_flight,
              "clear_cache": True}
    kwargs = _bind_known(engine.pause_generation, wanted)
    await engine.pause_generation(**kwargs)
    try:
        yield
        if "clear_cache" not in kwargs:  # this vLLM does not clear it on pause: KV of the old adapter stays
            await engine.reset_prefix_cache()
    finally:
        await engine.resume_generation()
