"""Tiny Qwen3 / Qwen3-MoE models built through Megatron-Bridge, with LoRA, in any parallel layout.

Every parameter is filled from its *global* name (layer and expert numbers as in a world-size-1
model) and sliced for this rank's tensor-parallel shard, so every layout holds the same model and
an export from any layout can be compared bitwise, name by name, with the world-size-1 export.

Typical use inside one rank of :func:`moe_lora_plugins.testing.distributed.run_distributed`::

    built = build_lora_model(tiny_qwen3_moe_config(), ParallelLayout(ep=2))
    fill_from_global_names(built)
    weights = run_export(built, "merged")        # [(hf_name, cpu tensor), ...] of this rank

and in the test process: ``compare_exports(reference, weights).assert_equal()``.
The global names used for filling come from Megatron's own module attributes
(``TransformerLayer.layer_number``, ``MoELayer.local_expert_indices``), not from the bridge's name
globalization that the export patches fix.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_lora_plugins.topology.naming import global_param_name

ExportKind = Literal["plain", "merged", "adapter", "peft"]
EXPORT_KINDS: tuple[ExportKind, ...] = ("plain", "merged", "adapter")



@dataclass(frozen=True)
class ParallelLayout:
    """Megatron parallel sizes. ``etp=None`` means expert-TP equals TP; ``vpp=None`` means no VPP.

    ``world_size`` is the smallest world that holds the layout: ``pp * lcm(tp, ep * etp)``
    (the rest is data parallel).
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def world_size(self) -> int:
        return self.pp * math.lcm(self.tp, self.ep * self.expert_tp)

    @property
    def label(self) -> str:
        parts = [f"{k}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("vpp", self.vpp or 1),
                                         ("ep", self.ep), ("etp", self.expert_tp)) if v != 1]
        return "-".join(parts) or "world1"


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA applied before wrapping (Megatron-Bridge ``LoRA``); ``None`` instead means no LoRA."""

    dim: int = 4
    alpha: int = 8
    target_modules: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    share_expert_adapters: bool = True


WORLD_SIZE_1 = ParallelLayout()
DEFAULT_LORA = LoraSettings()


def tiny_qwen3_moe_config(**overrides: Any) -> Any:
    """A Qwen3-MoE HF config small enough for 4 CPU processes: 4 layers, hidden 64, 4 experts."""
    from transformers import Qwen3MoeConfig

    values: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        torch_dtype="float32",
        architectures=["Qwen3MoeForCausalLM"],
    )
    values.update(overrides)
    return Qwen3MoeConfig(**values)


def tiny_qwen3_config(**overrides: Any) -> Any:
    """A dense Qwen3 HF config of the same size (head_dim 32, so the vLLM CPU backend accepts it)."""
    from transformers import Qwen3Config

    values: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        torch_dtype="float32",
        architectures=["Qwen3ForCausalLM"],
    )
    values.update(overrides)
    return Qwen3Config(**values)


@dataclass
class BuiltModel:
    """What :func:`build_lora_model` returns: the bridge, the provider and this rank's model chunks."""

    bridge: Any
    provider: Any
    model: list[Any]
    layout: ParallelLayout
    lora: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


_FUSIONS_OFF = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "moe_permute_fusion",
    "cross_entropy_loss_fusion",
)


def build_lora_model(
    hf_config: Any,
    layout: ParallelLayout = WORLD_SIZE_1,
    lora: LoraSettings | None = DEFAULT_LORA,
    *,
    dtype: Any = None,
    device: str = "cpu",
    seed: int = 1234,
) -> BuiltModel:
    """Build ``hf_config`` in Megatron with the local (non-TE) spec, in ``layout``, LoRA applied.

    Needs an initialised ``torch.distributed`` group of ``layout.world_size`` ranks (see
    :func:`~moe_lora_plugins.testing.distributed.run_distributed`); initialises Megatron's model
    parallel state. ``device="cuda"`` builds on the rank's GPU (NCCL); ``dtype`` defaults to float32.
    """
    import torch
    import torch.distributed as dist

    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core import parallel_state

    dtype = dtype or torch.float32
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"layout {layout} needs a world of {layout.world_size} ranks, the process group has "
            f"{dist.get_world_size()}"
        )
    bridge = AutoBridge.from_hf_config(hf_config)
    provider = bridge.to_megatron_provider(load_weights=False)
    provider.transformer_layer_spec = local_layer_spec
    provider.use_cpu_initialization = device == "cpu"
    provider.params_dtype = dtype
    provider.bf16 = dtype == torch.bfloat16
    provider.fp16 = dtype == torch.float16
    provider.moe_token_dispatcher_type = "allgather"
    provider.moe_grouped_gemm = False
    for name in _FUSIONS_OFF:
        if hasattr(provider, name):
            setattr(provider, name, False)
    provider.tensor_model_parallel_size = layout.tp
    provider.pipeline_model_parallel_size = layout.pp
    provider.virtual_pipeline_model_parallel_size = layout.vpp
    provider.expert_model_parallel_size = layout.ep
    provider.expert_tensor_parallel_size = layout.expert_tp
    provider.sequence_parallel = layout.tp > 1
    if layout.pp > 1:
        provider.pipeline_dtype = dtype
    provider.finalize()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.expert_tp,
        )
    else:  # a second model in this process (benchmarks build several): same layout only
        sizes = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
        if sizes != (layout.tp, layout.pp, layout.ep, layout.expert_tp):
            raise ValueError(
                f"model parallel state is initialised as (tp, pp, ep, etp) = {sizes}, not {layout}; "
                "call parallel_state.destroy_model_parallel() first"
            )
    torch.manual_seed(seed)
    if device != "cpu":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    peft = None
    if lora is not None:
        from megatron.bridge.peft.lora import LoRA

        peft = LoRA(
            target_modules=list(lora.target_modules),
            dim=lora.dim,
            alpha=lora.alpha,
            share_expert_adapters=lora.share_expert_adapters,
        )
        provider.register_pre_wrap_hook(lambda chunks: peft(chunks, training=True))
    model = provider.provide_distributed_model(
        wrap_with_ddp=False,
        use_cpu_initialization=device == "cpu",
        mixed_precision_wrapper=None,
    )
    return BuiltModel(bridge=bridge, provider=provider, model=list(model), layout=layout, lora=peft)


def _tp_world_and_rank(is_expert: bool) -> tuple[int, int]:
    from megatron.core import parallel_state

    if is_expert:
        return (
            parallel_state.get_expert_tensor_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_rank(),
        )
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _is_fused_gate_up(name: str, gated: bool) -> bool:
    if not gated or ".linear_fc1." not in name:
        return False
    return name.endswith((".linear_fc1.weight", ".to_wrap.weight", ".adapter.linear_out.weight"))


def deterministic_tensor(global_name: str, shape: Sequence[int], seed: int = 0, device: Any = "cpu") -> Any:
    """A float32 tensor that depends only on (name, shape, seed, device type): ``N(0, 0.02)``, or
    ``1 + N(0, 0.02)`` for 1-D tensors (norm weights). CPU and CUDA generators give different values."""
    import torch

    generator = torch.Generator(device=device).manual_seed(
        (zlib.crc32(global_name.encode()) + seed * 7919) % (2**63)
    )
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=device) * 0.02
    if len(shape) == 1:
        values += 1.0
    return values


def shard_for_rank(full: Any, name: str, param: Any, gated: bool) -> Any:
    """This rank's slice of a world-size-1 tensor, the way Megatron shards ``param``.

    Tensor-parallel parameters are split along ``param.partition_dim``; a gated fc1 (gate and up
    fused in one tensor) keeps ``[gate_i; up_i]`` per shard.
    """
    import torch

    if not getattr(param, "tensor_model_parallel", False):
        return full
    is_expert = ".experts." in name
    world, rank = _tp_world_and_rank(is_expert)
    if world == 1:
        return full
    dim = param.partition_dim
    if _is_fused_gate_up(name, gated) and dim == 0:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, world, 0)[rank], torch.chunk(up, world, 0)[rank]], dim=0)
    return torch.chunk(full, world, dim=dim)[rank]


def global_shape(name: str, param: Any) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        world, _ = _tp_world_and_rank(".experts." in name)
        shape[param.partition_dim] *= world
    return tuple(shape)


def fill_from_global_names(built: BuiltModel, seed: int = 0, generate_on: str = "cpu") -> dict[str, tuple[int, ...]]:
    """Overwrite every parameter with :func:`deterministic_tensor` of its global name, sharded.

    LoRA B matrices get non-zero values too, so merged exports differ from plain ones. Returns
    ``{global megatron name: global shape}`` of what this rank filled. ``generate_on="cuda"`` draws
    the values on the GPU (fast for billion-parameter models; comparable only with other CUDA fills).
    """
    import torch

    filled: dict[str, tuple[int, ...]] = {}
    gated = bool(getattr(built.provider, "gated_linear_unit", False))
    with torch.no_grad():
        for chunk in built.model:
            for local_name, param in chunk.named_parameters():
                name = global_param_name(chunk, local_name)
                shape = global_shape(name, param)
                device = param.device if generate_on == "cuda" else "cpu"
                full = deterministic_tensor(name, shape, seed, device=device)
                param.copy_(shard_for_rank(full, name, param, gated).to(param.dtype))
                filled[name] = shape
    return filled


def _as_pairs(weights: Iterable[Any]) -> list[tuple[str, Any]]:
    pairs = []
    for item in weights:
        name, tensor = item[0], item[1]
        pairs.append((name, tensor.detach().to("cpu").clone()))
    return pairs


def run_export(built: BuiltModel, kind: ExportKind, **kwargs: Any) -> list[tuple[str, Any]]:
    """Run one upstream export on this rank and return its stream as ``[(hf_name, cpu tensor)]``.

    ``plain``: ``export_hf_weights(merge_adapter_weights=False)``; ``merged``: with
    ``merge_adapter_weights=True``; ``adapter``: ``export_adapter_weights``; ``peft``:
    ``save_hf_adapter`` into ``kwargs["path"]`` then the saved tensors (rank 0 writes; others
    return ``[]``). Accepts 2-tuples and 3-tuples ``(hf_name, tensor, megatron_name)`` alike.
    """
    bridge, model = built.bridge, built.model
    if kind == "plain":
        return _as_pairs(bridge.export_hf_weights(model, cpu=True, show_progress=False,
                                                  merge_adapter_weights=False, **kwargs))
    if kind == "merged":
        return _as_pairs(bridge.export_hf_weights(model, cpu=True, show_progress=False,
                                                  merge_adapter_weights=True, **kwargs))
    if kind == "adapter":
        return _as_pairs(bridge.export_adapter_weights(model, cpu=True, show_progress=False, **kwargs))
    if kind == "peft":
        import torch.distributed as dist
        from safetensors.torch import load_file

        path = kwargs.pop("path")
        bridge.save_hf_adapter(model, path, peft_config=built.lora, show_progress=False, **kwargs)
        if dist.is_initialized() and dist.get_rank() != 0:
            return []
        return sorted(load_file(f"{path}/adapter_model.safetensors").items())
    raise ValueError(f"unknown export kind {kind!r}; expected one of plain, merged, adapter, peft")


@dataclass
class ExportComparison:
    """Name-by-name, bitwise comparison of one rank's export with the world-size-1 export."""

    missing: list[str]
    unexpected: list[str]
    duplicated: list[str]
    different: list[str]
    label: str = ""

    @property
    def equal(self) -> bool:
        return not (self.missing or self.unexpected or self.duplicated or self.different)

    def summary(self, limit: int = 8) -> str:
        lines = [f"export {self.label or ''} differs from world size 1:".replace("  ", " ")]
        for title, names in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("duplicated", self.duplicated), ("different values", self.different)):
            if names:
                shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)

    def assert_equal(self) -> None:
        if not self.equal:
            raise AssertionError(self.summary())


def compare_exports(
    reference: Sequence[tuple[str, Any]], candidate: Sequence[tuple[str, Any]], label: str = ""
) -> ExportComparison:
    """Compare two export streams: same names, each once, same dtype, shape and bits."""
    import torch

    ref = dict(reference)
    counts = Counter(name for name, _ in candidate)
    got = dict(candidate)
    different = []
    for name in sorted(ref.keys() & got.keys()):
        a, b = ref[name], got[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            different.append(name)
    return ExportComparison(
        missing=sorted(ref.keys() - got.keys()),
        unexpected=sorted(got.keys() - ref.keys()),
        duplicated=sorted(name for name, n in counts.items() if n > 1),
        different=different,
        label=label,
    )


def export_worker(
    hf_config: Any,
    layout: ParallelLayout,
    kinds: Sequence[ExportKind] = EXPORT_KINDS,
    lora: LoraSettings | None = DEFAULT_LORA,
    activate: bool = False,
    dtype_name: str = "float32",
    device: str = "cpu",
    peft_dir: str | None = None,
) -> dict[str, list[tuple[str, Any]]]:
    """One rank's part of an export comparison: build, fill, (activate), export every kind.

    Meant for :func:`~moe_lora_plugins.testing.distributed.run_distributed`. With ``activate=True``
    ``moe_lora_plugins.activate(role="trainer")`` runs before Megatron-Bridge is imported.
    """
    import torch

    if activate:
        import moe_lora_plugins

        moe_lora_plugins.activate(role="trainer")
    built = build_lora_model(hf_config, layout, lora, dtype=getattr(torch, dtype_name), device=device)
    fill_from_global_names(built)
    out: dict[str, list[tuple[str, Any]]] = {}
    for kind in kinds:
        kwargs = {"path": peft_dir} if kind == "peft" else {}
        out[kind] = run_export(built, kind, **kwargs)
    return out


def upstream_and_patched_exports(
    hf_config: Any,
    layout: ParallelLayout,
    kinds: Sequence[ExportKind] = EXPORT_KINDS,
    lora: LoraSettings | None = DEFAULT_LORA,
    peft_dir: str | None = None,
    dtype_name: str = "float32",
    device: str = "cpu",
) -> dict[str, dict[str, list[tuple[str, Any]]]]:
    """One rank: build and fill once, export every kind with unpatched upstream, then activate
    moe-lora-plugins and export again. Returns ``{"upstream": {kind: ...}, "patched": {kind: ...}}``.

    ``kind="peft"`` in ``kinds`` needs ``peft_dir``; upstream and patched write to subfolders of it.
    Running both in one process halves the cost of a layout in CI. ``device="cuda"`` with
    ``dtype_name="bfloat16"`` is the GPU (NCCL) variant.
    """
    import torch

    import moe_lora_plugins

    built = build_lora_model(hf_config, layout, lora, dtype=getattr(torch, dtype_name), device=device)
    fill_from_global_names(built)
    out: dict[str, dict[str, list[tuple[str, Any]]]] = {}
    for phase in ("upstream", "patched"):
        if phase == "patched":
            moe_lora_plugins.activate(role="trainer")
        out[phase] = {}
        for kind in kinds:
            kwargs = {"path": f"{peft_dir}/{phase}"} if kind == "peft" else {}
            out[phase][kind] = run_export(built, kind, **kwargs)
    return out
