"""Audio decoding, resampling, data set readers (folder, manifest, Parquet, HF datasets) and
forced alignment with its cache. Test audio is synthesised here (tones, noise); the two short
sentences in tests/data/speech were rendered once with Piper (word spans exact by construction)."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speech_lens.audio.align import (
    AlignmentCache,
    AlignmentError,
    PocketsphinxAligner,
    align_cached,
    transcript_words,
)
from speech_lens.audio.columns import CSFA_COLUMNS, Columns, parse_words
from speech_lens.audio.datasets import (
    open_audio_dataset,
    read_audio_folder,
    read_audio_manifest,
    read_audio_table,
)
from speech_lens.audio.decode import AudioError, load_audio, resample
from speech_lens.data.utterance import Word

SPEECH = Path(__file__).parent / "data" / "speech"
LSB = 1.01 / 32768  # one 16-bit step: libsndfile scales float<->int16 by 32767 or 32768


def tone(freq: float, seconds: float, sr: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def flac_bytes(x: np.ndarray, sr: int) -> bytes:
    b = io.BytesIO()
    sf.write(b, x, sr, format="FLAC", subtype="PCM_16")
    return b.getvalue()


def pcm16(x: np.ndarray) -> np.ndarray:
    """What a 16-bit file stores (soundfile's float->int16 rounding)."""
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.float32) / 32768


# --------------------------------------------------------------------------------------------
# decoding and resampling
# --------------------------------------------------------------------------------------------


def test_resample_matches_tone_rendered_at_target_rate(tmp_path):
    # a 440 Hz stereo tone at 22.05 kHz, decoded + mixed + resampled to 16 kHz, equals the same
    # tone rendered directly at 16 kHz (away from the filter's edge transients)
    x = tone(440, 1.0, 22050)
    sf.write(tmp_path / "t.wav", np.stack([x, x], 1), 22050, subtype="FLOAT")
    y, sr = load_audio(tmp_path / "t.wav", sample_rate=16000)
    ref = tone(440, 1.0, 16000)
    assert sr == 16000 and y.dtype == np.float32 and y.ndim == 1
    assert len(y) == len(ref)
    mid = slice(400, -400)
    np.testing.assert_allclose(y[mid], ref[mid], atol=2e-3)
    # and the generic routine is a no-op at equal rates
    np.testing.assert_array_equal(resample(ref, 16000, 16000), ref)


def test_decoding_sources_agree(tmp_path):
    x = tone(300, 0.5, 16000)
    b = flac_bytes(x, 16000)
    (tmp_path / "a.flac").write_bytes(b)
    want = pcm16(x)
    for src in (
        tmp_path / "a.flac",
        str(tmp_path / "a.flac"),
        b,
        {"bytes": b, "path": "a.flac"},
        {"bytes": None, "path": str(tmp_path / "a.flac")},
        {"array": want, "sampling_rate": 16000},
        (want, 16000),
        ((want * 32768).astype(np.int16), 16000),
    ):
        y, sr = load_audio(src)
        assert sr == 16000
        np.testing.assert_allclose(y, want, atol=LSB)


def test_unreadable_audio_names_the_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file at all")
    with pytest.raises(AudioError, match=r"broken\.wav.*unreadable"):
        load_audio(bad)
    with pytest.raises(AudioError, match=r"missing\.wav.*does not exist"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="row 7.*unreadable bytes"):
        load_audio(b"garbage", name="row 7")


def test_silence_only_file_is_refused(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match=r"quiet\.wav.*silence only"):
        load_audio(tmp_path / "quiet.wav")
    # a faint hiss at -80 dBFS is still silence; speech-level audio is not
    sf.write(tmp_path / "hiss.wav", np.full(16000, 1e-4, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"hiss\.wav.*silence only"):
        load_audio(tmp_path / "hiss.wav")
    y, _ = load_audio(SPEECH / "the_cat_sat.flac")
    assert np.abs(y).max() > 0.05


def test_wrong_and_unsupported_sample_rates(tmp_path):
    sf.write(tmp_path / "r22.wav", tone(440, 0.3, 22050), 22050)
    with pytest.raises(AudioError, match=r"r22\.wav.*wrong sample rate 22050 Hz, expected 16000"):
        load_audio(tmp_path / "r22.wav", sample_rate=16000, resample_ok=False)
    sf.write(tmp_path / "r4k.wav", tone(440, 0.3, 4000), 4000)
    with pytest.raises(AudioError, match=r"r4k\.wav.*unsupported sample rate 4000 Hz"):
        load_audio(tmp_path / "r4k.wav", sample_rate=16000)
    with pytest.raises(AudioError, match=r"r22\.wav.*declares 16000 Hz but the file is 22050"):
        load_audio(tmp_path / "r22.wav", declared_rate=16000)


# --------------------------------------------------------------------------------------------
# data sets
# --------------------------------------------------------------------------------------------


def test_folder_reader_with_transcripts_and_timings(tmp_path):
    d = tmp_path / "corpus"
    (d / "spk1").mkdir(parents=True)
    for name in ("the_cat_sat", "tom_lives_in"):
        (d / "spk1" / f"{name}.flac").write_bytes((SPEECH / f"{name}.flac").read_bytes())
    meta = json.loads((SPEECH / "the_cat_sat.json").read_text())
    (d / "spk1" / "the_cat_sat.txt").write_text(meta["text"] + "\n")
    slam = {
        "file_name": "the_cat_sat.flac",
        "aligned_text": [[" " + w, s, e] for w, s, e in meta["words"]],
    }
    (d / "spk1" / "the_cat_sat.json").write_text(json.dumps(slam))
    (d / "spk1" / "tom_lives_in.lab").write_text("Tom lives in Paris.")
    recs = list(read_audio_folder(d))
    assert [r.id for r in recs] == ["spk1/the_cat_sat", "spk1/tom_lives_in"]
    assert recs[0].text == "the cat sat on the mat"
    assert recs[0].words == tuple(Word(w, s, e) for w, s, e in meta["words"])
    assert recs[1].text == "Tom lives in Paris." and recs[1].words is None
    assert len(open_audio_dataset(d)) == 2
    with pytest.raises(AudioError, match="holds no audio"):
        read_audio_folder(tmp_path / "corpus" / "spk1" / "..", recursive=False)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_reader_resolves_relative_paths(tmp_path, fmt):
    sf.write(tmp_path / "a.wav", tone(200, 0.4, 16000), 16000)
    sf.write(tmp_path / "b.wav", tone(250, 0.4, 16000), 16000)
    rows = [
        {
            "uid": "u1",
            "wav": "a.wav",
            "sentence": "one two",
            "words": json.dumps([["one", 0.0, 0.2], ["two", 0.2, 0.4]]),
        },
        {"uid": "u2", "wav": "b.wav", "sentence": "three", "words": ""},
    ]
    if fmt == "jsonl":
        p = tmp_path / "m.jsonl"
        p.write_text(
            "\n".join(
                json.dumps({**r, "words": json.loads(r["words"]) if r["words"] else None})
                for r in rows
            )
        )
    else:
        import csv

        p = tmp_path / "m.csv"
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    cols = Columns.parse("id=uid,audio=wav,text=sentence")
    recs = list(read_audio_manifest(p, cols))
    assert [r.id for r in recs] == ["u1", "u2"]
    assert recs[0].words == (Word("one", 0.0, 0.2), Word("two", 0.2, 0.4))
    assert recs[1].words in (None, ())
    y, _sr = recs[1].load()
    np.testing.assert_allclose(y, pcm16(tone(250, 0.4, 16000)), atol=LSB)
    # a bad row does not stop the stream: it becomes a record whose load() raises, naming the row
    bad = list(read_audio_manifest(p, Columns.parse("id=uid,audio=speech")))
    assert len(bad) == 2 and all(r.error for r in bad)
    with pytest.raises(AudioError, match=r"m\.(jsonl|csv):1: missing column\(s\) \['speech'\]"):
        bad[0].load()


def _csfa_rows() -> tuple[list[dict], dict[str, np.ndarray]]:
    """Two Common-Sense-Facts-Audio-style rows: prompt, 3 renderings (different rates), word
    timings per rendering, correct and counterfactual completions, category."""
    audio: dict[str, np.ndarray] = {}
    rows = []
    for i, (prompt, good, bad) in enumerate(
        [("the sky is", "blue", "green"), ("ice is", "cold", "hot")]
    ):
        renders, timings = [], []
        for k, sr in enumerate((16000, 22050, 24000)):
            x = tone(180 + 40 * k + 10 * i, 0.9, sr)
            audio[f"{i}#{k}"] = pcm16(x)
            renders.append({"bytes": flac_bytes(x, sr), "path": f"r{i}_{k}.flac"})
            ws = prompt.split()
            timings.append(
                [{"word": w, "start": 0.25 * j, "end": 0.25 * j + 0.2} for j, w in enumerate(ws)]
            )
        rows.append(
            {
                "id": f"fact{i}",
                "prompt": prompt,
                "audio": renders,
                "word_timings": timings,
                "correct": good,
                "counterfactual": bad,
                "category": "nature",
            }
        )
    return rows, audio


def test_parquet_table_in_csfa_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, audio = _csfa_rows()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "csfa.parquet")
    ds = read_audio_table(tmp_path / "csfa.parquet", CSFA_COLUMNS)
    recs = list(ds)
    assert len(ds) == 2 and not ds.exact and len(recs) == 6  # len counts rows, not renderings
    assert [r.id for r in recs] == [
        "fact0#0",
        "fact0#1",
        "fact0#2",
        "fact1#0",
        "fact1#1",
        "fact1#2",
    ]
    assert recs[4].text == "ice is" and recs[4].meta == {
        "correct": "cold",
        "counterfactual": "hot",
        "category": "nature",
    }
    assert recs[4].words == (Word("ice", 0.0, 0.2), Word("is", 0.25, 0.45))
    for r in recs:
        i, k = r.id.removeprefix("fact").split("#")
        sr = (16000, 22050, 24000)[int(k)]
        y, got_sr = r.load()
        assert got_sr == sr
        np.testing.assert_allclose(y, audio[f"{i}#{k}"], atol=LSB)
        y16, _ = r.load(sample_rate=16000)
        assert abs(len(y16) - 0.9 * 16000) <= 1


def test_parquet_table_one_column_per_rendering(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, audio = _csfa_rows()
    flat = []
    for r in rows:
        d = {"key": r["id"], "prompt": r["prompt"], "good": r["correct"]}
        for k in range(3):
            d[f"a{k}"] = r["audio"][k]
            wt = r["word_timings"][k]  # parallel lists, another common timing shape
            d[f"w{k}"] = {key: [t[key] for t in wt] for key in ("word", "start", "end")}
        flat.append(d)
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "flat.parquet")
    cols = Columns.parse("id=key,text=prompt,audio=a0|a1|a2,words=w0|w1|w2,meta=good")
    recs = list(read_audio_table(tmp_path / "flat.parquet", cols))
    assert [r.id for r in recs][:3] == ["fact0#a0", "fact0#a1", "fact0#a2"]
    assert recs[2].meta == {"good": "blue"} and recs[2].words[-1] == Word("is", 0.5, 0.7)
    np.testing.assert_allclose(recs[2].load()[0], audio["0#2"], atol=LSB)
    (bad, _) = list(
        read_audio_table(tmp_path / "flat.parquet", Columns.parse("audio=a0,text=nope"))
    )
    with pytest.raises(AudioError, match=r"flat\.parquet row 0: missing column\(s\) \['nope'\]"):
        bad.load()


def test_hf_dataset_with_audio_feature(tmp_path):
    """A Parquet file carrying HF `Audio` feature metadata, loaded by `datasets` (which would
    decode with torchcodec): the reader casts to raw bytes and decodes with soundfile."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = tone(330, 0.5, 16000)
    t = pa.table(
        {
            "id": ["a"],
            "audio": [{"bytes": flac_bytes(x, 16000), "path": "a.flac"}],
            "text": ["hi there"],
        }
    )
    feats = {
        "id": {"dtype": "string", "_type": "Value"},
        "audio": {"_type": "Audio"},
        "text": {"dtype": "string", "_type": "Value"},
    }
    t = t.replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}
    )
    pq.write_table(t, tmp_path / "hf.parquet")
    ds = datasets.Dataset.from_parquet(
        str(tmp_path / "hf.parquet"), cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(ds.features["audio"], datasets.Audio)
    recs = list(read_audio_table(ds))
    assert [(r.id, r.text) for r in recs] == [("a", "hi there")]
    np.testing.assert_allclose(recs[0].load()[0], pcm16(x), atol=LSB)
    ds.save_to_disk(str(tmp_path / "saved"))
    recs2 = list(open_audio_dataset(tmp_path / "saved"))
    np.testing.assert_allclose(recs2[0].load()[0], pcm16(x), atol=LSB)


def test_parse_words_shapes():
    want = (Word("a", 0.0, 0.1), Word("b", 0.2, 0.3))
    assert parse_words([["a", 0, 0.1], ["<sil>", 0.1, 0.2], ["b", 0.2, 0.3]], "x") == want
    assert (
        parse_words(
            [
                {"text": "a", "start_time": 0, "end_time": 0.1},
                {"text": "b", "start_time": 0.2, "end_time": 0.3},
            ],
            "x",
        )
        == want
    )
    assert parse_words({"words": ["a", "b"], "start": [0, 0.2], "end": [0.1, 0.3]}, "x") == want
    assert parse_words('[["a", 0, 0.1], ["b", 0.2, 0.3]]', "x") == want
    with pytest.raises(AudioError, match=r"row 3: word timing \[0\] has non-numeric times"):
        parse_words([["a", "zero", 0.1]], "row 3")


# --------------------------------------------------------------------------------------------
# forced alignment
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligner():
    return PocketsphinxAligner()


@pytest.mark.parametrize("name", ["the_cat_sat", "tom_lives_in"])
def test_pocketsphinx_agrees_with_tts_alignment(aligner, name):
    meta = json.loads((SPEECH / f"{name}.json").read_text())
    y, sr = load_audio(SPEECH / f"{name}.flac")
    words = aligner.align(y, sr, meta["text"])
    assert [w.text for w in words] == meta["text"].split()
    ref = meta["words"]
    # pocketsphinx gives the pause before a word to that word, so compare ends (and starts loosely)
    end_diff = [abs(w.end - e) for w, (_, _, e) in zip(words, ref, strict=True)]
    start_diff = [abs(w.start - s) for w, (_, s, _) in zip(words, ref, strict=True)]
    assert np.median(end_diff) < 0.08, end_diff
    assert max(start_diff) < 0.2, start_diff
    assert all(a.end <= b.start + 1e-9 for a, b in itertools.pairwise(words))


def test_aligner_names_words_it_cannot_place(aligner):
    y, sr = load_audio(SPEECH / "the_cat_sat.flac")
    with pytest.raises(AlignmentError, match=r"cannot place word\(s\) \['zorbleflax'\]") as e:
        aligner.align(y, sr, "the cat sat on the zorbleflax", where="the_cat_sat.flac")
    assert e.value.words == ("zorbleflax",)
    noise = (np.random.default_rng(0).standard_normal(16000) * 0.01).astype(np.float32)
    with pytest.raises(
        AlignmentError, match=r"noise\.wav: the aligner cannot place the words \['the', 'cat'"
    ):
        aligner.align(noise, 16000, "the cat sat on the mat", where="noise.wav")
    # a pronunciation added for an unknown word makes it placeable
    a2 = PocketsphinxAligner(pronunciations={"Mattx": "M AE T"})
    assert [w.text for w in a2.align(y, sr, "the cat sat on the Mattx")][-1] == "Mattx"
    assert transcript_words('"Hello," she said -- twice.') == ["Hello", "she", "said", "twice"]


def test_alignment_cache_per_file(tmp_path, aligner):
    y, sr = load_audio(SPEECH / "tom_lives_in.flac")
    calls = []

    class Counting:
        name = aligner.name
        sample_rate = 16000

        def align(self, audio, sample_rate, transcript, *, where=""):
            calls.append(transcript)
            return aligner.align(audio, sample_rate, transcript, where=where)

    c = AlignmentCache(tmp_path / "cache")
    w1 = align_cached(Counting(), y, sr, "tom lives in paris", cache=c)
    w2 = align_cached(Counting(), y, sr, "tom lives in paris", cache=c)
    assert w1 == w2 and len(calls) == 1
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    align_cached(Counting(), y, sr, "tom lives in Paris", cache=c)  # another transcript: a miss
    align_cached(Counting(), y[:-160], sr, "tom lives in paris", cache=c)  # other audio: a miss
    assert len(calls) == 3
    # a damaged entry is recomputed, not trusted
    for p in (tmp_path / "cache").rglob("*.json"):
        p.write_text("{oops")
    assert align_cached(Counting(), y, sr, "tom lives in paris", cache=c) == w1
    assert len(calls) == 4
