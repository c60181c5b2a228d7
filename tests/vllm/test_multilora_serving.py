"""Several adapters served at once by one vLLM engine, each synced under its own stable id.

Two adapters of different ranks (expert adapters included) are synced by real sender processes over
gloo under the ids the multi-LoRA controller gave them, then served in one mixed batch whose requests
carry the tagger's per-request ``LoRARequest``. Each adapter's rows must equal, bitwise, the same mixed
batch served from vLLM's own loading of each adapter's PEFT directory. A second sync of one adapter
leaves the other's rows unchanged; a reused slot gets a new engine id.
"""

from __future__ import annotations

import pytest

from moe_lora_plugins.multilora.controller import AdapterSpec, MultiLoraController
from moe_lora_plugins.multilora.tagging import AdapterRequestTagger

from .conftest import PROMPTS, start_engine, stop_engine, sync_adapter
from .tiny_models import adapter_config, make_adapter, save_peft_dir

pytestmark = pytest.mark.vllm

RANKS = {"math": 2, "copy": 8}
DISK_IDS = {"math": 90, "copy": 91}


@pytest.fixture(scope="module")
def engine(moe_model):
    llm = start_engine(moe_model, max_loras=4)
    yield llm
    stop_engine(llm)


def mixed(llm, requests):
    """Every prompt with every request, in one generate call: rows [(prompt, request), ...]."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for _ in requests for p in PROMPTS]
    lora = [r for r in requests for _ in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=6, logprobs=0, temperature=0), lora_request=lora,
                           use_tqdm=False)
    rows = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
            for o in outputs]
    return [rows[i * len(PROMPTS):(i + 1) * len(PROMPTS)] for i in range(len(requests))]


def from_disk(llm, tmp_path, adapters):
    from vllm.lora.request import LoRARequest

    return [LoRARequest(f"disk-{name}", DISK_IDS[name],
                        save_peft_dir(str(tmp_path / f"{name}-{seed}"), make_adapter(True, rank=RANKS[name], seed=seed),
                                      adapter_config(True, rank=RANKS[name], alpha=2 * RANKS[name])))
            for name, seed in adapters]


def sync(llm, tmp_path, name, lora_int_id, seed, version):
    from moe_lora_plugins.integrations.vllm_worker import receive_adapter

    rank = RANKS[name]
    outcome = sync_adapter(llm, tmp_path, name, lora_int_id, make_adapter(True, rank=rank, seed=seed),
                           adapter_config(True, rank=rank, alpha=2 * rank), version=version,
                           receive=lambda *args: receive_adapter(llm, *args))
    assert outcome.error is None, outcome.error
    return outcome


def test_two_adapters_synced_under_their_own_ids_are_served_concurrently_like_vllms_own_loader(engine, tmp_path):
    controller = MultiLoraController(2)
    tagger = AdapterRequestTagger(controller)
    for name, rank in RANKS.items():
        controller.register(AdapterSpec(name, rank=rank, alpha=2.0 * rank))
        controller.begin_loading(name)
        controller.confirm_trainer(name)
    assert not tagger.can_tag("math")  # no engine sync yet: not ready
    tags = {}
    for seed, name in enumerate(RANKS, start=11):
        sync(engine, tmp_path, name, controller.get(name).engine_id, seed, 1)
        controller.confirm_engine(name, 1)
        tags[name] = tagger.tag(name)
    assert tags["math"].lora_int_id != tags["copy"].lora_int_id

    served = mixed(engine, [tags["math"].lora_request(), tags["copy"].lora_request()])
    disk = mixed(engine, from_disk(engine, tmp_path, [("math", 11), ("copy", 12)]))
    assert served == disk
    assert served[0] != served[1]
    base = mixed(engine, [None])[0]
    assert served[0] != base and served[1] != base

    # A new version of one adapter: the other one's log-probs do not move, and each equals its PEFT directory.
    # Compared one adapter per generate call: in a mixed batch on the CPU the rows of the other adapter moved by
    # ~1e-6 after the swap (a float32 summation-order effect of the batch's LoRA grouping; alone they are
    # bitwise unchanged, which is what this asserts).
    alone_before = {name: mixed(engine, [tag.lora_request()]) for name, tag in tags.items()}
    sync(engine, tmp_path, "math", tags["math"].lora_int_id, 21, 2)
    controller.confirm_engine("math", 2)
    alone_after = {name: mixed(engine, [tag.lora_request()]) for name, tag in tags.items()}
    assert alone_after["copy"] == alone_before["copy"]
    assert alone_after["math"] != alone_before["math"]
    for disk_id in DISK_IDS.values():
        engine.collective_rpc("remove_lora", args=(disk_id,))
    for name, disk_request in zip(("math", "copy"), from_disk(engine, tmp_path, [("math", 21), ("copy", 12)]),
                                  strict=True):
        assert alone_after[name] == mixed(engine, [disk_request]), name
    for disk_id in DISK_IDS.values():
        engine.collective_rpc("remove_lora", args=(disk_id,))

    # Deregister one: its slot goes to the next adapter, which gets a new engine id.
    for tag in tags.values():
        tagger.done(tag)
    controller.deregister("copy")
    assert controller.drain() == ["copy"]
    assert engine.collective_rpc("moelora_remove_adapter", args=("copy",))[0]
    newcomer = controller.register(AdapterSpec("reverse", rank=4, alpha=8.0))
    assert newcomer.slot == tags["copy"].slot and newcomer.engine_id not in {t.lora_int_id for t in tags.values()}
