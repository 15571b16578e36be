"""Model organisms: small interleaved speech-text LMs trained here on real synthetic speech.

Build-time only (corpus, TTS, units, training). The library core never imports this package;
the shipped organisms under ``organisms/`` at the repository root are ordinary checkpoints.
"""
