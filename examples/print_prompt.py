"""Read a manifest and print one utterance's interleaved prompt with its position table.

    python examples/print_prompt.py                       # tiny random SpiritLM, utterance s1
    python examples/print_prompt.py --id s4 --speech 1 2  # words 1 and 2 spoken, the rest text
    python examples/print_prompt.py --checkpoint PATH --family spiritlm

Without ``--checkpoint`` a tiny SpiritLM checkpoint in the real on-disk format (random weights,
real token ids) is built in a temporary directory, so this runs offline in seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from speech_lens import load_model
from speech_lens.data.manifest import read_manifest
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.word_targets import word_targets

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", default=str(HERE / "data" / "sample_manifest.jsonl"))
    ap.add_argument("--id", default="s1", help="utterance id (default s1)")
    ap.add_argument("--checkpoint", help="model directory (default: build a tiny SpiritLM)")
    ap.add_argument("--family", default=None, help="family name when --checkpoint is given")
    ap.add_argument("--speech", type=int, nargs="*", help="spoken word indices (default: sampled)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the span sampler")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model = load_model(args.checkpoint, family=args.family)
        else:
            from speech_lens.testing.families import build_family

            os.environ.setdefault("SPEECH_LENS_CACHE", str(Path(tmp) / "cache"))
            path, kw = build_family("spiritlm", tmp)
            model = load_model(path, **kw)

        reader = read_manifest(args.manifest, layout=model.layout)
        utt = None
        for u in reader:  # stream the whole file so the report counts every record
            if u.id == args.id:
                utt = u
        print(reader.report.summary())
        if utt is None:
            raise SystemExit(f"no utterance {args.id!r} in {args.manifest}")

        prompt = encode_prompt(
            model,
            utt,
            mode="interleaved",
            speech_words=set(args.speech) if args.speech is not None else None,
            seed=args.seed,
            span_sampler="spiritlm",
        )
        print(f"\nutterance {utt.id}: {utt.text!r} ({len(utt.units)} units at {utt.frame_rate} Hz)")
        print(f"family {prompt.family}, {len(prompt)} positions, unit rule {prompt.unit_rule!r}")
        print(f"prompt: {prompt.text}\n")
        print(prompt.format_table())
        print("\nword spans (positions) and text targets (spaced / bare ids):")
        for span, tgt in zip(prompt.spans, word_targets(model, utt), strict=True):
            print(
                f"  {span.index:>2} {span.text:<10} {span.modality:<7} [{span.start}:{span.end})"
                f"  {list(tgt.spaced)} / {list(tgt.bare)}"
            )


if __name__ == "__main__":
    main()
