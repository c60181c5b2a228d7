"""The multi-LoRA trainer: several adapters on one frozen Megatron-Bridge MoE policy, in gloo processes.

Each rank (a spawned process, :class:`MultiLoraTrainerPool`) loads the checkpoint through
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

import contextlib
import functools
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moe_lora_plugins.errors import MoeLoraError
from moe_lora_plugins.multilora.controller import AdapterSpec

REQUIRED_TRAINER_PATCHES = (
    "megatron_bridge.qwen3_moe_dense_layer_provider",
    "megatron_bridge.qwen3_moe_dense_layer_mappings",
    "megatron_bridge.mixed_dense_moe_block_spec",
)


class MultiLoraTrainerError(MoeLoraError, RuntimeError):
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


class MultiLoraTrainerRank:
    """The frozen base with its adapter slots on one rank, and the operations the driver runs on it."""

    def __init__(self, settings: MultiTrainerSettings) -> None:
        self.settings = settings
        self.specs: dict[int, AdapterSpec] = {}
        self.optimizers: dict[int, Any] = {}
        self.sync_group: Any = None
        self.sender: int | None = None
        self._build()

    def _build(self) -> None:
        import torch

        from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

        s = self.settings
        prepare_megatron_cpu()
        from megatron.bridge import AutoBridge
        from megatron.bridge.models.gpt_provider import local_layer_spec
        from megatron.core import parallel_state

        from moe_lora_plugins.demo import cpu_training
        from moe_lora_plugins.multilora.megatron import MultiLoraSetup
        from moe_lora_plugins.plugins.lora_actor import install_pre_wrap_hook

        cpu_training.install()
        self.bridge = AutoBridge.from_hf_pretrained(s.model_dir, torch_dtype=torch.float32)
        provider = self.bridge.to_megatron_provider(load_weights=True)
        provider.transformer_layer_spec = local_layer_spec
        provider.use_cpu_initialization = True
        provider.params_dtype = torch.float32
        provider.bf16 = provider.fp16 = False
        provider.pipeline_dtype = torch.float32
        provider.autocast_dtype = None
        provider.moe_token_dispatcher_type = "allgather"
        provider.moe_grouped_gemm = False
        for name in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
                     "apply_rope_fusion", "gradient_accumulation_fusion", "moe_permute_fusion",
                     "cross_entropy_loss_fusion"):
            if hasattr(provider, name):
                setattr(provider, name, False)
        provider.tensor_model_parallel_size = 1
        provider.pipeline_model_parallel_size = s.pp
        provider.virtual_pipeline_model_parallel_size = s.vpp
        provider.expert_model_parallel_size = s.ep
        provider.expert_tensor_parallel_size = 1
        provider.sequence_parallel = False
        # Each microbatch's loss is already normalised by its adapter's token count: no division by the
        # number of microbatches (which differs between a mixed step and an adapter's steps alone).
        provider.calculate_per_token_loss = True
        # With virtual stages and PP = 2 the previous and next stage are one rank, and the interleaved schedule's
        # batched p2p (batch_isend_irecv) then has an activation and a gradient in flight to that rank at once;
        # on gloo they were matched wrongly (an adapter's parameters after a 4-microbatch step differed from the
        # non-interleaved run). Unbatched p2p gives the non-interleaved result bitwise.
        if s.vpp and not torch.cuda.is_available():
            provider.batch_p2p_comm = False
        provider.finalize()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=s.pp,
                                                 virtual_pipeline_model_parallel_size=s.vpp,
                                                 expert_model_parallel_size=s.ep, expert_tensor_parallel_size=1)
        # Through the plugin layer: the multi_lora plugin's on_build_model wraps the targets before wrapping.
        install_pre_wrap_hook(provider, role="actor", config=MultiLoraSetup())
        self.model = list(provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                                             mixed_precision_wrapper=None))
        self.config = provider
        for chunk in self.model:
            chunk.eval()  # dropout is 0; eval keeps the MoE auxiliary loss out of the policy gradient

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
        result = MultiStepResult(rank=_rank())
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
        rank, world = _rank(), _world()
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
        payload = ckpt.read_shard(ref, _rank(), _world())
        from moe_lora_plugins.multilora.megatron import adapter_parameters

        count = ckpt.load_weights(adapter_parameters(self.model, slot), payload["weights"],
                                  f"adapter {spec.name!r} rank {_rank()}")
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

    def join_sync_group(self, host: str, port: int) -> int | None:
        """The first rank of pipeline stage s becomes sender s (group rank s + 1; the engine worker is 0)."""
        from megatron.core import parallel_state as ps

        from moe_lora_plugins.sync.transport import new_sync_group

        if ps.get_data_parallel_rank() != 0 or ps.get_expert_model_parallel_rank() != 0:
            return None
        self.sender = ps.get_pipeline_model_parallel_rank()
        self.sync_group = new_sync_group(host, port, self.sender + 1, self.settings.pp + 1, "gloo")
        return self.sender

    def owned_layers(self) -> list[int]:
        from moe_lora_plugins.topology.naming import unwrap_model_chunk

        return sorted(layer.layer_number - 1 for chunk in self.model for layer in unwrap_model_chunk(chunk).decoder.layers)

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


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _rank_loop(rank: int, world: int, port: int, settings: MultiTrainerSettings, commands: Any, results: Any,
               env: Mapping[str, str], log_path: str | None) -> None:
    if log_path:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        from moe_lora_plugins.activation import activate, is_active

        if not is_active():
            activate(role="trainer")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        trainer = MultiLoraTrainerRank(settings)
        results.put((rank, "ready", {"pid": os.getpid(), "layers": trainer.owned_layers()}))
        while True:
            command, args = commands.get()
            if command == "stop":
                break
            try:  # a refused command (bad slot, missing checkpoint) is reported; the rank keeps serving
                results.put((rank, command, getattr(trainer, command)(*args)))
            except Exception:
                results.put((rank, "error", traceback.format_exc()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class MultiLoraTrainerPool:
    """The trainer ranks as spawned processes; :meth:`call` runs one command on every rank."""

    def __init__(self, settings: MultiTrainerSettings, env: Mapping[str, str] | None = None,
                 log_dir: str | None = None, timeout_s: float = 600.0) -> None:
        from moe_lora_plugins.testing.distributed import free_port

        self.settings = settings
        self.timeout_s = timeout_s
        ctx = multiprocessing.get_context("spawn")
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in range(settings.world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_rank_loop, name=f"moelora-multilora-trainer{rank}",
                        args=(rank, settings.world_size, port, settings, self._commands[rank], self._results,
                              dict(trainer_env(env)),
                              os.path.join(log_dir, f"multilora-rank{rank}.log") if log_dir else None))
            for rank in range(settings.world_size)
        ]
        for proc in self.procs:
            proc.start()
        self.info = self._collect("ready")

    def call(self, command: str, *args: Any) -> list[Any]:
        self.send(command, *args)
        return self._collect(command)

    def send(self, command: str, *args: Any) -> None:
        """Start ``command`` on every rank without waiting (for a sync the engine receives meanwhile)."""
        for q in self._commands:
            q.put((command, args))

    def collect(self, command: str) -> list[Any]:
        """Every rank's answer to a command started with :meth:`send`."""
        return self._collect(command)

    def _collect(self, command: str, grace_s: float = 30.0) -> list[Any]:
        """Every rank's answer to ``command``. When a rank fails, the others' answers are still read (up to
        ``grace_s`` more), so none is left behind to be taken for the answer to a later command."""
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(out) + len(errors) < len(self.procs):
            try:
                rank, kind, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in out and r not in errors]
                if dead:
                    raise MultiLoraTrainerError(f"trainer rank(s) {dead} exited (codes "
                                                f"{[self.procs[r].exitcode for r in dead]}) during '{command}'") from None
                if time.monotonic() > deadline:
                    if errors:
                        break
                    raise MultiLoraTrainerError(f"'{command}' did not finish within {self.timeout_s:.0f} s") from None
                continue
            if kind == "error":
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + grace_s)
            else:
                out[rank] = payload
        if errors:
            rank = min(errors)
            last = errors[rank].strip().splitlines()[-1] if errors[rank].strip() else "no traceback"
            raise MultiLoraTrainerError(f"trainer rank {rank} failed during '{command}': {last}\n\n{errors[rank]}")
        return [out[r] for r in range(len(self.procs))]

    def stop(self) -> None:
        for q in self._commands:
            with contextlib.suppress(Exception):
                q.put(("stop", ()))
        for proc in self.procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join()


def trainer_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each rank's environment: the suite on, role trainer, the dense-layer patches required."""
    env = dict(base or {})
    env.update({"MOELORA_PLUGINS": "on", "MOELORA_ROLE": "trainer",
                "MOELORA_REQUIRE": ",".join(REQUIRED_TRAINER_PATCHES),
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env
