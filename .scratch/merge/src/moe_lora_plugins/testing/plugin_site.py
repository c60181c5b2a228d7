"""A third-party plugin installed the way users install one: a distribution on ``sys.path`` whose
``moelora.plugins`` entry point names a module (no registration call in the code under test).

``build_export_recorder_site(root)`` writes the distribution ``moelora-export-recorder``. Its
``on_export_weights`` appends one JSON line per item it sees (``kind``, ``name``, ``shape``, and a
``position`` counting items of that stream) to the file named by ``MOELORA_TEST_EXPORT_RECORD``, and
multiplies every floating-point tensor by ``MOELORA_TEST_EXPORT_SCALE`` (default 1: it only
watches). Tests put the site on ``sys.path`` (or ``PYTHONPATH`` of a subprocess), run a real export
or sync, then read the record and compare what arrived with the untransformed reference times the
scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_lora_plugins.testing.contract import write_distribution, write_module

RECORD_ENV = "MOELORA_TEST_EXPORT_RECORD"
SCALE_ENV = "MOELORA_TEST_EXPORT_SCALE"
PLUGIN_NAME = "export_recorder"

PLUGIN_SOURCE = '''
"""A test plugin from the moelora.plugins entry point: records and scales every exported tensor."""

import json
import os

from moe_lora_plugins.hooks import hookimpl


@hookimpl
def on_export_weights(weights, context):
    record = os.environ.get("MOELORA_TEST_EXPORT_RECORD")
    scale = float(os.environ.get("MOELORA_TEST_EXPORT_SCALE", "1"))
    for position, item in enumerate(weights):
        name, tensor = item[0], item[1]
        if record:
            with open(record, "a") as f:
                f.write(json.dumps({"kind": context.kind, "name": name, "shape": list(tensor.shape),
                                    "position": position, "pid": os.getpid()}) + "\\n")
        if scale != 1 and tensor.is_floating_point():
            tensor = tensor * scale
        yield (name, tensor, *item[2:])
'''


def build_export_recorder_site(root: Path) -> Path:
    """Write the plugin's module and ``.dist-info`` (with its entry point) under ``root/site``."""
    site = Path(root) / "export-recorder-site"
    write_module(site, "moelora_export_recorder", PLUGIN_SOURCE)
    write_distribution(
        site, "moelora-export-recorder", "0.1",
        entry_points=f"[moelora.plugins]\n{PLUGIN_NAME} = moelora_export_recorder\n",
    )
    return site


def read_record(path: str | Path) -> list[dict[str, Any]]:
    """The plugin's record: one dict per item seen, in the order seen (empty if nothing was seen)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
