"""Speech tokenizers: audio -> frame-level units, behind one small Protocol and a registry.

A :class:`SpeechTokenizer` takes float32 mono audio at its ``expected_sample_rate`` and returns
:class:`FrameUnits`: one unit per frame (not deduplicated; dedup with run lengths happens in
``speech_lens.data`` so word alignment can use the full frame grid), the frame rate, and
optional prosody streams (SpiritLM Expressive pitch / style). ``family`` names the vocabulary
layout the units are meant for (a spec name such as ``spiritlm`` or ``sims``).

Implementations here are thin, lazily imported adapters to the real tokenizers:

* ``spiritlm`` / ``spiritlm-expressive``: Meta's ``spiritlm`` package (HuBERT 25 Hz + 500-unit
  linear quantizer; F0 VQ-VAE pitch at 12.5 Hz and w2v2 style at 1 Hz).
* ``sims`` / ``speechgpt`` / ``mhubert``: a transformers ``HubertModel`` (layer-11 features) plus
  a k-means codebook, as slamkit (SIMS: mHuBERT-25Hz, 500 units) and SpeechGPT (mHuBERT
  ``vp_en_es_fr_it3``, 50 Hz, 1000 units) do.
* ``organism``: the model organisms' own tokenizer, saved next to each organism checkpoint.

``get_speech_tokenizer(name_or_checkpoint)`` resolves a registered name, a ``module:attr``
factory, or a checkpoint directory (its family picks the tokenizer).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from speech_lens.data import UnitStream


class SpeechTokenizerError(ValueError):
    """Audio a tokenizer cannot take, or a tokenizer that returned something malformed."""


class MissingTokenizerFiles(FileNotFoundError):
    """A real tokenizer's package or checkpoint files are not installed; the message lists them."""


@dataclass(frozen=True)
class FrameUnits:
    """Frame-level units (``units[i]`` covers ``[i / frame_rate, (i + 1) / frame_rate)``)."""

    units: np.ndarray  # int64 [frames]
    frame_rate: float
    streams: dict[str, UnitStream] = field(default_factory=dict)  # "pitch", "style"
    # A tokenizer with its own dedup (e.g. within words only) gives (units, run lengths) here.
    runs: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # A word-synchronous tokenizer gives the word times it used, on its unit grid.
    words: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        u = np.asarray(self.units)
        if u.ndim != 1:
            raise SpeechTokenizerError(f"units must be 1-D (one per frame), got shape {u.shape}")
        if u.size and not np.issubdtype(u.dtype, np.integer) and not np.all(np.mod(u, 1) == 0):
            raise SpeechTokenizerError(f"units must be integers, got dtype {u.dtype}")
        u = u.astype(np.int64)
        if u.size and u.min() < 0:
            raise SpeechTokenizerError(f"negative unit {int(u.min())}")
        object.__setattr__(self, "units", u)
        r = self.frame_rate
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0:
            raise SpeechTokenizerError(f"frame_rate must be a positive number, got {r!r}")
        object.__setattr__(self, "frame_rate", float(r))
        if self.runs is not None:
            ru, rd = self.runs
            if len(ru) != len(rd) or sum(rd) != u.size or any(d < 1 for d in rd):
                raise SpeechTokenizerError(
                    f"runs: {len(ru)} units with {len(rd)} run lengths summing to {sum(rd)} "
                    f"for {u.size} frames"
                )
            if not np.array_equal(np.repeat(np.asarray(ru, dtype=np.int64), rd), u):
                raise SpeechTokenizerError("runs do not expand to the frame-level units")

    @property
    def n_frames(self) -> int:
        return int(self.units.shape[0])

    @property
    def duration(self) -> float:
        return self.n_frames / self.frame_rate


@runtime_checkable
class SpeechTokenizer(Protocol):
    """audio (float32 mono at ``expected_sample_rate``) -> :class:`FrameUnits`."""

    family: str  # the vocabulary layout (spec name) the units are meant for
    expected_sample_rate: int

    def __call__(self, audio: np.ndarray, sample_rate: int) -> FrameUnits: ...


def check_audio(audio: Any, sample_rate: int, expected: int, who: str) -> np.ndarray:
    """Refuse what a tokenizer cannot take: not 1-D float audio, wrong rate, empty, not finite."""
    a = np.asarray(audio)
    if a.ndim != 1:
        raise SpeechTokenizerError(
            f"{who} takes mono audio as a 1-D array, got shape {a.shape} (mix or pick a channel)"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise SpeechTokenizerError(
            f"{who} takes float audio in [-1, 1], got dtype {a.dtype} (divide int16 PCM by 32768)"
        )
    if int(sample_rate) != int(expected):
        raise SpeechTokenizerError(
            f"{who} expects {expected} Hz audio, got {sample_rate} Hz; resample first "
            f"(speech_lens.audio.load_audio(path, sample_rate={expected}) does)"
        )
    if a.size == 0:
        raise SpeechTokenizerError(f"{who}: empty audio")
    if not np.all(np.isfinite(a)):
        raise SpeechTokenizerError(f"{who}: audio holds NaN or infinite samples")
    return a.astype(np.float32, copy=False)


def tokenize_audio(tokenizer: SpeechTokenizer, audio: np.ndarray, sample_rate: int) -> FrameUnits:
    """Resample to the tokenizer's rate if needed, then tokenize."""
    from speech_lens.audio import resample

    want = int(tokenizer.expected_sample_rate)
    if int(sample_rate) != want:
        audio = resample(np.asarray(audio, dtype=np.float32), int(sample_rate), want)
    out = tokenizer(np.asarray(audio, dtype=np.float32), want)
    if not isinstance(out, FrameUnits):
        raise SpeechTokenizerError(
            f"tokenizer {type(tokenizer).__name__} returned {type(out).__name__}, not FrameUnits"
        )
    return out


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Factory = Callable[..., SpeechTokenizer]
_REGISTRY: dict[str, Factory] = {}

# Checkpoint family (spec name) -> tokenizer name. Organisms are found by their tokenizer file.
FAMILY_TOKENIZERS = {
    "spiritlm": "spiritlm",
    "spiritlm-expressive": "spiritlm-expressive",
    "speechgpt": "speechgpt",
    "sims": "sims",
}


def register_speech_tokenizer(
    name: str, factory: Factory | None = None, *, overwrite: bool = False
) -> Any:
    """Register ``factory(**kw) -> SpeechTokenizer`` under ``name`` (also usable as a decorator)."""

    def add(f: Factory) -> Factory:
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not f:
            raise ValueError(f"speech tokenizer {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return add(factory) if factory is not None else add


def unregister_speech_tokenizer(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_speech_tokenizers() -> list[str]:
    return sorted(_REGISTRY)


def get_speech_tokenizer(name_or_checkpoint: str | Path, **kw: Any) -> SpeechTokenizer:
    """A tokenizer by registered name, ``package.module:factory``, or checkpoint directory.

    For a checkpoint directory: an organism checkpoint loads the unit tokenizer stored with it;
    any other checkpoint's family (its ``speech_lens.toml`` or the detected spec) picks the real
    tokenizer for that family (``kw`` go to it, e.g. ``checkpoint_dir=`` for SpiritLM files).
    """
    key = str(name_or_checkpoint)
    if key in _REGISTRY:
        return _checked(_REGISTRY[key](**kw), key)
    path = Path(key)
    if path.is_dir():
        return _checked(_from_checkpoint(path, **kw), key)
    if ":" in key and not path.exists():
        mod, _, attr = key.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"speech tokenizer {key!r}: cannot import {attr} from {mod}: {e}"
            ) from e
        return _checked(factory(**kw), key)
    raise ValueError(
        f"unknown speech tokenizer {key!r}: not a registered name "
        f"({', '.join(available_speech_tokenizers())}), a checkpoint directory, or module:factory"
    )


def _checked(tok: Any, key: str) -> SpeechTokenizer:
    if not isinstance(tok, SpeechTokenizer):
        raise TypeError(
            f"speech tokenizer {key!r} built a {type(tok).__name__}, which lacks family, "
            "expected_sample_rate or __call__(audio, sample_rate)"
        )
    return tok


def _from_checkpoint(path: Path, **kw: Any) -> SpeechTokenizer:
    from speech_lens.adapters import CHECKPOINT_SPEC, AdapterSpec, detect_family

    if organism_tokenizer_path(path) is not None:
        return _REGISTRY["organism"](checkpoint=path, **kw)
    if (path / CHECKPOINT_SPEC).exists():
        spec = AdapterSpec.from_toml(path / CHECKPOINT_SPEC)
    else:
        spec = detect_family(path)
    name = FAMILY_TOKENIZERS.get(spec.name)
    if name is None or name not in _REGISTRY:
        raise ValueError(
            f"checkpoint {path} is family {spec.name!r}, which has no registered speech tokenizer "
            f"and no organism tokenizer file; pass a tokenizer name "
            f"({', '.join(available_speech_tokenizers())}) or module:factory"
        )
    return _REGISTRY[name](**kw)


def _need(package: str, install: str, files: str) -> ImportError:
    return ImportError(
        f"this speech tokenizer needs the {package!r} package ({install}) and its checkpoint "
        f"files: {files}"
    )


def _missing_files(who: str, root: Path, names: list[str], how: str) -> None:
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise MissingTokenizerFiles(
            f"{who}: checkpoint files missing under {root}: {', '.join(missing)}. {how}"
        )


# --------------------------------------------------------------------------------------------
# SpiritLM (facebookresearch/spiritlm)
# --------------------------------------------------------------------------------------------

SPIRITLM_FILES = {
    "hubert": ["hubert_25hz/mhubert_base_25hz.pt", "hubert_25hz/L11_quantizer_500.pt"],
    "pitch": ["vqvae_f0_quantizer/config.yaml", "vqvae_f0_quantizer/model.pt"],
    "style": ["style_encoder_w2v2/config.json", "style_encoder_w2v2/pytorch_model.bin"],
}
_SPIRITLM_HOW = (
    "SpiritLM's speech tokenizer is request-gated: get it through the form linked in "
    "facebookresearch/spiritlm checkpoints/README.md and pass checkpoint_dir= the "
    "checkpoints/speech_tokenizer directory (or set SPIRITLM_CHECKPOINTS_DIR to checkpoints/)"
)


class SpiritLMSpeechTokenizer:
    """Adapter to ``spiritlm.speech_tokenizer`` (``SpiritLMTokenizer.encode_units``).

    ``encode_units`` returns space-separated per-frame unit strings under ``hubert`` (and
    ``pitch``, ``style`` for Expressive); they are parsed into :class:`FrameUnits` at SpiritLM's
    own rates (``hubert_rate`` 24.99, ``pitch_rate`` 12.5, ``style_rate`` 1). Pass ``tokenizer=``
    an already-built ``SpiritLMTokenizer`` to skip loading. HiFi-GAN is never loaded.
    """

    expected_sample_rate = 16000

    def __init__(
        self,
        *,
        expressive: bool = False,
        checkpoint_dir: str | Path | None = None,
        f0_backbone: str = "fcpe",
        tokenizer: Any = None,
        device: str = "cpu",
    ) -> None:
        self.expressive = expressive
        self.family = "spiritlm-expressive" if expressive else "spiritlm"
        self.tok = (
            tokenizer if tokenizer is not None else self._build(checkpoint_dir, f0_backbone, device)
        )

    def _build(self, checkpoint_dir: str | Path | None, f0_backbone: str, device: str) -> Any:
        streams = ["hubert", "pitch", "style"] if self.expressive else ["hubert"]
        files = [f for s in streams for f in SPIRITLM_FILES[s]]
        try:
            st = importlib.import_module("spiritlm.speech_tokenizer")
            hub = importlib.import_module("spiritlm.speech_tokenizer.hubert")
        except ImportError:
            raise _need(
                "spiritlm",
                "pip install git+https://github.com/facebookresearch/spiritlm (it needs torchaudio)",
                "checkpoints/speech_tokenizer/{" + ", ".join(files) + "}",
            ) from None
        if checkpoint_dir is not None:
            root = Path(checkpoint_dir)
        elif os.environ.get("SPIRITLM_CHECKPOINTS_DIR"):
            root = Path(os.environ["SPIRITLM_CHECKPOINTS_DIR"]) / "speech_tokenizer"
        else:
            root = Path(hub.CHECKPOINT_DIR)
        _missing_files(f"SpiritLM {self.family} tokenizer", root, files, _SPIRITLM_HOW)
        hubert_mod = importlib.import_module("spiritlm.speech_tokenizer.hubert.hubert_tokenizer")
        hubert = hubert_mod.HubertTokenizer(
            hubert_ckpt=root / SPIRITLM_FILES["hubert"][0],
            hubert_layer=11,
            quantizer_ckpt=root / SPIRITLM_FILES["hubert"][1],
            is_linear_quantizer=True,
        ).to(device)
        pitch = style = None
        if self.expressive:
            f0 = importlib.import_module("spiritlm.speech_tokenizer.f0.f0_tokenizer")
            pitch = f0.F0Tokenizer(
                f0_extractor_method=f0_backbone,
                quantizer_path=root / SPIRITLM_FILES["pitch"][1],
                hop_length=80,
                sampling_rate=16000,
                interpolate=True,
                device=device,
            )
            w2v2 = importlib.import_module("spiritlm.speech_tokenizer.style_encoder.w2v2_encoder")
            style = w2v2.Wav2Vec2StyleEncoder.from_pretrained(
                pretrained_model_name_or_path=root / "style_encoder_w2v2"
            ).to(device)
        return st.SpiritLMTokenizer(hubert_model=hubert, pitch_model=pitch, style_model=style)

    def __call__(self, audio: np.ndarray, sample_rate: int) -> FrameUnits:
        import torch

        a = check_audio(audio, sample_rate, self.expected_sample_rate, f"SpiritLM {self.family}")
        raw = self.tok.encode_units(torch.from_numpy(np.ascontiguousarray(a)))
        if not isinstance(raw, dict) or "hubert" not in raw:
            raise SpeechTokenizerError(
                f"spiritlm encode_units returned {type(raw).__name__} without a 'hubert' key"
            )
        hubert = _parse_unit_string(raw["hubert"], "hubert")
        if not hubert:
            raise SpeechTokenizerError(
                f"SpiritLM produced no units for {a.size / 16000:.3f} s of audio "
                f"(it skips chunks shorter than 1280 samples = 80 ms)"
            )
        streams: dict[str, UnitStream] = {}
        if self.expressive:
            for key, rate_attr, default in (
                ("pitch", "pitch_rate", 12.5),
                ("style", "style_rate", 1.0),
            ):
                if key not in raw:
                    raise SpeechTokenizerError(f"spiritlm expressive encode_units gave no {key!r}")
                units = _parse_unit_string(raw[key], key)
                if units:
                    rate = float(getattr(self.tok, rate_attr, default))
                    streams[key] = UnitStream(tuple(units), rate)
        rate = float(getattr(self.tok, "hubert_rate", 24.99))
        return FrameUnits(np.asarray(hubert, dtype=np.int64), rate, streams)


def _parse_unit_string(s: Any, key: str) -> list[int]:
    if not isinstance(s, str):
        raise SpeechTokenizerError(f"spiritlm {key!r} units must be a space-separated string")
    try:
        return [int(t) for t in s.split()]
    except ValueError as e:
        raise SpeechTokenizerError(f"spiritlm {key!r} units: {e}") from None


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
            _missing_files(
                who, md, ["config.json"], "model_dir must be a transformers HubertModel directory"
            )
            from transformers import HubertModel

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
        import torch
        import torch.nn.functional as F

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
        from safetensors.numpy import load_file

        t = load_file(str(p))
        c = t.get("cluster_centers_", next(iter(t.values())))
    elif suf == ".pt":
        import torch

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
            raise _need("joblib", "pip install joblib scikit-learn", str(p)) from None
        c = np.asarray(joblib.load(p).cluster_centers_)
    c = np.asarray(c, dtype=np.float32)
    if c.ndim != 2 or c.shape[0] < 1:
        raise SpeechTokenizerError(f"k-means file {p}: centroids must be [K, D], got {c.shape}")
    return c


# --------------------------------------------------------------------------------------------
# Organisms
# --------------------------------------------------------------------------------------------

# File names an organism checkpoint may store its unit tokenizer under (first found wins).
ORGANISM_TOKENIZER_FILE = "unit_tokenizer.json"


def organism_tokenizer_path(checkpoint: Path) -> Path | None:
    """``unit_tokenizer.json`` in the organism checkpoint, or in its parent (``organisms/``, where
    all organisms built from one corpus share it) when the checkpoint is an organism."""
    if (checkpoint / ORGANISM_TOKENIZER_FILE).is_file():
        return checkpoint / ORGANISM_TOKENIZER_FILE
    shared = checkpoint.parent / ORGANISM_TOKENIZER_FILE
    if shared.is_file() and (checkpoint / "organism.json").is_file():
        return shared
    return None


class OrganismSpeechTokenizer:
    """The organisms' own tokenizer (``speech_lens.organisms.units.UnitTokenizer``: MFCC frames
    pooled in word-synchronous windows -> CMVN -> k-means), loaded from the checkpoint.

    It is word-synchronous (``needs_words``): units are cut inside each word's gap-extended span,
    deduplicated within a word only (its own ``runs``), and the word times come back on the
    unit grid (``FrameUnits.words``), exactly as the organism manifests were built.
    """

    needs_words = True

    def __init__(
        self, checkpoint: str | Path | None = None, *, path: str | Path | None = None
    ) -> None:
        if path is None:
            if checkpoint is None:
                raise ValueError("organism tokenizer: pass checkpoint= (directory) or path= (file)")
            ckpt = Path(checkpoint)
            path = organism_tokenizer_path(ckpt)
            if path is None:
                raise MissingTokenizerFiles(
                    f"organism checkpoint {ckpt} has no {ORGANISM_TOKENIZER_FILE} "
                    "(scripts/build_corpus.py units writes it next to the organisms)"
                )
        self.path = Path(path)
        units_mod = importlib.import_module("speech_lens.organisms.units")
        self.inner = units_mod.UnitTokenizer.load(self.path)
        self.family = "spiritlm-organism"
        if checkpoint is not None and (Path(checkpoint) / "speech_lens.toml").is_file():
            from speech_lens.adapters import AdapterSpec

            self.family = AdapterSpec.from_toml(Path(checkpoint) / "speech_lens.toml").name
        self.expected_sample_rate = int(self.inner.config.sample_rate)
        self.frame_rate = float(self.inner.config.rate)
        self.n_units = int(self.inner.k)

    def __call__(self, audio: np.ndarray, sample_rate: int, words: Any = None) -> FrameUnits:
        from speech_lens.data import Word

        a = check_audio(audio, sample_rate, self.expected_sample_rate, "organism tokenizer")
        if not words:
            raise SpeechTokenizerError(
                "the organism tokenizer is word-synchronous: it needs the word timings of the audio"
            )
        spans = [(w.text, float(w.start), float(w.end)) for w in words]
        units, durs, wq = self.inner.encode(a, spans)
        frames = np.repeat(np.asarray(units, dtype=np.int64), np.asarray(durs, dtype=np.int64))
        return FrameUnits(
            frames,
            self.frame_rate,
            runs=(tuple(int(u) for u in units), tuple(int(d) for d in durs)),
            words=tuple(Word(w, float(s), float(e)) for w, s, e in wq),
        )


register_speech_tokenizer("spiritlm", lambda **kw: SpiritLMSpeechTokenizer(**kw))
register_speech_tokenizer(
    "spiritlm-expressive", lambda **kw: SpiritLMSpeechTokenizer(expressive=True, **kw)
)
register_speech_tokenizer("sims", lambda **kw: HubertKMeansTokenizer(preset="sims", **kw))
register_speech_tokenizer("speechgpt", lambda **kw: HubertKMeansTokenizer(preset="speechgpt", **kw))
register_speech_tokenizer("mhubert", lambda **kw: HubertKMeansTokenizer(**kw))
register_speech_tokenizer("organism", lambda **kw: OrganismSpeechTokenizer(**kw))


# --------------------------------------------------------------------------------------------
# Pipeline: audio records -> utterances -> JSONL manifest (resumable)
# --------------------------------------------------------------------------------------------


def checkpoint_spec(
    path: str | Path, *, family: str | None = None, spec: str | Path | None = None
) -> Any:
    """The adapter spec of a checkpoint without loading its weights (as ``load_model`` picks it)."""
    from speech_lens.adapters import (
        CHECKPOINT_SPEC,
        AdapterError,
        AdapterSpec,
        detect_family,
        get_spec,
    )

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
    from speech_lens.align import AlignmentError, align_cached
    from speech_lens.audio import AudioError
    from speech_lens.data import Utterance

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
    from tqdm.auto import tqdm

    from speech_lens.align import AlignmentError
    from speech_lens.audio import AudioError
    from speech_lens.data import DataError, utterance_to_record

    out = Path(out)
    if dedup is None:
        dedup = bool(spec.units.dedup) if spec is not None else True
    partial, done = _resume(out)
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
                    rec,
                    tokenizer,
                    aligner=aligner,
                    align_cache=align_cache,
                    dedup=dedup,
                    n_units=spec.units.count if spec is not None else None,
                    frame_rate=spec.units.frame_rate if spec is not None else None,
                    prosody_counts=(
                        {k: v.count for k, v in spec.prosody.items()} if spec is not None else None
                    ),
                )
            except (AudioError, AlignmentError, SpeechTokenizerError, DataError) as e:
                if not skip_errors:
                    f.flush()
                    raise
                summ.n_failed += 1
                summ.failures.append((rec.id, str(e)))
                continue
            row = utterance_to_record(utt)
            if rec.meta:
                row["meta"] = rec.meta
            if isinstance(rec.audio, str | Path):
                row["audio"] = str(rec.audio)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a crash loses at most the line being written
            done.add(utt.id)
            summ.n_new += 1
            summ.n_total += 1
            summ.words += len(utt.words)
            summ.audio_seconds += utt.duration
            summ.frames += utt.n_frames
            summ.units += len(utt.units) if utt.durations is not None else len(utt.dedup().units)
            covered = set(utt.unit_words())
            summ.words_without_units += [
                (utt.id, w.text) for i, w in enumerate(utt.words) if i not in covered
            ]
    bar.close()
    os.replace(partial, out)
    return summ
