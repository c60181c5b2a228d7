"""What a Megatron forward/backward through its pipeline schedule needs on a CPU-only machine.

``moe_lora_plugins.testing.megatron_cpu.prepare_megatron_cpu`` makes Megatron-Bridge import and
build without Transformer Engine; training on the CPU additionally meets a few CUDA assumptions:
``torch.cuda.current_device()`` as the device of rotary buffers and pipeline p2p buffers, stream
and event calls around p2p, ``torch.cuda.synchronize``, a token counter the schedule allocates with
``device="cuda"``, and the CUDA RNG tracker forked around attention dropout. :func:`install` answers
each on the CPU and changes nothing when CUDA is available (except the RNG fork, a no-op while
dropout is 0, which the demo's model has).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _NullEvent:
    """Stands in for ``torch.cuda.Event``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` for Megatron's schedules module: ``zeros(device="cuda")`` lands on the CPU."""

    def __init__(self, torch: Any) -> None:
        super().__init__("torch")
        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def zeros(self, *args: Any, device: Any = None, **kwargs: Any) -> Any:
        if device == "cuda":
            device = "cpu"
        return self._torch.zeros(*args, device=device, **kwargs)


def install() -> None:
    """Install the CPU answers (idempotent). Call after ``prepare_megatron_cpu()`` in each trainer rank."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import schedules

    # Attention forks the CUDA RNG tracker around dropout; with dropout 0 there is nothing to seed.
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    if not isinstance(schedules.torch, _CpuDeviceTorch):
        schedules.torch = _CpuDeviceTorch(torch)
