"""Which objects a tree of torch modules holds, and a check that it still holds them that costs C-speed
steps, not a Python walk.

A cache of anything derived from a model's parameters (Megatron-Bridge's conversion tasks: references
to modules and parameters) stays valid while every module of the tree still holds the same parameter,
buffer and submodule objects under the same names. ``nn.Module.parameters()`` / ``buffers()`` answer
that with a recursive generator walk (``named_modules`` with a memo set) per call: on a 2.7 B MoE model
with 64 experts per layer (~8,000 modules) that is ~40 ms of Python per check on a busy CPU.

:class:`ModuleTreeSnapshot` records, once, every module's instance ``__dict__`` and the three slot
dicts it holds (``_parameters``, ``_buffers``, ``_modules``), and the objects and names of the
non-empty slots in two flat lists. :meth:`unchanged` checks, with ``map`` / ``itertools.chain`` and
no Python loop per module, that every module still holds the same slot dicts, that the empty ones are
still empty, and that the others still hold the same objects (by identity) under the same names (by
equality). A parameter, buffer or submodule replaced, added, removed or renamed anywhere in the tree
changes a recorded slot (a replaced submodule is a new object in its parent's ``_modules``), so it is
seen; new values written into the same tensors (an optimizer step, ``param.data = ...``) are not a
change. Not seen: a module whose ``__dict__`` itself is reassigned (no torch code does that).

The snapshot holds the recorded objects (so an id cannot be reused by a new object while it lives);
the roots themselves are held weakly and passed again to :meth:`unchanged`, so a snapshot does not keep
a model alive that its owner dropped.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Sequence
from typing import Any

_SLOT_NAMES = ("_parameters", "_buffers", "_modules")
_slots_of = operator.itemgetter(*_SLOT_NAMES)
_from_iterable = itertools.chain.from_iterable


class ModuleTreeSnapshot:
    """The parameter, buffer and submodule objects of the module trees under ``roots``, as recorded now.

    ``roots`` are ``torch.nn.Module`` objects (a model's chunks); a module reachable from several
    places is recorded once, where ``Module.modules()`` first meets it. What is kept: each module's
    instance ``__dict__`` and the three slot dicts it held; the objects of the non-empty slot dicts, in
    one flat list, and their names in another; the empty slot dicts (they must stay empty).
    """

    __slots__ = ("_empty", "_filled", "_instance_dicts", "_member_names", "_members", "_root_dicts", "_roots", "_slots")

    def __init__(self, roots: Sequence[Any]) -> None:
        self._roots = [weakref.ref(root) for root in roots]
        self._root_dicts = [vars(root) for root in roots]
        self._instance_dicts = [vars(module) for root in roots for module in root.modules()]
        self._slots = list(_from_iterable(map(_slots_of, self._instance_dicts)))
        self._filled = [slot for slot in self._slots if slot]
        self._empty = [slot for slot in self._slots if not slot]
        self._members = list(_from_iterable(map(dict.values, self._filled)))
        self._member_names = list(_from_iterable(map(dict.keys, self._filled)))

    def unchanged(self, roots: Sequence[Any]) -> bool:
        """Whether ``roots`` are the recorded roots and every module of their trees still holds the same
        parameter, buffer and submodule objects under the same names."""
        if len(roots) != len(self._roots) or any(ref() is not root for ref, root in zip(self._roots, roots, strict=True)):
            return False
        if not all(map(operator.is_, map(vars, roots), self._root_dicts)):
            return False  # (only roots: an inner module replaced shows as a new object in its parent's slot)
        try:
            # every module still holds the slot dicts it held (ModuleList.__delitem__ assigns a new one)
            if not all(map(operator.is_, _from_iterable(map(_slots_of, self._instance_dicts)), self._slots)):
                return False
        except KeyError:  # a slot attribute deleted: not the recorded tree
            return False
        if any(map(len, self._empty)):
            return False
        members = list(_from_iterable(map(dict.values, self._filled)))
        if len(members) != len(self._members) or not all(map(operator.is_, members, self._members)):
            return False
        return list(_from_iterable(map(dict.keys, self._filled))) == self._member_names
