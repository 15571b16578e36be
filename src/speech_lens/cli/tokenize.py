"""`speech-lens tokenize`: audio dataset -> unit manifest."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from speech_lens.audio.align import AlignmentCache, AlignmentError, get_aligner
from speech_lens.audio.columns import Columns
from speech_lens.audio.datasets import open_audio_dataset
from speech_lens.audio.decode import AudioError
from speech_lens.audio.tokenize import check_compatible, checkpoint_spec, tokenize_dataset
from speech_lens.audio.tokenizers.lookup import get_speech_tokenizer
from speech_lens.audio.tokenizers.registry import SpeechTokenizerError
from speech_lens.data.utterance import DataError


def _tokenize(args: argparse.Namespace) -> int:
    """Audio (file, folder, manifest or table) -> the checkpoint's speech units -> JSONL manifest."""

    spec = checkpoint_spec(args.model, family=args.family, spec=args.spec)
    tk_kw = json.loads(args.tokenizer_args) if args.tokenizer_args else {}
    try:
        tok = get_speech_tokenizer(args.tokenizer or args.model, **tk_kw)
    except (ImportError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"speech-lens: error: speech tokenizer: {e}", file=sys.stderr)
        return 2
    try:
        check_compatible(tok, spec, allow_family_mismatch=args.allow_family_mismatch)
        cols = Columns.parse(args.columns) if args.columns else None
        data = open_audio_dataset(args.input, columns=cols, kind=args.kind, text=args.text)
        aligner = get_aligner(args.align) if args.align != "none" else None
        summary = tokenize_dataset(
            data,
            tok,
            args.out,
            spec=spec,
            aligner=aligner,
            align_cache=AlignmentCache(args.align_cache),
            skip_errors=args.skip_errors,
            limit=args.limit,
            progress=not args.no_progress,
        )
    except (AudioError, AlignmentError, SpeechTokenizerError, DataError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.n_failed else 0


def add_tokenize(sub: Any) -> None:
    p = sub.add_parser("tokenize", help="audio -> speech units + word timings -> JSONL manifest")
    p.add_argument(
        "input", help="audio file, folder, JSONL/CSV manifest, Parquet file or HF dataset dir"
    )
    p.add_argument(
        "--model", required=True, type=Path, help="checkpoint directory (picks layout + tokenizer)"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output JSONL manifest (resumed if present)"
    )
    p.add_argument(
        "--tokenizer", help="speech tokenizer name or module:factory (default: the checkpoint's)"
    )
    p.add_argument(
        "--tokenizer-args",
        help='JSON keyword arguments for the tokenizer, e.g. {"checkpoint_dir": "..."}',
    )
    p.add_argument("--family", help="family spec name (detected when omitted)")
    p.add_argument("--spec", type=Path, help="a user spec file (TOML)")
    p.add_argument(
        "--kind", default="auto", choices=["auto", "file", "folder", "manifest", "table"]
    )
    p.add_argument("--text", help="transcript of a single audio file INPUT (else its .txt/.lab)")
    p.add_argument(
        "--columns",
        help="column map, e.g. 'id=uid,text=prompt,audio=a1|a2,words=w1|w2,meta=correct'; "
        "a preset first: 'csfa' (Common-Sense Facts Audio) or 'csfa,text=question'",
    )
    p.add_argument(
        "--align",
        default="none",
        choices=["none", "pocketsphinx"],
        help="aligner for records without word timings",
    )
    p.add_argument(
        "--align-cache", type=Path, help="alignment cache dir (default $SPEECH_LENS_CACHE/align)"
    )
    p.add_argument(
        "--skip-errors", action="store_true", help="skip bad records (listed in the summary)"
    )
    p.add_argument("--allow-family-mismatch", action="store_true")
    p.add_argument("--limit", type=int, help="process at most N records")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", type=Path, help="also write the summary as JSON")
    p.set_defaults(func=_tokenize)
