"""Per-process status files under ``MOELORA_STATUS_DIR``: what each process applied, for ``doctor``."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from moe_lora_plugins.registry import PatchRegistry


def status_path(directory: str | os.PathLike[str], pid: int | None = None) -> Path:
    return Path(directory) / f"status-{socket.gethostname()}-{pid or os.getpid()}.json"


class StatusWriter:
    """A registry listener that rewrites this process's status file (atomically) on every change."""

    def __init__(self, directory: str, role: str | None) -> None:
        self.directory = directory
        self.role = role

    def __call__(self, registry: PatchRegistry) -> None:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "role": self.role,
            "argv": sys.argv,
            "python": sys.executable,
            "time": time.time(),
            "patches": registry.rows(),
            "true_on_policy": _mode(),
        }
        path = status_path(self.directory)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, path)


def _mode() -> str:
    from moe_lora_plugins import onpolicy

    try:
        return "on" if onpolicy.enabled() else "off"
    except Exception as exc:  # a malformed value is shown, not raised, in a status file
        return f"invalid: {exc}"


def read_status_dir(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every status file in the directory, newest last; unreadable files are reported, not skipped."""
    out = []
    for path in sorted(Path(directory).glob("status-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            data = {"file": path.name, "error": f"unreadable: {exc}", "patches": []}
        data["file"] = path.name
        out.append(data)
    out.sort(key=lambda d: d.get("time", 0))
    return out
