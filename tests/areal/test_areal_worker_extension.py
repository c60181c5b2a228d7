"""AReaL 1.0.4 (installed from PyPI, --no-deps) with our adapter sync, in one vLLM worker extension class.

A real vLLM CPU engine starts with ``worker_extension_cls=moe_lora_plugins.integrations.areal.
AReaLMoeLoraWorkerExtension``. Through it the engine serves AReaL's own worker methods
(``areal_set_weight_meta_lora``, ``sync``) and our adapter sync from two trainer-stage sender processes; the synced adapter generates bitwise like the same adapter loaded by vLLM's own
loader from a PEFT directory.
"""

from __future__ import annotations

import pytest

from tests.vllm import conftest as helpers  # the vllm lane's helpers (engine start, sender processes)
from tests.vllm import tiny_models

pytestmark = pytest.mark.areal


@pytest.fixture(scope="module")
def engine(areal_engine):
    return areal_engine  # the lane's one engine (tests/areal/conftest.py)


def test_the_composed_class_is_areals_extension_and_ours(engine):
    # (the engine starts first: AReaL imports flask, whose context proxies vLLM's start-up scan trips over)
    from areal.engine.vllm_ext.vllm_worker_extension import VLLMWorkerExtension

    from moe_lora_plugins.integrations.areal import AReaLMoeLoraWorkerExtension
    from moe_lora_plugins.integrations.vllm_worker import MoeLoraWorkerExtension

    assert issubclass(AReaLMoeLoraWorkerExtension, VLLMWorkerExtension)
    assert issubclass(AReaLMoeLoraWorkerExtension, MoeLoraWorkerExtension)


def test_a_method_clash_between_extensions_is_refused_naming_both():
    from moe_lora_plugins.integrations.areal import compose_worker_extension

    class A:
        def sync(self):
            return None

    class B:
        def sync(self):
            return None

    with pytest.raises(TypeError, match="both define 'sync'"):
        compose_worker_extension(A, B)


def test_areals_own_worker_methods_are_served_by_the_composed_extension(engine):
    """AReaL's LoRA update metadata call and its barrier, as AReaL's trainer client issues them. (Its disk
    reload, ``areal_update_weights``, cannot run on vLLM's CPU backend: the CPU linear layers repack their
    weights after loading, and an in-place reload finds empty parameters.)"""
    llm, _ = engine
    meta = ([["model.layers.0.self_attn.q_proj.lora_A.weight"], ["float32"], [[4, 64]], "areal-group", "policy", 1,
             ["q_proj"], 4, 8, "none", "tiny"])
    assert [tuple(r) for r in llm.collective_rpc("areal_set_weight_meta_lora", args=meta)] == [(True, "Success")]
    assert llm.collective_rpc(lambda worker: (worker.areal_lora_name, worker.areal_lora_rank)) == [("policy", 4)]
    assert llm.collective_rpc("sync") == [None]


def test_our_adapter_sync_is_served_like_the_same_adapter_from_a_peft_dir(engine, tmp_path):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request

    llm, _ = engine
    tensors, config = tiny_models.make_adapter(False, seed=5), tiny_models.adapter_config(False)
    outcome = helpers.sync_adapter(llm, tmp_path, "policy", 1, tensors, config, version=1,
                                   sender_options={"via_send_lora_adapter": True})
    assert outcome.error is None, outcome.error
    peft_dir = tiny_models.save_peft_dir(str(tmp_path / "peft"), tensors, config)
    synced = helpers.greedy(llm, lora_request("policy", 1))
    from_disk = helpers.greedy(llm, LoRARequest("policy-from-disk", 2, peft_dir))
    assert synced.tokens == from_disk.tokens
    assert synced.logprobs == from_disk.logprobs
    assert synced.logprobs != helpers.greedy(llm).logprobs
