"""The exceptions a user of moe-lora-plugins can meet, in one module so hosts can catch them by type."""

from __future__ import annotations


class MoeLoraError(Exception):
    """Base class of every error this package raises on purpose."""


class SettingsError(MoeLoraError, ValueError):
    """A ``MOELORA_*`` variable (or an equivalent argument) has a value we do not accept."""


class PatchError(MoeLoraError, RuntimeError):
    """A patch could not be applied as declared (raised under ``MOELORA_STRICT=1``)."""


class IncompatibleVersionError(PatchError):
    """The installed distribution is outside the patch's declared version range."""


class SignatureDriftError(PatchError):
    """The upstream symbol's signature no longer matches the fingerprint the patch was written for."""


class MissingSymbolError(PatchError, ImportError):
    """The upstream module no longer has the attribute the patch targets."""


class RequiredPatchError(PatchError):
    """A patch named in ``MOELORA_REQUIRE`` is not applied (and cannot be) in this process."""


class PluginError(MoeLoraError):
    """A plugin failed to load or implements a hook that does not exist."""
