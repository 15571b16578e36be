"""Idealised units (U0) and the interleaved training stream of mini-SIMS.

U0: one unit per phoneme (espeak-ng via ``espeakng-loader``, IPA, stress marks dropped), each held
for an idealised duration (vowels 3 frames, consonants 2 frames, 25 Hz as mHuBERT-25Hz) and
deduplicated as usual: what a perfect speech tokenizer would give. espeak-ng (GPL) is a build-time
tool here, never imported by ``src/``.

Text: Jane Austen's six novels cased as written, split into clauses exactly as the organisms'
corpus (same boundaries, same 2% held-out split by content hash), each word carried with its
leading space (SmolLM2's byte-level BPE tokenises " word" on its own, so a span's ids are the
concatenation of its words' ids).

Training sequences follow slamkit's SIMS convention: ``<speech>``/``<text>`` before the first word
and at every modality change, speech spans = deduplicated ``<Un..>`` of the words, text spans =
BPE ids of the words. Mix: text-only 0.2, interleaved 0.55, speech-only 0.25 (slamkit's ratios);
interleaved speech spans are Poisson(5)-word spans until >= 30% of the words are speech (slamkit:
Poisson(10), 30%; shorter spans here because a ~100-word passage should switch modality a few
times). Half of the single-modality examples drop their leading marker: slamkit scores speech
as bare units (speech_lens's sims prompt convention, ``speech_only_marker = false``), while an
interleaved prompt opens with one; both forms are then in distribution. A batch is a pure function
of (seed, step).
"""

from __future__ import annotations

import ctypes
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import N_BASE_TOKENS, write_json_atomic

from speech_lens.organisms.u0 import dedup

N_UNITS = 500  # SIMS's unit block (<Un0>..<Un499>); U0 fills the first len(phonemes) of it
SPEECH_ID = N_BASE_TOKENS + N_UNITS
TEXT_ID = SPEECH_ID + 1
VOCAB = TEXT_ID + 1
FRAME_RATE = 25.0
MIX = (("text", 0.2), ("interleaved", 0.55), ("speech", 0.25))
SPAN_MEAN, SPEECH_SHARE = 5.0, 0.3
BARE_SHARE = 0.5  # single-modality examples without their leading marker
CASED_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
STRESS = str.maketrans("", "", "ˈˌ")
VOWELS = set("aeiouyæɑɒɔəɛɜɪʊʌɚɐᵻɵøœɯ")


class Espeak:
    """espeak-ng's phonemiser through ctypes (``espeak_TextToPhonemes``), US English, IPA."""

    def __init__(self, voice: str = "en-us") -> None:
        import espeakng_loader as el

        self.lib = ctypes.cdll.LoadLibrary(el.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int] * 2 + [ctypes.c_char_p, ctypes.c_int]
        if self.lib.espeak_Initialize(2, 0, el.get_data_path().encode(), 0x8000) <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_TextToPhonemes.argtypes = [
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_int,
            ctypes.c_int,
        ]

    def phonemes(self, word: str) -> list[str]:
        ptr = ctypes.c_char_p(word.encode())
        out: list[str] = []
        while ptr.value:  # IPA (0x02) with "_" between phonemes (bits 8-23)
            s = self.lib.espeak_TextToPhonemes(ctypes.byref(ptr), 1, 0x02 | (ord("_") << 8))
            out += [p for p in s.decode().translate(STRESS).replace(" ", "_").split("_") if p]
        if not out:
            raise ValueError(f"espeak-ng gave no phonemes for {word!r}")
        return out


def frames_of(phoneme: str) -> int:
    return 3 if any(c in VOWELS for c in phoneme) else 2


def cased_clauses(deb: Path) -> tuple[list[list[str]], list[bool]]:
    """Clauses in book order, cased as in Austen, with the organisms' held-out flag."""
    from speech_lens.organisms import corpus

    books = corpus.austen_lines(deb)
    out: list[list[str]] = []
    for name in sorted(books):
        text = " ".join(books[name])
        out += [ws for c in corpus.CLAUSE_SPLIT.split(text) if (ws := CASED_WORD.findall(c))]
    flags = [corpus.is_held_out([w.lower() for w in c], 0.02) for c in out]
    return out, flags


@dataclass(frozen=True)
class Corpus:
    types: list[str]  # cased word types
    text_ids: list[list[int]]  # BPE ids of " word"
    units: list[list[int]]  # U0 unit ids (0-based, undeduplicated phoneme sequence)
    durations: list[list[int]]  # frames per phoneme
    train: list[list[int]]  # training clauses (type indices) in book order
    phonemes: list[str]

    @classmethod
    def load(cls, path: Path) -> Corpus:
        return cls(**json.loads(path.read_text()))


def build_corpus(deb: Path, out: Path, tokenizer: Any) -> Corpus:
    clauses, held = cased_clauses(deb)
    types = sorted({w for c in clauses for w in c})
    index = {w: i for i, w in enumerate(types)}
    esp = Espeak()
    lower_ph = {w: esp.phonemes(w) for w in sorted({t.lower() for t in types})}
    phonemes = sorted({p for ps in lower_ph.values() for p in ps})
    if len(phonemes) > N_UNITS:
        raise RuntimeError(f"{len(phonemes)} phonemes do not fit {N_UNITS} units")
    pid = {p: i for i, p in enumerate(phonemes)}
    enc = tokenizer([" " + t for t in types], add_special_tokens=False)["input_ids"]
    c = Corpus(
        types=types,
        text_ids=[list(x) for x in enc],
        units=[[pid[p] for p in lower_ph[t.lower()]] for t in types],
        durations=[[frames_of(p) for p in lower_ph[t.lower()]] for t in types],
        train=[[index[w] for w in c] for c, h in zip(clauses, held, strict=True) if not h],
        phonemes=phonemes,
    )
    write_json_atomic(out, c.__dict__)
    return c


def speech_span(c: Corpus, words: list[int]) -> list[int]:
    return [N_BASE_TOKENS + u for u in dedup([u for w in words for u in c.units[w]])]


def speech_mask(n: int, rng: np.random.Generator) -> np.ndarray:
    """slamkit's 'poisson' interleaving: non-overlapping Poisson spans of speech words until at
    least SPEECH_SHARE of the words are speech."""
    mask = np.zeros(n, dtype=bool)
    for _ in range(1000):
        if mask.sum() >= SPEECH_SHARE * n:
            break
        length = max(1, int(rng.poisson(SPAN_MEAN)))
        start = int(rng.integers(0, max(1, n - length + 1)))
        if not mask[max(0, start - 1) : start + length + 1].any():
            mask[start : start + length] = True
    return mask


def render(c: Corpus, words: list[int], mask: np.ndarray) -> list[int]:
    """Token ids of words with modality mask (True = speech), markers on every change."""
    toks: list[int] = []
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and mask[j] == mask[i]:
            j += 1
        toks.append(SPEECH_ID if mask[i] else TEXT_ID)
        if mask[i]:
            toks += speech_span(c, words[i:j])
        else:
            toks += [t for w in words[i:j] for t in c.text_ids[w]]
        i = j
    return toks


def example(c: Corpus, rng: np.random.Generator, seq_len: int) -> list[int]:
    """A passage of consecutive training clauses from a random start, rendered in one of the
    three kinds, cut to seq_len tokens (passages are long enough to always fill it)."""
    kind = rng.choice(len(MIX), p=[p for _, p in MIX])
    start = int(rng.integers(0, len(c.train)))
    words: list[int] = []
    for k in range(start, start + 10 * seq_len):
        words += c.train[k % len(c.train)]
        if len(words) >= seq_len:  # >= 1 token per word: enough
            break
    if MIX[kind][0] == "interleaved":
        return render(c, words, speech_mask(len(words), rng))[:seq_len]
    mask = np.full(len(words), MIX[kind][0] == "speech")
    toks = render(c, words, mask)
    if rng.random() < BARE_SHARE:  # slamkit's test-mode strings: no leading marker
        toks = toks[1:]
    return toks[:seq_len]


def batch(c: Corpus, seed: int, step: int, size: int, seq_len: int) -> np.ndarray:
    """[size, seq_len] token ids: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return np.array([example(c, rng, seq_len) for _ in range(size)], dtype=np.int64)
