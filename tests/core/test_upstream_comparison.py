"""The upstream comparison's own machinery: tests/upstream/vllm.txt agrees with the vllm lane's lock and
with pytest, compare.py's JUnit marks differing outcomes as failures, and .ci/summary.py counts it."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType

import pytest
from _pytest.mark.expression import Expression

ROOT = Path(__file__).resolve().parents[2]


def _load(relative: str) -> ModuleType:
    path = ROOT / relative
    name = "_moelora_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fetch = _load("lanes/fetch_upstream_tests.py")
compare = _load("tests/upstream/compare.py")
summary = _load(".ci/summary.py")


def test_vllm_sdist_pin_is_the_version_the_vllm_lane_installs() -> None:
    selection = fetch.read_selection()
    assert selection.version == fetch.locked_version()
    assert selection.url.endswith(f"/{selection.name}-{selection.version}.tar.gz")
    assert len(selection.sha256) == 64 and int(selection.sha256, 16) >= 0


def test_vllm_selection_is_consistent_and_every_k_expression_compiles() -> None:
    selection = fetch.read_selection()
    assert selection.run and not set(selection.run) & set(selection.out)
    assert all(path.startswith("tests/lora/test_") for path in selection.run + selection.out)
    assert {"tests/__init__.py", "tests/lora/__init__.py", "tests/lora/conftest.py"} <= set(selection.support)
    for expression in selection.k:
        Expression.compile(expression)
    matches = Expression.compile(selection.keyword).evaluate
    names = {"test_linear_parallel", "test_embeddings", "True", "512", "cpu", "1"}
    assert not matches(lambda word: word in names)  # a linear-layer test is deselected
    assert matches(lambda word: word in (names - {"test_linear_parallel"}))  # a 512-row embedding test runs


def _sdist(tmp_path: Path, files: dict[str, str]) -> Path:
    path = tmp_path / "vllm-0.32.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"vllm-0.32.0/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_fetch_refuses_an_sdist_with_an_unlisted_lora_test_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    selection = fetch.read_selection()
    files = {name: "" for name in selection.support + selection.run + selection.out}
    files["tests/lora/test_new_feature.py"] = ""
    files["tests/models/test_other.py"] = ""
    sdist = _sdist(tmp_path, files)
    monkeypatch.setattr(fetch, "cached_sdist", lambda _selection: sdist)
    assert fetch.fetch_vllm(tmp_path / "out") == 1
    assert "tests/lora/test_new_feature.py" in capsys.readouterr().err
    del files["tests/lora/test_new_feature.py"]
    sdist = _sdist(tmp_path, files)
    assert fetch.fetch_vllm(tmp_path / "out") == 0
    extracted = {p.relative_to(tmp_path / "out" / "vllm").as_posix() for p in (tmp_path / "out").rglob("*.py")}
    assert extracted == set(selection.support) | set(selection.run)


def test_fetch_refuses_a_cached_or_downloaded_sdist_with_another_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path))
    selection = fetch.read_selection()
    served = _sdist(tmp_path, {"tests/__init__.py": "not vLLM"})
    selection.url = served.as_uri()
    with pytest.raises(SystemExit, match="not the pinned"):
        fetch.cached_sdist(selection)
    assert not list((tmp_path / "upstream").iterdir())  # nothing unverified is kept
    selection.sha256 = fetch._sha256(served)
    assert fetch.cached_sdist(selection) == tmp_path / "upstream" / served.name


def test_compare_junit_fails_differing_tests_and_summary_counts_it(tmp_path: Path) -> None:
    results = {
        "vllm.tests.lora.test_a::test_same": ("passed", "passed"),
        "vllm.tests.lora.test_a::test_broken_by_suite": ("passed", "failed"),
        "vllm.tests.lora.test_a::test_needs_gpu": ("failed", "failed"),
    }
    nox_dir = tmp_path / ".nox"
    compare.write_junit(nox_dir / "junit-vllm-upstream.xml", results)
    assert compare.outcomes(nox_dir / "junit-vllm-upstream.xml") == {
        "upstream.vllm.tests.lora.test_a::test_same": "passed",
        "upstream.vllm.tests.lora.test_a::test_broken_by_suite": "failed",
        "upstream.vllm.tests.lora.test_a::test_needs_gpu": "skipped",
    }
    out = io.StringIO()
    with redirect_stdout(out):
        status = summary.main(nox_dir)
    assert status == 1
    assert "total: 1 passed, 1 failed, 1 skipped" in out.getvalue()
    compare.write_junit(nox_dir / "junit-vllm-upstream.xml", {k: v for k, v in results.items() if "broken" not in k})
    (nox_dir / "report-1.json").write_text(
        '{"sessions": [{"name": "vllm", "result": "success", "duration": 61.0}]}'
    )
    out = io.StringIO()
    with redirect_stdout(out):
        status = summary.main(nox_dir)
    assert status == 0
    assert "lane vllm: success in 1m01.0s, 1 passed (1 of them in junit-vllm-upstream.xml)" in out.getvalue()
