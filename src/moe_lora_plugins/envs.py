"""Every ``MOELORA_*`` environment switch, parsed in one place.

The rest of the package reads settings only through :func:`load_settings`, so the accepted values,
defaults and error messages live here and in the table that ``doctor`` and the README print.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from moe_lora_plugins.errors import SettingsError

_TRUE = ("1", "on", "true", "yes")
_FALSE = ("", "0", "off", "false", "no")


@dataclass(frozen=True)
class Switch:
    """One environment variable: its name, what it accepts, its default and what it does."""

    name: str
    accepts: str
    default: str
    meaning: str


SWITCHES: tuple[Switch, ...] = (
    Switch("MOELORA_PLUGINS", "on|off (1/0, true/false, yes/no)", "off",
           "Activate the suite in every Python process of this environment (the .pth bootstrap and the "
           "vLLM / SGLang plugin entry points read it)."),
    Switch("MOELORA_PATCHES", "comma-separated patch ids, or 'all'", "all",
           "Allow-list: only these patches are applied. An unknown id is an error."),
    Switch("MOELORA_DISABLED_PATCHES", "comma-separated patch ids", "(none)",
           "Patches never applied in this process. An unknown id is an error."),
    Switch("MOELORA_STRICT", "on|off", "off",
           "Raise instead of logging at ERROR when a patch is incompatible, drifted or missing its symbol."),
    Switch("MOELORA_REQUIRE", "comma-separated patch ids", "(none)",
           "These patches must end up applied in this process; a process where one cannot be applied "
           "fails fast with RequiredPatchError."),
    Switch("MOELORA_STATUS_DIR", "a directory path", "(unset)",
           "Each process writes status-<host>-<pid>.json there: role, argv and every patch's status."),
    Switch("MOELORA_DEBUG", "on|off", "off",
           "Trace every pluggy hook call and log patch decisions at DEBUG to stderr."),
    Switch("MOELORA_ROLE", "a short name (trainer, vllm, sglang, ...)", "(unset)",
           "The role the .pth bootstrap and the Ray setup hook activate with; written to status files."),
    Switch("MOELORA_EXPORT_AUDIT", "on|off", "on",
           "Audit every patched trainer export: each global (layer, expert, projection) once, right shape."),
    Switch("MOELORA_BLOCKED_PLUGINS", "comma-separated plugin names", "(none)",
           "Plugins (built-in or from the 'moelora.plugins' entry-point group) that are never registered."),
    Switch("MOELORA_TRUE_ON_POLICY", "on|off", "off",
           "True-on-policy mode: the trainer's and the engine's scoring ops become the batch-invariant ones of "
           "moe_lora_plugins.onpolicy.ops, so recomputed log-probs equal the engine's bit for bit. Set it in "
           "the trainer and the engine processes alike."),
    Switch("MOELORA_ONPOLICY_GATE", "exact | a tolerance (e.g. 1e-6) | off", "off",
           "What moe_lora_plugins.onpolicy.gate.check_step does with a step's train/rollout log-prob diff: "
           "exact fails on any diff other than 0.0, a tolerance fails above it, off only reports."),
    Switch("MOELORA_SYNC_FILL_THREADS", "a whole number >= 1", "min(4, usable CPUs)",
           "Threads that copy an adapter sync's pieces into one host bucket (shared-memory and CPU transports) "
           "when the bucket holds at least 8 MiB; 1 copies on the calling thread only."),
    Switch("MOELORA_MERGE_BLOCK_MIB", "a whole number >= 1", "256 (512 with the fused kernel)",
           "A merged export on an accelerator (the per-layer merged stream of megatron_bridge.batched_expert_merge) "
           "merges its LoRA-wrapped weights in blocks whose float32 deltas (with the fused kernel: whose merged "
           "weights) take at most this many MiB: larger blocks are fewer launches and more memory. Read when a "
           "model's first merged export plans its blocks."),
    Switch("MOELORA_FUSED_MERGE", "on|off", "on",
           "A merged export on a CUDA device with Triton merges each block of LoRA-wrapped weights in one Triton "
           "launch (moe_lora_plugins.merge.fused), where its blocks are checked bitwise Megatron-Bridge's merge; "
           "off keeps the bmm blocks. Read when a model's first merged export plans its blocks."),
)

SWITCH_NAMES = frozenset(s.name for s in SWITCHES)


def parse_bool(name: str, raw: str | None, default: bool = False) -> bool:
    """Parse an on/off switch; anything else is an error that names the variable and the values."""
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(
        f"{name}={raw!r} is not an on/off value. Accepted: {', '.join(_TRUE)} to enable; "
        f"{', '.join(repr(v) for v in _FALSE)} to disable."
    )


def parse_id_list(raw: str | None) -> tuple[str, ...]:
    """Split a comma-separated list, dropping blanks and keeping order without duplicates."""
    if not raw:
        return ()
    seen: dict[str, None] = {}
    for item in raw.split(","):
        item = item.strip()
        if item:
            seen[item] = None
    return tuple(seen)


def parse_gate(raw: str | None) -> str:
    """``MOELORA_ONPOLICY_GATE``: ``exact``, ``off`` or a non-negative float tolerance (returned normalised)."""
    value = (raw or "off").strip().lower()
    if value in ("exact", "off"):
        return value
    try:
        tolerance = float(value)
    except ValueError:
        tolerance = -1.0
    if not tolerance >= 0.0:
        raise SettingsError(
            f"MOELORA_ONPOLICY_GATE={raw!r} is not 'exact', 'off' or a non-negative tolerance such as 1e-6. "
            "Use exact to fail any step whose trainer/rollout log-prob diff is not 0.0."
        )
    return repr(tolerance)


def parse_fill_threads(raw: str | None) -> int | None:
    """``MOELORA_SYNC_FILL_THREADS``: a whole number >= 1, or ``None`` when unset or blank (the default)."""
    value = (raw or "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise SettingsError(
            f"MOELORA_SYNC_FILL_THREADS={raw!r} is not a whole number >= 1. Set it to 1 to fill sync buckets "
            "on the calling thread only, or unset it for the default (min(4, usable CPUs))."
        )
    return threads


def parse_merge_block_mib(raw: str | None) -> int | None:
    """``MOELORA_MERGE_BLOCK_MIB``: a whole number >= 1, or ``None`` when unset or blank (the default)."""
    value = (raw or "").strip()
    if not value:
        return None
    try:
        mib = int(value)
    except ValueError:
        mib = 0
    if mib < 1:
        raise SettingsError(
            f"MOELORA_MERGE_BLOCK_MIB={raw!r} is not a whole number >= 1. Set it to the MiB of float32 LoRA deltas "
            "one block of a merged export may hold on an accelerator (e.g. 128), or unset it for the default (256)."
        )
    return mib


def is_switched_on(environ: Mapping[str, str] | None = None) -> bool:
    """Only ``MOELORA_PLUGINS``: the one lookup the bootstrap makes before anything else."""
    env = os.environ if environ is None else environ
    return parse_bool("MOELORA_PLUGINS", env.get("MOELORA_PLUGINS"))


@dataclass(frozen=True)
class Settings:
    """The parsed switches of one process."""

    enabled: bool = False
    patches: tuple[str, ...] | None = None  # None: all
    disabled_patches: tuple[str, ...] = ()
    strict: bool = False
    require: tuple[str, ...] = ()
    status_dir: str | None = None
    debug: bool = False
    blocked_plugins: tuple[str, ...] = ()
    role: str | None = None
    export_audit: bool = True
    true_on_policy: bool = False
    onpolicy_gate: str = "off"
    sync_fill_threads: int | None = None  # None: min(4, usable CPUs)
    merge_block_mib: int | None = None  # None: 256 (512 with the fused kernel)
    fused_merge: bool = True
    raw: Mapping[str, str] = field(default_factory=dict, compare=False)

    def patch_enabled(self, patch_id: str) -> bool:
        """Whether the allow-list and the deny-list let this patch apply."""
        if patch_id in self.disabled_patches:
            return False
        return self.patches is None or patch_id in self.patches

    def as_rows(self) -> list[dict[str, str]]:
        """One row per switch: name, raw value as set (or default) and parsed meaning, for ``doctor``."""
        parsed = {
            "MOELORA_PLUGINS": "on" if self.enabled else "off",
            "MOELORA_PATCHES": "all" if self.patches is None else ",".join(self.patches),
            "MOELORA_DISABLED_PATCHES": ",".join(self.disabled_patches),
            "MOELORA_STRICT": "on" if self.strict else "off",
            "MOELORA_REQUIRE": ",".join(self.require),
            "MOELORA_STATUS_DIR": self.status_dir or "",
            "MOELORA_DEBUG": "on" if self.debug else "off",
            "MOELORA_BLOCKED_PLUGINS": ",".join(self.blocked_plugins),
            "MOELORA_ROLE": self.role or "",
            "MOELORA_EXPORT_AUDIT": "on" if self.export_audit else "off",
            "MOELORA_TRUE_ON_POLICY": "on" if self.true_on_policy else "off",
            "MOELORA_ONPOLICY_GATE": self.onpolicy_gate,
            "MOELORA_SYNC_FILL_THREADS": "default" if self.sync_fill_threads is None else str(self.sync_fill_threads),
            "MOELORA_MERGE_BLOCK_MIB": "default" if self.merge_block_mib is None else str(self.merge_block_mib),
            "MOELORA_FUSED_MERGE": "on" if self.fused_merge else "off",
        }
        return [
            {"name": s.name, "set": self.raw.get(s.name, ""), "parsed": parsed[s.name], "default": s.default}
            for s in SWITCHES
        ]


def load_settings(
    environ: Mapping[str, str] | None = None, known_patch_ids: frozenset[str] | None = None
) -> Settings:
    """Parse every ``MOELORA_*`` variable; with ``known_patch_ids``, unknown ids are an error."""
    env = os.environ if environ is None else environ
    raw = {k: env[k] for k in SWITCH_NAMES if k in env}

    patches_raw = env.get("MOELORA_PATCHES")
    patches: tuple[str, ...] | None
    if patches_raw is None or patches_raw.strip().lower() in ("", "all"):
        patches = None
    else:
        patches = parse_id_list(patches_raw)

    settings = Settings(
        enabled=parse_bool("MOELORA_PLUGINS", env.get("MOELORA_PLUGINS")),
        patches=patches,
        disabled_patches=parse_id_list(env.get("MOELORA_DISABLED_PATCHES")),
        strict=parse_bool("MOELORA_STRICT", env.get("MOELORA_STRICT")),
        require=parse_id_list(env.get("MOELORA_REQUIRE")),
        status_dir=(env.get("MOELORA_STATUS_DIR") or "").strip() or None,
        debug=parse_bool("MOELORA_DEBUG", env.get("MOELORA_DEBUG")),
        blocked_plugins=parse_id_list(env.get("MOELORA_BLOCKED_PLUGINS")),
        role=(env.get("MOELORA_ROLE") or "").strip() or None,
        export_audit=parse_bool("MOELORA_EXPORT_AUDIT", env.get("MOELORA_EXPORT_AUDIT"), default=True),
        true_on_policy=parse_bool("MOELORA_TRUE_ON_POLICY", env.get("MOELORA_TRUE_ON_POLICY")),
        onpolicy_gate=parse_gate(env.get("MOELORA_ONPOLICY_GATE")),
        sync_fill_threads=parse_fill_threads(env.get("MOELORA_SYNC_FILL_THREADS")),
        merge_block_mib=parse_merge_block_mib(env.get("MOELORA_MERGE_BLOCK_MIB")),
        fused_merge=parse_bool("MOELORA_FUSED_MERGE", env.get("MOELORA_FUSED_MERGE"), default=True),
        raw=raw,
    )
    if known_patch_ids is not None:
        validate_patch_ids(settings, known_patch_ids)
    return settings


def validate_patch_ids(settings: Settings, known_patch_ids: frozenset[str]) -> None:
    """Reject patch ids the registry does not know, and requiring a patch that is switched off."""
    for name, ids in (
        ("MOELORA_PATCHES", settings.patches or ()),
        ("MOELORA_DISABLED_PATCHES", settings.disabled_patches),
        ("MOELORA_REQUIRE", settings.require),
    ):
        unknown = [i for i in ids if i not in known_patch_ids]
        if unknown:
            raise SettingsError(
                f"{name} names unknown patch id(s) {unknown}. Known ids: {sorted(known_patch_ids)}. "
                "Run `moe-lora-plugins doctor` to list them."
            )
    conflicting = [i for i in settings.require if not settings.patch_enabled(i)]
    if conflicting:
        raise SettingsError(
            f"MOELORA_REQUIRE names {conflicting}, but MOELORA_PATCHES / MOELORA_DISABLED_PATCHES "
            "switch them off. Remove them from one of the two."
        )
