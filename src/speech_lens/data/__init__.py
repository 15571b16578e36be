"""Utterances, unit streams, manifests, alignments and prompts."""
