"""The multi-LoRA trainer: several adapters on one frozen Megatron-Bridge MoE policy, in gloo processes.

Each rank (a spawned process, :class:`MultiLoraTrainerPool`; the process machinery is
:mod:`moe_lora_plugins.demo.ranks`, shared with the demo's trainer) loads the checkpoint through
Megatron-Bridge into its share of the EP x PP layout with the local layer spec, wraps every LoRA target
(experts included) with :func:`~moe_lora_plugins.multilora.megatron.apply_multi_lora`, then serves
commands: materialise / remove an adapter in a slot (its own Adam), a policy-gradient step over a batch
that mixes adapters, a per-adapter checkpoint and restore, a per-adapter export and sync to the engine.

A step's microbatches each hold one adapter's samples (the MoE dispatcher permutes tokens, so an expert
cannot tell samples apart; one adapter per microbatch keeps every expert's delta exact). Each adapter's
samples are split evenly over the data-parallel ranks, so microbatch ``m`` has the same adapter on
every rank of the expert-parallel group. An adapter's loss is normalised by its own completion tokens,
so its gradient is what a batch of its samples alone would give; only adapters with samples in the
step are reduced and stepped.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.demo import ranks
from moe_lora_plugins.multilora.controller import AdapterSpec

REQUIRED_TRAINER_PATCHES = (
    "megatron_bridge.qwen3_moe_dense_layer_provider",
    "megatron_bridge.qwen3_moe_dense_layer_mappings",
    "megatron_bridge.mixed_dense_moe_block_spec",
)


class MultiLoraTrainerError(ranks.TrainerRankError):
    """A trainer rank failed or was asked for something it cannot do; the message says which and why."""


@dataclass(frozen=True)
class MultiTrainerSettings:
    """What every rank needs to build the frozen base (picklable)."""

    model_dir: str
    ep: int = 1
    pp: int = 1
    vpp: int | None = None
    micro_batch_size: int = 1
    family: str = "qwen3_moe"

    @property
    def world_size(self) -> int:
        return self.ep * self.pp


@dataclass
class MultiBatch:
    """Samples of several adapters: token ids (N, P + C), per-sample advantage, per-sample adapter slot."""

    tokens: Any
    prompt_len: int
    advantages: Any
    sample_slots: Sequence[int]


@dataclass
class MultiStepResult:
    """One rank's share of a step: the slots it stepped, and (last stage) each sample's completion logprobs."""

    rank: int
    stepped: list[int] = field(default_factory=list)
    sample_indices: list[int] = field(default_factory=list)
    logprobs: Any = None
    loss_by_slot: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0


def plan_microbatches(sample_slots: Sequence[int], dp_size: int, dp_rank: int, micro_batch_size: int) -> list[list[int]]:
    """This data-parallel rank's microbatches: lists of sample indices, one adapter each, in slot order.

    Each slot's samples are dealt to the ranks round-robin (rank ``r`` gets the ``r``-th, ``r + dp``-th, ...),
    then cut into microbatches of ``micro_batch_size``; every rank gets the same slot sequence. A slot
    whose sample count is not a multiple of ``dp_size * micro_batch_size`` is refused by name.
    """
    by_slot: dict[int, list[int]] = {}
    for index, slot in enumerate(sample_slots):
        by_slot.setdefault(int(slot), []).append(index)
    micros: list[list[int]] = []
    unit = dp_size * micro_batch_size
    for slot in sorted(by_slot):
        indices = by_slot[slot]
        if len(indices) % unit:
            raise MultiLoraTrainerError(
                f"slot {slot} has {len(indices)} samples; each adapter needs a multiple of data-parallel size "
                f"{dp_size} x micro batch size {micro_batch_size} = {unit} (one adapter per microbatch)"
            )
        mine = indices[dp_rank::dp_size]
        micros += [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return micros


class _Microbatch:
    """Token ids, positions, causal mask, advantages and adapter slots of one microbatch (equal lengths)."""

    def __init__(self, tokens: Any, prompt_len: int, advantages: Any, slot: int, loss_tokens: int) -> None:
        import torch

        self.tokens = tokens
        self.prompt_len = prompt_len
        self.advantages = advantages
        self.slot = slot
        self.loss_tokens = loss_tokens
        seq = tokens.shape[1]
        self.positions = torch.arange(seq).unsqueeze(0).expand(tokens.shape[0], seq)
        self.causal_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]

    def completion_logprobs(self, logits: Any) -> Any:
        import torch

        logprobs = torch.log_softmax(logits.float()[:, self.prompt_len - 1 : -1], dim=-1)
        return logprobs.gather(-1, self.tokens[:, self.prompt_len :, None]).squeeze(-1)


class MultiLoraTrainerRank(ranks.CpuTrainerRank):
    """The frozen base with its adapter slots on one rank, and the operations the driver runs on it."""

    settings: MultiTrainerSettings

    def __init__(self, settings: MultiTrainerSettings) -> None:
        self.specs: dict[int, AdapterSpec] = {}
        self.optimizers: dict[int, Any] = {}
        super().__init__(settings)

    def _build(self) -> None:
        import torch

        from moe_lora_plugins.multilora.megatron import MultiLoraSetup

        # Each microbatch's loss is already normalised by its adapter's token count: no division by the
        # number of microbatches (which differs between a mixed step and an adapter's steps alone).
        overrides: dict[str, Any] = {"calculate_per_token_loss": True}
        # With virtual stages and PP = 2 the previous and next stage are one rank, and the interleaved schedule's
        # batched p2p (batch_isend_irecv) then has an activation and a gradient in flight to that rank at once;
        # on gloo they were matched wrongly (an adapter's parameters after a 4-microbatch step differed from the
        # non-interleaved run). Unbatched p2p gives the non-interleaved result bitwise.
        if self.settings.vpp and not torch.cuda.is_available():
            overrides["batch_p2p_comm"] = False
        self.bridge, provider = ranks.build_cpu_provider(self.settings, overrides)
        # Through the plugin layer: the multi_lora plugin's on_build_model wraps the targets before wrapping.
        self.model = ranks.provide_cpu_model(provider, MultiLoraSetup())
        self.config = provider

    # -- slots -----------------------------------------------------------------------------------

    def add_adapter(self, slot: int, spec: AdapterSpec) -> int:
        """Materialise ``spec`` in ``slot`` with a fresh Adam; returns this rank's parameter count."""
        import torch

        from moe_lora_plugins.multilora.megatron import adapter_parameters, add_adapter

        if slot in self.specs:
            raise MultiLoraTrainerError(f"slot {slot} holds adapter {self.specs[slot].name!r}; remove it first")
        count = add_adapter(self.model, slot, spec)
        self.specs[slot] = spec
        params = adapter_parameters(self.model, slot)
        self.optimizers[slot] = torch.optim.Adam([params[n] for n in sorted(params)], lr=spec.learning_rate)
        return count

    def remove_adapter(self, slot: int) -> int:
        from moe_lora_plugins.multilora.megatron import remove_adapter

        self.specs.pop(slot, None)
        self.optimizers.pop(slot, None)
        return remove_adapter(self.model, slot)

    def adapter_state(self, slot: int) -> dict[str, Any]:
        """This rank's parameters of ``slot`` (global names, CPU copies)."""
        from moe_lora_plugins.multilora.megatron import adapter_parameters

        return {n: p.detach().clone() for n, p in adapter_parameters(self.model, slot).items()}

    # -- a step ----------------------------------------------------------------------------------

    def step(self, batch: MultiBatch, update: bool = True) -> MultiStepResult:
        """Completion logprobs of this rank's share and, with ``update``, a policy-gradient step for every
        adapter with samples in the batch (and no other)."""
        import torch
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from moe_lora_plugins.multilora.routing import adapter_routing

        start = time.perf_counter()
        slots = [int(s) for s in batch.sample_slots]
        unknown = sorted(set(slots) - set(self.specs))
        if unknown:
            raise MultiLoraTrainerError(f"the batch names slots {unknown} that hold no adapter; held: {sorted(self.specs)}")
        present = sorted(set(slots))
        dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        plan = plan_microbatches(slots, dp_size, dp_rank, self.settings.micro_batch_size)
        completion = batch.tokens.shape[1] - batch.prompt_len
        tokens_of = {s: completion * slots.count(s) for s in present}
        micros = [_Microbatch(batch.tokens[idx], batch.prompt_len, batch.advantages[idx].float(), slots[idx[0]],
                              tokens_of[slots[idx[0]]]) for idx in plan]
        store: list[Any] = []
        losses: dict[int, float] = dict.fromkeys(present, 0.0)

        def loss_func(micro: _Microbatch, output: Any) -> tuple[Any, Any, dict[str, Any]]:
            logprobs = micro.completion_logprobs(output)
            loss = -(micro.advantages[:, None] * logprobs).sum() / micro.loss_tokens
            store.append(logprobs.detach().clone())
            losses[micro.slot] += float(loss.detach())
            return loss, torch.tensor(1, dtype=torch.int), {"loss": loss.detach().clone()}

        def forward_step(data_iterator: Any, model: Any) -> tuple[Any, Any]:
            micro = next(data_iterator)
            with adapter_routing([micro.slot] * micro.tokens.shape[0]):
                output = model(input_ids=micro.tokens, position_ids=micro.positions, attention_mask=micro.causal_mask)
            return output, functools.partial(loss_func, micro)

        if update:
            for slot in present:
                self.optimizers[slot].zero_grad(set_to_none=True)
        chunks = len(self.model)
        if chunks > 1 and len(micros) % self.settings.pp:
            raise MultiLoraTrainerError(
                f"{len(micros)} microbatches on this rank; the interleaved (VPP) schedule needs a multiple of "
                f"PP = {self.settings.pp} (give the adapters more samples per step)"
            )
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micros) for _ in range(chunks)] if chunks > 1 else iter(micros),
            model=self.model if chunks > 1 else self.model[0],
            num_microbatches=len(micros), seq_length=batch.tokens.shape[1],
            micro_batch_size=self.settings.micro_batch_size, forward_only=not update)
        result = MultiStepResult(rank=ranks.global_rank())
        if update:
            self._reduce_gradients(present)
            for slot in present:
                self.optimizers[slot].step()
            result.stepped = present
        if store:
            result.sample_indices = [i for idx in plan for i in idx]
            result.logprobs = torch.cat(store, dim=0)
            result.loss_by_slot = losses
        result.seconds = time.perf_counter() - start
        return result

    def _reduce_gradients(self, slots: Sequence[int]) -> None:
        """Sum each stepped adapter's gradients over the replicas that saw other samples: the data-parallel
        group for dense targets, the expert-data-parallel group for expert targets."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from moe_lora_plugins.multilora.megatron import adapter_parameters

        dense, expert = ps.get_data_parallel_group(), ps.get_expert_data_parallel_group()
        for slot in slots:
            for name, param in sorted(adapter_parameters(self.model, slot).items()):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                group = expert if ".experts." in name and ".shared_experts." not in name else dense
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(param.grad, group=group)

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, root: str, slot: int, step: int, manifest: Mapping[str, Any]) -> str | None:
        """Write ``slot``'s adapter (weights, Adam state, this rank's RNG) as checkpoint ``step``. Collective."""
        import torch.distributed as dist

        from moe_lora_plugins.multilora import checkpoint as ckpt

        spec = self._spec(slot)
        rank, world = ranks.global_rank(), _world()
        if rank == 0:
            ckpt.prepare(root, spec.name, step)
        _barrier()
        ckpt.write_shard(ckpt.staging_dir(root, spec.name, step), rank, self.adapter_state(slot),
                         self.optimizers[slot].state_dict(), ckpt.capture_rng())
        _barrier()
        path = None
        if rank == 0:
            body = {"spec": spec.to_dict(), "slot": slot, **dict(manifest)}
            path = str(ckpt.commit(root, spec.name, step, world, body))
        if dist.is_initialized():
            _barrier()
        return path

    def load_checkpoint(self, root: str, slot: int, step: int | None = None) -> dict[str, Any]:
        """Restore ``slot``'s adapter from its latest (or ``step``) checkpoint: weights, Adam state, RNG.

        The slot must already hold the adapter (:meth:`add_adapter` with the checkpoint's spec): loading
        into an empty slot is an error, never a load of 0 tensors. Returns the manifest and the count."""
        from moe_lora_plugins.multilora import checkpoint as ckpt

        spec = self._spec(slot)
        refs = ckpt.list_checkpoints(root, spec.name)
        ref = refs[-1] if refs and step is None else next((r for r in refs if r.step == step), None)
        if ref is None:
            raise MultiLoraTrainerError(f"no checkpoint of adapter {spec.name!r}"
                                        f"{'' if step is None else f' at step {step}'} under {root}")
        saved = AdapterSpec.from_dict(ref.manifest["spec"])
        if saved != spec:
            raise MultiLoraTrainerError(f"{ref.path}: saved for {saved}, the slot holds {spec}")
        payload = ckpt.read_shard(ref, ranks.global_rank(), _world())
        from moe_lora_plugins.multilora.megatron import adapter_parameters

        count = ckpt.load_weights(adapter_parameters(self.model, slot), payload["weights"],
                                  f"adapter {spec.name!r} rank {ranks.global_rank()}")
        self.optimizers[slot].load_state_dict(payload["optimizer"])
        ckpt.restore_rng(payload["rng"])
        return {"manifest": ref.manifest, "tensors": count, "step": ref.step}

    def _spec(self, slot: int) -> AdapterSpec:
        if slot not in self.specs:
            raise MultiLoraTrainerError(
                f"slot {slot} holds no adapter on this trainer (held: {sorted(self.specs)}); add_adapter first"
            )
        return self.specs[slot]

    # -- export and sync -------------------------------------------------------------------------

    def export_adapter(self, slot: int) -> dict[str, Any] | None:
        """``{"tensors", "config"}`` of ``slot``'s adapter in PEFT form on rank 0 (``None`` elsewhere). Collective."""
        from moe_lora_plugins.multilora.megatron import gather_adapter_of_slot

        adapter = gather_adapter_of_slot(self.model, slot, self._spec(slot), self.settings.family, dst=0)
        if adapter is None:
            return None
        return {"tensors": {n: t.clone() for n, t in adapter.tensors.items()}, "config": adapter.peft_config()}

    def send_adapter(self, slot: int, version: int) -> int:
        """Gather ``slot``'s adapter and send this stage's layers to the engine (senders only). Collective."""
        from moe_lora_plugins.multilora.megatron import gather_adapter_of_slot
        from moe_lora_plugins.sync.sender import send_lora_adapter

        adapter = gather_adapter_of_slot(self.model, slot, self._spec(slot), self.settings.family, dst=None)
        if self.sync_group is None:
            return 0
        report = send_lora_adapter(adapter, self.sync_group, [0], sender=self.sender, version=version,
                                   layers=self.owned_layers())
        return int(report.payload_bytes)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class MultiLoraTrainerPool(ranks.TrainerRankPool):
    """The trainer ranks as spawned processes, ready when built; :meth:`call` runs one command on every rank.

    ``env`` is the base of each rank's environment (:func:`trainer_env` adds the suite's switches)."""

    rank_class = MultiLoraTrainerRank
    error_class = MultiLoraTrainerError
    process_name = "moelora-multilora-trainer"
    log_name = "multilora-rank"
    stop_timeout_s = 20.0

    def __init__(self, settings: MultiTrainerSettings, env: Mapping[str, str] | None = None,
                 log_dir: str | None = None, timeout_s: float = 600.0) -> None:
        super().__init__(settings, trainer_env(env), log_dir=log_dir, timeout_s=timeout_s)
        self.wait_ready()


def trainer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each rank's environment: the suite on, role trainer, the dense-layer patches required (except those
    the user switched off with ``MOELORA_DISABLED_PATCHES``)."""
    return ranks.trainer_env(REQUIRED_TRAINER_PATCHES, base)
