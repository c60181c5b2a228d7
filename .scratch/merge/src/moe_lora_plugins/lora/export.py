"""Write a PEFT adapter (or any engine format) from a live Megatron model; every rank calls it.

``save_peft_adapter(model_chunks, out_dir, bridge=bridge)`` reads each rank's LoRA parameters,
renames them to world-size-1 names from Megatron's own module attributes (``layer_number`` for
PP/VPP, ``local_expert_indices`` for EP), gathers tensor-parallel slices along each parameter's
``partition_dim`` (expert-TP group for experts), stacks grouped 3-D expert adapters over EP ranks,
collects everything on rank 0 and converts it with :func:`moe_lora_plugins.lora.convert.megatron_to_peft`.
It does not go through Megatron-Bridge's adapter export, so its EP naming bug cannot reach it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from moe_lora_plugins.errors import MoeLoraError
from moe_lora_plugins.lora.convert import LoraAdapter, megatron_to_peft
from moe_lora_plugins.lora.families import ModelDims
from moe_lora_plugins.lora.formats import write_peft_dir
from moe_lora_plugins.topology.naming import global_param_name, unwrap_model_chunk


class AdapterExportError(MoeLoraError, RuntimeError):
    """The live model's LoRA cannot be exported as asked (ranks disagree, no LoRA found, ...)."""


def _all_gather(tensor: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    import torch.distributed as dist

    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def _groups() -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_group(),
        "etp": ps.get_expert_tensor_parallel_group(),
        "ep": ps.get_expert_model_parallel_group(),
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "etp_size": ps.get_expert_tensor_parallel_world_size(),
    }


def collect_megatron_lora(model_chunks: list[Any]) -> tuple[dict[str, torch.Tensor], float, int, int]:
    """This rank's LoRA tensors under world-size-1 names, (expert-)TP-gathered, on the CPU.

    Returns ``(tensors, alpha, tp, expert_tp)``; ``tp`` / ``expert_tp`` are the slice counts of the
    gathered tensors. Collective: every rank of the model must call it.
    """
    groups = _groups()
    tensors: dict[str, torch.Tensor] = {}
    alphas: set[float] = set()
    for chunk in model_chunks:
        for module_name, module in unwrap_model_chunk(chunk).named_modules():
            if (
                hasattr(module, "linear_in")
                and hasattr(module, "alpha")
                and module_name.rsplit(".", 1)[-1] == "adapter"
            ):
                alphas.add(float(module.alpha))
        for local_name, param in chunk.named_parameters():
            if ".adapter." not in local_name:
                continue
            name = global_param_name(chunk, local_name)
            is_expert = ".experts." in name and ".shared_experts." not in name
            tensor = param.detach()
            if getattr(param, "tensor_model_parallel", False):
                tensor = _all_gather(
                    tensor, groups["etp"] if is_expert else groups["tp"], param.partition_dim
                )
            if is_expert and ".local_experts." not in name and tensor.ndim == 3:
                tensor = _all_gather(tensor, groups["ep"], 0)
            tensors[name] = tensor.to("cpu", copy=True)
    if len(alphas) > 1:
        raise AdapterExportError(
            f"LoRA adapters with different alpha {sorted(alphas)}; PEFT needs one lora_alpha"
        )
    alpha = alphas.pop() if alphas else float("nan")
    return tensors, alpha, groups["tp_size"], groups["etp_size"]


def gather_adapter(
    model_chunks: list[Any],
    *,
    model_type: str | None = None,
    bridge: Any = None,
    family: str | None = None,
    base_model_name_or_path: str | None = None,
    dst: int | None = 0,
) -> LoraAdapter | None:
    """The whole model's LoRA as a :class:`LoraAdapter` on rank ``dst`` (``None`` elsewhere; every rank if
    ``dst`` is ``None``). Collective. The family comes from ``family``, ``model_type`` or the bridge's HF config.
    """
    import torch.distributed as dist

    local, alpha, tp, expert_tp = collect_megatron_lora(model_chunks)
    parts: list[Any] = [(local, alpha)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        parts = [None] * world
        if dst is None:
            dist.all_gather_object(parts, (local, alpha))
        else:
            dist.gather_object((local, alpha), parts if dist.get_rank() == dst else None, dst=dst)
            if dist.get_rank() != dst:
                return None
    merged: dict[str, torch.Tensor] = {}
    alphas = {a for _, a in parts if a == a}
    for rank, (tensors, _) in enumerate(parts):
        for name, tensor in tensors.items():
            seen = merged.get(name)
            if seen is None:
                merged[name] = tensor
            elif not torch.equal(seen, tensor):
                raise AdapterExportError(
                    f"{name}: rank {rank} holds a different value than an earlier rank; replicas of one "
                    "LoRA parameter must agree (are the data-parallel replicas in sync?)"
                )
    if not merged:
        raise AdapterExportError(
            "the model has no LoRA parameters ('.adapter.' in their names); was LoRA applied?"
        )
    if len(alphas) != 1:
        raise AdapterExportError(f"ranks report LoRA alpha {sorted(alphas)}; expected one value")
    config = unwrap_model_chunk(model_chunks[0]).config
    dims = ModelDims(
        config.num_attention_heads,
        config.num_query_groups or config.num_attention_heads,
        config.kv_channels,
        config.num_moe_experts or 0,
    )
    name = family or model_type or _bridge_model_type(bridge)
    return megatron_to_peft(
        merged,
        name,
        dims,
        alpha=alphas.pop(),
        tp=tp,
        expert_tp=expert_tp,
        base_model_name_or_path=base_model_name_or_path,
    )


def _bridge_model_type(bridge: Any) -> str:
    config = getattr(bridge, "hf_pretrained", None)
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise AdapterExportError(
            "cannot tell the model family: pass model_type=, family= or a Megatron-Bridge bridge"
        )
    return model_type


def save_peft_adapter(
    model_chunks: list[Any],
    out_dir: str | os.PathLike,
    *,
    bridge: Any = None,
    model_type: str | None = None,
    family: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the live model's LoRA as a PEFT directory (rank 0 writes). Call it on every rank.

    Works under any PP / VPP / EP / expert-TP / TP layout. Returns ``out_dir`` on every rank after
    rank 0 has written it.
    """
    import torch.distributed as dist

    adapter = gather_adapter(
        model_chunks,
        model_type=model_type,
        bridge=bridge,
        family=family,
        base_model_name_or_path=base_model_name_or_path,
    )
    if adapter is not None:
        write_peft_dir(adapter, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir)
