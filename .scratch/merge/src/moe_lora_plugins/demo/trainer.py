"""The demo's trainer: a Megatron-Bridge policy with LoRA in EP x PP gloo processes on the CPU.

Each rank (a spawned process, see :class:`TrainerPool`; the process machinery is
:mod:`moe_lora_plugins.demo.ranks`, shared with the multi-LoRA trainer) loads the tiny checkpoint through
Megatron-Bridge into its share of the layout, gets LoRA through this suite's actor plugin
(``on_build_model``), then serves commands: a GRPO-style step (recompute the rollout tokens'
logprobs with Megatron's own pipeline schedule, policy-gradient loss, backward, gradient reduction
over the data-parallel replicas, Adam on the LoRA parameters only), and an adapter export + sync
(Megatron-Bridge's adapter export, patched and audited, as the check; this suite's layout-correct
gather as the adapter; one sender per pipeline stage into the engine's sync group).
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.demo import ranks

# Patches the trainer processes must have applied, or they stop at start (MOELORA_REQUIRE).
REQUIRED_TRAINER_PATCHES = (
    "megatron_bridge.local_name_to_global",
    "megatron_bridge.stream_adapter_weights",
    # The demo model's dense first layer (mlp_only_layers) is built, loaded and exported only with these.
    "megatron_bridge.qwen3_moe_dense_layer_provider",
    "megatron_bridge.qwen3_moe_dense_layer_mappings",
    "megatron_bridge.mixed_dense_moe_block_spec",
)


class TrainerError(ranks.TrainerRankError):
    """A trainer rank failed; the message carries its traceback."""


@dataclass(frozen=True)
class TrainerSettings:
    """What every trainer rank needs to build the policy (picklable, sent to each spawned rank)."""

    model_dir: str
    ep: int = 2
    pp: int = 2
    vpp: int | None = None
    lora_rank: int = 4
    lora_alpha: float = 8.0
    learning_rate: float = 0.05
    seed: int = 0

    @property
    def world_size(self) -> int:
        return self.ep * self.pp


@dataclass
class RolloutBatch:
    """Token ids of every sample (prompt + completion, equal lengths), the per-sample advantage and
    the engine's logprob of each completion token."""

    tokens: Any  # int64 (N, P + C)
    prompt_len: int
    advantages: Any  # float32 (N,)
    rollout_logprobs: Any  # float32 (N, C)


@dataclass
class StepResult:
    """One rank's share of a step; logprobs only on the last pipeline stage."""

    rank: int
    sample_indices: list[int] = field(default_factory=list)
    logprobs: Any = None
    loss: float = 0.0
    seconds: float = 0.0


@dataclass
class SyncResult:
    """One rank's share of an export + sync."""

    rank: int
    sender: int | None
    sent_bytes: int = 0
    sent_tensors: int = 0
    buckets: int = 0
    audit: dict[str, Any] = field(default_factory=dict)
    adapter_bytes: int = 0
    adapter: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    export_seconds: float = 0.0
    send_seconds: float = 0.0


# -------------------------------------------------------------------------------------------------
# Inside one rank
# -------------------------------------------------------------------------------------------------


def _lora_init(global_name: str, shape: Sequence[int], seed: int) -> Any:
    """LoRA A: N(0, 1/in) from the global name (equal on every replica); LoRA B: zero."""
    import torch

    if ".linear_out." in global_name:
        return torch.zeros(tuple(shape))
    generator = torch.Generator().manual_seed((zlib.crc32(global_name.encode()) + 7919 * seed) % (2**63))
    return torch.randn(tuple(shape), generator=generator) / float(shape[-1]) ** 0.5


class TrainerRank(ranks.CpuTrainerRank):
    """The policy on one rank and the operations the demo runs on it."""

    settings: TrainerSettings
    # A failed command (an export audit, say) ends the rank: the engine waiting in the sync then sees the
    # sender's connection close and stops at once, and the rank's own error says why.
    serve_after_error = False

    def _build(self) -> None:
        import torch

        from moe_lora_plugins.lora_config import LoraConfig

        s = self.settings
        self.bridge, provider = ranks.build_cpu_provider(s)
        torch.manual_seed(s.seed)
        self.lora = LoraConfig(enabled=True, rank=s.lora_rank, alpha=s.lora_alpha, expert_adapters="per-expert")
        self.model = ranks.provide_cpu_model(provider, self.lora)
        self.config = provider
        self._init_lora()
        self.params = [p for chunk in self.model for p in chunk.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=s.learning_rate)

    def ready_info(self) -> dict[str, Any]:
        return {**super().ready_info(), "lora_params": sum(p.numel() for p in self.params)}

    def _init_lora(self) -> None:
        import torch

        from moe_lora_plugins.topology.naming import global_param_name

        self.lora_names: dict[int, str] = {}
        with torch.no_grad():
            for chunk in self.model:
                for local_name, param in chunk.named_parameters():
                    if not param.requires_grad:
                        continue
                    if ".adapter." not in local_name:
                        raise TrainerError(f"a trainable parameter that is not LoRA: {local_name}")
                    name = global_param_name(chunk, local_name)
                    param.copy_(_lora_init(name, param.shape, self.settings.seed))
                    self.lora_names[id(param)] = name

    def patch_status(self) -> dict[str, str]:
        """Each moe-lora-plugins patch's status in this rank (``applied``, ``pending``, ...)."""
        from moe_lora_plugins.activation import get_registry

        return {row["id"]: row["status"] for row in get_registry().rows()}

    # -- the GRPO step ---------------------------------------------------------------------------

    def step(self, batch: RolloutBatch, update: bool = True) -> StepResult:
        """Recompute logprobs of this data-parallel slice with Megatron's pipeline schedule; with ``update``
        also the policy-gradient loss, backward, gradient reduction and an Adam step on the LoRA parameters."""
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        start = time.perf_counter()
        dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        total = batch.tokens.shape[0]
        indices = list(range(dp_rank, total, dp_size))
        completion_tokens = (batch.tokens.shape[1] - batch.prompt_len) * total
        # The interleaved (VPP) schedule wants as many microbatches as pipeline stages.
        count = self.settings.pp if self.settings.vpp else 1
        micros = [
            _Microbatch(batch.tokens[part], batch.prompt_len, batch.advantages[part].float(), completion_tokens)
            for part in (indices[i::count] for i in range(count))
        ]
        store: list[Any] = []

        def loss_func(micro: _Microbatch, output: Any) -> tuple[Any, dict[str, Any]]:
            logprobs = micro.completion_logprobs(output)
            # Megatron divides a 2-tuple loss by the number of microbatches; the loss here is already a sum
            # over this microbatch's tokens divided by the step's token count, so undo that division.
            loss = -(micro.advantages[:, None] * logprobs).sum() / micro.total_completion_tokens * count
            store.append(logprobs.detach().clone())
            return loss, {"loss": loss.detach().clone() / count}

        def forward_step(data_iterator: Any, model: Any) -> tuple[Any, Any]:
            micro = next(data_iterator)
            output = model(input_ids=micro.tokens, position_ids=micro.positions, attention_mask=micro.causal_mask)
            return output, functools.partial(loss_func, micro)

        chunks = len(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micros) for _ in range(chunks)] if chunks > 1 else iter(micros),
            model=self.model if chunks > 1 else self.model[0],
            num_microbatches=count,
            seq_length=batch.tokens.shape[1],
            micro_batch_size=len(indices) // count,
            forward_only=not update,
        )
        if update:
            self._reduce_gradients()
            # The adapter that scored this batch, for layer_outputs(pre_step=True) if the on-policy gate trips.
            self._pre_step = [param.detach().clone() for param in self.params]
            self.optimizer.step()
        result = StepResult(rank=ranks.global_rank(), seconds=time.perf_counter() - start)
        if store:
            order = [i for part in (indices[i::count] for i in range(count)) for i in part]
            result.sample_indices = order
            result.logprobs = torch.cat(store, dim=0)
            result.loss = float(sum(float(item["loss"]) for item in losses))
        return result

    def layer_outputs(self, tokens: list[int], pre_step: bool = True) -> dict[int, Any]:
        """Every local decoder layer's output for ``tokens`` scored alone (data-parallel rank 0 answers; the
        other replicas score a copy so that expert-parallel peers run the MoE layers together). With
        ``pre_step``, the LoRA weights are those before the last update: the adapter that scored the batch."""
        import torch

        saved = None
        if pre_step and getattr(self, "_pre_step", None) is not None:
            saved = [param.detach().clone() for param in self.params]
            with torch.no_grad():
                for param, before in zip(self.params, self._pre_step, strict=True):
                    param.copy_(before)
        try:
            return self._layer_outputs(tokens)
        finally:
            if saved is not None:
                with torch.no_grad():
                    for param, now in zip(self.params, saved, strict=True):
                        param.copy_(now)

    def _layer_outputs(self, tokens: list[int]) -> dict[int, Any]:
        import torch
        from megatron.core import parallel_state as ps

        dp_size = ps.get_data_parallel_world_size()
        batch = RolloutBatch(torch.tensor([tokens] * dp_size, dtype=torch.int64), len(tokens) - 1,
                             torch.zeros(dp_size), torch.zeros(dp_size, 1))
        from moe_lora_plugins.topology.naming import unwrap_model_chunk

        captured: dict[int, Any] = {}
        handles = []
        for chunk in self.model:
            for layer in unwrap_model_chunk(chunk).decoder.layers:
                def keep(mod: Any, args: Any, output: Any, index: int = layer.layer_number - 1) -> None:
                    hidden = output[0] if isinstance(output, tuple) else output
                    captured[index] = hidden[:, 0].detach().clone()
                handles.append(layer.register_forward_hook(keep))
        try:
            self.step(batch, update=False)
        finally:
            for handle in handles:
                handle.remove()
        return captured if ps.get_data_parallel_rank() == 0 else {}

    def _reduce_gradients(self) -> None:
        """Sum LoRA gradients over the replicas that saw other samples: the data-parallel group for
        attention adapters, the expert-data-parallel group for expert adapters. The loss is already
        normalised by the global token count, so the sum is the world-size-1 gradient."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        dense, expert = ps.get_data_parallel_group(), ps.get_expert_data_parallel_group()
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            is_expert = ".experts." in self.lora_names[id(param)]
            group = expert if is_expert else dense
            if dist.get_world_size(group) > 1:
                dist.all_reduce(param.grad, group=group)

    # -- export, audit and sync ------------------------------------------------------------------

    def export_and_send(self, version: int, want_adapter: bool) -> SyncResult:
        """Megatron-Bridge's patched, audited ``export_adapter_weights`` stream on this rank is what its stage
        sends (no gather of whole adapters); this suite's own gather is only an independent cross-check."""
        from moe_lora_plugins.lora.export import gather_adapter
        from moe_lora_plugins.lora.wire import encode
        from moe_lora_plugins.sync.sender import send_lora_adapter, tensors_from_export

        start = time.perf_counter()
        audit = self._audited_bridge_export()
        stream = [(name, tensor.detach()) for name, tensor in audit.pop("stream")]
        hook_context = audit.pop("hook_context")
        tensors = tensors_from_export(stream)
        config = _peft_config(tensors, self.settings.lora_alpha, self.settings.model_dir)
        check = gather_adapter(self.model, bridge=self.bridge, dst=None)
        audit["agrees_with_gather"] = _bridge_stream_agrees(stream, check.tensors)
        # What this stage sends: its layers' distinct tensors (the copies an export stream makes of a shared
        # tensor, q/k/v's LoRA A, travel once; so do equal tensors such as the zero LoRA B before step 1).
        adapter_bytes = 0
        if self.sender is not None:
            from moe_lora_plugins.sync.sender import layer_of

            mine = {n: t for n, t in tensors.items() if layer_of(n) in self.owned_layers()}
            adapter_bytes = sum(t.numel() * t.element_size() for t in encode(mine, dedupe="content").tensors.values())
        result = SyncResult(rank=ranks.global_rank(), sender=self.sender, audit=audit, adapter_bytes=adapter_bytes)
        result.export_seconds = time.perf_counter() - start
        if want_adapter and ranks.global_rank() == 0:
            result.adapter = {name: t.detach().clone() for name, t in tensors.items()}
            result.config = config
        if self.sync_group is not None:
            start = time.perf_counter()
            from moe_lora_plugins.hooks.streams import HookedStream

            # The patched export already ran the plugins' on_export_weights chain: the sender must not again.
            sent = HookedStream(iter(stream), hook_context) if hook_context is not None else stream
            report = send_lora_adapter(sent, self.sync_group, [0], sender=self.sender, version=version,
                                       layers=self.owned_layers(), config=config)
            result.send_seconds = time.perf_counter() - start
            result.sent_bytes, result.sent_tensors, result.buckets = (
                report.payload_bytes, report.tensors, report.buckets)
        return result

    def _audited_bridge_export(self) -> dict[str, Any]:
        """Megatron-Bridge's ``export_adapter_weights`` on every rank; the patched stream is EP-gathered and
        audited (every layer, every expert, each once, shapes agree) and raises if it is not complete."""
        from moe_lora_plugins.audit import ExportAudit
        from moe_lora_plugins.patches.megatron_bridge._export_common import audit_enabled

        exported = self.bridge.export_adapter_weights(self.model, cpu=True, show_progress=False)
        stream = [(item[0], item[1]) for item in exported]
        check = ExportAudit("adapter", num_layers=self.config.num_layers, num_experts=self.config.num_moe_experts)
        for name, tensor in stream:
            check.observe(name, tensor)
        report = check.finish()
        return {"passed": True, "patched_stream_audit": audit_enabled(), "tensors": report.tensors,
                "bytes": report.nbytes, "layers": sorted(report.layers), "experts": sorted(report.experts),
                "stream": stream, "hook_context": getattr(exported, "context", None)}


class _Microbatch:
    """Token ids, positions, causal mask and advantages of one rank's slice (no padding: equal lengths)."""

    def __init__(self, tokens: Any, prompt_len: int, advantages: Any, total_completion_tokens: int) -> None:
        import torch

        self.tokens = tokens
        self.prompt_len = prompt_len
        self.advantages = advantages
        self.total_completion_tokens = total_completion_tokens
        seq = tokens.shape[1]
        self.positions = torch.arange(seq).unsqueeze(0).expand(tokens.shape[0], seq)
        self.causal_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]

    def completion_logprobs(self, logits: Any) -> Any:
        """log p(token_t | tokens_<t) for every completion position, float32, shape (n, C)."""
        import torch

        from moe_lora_plugins import onpolicy

        scored = logits.float()[:, self.prompt_len - 1 : -1]
        if onpolicy.enabled():  # the engine's log-softmax, bit for bit
            return onpolicy.token_logprobs(scored, self.tokens[:, self.prompt_len :])
        logprobs = torch.log_softmax(scored, dim=-1)
        return logprobs.gather(-1, self.tokens[:, self.prompt_len :, None]).squeeze(-1)


def _peft_config(tensors: Mapping[str, Any], alpha: float, base_model: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of an exported adapter: rank from its LoRA A, targets from its module names."""
    lora_ranks = {int(t.shape[0]) for name, t in tensors.items() if ".lora_A." in name}
    if len(lora_ranks) != 1:
        raise TrainerError(f"the exported adapter mixes LoRA ranks {sorted(lora_ranks)}; the demo uses one rank")
    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora_ranks.pop(), "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None}


def _bridge_stream_agrees(stream: list[tuple[str, Any]], peft: Mapping[str, Any]) -> bool:
    """Megatron-Bridge's export (as the sync sender names it) and this suite's gather hold the same tensors."""
    import torch

    from moe_lora_plugins.sync.sender import tensors_from_export

    bridge = tensors_from_export(stream)
    if sorted(bridge) != sorted(peft):
        return False
    return all(torch.equal(bridge[n], peft[n].to(bridge[n].dtype)) for n in peft)


# -------------------------------------------------------------------------------------------------
# In the demo's main process
# -------------------------------------------------------------------------------------------------


class TrainerPool(ranks.TrainerRankPool):
    """The demo's trainer ranks as spawned processes; :meth:`call` runs one command on every rank.

    ``env`` is each rank's whole environment (see :func:`trainer_env`); :meth:`wait_ready` waits for the
    ranks to be built, so the caller can start the engine meanwhile."""

    rank_class = TrainerRank
    error_class = TrainerError
    process_name = "moelora-demo-trainer"
    log_name = "trainer-rank"
    stop_timeout_s = 10.0


def trainer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment each trainer rank starts with: the suite on, role trainer, and the export patches
    required (except those the user switched off with ``MOELORA_DISABLED_PATCHES``, to see what they fix)."""
    return ranks.trainer_env(REQUIRED_TRAINER_PATCHES, base)
