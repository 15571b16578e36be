"""SpiritLM's speech tokenizer (HuBERT units, optional pitch and style)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speech_lens.audio.tokenizers.registry import (
    FrameUnits,
    SpeechTokenizerError,
    check_audio,
    missing_files,
    missing_package_error,
)
from speech_lens.data.utterance import UnitStream

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
            raise missing_package_error(
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
        missing_files(f"SpiritLM {self.family} tokenizer", root, files, _SPIRITLM_HOW)
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
