"""``moe-lora-plugins doctor`` and ``ledger`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lora_plugins.activation import get_registry
from moe_lora_plugins.ledger import render_ledger

from .fixture_site import build_fixture_site

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, site: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    paths = [str(site)] if site else []
    paths.append(str(REPO / "src"))
    full["PYTHONPATH"] = os.pathsep.join(paths + list(filter(None, [os.environ.get("PYTHONPATH")])))
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "moe_lora_plugins.cli", *args], capture_output=True, text=True, env=full, timeout=300
    )


def test_doctor_json_lists_every_registered_patch_with_status_and_range(tmp_path):
    site = build_fixture_site(tmp_path)
    proc = _cli("doctor", "--json", site=site)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows = {row["id"]: row for row in report["patches"]}
    assert set(rows) >= {s.id for s in get_registry().specs} | {"fixture.compute", "fixture.inherited"}
    fixture = rows["fixture.compute"]
    assert (fixture["installed"], fixture["versions"], fixture["in_range"]) == ("1.4.0", ">=1.0,<2", True)
    assert (fixture["resolvable"], fixture["fingerprint_ok"]) == (True, True)
    assert fixture["status"] == "not-activated"
    assert fixture["why"] == "fixture"
    assert {r["name"] for r in report["switches"]} >= {"MOELORA_PLUGINS", "MOELORA_STRICT"}
    assert set(report["packages"]) >= {"torch", "megatron-core", "megatron-bridge", "vllm", "sglang", "wrapt", "pluggy"}
    assert "fixture" in report["plugins"]


def test_doctor_shows_applied_in_an_activated_process(tmp_path):
    site = build_fixture_site(tmp_path)
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    full["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO / "src")])
    code = (
        "import json, moe_lora_plugins; from moe_lora_plugins import doctor; moe_lora_plugins.activate(); "
        "print(json.dumps({r['id']: r['status'] for r in doctor.collect()['patches']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, check=True)
    assert json.loads(out.stdout)["fixture.compute"] == "applied"


def test_doctor_strict_fails_on_an_incompatible_patch_and_plain_doctor_does_not(tmp_path):
    site = build_fixture_site(tmp_path, target_version="3.0")
    plain = _cli("doctor", site=site)
    strict = _cli("doctor", "--strict", site=site)
    assert plain.returncode == 0, plain.stderr
    assert "incompatible" in plain.stdout
    assert strict.returncode == 1
    assert "fixture.compute" in strict.stderr


def test_doctor_reports_drift_against_the_installed_signature(tmp_path):
    site = build_fixture_site(tmp_path)
    core = site / "moelora_fixture_target" / "core.py"
    core.write_text(core.read_text().replace("def compute(x, y=1):", "def compute(x, y=1, z=2):"))
    proc = _cli("doctor", "--json", "--strict", site=site)
    assert proc.returncode == 1
    row = {r["id"]: r for r in json.loads(proc.stdout)["patches"]}["fixture.compute"]
    assert (row["status"], row["fingerprint_found"]) == ("drift", "(x, y=, z=)")


def test_doctor_reads_the_status_files_of_other_processes(tmp_path):
    site = build_fixture_site(tmp_path)
    status = tmp_path / "status"
    code = "import moe_lora_plugins, moelora_fixture_target.core; moe_lora_plugins.activate(role='vllm')"
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOELORA_")}
    full.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO / "src")]), MOELORA_STATUS_DIR=str(status))
    subprocess.run([sys.executable, "-c", code], env=full, check=True)
    proc = _cli("doctor", "--status-dir", str(status), site=site)
    assert proc.returncode == 0, proc.stderr
    assert "processes (status files):" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("status-"))
    assert "vllm" in line and "fixture.compute" in line


def test_doctor_shows_a_malformed_switch_and_strict_fails_on_it():
    proc = _cli("doctor", "--strict", env={"MOELORA_STRICT": "sometimes"})
    assert proc.returncode == 1
    assert "MOELORA_STRICT='sometimes' is not an on/off value" in proc.stdout


NOISY_IMPORT = """
import logging
import sys
import warnings

print("Apex-like: fused kernels not installed", file=sys.stderr)
print("TE-like: stdout chatter")
warnings.warn("transformer-engine-like warning at import", UserWarning)
try:
    raise RuntimeError("FP8GlobalStateManager-like failure")
except RuntimeError:
    logging.getLogger("noisy.upstream").exception("logged traceback at import")
"""


def _noisy_site(tmp_path: Path) -> Path:
    site = build_fixture_site(tmp_path)
    core = site / "moelora_fixture_target" / "core.py"
    core.write_text(NOISY_IMPORT + core.read_text())
    return site


def test_doctor_holds_back_upstream_import_noise_unless_verbose(tmp_path):
    site = _noisy_site(tmp_path)
    plain = _cli("doctor", site=site)
    assert plain.returncode == 0, plain.stderr
    for noise in ("Apex-like", "TE-like", "transformer-engine-like", "FP8GlobalStateManager-like", "Traceback"):
        assert noise not in plain.stdout + plain.stderr, noise
    assert "--verbose shows them" in plain.stdout
    assert plain.stdout.startswith("moe-lora-plugins ")
    verbose = _cli("doctor", "--verbose", site=site)
    assert verbose.returncode == 0, verbose.stderr
    shown = verbose.stdout.split("output of the upstream imports", 1)[1]
    for noise in ("Apex-like", "TE-like", "transformer-engine-like", "FP8GlobalStateManager-like", "Traceback"):
        assert noise in shown, noise


def test_doctor_json_stays_parseable_with_noisy_imports(tmp_path):
    proc = _cli("doctor", "--json", site=_noisy_site(tmp_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "FP8GlobalStateManager-like" in report["import_output"]


def test_doctor_strict_does_not_fail_on_a_patch_the_user_disabled(tmp_path):
    site = build_fixture_site(tmp_path, target_version="3.0")
    ids = "fixture.compute,fixture.inherited,fixture.classmethod,fixture.staticmethod"
    proc = _cli("doctor", "--strict", "--json", site=site, env={"MOELORA_DISABLED_PATCHES": ids})
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r["status"] for r in json.loads(proc.stdout)["patches"]}
    assert {rows[i] for i in ids.split(",")} == {"disabled"}
    allow = _cli("doctor", "--strict", site=site, env={"MOELORA_PATCHES": "vllm.tensor_lora_requests"})
    assert allow.returncode == 0, allow.stderr
    enabled = _cli("doctor", "--strict", site=site, env={"MOELORA_DISABLED_PATCHES": "fixture.compute"})
    assert enabled.returncode == 1 and "fixture.inherited" in enabled.stderr


def test_doctor_status_dir_that_does_not_exist_is_a_clear_error(tmp_path):
    missing = tmp_path / "nonexistent"
    proc = _cli("doctor", "--status-dir", str(missing))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"--status-dir '{missing}' does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "content,problem",
    [
        ("[1, 2]", "holds a JSON list"),
        ('"text"', "holds a JSON str"),
        ('{"patches": {"a": 1}}', "'patches' is a JSON dict"),
        ('{"patches": [["x"]]}', "patches[0] is not an object"),
        ('{"patches": [], "time": "noon"}', "'time' is not a number"),
        ("\u00ff not json", "unreadable"),
    ],
)
def test_doctor_reports_a_malformed_status_file_instead_of_crashing(tmp_path, content, problem):
    status = tmp_path / "status"
    status.mkdir()
    (status / "status-host-1.json").write_text(content)
    (status / "status-host-2.json").write_text(json.dumps({"pid": 2, "role": "vllm", "time": 1.0, "patches": [
        {"id": "vllm.tensor_lora_requests", "status": "applied"}]}))
    proc = _cli("doctor", "--status-dir", str(status))
    assert proc.returncode == 0, proc.stderr
    bad = next(ln for ln in proc.stdout.splitlines() if "status-host-1.json" in ln)
    good = next(ln for ln in proc.stdout.splitlines() if "status-host-2.json" in ln)
    assert problem in bad
    assert "vllm.tensor_lora_requests" in good


def test_checked_in_ledger_equals_the_generated_ledger():
    checked_in = (REPO / "docs" / "patch-ledger.md").read_text()
    assert checked_in == render_ledger(get_registry().specs), (
        "docs/patch-ledger.md is stale: run `moe-lora-plugins ledger > docs/patch-ledger.md`"
    )


def test_ledger_command_prints_the_ledger():
    proc = _cli("ledger")
    assert proc.returncode == 0
    assert proc.stdout == render_ledger(get_registry().specs)


def test_the_installed_console_script_runs_doctor_json():
    import shutil

    script = shutil.which("moe-lora-plugins", path=os.path.dirname(sys.executable))
    if script is None and not os.environ.get("MOELORA_LANE"):
        import pytest

        pytest.skip("package not installed in this interpreter (the core lane installs it)")
    assert script is not None, "pip install . must install the moe-lora-plugins console script"
    proc = subprocess.run([script, "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["id"] for r in report["patches"]] == [s.id for s in get_registry().specs]
    assert all(r["versions"] and r["status"] for r in report["patches"])
    assert report["bootstrap_pth"], "pip install . must install moe_lora_plugins.pth"


def test_the_source_tree_holds_no_wheels():
    """Build tools come from the package index (the lint lane installs ruff from PyPI), never from the tree."""
    found = [*REPO.glob("*.whl"), *REPO.glob("src/**/*.whl")]
    wheels = sorted(str(p.relative_to(REPO)) for p in found if p.is_file())  # a `.whl/` folder is not a wheel
    assert wheels == []


def test_doctor_and_the_ledger_name_every_symbol_a_patch_relies_on(tmp_path):
    specs = {s.id: s for s in get_registry().specs}
    relying = [s for s in specs.values() if s.requires]
    assert relying, "the patches that reach private upstream members must declare them"
    proc = _cli("doctor", "--json", "--no-import")
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in json.loads(proc.stdout)["patches"]}
    ledger = render_ledger(get_registry().specs)
    for spec in relying:
        assert list(rows[spec.id]["requires"]) == list(spec.requires)
        assert all(f"`{symbol}`" in ledger for symbol in spec.requires)
