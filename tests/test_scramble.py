"""The scrambled-word-order control: every word keeps its units, run lengths and alignment, the
silence stays in place, the order is a seeded non-identity permutation, and a lens run with
``--scramble-words`` lenses the scrambled utterances and records that it did."""

from __future__ import annotations

import json
from collections import Counter
from itertools import accumulate

import pytest

from speech_lens import (
    DataError,
    UnitStream,
    Utterance,
    Word,
    encode_prompt,
    scramble_words,
    write_manifest,
)
from speech_lens.data.encoded import SPEECH
from speech_lens.data.scramble import scramble_order
from speech_lens.data.utterance import assign_words
from speech_lens.runs.distributed import run_distributed
from speech_lens.runs.lens import PARTIAL, RunError, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.testing.families import random_utterances


def _layout(utt: Utterance):
    """Per word its (unit, run length) pairs, the silence units in order, the silence units
    ending before each word slot starts, and each word's time offsets from its units (start
    minus its first unit's start, end minus its last unit's end): computed with
    ``assign_words``, not with the scrambler's own slots."""
    durs = utt.durations if utt.durations is not None else (1,) * len(utt.units)
    ends = [f / utt.frame_rate for f in accumulate(durs)]
    label = assign_words(ends, utt.words, "end")
    units = [
        [(u, d) for u, d, w in zip(utt.units, durs, label, strict=True) if w == j]
        for j in range(len(utt.words))
    ]
    silence = [(u, d) for u, d, w in zip(utt.units, durs, label, strict=True) if w == -1]
    before = [
        sum(1 for t, w in zip(ends, label, strict=True) if w == -1 and t <= word.start + 1e-6)
        for word in utt.words
    ]
    offsets = []
    for j, word in enumerate(utt.words):
        idx = [i for i, w in enumerate(label) if w == j]
        if not idx:
            offsets.append(None)
            continue
        first_start = ends[idx[0]] - durs[idx[0]] / utt.frame_rate
        offsets.append((word.start - first_start, word.end - ends[idx[-1]]))
    return units, silence, before, offsets


def _hand_made() -> list[Utterance]:
    """Deduplicated units (run lengths), a word with no unit (0.50-0.51 s: no unit ends inside),
    two words with no silence between them, a word whose end reaches into the next unit."""
    words = (
        Word("a", 0.04, 0.20),
        Word("gap", 0.50, 0.51),
        Word("b", 0.52, 0.70),
        Word("c", 0.70, 0.93),  # its last unit ends at 0.84; the next one at 0.96
        Word("d", 1.10, 1.30),
    )
    units = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
    durs = (1, 2, 3, 4, 3, 1, 2, 3, 2, 3, 2, 3, 3)  # 32 frames at 25 Hz
    return [
        Utterance("h0", words, units, durs, 25.0),
        Utterance("h1", words[:3], units[:9], durs[:9], 25.0),
    ]


UTTERANCES = [
    *random_utterances(4),
    *[u.dedup() for u in random_utterances(3, prefix="d")],
    *_hand_made(),
]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("utt", UTTERANCES, ids=lambda u: u.id)
def test_each_word_moves_with_its_units_and_times(utt, seed):
    s = scramble_words(utt, seed)
    order = scramble_order(utt.id, len(utt.words), seed)
    assert sorted(order) == list(range(len(utt.words))) and order != tuple(range(len(order)))
    assert [w.text for w in s.words] == [utt.words[j].text for j in order]
    assert s.text == " ".join(w.text for w in s.words)
    assert s.n_frames == utt.n_frames and Counter(s.units) == Counter(utt.units)
    assert (s.durations is None) == (utt.durations is None)
    units, silence, before, offsets = _layout(utt)
    s_units, s_silence, s_before, s_offsets = _layout(s)
    assert s_silence == silence  # the silence stays, in its order
    assert s_before == before  # and in its place: the same silence before each word slot
    for i, j in enumerate(order):
        assert s_units[i] == units[j], (i, j)  # the word's units and run lengths moved with it
        if offsets[j] is None:  # no unit: the zero-length word at its slot
            assert s_offsets[i] is None and s.words[i].start == s.words[i].end
            continue
        start, end = offsets[j]
        assert s_offsets[i][0] == pytest.approx(max(start, 0.0), abs=1e-9)
        assert s_offsets[i][1] == pytest.approx(min(end, 0.0), abs=1e-9)  # cut back to its units


def test_order_is_seeded_per_utterance_and_uniform_over_non_identity_permutations():
    u = UTTERANCES[0]
    assert scramble_words(u, 3) == scramble_words(u, 3)
    assert len({scramble_order(u.id, 5, seed) for seed in range(20)}) > 10
    assert scramble_order("x", 5, 1) != scramble_order("y", 5, 1)  # per utterance id
    counts = Counter(scramble_order("u", 3, seed) for seed in range(3000))
    assert len(counts) == 5 and (0, 1, 2) not in counts  # 3! - the identity
    assert all(abs(n / 3000 - 0.2) < 0.03 for n in counts.values()), counts
    one = Utterance("one", (Word("a", 0.0, 0.2),), (1, 2, 3, 4, 5), None, 25.0)
    assert scramble_words(one, 0) == one
    pitch = UnitStream((1, 2, 3), 12.5)
    with pytest.raises(DataError, match="pitch.*prosody streams"):
        scramble_words(Utterance("p", u.words, u.units, None, 25.0, pitch=pitch), 0)


def test_encoded_prompt_keeps_each_words_unit_tokens(tiny_model):
    model = tiny_model("spiritlm")
    for utt in random_utterances(4):
        s = scramble_words(utt, 5)
        order = scramble_order(utt.id, len(utt.words), 5)
        spans = [encode_prompt(model, x, mode="speech").speech_spans() for x in (utt, s)]
        prompts = [encode_prompt(model, x, mode="speech") for x in (utt, s)]

        def tokens(prompt, span):
            return [int(prompt.tokens[p]) for p in span.positions if prompt.kind[p] == SPEECH]

        for i, j in enumerate(order):
            assert tokens(prompts[1], spans[1][i]) == tokens(prompts[0], spans[0][j])
            assert len(tokens(prompts[0], spans[0][j])) > 0


def _cfg(**kw) -> LensRunConfig:
    return LensRunConfig(
        checkpoint="tiny", data="mem", family="spiritlm", k=5, ks=(1, 5), n_boot=20, **kw
    )


def test_lens_run_lenses_the_scrambled_utterances(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    utts = random_utterances(4)
    out = tmp_path / "scrambled"
    run_dataset(model, utts, out, _cfg(scramble_words=7), progress=False)
    lines = (out / PARTIAL).read_text().splitlines()
    assert json.loads(lines[0])["header"]["scramble_words"] == 7
    records = [json.loads(ln) for ln in lines[1:]]
    for u, rec in zip(utts, records, strict=True):
        order = scramble_order(u.id, len(u.words), 7)
        assert rec["words"] == [u.words[j].text for j in order]
        assert rec["next_words"] == [*rec["words"][1:], ""]
    info = json.loads((out / "metrics.json").read_text())
    assert info["provenance"]["settings"]["scramble_words"] == 7
    assert info["config"]["scramble_words"] == 7
    assert "word order scrambled (--scramble-words 7)" in (out / "report.html").read_text()
    # the scrambled run and a plain one never share a partial file
    with pytest.raises(RunError, match="partial.jsonl"):
        run_dataset(model, utts, out, _cfg(), progress=False)
    plain = tmp_path / "plain"
    run_dataset(model, utts, plain, _cfg(), progress=False)
    assert (
        "scramble_words" not in json.loads((plain / PARTIAL).read_text().splitlines()[0])["header"]
    )
    assert (
        json.loads((plain / "metrics.json").read_text())["provenance"]["settings"]["scramble_words"]
        is None
    )
    # the torchrun path (one in-process rank) scrambles alike
    dist = tmp_path / "dist"
    run_distributed(model, utts, dist, _cfg(scramble_words=7), progress=False)
    again = [json.loads(ln) for ln in (dist / PARTIAL).read_text().splitlines()[1:]]
    assert [r["words"] for r in again] == [r["words"] for r in records]


def test_cli_scramble_words(tmp_path, tiny_checkpoint):
    from speech_lens.cli.main import main

    path, _ = tiny_checkpoint("speechgpt")
    data = tmp_path / "data.jsonl"
    write_manifest(data, random_utterances(2, rate=50.0))
    out = tmp_path / "out"
    argv = ["lens", str(path), str(data), "--out", str(out), "--no-progress", "--n-boot", "10"]
    assert main([*argv, "--k", "3", "--scramble-words", "2"]) == 0
    info = json.loads((out / "metrics.json").read_text())
    assert info["provenance"]["settings"]["scramble_words"] == 2
    first = json.loads((out / PARTIAL).read_text().splitlines()[1])
    order = scramble_order("u0", 3, 2)
    assert first["words"] == [["the", "cat", "sat"][j] for j in order]
