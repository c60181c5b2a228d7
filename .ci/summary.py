"""Add up the JUnit files every lane wrote and print one closing line: 'N passed, N failed, N skipped'."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

totals = {"passed": 0, "failed": 0, "skipped": 0}
lanes = []
for path in sorted(Path(sys.argv[1]).glob("junit-*.xml")):
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        totals["passed"] += tests - failures - errors - skipped
        totals["failed"] += failures + errors
        totals["skipped"] += skipped
        lanes.append(f"{path.stem[len('junit-'):]}: {tests - failures - errors - skipped} passed")
print("; ".join(lanes))
print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
sys.exit(1 if totals["failed"] or not totals["passed"] else 0)
