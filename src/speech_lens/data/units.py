"""Unit strings: plain unit lists and SpiritLM's interleaved unit strings."""

from __future__ import annotations

import re

from speech_lens.data.utterance import DataError
from speech_lens.vocab import VocabError, VocabLayout

# --------------------------------------------------------------------------------------------
# Unit strings
# --------------------------------------------------------------------------------------------

PLAIN_UNITS = re.compile(r"^\s*\d+(?:[\s,]+\d+)*\s*$")


def parse_plain_units(text: str, *, utterance: str = "?", field: str = "units") -> list[int]:
    """``"12 7 7 3"`` (SpiritLM ``encode_units`` / whitespace or comma separated) -> ints."""
    if not PLAIN_UNITS.match(text):
        raise DataError(utterance, field, f"not a plain list of unit integers: {text[:40]!r}")
    return [int(x) for x in re.split(r"[\s,]+", text.strip())]


def parse_unit_string(
    text: str,
    layout: VocabLayout,
    block: str = "units",
    *,
    utterance: str = "?",
    field: str = "units",
) -> list[int]:
    """A model's unit string -> unit indices: ``"[Hu12][Hu7]"`` (SpiritLM), ``"<12><7>"`` or
    ``"<sosp><12><7><eosp>"`` (SpeechGPT), ``"<Un12><Un7>"`` (SIMS). Modality markers at the ends
    are dropped; anything else that is not a unit token of ``block`` is refused."""
    s = text.strip()
    for tok in sorted(layout.marker_tokens.values(), key=len, reverse=True):
        if tok and s.startswith(tok):
            s = s[len(tok) :]
        if tok and s.endswith(tok):
            s = s[: -len(tok)]
    try:
        return layout.parse_units(s, block)
    except VocabError as e:
        raise DataError(utterance, field, str(e)) from None


def split_spiritlm_string(
    text: str, layout: VocabLayout, *, utterance: str = "?"
) -> dict[str, list[int]]:
    """A merged SpiritLM Expressive string ``[St71][Pi39][Hu99]...`` -> units per stream (in order)."""
    blocks = [layout.units, *layout.prosody.values()]
    names = ["units", *layout.prosody]
    alt = "|".join(f"(?:{b.regex.pattern})" for b in blocks)
    rx = re.compile(alt)
    out: dict[str, list[int]] = {n: [] for n in names}
    pos = 0
    s = text.strip()
    for m in rx.finditer(s):
        if s[pos : m.start()].strip():
            raise DataError(
                utterance, "units", f"unknown unit string {s[pos : m.start()]!r} at {pos}"
            )
        tok = m.group(0)
        for n, b in zip(names, blocks, strict=True):
            mm = b.regex.fullmatch(tok)
            if mm:
                k = int(mm.group(1))
                if not 0 <= k < b.count:
                    raise DataError(utterance, "units", f"{tok!r} outside 0..{b.count - 1}")
                out[n].append(k)
                break
        pos = m.end()
    if s[pos:].strip():
        raise DataError(utterance, "units", f"unknown unit string {s[pos:]!r} at {pos}")
    return out
