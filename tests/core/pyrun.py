"""Run a snippet in a fresh interpreter with a given sys.path prefix and environment; parse its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any


def run_python(
    code: str, *, site: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[Any, subprocess.CompletedProcess]:
    """Run ``code``; it must print one line starting with ``RESULT `` followed by JSON."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [full_env.get("PYTHONPATH")])])
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), proc
    return None, proc
