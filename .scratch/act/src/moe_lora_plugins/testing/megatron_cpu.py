"""Run Megatron-Core + Megatron-Bridge on a CPU-only machine without Transformer Engine.

Megatron-Bridge 0.6.x imports ``transformer_engine.pytorch`` unconditionally in
``megatron.bridge.peft.lora_layers``. :func:`prepare_megatron_cpu` installs a meta-path finder that
shows a stand-in ``transformer_engine`` only while that one module executes, then removes it again
(a stand-in left in ``sys.modules`` would flip every guarded ``HAVE_TE`` to True). It also turns
Megatron-Bridge's PEFT ``HAVE_TE`` off. Call it before importing ``megatron.bridge``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Any

_HIDDEN_TE_IMPORTER = "megatron.bridge.peft.lora_layers"
_lock = threading.Lock()
_prepared = False


class _PlaceholderMeta(type):
    """Attribute access on a stand-in class yields another stand-in class (``te.ops.Sequential``)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _PlaceholderMeta(name, (_Placeholder,), {})
        setattr(cls, name, value)
        return value


class _Placeholder(metaclass=_PlaceholderMeta):
    """Stands in for any Transformer Engine class: never an instance of anything real."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "Transformer Engine is not installed; moe_lora_plugins.testing.megatron_cpu only lets "
            "megatron.bridge import. Build models with the local (non-TE) layer spec."
        )


class _StandInModule(types.ModuleType):
    """A module whose every missing attribute is another stand-in (module-like class)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _PlaceholderMeta(name, (_Placeholder,), {})
        setattr(self, name, value)
        return value


def _stand_in(name: str) -> _StandInModule:
    module = _StandInModule(name)
    module.__path__ = []  # a package, so submodule imports resolve through the finder
    module.__file__ = "<moe-lora-plugins transformer_engine stand-in>"
    return module


class _TransformerEngineStandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``transformer_engine*`` stand-ins only while the Megatron-Bridge LoRA layers import."""

    def __init__(self) -> None:
        self.active = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == _HIDDEN_TE_IMPORTER and not self.active:
            return self._wrap_importer(fullname, path, target)
        if self.active and (fullname == "transformer_engine" or fullname.startswith("transformer_engine.")):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def _wrap_importer(self, fullname: str, path: Any, target: Any) -> Any:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ShowingStandInLoader(spec.loader, self)
                return spec
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        return _stand_in(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        parent, _, child = module.__name__.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, module)


class _ShowingStandInLoader(importlib.abc.Loader):
    """Executes the real module with the stand-ins visible, then removes every stand-in again."""

    def __init__(self, loader: Any, finder: _TransformerEngineStandInFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        real = {k: v for k, v in sys.modules.items() if k == "transformer_engine" or k.startswith("transformer_engine.")}
        self._finder.active = not real
        try:
            self._loader.exec_module(module)
        finally:
            if self._finder.active:
                for name in [k for k in sys.modules if k == "transformer_engine" or k.startswith("transformer_engine.")]:
                    del sys.modules[name]
            self._finder.active = False


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def prepare_megatron_cpu() -> None:
    """Make ``import megatron.bridge`` work without Transformer Engine (idempotent, per process).

    Enough for building models and exporting them. A CPU forward/backward needs more (``torch.cuda``
    stand-ins, an explicit attention mask); this module does not provide it yet.
    """
    global _prepared
    with _lock:
        if not _prepared:
            if not transformer_engine_installed():
                sys.meta_path.insert(0, _TransformerEngineStandInFinder())
            _prepared = True
    if not transformer_engine_installed():
        import megatron.bridge.peft.utils as peft_utils

        # Megatron-Core fills missing TE classes with MagicMocks, so the check there passes wrongly.
        peft_utils.HAVE_TE = False
