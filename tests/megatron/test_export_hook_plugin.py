"""A plugin installed through the ``moelora.plugins`` entry point sees every tensor that leaves the trainer.

Real Megatron-Bridge exports of a tiny Qwen3-MoE with LoRA, at EP=2, patched: the plain export, the
adapter export, the bridge's merged export, our merge-on-export and the adapter handed to the sync
sender. The plugin (``moe_lora_plugins.testing.plugin_site``) records every item and, in a second
pass, doubles every tensor: each stream must then be exactly twice the first pass's, the record must
list the stream's names in order, once each, with the stream's kind, and the streams a merged export
reads internally must not be shown to the plugin as well.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from moe_lora_plugins.testing.distributed import run_distributed
from moe_lora_plugins.testing.plugin_site import (
    RECORD_ENV,
    SCALE_ENV,
    build_export_recorder_site,
    read_record,
)
from moe_lora_plugins.testing.tiny_models import ParallelLayout, tiny_qwen3_moe_config

pytestmark = pytest.mark.megatron

STREAMS = ("full", "adapter", "bridge_merged", "merge_on_export", "sync")


def export_hook_worker(hf_config: Any, site: str, record_dir: str) -> dict[str, Any]:
    """Every stream twice (plugin watching, then doubling); what left and what the plugin recorded."""
    import importlib

    import torch
    import torch.distributed as dist

    sys.path.insert(0, site)
    importlib.invalidate_caches()
    import moe_lora_plugins

    moe_lora_plugins.activate(role="trainer")
    from moe_lora_plugins.hooks.manager import get_plugin_manager, loaded_plugin_names
    from moe_lora_plugins.merge.bridge_export import stream_merged_hf_weights
    from moe_lora_plugins.sync.sender import hooked_adapter_tensors
    from moe_lora_plugins.testing.tiny_models import build_lora_model, fill_from_global_names

    built = build_lora_model(hf_config, ParallelLayout(ep=2), dtype=torch.float32)
    fill_from_global_names(built)
    bridge, model = built.bridge, built.model
    runs: dict[str, Any] = {
        "full": lambda: bridge.export_hf_weights(model, cpu=True, show_progress=False, merge_adapter_weights=False),
        "adapter": lambda: bridge.export_adapter_weights(model, cpu=True, show_progress=False),
        "bridge_merged": lambda: bridge.export_hf_weights(model, cpu=True, show_progress=False,
                                                          merge_adapter_weights=True),
        "merge_on_export": lambda: stream_merged_hf_weights(bridge, model, scale=2.0),
        "sync": lambda: hooked_adapter_tensors(bridge.export_adapter_weights(model, cpu=True, show_progress=False)).items(),
    }
    rank = dist.get_rank()
    out: dict[str, Any] = {"plugins": loaded_plugin_names(get_plugin_manager())}
    for scale in ("1", "2"):
        os.environ[SCALE_ENV] = scale
        for stream, run in runs.items():
            record = os.path.join(record_dir, f"{stream}-x{scale}-rank{rank}.jsonl")
            os.environ[RECORD_ENV] = record
            items = [(item[0], item[1].detach().clone()) for item in run()]
            out[(stream, scale)] = {"items": items, "record": read_record(record)}
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-hook")
    site = build_export_recorder_site(tmp)
    records = tmp / "records"
    records.mkdir()
    return run_distributed(export_hook_worker, 2, (tiny_qwen3_moe_config(num_experts=4), str(site), str(records)),
                           timeout_s=600)


def test_the_entry_point_plugin_is_loaded_on_every_rank(exports):
    assert all("export_recorder" in rank["plugins"] for rank in exports)


@pytest.mark.parametrize("stream", STREAMS)
def test_the_plugin_sees_every_tensor_of_the_stream_in_order_once(exports, stream):
    kind = {"full": "full", "adapter": "adapter", "bridge_merged": "merged", "merge_on_export": "merged",
            "sync": "adapter"}[stream]
    for rank in exports:
        for scale in ("1", "2"):
            run = rank[(stream, scale)]
            seen = [(r["kind"], r["name"]) for r in run["record"]]
            names = [name for name, _ in run["items"]]
            if stream == "sync":  # the sender gives the names PEFT's prefix after the chain
                seen = [(k, "base_model.model." + n) for k, n in seen]
            assert seen == [(kind, name) for name in names], (stream, scale)
            assert [r["position"] for r in run["record"]] == list(range(len(names)))
            assert len(set(names)) == len(names)


def test_a_merged_export_shows_the_plugin_the_merged_tensors_not_the_exports_it_reads(exports):
    for rank in exports:
        for stream in ("bridge_merged", "merge_on_export"):
            kinds = {r["kind"] for r in rank[(stream, "1")]["record"]}
            assert kinds == {"merged"}, (stream, kinds)


@pytest.mark.parametrize("stream", STREAMS)
def test_the_plugins_transform_is_what_leaves_the_trainer(exports, stream):
    import torch

    for rank in exports:
        watched = dict(rank[(stream, "1")]["items"])
        doubled = dict(rank[(stream, "2")]["items"])
        assert watched.keys() == doubled.keys()
        assert watched, stream
        for name, tensor in watched.items():
            assert torch.equal(doubled[name], tensor * 2), (stream, name)
