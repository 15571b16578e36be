"""Audio: decoding, datasets, forced alignment and speech tokenizers."""
