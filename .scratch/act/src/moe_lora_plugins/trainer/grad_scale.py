"""Wire Megatron's ``config.grad_scale_func`` to the optimizer's loss scale.

Megatron-Core's pipeline schedules multiply the loss by ``config.grad_scale_func(loss)`` before
backward when it is set; the optimizer divides gradients by its loss scale before stepping. A host
that builds its own optimizer (SkyRL before #1212) and leaves the function unset trains fp16 with
unscaled losses (underflowing gradients) and, with a dynamic scaler, unscales gradients that were
never scaled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def model_config_of(chunk: Any) -> Any:
    """The TransformerConfig of a (possibly DDP / Float16Module wrapped) model chunk."""
    module = chunk
    while not hasattr(module, "config") and hasattr(module, "module"):
        module = module.module
    if not hasattr(module, "config"):
        raise TypeError(f"{type(chunk).__name__} carries no Megatron config (looked through .module wrappers)")
    return module.config


def wire_grad_scale_func(model_chunks: Iterable[Any], optimizer: Any) -> Callable[[Any], Any]:
    """Set ``grad_scale_func = optimizer.scale_loss`` on the config of every chunk; return the function."""
    scale_loss = getattr(optimizer, "scale_loss", None)
    if not callable(scale_loss):
        raise TypeError(
            f"{type(optimizer).__name__} has no scale_loss(loss): pass Megatron-Core's MegatronOptimizer "
            "(or any optimizer exposing its loss scale as scale_loss)"
        )
    for chunk in model_chunks:
        model_config_of(chunk).grad_scale_func = scale_loss
    return scale_loss
