"""espeak-ng speech with exact word spans, through ctypes (``espeakng-loader``; espeak-ng is GPL:
a build-time tool of scripts/, never imported by src/).

Each word follows an SSML ``<mark/>`` and a short ``<break/>`` separates the words, so that
espeak does not merge a function word into the previous one ("that a" -> one word without a
WORD event): a word spans from its mark to the next mark (or the end of the audio). Voices are
``en-us+VARIANT`` (the variants of espeak-ng-data/voices/!v: m1-m8, f1-f5, klatt, ...).
"""

from __future__ import annotations

import ctypes
import html

import numpy as np

EVENT_MARK = 3
SSML_UTF8 = 0x10 | 0x1
RATE, PITCH = 1, 3  # espeak_PARAMETER


class EspeakEvent(ctypes.Structure):
    class Id(ctypes.Union):
        _fields_ = [
            ("number", ctypes.c_int),
            ("name", ctypes.c_char_p),
            ("string", ctypes.c_char * 8),
        ]

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", Id),
    ]


CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(EspeakEvent)
)


class EspeakWords:
    """``synth(words, voice, rate, pitch)`` -> 16 kHz float32 audio and (word, start, end) s."""

    def __init__(self, break_ms: int = 40) -> None:
        import espeakng_loader as el

        self.lib = ctypes.cdll.LoadLibrary(el.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int] * 2 + [ctypes.c_char_p, ctypes.c_int]
        self.sr = self.lib.espeak_Initialize(2, 0, el.get_data_path().encode(), 0)
        if self.sr <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.break_ms = break_ms
        self._chunks: list[np.ndarray] = []
        self._marks: list[tuple[int, int]] = []  # (mark number, sample)
        self._cb = CALLBACK(self._collect)  # kept alive: espeak calls it
        self.lib.espeak_SetSynthCallback(self._cb)
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != 0:  # espeakEVENT_LIST_TERMINATED
            e = events[i]
            if e.type == EVENT_MARK:
                self._marks.append((int(e.id.name.decode()), e.audio_position * self.sr // 1000))
            i += 1
        return 0

    def synth(
        self, words: list[str], voice: str, rate: int = 175, pitch: int = 50
    ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
        from speech_lens.organisms.corpus import resample

        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(RATE, rate, 0)
        self.lib.espeak_SetParameter(PITCH, pitch, 0)
        pause = f'<break time="{self.break_ms}ms"/>'
        body = pause.join(f'<mark name="{k}"/>{html.escape(w)} ' for k, w in enumerate(words))
        text = f'<speak>{body}<mark name="{len(words)}"/></speak>'.encode()
        self._chunks, self._marks = [], []
        if self.lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, SSML_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak-ng failed on {' '.join(words)!r}")
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0
        marks = dict(self._marks)
        if sorted(marks) != list(range(len(words) + 1)):
            raise RuntimeError(f"espeak-ng marks {sorted(marks)} for {' '.join(words)!r}")
        t = [min(marks[k], len(audio)) / self.sr for k in range(len(words))] + [
            len(audio) / self.sr
        ]
        spans = [(w, t[k], t[k + 1]) for k, w in enumerate(words)]
        for w, s, e in spans:
            if e - s < 0.03:
                raise RuntimeError(f"word {w!r} got {e - s:.3f} s from espeak-ng ({voice})")
        return resample(audio, self.sr, 16000), spans
