"""The disk fallback: write an adapter as a PEFT directory that vLLM (or anyone) can load."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_peft_dir(path: str, tensors: dict[str, Any], config: dict[str, Any]) -> str:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` atomically (rename into place)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, suffix=".tmp", delete=False) as tmp:
        tmp_weights = tmp.name
    save_file({name: t.detach().cpu().clone().contiguous() for name, t in tensors.items()}, tmp_weights)
    tmp_config = tmp_weights + ".json"
    with open(tmp_config, "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    os.replace(tmp_weights, os.path.join(path, "adapter_model.safetensors"))
    os.replace(tmp_config, os.path.join(path, "adapter_config.json"))
    return path


def read_peft_dir(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, config) of a PEFT directory with ``adapter_model.safetensors``."""
    from safetensors.torch import load_file

    weights = os.path.join(path, "adapter_model.safetensors")
    config_path = os.path.join(path, "adapter_config.json")
    for needed in (weights, config_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f"{needed} does not exist: {path!r} is not a PEFT adapter directory")
    with open(config_path) as f:
        config = json.load(f)
    return load_file(weights), config
