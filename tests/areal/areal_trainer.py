"""An AReaL trainer rank, as a separate process: AReaL's own rollout client and weight-update group,
then LoRA weight updates through ``moe_lora_plugins.integrations.areal.send_adapter_update``.

It does what AReaL 1.0.4's ``MegatronEngine._init_weight_update_from_distributed`` does on the
trainer's pipeline head (``rollout_engine.init_weights_update_group(meta)`` while joining the group
as rank 0 with ``areal.engine.core.distributed.init_custom_process_group``), then one update per job
entry. Prints one JSON line per update: ``{"version": v, "error": null | "..."}``.
"""

from __future__ import annotations

import json
import logging
import sys


def main(job_file: str) -> None:
    with open(job_file) as f:
        job = json.load(f)
    from areal.api import WeightUpdateMeta
    from areal.api.alloc_mode import ModelAllocation
    from areal.api.cli_args import InferenceEngineConfig
    from areal.engine.core.distributed import init_custom_process_group
    from areal.engine.vllm_remote import RemotevLLMEngine
    from safetensors.torch import load_file

    from moe_lora_plugins.integrations.areal import send_adapter_update

    rollout = RemotevLLMEngine(InferenceEngineConfig(request_timeout=job["timeout_s"]))
    # initialize() would also start AReaL's rollout workflow executor; the weight-update calls only
    # need the server addresses and a logger.
    rollout._engine.addresses = [job["server"]]
    rollout._engine.logger = logging.getLogger("areal-trainer")

    meta = WeightUpdateMeta(type="xccl", gen_allocation=ModelAllocation.from_str("vllm:d1"),
                            nccl_master_address="127.0.0.1", nccl_master_port=job["port"],
                            nccl_group_name=job["group"], use_lora=True, lora_name=job["lora_name"],
                            lora_int_id=job["lora_int_id"], base_model_name=job["base_model"])
    init = rollout.init_weights_update_group(meta)
    group = init_custom_process_group(backend="gloo", world_size=2, init_method=f"tcp://127.0.0.1:{job['port']}",
                                      rank=0, group_name=job["group"])
    init.result()
    for update in job["updates"]:
        meta.version = update["version"]
        try:
            send_adapter_update(rollout, group, meta, load_file(update["adapter"]), config=job["config"],
                                bucket_bytes=4096)
            error = None
        except Exception as exc:  # reported to the test
            error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"version": update["version"], "error": error}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
