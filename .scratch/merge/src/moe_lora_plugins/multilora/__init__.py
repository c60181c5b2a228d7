"""Several LoRA adapters trained at once on one frozen MoE base: controller and lifecycle
(:mod:`.controller`), per-sample routing math (:mod:`.routing`), per-adapter checkpoints
(:mod:`.checkpoint`), request tags for the rollout side (:mod:`.tagging`). The Megatron glue lives in
:mod:`.megatron` and :mod:`.trainer` (imported only where Megatron is installed)."""
