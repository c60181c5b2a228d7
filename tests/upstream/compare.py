"""Run upstream's own unit tests twice, without and with the suite activated, and fail on any test whose
outcome differs (tests/upstream/README.md says which tests and from where).

    python tests/upstream/compare.py --tests DIR [--junitxml OUT.xml] [--only megatron_bridge] [-- pytest args]

``DIR`` holds upstream's test files, one folder per package (lanes/fetch_upstream_tests.py puts them
there: Megatron-Bridge's from tests/upstream/sources.txt, vLLM's from its sdist per
tests/upstream/vllm.txt; they are never committed here). Each package folder whose package imports is
run as its own pytest process (this folder's pytest.ini and harness.py plugin), once with
``MOELORA_PLUGINS`` unset and once with ``MOELORA_PLUGINS=on`` (the ``.pth`` bootstrap activates every
patch at interpreter start). Megatron-Bridge's folder runs whole; vLLM's runs the files and ``-k``
selection of tests/upstream/vllm.txt, offline (no Hugging Face hub). Outcomes are compared per test id.
``--junitxml`` writes one test case per upstream test: it passes when both runs pass, is skipped when
they agree on another outcome, and fails, naming both outcomes, when they differ. Exit 1 on any difference, 2 when a run collected nothing or the suite
did not activate.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
DEFAULT_TESTS = HERE.parent.parent.parent / "shared" / "upstream-tests"
PACKAGES = {"megatron_bridge": "megatron.bridge", "vllm": "vllm"}


def outcomes(junit: Path) -> dict[str, str]:
    """``{test id: passed | failed | error | skipped}`` from one pytest JUnit file."""
    found: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        found[test_id] = outcome
    return found


def _environment(suite_on: bool, package: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_") or k == "MOELORA_LANE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    if package == "vllm":
        # CI has no Hugging Face hub: a test that would download fails at once, alike in both runs.
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if suite_on:
        env["MOELORA_PLUGINS"] = "on"
    return env


def _fetcher() -> ModuleType:
    path = HERE.parent.parent / "lanes" / "fetch_upstream_tests.py"
    spec = importlib.util.spec_from_file_location("fetch_upstream_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def selection(tests: Path, package: str) -> list[str]:
    """pytest's paths and options for one package folder: vLLM's from tests/upstream/vllm.txt."""
    if package != "vllm":
        return [str(tests / package)]
    chosen = _fetcher().read_selection()
    paths = [str(tests / package / path) for path in chosen.run]
    return paths + ["--tb=short"] + (["-k", chosen.keyword] if chosen.keyword else [])


def suite_activates() -> bool:
    """Whether ``MOELORA_PLUGINS=on`` activates the suite in a fresh interpreter (the .pth bootstrap)."""
    probe = "import moe_lora_plugins.activation as a, sys; sys.exit(0 if a.current() is not None else 1)"
    return subprocess.run([sys.executable, "-c", probe], env=_environment(True), timeout=600).returncode == 0


def run(tests: Path, package: str, suite_on: bool, workdir: Path, extra: list[str]) -> dict[str, str]:
    junit = workdir / f"{package}-{'on' if suite_on else 'off'}.xml"
    label = "with the suite" if suite_on else "without the suite"
    print(f"== {package}: upstream tests {label}", flush=True)
    subprocess.run(
        [
            sys.executable, "-m", "pytest", *selection(tests, package), "-q", "-c", str(HERE / "pytest.ini"),
            "--rootdir", str(tests / package), "-p", "harness", f"--junitxml={junit}", *extra,
        ],
        env=_environment(suite_on, package),
        cwd=tests / package,
    )
    return outcomes(junit) if junit.exists() else {}


def write_junit(path: Path, results: dict[str, tuple[str, str]]) -> None:
    """One test case per upstream test: failed when the two runs differ, skipped when they agree on an
    outcome other than passed (upstream's or this machine's matter), passed when both passed."""
    differing = sum(1 for off, on in results.values() if off != on)
    alike_not_passed = sum(1 for off, on in results.values() if off == on != "passed")
    suite = ET.Element(
        "testsuite", name="upstream-with-and-without-the-suite", tests=str(len(results)),
        failures=str(differing), errors="0", skipped=str(alike_not_passed),
    )
    for test_id, (off, on) in sorted(results.items()):
        classname, _, name = test_id.rpartition("::")
        case = ET.SubElement(suite, "testcase", classname=f"upstream.{classname}", name=name)
        if off != on:
            failure = ET.SubElement(case, "failure", message=f"{off} without the suite, {on} with it")
            failure.text = f"{test_id}: {off} without the suite, {on} with MOELORA_PLUGINS=on"
        elif off != "passed":
            ET.SubElement(case, "skipped", message=f"{off} with and without the suite")
    root = ET.Element("testsuites")
    root.append(suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tests", type=Path, default=Path(os.environ.get("MOELORA_UPSTREAM_TESTS", DEFAULT_TESTS)),
        help="folder of upstream test files, one subfolder per package (default: $MOELORA_UPSTREAM_TESTS, "
        "else shared/upstream-tests beside the repository)",
    )
    parser.add_argument("--junitxml", type=Path)
    parser.add_argument("--only", choices=sorted(PACKAGES), action="append")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    if not suite_activates():
        print("MOELORA_PLUGINS=on did not activate the suite: install the package non-editable (`pip install .`) "
              "so that its .pth bootstrap is in site-packages", file=sys.stderr)
        return 2
    results: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for package in args.only or sorted(PACKAGES):
            if not (args.tests / package).is_dir():
                print(f"== {package}: no upstream tests in {args.tests / package}; not run", flush=True)
                continue
            if importlib.util.find_spec(PACKAGES[package].split(".")[0]) is None:
                print(f"== {package}: {PACKAGES[package]} is not installed here; not run", flush=True)
                continue
            off = run(args.tests, package, False, Path(tmp), args.pytest_args)
            on = run(args.tests, package, True, Path(tmp), args.pytest_args)
            if not off or not on:
                print(f"{package}: a run collected no test (without: {len(off)}, with: {len(on)})", file=sys.stderr)
                return 2
            for test_id in sorted(off.keys() | on.keys()):
                results[f"{package}.{test_id}"] = (off.get(test_id, "absent"), on.get(test_id, "absent"))
    if not results:
        print("no upstream test ran", file=sys.stderr)
        return 2
    if args.junitxml:
        write_junit(args.junitxml, results)
    differing = {t: o for t, o in results.items() if o[0] != o[1]}
    same = len(results) - len(differing)
    counts: dict[str, int] = {}
    for off, _ in results.values():
        counts[off] = counts.get(off, 0) + 1
    print(f"upstream tests: {len(results)} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))} without "
          f"the suite); {same} with the same outcome with the suite, {len(differing)} different")
    for test_id, (off, on) in sorted(differing.items()):
        print(f"  DIFFERENT {test_id}: {off} without the suite, {on} with it")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
