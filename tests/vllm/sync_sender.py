"""A trainer-side sender process for the vLLM sync tests: one pipeline stage's share of an adapter.

Run as ``python sync_sender.py <job.json>``. The job names the rendezvous, this sender's group rank
and sender number, the receivers, the adapter file and which layers this stage owns, the bucket
size, and a ``fault`` to inject on the wire (``duplicate_bucket``, ``stop_before_end``) or none.
With ``megatron`` the file holds Megatron-named LoRA tensors that the sender converts with the
export's converter and sends through ``moe_lora_plugins.sync.sender.send_lora_adapter``.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main(job_path: str) -> None:
    from safetensors.torch import load_file

    from moe_lora_plugins.lora.wire import encode
    from moe_lora_plugins.sync import transport
    from moe_lora_plugins.sync.protocol import AdapterPiece, BucketHeader
    from moe_lora_plugins.sync.sender import send_lora_adapter
    from moe_lora_plugins.sync.transport import new_sync_group, pieces_from_wire, send_adapter

    with open(job_path) as f:
        job = json.load(f)
    tensors = load_file(job["adapter"])
    layers = set(job["layers"])
    group = new_sync_group(job["host"], job["port"], job["rank"], job["world_size"], "gloo", job.get("timeout_s", 60))
    if job.get("megatron"):
        # What a trainer rank does: convert its exported Megatron LoRA, send its pipeline stage's layers.
        sys.path.insert(0, os.path.dirname(__file__))
        from tiny_models import megatron_to_lora_adapter

        adapter = megatron_to_lora_adapter(tensors, alpha=job["megatron"]["alpha"])
        report = send_lora_adapter(adapter, group, job["receivers"], sender=job["sender"], version=job["version"],
                                   layers=layers, bucket_bytes=job["bucket_bytes"])
        print(json.dumps({"buckets": report.buckets, "payload_bytes": report.payload_bytes}), flush=True)
        return
    mine = {k: v for k, v in tensors.items() if int(k.split(".layers.")[1].split(".")[0]) in layers}
    mine = {k: v for k, v in mine.items() if not any(part in k for part in job.get("drop", ()))}
    if job.get("via_send_lora_adapter"):
        # What a trainer rank does with an adapter dict: the sender (and every export plugin) sends it.
        report = send_lora_adapter(mine, group, job["receivers"], sender=job["sender"], version=job["version"],
                                   bucket_bytes=job["bucket_bytes"], config=job["config"], compact=False)
        print(json.dumps({"buckets": report.buckets, "payload_bytes": report.payload_bytes}), flush=True)
        return
    if "dtype" in job:
        mine = {k: v.to(getattr(torch, job["dtype"])) for k, v in mine.items()}
    if job.get("compact_shared_experts"):
        # The compact wire form: a tensor shared by every expert travels once.
        pieces = pieces_from_wire(encode(mine, dedupe="content"))
    else:
        pieces = [AdapterPiece(k, v) for k, v in sorted(mine.items())]
    fault = job.get("fault")
    if fault in ("stop_before_end", "duplicate_bucket"):
        manifest, payload = transport.pack_bucket(pieces[:1])
        header = BucketHeader(job["version"], 0, job["sender"], False, 0, int(payload.numel()))
        copies = 2 if fault == "duplicate_bucket" else 1
        for _ in range(copies):
            transport.send_bucket(group, job["receivers"], header, manifest, payload, "cpu")
        os._exit(0)
    else:
        report = send_adapter(pieces, group, job["receivers"], sender=job["sender"], version=job["version"],
                              bucket_bytes=job["bucket_bytes"], config=job["config"])
        print(json.dumps({"buckets": report.buckets, "payload_bytes": report.payload_bytes}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
