"""Post-import hooks: call a function right after a named module finishes executing its body.

Standard library only, because activation runs at interpreter start-up in every process: wrapt's
importer pulls in ``importlib.metadata`` (about as costly as the interpreter's own start-up), while
this costs a dict and one meta-path finder. wrapt is still what wraps the patched callables; it is
imported when a patch lands, that is when the host imports a heavy target module anyway.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

Hook = Callable[[ModuleType], None]

_lock = threading.RLock()
_hooks: dict[str, list[Hook]] = {}


class _NotifyingLoader:
    """Runs the real loader, puts it back on the module, then calls the hooks for that module."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _notify(self._name, sys.modules.get(self._name, module))


class _PostImportFinder:
    """A meta-path finder that only answers for modules with pending hooks, by asking the others."""

    def __init__(self) -> None:
        self._searching: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _hooks or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _NotifyingLoader(spec.loader, fullname)
        return spec


_finder = _PostImportFinder()


def _notify(name: str, module: ModuleType) -> None:
    with _lock:
        hooks = _hooks.pop(name, [])
    for hook in hooks:
        hook(module)


def register_post_import_hook(hook: Hook, module_name: str) -> None:
    """Call ``hook(module)`` once ``module_name`` is imported; at once if it already is."""
    module = sys.modules.get(module_name)
    if module is not None:
        hook(module)
        return
    with _lock:
        _hooks.setdefault(module_name, []).append(hook)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
