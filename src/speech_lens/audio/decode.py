"""Audio decoding: files, bytes and arrays to mono float waveforms at a checked rate."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")
TRANSCRIPT_EXTS = (".txt", ".lab")
MIN_SAMPLE_RATE = 8000  # below this a 16 kHz speech tokenizer gets no band above 4 kHz
MAX_SAMPLE_RATE = 384000
SILENCE_DBFS = -60.0  # loudest 20 ms window below this = silence-only file


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file (or row) and what is wrong."""


def lazy(module: str, extra: str = "audio") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pip = {"soundfile": "soundfile", "scipy.signal": "scipy", "pyarrow.parquet": "pyarrow"}
        raise ImportError(
            f"speech_lens.audio needs {pip.get(module, module)!r}: "
            f"pip install {pip.get(module, module)}  (or pip install 'speech-lens[{extra}]')"
        ) from None


# --------------------------------------------------------------------------------------------
# Decoding and resampling
# --------------------------------------------------------------------------------------------


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (scipy ``resample_poly``, Kaiser-windowed anti-aliasing FIR)."""
    if sr_in == sr_out:
        return np.asarray(x, dtype=np.float32)
    signal = lazy("scipy.signal")
    g = math.gcd(int(sr_in), int(sr_out))
    y = signal.resample_poly(np.asarray(x, dtype=np.float64), sr_out // g, sr_in // g)
    return np.asarray(y, dtype=np.float32)


def describe_source(source: Any) -> str:
    if isinstance(source, str | Path):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"<{type(source).__name__}>"


def load_audio(
    source: Any,
    *,
    sample_rate: int | None = None,
    name: str | None = None,
    resample_ok: bool = True,
    declared_rate: int | None = None,
    silence_dbfs: float | None = SILENCE_DBFS,
) -> tuple[np.ndarray, int]:
    """Decode ``source`` to float32 mono, resampled to ``sample_rate`` (if given).

    ``source``: a path, encoded bytes, an HF ``{"bytes", "path"}`` struct, an
    ``{"array", "sampling_rate"}`` dict, or an ``(array, rate)`` pair. ``declared_rate`` (a data
    set's sample-rate column) must match the file's own. ``resample_ok=False`` turns a rate
    other than ``sample_rate`` into an error. Silence-only audio (loudest 20 ms window below
    ``silence_dbfs``) is refused.
    """
    where = name or describe_source(source)
    x, sr = _decode(source, where)
    if x.ndim == 2:
        x = x.mean(axis=1)  # mono mix; channels of a speech file carry the same speech
    if declared_rate is not None and int(declared_rate) != sr:
        raise AudioError(
            f"audio {where}: the data declares {declared_rate} Hz but the file is {sr} Hz"
        )
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"audio {where}: unsupported sample rate {sr} Hz (speech tokenizers need "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz; 16000 is what they run at)"
        )
    if x.size == 0:
        raise AudioError(f"audio {where}: no samples (empty file)")
    if not np.all(np.isfinite(x)):
        raise AudioError(f"audio {where}: holds NaN or infinite samples")
    if silence_dbfs is not None:
        level = loudest_window_dbfs(x, sr)
        if level < silence_dbfs:
            raise AudioError(
                f"audio {where}: silence only (loudest 20 ms window {level:.1f} dBFS, "
                f"threshold {silence_dbfs:.0f} dBFS)"
            )
    if sample_rate is not None and sr != int(sample_rate):
        if not resample_ok:
            raise AudioError(
                f"audio {where}: wrong sample rate {sr} Hz, expected {sample_rate} Hz "
                "(resampling is off)"
            )
        x = resample(x, sr, int(sample_rate))
        sr = int(sample_rate)
    return np.ascontiguousarray(x, dtype=np.float32), sr


def loudest_window_dbfs(x: np.ndarray, sr: int, window_s: float = 0.02) -> float:
    n = max(1, int(sr * window_s))
    m = len(x) // n
    frames = x[: m * n].reshape(m, n) if m else x[None]
    rms = float(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)).max())
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def _decode(source: Any, where: str) -> tuple[np.ndarray, int]:
    if isinstance(source, tuple) and len(source) == 2:
        arr, sr = source
        return _from_array(arr, sr, where)
    if isinstance(source, dict):
        if source.get("array") is not None:
            return _from_array(source["array"], source.get("sampling_rate"), where)
        if source.get("bytes") is not None:
            return _decode_bytes(source["bytes"], where)
        if source.get("path"):
            return _decode_file(Path(source["path"]), where)
        raise AudioError(f"audio {where}: struct has neither bytes, path nor array")
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode_bytes(bytes(source), where)
    if isinstance(source, str | Path):
        return _decode_file(Path(source), where)
    raise AudioError(f"audio {where}: cannot read audio from a {type(source).__name__}")


def _from_array(arr: Any, sr: Any, where: str) -> tuple[np.ndarray, int]:
    if sr is None:
        raise AudioError(f"audio {where}: an audio array needs its sampling_rate")
    a = np.asarray(arr)
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
    if a.ndim == 2 and a.shape[0] < a.shape[1] and a.shape[0] <= 8:
        a = a.T  # (channels, samples) -> (samples, channels)
    if a.ndim not in (1, 2):
        raise AudioError(f"audio {where}: array of shape {a.shape} is not mono or multichannel")
    return a.astype(np.float32), int(sr)


def _decode_file(p: Path, where: str) -> tuple[np.ndarray, int]:
    if not p.is_file():
        raise AudioError(f"audio {where}: file does not exist")
    sf = lazy("soundfile")
    try:
        x, sr = sf.read(str(p), dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"audio {where}: unreadable ({type(e).__name__}: {e})") from None
    return np.asarray(x), int(sr)


def _decode_bytes(b: bytes, where: str) -> tuple[np.ndarray, int]:
    sf = lazy("soundfile")
    if not b:
        raise AudioError(f"audio {where}: empty bytes")
    try:
        x, sr = sf.read(io.BytesIO(b), dtype="float32", always_2d=False)
    except Exception as e:
        raise AudioError(f"audio {where}: unreadable bytes ({type(e).__name__}: {e})") from None
    return np.asarray(x), int(sr)
