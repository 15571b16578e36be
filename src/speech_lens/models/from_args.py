"""The checkpoint options every CLI command shares, turned into a loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speech_lens.models.devices import parse_device_map, parse_max_memory
from speech_lens.models.load import DTYPES, SpeechLM, load_model
from speech_lens.models.rebuild import rebuild_unit_lm
from speech_lens.models.spec import AdapterError


def load_from_args(args: Any, checkpoint: str | Path | None = None, **kw: Any) -> SpeechLM:
    """``load_model`` with the checkpoint options every CLI command shares
    (``--family``, ``--spec``, ``--base-tokenizer``, and where the parser has them
    ``--dtype``, ``--device-map``, ``--max-memory``, ``--offload-folder``); ``kw`` wins.
    A checkpoint that is a unit delta file (``*.safetensors``, ``models/delta.py``) is rebuilt
    from its installed base on first use and loaded as ``sims`` with the base's tokenizer."""
    opts: dict[str, Any] = {}
    dtype = getattr(args, "dtype", None)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise AdapterError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
        opts["dtype"] = DTYPES[dtype]
    device_map = parse_device_map(getattr(args, "device_map", None))
    if device_map is not None:
        opts["device_map"] = device_map
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    if max_memory is not None:
        opts["max_memory"] = max_memory
    if getattr(args, "offload_folder", None) is not None:
        opts["offload_folder"] = args.offload_folder
    opts.update(kw)
    path = Path(checkpoint if checkpoint is not None else args.checkpoint)
    family, base_tokenizer = args.family, args.base_tokenizer
    if path.is_file() and path.suffix == ".safetensors":  # a unit delta: rebuild it (cached)
        rebuilt = rebuild_unit_lm(path)
        path = rebuilt.path
        family = family or rebuilt.family
        base_tokenizer = base_tokenizer or rebuilt.base_tokenizer
    return load_model(path, family=family, spec=args.spec, base_tokenizer=base_tokenizer, **opts)
