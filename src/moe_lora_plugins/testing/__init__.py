"""Reusable test support: the patch contract runner (``contract``), Megatron on the CPU without
Transformer Engine, real multi-process gloo runs, and tiny Qwen3 / Qwen3-MoE models whose every
parameter is a function of its global name.

Importing this package imports nothing heavy; each submodule imports torch / megatron when used.
"""
