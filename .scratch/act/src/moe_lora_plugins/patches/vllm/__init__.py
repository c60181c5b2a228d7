"""Patches of vLLM: tensor-based LoRA loading, the CPU MoE-LoRA expert path, the LoRA index -1 fix."""
