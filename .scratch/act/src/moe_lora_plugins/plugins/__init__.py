"""Built-in pluggy plugins: the policies that compose features (listed in ``hooks.manager.BUILTIN_PLUGINS``)."""
