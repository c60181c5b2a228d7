"""The patch contract: every PatchSpec must survive every order of import, apply and revert.

``run_case(spec_id, case, standin_site=None)`` runs one case in a fresh interpreter and returns what
it observed. With ``standin_site`` (made by :func:`make_standin_site`), the spec's target is a
generated module with the declared signature and a distribution inside (or outside) the declared
range, so the core lane can check every spec without the real host package; without it, the real
installed package is the target (the host lanes do that).

Cases: ``import_then_apply``, ``apply_then_import``, ``apply_twice``, ``apply_revert_apply``,
``revert_without_apply``, ``out_of_range``, ``missing_symbol``, ``missing_required`` (a symbol in the
spec's ``requires`` is gone), ``drift``, ``stale_copy``; and
``real_lifecycle_each`` (for each listed spec alone: apply before import, import, revert, apply
again, deactivate), which the host lanes run for all their specs in one interpreter because importing
a real host package takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from moe_lora_plugins.registry import PatchSpec

CASES = (
    "import_then_apply",
    "apply_then_import",
    "apply_twice",
    "apply_revert_apply",
    "revert_without_apply",
    "out_of_range",
    "missing_symbol",
    "missing_required",
    "drift",
    "stale_copy",
)


def _candidate_versions(spec: PatchSpec) -> list[str]:
    mentioned = re.findall(r"\d+(?:\.\d+)*", spec.versions)
    out: list[str] = []
    for v in mentioned:
        parts = [int(p) for p in v.split(".")]
        out.append(v)
        out.append(".".join(str(p) for p in parts[:-1] + [parts[-1] + 1]))
        out.append(v + ".1")
    return out + ["0.0.1", "999.0.0"]


def version_inside(spec: PatchSpec) -> str:
    from moe_lora_plugins.registry import version_in_range

    for v in _candidate_versions(spec):
        if version_in_range(spec, v):
            return v
    raise ValueError(f"{spec.id}: cannot find a version inside {spec.versions!r}")


def version_outside(spec: PatchSpec) -> str:
    from moe_lora_plugins.registry import version_in_range

    for v in ("0.0.1", "999.0.0", *_candidate_versions(spec)):
        if not version_in_range(spec, v):
            return v
    raise ValueError(f"{spec.id}: every candidate version is inside {spec.versions!r}")


def _parameters_source(fingerprint: str) -> str:
    inner = fingerprint.strip()[1:-1]
    return re.sub(r"=(?=,|$)", "=None", inner.replace(" ", "")).replace(",", ", ")


def write_distribution(site: Path, name: str, version: str, entry_points: str = "") -> None:
    """A minimal ``.dist-info`` that importlib.metadata finds on ``sys.path``."""
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points:
        (dist / "entry_points.txt").write_text(entry_points)


def write_module(site: Path, dotted: str, source: str) -> None:
    """Write ``dotted`` as a module under ``site``, with empty ``__init__.py`` parents."""
    parts = dotted.split(".")
    path = site.joinpath(*parts[:-1])
    path.mkdir(parents=True, exist_ok=True)
    for depth in range(1, len(parts)):  # regular packages, so an installed real package cannot win
        init = site.joinpath(*parts[:depth], "__init__.py")
        if not init.exists():
            init.write_text("")
    (path / f"{parts[-1]}.py").write_text(textwrap.dedent(source))


_Tree = dict  # name -> nested _Tree (a class) or a leaf: ("function", params) / ("instance", None)


def _add_path(tree: _Tree, path: list[str], leaf: tuple[str, str | None]) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"stand-in: {part!r} is both a class and a leaf")
        tree = node
    tree.setdefault(path[-1], leaf)


def _render(tree: _Tree) -> str:
    lines: list[str] = []
    for name, node in tree.items():
        if isinstance(node, dict):
            instance = [n for n, leaf in node.items() if leaf == ("instance", None)]
            members = {n: leaf for n, leaf in node.items() if leaf != ("instance", None)}
            body = "".join(f"        self.{n} = None\n" for n in instance)
            inner = (f"def __init__(self):\n{body}" if instance else "") + _render(members)
            lines.append(f"class {name}:\n" + textwrap.indent(inner or "pass\n", "    "))
        else:
            params = node[1] if node[1] is not None else "*args, **kwargs"
            lines.append(f"def {name}({params}):\n    return 'standin-original'\n")
    return "".join(lines)


def required_symbol_modules(spec: PatchSpec, *, omit: str | None = None) -> dict[str, _Tree]:
    """Per module, the tree of stand-ins for ``spec.requires`` (all but ``omit``)."""
    trees: dict[str, _Tree] = {}
    for symbol in spec.requires:
        if symbol == omit:
            continue
        module, _, path = symbol.partition(":")
        path, _, instance_attribute = path.partition("#")
        parts = path.split(".")
        if instance_attribute:
            _add_path(trees.setdefault(module, {}), [*parts, instance_attribute], ("instance", None))
        else:
            _add_path(trees.setdefault(module, {}), parts, ("function", None))
    return trees


def standin_source(spec: PatchSpec, *, signature: str | None = None, with_symbol: bool = True,
                   extra: _Tree | None = None) -> str:
    """Source of a module that defines ``spec.attribute`` with the spec's (or another) signature, plus
    the stand-ins in ``extra`` (required symbols that live in the target module)."""
    tree: _Tree = {}
    parts = spec.attribute.split(".")
    if with_symbol:
        _add_path(tree, parts, ("function", _parameters_source(signature or spec.fingerprint)))
    else:
        _add_path(tree, [*parts[:-1], f"unrelated_{parts[-1]}"], ("function", ""))
    for name, node in (extra or {}).items():
        if isinstance(node, dict) and isinstance(tree.get(name), dict):
            tree[name] = {**node, **tree[name]}
        else:
            tree.setdefault(name, node)
    return f'"""Stand-in for {spec.target}, generated by moe_lora_plugins.testing.contract."""\n' + _render(tree)


def make_standin_site(
    root: Path, spec: PatchSpec, *, in_range: bool = True, signature: str | None = None, with_symbol: bool = True,
    omit_required: str | None = None, version: str | None = None,
) -> Path:
    """A directory to put first on ``sys.path``: the target module, stand-ins of every symbol the spec
    requires (but ``omit_required``) and the target distribution's metadata (``version``, else one
    inside or outside the spec's range as ``in_range`` says)."""
    site = root / f"site-{spec.id}-{'in' if in_range else 'out'}-{'sym' if with_symbol else 'nosym'}"
    if signature:
        site = site.with_name(site.name + "-drift")
    if omit_required:
        site = site.with_name(site.name + "-without-" + re.sub(r"\W", "_", omit_required))
    if version is not None:
        site = site.with_name(site.name + "-" + version)
    required = required_symbol_modules(spec, omit=omit_required)
    write_module(site, spec.target,
                 standin_source(spec, signature=signature, with_symbol=with_symbol, extra=required.pop(spec.target, None)))
    for module, tree in required.items():
        write_module(site, module, f'"""Stand-in required by {spec.id}."""\n' + _render(tree))
    version = version or (version_inside(spec) if in_range else version_outside(spec))
    write_distribution(site, spec.distributions[0], version)
    return site


def shadow_version_site(root: Path, spec: PatchSpec) -> Path:
    """Only a ``.dist-info`` with an out-of-range version, to shadow the real installed package."""
    site = root / f"shadow-{spec.id}"
    for dist in spec.distributions:
        write_distribution(site, dist, version_outside(spec))
    return site


# The body that runs in the fresh interpreter. It prints one JSON line.
_CHILD = r'''
import importlib, inspect, json, sys
spec_id, case, strict = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
exec(sys.argv[5])  # the prelude, e.g. hiding Transformer Engine for megatron.bridge
from moe_lora_plugins.activation import activate, get_registry
from moe_lora_plugins.hooks.manager import get_plugin_manager
from moe_lora_plugins.registry import _raw_attribute, _resolve_owner
registry = get_registry(get_plugin_manager())
spec = registry.spec(spec_id.split(",")[0])
env = {"MOELORA_PATCHES": spec_id, "MOELORA_STRICT": "1" if strict else "0"}
out = {"case": case, "spec": spec_id}

def current():
    module = importlib.import_module(spec.target)
    owner, name = _resolve_owner(module, spec.attribute)
    return _raw_attribute(owner, name)[0]

def imp():
    return importlib.import_module(spec.target)

try:
    if case == "import_then_apply":
        imp(); original = current()
        activate(environ=env)
        out["status"] = registry.status(spec_id).value
        out["replaced"] = current() is not original
        out["original_kept"] = registry.original(spec_id) is original
    elif case == "apply_then_import":
        activate(environ=env)
        out["status_before_import"] = registry.status(spec_id).value
        out["target_imported_by_apply"] = spec.target in sys.modules
        imp()
        out["status"] = registry.status(spec_id).value
        out["replaced"] = current() is not registry.original(spec_id)
    elif case == "apply_twice":
        imp(); original = current()
        activate(environ=env)
        first = current()
        registry.apply(spec_id)
        out["status"] = registry.status(spec_id).value
        out["same_object"] = current() is first
        direct = registry.original(spec_id) is original
        if spec.kind == "wrap":
            direct = direct and first.__wrapped__ is original
        out["wraps_original_directly"] = direct
    elif case == "apply_revert_apply":
        imp(); original = current()
        activate(environ=env)
        registry.revert(spec_id)
        out["status_after_revert"] = registry.status(spec_id).value
        out["restored"] = current() is original
        registry.apply(spec_id)
        out["status"] = registry.status(spec_id).value
        out["replaced"] = current() is not original
    elif case == "revert_without_apply":
        imp(); original = current()
        out["status_before"] = registry.status(spec_id).value
        registry.revert(spec_id)
        out["status"] = registry.status(spec_id).value
        out["untouched"] = current() is original
    elif case in ("out_of_range", "drift", "missing_symbol", "missing_required"):
        if case == "missing_required" and sys.argv[4] == "real":  # remove one required symbol in this process
            module_name, _, path = spec.requires[0].partition(":")
            path, _, instance_attribute = path.partition("#")
            holder = importlib.import_module(module_name)
            *outer, last = path.split(".")
            for part in outer:
                holder = getattr(holder, part)
            if instance_attribute:  # the class stays; every method of it (and its bases) naming the attribute
                # is replaced by one that does not, as if upstream had dropped the attribute
                def _names(code):
                    found = set(code.co_names)
                    for const in code.co_consts:
                        if hasattr(const, "co_names"):
                            found |= _names(const)
                    return found

                def _stand_in(function):  # same parameters (so fingerprints still match), empty body
                    params, previous, starred = [], None, False
                    for p in inspect.signature(function).parameters.values():
                        if previous == p.POSITIONAL_ONLY and p.kind != p.POSITIONAL_ONLY:
                            params.append("/")
                        if p.kind == p.KEYWORD_ONLY and not starred:
                            params.append("*")
                            starred = True
                        starred = starred or p.kind == p.VAR_POSITIONAL
                        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
                        params.append(prefix + p.name + ("=None" if p.default is not p.empty else ""))
                        previous = p.kind
                    if previous == inspect.Parameter.POSITIONAL_ONLY:
                        params.append("/")
                    names = {}
                    exec(f"def stand_in({', '.join(params)}):\n    return None", names)
                    return names["stand_in"]

                for klass in getattr(getattr(holder, last), "__mro__", ()):
                    for attr_name, value in list(vars(klass).items()):
                        function = getattr(value, "__func__", value)
                        code = getattr(function, "__code__", None)
                        if code is not None and instance_attribute in _names(code) and klass is not object:
                            replacement = _stand_in(function)
                            if isinstance(value, (classmethod, staticmethod)):
                                replacement = type(value)(replacement)
                            setattr(klass, attr_name, replacement)
            else:
                owners = [k for k in getattr(holder, "__mro__", (holder,)) if last in vars(k)]
                delattr(owners[0] if owners else holder, last)
        if case in ("drift", "missing_symbol"):
            imp()
            module = importlib.import_module(spec.target)
            owner, name = _resolve_owner(module, spec.attribute)
            if sys.argv[4] == "real":  # make the real symbol drift / disappear in this process only
                if case == "drift":
                    setattr(owner, name, lambda *args, **kwargs: None)
                else:
                    holders = [k for k in getattr(owner, "__mro__", (owner,)) if name in vars(k)]
                    delattr(holders[0] if holders else owner, name)
        before = None
        try:
            before = current()
        except AttributeError:
            pass
        try:
            activate(environ=env)
            imp()
            out["raised"] = None
        except Exception as exc:
            out["raised"] = type(exc).__name__
            out["message"] = str(exc)
        out["status"] = registry.status(spec_id).value
        out["detail"] = registry.detail(spec_id)
        try:
            out["untouched"] = current() is before
        except AttributeError:
            out["untouched"] = before is None
    elif case == "real_lifecycle_each":  # the real_lifecycle case for each listed spec alone, in turn
        from moe_lora_plugins.activation import deactivate
        out["each"] = {}
        for one in spec_id.split(","):
            spec, found = registry.spec(one), {}
            out["each"][one] = found
            try:
                activate(environ={**env, "MOELORA_PATCHES": one})
                found["status_before_import"] = registry.status(one).value
                imp()
                found["status"] = registry.status(one).value
                found["detail"] = registry.detail(one)
                if found["status"] == "applied":
                    original = registry.original(one)
                    found["replaced"] = current() is not original
                    registry.revert(one)
                    found["restored"] = current() is original
                    registry.apply(one)
                    found["reapplied"] = registry.status(one).value
                deactivate()
                found["restored_after_deactivate"] = current() is original if found["status"] == "applied" else None
            except Exception as exc:
                found["error"] = f"{type(exc).__name__}: {exc}"
    elif case == "stale_copy":
        imp(); original = current()
        module = importlib.import_module(spec.target)
        top = spec.target.split(".")[0]
        copy_name = "_moelora_stale_copy_probe"
        probe = type(sys)(top + "." + copy_name)
        *_, name = spec.attribute.split(".")
        setattr(probe, name, original)
        sys.modules[probe.__name__] = probe
        activate(environ=env)
        out["status"] = registry.status(spec_id).value
        out["copy_rebound"] = getattr(probe, name) is current()
        registry.revert(spec_id)
        out["copy_restored"] = getattr(probe, name) is original
    else:
        raise SystemExit(f"unknown case {case}")
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print("CONTRACT-RESULT " + json.dumps(out))
'''


def run_case(
    spec_id: str,
    case: str,
    *,
    site: Path | None = None,
    real: bool = False,
    strict: bool = False,
    timeout: float = 300,
    prelude: str = "",
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one contract case for one spec in a fresh interpreter; return the observed facts. The child
    sees no ``MOELORA_*`` variable of this process, only those in ``extra_env``."""
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("MOELORA_"):
            del env[name]
    env.update(extra_env or {})
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, spec_id, case, "1" if strict else "0", "real" if real else "standin", prelude],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("CONTRACT-RESULT "):
            result = json.loads(line[len("CONTRACT-RESULT "):])
            result["stderr"] = proc.stderr[-4000:]
            return result
    raise AssertionError(
        f"contract case {case} for {spec_id} printed no result (exit {proc.returncode}).\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )


def is_module_level(spec: PatchSpec) -> bool:
    return "." not in spec.attribute


def real_lifecycles(specs: list[PatchSpec], prelude: str = "", timeout: float = 1200) -> dict[str, dict[str, Any]]:
    """Each spec's real-package lifecycle facts (applied, revert restores, re-applies), gathered in ONE
    fresh interpreter.

    Each spec is activated alone (``MOELORA_PATCHES`` names only it), checked, then the suite is
    deactivated before the next one, so every patch must also revert exactly for the later ones to
    see upstream's objects. Importing the real packages once instead of once per spec is what makes
    the real-package contract affordable on a small CI machine.
    """
    r = run_case(",".join(s.id for s in specs), "real_lifecycle_each", real=True, prelude=prelude, timeout=timeout)
    assert "error" not in r, r["error"] + r["stderr"]
    return {patch_id: {**facts, "stderr": r["stderr"]} for patch_id, facts in r["each"].items()}


def assert_lifecycle_facts(facts: dict[str, Any]) -> None:
    """What :func:`real_lifecycles` found for one spec: applied, revert restores, re-applies, and
    deactivation leaves upstream's object in place."""
    assert "error" not in facts, facts["error"] + facts["stderr"]
    assert facts["status_before_import"] in ("pending", "applied")  # an earlier spec may have imported it
    assert facts["status"] == "applied", facts["detail"]
    assert (facts["replaced"], facts["restored"], facts["reapplied"]) == (True, True, "applied")
    assert facts["restored_after_deactivate"] is True


def assert_real_out_of_range_refused(spec: PatchSpec, root: Path, prelude: str = "") -> None:
    """With metadata claiming an out-of-range version shadowing the real package: not applied."""
    r = run_case(spec.id, "out_of_range", site=shadow_version_site(root, spec), real=True, prelude=prelude)
    assert "error" not in r, r["error"] + r["stderr"]
    assert (r["status"], r["untouched"]) == ("incompatible", True)


def assert_real_missing_required_refused(spec: PatchSpec, prelude: str = "") -> None:
    """On the real package with the spec's first required symbol removed in the child process: the patch
    is not applied, its status is ``missing-symbol`` and the detail names the symbol."""
    r = run_case(spec.id, "missing_required", real=True, prelude=prelude)
    assert "error" not in r, r["error"] + r["stderr"]
    assert (r["status"], r["untouched"]) == ("missing-symbol", True), r["detail"]
    assert f"relies on {spec.requires[0]}" in r["detail"]
