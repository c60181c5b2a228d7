"""Patches of Megatron-Bridge: layout-independent HF export (names, expert gather, fc1 split, merge)."""
