"""Word timings for audio that has a transcript but no alignment: offline forced alignment.

:class:`PocketsphinxAligner` uses PyPI ``pocketsphinx`` (BSD; it ships its en-us acoustic model
and CMUdict), which runs offline at about 0.15-0.3 s per sentence on one core. Results are cached
per file in a small JSON store keyed by the aligner's identity, the transcript and a hash of the
audio samples, so re-running ``speech-lens tokenize`` never re-aligns. Words the aligner cannot
place (not in its dictionary, or no alignment fits the audio) raise :class:`AlignmentError`
naming them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from speech_lens.audio.decode import resample
from speech_lens.data.utterance import Word

# Outer punctuation is not part of a word ("Paris." -> "Paris"); inner apostrophes and hyphens are.
_EDGE = re.compile(r"^[^\w']+|[^\w']+$")
# Segment labels that are not words of the transcript.
_NON_WORDS = frozenset({"<s>", "</s>", "<sil>", "[noise]", "<noise>", "++noise++"})


class AlignmentError(ValueError):
    """The aligner could not place some words; ``words`` lists them."""

    def __init__(self, message: str, words: tuple[str, ...] = ()) -> None:
        self.words = words
        super().__init__(message)


def transcript_words(text: str) -> list[str]:
    """Whitespace tokens with outer punctuation removed; pure-punctuation tokens dropped."""
    out = []
    for tok in text.split():
        w = _EDGE.sub("", tok)
        if w.strip("'"):
            out.append(w)
    return out


@runtime_checkable
class Aligner(Protocol):
    name: str  # identity for the cache key (engine, version, dictionary additions)
    sample_rate: int

    def align(
        self, audio: np.ndarray, sample_rate: int, transcript: str, *, where: str = ""
    ) -> tuple[Word, ...]: ...


class PocketsphinxAligner:
    """Forced alignment with pocketsphinx's en-us model (``pip install pocketsphinx``).

    ``pronunciations`` adds words missing from CMUdict, e.g. ``{"tuesday": "T UW Z D EY"}``
    (ARPAbet without stress digits). Times are frame-quantised (100 frames/s); pocketsphinx gives
    inter-word pauses to the following word.
    """

    sample_rate = 16000

    def __init__(self, *, pronunciations: dict[str, str] | None = None, **decoder_kw: Any) -> None:
        try:
            import pocketsphinx
        except ImportError:
            raise ImportError(
                "forced alignment needs pocketsphinx (it ships its en-us model): "
                "pip install pocketsphinx  (or pip install 'speech-lens[align]')"
            ) from None
        self._ps = pocketsphinx
        self.pronunciations = {k.lower(): v for k, v in (pronunciations or {}).items()}
        self.decoder_kw = decoder_kw
        self._decoder: Any = None
        version = getattr(pocketsphinx, "__version__", "5")
        extra = hashlib.sha256(
            json.dumps([sorted(self.pronunciations.items()), sorted(decoder_kw.items())]).encode()
        ).hexdigest()[:12]
        self.name = f"pocketsphinx-{version}-en-us-{extra}"

    @property
    def decoder(self) -> Any:
        if self._decoder is None:
            d = self._ps.Decoder(
                samprate=self.sample_rate, bestpath=False, loglevel="FATAL", **self.decoder_kw
            )
            for w, phones in self.pronunciations.items():
                if d.lookup_word(w) is None:  # CMUdict entries stay; adding one again fails
                    try:
                        d.add_word(w, phones, False)
                    except RuntimeError as e:
                        raise AlignmentError(
                            f"pocketsphinx refused the pronunciation {phones!r} for {w!r}: {e} "
                            "(use ARPAbet phones without stress digits)",
                            (w,),
                        ) from None
            self._decoder = d
        return self._decoder

    def align(
        self, audio: np.ndarray, sample_rate: int, transcript: str, *, where: str = ""
    ) -> tuple[Word, ...]:
        at = f"{where}: " if where else ""
        words = transcript_words(transcript)
        if not words:
            raise AlignmentError(f"{at}transcript {transcript!r} has no words to align")
        d = self.decoder
        oov = tuple(dict.fromkeys(w for w in words if d.lookup_word(w.lower()) is None))
        if oov:
            raise AlignmentError(
                f"{at}the aligner cannot place word(s) {list(oov)}: not in pocketsphinx's en-us "
                "dictionary (CMUdict); add them with pronunciations={'word': 'W ER D'} "
                "(ARPAbet) or fix the transcript",
                oov,
            )
        if sample_rate != self.sample_rate:
            audio = resample(audio, sample_rate, self.sample_rate)
        pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1, 1) * 32767).astype(np.int16)
        try:
            d.set_align_text(" ".join(w.lower() for w in words))
        except RuntimeError as e:
            raise AlignmentError(
                f"{at}pocketsphinx cannot set up alignment of {transcript!r}: {e}"
            ) from None
        d.start_utt()
        d.process_raw(pcm.tobytes(), full_utt=True)
        d.end_utt()
        if d.hyp() is None:
            raise AlignmentError(
                f"{at}the aligner cannot place the words {words} in the audio: no forced "
                "alignment fits (wrong transcript for this audio, too much noise, or audio cut "
                "short)",
                tuple(words),
            )
        frate = float(d.config["frate"])
        segs = [
            (re.sub(r"\(\d+\)$", "", s.word), s.start_frame / frate, (s.end_frame + 1) / frate)
            for s in d.seg()
        ]
        segs = [s for s in segs if s[0].lower() not in _NON_WORDS]
        out: list[Word] = []
        j = 0
        for w in words:
            if j < len(segs) and segs[j][0] == w.lower():
                out.append(Word(w, round(segs[j][1], 4), round(segs[j][2], 4)))
                j += 1
        if len(out) != len(words):
            placed = {x.text for x in out}
            missing = tuple(w for w in words if w not in placed) or tuple(words[len(out) :])
            raise AlignmentError(f"{at}the aligner did not place word(s) {list(missing)}", missing)
        return tuple(out)


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("SPEECH_LENS_CACHE") or Path.home() / ".cache" / "speech_lens"
    return Path(root) / "align"


class AlignmentCache:
    """JSON files ``<dir>/<key[:2]>/<key>.json``; key = sha256(aligner, transcript, sample rate,
    audio samples). Writes are atomic (temp file + ``os.replace``)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.dir = Path(directory) if directory is not None else default_cache_dir()

    @staticmethod
    def key(aligner: str, audio: np.ndarray, sample_rate: int, transcript: str) -> str:
        h = hashlib.sha256()
        h.update(f"{aligner}\0{transcript}\0{int(sample_rate)}\0".encode())
        h.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[Word, ...] | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            return tuple(Word(w, float(s), float(e)) for w, s, e in rec["words"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # a damaged entry is recomputed, not trusted

    def put(self, key: str, words: tuple[Word, ...], **info: Any) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"words": [[w.text, w.start, w.end] for w in words], **info}, f)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def align_cached(
    aligner: Aligner,
    audio: np.ndarray,
    sample_rate: int,
    transcript: str,
    *,
    cache: AlignmentCache | str | Path | None = None,
    where: str = "",
) -> tuple[Word, ...]:
    """``aligner.align`` through the per-file cache (``cache=None``: the default cache dir)."""
    c = cache if isinstance(cache, AlignmentCache) else AlignmentCache(cache)
    key = c.key(aligner.name, audio, sample_rate, transcript)
    hit = c.get(key)
    if hit is not None:
        return hit
    words = aligner.align(audio, sample_rate, transcript, where=where)
    c.put(key, words, aligner=aligner.name, transcript=transcript, source=where)
    return words


ALIGNERS = {"pocketsphinx": PocketsphinxAligner}


def get_aligner(name: str, **kw: Any) -> Aligner:
    if name not in ALIGNERS:
        raise ValueError(f"unknown aligner {name!r}; one of {sorted(ALIGNERS)}")
    return ALIGNERS[name](**kw)
