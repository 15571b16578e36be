"""Tokenize an audio dataset into a unit manifest, resumably."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from speech_lens.audio.align import AlignmentError, align_cached
from speech_lens.audio.decode import AudioError
from speech_lens.audio.tokenizers.registry import FrameUnits, SpeechTokenizer, SpeechTokenizerError
from speech_lens.data.manifest import utterance_to_record
from speech_lens.data.utterance import DataError, Utterance
from speech_lens.models.checkpoint import detect_family
from speech_lens.models.spec import CHECKPOINT_SPEC, AdapterError, AdapterSpec, get_spec

# --------------------------------------------------------------------------------------------
# Pipeline: audio records -> utterances -> JSONL manifest (resumable)
# --------------------------------------------------------------------------------------------


def checkpoint_spec(
    path: str | Path, *, family: str | None = None, spec: str | Path | None = None
) -> Any:
    """The adapter spec of a checkpoint without loading its weights (as ``load_model`` picks it)."""

    p = Path(path)
    if spec is not None:
        return get_spec(spec)
    if family is not None:
        return get_spec(family)
    if not p.is_dir():
        raise AdapterError(f"checkpoint {p} is not a directory")
    if (p / CHECKPOINT_SPEC).exists():
        return AdapterSpec.from_toml(p / CHECKPOINT_SPEC)
    return detect_family(p)


def check_compatible(
    tokenizer: SpeechTokenizer, spec: Any, *, allow_family_mismatch: bool = False
) -> None:
    """Refuse a tokenizer made for another vocabulary layout than the checkpoint's."""
    fam = tokenizer.family
    if fam != spec.name and not allow_family_mismatch:
        raise SpeechTokenizerError(
            f"speech tokenizer targets the {fam!r} layout but the checkpoint is {spec.name!r} "
            f"(units {spec.units.pattern.format(k=0)}.., {spec.units.count} of them, "
            f"{spec.units.frame_rate:g} Hz); pick the checkpoint's tokenizer or pass "
            "--allow-family-mismatch"
        )


@dataclass
class TokenizeSummary:
    """What a ``tokenize`` run did (new utterances only, except ``n_total``)."""

    out: str
    n_total: int = 0  # utterances in the output manifest
    n_new: int = 0
    n_resumed: int = 0  # skipped because their id was already in the output
    n_failed: int = 0
    words: int = 0
    audio_seconds: float = 0.0
    frames: int = 0
    units: int = 0  # deduplicated units
    words_without_units: list[tuple[str, str]] = field(default_factory=list)  # (id, word)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (id, error)

    def add(self, utt: Utterance) -> None:
        """Count a newly written utterance."""
        self.n_new += 1
        self.n_total += 1
        self.words += len(utt.words)
        self.audio_seconds += utt.duration
        self.frames += utt.n_frames
        self.units += len(utt.units) if utt.durations is not None else len(utt.dedup().units)
        covered = set(utt.unit_words())
        self.words_without_units += [
            (utt.id, w.text) for i, w in enumerate(utt.words) if i not in covered
        ]

    @property
    def units_per_second(self) -> float:
        return self.units / self.audio_seconds if self.audio_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "utterances_total": self.n_total,
            "utterances_new": self.n_new,
            "utterances_resumed": self.n_resumed,
            "utterances_failed": self.n_failed,
            "words": self.words,
            "audio_seconds": round(self.audio_seconds, 3),
            "frames": self.frames,
            "units": self.units,
            "units_per_second": round(self.units_per_second, 3),
            "words_without_units": len(self.words_without_units),
        }

    def text(self) -> str:
        d = self.as_dict()
        lines = [
            f"wrote {d['out']}: {d['utterances_total']} utterances "
            f"({d['utterances_new']} new, {d['utterances_resumed']} already there, "
            f"{d['utterances_failed']} failed)",
            f"new: {d['words']} words, {d['audio_seconds']:.1f} s of audio, {d['frames']} frames, "
            f"{d['units']} units after dedup = {d['units_per_second']:.2f} units/s",
            f"words without units: {d['words_without_units']}"
            + (
                " (e.g. " + ", ".join(f"{u}:{w}" for u, w in self.words_without_units[:5]) + ")"
                if self.words_without_units
                else ""
            ),
        ]
        lines += [f"failed {u}: {e}" for u, e in self.failures[:20]]
        return "\n".join(lines)


def tokenize_record(
    rec: Any,
    tokenizer: SpeechTokenizer,
    *,
    aligner: Any = None,
    align_cache: Any = None,
    dedup: bool = True,
    n_units: int | None = None,
    frame_rate: float | None = None,
    prosody_counts: dict[str, int] | None = None,
) -> Any:
    """One :class:`speech_lens.audio.AudioRecord` -> :class:`speech_lens.data.Utterance`."""

    audio, sr = rec.load(sample_rate=int(tokenizer.expected_sample_rate))
    words = rec.words
    if not words:
        text = rec.transcript
        if not text:
            raise AudioError(f"{rec.where or rec.id}: no word timings and no transcript")
        if aligner is None:
            raise AlignmentError(
                f"{rec.where or rec.id}: no word timings; align the transcript with "
                "--align pocketsphinx (pip install pocketsphinx) or supply timings"
            )
        words = align_cached(aligner, audio, sr, text, cache=align_cache, where=rec.where or rec.id)
    if getattr(tokenizer, "needs_words", False):
        fu = tokenizer(audio, sr, words=words)  # type: ignore[call-arg]
    else:
        fu = tokenizer(audio, sr)
    if not isinstance(fu, FrameUnits):
        raise SpeechTokenizerError(f"tokenizer returned {type(fu).__name__}, not FrameUnits")
    if fu.n_frames == 0:
        raise SpeechTokenizerError(f"{rec.where or rec.id}: the tokenizer produced no units")
    if n_units is not None and int(fu.units.max()) >= n_units:
        raise SpeechTokenizerError(
            f"{rec.where or rec.id}: unit {int(fu.units.max())} is outside the checkpoint's "
            f"{n_units} units"
        )
    if frame_rate is not None and abs(fu.frame_rate - frame_rate) > 0.01 * frame_rate:
        raise SpeechTokenizerError(
            f"{rec.where or rec.id}: tokenizer frames are {fu.frame_rate:g} Hz, the checkpoint's "
            f"units are {frame_rate:g} Hz"
        )
    for name, st in fu.streams.items():
        count = prosody_counts.get(name) if prosody_counts else None
        if count is not None and max(st.units) >= count:
            raise SpeechTokenizerError(
                f"{rec.where or rec.id}: {name} unit {max(st.units)} is outside the checkpoint's "
                f"{count} {name} units"
            )
    if prosody_counts and set(prosody_counts) - set(fu.streams):
        raise SpeechTokenizerError(
            f"{rec.where or rec.id}: the checkpoint expects {sorted(prosody_counts)} streams, the "
            f"tokenizer gave {sorted(fu.streams) or 'none'}"
        )
    if fu.words is not None:
        words = fu.words  # re-timed onto the tokenizer's unit grid
    own_runs = dedup and fu.runs is not None
    utt = Utterance(
        id=rec.id,
        words=tuple(words),
        units=fu.runs[0] if own_runs and fu.runs else tuple(int(u) for u in fu.units),
        durations=fu.runs[1] if own_runs and fu.runs else None,
        frame_rate=fu.frame_rate,
        speaker=rec.speaker,
        text=rec.text or "",
        split=rec.split,
        pitch=fu.streams.get("pitch"),
        style=fu.streams.get("style"),
    )
    return utt if own_runs or not dedup else utt.dedup()


def _resume(out: Path) -> tuple[Path, set[str]]:
    """Merge the finished output and a crashed run's ``.partial`` into a fresh ``.partial``."""
    partial = out.with_name(out.name + ".partial")
    kept: list[str] = []
    ids: set[str] = set()
    for src in (out, partial):
        if not src.is_file():
            continue
        for line in src.read_text(encoding="utf-8").splitlines():
            try:
                uid = json.loads(line).get("id")
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut by a crash
            if isinstance(uid, str) and uid not in ids:
                ids.add(uid)
                kept.append(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in kept)
    os.replace(tmp, partial)
    return partial, ids


def tokenize_dataset(
    records: Any,
    tokenizer: SpeechTokenizer,
    out: str | Path,
    *,
    spec: Any = None,
    aligner: Any = None,
    align_cache: Any = None,
    dedup: bool | None = None,
    skip_errors: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> TokenizeSummary:
    """Tokenize audio records into a JSONL manifest (``speech_lens.data`` schema).

    Resumes: ids already in ``out`` (or in ``out.partial`` left by a crash) are skipped. Records
    are appended to ``out.partial`` as they finish and the file replaces ``out`` at the end, so
    ``out`` is always complete. ``spec`` (the checkpoint's adapter spec) checks unit range and
    frame rate and decides dedup. Bad records raise (naming the file) unless ``skip_errors``.
    """

    out = Path(out)
    if dedup is None:
        dedup = bool(spec.units.dedup) if spec is not None else True
    partial, done = _resume(out)
    checks = spec_checks(spec, dedup)
    summ = TokenizeSummary(str(out), n_total=len(done))
    exact = hasattr(records, "__len__") and getattr(records, "exact", True)
    total = len(records) if exact else None  # rows of renderings: count unknown up front
    if limit is not None and total is not None:
        total = min(total, limit)
    bar = tqdm(total=total, desc="tokenize", unit="utt", disable=not progress)
    seen = 0
    with partial.open("a", encoding="utf-8") as f:
        for rec in records:
            if limit is not None and seen >= limit:
                break
            seen += 1
            bar.update(1)
            if rec.id in done:
                summ.n_resumed += 1
                continue
            try:
                utt = tokenize_record(
                    rec, tokenizer, aligner=aligner, align_cache=align_cache, **checks
                )
            except (AudioError, AlignmentError, SpeechTokenizerError, DataError) as e:
                if not skip_errors:
                    f.flush()
                    raise
                summ.n_failed += 1
                summ.failures.append((rec.id, str(e)))
                continue
            f.write(json.dumps(manifest_row(rec, utt), ensure_ascii=False) + "\n")
            f.flush()  # a crash loses at most the line being written
            done.add(utt.id)
            summ.add(utt)
    bar.close()
    os.replace(partial, out)
    return summ


def spec_checks(spec: Any, dedup: bool) -> dict[str, Any]:
    """``tokenize_record``'s checks from the checkpoint's spec (none without a spec)."""
    return {
        "dedup": dedup,
        "n_units": spec.units.count if spec is not None else None,
        "frame_rate": spec.units.frame_rate if spec is not None else None,
        "prosody_counts": (
            {k: v.count for k, v in spec.prosody.items()} if spec is not None else None
        ),
    }


def manifest_row(rec: Any, utt: Utterance) -> dict[str, Any]:
    """The manifest line of ``utt``, with the record's ``meta`` and audio path when it has them."""
    row = utterance_to_record(utt)
    if rec.meta:
        row["meta"] = rec.meta
    if isinstance(rec.audio, str | Path):
        row["audio"] = str(rec.audio)
    return row
