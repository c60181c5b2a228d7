"""The ``.pth`` bootstrap: with ``MOELORA_PLUGINS`` set, activate once site initialisation is done.

Only the standard library is imported here. The ``.pth`` line runs while ``site`` is still
processing ``.pth`` files, when other path entries (editable installs, later ``.pth`` files) may be
missing; so activation is deferred to the end of site initialisation by wrapping
``site.execsitecustomize``, which ``site.main`` looks up and calls after every ``.pth`` file. If
this runs outside ``site.main`` (a later ``site.addsitedir``), it activates at once.
"""

from __future__ import annotations

import sys

_installed = False


def _inside_site_main() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "site":
            return True
        frame = frame.f_back
    return False


def _strict_requested() -> bool:
    """``MOELORA_STRICT`` as parsed; a malformed value counts as strict (the user asked for something)."""
    import os

    from moe_lora_plugins.envs import parse_bool

    try:
        return parse_bool("MOELORA_STRICT", os.environ.get("MOELORA_STRICT"))
    except Exception:
        return True


def _activate_from_environment(*, inside_site: bool) -> None:
    """Activate, or say why not. Under ``MOELORA_STRICT`` (or a ``MOELORA_REQUIRE`` failure) stop the process.

    Without strict mode a failure is reported on stderr and the interpreter runs unpatched, as the
    README says; with it, a process that cannot be patched as configured must not run at all. Inside
    ``site.main`` a raised ``SystemExit`` would turn into a "Fatal Python error" with two tracebacks,
    so there the message is printed and the process exits with status 1 at once.
    """
    try:
        from moe_lora_plugins.envs import is_switched_on

        if not is_switched_on():
            return
        import os

        from moe_lora_plugins.activation import activate

        activate(role=os.environ.get("MOELORA_ROLE") or None)
    except Exception as exc:  # report and let the interpreter start: we are inside site initialisation
        from moe_lora_plugins.errors import RequiredPatchError

        message = f"moe-lora-plugins: activation failed ({type(exc).__name__}): {exc}"
        if isinstance(exc, RequiredPatchError) or _strict_requested():
            message += "\nmoe-lora-plugins: stopping this process (MOELORA_STRICT / MOELORA_REQUIRE)"
            if not inside_site:
                raise SystemExit(message) from exc
            import os

            print(message, file=sys.stderr, flush=True)
            os._exit(1)
        print(f"{message}\nmoe-lora-plugins: running unpatched (set MOELORA_STRICT=1 to stop instead)",
              file=sys.stderr)


def install() -> None:
    """Called from the ``.pth`` line: activate now, or right after ``site`` has run sitecustomize.

    The same ``.pth`` can be processed twice (``lib`` and a ``lib64`` link to it): only the first counts.
    """
    global _installed
    if _installed:
        return
    _installed = True
    import site

    if not _inside_site_main():
        _activate_from_environment(inside_site=False)
        return
    original = site.execsitecustomize

    def execsitecustomize_then_activate() -> None:
        site.execsitecustomize = original
        original()
        _activate_from_environment(inside_site=True)

    site.execsitecustomize = execsitecustomize_then_activate
