"""HuBERT + k-means speech tokenizers (SpeechGPT, SIMS)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from transformers import HubertModel

from speech_lens.audio.tokenizers.registry import (
    FrameUnits,
    MissingTokenizerFiles,
    SpeechTokenizerError,
    check_audio,
    missing_files,
    missing_package_error,
)

# --------------------------------------------------------------------------------------------
# mHuBERT + k-means (slamkit / SIMS, SpeechGPT, TWIST-style)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubertPreset:
    family: str
    frame_rate: float
    n_units: int
    layer: int
    pad: int  # samples of zero padding on each side (slamkit pads 40)
    model_hint: str
    kmeans_hint: str


HUBERT_PRESETS = {
    "sims": HubertPreset(
        "sims",
        25.0,
        500,
        11,
        40,
        "transformers HubertModel dir of slprl/mhubert-base-25hz",
        "mhubert_base_25hz_cp_mls_cv_sp_fisher_L11_km500.bin (TWIST release)",
    ),
    "speechgpt": HubertPreset(
        "speechgpt",
        50.0,
        1000,
        11,
        0,
        "transformers HubertModel conversion of fairseq mhubert_base_vp_en_es_fr_it3.pt",
        "mhubert_base_vp_en_es_fr_it3_L11_km1000.bin",
    ),
}


class HubertKMeansTokenizer:
    """HuBERT hidden states of one layer, quantized by nearest k-means centroid (Euclidean).

    ``model_dir`` is a transformers ``HubertModel`` directory; ``kmeans`` is a centroid file:
    ``.npy`` / ``.npz`` (``[K, D]``), ``.pt`` / ``.safetensors`` (a ``[K, D]`` tensor), or the
    joblib-pickled scikit-learn model the TWIST / fairseq releases ship (``.bin``), which loads only
    with ``allow_pickle=True`` because unpickling runs code. Features: ``hidden_states[layer]``
    of the model on the raw waveform zero-padded by ``pad`` samples each side, as slamkit does.
    """

    expected_sample_rate = 16000

    def __init__(
        self,
        model_dir: str | Path | None = None,
        kmeans: str | Path | None = None,
        *,
        preset: str | None = None,
        family: str | None = None,
        layer: int | None = None,
        n_units: int | None = None,
        pad: int | None = None,
        allow_pickle: bool = False,
        model: Any = None,
        device: str = "cpu",
    ) -> None:
        p = HUBERT_PRESETS.get(preset) if preset else None
        if preset and p is None:
            raise ValueError(f"unknown HuBERT preset {preset!r}; one of {sorted(HUBERT_PRESETS)}")
        self.family = family or (p.family if p else "mhubert")
        self.layer = layer if layer is not None else (p.layer if p else 11)
        self.pad = pad if pad is not None else (p.pad if p else 0)
        want_units = n_units if n_units is not None else (p.n_units if p else None)
        who = f"{self.family} HuBERT tokenizer"
        if (model is None and model_dir is None) or kmeans is None:
            hint = (
                f"{p.model_hint} and {p.kmeans_hint}"
                if p
                else "a HubertModel dir and a k-means file"
            )
            raise MissingTokenizerFiles(
                f"{who} needs model_dir= ({p.model_hint if p else 'a transformers HubertModel dir'}) "
                f"and kmeans= ({p.kmeans_hint if p else 'k-means centroids'}); "
                f"neither ships with speech_lens ({hint})"
            )
        if model is None:
            md = Path(str(model_dir))
            missing_files(
                who, md, ["config.json"], "model_dir must be a transformers HubertModel directory"
            )

            model = HubertModel.from_pretrained(str(md))
        self.model = model.to(device).eval()
        cfg = self.model.config
        self.frame_rate = self.expected_sample_rate / math.prod(cfg.conv_stride)
        if p is not None and abs(self.frame_rate - p.frame_rate) > 1e-6:
            raise SpeechTokenizerError(
                f"{who}: the model's conv strides give {self.frame_rate:g} Hz frames, the {p.family} "
                f"preset needs {p.frame_rate:g} Hz (wrong HuBERT checkpoint?)"
            )
        if not 0 <= self.layer <= cfg.num_hidden_layers:
            raise SpeechTokenizerError(
                f"{who}: layer {self.layer} outside 0..{cfg.num_hidden_layers} of the model"
            )
        self.centroids = load_centroids(kmeans, allow_pickle=allow_pickle)
        k, d = self.centroids.shape
        if d != cfg.hidden_size:
            raise SpeechTokenizerError(
                f"{who}: k-means {kmeans} has {d}-dim centroids, the model's features are "
                f"{cfg.hidden_size}-dim"
            )
        if want_units is not None and k != want_units:
            raise SpeechTokenizerError(
                f"{who}: k-means {kmeans} has {k} centroids, expected {want_units}"
            )
        self.n_units = k
        self.device = device

    def features(self, audio: np.ndarray) -> np.ndarray:

        x = torch.from_numpy(np.ascontiguousarray(audio)).to(self.device)[None]
        with torch.inference_mode():
            hs = self.model(F.pad(x, (self.pad, self.pad)), output_hidden_states=True).hidden_states
        return hs[self.layer][0].float().cpu().numpy()

    def __call__(self, audio: np.ndarray, sample_rate: int) -> FrameUnits:
        a = check_audio(
            audio, sample_rate, self.expected_sample_rate, f"{self.family} HuBERT tokenizer"
        )
        min_len = 400  # HuBERT's conv stack needs 25 ms
        if a.size + 2 * self.pad < min_len:
            raise SpeechTokenizerError(
                f"{self.family} HuBERT tokenizer: audio of {a.size} samples is shorter than one frame"
            )
        return FrameUnits(nearest_centroid(self.features(a), self.centroids), self.frame_rate)


def nearest_centroid(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmin_k ||x - c_k||^2 per row (fairseq ApplyKmeans / sklearn predict)."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d = (x64**2).sum(1, keepdims=True) - 2 * x64 @ c64.T + (c64**2).sum(1)[None]
    return d.argmin(1).astype(np.int64)


def load_centroids(path: str | Path, *, allow_pickle: bool = False) -> np.ndarray:
    """``[K, D]`` float32 centroids from .npy/.npz/.pt/.safetensors, or a joblib sklearn model."""
    p = Path(path)
    if not p.is_file():
        raise MissingTokenizerFiles(f"k-means file {p} does not exist")
    suf = p.suffix.lower()
    if suf == ".npy":
        c = np.load(p, allow_pickle=False)
    elif suf == ".npz":
        z = np.load(p, allow_pickle=False)
        key = "cluster_centers_" if "cluster_centers_" in z else z.files[0]
        c = z[key]
    elif suf == ".safetensors":
        t = load_file(str(p))
        c = t.get("cluster_centers_", next(iter(t.values())))
    elif suf == ".pt":
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj.get("cluster_centers_", next(iter(obj.values())))
        c = obj.numpy() if hasattr(obj, "numpy") else np.asarray(obj)
    else:
        if not allow_pickle:
            raise SpeechTokenizerError(
                f"k-means file {p} is a pickle (joblib/sklearn); loading it runs code from the file. "
                "Pass allow_pickle=True if you trust it, or save its cluster_centers_ as .npy"
            )
        try:
            import joblib
        except ImportError:
            raise missing_package_error(
                "joblib", "pip install joblib scikit-learn", str(p)
            ) from None
        c = np.asarray(joblib.load(p).cluster_centers_)
    c = np.asarray(c, dtype=np.float32)
    if c.ndim != 2 or c.shape[0] < 1:
        raise SpeechTokenizerError(f"k-means file {p}: centroids must be [K, D], got {c.shape}")
    return c
