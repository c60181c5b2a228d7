"""Megatron-Bridge trainer ranks as spawned gloo processes on the CPU: what the demo's trainer and the
multi-LoRA trainer share.

:func:`build_cpu_provider` loads a checkpoint into a Megatron-Bridge provider set up for the CPU in an
EP x PP (x VPP) layout and initialises Megatron's parallel state; :func:`provide_cpu_model` builds the
model chunks through the actor plugin's pre-wrap hook. :class:`CpuTrainerRank` is the base of a policy on
one rank (its layers, its place in the engine's sync group). :class:`TrainerRankPool` spawns one process
per rank, each serving commands in :func:`_rank_loop`, and runs a command on every rank.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from moe_lora_plugins.errors import MoeLoraError


class TrainerRankError(MoeLoraError, RuntimeError):
    """A trainer rank failed, exited or ran out of time; the message says which rank, during what, and why."""


class RankSettings(Protocol):
    """What the shared build reads from a trainer's settings (picklable, sent to each spawned rank)."""

    @property
    def model_dir(self) -> str: ...

    @property
    def ep(self) -> int: ...

    @property
    def pp(self) -> int: ...

    @property
    def vpp(self) -> int | None: ...

    @property
    def world_size(self) -> int: ...


# -------------------------------------------------------------------------------------------------
# Inside one rank
# -------------------------------------------------------------------------------------------------


def build_cpu_provider(settings: RankSettings, overrides: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """The Megatron-Bridge bridge and finalised provider of ``settings.model_dir`` (weights loaded, float32,
    local layer spec, CPU initialisation, all-gather dispatcher, fusions off) in the settings' EP x PP (x VPP)
    layout with TP = ETP = 1; Megatron's model-parallel state is initialised to that layout.

    ``overrides`` are provider attributes a trainer sets on top, before ``finalize``. Call it in a process
    whose ``torch.distributed`` group holds ``settings.world_size`` ranks.
    """
    import torch

    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    from megatron.bridge import AutoBridge
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core import parallel_state

    from moe_lora_plugins.demo import cpu_training
    from moe_lora_plugins.testing.tiny_models import _FUSIONS_OFF

    cpu_training.install()
    bridge = AutoBridge.from_hf_pretrained(settings.model_dir, torch_dtype=torch.float32)
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.transformer_layer_spec = local_layer_spec
    provider.use_cpu_initialization = True
    provider.params_dtype = torch.float32
    provider.bf16 = provider.fp16 = False
    provider.pipeline_dtype = torch.float32
    provider.autocast_dtype = None
    provider.moe_token_dispatcher_type = "allgather"
    provider.moe_grouped_gemm = False
    for name in _FUSIONS_OFF:
        if hasattr(provider, name):
            setattr(provider, name, False)
    provider.tensor_model_parallel_size = 1
    provider.pipeline_model_parallel_size = settings.pp
    provider.virtual_pipeline_model_parallel_size = settings.vpp
    provider.expert_model_parallel_size = settings.ep
    provider.expert_tensor_parallel_size = 1
    provider.sequence_parallel = False
    for name, value in (overrides or {}).items():
        setattr(provider, name, value)
    provider.finalize()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=settings.pp,
        virtual_pipeline_model_parallel_size=settings.vpp,
        expert_model_parallel_size=settings.ep,
        expert_tensor_parallel_size=1,
    )
    return bridge, provider


def provide_cpu_model(provider: Any, config: Any) -> list[Any]:
    """This rank's model chunks, built through the plugin layer (the actor plugins' ``on_build_model`` sees
    ``config`` before wrapping), in eval mode: dropout is 0 anyway, and eval keeps the MoE auxiliary loss
    out of the policy gradient."""
    from moe_lora_plugins.plugins.lora_actor import install_pre_wrap_hook

    install_pre_wrap_hook(provider, role="actor", config=config)
    model = list(provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                                    mixed_precision_wrapper=None))
    for chunk in model:
        chunk.eval()
    return model


def global_rank() -> int:
    """This process's rank in the default ``torch.distributed`` group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class CpuTrainerRank:
    """The policy on one rank: a subclass builds ``self.model`` (its Megatron model chunks) in ``_build`` and
    adds the commands its pool sends (any public method is a command)."""

    # After a command raises, the rank reports the error and serves the next command; with False it reports
    # and exits, so that its peers and the engine see its connections close instead of waiting for it.
    serve_after_error: bool = True

    def __init__(self, settings: RankSettings) -> None:
        self.settings = settings
        self.model: list[Any] = []
        self.sync_group: Any = None
        self.sender: int | None = None
        self._build()

    def _build(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must build its model in _build")

    def ready_info(self) -> dict[str, Any]:
        """What the rank reports once built (the pool's ``info``)."""
        return {"pid": os.getpid(), "layers": self.owned_layers()}

    def owned_layers(self) -> list[int]:
        """The global (0-based) numbers of the decoder layers this rank holds, over all its model chunks."""
        from moe_lora_plugins.topology.naming import unwrap_model_chunk

        return sorted(layer.layer_number - 1 for chunk in self.model for layer in unwrap_model_chunk(chunk).decoder.layers)

    def join_sync_group(self, host: str, port: int) -> int | None:
        """The first rank of pipeline stage s becomes sender s of the engine's sync group (group rank s + 1;
        the engine's worker is group rank 0). The other ranks take no part in the sync."""
        from megatron.core import parallel_state as ps

        from moe_lora_plugins.sync.transport import new_sync_group

        if ps.get_data_parallel_rank() != 0 or ps.get_expert_model_parallel_rank() != 0:
            return None
        self.sender = ps.get_pipeline_model_parallel_rank()
        self.sync_group = new_sync_group(host, port, self.sender + 1, self.settings.pp + 1, "gloo")
        return self.sender


def _rank_loop(rank: int, world: int, port: int, rank_class: type[CpuTrainerRank], settings: RankSettings,
               commands: Any, results: Any, env: Mapping[str, str], log_path: str | None) -> None:
    """A spawned rank: join the gloo group, build ``rank_class(settings)``, answer ``(command, args)`` from
    ``commands`` with ``(rank, command, result)`` on ``results`` until ``stop``. A command that raises is
    answered with ``(rank, "error", traceback)``; the rank then keeps serving if its class says so
    (:attr:`CpuTrainerRank.serve_after_error`). A failed start ends it."""
    if log_path:  # Megatron and Megatron-Bridge log a lot; the caller shows a summary and keeps the logs
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

        if not is_active():  # the .pth bootstrap activates when installed; a source checkout needs the call
            activate(role="trainer")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        trainer = rank_class(settings)
        results.put((rank, "ready", trainer.ready_info()))
        while True:
            command, args = commands.get()
            if command == "stop":
                break
            try:  # a refused command (bad slot, missing checkpoint) is reported; the rank keeps serving
                results.put((rank, command, getattr(trainer, command)(*args)))
            except Exception:
                if not trainer.serve_after_error:
                    raise
                results.put((rank, "error", traceback.format_exc()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------
# In the driving process
# -------------------------------------------------------------------------------------------------


class TrainerRankPool:
    """The ranks of a trainer as spawned processes; :meth:`call` runs one command on every rank.

    A subclass names its rank class, its error class (raised when a rank fails, exits or runs out of time),
    and the process and log-file names (``{process_name}{rank}``, ``{log_name}{rank}.log`` in ``log_dir``).
    """

    rank_class: type[CpuTrainerRank] = CpuTrainerRank
    error_class: type[TrainerRankError] = TrainerRankError
    process_name: str = "moelora-trainer"
    log_name: str = "trainer-rank"
    stop_timeout_s: float = 20.0

    def __init__(self, settings: RankSettings, env: Mapping[str, str], log_dir: str | None = None,
                 timeout_s: float = 600.0) -> None:
        from moe_lora_plugins.testing.distributed import free_port

        self.settings = settings
        self.timeout_s = timeout_s
        ctx = multiprocessing.get_context("spawn")
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in range(settings.world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_rank_loop, name=f"{self.process_name}{rank}",
                        args=(rank, settings.world_size, port, self.rank_class, settings, self._commands[rank],
                              self._results, dict(env),
                              os.path.join(log_dir, f"{self.log_name}{rank}.log") if log_dir else None))
            for rank in range(settings.world_size)
        ]
        for proc in self.procs:
            proc.start()
        self.info: list[Any] = []

    def wait_ready(self) -> list[Any]:
        """Every rank's :meth:`CpuTrainerRank.ready_info`, once all are built (also kept as ``info``)."""
        self.info = self._collect("ready")
        return self.info

    def call(self, command: str, *args: Any) -> list[Any]:
        """Run ``command`` on every rank; every rank's answer, in rank order."""
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
                    raise self.error_class(f"trainer rank(s) {dead} exited (codes "
                                           f"{[self.procs[r].exitcode for r in dead]}) during '{command}'") from None
                if time.monotonic() > deadline:
                    if errors:
                        break
                    raise self.error_class(f"trainer '{command}' did not finish within {self.timeout_s:.0f} s") from None
                continue
            if kind == "error":
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + grace_s)
            else:
                out[rank] = payload
        if errors:
            rank = min(errors)
            last = errors[rank].strip().splitlines()[-1] if errors[rank].strip() else "no traceback"
            raise self.error_class(f"trainer rank {rank} failed during '{command}': {last}\n\n{errors[rank]}")
        return [out[r] for r in range(len(self.procs))]

    def stop(self) -> None:
        """Ask every rank to stop; a rank still running after ``stop_timeout_s`` is killed."""
        for q in self._commands:
            with contextlib.suppress(Exception):
                q.put(("stop", ()))
        for proc in self.procs:
            proc.join(self.stop_timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join()


def trainer_env(required: Sequence[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment each trainer rank starts with: ``base`` with the suite on, role trainer, one thread,
    and the ``required`` patches required (except those the user switched off with
    ``MOELORA_DISABLED_PATCHES``, to see what they fix)."""
    from moe_lora_plugins.envs import parse_id_list

    env = dict(base or {})
    disabled = set(parse_id_list(env.get("MOELORA_DISABLED_PATCHES")))
    env.update({"MOELORA_PLUGINS": "on", "MOELORA_ROLE": "trainer",
                "MOELORA_REQUIRE": ",".join(p for p in required if p not in disabled),
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env
