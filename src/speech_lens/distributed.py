"""`python -m speech_lens.distributed` (the torchrun entry point); the code is in runs/ and cli/."""

from speech_lens.cli.distributed import main

if __name__ == "__main__":
    raise SystemExit(main())
