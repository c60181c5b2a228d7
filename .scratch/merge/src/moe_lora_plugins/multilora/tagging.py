"""Per-request adapter tags for the rollout side: which engine LoRA a sample's request must name.

A host's generate state (the ``on_generate_state`` seam) calls :class:`AdapterRequestTagger` once per
request with the adapter the sample belongs to; the tag carries the engine's stable LoRA name and
integer id (the name is the adapter's, the id is given at registration and never reused, so a reused
slot never aliases an older adapter in the engine's caches). Only RUNNING adapters are tagged: an
adapter still loading or draining is refused with its state, which the caller checks with
:meth:`AdapterRequestTagger.can_tag` beforehand (no readiness by exception).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.multilora.controller import MultiLoraController


@dataclass(frozen=True)
class RequestTag:
    """The adapter of one request: its name (the engine's LoRA name), engine LoRA id and trainer slot."""

    adapter: str
    lora_int_id: int
    slot: int

    def lora_request(self) -> Any:
        """vLLM's ``LoRARequest`` for this tag (the adapter is served from memory under its stable id)."""
        from moe_lora_plugins.integrations.vllm_worker import lora_request

        return lora_request(self.adapter, self.lora_int_id)


class AdapterRequestTagger:
    """Tags requests with their adapter; counts requests in flight per adapter while they run."""

    def __init__(self, controller: MultiLoraController) -> None:
        self.controller = controller

    def can_tag(self, adapter: str) -> bool:
        """Whether new requests may go to ``adapter`` now (it is RUNNING)."""
        return self.controller.is_ready(adapter)

    def tag(self, adapter: str) -> RequestTag:
        """The tag for a new request of ``adapter``; refuses an adapter that is not RUNNING, naming its state."""
        record = self.controller.require_ready(adapter)
        record.in_flight += 1
        return RequestTag(adapter=record.name, lora_int_id=record.engine_id, slot=record.slot)

    def done(self, tag: RequestTag) -> None:
        """The request of ``tag`` finished (or was aborted): it no longer holds its adapter back from removal."""
        record = self.controller.get(tag.adapter)
        record.in_flight = max(0, record.in_flight - 1)
