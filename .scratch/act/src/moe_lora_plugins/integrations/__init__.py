"""Host seams: thin functions that hosts call (entry points, dotted paths, Ray runtime_env)."""
