"""``moe-lora-plugins demo``: one real MoE LoRA RL run on the CPU, end to end.

A tiny Qwen3-MoE is made locally; a Megatron-Bridge trainer (several gloo processes, EP x PP) and a
vLLM engine with LoRA run a few GRPO-style steps on a verifiable toy task, the adapter flowing from
trainer to engine after every step through this suite's export, adapter formats and sync. Importing
this package imports nothing heavy.
"""
