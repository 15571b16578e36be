"""Runs: the things that write run folders (lens, patch, tuned lens, distributed, compare, demo)."""
