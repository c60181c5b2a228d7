"""A plugin from the ``moelora.plugins`` entry point transforms a synced adapter, and vLLM serves the transform.

Two trainer-stage sender processes have the recorder plugin installed
(``moe_lora_plugins.testing.plugin_site``, scaling every tensor by 2) and send an adapter dict
through ``send_lora_adapter``. The engine's generation with the synced adapter must be bitwise the
generation with the doubled adapter loaded by vLLM's own loader from a PEFT directory, and the
plugin's record must list every tensor sent, once.
"""

from __future__ import annotations

import pytest

from moe_lora_plugins.testing.plugin_site import (
    RECORD_ENV,
    SCALE_ENV,
    build_export_recorder_site,
    read_record,
)

from .conftest import greedy, sync_adapter
from .tiny_models import adapter_config, make_adapter, save_peft_dir

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(dense_engine):
    return dense_engine


def test_the_engine_serves_what_the_plugin_made_of_the_adapter(engine, tmp_path):
    from vllm.lora.request import LoRARequest

    from moe_lora_plugins.integrations.vllm_worker import lora_request

    tensors, config = make_adapter(False, seed=21), adapter_config(False)
    site = build_export_recorder_site(tmp_path)
    record = tmp_path / "record.jsonl"
    outcome = sync_adapter(engine, tmp_path, "transformed", 5, tensors, config, version=1,
                           sender_options={"via_send_lora_adapter": True},
                           sender_env={SCALE_ENV: "2", RECORD_ENV: str(record)}, sender_path=str(site))
    assert outcome.error is None, outcome.error
    seen = read_record(record)
    assert sorted(r["name"] for r in seen) == sorted(tensors)  # every tensor, once, over both senders
    assert {r["kind"] for r in seen} == {"adapter"}
    doubled = save_peft_dir(str(tmp_path / "doubled"), {k: v * 2 for k, v in tensors.items()}, config)
    original = save_peft_dir(str(tmp_path / "original"), tensors, config)
    synced = greedy(engine, lora_request("transformed", 5))
    from_doubled = greedy(engine, LoRARequest("doubled-from-disk", 6, doubled))
    from_original = greedy(engine, LoRARequest("original-from-disk", 7, original))
    for lora_id in (6, 7):
        engine.collective_rpc("remove_lora", args=(lora_id,))
    engine.collective_rpc("moelora_remove_adapter", args=("transformed",))
    assert synced.logprobs == from_doubled.logprobs  # bitwise: the plugin's transform is what is served
    assert synced.logprobs != from_original.logprobs
