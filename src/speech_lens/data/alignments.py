"""Word alignments: TextGrid files and aligned_text strings."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from speech_lens.data.utterance import SILENCE_LABELS, DataError, Utterance, Word

# --------------------------------------------------------------------------------------------
# slamkit metadata
# --------------------------------------------------------------------------------------------


def words_from_aligned_text(aligned: Any, *, utterance: str = "?") -> tuple[Word, ...]:
    """slamkit ``aligned_text`` ``[(" word", start, end), ...]`` -> words (leading spaces dropped;
    silence / empty entries skipped)."""
    if not isinstance(aligned, list):
        raise DataError(utterance, "aligned_text", "must be a list of [word, start, end]")
    out = []
    for i, t in enumerate(aligned):
        if not isinstance(t, list | tuple) or len(t) != 3 or not isinstance(t[0], str):
            raise DataError(
                utterance, f"aligned_text[{i}]", f"must be [word, start, end], got {t!r}"
            )
        if t[0].strip().lower() in SILENCE_LABELS:
            continue
        out.append(Word(t[0].strip(), t[1], t[2]))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Praat TextGrid
# --------------------------------------------------------------------------------------------

# a quoted string | an "[3]" index (long format, skipped) | a bare token (number or keyword)
_TOKEN = re.compile(r'"((?:[^"]|"")*)"|\[\s*\d*\s*\]|([^\s=\[\]:"]+)')


def read_textgrid(
    path: str | Path, tier: str = "words", *, engine: Literal["builtin", "praatio"] = "builtin"
) -> tuple[Word, ...]:
    """Words of a Praat TextGrid interval tier (long or short text format, as MFA writes them).

    Empty and silence intervals (``""``, ``sil``, ``sp``, ``<eps>``...) are not words. The
    built-in reader has no dependency; ``engine="praatio"`` uses praatio (optional extra).
    """
    path = Path(path)
    if engine == "praatio":
        return _textgrid_praatio(path, tier)
    raw = path.read_bytes()
    text = (
        raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    )
    # strings may contain anything; numbers and keywords are bare tokens; labels like "xmin =" and
    # "intervals [3]:" carry no information the order does not already give
    toks: list[str | float] = []
    for m in _TOKEN.finditer(text):
        if m.group(1) is not None:
            toks.append(m.group(1).replace('""', '"'))
        elif m.group(2) is not None:
            t = m.group(2)
            try:
                toks.append(float(t))
            except ValueError:
                if t in ("<exists>", "<absent>"):
                    toks.append(t)
    it = iter(toks)
    try:
        if next(it) != "ooTextFile" or next(it) != "TextGrid":
            raise DataError(
                str(path), "header", 'not a Praat TextGrid (expected "ooTextFile" "TextGrid")'
            )
        next(it), next(it)  # xmin xmax
        if next(it) != "<exists>":
            raise DataError(str(path), "tiers", "TextGrid has no tiers")
        n_tiers = int(_num(next(it), path))
        names = []
        for _ in range(n_tiers):
            cls, name = next(it), next(it)
            _num(next(it), path), _num(next(it), path)
            n = int(_num(next(it), path))
            names.append(name)
            items: list[tuple[float, float, str]] = []
            for _ in range(n):
                if cls == "IntervalTier":
                    a, b, label = _num(next(it), path), _num(next(it), path), next(it)
                    items.append((a, b, str(label)))
                else:
                    _num(next(it), path), next(it)
            if name == tier:
                if cls != "IntervalTier":
                    raise DataError(str(path), f"tier {tier}", f"is a {cls}, not an IntervalTier")
                return _tier_words(items, path)
    except StopIteration:
        raise DataError(
            str(path), "TextGrid", "file ends early (truncated or not a TextGrid)"
        ) from None
    raise DataError(str(path), "tier", f"no tier named {tier!r}; tiers are {names}")


def _num(x: Any, path: Path) -> float:
    if not isinstance(x, float):
        raise DataError(str(path), "TextGrid", f"expected a number, found {x!r}")
    return x


def _tier_words(items: Iterable[tuple[float, float, str]], path: Path) -> tuple[Word, ...]:
    out = []
    for a, b, label in items:
        if not isinstance(label, str) or label.strip().lower() in SILENCE_LABELS:
            continue
        out.append(Word(label.strip(), float(a), float(b)))
    return tuple(out)


def _textgrid_praatio(path: Path, tier: str) -> tuple[Word, ...]:
    try:
        from praatio import textgrid
    except ImportError:
        raise ImportError(
            "engine='praatio' needs praatio: pip install 'speech-lens[textgrid]'"
        ) from None
    tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    if tier not in tg.tierNames:
        raise DataError(
            str(path), "tier", f"no tier named {tier!r}; tiers are {list(tg.tierNames)}"
        )
    return _tier_words(((e.start, e.end, e.label) for e in tg.getTier(tier).entries), path)


def utterance_from_textgrid(
    path: str | Path,
    units: Sequence[int],
    *,
    frame_rate: float,
    durations: Sequence[int] | None = None,
    tier: str = "words",
    id: str | None = None,
    **kw: Any,
) -> Utterance:
    """A TextGrid word tier + units -> :class:`Utterance` (id defaults to the file stem)."""
    p = Path(path)
    return Utterance(
        id=id or p.stem,
        words=read_textgrid(p, tier),
        units=tuple(units),
        durations=None if durations is None else tuple(durations),
        frame_rate=frame_rate,
        **kw,
    )
