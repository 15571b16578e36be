"""Speech units computed from the audio: MFCC frames -> word-synchronous windows -> k-means.

Word-synchronous windows (a simplification stated with every result): each word's gap-extended
span [midpoint of the gap before, midpoint of the gap after) is cut into n = round(span * rate)
equal windows (about 80 ms at rate 12.5 Hz), so units never straddle word boundaries and the
quantised word boundaries fall exactly on the unit grid. Each window is the mean of 10 ms MFCC +
delta frames; a global CMVN and k-means (K clusters) give the unit; consecutive repeats inside a
word are merged (durations = run lengths in frames).
The fitted ``UnitTokenizer`` (feature config, CMVN stats, centroids) is a small JSON file.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SR = 16000


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = SR
    n_fft: int = 512
    win: int = 400  # 25 ms
    hop: int = 160  # 10 ms
    n_mels: int = 40
    n_mfcc: int = 20
    rate: float = 12.5  # unit frames per second (nominal)


def mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    def hz2mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel2hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    pts = mel2hz(
        np.linspace(hz2mel(np.array(0.0)), hz2mel(np.array(cfg.sample_rate / 2)), cfg.n_mels + 2)
    )
    bins = np.fft.rfftfreq(cfg.n_fft, 1.0 / cfg.sample_rate)
    fb = np.zeros((cfg.n_mels, len(bins)))
    for m in range(cfg.n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        fb[m] = np.clip(np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)), 0, None)
    return fb


def mfcc(audio: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """[frames, 2 * n_mfcc] MFCC + delta at 10 ms hop (numpy only)."""
    from scipy.fft import dct

    x = np.pad(audio.astype(np.float64), (cfg.win // 2, cfg.win // 2))
    n = 1 + (len(x) - cfg.win) // cfg.hop
    idx = np.arange(cfg.win)[None, :] + cfg.hop * np.arange(n)[:, None]
    frames = x[idx] * np.hanning(cfg.win)[None, :]
    spec = np.abs(np.fft.rfft(frames, n=cfg.n_fft)) ** 2
    logmel = np.log(spec @ mel_filterbank(cfg).T + 1e-8)
    c = dct(logmel, type=2, norm="ortho", axis=1)[:, : cfg.n_mfcc]
    d = np.gradient(c, axis=0)
    return np.concatenate([c, d], axis=1).astype(np.float32)


def word_windows(
    spans: list[tuple[str, float, float]], cfg: FeatureConfig
) -> tuple[list[float], list[int]]:
    """Region boundaries of each word (seconds) and their quantised frame boundaries.

    Word i's region is [b[i], b[i+1]): gap midpoints, from 0 to the end of the last word. Frame
    boundaries are strictly increasing, so every word gets at least one frame.
    """
    b = [0.0]  # the first word's region starts at 0 (Piper's lead silence is ~20-50 ms)
    for (_, _, e0), (_, s1, _) in itertools.pairwise(spans):
        b.append((e0 + s1) / 2)
    b.append(spans[-1][2])
    q = [0]
    for t in b[1:]:
        q.append(max(round(t * cfg.rate), q[-1] + 1))
    return b, q


def pooled_features(
    feats: np.ndarray, spans: list[tuple[str, float, float]], cfg: FeatureConfig
) -> tuple[np.ndarray, list[int]]:
    """One pooled feature row per unit frame, and the frame boundaries (see word_windows)."""
    b, q = word_windows(spans, cfg)
    fps = cfg.sample_rate / cfg.hop
    rows = []
    for r in range(len(b) - 1):
        n = q[r + 1] - q[r]
        edges = np.linspace(b[r], b[r + 1], n + 1) * fps
        for k in range(n):
            lo = int(np.floor(edges[k]))
            hi = max(lo + 1, int(np.ceil(edges[k + 1])))
            rows.append(feats[min(lo, len(feats) - 1) : min(hi, len(feats))].mean(axis=0))
    return np.stack(rows).astype(np.float32), q


@dataclass(frozen=True)
class UnitTokenizer:
    """Feature config + CMVN + k-means centroids. ``encode`` maps audio + word spans to units."""

    config: FeatureConfig
    mean: np.ndarray
    std: np.ndarray
    centroids: np.ndarray  # [K, dim]

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def assign(self, pooled: np.ndarray) -> np.ndarray:
        z = (pooled - self.mean) / self.std
        d = ((z[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)
        return d.argmin(1)

    def encode_pooled(
        self, pooled: np.ndarray, q: list[int], spans: list[tuple[str, float, float]]
    ) -> tuple[list[int], list[int], list[tuple[str, float, float]]]:
        """Deduplicated units, durations, and word spans on the unit grid (seconds)."""
        labels = self.assign(pooled)
        units: list[int] = []
        durs: list[int] = []
        for r in range(len(q) - 1):  # dedup within each region only
            prev = -1
            for k in range(q[r], q[r + 1]):
                if labels[k] == prev:
                    durs[-1] += 1
                else:
                    units.append(int(labels[k]))
                    durs.append(1)
                    prev = int(labels[k])
        rate = self.config.rate
        words = [(w, q[i] / rate, q[i + 1] / rate) for i, (w, _, _) in enumerate(spans)]
        return units, durs, words

    def encode(
        self, audio: np.ndarray, spans: list[tuple[str, float, float]]
    ) -> tuple[list[int], list[int], list[tuple[str, float, float]]]:
        pooled, q = pooled_features(mfcc(audio, self.config), spans, self.config)
        return self.encode_pooled(pooled, q, spans)

    def save(self, path: str | Path) -> None:
        d = {
            "kind": "speech_lens.organisms.units.UnitTokenizer",
            "features": asdict(self.config),
            "windows": "word-synchronous: gap-extended word spans cut into round(span*rate) equal windows",
            "mean": self.mean.round(6).tolist(),
            "std": self.std.round(6).tolist(),
            "centroids": self.centroids.round(5).tolist(),
        }
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> UnitTokenizer:
        d = json.loads(Path(path).read_text())
        if d.get("kind") != "speech_lens.organisms.units.UnitTokenizer":
            raise ValueError(f"{path} is not a saved UnitTokenizer (field 'kind')")
        return cls(
            FeatureConfig(**d["features"]),
            np.asarray(d["mean"], dtype=np.float32),
            np.asarray(d["std"], dtype=np.float32),
            np.asarray(d["centroids"], dtype=np.float32),
        )


def fit(pooled: np.ndarray, k: int, cfg: FeatureConfig, seed: int = 0) -> UnitTokenizer:
    from sklearn.cluster import MiniBatchKMeans

    mean = pooled.mean(0)
    std = pooled.std(0) + 1e-6
    km = MiniBatchKMeans(n_clusters=k, n_init=3, random_state=seed, batch_size=4096)
    km.fit((pooled - mean) / std)
    return UnitTokenizer(
        cfg, mean.astype(np.float32), std.astype(np.float32), km.cluster_centers_.astype(np.float32)
    )
