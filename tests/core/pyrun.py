"""Run a snippet in a fresh interpreter with a given sys.path prefix and environment; parse its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any


def run_python(
    code: str,
    *,
    site: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    no_site: bool = False,
) -> tuple[Any, subprocess.CompletedProcess]:
    """Run ``code``; it must print one line starting with ``RESULT `` followed by JSON.

    ``no_site`` runs ``python -S`` with site-packages on PYTHONPATH instead: everything imports, but
    no ``.pth`` file runs, so our bootstrap cannot be what activated the process.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    paths = [str(site)] if site is not None else []
    paths += list(filter(None, [full_env.get("PYTHONPATH")]))
    if no_site:
        paths += list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    if paths:
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
    full_env.update(env or {})
    flags = ["-S"] if no_site else []
    proc = subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), proc
    return None, proc
