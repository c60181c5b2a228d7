"""ModuleTreeSnapshot: a module tree reads unchanged exactly while every module holds the same parameter,
buffer and submodule objects under the same names; any replacement, addition, removal or rename, by any
route (setattr, register_*, the slot dicts directly, ModuleList edits), reads changed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

from moe_lora_plugins.topology.module_tree import ModuleTreeSnapshot


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.act = torch.nn.Identity()
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def tree() -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block() for _ in range(3)])
    model.head = torch.nn.Linear(4, 2, bias=False)
    return model


def test_an_untouched_tree_reads_unchanged_and_so_do_new_values_in_the_same_tensors():
    model = tree()
    snapshot = ModuleTreeSnapshot([model])
    assert snapshot.unchanged([model])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # an optimizer step
    model.head.weight.data = torch.randn(2, 4)  # new storage, same Parameter object
    model.layers[0].scale.fill_(3.0)
    assert snapshot.unchanged([model])


def _replace_param_setattr(m: torch.nn.Module) -> None:
    m.layers[1].proj.weight = torch.nn.Parameter(m.layers[1].proj.weight.detach().clone())


def _replace_param_in_slot_dict(m: torch.nn.Module) -> None:  # what torch's swap_tensor does
    m.layers[2].norm._parameters["bias"] = torch.nn.Parameter(torch.zeros(4))


def _replace_buffer(m: torch.nn.Module) -> None:
    m.layers[0].scale = torch.ones(1)  # same value, new tensor


def _replace_non_persistent_buffer(m: torch.nn.Module) -> None:
    m.layers[0].register_buffer("scratch", torch.zeros(2), persistent=False)


def _delete_param(m: torch.nn.Module) -> None:
    del m.layers[1].proj.bias


def _add_param_to_a_leaf_without_any(m: torch.nn.Module) -> None:
    m.layers[2].act.gain = torch.nn.Parameter(torch.ones(1))


def _add_buffer(m: torch.nn.Module) -> None:
    m.head.register_buffer("extra", torch.zeros(1))


def _replace_submodule(m: torch.nn.Module) -> None:
    m.layers[1].proj = torch.nn.Linear(4, 4)


def _add_submodule(m: torch.nn.Module) -> None:
    m.layers[0].act.inner = torch.nn.Identity()


def _modulelist_delete(m: torch.nn.Module) -> None:  # assigns a new _modules dict
    del m.layers[0]


def _modulelist_insert(m: torch.nn.Module) -> None:  # writes _modules directly
    m.layers.insert(1, Block())


def _rename_param(m: torch.nn.Module) -> None:  # the last slot of norm: same object, same position
    bias = m.layers[0].norm._parameters.pop("bias")
    m.layers[0].norm._parameters["bias_renamed"] = bias


def _slot_dict_reassigned(m: torch.nn.Module) -> None:  # the old dict keeps its old contents
    m.layers[2]._modules = {**m.layers[2]._modules, "proj": torch.nn.Linear(4, 4)}


def _none_bias_becomes_a_param(m: torch.nn.Module) -> None:
    m.head.bias = torch.nn.Parameter(torch.zeros(2))


CHANGES: dict[str, Callable[[torch.nn.Module], None]] = {
    f.__name__.lstrip("_"): f
    for f in (
        _replace_param_setattr, _replace_param_in_slot_dict, _replace_buffer, _replace_non_persistent_buffer,
        _delete_param, _add_param_to_a_leaf_without_any, _add_buffer, _replace_submodule, _add_submodule,
        _modulelist_delete, _modulelist_insert, _rename_param, _slot_dict_reassigned, _none_bias_becomes_a_param,
    )
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_every_structural_change_reads_changed(change):
    model = tree()
    snapshot = ModuleTreeSnapshot([model])
    CHANGES[change](model)
    assert not snapshot.unchanged([model])


def test_other_roots_read_changed():
    first, second = tree(), tree()
    snapshot = ModuleTreeSnapshot([first, second])
    assert snapshot.unchanged([first, second])
    assert not snapshot.unchanged([second, first])
    assert not snapshot.unchanged([first])
    assert not snapshot.unchanged([first, tree()])


def test_a_change_in_the_second_chunk_reads_changed():
    first, second = tree(), tree()
    snapshot = ModuleTreeSnapshot([first, second])
    _replace_buffer(second)
    assert not snapshot.unchanged([first, second])


def test_a_snapshot_does_not_keep_its_roots_alive():
    model = tree()
    snapshot = ModuleTreeSnapshot([model])
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    assert snapshot is not None
