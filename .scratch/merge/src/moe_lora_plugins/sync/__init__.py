"""Framework-free transport of a LoRA adapter from trainer ranks to rollout-engine workers.

``protocol`` defines the bucket header (sequence number, sender, end marker) and the bucket plan by
bytes; ``assembly`` rebuilds the adapter on the receiver from any number of buckets and senders
(TP / expert-TP / EP pieces, compact shared-expert adapters); ``validation`` checks completeness,
shapes and dtypes before anything is activated; ``transport`` moves buckets over a torch.distributed
group (gloo on the CPU, NCCL on GPUs); ``disk`` is the PEFT-directory fallback.
"""

from moe_lora_plugins.sync.errors import AdapterSyncError, AdapterValidationError, IncompleteSyncError

__all__ = ["AdapterSyncError", "AdapterValidationError", "IncompleteSyncError"]
