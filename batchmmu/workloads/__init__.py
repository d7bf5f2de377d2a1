"""Bundled workloads for ``batchmmu validate`` (TOML), read with importlib.resources."""
