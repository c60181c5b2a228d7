"""Reusable test support: the patch contract runner (``contract``), Megatron on the CPU without
Transformer Engine, real multi-process gloo runs, tiny Qwen3 / Qwen3-MoE models whose every
parameter is a function of its global name, and the HF transformers references (``peft_reference``:
HF + peft logits; ``hf_onpolicy``: HF Qwen3-MoE scored through the true-on-policy ops).

Importing this package imports nothing heavy; each submodule imports torch / megatron when used.
"""
