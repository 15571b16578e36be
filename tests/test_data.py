"""Utterances, dedup, word<->unit mapping, manifest / slamkit / TextGrid / unit-string readers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speech_lens.data.alignments import read_textgrid, utterance_from_textgrid
from speech_lens.data.manifest import read_manifest, read_slamkit, write_manifest
from speech_lens.data.units import parse_plain_units, parse_unit_string, split_spiritlm_string
from speech_lens.data.utterance import (
    DataError,
    DataWarning,
    UnitStream,
    Utterance,
    Word,
    assign_words,
    dedup,
    expand,
)
from speech_lens.vocab import UnitBlock, VocabLayout

EXAMPLES = Path(__file__).parent.parent / "examples" / "data"

# layouts with the released ids (no model needed to check unit strings and ranges)
SPIRIT_EXPR = VocabLayout(
    vocab_size=32768,
    n_tokenizer=32667,
    units=UnitBlock("units", "[Hu{k}]", 32002, 501, 24.99, True),
    prosody={
        "pitch": UnitBlock("pitch", "[Pi{k}]", 32503, 64, 12.5, True),
        "style": UnitBlock("style", "[St{k}]", 32567, 100, 1.0, False),
    },
    marker_ids={"text": 32000, "speech": 32001},
    marker_tokens={"text": "[Text]", "speech": "[Speech]"},
)
SPEECHGPT = VocabLayout(
    vocab_size=33006,
    n_tokenizer=33006,
    units=UnitBlock("units", "<{k}>", 32000, 1000, 50.0, True),
    marker_ids={"sosp": 33000, "eosp": 33001},
    marker_tokens={"sosp": "<sosp>", "eosp": "<eosp>"},
)


def utt(**kw) -> Utterance:
    base = dict(
        id="u1",
        words=(Word("the", 0.0, 0.2), Word("cat", 0.24, 0.44), Word("sat", 0.44, 0.6)),
        units=(3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 9, 2, 2, 4, 4, 4),
        durations=None,
        frame_rate=25.0,
    )
    base.update(kw)
    return Utterance(**base)


# --------------------------------------------------------------------------------------------
# dedup and word mapping
# --------------------------------------------------------------------------------------------


def test_dedup_by_hand():
    assert dedup([5, 5, 7, 5, 5, 5]) == ((5, 7, 5), (2, 1, 3))
    u = utt().dedup()
    assert u.units == (3, 5, 7, 9, 2, 4) and u.durations == (2, 3, 2, 4, 2, 3)
    assert u.frames() == utt().units and u.n_frames == 16 and u.duration == pytest.approx(0.64)
    assert u.dedup() is u and u.as_frames() == utt()


@given(st.lists(st.integers(0, 4), min_size=1, max_size=200))
def test_dedup_then_expand_returns_frames(frames):
    units, durs = dedup(frames)
    assert expand(units, durs) == tuple(frames)
    assert all(a != b for a, b in itertools.pairwise(units))
    assert all(d >= 1 for d in durs)


def test_unit_words_end_and_midpoint_by_hand():
    # dedup units end at frames 2,5,7,11,13,16 -> 0.08,0.2,0.28,0.44,0.52,0.64 s
    u = utt()
    assert u.unit_words() == [0, 0, 1, 1, 2, -1]  # 0.44 ends "cat" (start of "sat"): cat
    # midpoints 0.04,0.14,0.24,0.36,0.48,0.58: 0.24 is the start of "cat" (half-open [s, e))
    assert u.unit_words("midpoint") == [0, 0, 1, 1, 2, 2]
    # a unit that ends exactly on a word's start lies before it: silence, not the word
    assert assign_words([0.24], [Word("cat", 0.24, 0.44)]) == [-1]


@st.composite
def utterances(draw):
    fr = draw(st.sampled_from([25.0, 24.99, 50.0]))
    frames = draw(st.lists(st.integers(0, 6), min_size=1, max_size=120))
    n = len(frames)
    cuts = sorted(set(draw(st.lists(st.integers(0, n), min_size=2, max_size=16))))
    words = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        if draw(st.booleans()):
            words.append(Word(f"w{i}", a / fr, b / fr + draw(st.sampled_from([0.0, 0.003]))))
    if not words:
        words = [Word("w", 0.0, n / fr)]
    # keep ends within the next start (the jitter may overlap a touching neighbour)
    fixed = [
        Word(w.text, w.start, min(w.end, words[i + 1].start) if i + 1 < len(words) else w.end)
        for i, w in enumerate(words)
    ]
    return Utterance("h", tuple(fixed), tuple(frames), None, fr)


@settings(max_examples=150, deadline=None)
@given(utterances(), st.sampled_from(["end", "midpoint"]))
def test_unit_words_invariants(u, rule):
    words = u.unit_words(rule)
    d = u.dedup()
    assert len(words) == len(d.units)
    assigned = [w for w in words if w >= 0]
    assert assigned == sorted(assigned)  # in time order
    fr = u.frame_rate
    for (s, e), w in zip(d.unit_frames(), words, strict=True):
        t = e / fr if rule == "end" else (s + e) / 2 / fr
        inside = [
            i
            for i, x in enumerate(u.words)
            if (
                x.start + 1e-6 < t <= x.end + 1e-6
                if rule == "end"
                else x.start - 1e-6 <= t < x.end - 1e-6
            )
        ]
        # at most one word, and the one given is one whose interval contains the time
        assert (w == -1) == (not inside)
        if inside:
            assert w == inside[0]


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field, text",
    [
        ({"units": ()}, "units", "empty utterance"),
        ({"words": ()}, "words", "no words"),
        (
            {"words": (Word("the", 0.0, 0.2), Word("cat", 0.24, 0.8))},
            "words[1].end",
            "past the audio end",
        ),
        (
            {"words": (Word("the", 0.0, 0.3), Word("cat", 0.24, 0.44))},
            "words[1].start",
            "overlapping",
        ),
        (
            {"words": (Word("cat", 0.24, 0.44), Word("the", 0.0, 0.2))},
            "words[1].start",
            "not sorted",
        ),
        ({"words": (Word("the", 0.3, 0.2),)}, "words[0].end", "before it starts"),
        ({"words": (Word("  ", 0.0, 0.2),)}, "words[0].text", "empty word"),
        ({"units": (1, -2, 3)}, "units[1]", "negative"),
        ({"units": (1, 2), "durations": (1,)}, "durations", "1 run lengths for 2 units"),
        ({"units": (1, 2), "durations": (1, 0)}, "durations[1]", "< 1"),
        ({"frame_rate": 0}, "frame_rate", "positive"),
        ({"units": "12 7"}, "units", "got a string"),
        ({"pitch": UnitStream((), 12.5)}, "pitch.units", "empty"),
    ],
)
def test_bad_utterances_are_refused_naming_id_and_field(kw, field, text):
    with pytest.raises(DataError) as e:
        utt(**kw)
    assert e.value.field == field and e.value.utterance == "u1"
    assert f"utterance 'u1': field {field}:" in str(e.value) and text in str(e.value)


def test_units_outside_layout_refused():
    with pytest.raises(DataError, match=r"utterance 'u1': field units\[2\]: unit 600 is outside"):
        utt(units=(1, 2, 600, 4) * 4).check_layout(SPIRIT_EXPR)
    bad_pitch = utt(pitch=UnitStream((1, 64), 12.5))
    with pytest.raises(DataError, match=r"field pitch.units\[1\].*\[Pi0\]..\[Pi63\]"):
        bad_pitch.check_layout(SPIRIT_EXPR)
    utt(units=(999,) * 16).check_layout(SPEECHGPT)  # fine there


def test_word_text_is_stripped_and_text_defaults():
    u = utt(words=(Word(" the", 0.0, 0.2), Word(" cat", 0.24, 0.44)))
    assert [w.text for w in u.words] == ["the", "cat"] and u.text == "the cat"


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------


def test_manifest_roundtrip_is_atomic(tmp_path):
    us = [
        utt(),
        utt(id="u2").dedup(),
        utt(
            id="u3",
            speaker="s",
            split="test",
            pitch=UnitStream((1, 1, 2, 2, 2, 3, 3, 3), 12.5),
            style=UnitStream((7,), 1.0),
        ),
    ]
    out = tmp_path / "m.jsonl"
    assert write_manifest(out, us) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temp file left
    back = list(read_manifest(out))
    assert back == us
    first = json.loads(out.read_text().splitlines()[1])
    assert first["durations"] == [2, 3, 2, 4, 2, 3] and first["words"][0] == ["the", 0.0, 0.2]

    def boom():
        yield utt(id="x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_manifest(out, boom())
    assert list(read_manifest(out)) == us  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


def _rec(**kw):
    r = {
        "id": "ok",
        "speaker": None,
        "split": "train",
        "text": "the cat",
        "words": [["the", 0.0, 0.2], ["cat", 0.24, 0.44]],
        "frame_rate": 25.0,
        "units": [3, 5, 7, 9],
        "durations": [2, 3, 2, 4],
    }
    r.update(kw)
    return json.dumps(r)


def test_manifest_load_reports_and_counts_skipped_records(tmp_path):
    lines = [
        _rec(id="good1"),
        _rec(id="past_end", words=[["the", 0.0, 0.2], ["cat", 0.24, 0.9]]),
        _rec(id="overlap", words=[["the", 0.0, 0.3], ["cat", 0.24, 0.44]]),
        _rec(id="unsorted", words=[["cat", 0.24, 0.44], ["the", 0.0, 0.2]]),
        _rec(id="out_of_layout", units=[3, 5, 501, 9]),
        _rec(id="empty", units=[], durations=[]),
        _rec(id="unknown_string", units="[Hu3][Hu5][Xx7]", durations=None),
        "{not json",
        "",
        _rec(id="good2", units="[Hu3][Hu5][Hu7][Hu9]"),
        _rec(id="good3", units="3 5 7 9"),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reader = read_manifest(path, layout=SPIRIT_EXPR)
    with pytest.warns(
        DataWarning, match=r"skipped 7 of 10 records \(json: 1, units: 3, words: 3\)"
    ):
        got = [u.id for u in reader]
    assert got == ["good1", "good2", "good3"]
    rep = reader.report
    assert (rep.n_records, rep.n_loaded, rep.n_skipped) == (10, 3, 7)
    by_id = {s.id: s for s in rep.skipped}
    assert by_id["past_end"].field == "words[1].end" and by_id["past_end"].line == 2
    assert "past the audio end" in by_id["past_end"].reason
    assert by_id["overlap"].field == "words[1].start" and "overlapping" in by_id["overlap"].reason
    assert by_id["unsorted"].field == "words[1].start" and "not sorted" in by_id["unsorted"].reason
    assert by_id["out_of_layout"].field == "units[2]" and "outside" in by_id["out_of_layout"].reason
    assert by_id["empty"].field == "units" and "empty utterance" in by_id["empty"].reason
    assert by_id["unknown_string"].field == "units" and "'[Xx7]'" in by_id["unknown_string"].reason
    assert by_id[None].field == "json" and by_id[None].line == 8
    assert rep.by_field() == {"words": 3, "units": 3, "json": 1}
    assert "3 of 10 records loaded, 7 skipped" in rep.summary()
    # without a layout, unit strings cannot be read and ranges are not checked
    plain = read_manifest(path)
    with pytest.warns(DataWarning):
        assert [u.id for u in plain] == ["good1", "out_of_layout", "good3"]
    assert "pass layout=" in next(s for s in plain.report.skipped if s.id == "good2").reason
    with pytest.raises(DataError, match=r"utterance 'past_end': field words\[1\].end.*m.jsonl:2"):
        list(read_manifest(path, strict=True))


def test_manifest_streams(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(_rec(id="a") + "\n" + _rec(id="b") + "\n")
    reader = read_manifest(path)
    it = iter(reader)
    assert next(it).id == "a"
    with path.open("a") as f:  # a record appended while reading is seen: the file is streamed
        f.write(_rec(id="c") + "\n")
    assert [u.id for u in it] == ["b", "c"]
    assert reader.report.n_loaded == 3
    assert [u.id for u in reader] == ["a", "b", "c"]  # iterable again, fresh report
    assert reader.report.n_records == 3


def test_example_manifest_loads():
    reader = read_manifest(EXAMPLES / "sample_manifest.jsonl", layout=SPIRIT_EXPR)
    us = list(reader)
    assert reader.report.n_skipped == 0 and len(us) == 4
    assert any(u.pitch is not None and u.style is not None for u in us)


# --------------------------------------------------------------------------------------------
# slamkit, TextGrid, unit strings
# --------------------------------------------------------------------------------------------


def test_slamkit_metadata(tmp_path):
    [u] = read_slamkit(EXAMPLES / "s1_slamkit.json")
    m = next(iter(read_manifest(EXAMPLES / "sample_manifest.jsonl")))
    assert u.id == "s1" and u.words == m.words and u.units == m.units
    assert u.durations == m.durations and u.text == "the cat sat on the mat"
    meta = {
        "file_name": "a/b.wav",
        "text": " the cat",
        "aligned_text": [[" the", 0, 0.2], [" cat", 0.24, 0.44]],
    }
    p = tmp_path / "b.json"
    p.write_text(json.dumps(meta))
    [v] = read_slamkit(p, units=[3, 5, 7, 9], durations=[2, 3, 2, 4])
    assert v.id == "b" and [w.text for w in v.words] == ["the", "cat"] and v.frame_rate == 25.0
    with pytest.raises(DataError, match="field units"):
        read_slamkit(p)


# short text format; a quote inside a label is doubled
SHORT_TG = "\n".join(
    [
        'File type = "ooTextFile"',
        'Object class = "TextGrid"',
        "",
        "0",
        "1.0",
        "<exists>",
        "2",
        '"IntervalTier"',
        '"words"',
        "0",
        "1.0",
        "3",
        "0",
        "0.3",
        '"the ""big"""',
        "0.3",
        "0.5",
        '"sil"',
        "0.5",
        "1.0",
        '"cat"',
        '"TextTier"',
        '"events"',
        "0",
        "1.0",
        "1",
        "0.4",
        '"click"',
    ]
)


def test_textgrid_builtin_matches_praatio(tmp_path):
    long_ = EXAMPLES / "s1.TextGrid"
    a = read_textgrid(long_)
    assert a == read_textgrid(long_, engine="praatio")
    assert [w.text for w in a] == ["the", "cat", "sat", "on", "the", "mat"]
    short = tmp_path / "x.TextGrid"
    short.write_text(SHORT_TG)
    b = read_textgrid(short)
    assert b == (Word('the "big"', 0.0, 0.3), Word("cat", 0.5, 1.0))
    assert b == read_textgrid(short, engine="praatio")
    with pytest.raises(DataError, match="no tier named 'phones'"):
        read_textgrid(short, "phones")
    with pytest.raises(DataError, match="not an IntervalTier"):
        read_textgrid(short, "events")
    u = utterance_from_textgrid(long_, [1] * 50, frame_rate=25.0)
    assert u.id == "s1" and u.words == a


def test_textgrid_truncated(tmp_path):
    p = tmp_path / "t.TextGrid"
    p.write_text(SHORT_TG[:120])
    with pytest.raises(DataError, match="ends early"):
        read_textgrid(p)


def test_unit_strings():
    assert parse_unit_string("[Hu12][Hu7] [Hu500]", SPIRIT_EXPR) == [12, 7, 500]
    assert parse_unit_string("[Speech][Hu12][Hu7]", SPIRIT_EXPR) == [12, 7]
    assert parse_unit_string("<sosp><12><7><999><eosp>", SPEECHGPT) == [12, 7, 999]
    assert parse_unit_string("[Pi3][Pi63]", SPIRIT_EXPR, "pitch") == [3, 63]
    with pytest.raises(
        DataError, match=r"utterance 'x': field units: unit '<1000>' is out of range 0..999"
    ):
        parse_unit_string("<12><1000>", SPEECHGPT, utterance="x")
    with pytest.raises(DataError, match="field units: unknown unit string '<unk>'"):
        parse_unit_string("<12><unk>", SPEECHGPT)
    with pytest.raises(DataError, match="unknown unit string 'cat'"):
        parse_unit_string("[Hu1]cat[Hu2]", SPIRIT_EXPR)
    with pytest.raises(DataError, match="out of range"):
        parse_unit_string("[Hu501]", SPIRIT_EXPR)
    assert parse_plain_units("78 42 81,159") == [78, 42, 81, 159]
    with pytest.raises(DataError, match="not a plain list"):
        parse_plain_units("78 x 81")
    s = "[St71][Pi39][Hu99][Hu49][Pi48][Hu423]"
    assert split_spiritlm_string(s, SPIRIT_EXPR) == {
        "units": [99, 49, 423],
        "pitch": [39, 48],
        "style": [71],
    }
    with pytest.raises(DataError, match="unknown unit string"):
        split_spiritlm_string("[St71][Zz1]", SPIRIT_EXPR)
