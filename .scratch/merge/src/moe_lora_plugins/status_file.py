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


def _malformed(data: Any) -> str | None:
    """What is wrong with a parsed status file, or None when it has the shape ``StatusWriter`` writes."""
    if not isinstance(data, dict):
        return f"malformed: holds a JSON {type(data).__name__}, not an object"
    patches = data.get("patches", [])
    if not isinstance(patches, list):
        return f"malformed: 'patches' is a JSON {type(patches).__name__}, not a list"
    for i, row in enumerate(patches):
        if not (isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("status"), str)):
            return f"malformed: patches[{i}] is not an object with string 'id' and 'status'"
    if not isinstance(data.get("time", 0), (int, float)):
        return "malformed: 'time' is not a number"
    return None


def read_status_dir(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every status file in the directory, newest last; unreadable or malformed files are reported, not skipped.

    A directory that does not exist is an error (``NotADirectoryError``) naming it.
    """
    if not Path(directory).is_dir():
        raise NotADirectoryError(
            f"status directory {str(directory)!r} does not exist or is not a directory: point it at the "
            "MOELORA_STATUS_DIR your processes were started with"
        )
    out = []
    for path in sorted(Path(directory).glob("status-*.json")):
        try:
            data: Any = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            data = {"error": f"unreadable: {exc}", "patches": []}
        else:
            problem = _malformed(data)
            if problem is not None:
                data = {"error": problem, "patches": []}
        data["file"] = path.name
        out.append(data)
    out.sort(key=lambda d: d.get("time", 0))
    return out
