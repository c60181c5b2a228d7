"""Framework-free LoRA adapter math: Megatron <-> PEFT naming and tensors, engine formats, the wire form.

Nothing here imports megatron, vllm or sglang (torch and safetensors only), except
:mod:`moe_lora_plugins.lora.export`, which reads a live Megatron model.
"""
