"""Patches on megatron-core (``megatron.core``)."""
