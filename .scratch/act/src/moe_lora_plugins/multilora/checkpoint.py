"""Per-adapter checkpoints that a crash cannot leave half-written, and that resume every piece of state.

Layout: ``ROOT/<adapter>/step_<NNNNNNNN>/`` holding one ``rank<R>.pt`` per trainer rank (that rank's
adapter weights, its optimizer state and its torch RNG state) and ``manifest.json`` (adapter spec,
step, world size, the adapter's data-source position, its metrics). Everything is written under
``ROOT/<adapter>/.tmp-step_<NNNNNNNN>/`` (each file: temp name, fsync, rename), the manifest last, then
the directory is renamed into place and its parent fsynced. A directory without a manifest, a temp
directory, or a name that is not exactly ``step_<digits>`` is never taken for a checkpoint.

Loading checks what it restores: the weights must name exactly the parameters the live slot holds (a
slot that is not materialised yet has none, which is an error, not "0 tensors loaded").
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_lora_plugins.errors import MoeLoraError

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{1,12})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(MoeLoraError, RuntimeError):
    """A checkpoint that cannot be written, found or restored as asked; the message names the path."""


def step_dir_name(step: int) -> str:
    """``step_00000012`` for step 12 (zero-padded so names also sort in step order)."""
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step {step!r} must be an integer >= 0")
    return f"step_{step:08d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a directory named ``step_<digits>``; ``None`` for any other name (temp dirs, ``step_5.bak``,
    ``step_x``, ``step_-1``, ``latest``)."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def shard_name(rank: int) -> str:
    return f"rank{rank}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(file)`` to ``path.tmp``, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint of one adapter: its step and directory, and its manifest."""

    adapter: str
    step: int
    path: Path
    manifest: dict[str, Any]


def adapter_root(root: str | os.PathLike, adapter: str) -> Path:
    return Path(root) / adapter


def staging_dir(root: str | os.PathLike, adapter: str, step: int) -> Path:
    return adapter_root(root, adapter) / (_TMP_PREFIX + step_dir_name(step))


def prepare(root: str | os.PathLike, adapter: str, step: int) -> Path:
    """Make an empty staging directory for (adapter, step), removing a stale one a crash left behind.
    One rank calls it, then every rank may :func:`write_shard` (barrier between)."""
    stage = staging_dir(root, adapter, step)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def write_shard(stage: Path, rank: int, weights: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
                rng: Mapping[str, Any] | None = None) -> Path:
    """This rank's share of the adapter into the staging directory (atomically)."""
    payload = {"format": FORMAT, "rank": rank,
               "weights": {name: t.detach().to("cpu", copy=True) for name, t in weights.items()},
               "optimizer": optimizer, "rng": dict(rng or {})}
    path = stage / shard_name(rank)
    _atomic_write(path, lambda handle: torch.save(payload, handle))
    return path


def commit(root: str | os.PathLike, adapter: str, step: int, world_size: int, manifest: Mapping[str, Any]) -> Path:
    """Seal the staging directory: check every rank's shard is there, write the manifest, rename into place.
    One rank calls it after every rank wrote its shard."""
    stage = staging_dir(root, adapter, step)
    missing = [shard_name(r) for r in range(world_size) if not (stage / shard_name(r)).is_file()]
    if missing:
        raise CheckpointError(f"{stage}: shards {missing} were not written; every rank must write_shard before commit")
    body = {"format": FORMAT, "adapter": adapter, "step": step, "world_size": world_size, **dict(manifest)}
    _atomic_write(stage / MANIFEST, lambda handle: handle.write(json.dumps(body, indent=1, sort_keys=True).encode()))
    final = adapter_root(root, adapter) / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    _fsync_dir(final.parent)
    return final


def list_checkpoints(root: str | os.PathLike, adapter: str) -> list[CheckpointRef]:
    """Every complete checkpoint of ``adapter`` (a ``step_<digits>`` directory with its manifest), by step."""
    base = adapter_root(root, adapter)
    if not base.is_dir():
        return []
    found: dict[int, CheckpointRef] = {}
    for entry in base.iterdir():
        step = parse_step_dir(entry.name)
        if step is None or not entry.is_dir() or not (entry / MANIFEST).is_file():
            continue
        if step in found:
            raise CheckpointError(
                f"{base}: {found[step].path.name} and {entry.name} are both step {step}; remove one"
            )
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("step") != step or manifest.get("adapter") != adapter:
            raise CheckpointError(
                f"{entry}: the manifest says adapter {manifest.get('adapter')!r} step {manifest.get('step')!r} "
                f"format {manifest.get('format')!r}; expected {adapter!r}, {step}, {FORMAT}"
            )
        found[step] = CheckpointRef(adapter, step, entry, manifest)
    return [found[s] for s in sorted(found)]


def latest_checkpoint(root: str | os.PathLike, adapter: str) -> CheckpointRef | None:
    """The highest-step complete checkpoint of ``adapter``, or ``None``."""
    refs = list_checkpoints(root, adapter)
    return refs[-1] if refs else None


def read_shard(ref: CheckpointRef, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's share of a checkpoint; the world size must be the one it was written with."""
    if int(ref.manifest["world_size"]) != world_size:
        raise CheckpointError(
            f"{ref.path} was written by {ref.manifest['world_size']} trainer ranks; this run has {world_size} "
            "(resume with the same layout)"
        )
    path = ref.path / shard_name(rank)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT or payload.get("rank") != rank:
        raise CheckpointError(f"{path}: format {payload.get('format')!r} rank {payload.get('rank')!r}; "
                              f"expected {FORMAT} and {rank}")
    return payload


def load_weights(params: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], where: str) -> int:
    """Copy ``weights`` into the live ``params`` (same names, same shapes); returns how many tensors.

    ``params`` empty means the adapter's slot holds no parameters here yet: that is an error (materialise
    the slot, then load), never a silent load of nothing.
    """
    if not params and weights:
        raise CheckpointError(
            f"{where}: the adapter's slot has no parameters on this rank but the checkpoint holds "
            f"{len(weights)}; materialise the slot before loading the checkpoint"
        )
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"{where}: checkpoint and live slot disagree; missing in checkpoint {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''}, not in the slot {extra[:4]}{'...' if len(extra) > 4 else ''}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = weights[name]
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{where}: {name} has shape {tuple(value.shape)} in the checkpoint, "
                                      f"{tuple(param.shape)} live (same rank and targets?)")
            param.copy_(value)
    return len(params)


def capture_rng() -> dict[str, Any]:
    """torch's CPU RNG state (and CUDA's where present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
