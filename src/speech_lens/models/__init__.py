"""Checkpoint families and loading: spec (TOML schema), checkpoint files, layout, memory, devices, load."""
