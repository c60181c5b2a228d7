"""Reusable test support: the patch contract runner, and CPU harnesses for the host packages."""
