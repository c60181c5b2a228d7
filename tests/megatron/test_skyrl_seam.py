"""SkyRL's Megatron build sequence, replayed on real Megatron-Bridge 0.6.2, reaches this suite through
``integrations.skyrl``.

SkyRL itself cannot be installed next to Megatron-Bridge 0.6.2 (examples/skyrl/README.md), so this test
replays the calls its worker makes, read in the ``skyrl`` 0.4.0 wheel (PyPI),
``skyrl/backends/skyrl_train/workers/megatron/megatron_worker.py``:

- ``MegatronPolicyWorkerBase.init_model`` / ``MegatronRefWorkerBase.init_model``: ``init_configs`` then
  ``make_megatron_module`` (policy: LoRA when ``policy.model.lora.rank > 0``, DDP unless
  ``policy.inference_only_init``; ref: no LoRA, no DDP);
- ``MegatronWorker.init_configs``: ``AutoBridge`` -> ``to_megatron_provider()`` -> parallel sizes -> the
  MoE fields from ``megatron_config`` (dispatcher, load balancing, aux-loss coefficient, router dtype,
  grouped GEMM, score function and expert bias only when not ``None``, routing replay) -> every
  ``transformer_config_kwargs`` key -> ``provider.finalize()``;
- ``MegatronWorker.configure_lora`` + ``make_megatron_module``: Megatron-Bridge's ``LoRA(target_modules,
  dim, alpha, dropout, lora_A_init_method, lora_B_init_method="zero", exclude_modules, lora_dtype,
  experts_shared_outer_loras, normalize_moe_lora, share_expert_adapters)``; a pre-wrap hook that calls it
  with ``training=True`` and then ``set_params_to_save``; ``provider.register_pre_wrap_hook(hook)``;
  ``provider.provide_distributed_model(ddp_config=..., wrap_with_ddp=..., bf16=...)``.

CPU deviations, as in every megatron-lane test: the tiny HF config instead of ``from_hf_pretrained``, the
local (non-TE) layer spec, fusions off, ``use_cpu_initialization=True``, the allgather dispatcher and no
grouped GEMM (SkyRL's defaults ``alltoall`` / grouped GEMM need CUDA / Transformer Engine), hence
``variable_seq_lengths`` left unset (Megatron-Core refuses it with allgather).

Checked: without ``integrations.skyrl`` nothing of ours runs; with a worker class wrapped by
``moe_lora_worker``, ``on_build_model`` runs once per built model after SkyRL's LoRA hook (SkyRL's
adapters are there, none added), the MoE settings SkyRL resolves (``transformer_config_kwargs``
included) are the declared ones and on the finalized provider, the reference model has no LoRA, and the
patched adapter export of the SkyRL-built actor equals, name by name and bitwise, the export of the
suite's own world-size-1 tiny build with the same LoRA: at world size 1 and on both ranks of
expert-parallel 2 (gloo, 2 processes), where SkyRL's build without the integration misses the other
rank's experts.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from moe_lora_plugins.hooks import hookimpl
from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.tiny_models import compare_exports, tiny_qwen3_moe_config

pytestmark = pytest.mark.megatron

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
MOE_FIELDS = ("moe_token_dispatcher_type", "moe_router_load_balancing_type", "moe_grouped_gemm",
              "moe_router_score_function", "moe_router_enable_expert_bias")


def _megatron_config(**overrides: Any) -> dict[str, Any]:
    """SkyRL 0.4.0's ``MegatronConfig`` fields the worker reads, CPU-buildable values."""
    values: dict[str, Any] = dict(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=1,
        expert_model_parallel_size=1, expert_tensor_parallel_size=1,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", moe_grouped_gemm=False,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=None, moe_enable_routing_replay=False,
        # a transformer_config_kwargs key wins over the field above (SkyRL applies them after it)
        transformer_config_kwargs={"moe_router_load_balancing_type": "aux_loss"},
        lora_config={"lora_type": "lora", "merge_lora": False, "experts_shared_outer_loras": False,
                     "normalize_moe_lora": False},
    )
    values.update(overrides)
    return values


def skyrl_trainer_cfg(**megatron_overrides: Any) -> dict[str, Any]:
    """The ``trainer`` section SkyRL hands its workers as ``self.cfg``: policy as a dict tree (how an OmegaConf
    node reads), ref as an attribute tree (how SkyRL's dataclasses read)."""
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS, "exclude_modules": None,
            "init_method": "kaiming", "share_expert_adapters": False}
    return {
        "bf16": False,
        "policy": {"model": {"lora": lora}, "inference_only_init": True,
                   "megatron_config": _megatron_config(**megatron_overrides)},
        "ref": SimpleNamespace(model=SimpleNamespace(lora=SimpleNamespace(rank=0)),
                               megatron_config=SimpleNamespace(**_megatron_config(**megatron_overrides))),
    }


def _attr(node: Any, key: str) -> Any:
    return node[key] if isinstance(node, dict) else getattr(node, key)


class ReplayedMegatronWorker:
    """SkyRL 0.4.0's ``MegatronWorker.init_configs`` / ``make_megatron_module`` call sequence (see the module
    docstring), on a tiny HF config."""

    section = "policy"

    def __init__(self, cfg: dict[str, Any], hf_config: Any) -> None:
        self.cfg = cfg
        self.hf_config = hf_config

    def init_configs(self, megatron_config: Any, transformer_config_kwargs: dict[str, Any]) -> None:
        from megatron.bridge import AutoBridge
        from megatron.bridge.models.gpt_provider import local_layer_spec

        bridge = AutoBridge.from_hf_config(self.hf_config)
        provider = bridge.to_megatron_provider(load_weights=False)
        provider.transformer_layer_spec = local_layer_spec  # CPU deviation
        for name in ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
                     "apply_rope_fusion", "gradient_accumulation_fusion", "moe_permute_fusion",
                     "cross_entropy_loss_fusion"):
            if hasattr(provider, name):
                setattr(provider, name, False)
        m = lambda key: _attr(megatron_config, key)  # noqa: E731
        provider.tensor_model_parallel_size = m("tensor_model_parallel_size")
        provider.pipeline_model_parallel_size = m("pipeline_model_parallel_size")
        provider.context_parallel_size = m("context_parallel_size")
        provider.expert_model_parallel_size = m("expert_model_parallel_size")
        provider.expert_tensor_parallel_size = m("expert_tensor_parallel_size")
        provider.sequence_parallel = m("tensor_model_parallel_size") > 1
        # SkyRL sets variable_seq_lengths=True here, which Megatron-Core allows only with the alltoall / flex
        # dispatchers; those need CUDA at construction, so the CPU replay keeps allgather and leaves it unset.
        provider.moe_token_dispatcher_type = m("moe_token_dispatcher_type")
        provider.moe_router_load_balancing_type = m("moe_router_load_balancing_type")
        provider.moe_aux_loss_coeff = m("moe_aux_loss_coeff")
        provider.moe_router_dtype = m("moe_router_dtype")
        provider.moe_grouped_gemm = m("moe_grouped_gemm")
        if m("moe_router_score_function") is not None:
            provider.moe_router_score_function = m("moe_router_score_function")
        if m("moe_router_enable_expert_bias") is not None:
            provider.moe_router_enable_expert_bias = m("moe_router_enable_expert_bias")
        provider.moe_enable_routing_replay = m("moe_enable_routing_replay")
        for key, value in transformer_config_kwargs.items():
            setattr(provider, key, value)
        provider.finalize()
        self.provider, self.bridge = provider, bridge

    def make_megatron_module(self, wrap_with_ddp: bool, lora_config: Any = None, lora_type: str = "lora",
                             experts_shared_outer_loras: bool = False, bf16: bool = False) -> list[Any]:
        import torch
        from megatron.bridge.peft.lora import LoRA
        from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig

        if lora_config is not None:
            assert lora_type == "lora"
            mlora = _attr(_attr(self.cfg["policy"], "megatron_config"), "lora_config")
            self.lora_cls = LoRA(
                target_modules=lora_config["target_modules"], dim=lora_config["rank"], alpha=lora_config["alpha"],
                dropout=lora_config["dropout"], lora_A_init_method=lora_config["init_method"],
                lora_B_init_method="zero", exclude_modules=lora_config["exclude_modules"] or [],
                lora_dtype=torch.bfloat16 if self.cfg["bf16"] else torch.float32,
                experts_shared_outer_loras=experts_shared_outer_loras,
                normalize_moe_lora=mlora["normalize_moe_lora"],
                share_expert_adapters=lora_config["share_expert_adapters"],
            )

            def lora_pre_wrap_hook(model: list[Any]) -> list[Any]:
                lora_model = self.lora_cls(model, training=True)
                self.lora_cls.set_params_to_save(lora_model)
                return lora_model

            self.provider.register_pre_wrap_hook(lora_pre_wrap_hook)
        ddp_config = DistributedDataParallelConfig()
        if wrap_with_ddp:
            ddp_config.use_distributed_optimizer = True
        return list(self.provider.provide_distributed_model(ddp_config=ddp_config, wrap_with_ddp=wrap_with_ddp,
                                                            bf16=bf16, use_cpu_initialization=True))


class ReplayedPolicyWorker(ReplayedMegatronWorker):
    """``MegatronPolicyWorkerBase.init_model``'s build calls."""

    def init_model(self) -> None:
        policy = self.cfg["policy"]
        megatron = policy["megatron_config"]
        self.init_configs(megatron, megatron["transformer_config_kwargs"])
        is_lora = policy["model"]["lora"]["rank"] > 0
        self.actor_module = self.make_megatron_module(
            wrap_with_ddp=not policy["inference_only_init"],
            lora_config=policy["model"]["lora"] if is_lora else None,
            lora_type=megatron["lora_config"]["lora_type"],
            experts_shared_outer_loras=megatron["lora_config"]["experts_shared_outer_loras"],
            bf16=self.cfg["bf16"],
        )


class ReplayedRefWorker(ReplayedMegatronWorker):
    """``MegatronRefWorkerBase.init_model``'s build calls."""

    def init_model(self) -> None:
        megatron = self.cfg["ref"].megatron_config
        self.init_configs(megatron, megatron.transformer_config_kwargs)
        self.actor_module = self.make_megatron_module(wrap_with_ddp=False, bf16=self.cfg["bf16"])


class BuildProbe:
    """A plugin recording each ``on_build_model`` call: role, provider, and whether LoRA was already there."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    @hookimpl
    def on_build_model(self, model_chunks: list[Any], provider: Any, role: str, config: Any) -> None:
        adapters = [n for c in model_chunks for n, _ in c.named_modules() if n.endswith(".adapter")]
        self.calls.append({"role": role, "provider": id(provider), "adapters_before_ours": len(adapters),
                           "lora_enabled": bool(config.lora and config.lora.enabled)})


def _summary(chunks: list[Any]) -> dict[str, Any]:
    adapters = sorted(n for c in chunks for n, _ in c.named_modules() if n.endswith(".adapter"))
    return {"adapters": adapters, "nested": [n for n in adapters if ".adapter." in n],
            "trainable": sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)}


def seam_worker(hf_config: Any) -> dict[str, Any]:
    from megatron.core import parallel_state

    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu

    prepare_megatron_cpu()
    if not parallel_state.model_parallel_is_initialized():  # SkyRL's MegatronStrategy.setup_distributed
        parallel_state.initialize_model_parallel()
    import torch

    from moe_lora_plugins.hooks.build import build_config, set_build_config
    from moe_lora_plugins.hooks.manager import get_plugin_manager
    from moe_lora_plugins.integrations.skyrl import moe_lora_worker
    from moe_lora_plugins.testing.tiny_models import (
        WORLD_SIZE_1,
        BuiltModel,
        LoraSettings,
        build_lora_model,
        compare_exports,
        fill_from_global_names,
        run_export,
    )

    probe = BuildProbe()
    get_plugin_manager().register(probe, name="skyrl-seam-probe")
    out: dict[str, Any] = {}

    # 1. SkyRL as it is: no integration call.
    torch.manual_seed(1234)
    plain = ReplayedPolicyWorker(skyrl_trainer_cfg(), hf_config)
    plain.init_model()
    out["without"] = {"calls": list(probe.calls), "declared": build_config() is not None,
                      "summary": _summary(plain.actor_module)}

    # 2. The policy worker class wrapped by moe_lora_worker: init_model declares the build first.
    policy_cls = moe_lora_worker(ReplayedPolicyWorker, role="policy")
    torch.manual_seed(1234)
    policy = policy_cls(skyrl_trainer_cfg(), hf_config)
    policy.init_model()
    declared = build_config()
    out["policy"] = {
        "calls": [dict(c, same_provider=c["provider"] == id(policy.provider)) for c in probe.calls],
        "class": policy_cls.__name__,
        "default_role": declared.default_role,
        "declared_moe": {f: getattr(declared.moe_runtime, f) for f in
                         ("token_dispatcher_type", "router_load_balancing_type", "grouped_gemm",
                          "router_score_function", "router_enable_expert_bias")},
        "provider_moe": {f: getattr(policy.provider, f) for f in MOE_FIELDS},
        "lora": (declared.lora.enabled, declared.lora.rank, declared.lora.alpha, declared.lora.target_modules,
                 declared.lora.expert_adapters, declared.lora.sync_mode),
        "summary": _summary(policy.actor_module),
    }

    # The patched adapter export of the SkyRL-built actor vs the suite's own tiny build with the same LoRA.
    skyrl_built = BuiltModel(bridge=policy.bridge, provider=policy.provider, model=policy.actor_module,
                             layout=WORLD_SIZE_1, lora=policy.lora_cls)
    fill_from_global_names(skyrl_built)
    skyrl_export = run_export(skyrl_built, "adapter")
    set_build_config(None)  # the reference build below is the suite's own, without a declared build
    reference = build_lora_model(hf_config, lora=LoraSettings(dim=4, alpha=8, target_modules=tuple(TARGETS),
                                                                 share_expert_adapters=False))
    fill_from_global_names(reference)
    reference_export = run_export(reference, "adapter")
    comparison = compare_exports(reference_export, skyrl_export, label="skyrl")
    out["export"] = {"names": sorted(n for n, _ in skyrl_export), "equal": comparison.equal,
                     "reference": reference_export,
                     "summary": comparison.summary(), "reference_summary": _summary(reference.model)}

    # 3. The reference worker, wrapped: role "reference", no LoRA.
    probe.calls.clear()
    ref = moe_lora_worker(ReplayedRefWorker, role="ref")(skyrl_trainer_cfg(), hf_config)
    ref.init_model()
    out["ref"] = {"calls": list(probe.calls), "default_role": build_config().default_role,
                  "summary": _summary(ref.actor_module)}

    # 4. Expert bias on the HF config's softmax router: refused at SkyRL's finalize() by our patch.
    from moe_lora_plugins.trainer.moe_runtime import MoeRuntimeConfigError

    bias_cfg = skyrl_trainer_cfg(moe_router_score_function=None, moe_router_enable_expert_bias=True)
    try:
        moe_lora_worker(ReplayedPolicyWorker, role="policy")(bias_cfg, hf_config).init_model()
        out["bias_on_softmax"] = None
    except MoeRuntimeConfigError as exc:
        out["bias_on_softmax"] = str(exc)
    set_build_config(None)
    get_plugin_manager().unregister(name="skyrl-seam-probe")
    return out


def ep2_export_worker(hf_config: Any) -> dict[str, Any]:
    """SkyRL's policy build at expert-parallel 2: the adapter export of SkyRL as it is, then of the worker
    wrapped by ``moe_lora_worker`` (whose ``init_model`` activates the suite and declares the build)."""
    import torch
    from megatron.core import parallel_state

    from moe_lora_plugins.hooks.build import set_build_config
    from moe_lora_plugins.integrations.skyrl import moe_lora_worker
    from moe_lora_plugins.testing.megatron_cpu import prepare_megatron_cpu
    from moe_lora_plugins.testing.tiny_models import (
        BuiltModel,
        ParallelLayout,
        fill_from_global_names,
        run_export,
    )

    prepare_megatron_cpu()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)  # MegatronStrategy.setup_distributed
    out: dict[str, Any] = {}
    for phase, worker_cls in (("upstream", ReplayedPolicyWorker),
                              ("patched", moe_lora_worker(ReplayedPolicyWorker, role="policy"))):
        torch.manual_seed(1234)
        worker = worker_cls(skyrl_trainer_cfg(expert_model_parallel_size=2), hf_config)
        worker.init_model()
        built = BuiltModel(bridge=worker.bridge, provider=worker.provider, model=worker.actor_module,
                           layout=ParallelLayout(ep=2), lora=worker.lora_cls)
        fill_from_global_names(built)
        out[phase] = run_export(built, "adapter")
    set_build_config(None)
    return out


@pytest.fixture(scope="module")
def outcome() -> dict[str, Any]:
    return run_distributed(seam_worker, 1, (tiny_qwen3_moe_config(num_experts=4),), timeout_s=600)[0]


@pytest.fixture(scope="module")
def ep2() -> list[dict[str, Any]]:
    return run_distributed(ep2_export_worker, 2, (tiny_qwen3_moe_config(num_experts=4),), timeout_s=600)


def test_without_the_integration_nothing_of_ours_runs(outcome):
    without = outcome["without"]
    assert without["calls"] == [] and without["declared"] is False
    assert without["summary"]["adapters"]  # SkyRL's own LoRA hook still ran


def test_on_build_model_runs_once_per_built_model_after_skyrls_lora_hook(outcome):
    policy = outcome["policy"]
    assert policy["class"] == "MoeLoraReplayedPolicyWorker" and policy["default_role"] == "actor"
    assert len(policy["calls"]) == 1
    call = policy["calls"][0]
    assert call["role"] == "actor" and call["same_provider"] and call["lora_enabled"]
    # SkyRL's hook ran first: its adapters were there when ours ran, and lora_actor added none.
    assert call["adapters_before_ours"] == len(policy["summary"]["adapters"]) > 0
    assert policy["summary"] == outcome["without"]["summary"]
    assert policy["summary"]["nested"] == []


def test_the_declared_lora_is_read_from_skyrls_config(outcome):
    assert outcome["policy"]["lora"] == (True, 4, 8, tuple(TARGETS), "per-expert", "adapter")


def test_the_moe_settings_skyrl_resolves_are_declared_and_on_the_finalized_provider(outcome):
    policy = outcome["policy"]
    # transformer_config_kwargs' aux_loss wins over megatron_config's seq_aux_loss, in SkyRL and in ours
    assert policy["declared_moe"] == {"token_dispatcher_type": "allgather", "router_load_balancing_type": "aux_loss",
                                      "grouped_gemm": False, "router_score_function": "sigmoid",
                                      "router_enable_expert_bias": None}
    assert policy["provider_moe"] == {"moe_token_dispatcher_type": "allgather",
                                      "moe_router_load_balancing_type": "aux_loss", "moe_grouped_gemm": False,
                                      "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": False}


def test_the_reference_model_gets_no_lora(outcome):
    ref = outcome["ref"]
    assert ref["default_role"] == "reference"
    assert [(c["role"], c["adapters_before_ours"]) for c in ref["calls"]] == [("reference", 0)]
    assert ref["summary"]["adapters"] == []


def test_expert_bias_on_a_softmax_router_is_refused_at_skyrls_finalize(outcome):
    message = outcome["bias_on_softmax"]
    assert message is not None and "moe_router_score_function='softmax'" in message and "sigmoid" in message


def test_the_patched_adapter_export_of_the_skyrl_built_actor_equals_the_suites_own_build(outcome):
    export = outcome["export"]
    assert export["equal"], export["summary"]
    assert export["reference_summary"]["adapters"] == outcome["policy"]["summary"]["adapters"]
    names = export["names"]
    for expert in range(4):  # per-expert adapters, HF-named, for every expert of every layer
        for layer in range(4):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}."
            assert any(n.startswith(prefix + "gate_proj") for n in names), prefix
            assert any(n.startswith(prefix + "down_proj") for n in names), prefix


def test_under_expert_parallel_2_the_patched_export_of_skyrls_build_equals_world_size_1(outcome, ep2):
    reference = outcome["export"]["reference"]
    for rank, result in enumerate(ep2):
        compare_exports(reference, result["patched"], f"skyrl ep2 rank {rank} adapter").assert_equal()
    # SkyRL's build without the integration: upstream's export misses the other rank's experts
    missing = compare_exports(reference, ep2[0]["upstream"]).missing
    assert missing and {int(n.split(".experts.")[1].split(".")[0]) for n in missing} == {2, 3}


def _cfg(**lora: Any) -> dict[str, Any]:
    cfg = skyrl_trainer_cfg()
    cfg["policy"]["model"]["lora"].update(lora)
    return cfg


@pytest.mark.parametrize(("cfg", "named"), [
    (_cfg(rank=-1), ["trainer.policy.model.lora.rank=-1", "positive integer"]),
    (_cfg(alpha=0), ["trainer.policy.model.lora.alpha", "0"]),
    (_cfg(dropout=1.5), ["trainer.policy.model.lora.dropout", "[0, 1)"]),
    (_cfg(target_modules=[]), ["trainer.policy.model.lora.target_modules", "all-linear"]),
    (_cfg(exclude_modules=["*.linear_fc2"]), ["exclude_modules", "plain module names"]),
])
def test_bad_lora_values_are_refused_naming_the_skyrl_key_and_the_fix(cfg, named):
    from moe_lora_plugins.hooks.build import build_config
    from moe_lora_plugins.integrations.skyrl import declare_skyrl_build

    with pytest.raises(ValueError) as info:
        declare_skyrl_build(cfg, "policy")
    for text in named:
        assert text in str(info.value), str(info.value)
    assert build_config() is None


def test_canonical_lora_and_a_bad_moe_value_are_refused():
    from moe_lora_plugins.integrations.skyrl import declare_skyrl_build

    cfg = skyrl_trainer_cfg()
    cfg["policy"]["megatron_config"]["lora_config"]["lora_type"] = "canonical_lora"
    with pytest.raises(ValueError, match="lora_type='canonical_lora'.*set lora_type=lora"):
        declare_skyrl_build(cfg, "policy")
    cfg = skyrl_trainer_cfg()
    cfg["policy"]["megatron_config"]["transformer_config_kwargs"] = {"moe_token_dispatcher_type": "all2all"}
    with pytest.raises(ValueError, match=r"(?s)trainer.policy.megatron_config.*'all2all'.*alltoall"):
        declare_skyrl_build(cfg, "policy")
    with pytest.raises(ValueError, match="role='actor'"):
        declare_skyrl_build(skyrl_trainer_cfg(), "actor")


def test_exclude_modules_drops_plain_targets():
    from moe_lora_plugins.integrations.skyrl import lora_config_from_skyrl

    lora = lora_config_from_skyrl(_cfg(target_modules="all-linear", exclude_modules=["linear_fc2"]))
    assert set(lora.target_modules) == {"linear_qkv", "linear_proj", "linear_fc1"}
