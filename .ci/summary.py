"""Print each lane's result and time (nox's --report files, one per nox process) and one closing line over every lane's JUnit
file: 'N passed, N failed, N skipped'. Exit 1 when a lane failed, a test failed or no test passed.

A lane may write more than one JUnit file: junit-<lane>.xml (its pytest) and junit-<lane>-<part>.xml
(e.g. junit-vllm-upstream.xml, upstream's own tests run with and without the suite, one case per test);
each part is counted in the totals and shown on its lane's line."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def main(nox_dir: Path) -> int:
    passed: dict[str, int] = {}
    parts: dict[str, list[str]] = {}
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for path in sorted(nox_dir.glob("junit-*.xml")):
        lane, _, part = path.stem[len("junit-"):].partition("-")
        part_passed = 0
        for suite in ET.parse(path).getroot().iter("testsuite"):
            tests, failures, errors, skipped = (
                int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
            )
            part_passed += tests - failures - errors - skipped
            passed[lane] = passed.get(lane, 0) + tests - failures - errors - skipped
            totals["passed"] += tests - failures - errors - skipped
            totals["failed"] += failures + errors
            totals["skipped"] += skipped
        if part:
            parts.setdefault(lane, []).append(f"{part_passed} of them in {path.name}")

    lane_failed = False
    reports = sorted(nox_dir.glob("report*.json"))
    if reports:
        sessions = [s for report in reports for s in json.loads(report.read_text())["sessions"]]
        total_time = sum(s["duration"] for s in sessions)
        for s in sessions:
            lane_failed |= s["result"] == "failed"
            tests = f", {passed[s['name']]} passed" if s["name"] in passed else ""
            if s["name"] in parts:
                tests += f" ({', '.join(parts[s['name']])})"
            print(f"lane {s['name']}: {s['result']} in {_minutes(s['duration'])}{tests}")
        print(f"all lanes: {_minutes(total_time)} of lane time ({len(reports)} nox process(es) side by side)")
    else:
        print("; ".join(f"{lane}: {n} passed" for lane, n in passed.items()))
    print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 1 if lane_failed or totals["failed"] or not totals["passed"] else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
