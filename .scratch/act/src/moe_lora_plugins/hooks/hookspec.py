"""Hook specifications: the points where plugins change what the trainer and the engines do.

Grouped by lifecycle phase. Each docstring says what the hook is for, when and in which process it
is called, and what its result means. Heavy types are imported only for type checkers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from moe_lora_plugins.envs import Settings
    from moe_lora_plugins.hooks.context import ExportContext
    from moe_lora_plugins.registry import PatchSpec

hookspec = pluggy.HookspecMarker("moelora")

# -------------------------------------------------------------------------------------------------
# Process lifecycle
# -------------------------------------------------------------------------------------------------


@hookspec
def moelora_patch_specs() -> Iterable[PatchSpec]:
    """Return the PatchSpecs this plugin brings, in addition to the built-in ones.

    Called once per process, when the registry is built (at ``activate()`` or by ``doctor``), before
    any patch is applied. Every implementation is called; the union of the results is registered.
    Spec ids must be unique across plugins (a clash raises). Implementations must not import the
    patch targets: the registry applies the specs lazily, like the built-in ones.
    """


@hookspec
def moelora_activate(role: str | None, settings: Settings) -> None:
    """Called once per process, at the end of ``moe_lora_plugins.activate()``.

    :param role: the process's role as given to ``activate`` (``"trainer"``, ``"vllm"``,
        ``"sglang"``, or ``None`` when the ``.pth`` bootstrap activated it).
    :param settings: the parsed ``MOELORA_*`` switches.

    Called in every process that activates (trainer ranks, engine workers, Ray actors). Every
    implementation is called; results are ignored. Keep it cheap: it runs at start-up.
    """


# -------------------------------------------------------------------------------------------------
# Trainer: model construction
# -------------------------------------------------------------------------------------------------


@hookspec
def on_build_model(model_chunks: list[Any], provider: Any, role: str, config: Any) -> None:
    """Called on each trainer rank after the Megatron model chunks are built, before DDP wrapping.

    :param model_chunks: the list of model chunks of this rank (one per virtual pipeline stage).
    :param provider: the Megatron-Bridge model provider that built them.
    :param role: ``"actor"``, ``"reference"`` or ``"critic"``. LoRA plugins act on ``"actor"`` only.
    :param config: what the host seam declared: a ``moe_lora_plugins.hooks.build.BuildConfig`` (its
        ``lora`` and the host's ``args``), or a ``LoraConfig`` / the host's parsed arguments when a
        caller registers the hook itself (``plugins.lora_actor.install_pre_wrap_hook``).

    Called in each trainer rank's process, for every model it builds with Megatron-Bridge's
    ``provide_distributed_model`` once a host seam declared the build configuration
    (``integrations.megatron_init.init(args)``, ``integrations.verl``, ``hooks.build.declare_build``),
    after the host's own pre-wrap hooks (its LoRA, if it applies one) and before DDP / FSDP wrapping.
    Use it to apply LoRA, adjust modules or parameters, or record what was built (MoE runtime settings
    and bridge registrations must happen before ``finalize()`` / the bridge lookup: see
    ``moe_lora_plugins.trainer``). Implementations change the chunks in place; every implementation is
    called; results are ignored.
    """


# -------------------------------------------------------------------------------------------------
# Trainer: weight export
# -------------------------------------------------------------------------------------------------


@hookspec
def on_export_weights(
    weights: Iterable[tuple[str, Any]], context: ExportContext
) -> Iterator[tuple[str, Any]] | None:
    """Wrap the stream of ``(hf_name, tensor)`` items that leaves the trainer on one rank.

    :param weights: the stream so far (the export, or the previous plugin's output). Items are the
        export's own tuples: ``(hf_name, tensor)``, or the slime/miles fork's ``(hf_name, tensor,
        megatron_name)``; keep the arity when you transform.
    :param context: which export (``kind``: ``full``, ``merged`` or ``adapter``), the model, the
        bridge and this rank's layout (``pp``, ``ep``, ``tp``, ``etp`` and ``*_rank``).

    Called on every trainer rank that exports, once per stream that leaves the trainer
    (``moe_lora_plugins.hooks.streams``): the patched Megatron-Bridge ``export_hf_weights`` (plain or
    merged) and ``export_adapter_weights`` / ``save_hf_adapter``, merge-on-export
    (``merge.bridge_export``; the two exports it reads are not shown separately) and the adapter sync
    sender (unless its input already went through the chain). Decided when the stream starts to be
    read. Implementations are chained: each receives the iterator returned by the one before (in
    pluggy's call order, last registered first) and returns a new iterator, or ``None`` to pass the
    stream on untouched; what the last one yields is what the engine receives. See
    :func:`moe_lora_plugins.hooks.manager.chain_export_weights`.
    """


# -------------------------------------------------------------------------------------------------
# Rollout engine
# -------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def on_generate_state(args: Any) -> Any | None:
    """Provide the rollout-side lifecycle that a host's generate state delegates to.

    :param args: the host's parsed arguments.

    Called once per generate state, in the process that runs the rollout loop (miles' / slime's rollout
    manager), when ``moe_lora_plugins.integrations.generate_state.MoeLoraGenerateState`` (named with
    ``--custom-generate-state-path``) or ``MoeLoraGenerateStateHooks`` is constructed. The first
    non-``None`` result wins (``firstresult``): an object with the five lifecycle methods
    (``on_group_submit``, ``on_group_selected``, ``on_generate_rollout_start``,
    ``on_generate_rollout_complete``, ``reset``; see :class:`moe_lora_plugins.hooks.lifecycle.GenerateLifecycle`).
    When no plugin answers, the lifecycle calls every :func:`moelora_generate_state_listeners`
    listener (:func:`moe_lora_plugins.hooks.lifecycle.lifecycle_for`); implement this hook only to
    replace that whole dispatch.
    """


@hookspec
def moelora_generate_state_listeners(args: Any) -> list[Any] | None:
    """Return listeners for the rollout lifecycle: objects with any of the five lifecycle methods.

    :param args: the host's parsed arguments.

    Called once per generate state, in the rollout process. Every implementation is called; the
    listeners are called in pluggy's call order (last registered first), each with the generate
    state as first argument: ``on_group_submit(state, group, task)`` and ``reset(state)`` are plain
    calls (``task`` is the ``asyncio.Task`` generating the group: add done callbacks to it);
    ``on_group_selected(state, group)``, ``on_generate_rollout_start(state, rollout_id)`` and
    ``on_generate_rollout_complete(state, rollout_id, completed_samples, aborted_samples)`` may be
    coroutines. This is where per-request adapter routing (multi-LoRA), the true-on-policy gate and
    rollout metrics hook in.
    """


@hookspec
def on_adapter_activated(adapter_name: str, adapter_id: int, version: int, nbytes: int) -> None:
    """Called in an engine worker right after a synced adapter became the one being served.

    :param adapter_name: the stable name requests use.
    :param adapter_id: the engine's integer LoRA id.
    :param version: the sync's sequence number (the trainer's step).
    :param nbytes: bytes received for this sync.

    Every implementation is called; results are ignored. Never called for a sync that failed
    validation: the previous adapter stays active then.
    """
