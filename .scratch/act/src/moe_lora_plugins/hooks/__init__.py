"""pluggy hook specifications (``hookspec.py``) and the plugin manager (``manager.py``).

Plugins mark their implementations with :data:`hookimpl`.
"""

from moe_lora_plugins.hooks.manager import ENTRY_POINT_GROUP, PROJECT, hookimpl

__all__ = ["ENTRY_POINT_GROUP", "PROJECT", "hookimpl"]
