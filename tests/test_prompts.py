"""Prompt encoders: each family's exact format (hand-written ids and strings), parity with the
upstream recipes (slamkit interleaving, SpiritLM expressive merging), position-table invariants."""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speech_lens.data.encoded import BOS, MARKER, PROSODY, SPEECH, TEXT, PromptError
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.utterance import DataError, UnitStream, Utterance, Word
from speech_lens.data.word_targets import sample_speech_words, word_targets

FAMS = ("spiritlm", "spiritlm-expressive", "speechgpt", "sims-qwen", "sims-llama")
HYP = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

FRAMES = (3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 9, 2, 2, 4, 4, 4)


def the_cat_sat(rate: float = 25.0, **kw) -> Utterance:
    """16 frames -> dedup units 3,5,7,9,2,4 ending at frames 2,5,7,11,13,16.

    At 25 Hz the unit end times are 0.08,0.2,0.28,0.44,0.52,0.64 s: "the" (0-0.2] gets units
    0,1; "cat" (0.24-0.44] units 2,3; "sat" (0.44-0.6] unit 4; unit 5 is trailing silence.
    """
    s = 25.0 / rate
    words = (
        Word("the", 0.0, 0.2 * s),
        Word("cat", 0.24 * s, 0.44 * s),
        Word("sat", 0.44 * s, 0.6 * s),
    )
    return Utterance("u1", words, FRAMES, None, rate, **kw)


def check(model, prompt, expected):
    """``expected``: (token string, id) pairs; id None for text pieces (looked up in the vocab)."""
    pieces = [p for p, _ in expected]
    vocab = model.tokenizer.get_vocab()
    ids = [i if i is not None else vocab[p] for p, i in expected]
    assert list(prompt.token_strings) == pieces
    assert prompt.tokens.tolist() == ids


# --------------------------------------------------------------------------------------------
# hand-written examples, one per family and mode
# --------------------------------------------------------------------------------------------


def test_spiritlm_formats(tiny_model):
    m = tiny_model("spiritlm")
    u = the_cat_sat()
    p = encode_prompt(m, u, mode="speech")
    assert p.text == "[Speech][Hu3][Hu5][Hu7][Hu9][Hu2][Hu4]"
    check(m, p, [("<s>", 1), ("[Speech]", 32001), ("[Hu3]", 32005), ("[Hu5]", 32007),
                 ("[Hu7]", 32009), ("[Hu9]", 32011), ("[Hu2]", 32004), ("[Hu4]", 32006)])  # fmt: skip
    assert p.kind == (BOS, MARKER) + (SPEECH,) * 6
    assert p.word_index.tolist() == [-1, -1, 0, 0, 1, 1, 2, -1]
    assert p.unit_index.tolist() == [-1, -1, 0, 1, 2, 3, 4, 5]
    assert [(s.start, s.end) for s in p.spans] == [(2, 4), (4, 6), (6, 7)]

    p = encode_prompt(m, u, mode="text")
    # SentencePiece writes ▁ after the added token itself: no space after [Text], no lone ▁
    assert p.text == "[Text]the cat sat"
    check(m, p, [("<s>", 1), ("[Text]", 32000), ("▁the", None), ("▁cat", None), ("▁sat", None)])
    assert [(s.modality, s.start, s.end) for s in p.spans] == [
        (TEXT, 2, 3),
        (TEXT, 3, 4),
        (TEXT, 4, 5),
    ]

    p = encode_prompt(m, u, mode="interleaved", speech_words={1})
    assert p.text == "[Text]the[Speech][Hu7][Hu9][Text]sat"
    check(m, p, [("<s>", 1), ("[Text]", 32000), ("▁the", None), ("[Speech]", 32001),
                 ("[Hu7]", 32009), ("[Hu9]", 32011), ("[Text]", 32000), ("▁sat", None)])  # fmt: skip
    assert p.kind == (BOS, MARKER, TEXT, MARKER, SPEECH, SPEECH, MARKER, TEXT)
    assert p.word_index.tolist() == [-1, -1, 0, -1, 1, 1, -1, 2]
    assert p.unit_index.tolist() == [-1, -1, -1, -1, 2, 3, -1, -1]
    assert [(s.text, s.modality, s.start, s.end) for s in p.spans] == [
        ("the", TEXT, 2, 3),
        ("cat", SPEECH, 4, 6),
        ("sat", TEXT, 7, 8),
    ]
    p = encode_prompt(m, u, mode="interleaved", speech_words={0, 2})
    assert p.text == "[Speech][Hu3][Hu5][Text]cat[Speech][Hu2]"  # trailing silence dropped


def test_spiritlm_expressive_merges_pitch_and_style_by_time(tiny_model):
    m = tiny_model("spiritlm-expressive")
    # pitch 12.5 Hz: Pi1 at 0, Pi2 at 0.08 s, Pi3 at 0.4 s (dedup); style 1 Hz: St7 at 0.
    # units at SpiritLM's 24.99 Hz: Hu3 0, Hu5 2/24.99=0.08003, Hu7 0.2, Hu9 0.28, Hu2 0.44, Hu4 0.52
    u = the_cat_sat(pitch=UnitStream((1, 2, 2, 2, 2, 3, 3, 3), 12.5), style=UnitStream((7,), 1.0))
    p = encode_prompt(m, u, mode="speech")
    # ties at t=0 in SpiritLM's insertion order style -> pitch -> hubert; Pi2 (0.08) before Hu5
    assert p.text == "[Speech][St7][Pi1][Hu3][Pi2][Hu5][Hu7][Hu9][Pi3][Hu2][Hu4]"
    check(m, p, [("<s>", 1), ("[Speech]", 32001), ("[St7]", 32574), ("[Pi1]", 32504),
                 ("[Hu3]", 32005), ("[Pi2]", 32505), ("[Hu5]", 32007), ("[Hu7]", 32009),
                 ("[Hu9]", 32011), ("[Pi3]", 32506), ("[Hu2]", 32004), ("[Hu4]", 32006)])  # fmt: skip
    assert p.kind == (BOS, MARKER, PROSODY, PROSODY, SPEECH, PROSODY) + (SPEECH,) * 3 + (
        PROSODY, SPEECH, SPEECH)  # fmt: skip
    # Pi2 sits between two units of "the": it is part of the word; the others are at boundaries
    assert p.word_index.tolist() == [-1, -1, -1, -1, 0, 0, 0, 1, 1, -1, 2, -1]
    assert p.unit_index.tolist() == [-1, -1, -1, -1, 0, -1, 1, 2, 3, -1, 4, 5]
    assert [(s.start, s.end) for s in p.spans] == [(4, 7), (7, 9), (10, 11)]

    # a speech span is tokenized as SpiritLM would tokenize its audio: cut 0.2-0.44 s, pitch
    # frames 2..5 -> Pi2 at 0, Pi3 at 0.24; style frame 0 -> St7; Hu7 at 0, Hu9 at 0.08
    p = encode_prompt(m, u, mode="interleaved", speech_words={1})
    assert p.text == "[Text]the[Speech][St7][Pi2][Hu7][Hu9][Pi3][Text]sat"
    check(m, p, [("<s>", 1), ("[Text]", 32000), ("▁the", None), ("[Speech]", 32001),
                 ("[St7]", 32574), ("[Pi2]", 32505), ("[Hu7]", 32009), ("[Hu9]", 32011),
                 ("[Pi3]", 32506), ("[Text]", 32000), ("▁sat", None)])  # fmt: skip
    assert p.spans[1].start == 6 and p.spans[1].end == 8
    # the base family has no prosody tokens: the streams are ignored there
    base = encode_prompt(tiny_model("spiritlm"), u, mode="speech")
    assert base.text == "[Speech][Hu3][Hu5][Hu7][Hu9][Hu2][Hu4]"


def test_speechgpt_formats(tiny_model):
    m = tiny_model("speechgpt")
    u = the_cat_sat(rate=50.0)
    p = encode_prompt(m, u, mode="speech")
    assert p.text == "<sosp><3><5><7><9><2><4><eosp>"
    check(m, p, [("<s>", 1), ("<sosp>", 33000), ("<3>", 32003), ("<5>", 32005), ("<7>", 32007),
                 ("<9>", 32009), ("<2>", 32002), ("<4>", 32004), ("<eosp>", 33001)])  # fmt: skip
    p = encode_prompt(m, u, mode="text")
    assert p.text == "the cat sat"
    check(m, p, [("<s>", 1), ("▁the", None), ("▁cat", None), ("▁sat", None)])
    p = encode_prompt(m, u, mode="interleaved", speech_words={1})
    assert p.text == "the<sosp><7><9><eosp>sat"
    check(m, p, [("<s>", 1), ("▁the", None), ("<sosp>", 33000), ("<7>", 32007), ("<9>", 32009),
                 ("<eosp>", 33001), ("▁sat", None)])  # fmt: skip
    assert p.kind == (BOS, TEXT, MARKER, SPEECH, SPEECH, MARKER, TEXT)
    assert [(s.start, s.end) for s in p.spans] == [(1, 2), (3, 5), (6, 7)]


@pytest.mark.parametrize(
    "family, bos, first_unit, speech, text",
    [
        ("sims-qwen", [], 151665, 152165, 152166),  # Qwen adds no BOS
        ("sims-llama", [("<|begin_of_text|>", 128000)], 128256, 128756, 128757),
    ],
)
def test_sims_formats(tiny_model, family, bos, first_unit, speech, text):
    m = tiny_model(family)
    u = the_cat_sat()
    p = encode_prompt(m, u, mode="speech")
    # bare units, no <speech> marker, for speech-only scoring (slamkit mode='test')
    assert p.text == "<Un3><Un5><Un7><Un9><Un2><Un4>"
    check(m, p, [*bos] + [(f"<Un{k}>", first_unit + k) for k in (3, 5, 7, 9, 2, 4)])
    p = encode_prompt(m, u, mode="text")
    # byte-level BPE needs the leading space (slamkit joins words that carry it);
    # the tiny tokenizer spells " the" as Ġ + the
    assert p.text == "<text> the cat sat"
    check(m, p, [*bos, ("<text>", text), ("Ġ", None), ("the", None), ("Ġc", None), ("at", None),
                 ("Ġs", None), ("at", None)])  # fmt: skip
    p = encode_prompt(m, u, mode="interleaved", speech_words={1})
    assert p.text == "<text> the<speech><Un7><Un9><text> sat"
    check(m, p, [*bos, ("<text>", text), ("Ġ", None), ("the", None), ("<speech>", speech),
                 ("<Un7>", first_unit + 7), ("<Un9>", first_unit + 9), ("<text>", text),
                 ("Ġs", None), ("at", None)])  # fmt: skip
    n = len(bos)
    assert [(s.start - n, s.end - n) for s in p.spans] == [(1, 3), (4, 6), (7, 9)]
    assert p.word_index.tolist()[n:] == [-1, 0, 0, -1, 1, 1, -1, 2, 2]


def test_word_targets(tiny_model):
    sp = word_targets(tiny_model("spiritlm"), ["cat", " the"])
    v = tiny_model("spiritlm").tokenizer.get_vocab()
    assert sp[0].word == "cat" and sp[0].spaced == sp[0].bare == (v["▁cat"],)
    assert sp[1].word == "the" and sp[1].spaced == (v["▁the"],)
    q = tiny_model("sims-qwen")
    v = q.tokenizer.get_vocab()
    [t] = word_targets(q, the_cat_sat().words[1:2])
    assert t.spaced == (v["Ġc"], v["at"]) and t.bare == (v["c"], v["at"])
    assert [x.word for x in word_targets(q, the_cat_sat())] == ["the", "cat", "sat"]


def test_midpoint_rule_and_zero_unit_word(tiny_model):
    m = tiny_model("spiritlm")
    words = (Word("the", 0.0, 0.2), Word("a", 0.2, 0.2), Word("cat", 0.24, 0.44))
    u = Utterance("z", words, FRAMES, None, 25.0)
    p = encode_prompt(m, u, mode="speech", unit_rule="midpoint")
    # midpoints 0.04,0.14,0.24,0.36,0.48,0.58 -> the,the,cat,cat,-,-; "a" has no unit: empty span
    assert p.word_index.tolist()[2:] == [0, 0, 2, 2, -1, -1]
    assert (p.spans[1].start, p.spans[1].end) == (4, 4) and p.unit_rule == "midpoint"
    p = encode_prompt(m, u, mode="interleaved", speech_words={1})
    assert p.text == "[Text]the[Speech][Text]cat" and p.spans[1].start == p.spans[1].end == 4


def test_bad_input_is_refused(tiny_model):
    m = tiny_model("spiritlm")
    u = Utterance("bad", the_cat_sat().words, (3, 501) * 8, None, 25.0)
    with pytest.raises(DataError, match=r"utterance 'bad': field units\[1\]: unit 501 is outside"):
        encode_prompt(m, u)
    with pytest.raises(PromptError, match=r"utterance 'u1': field speech_words.*\[7\]"):
        encode_prompt(m, the_cat_sat(), mode="interleaved", speech_words={0, 7})
    with pytest.raises(PromptError, match="mode must be"):
        encode_prompt(m, the_cat_sat(), mode="audio")  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="frame_rate 25.0 Hz differs"):
        encode_prompt(tiny_model("speechgpt"), the_cat_sat())


def test_samplers():
    rng = np.random.default_rng(0)
    for n in (1, 5, 40):
        s = sample_speech_words(n, "poisson", rng)
        assert len(s) >= math.ceil(0.3 * n) and s <= set(range(n))
    a = sample_speech_words(30, "spiritlm", np.random.default_rng(3))
    assert a == sample_speech_words(30, "spiritlm", np.random.default_rng(3))
    assert 0 < len(a) < 30
    assert sample_speech_words(6, "alternate", rng) == {0, 2, 4}
    assert sample_speech_words(6, "alternate", rng, span_mean=2) == {0, 1, 4, 5}
    with pytest.raises(ValueError, match="span_sampler"):
        sample_speech_words(3, "nope", rng)  # type: ignore[arg-type]


def test_seeded_interleaving_is_reproducible(tiny_model):
    m = tiny_model("sims-qwen")
    u = Utterance(
        "long",
        tuple(Word(w, 0.1 * i + 0.01, 0.1 * i + 0.09) for i, w in enumerate(["the", "cat"] * 10)),
        tuple(range(50)),
        None,
        25.0,
    )
    a = encode_prompt(m, u, mode="interleaved", seed=5)
    b = encode_prompt(m, u, mode="interleaved", seed=5)
    assert torch.equal(a.tokens, b.tokens) and SPEECH in a.modalities and TEXT in a.modalities


# --------------------------------------------------------------------------------------------
# parity with the upstream recipes (independent re-implementations)
# --------------------------------------------------------------------------------------------


def slamkit_interleaved(units, durations, aligned, modality):
    """slamkit InterleavingTokeniser._create_interleaved_text, written out from its source."""
    out, cur = "", []
    unit_time = np.cumsum(durations) * 0.04
    for i, (w, s, e) in enumerate(aligned):
        m = modality[i]
        if i == 0:
            out += "<speech>" if m != "text" else "<text>"
        cur.append(w if m == "text" else (s, e))
        if i == len(aligned) - 1 or m != modality[i + 1]:
            if m == "text":
                out += "".join(cur)
                if i != len(aligned) - 1:
                    out += "<speech>"
            else:
                a, b = (
                    bisect.bisect_left(unit_time, cur[0][0]),
                    bisect.bisect_right(unit_time, cur[-1][1]),
                )
                out += "".join(f"<Un{u}>" for u in units[a:b])
                if i != len(aligned) - 1:
                    out += "<text>"
            cur = []
    return out


def spiritlm_units_to_string(units, pitch, style):
    """spiritlm units_to_string (hubert 24.99 dedup, pitch 12.5 dedup, style 1 no dedup)."""

    def pos(toks, rate, dd):
        res, prev = [], None
        for i, t in enumerate(toks):
            if not dd or prev is None or t != prev:
                res.append((t, i / rate))
            prev = t
        return res

    toks = pos([f"[St{i}]" for i in style], 1, False)
    toks += pos([f"[Pi{i}]" for i in pitch], 12.5, True)
    toks += pos([f"[Hu{i}]" for i in units], 24.99, True)
    return "".join(t for t, _ in sorted(toks, key=lambda x: x[1]))


WORD_POOL = ["the", "cat", "sat", "on", "mat", "emma", "paris", "zebra", "qux"]


@st.composite
def aligned_utterances(draw, expressive=False, off_grid=False):
    """Words over a random frame grid; ``off_grid`` puts word times 0.01 s off frame edges
    (slamkit's float bisect is only well defined there)."""
    n_words = draw(st.integers(1, 7))
    frames: list[int] = []
    words = []
    for _ in range(n_words):
        frames += [draw(st.integers(0, 30))] * draw(st.integers(0, 3))  # silence
        start = len(frames)
        n = draw(st.integers(1 if off_grid else 0, 6))
        frames += draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))
        d = 0.01 if off_grid else 0.0
        words.append(Word(draw(st.sampled_from(WORD_POOL)), start / 25 + d, len(frames) / 25 - d))
    frames += [7] * draw(st.integers(1, 3))
    kw = {}
    if expressive:
        n_p = math.ceil(len(frames) / 2)
        kw["pitch"] = UnitStream(
            tuple(draw(st.lists(st.integers(0, 3), min_size=n_p, max_size=n_p))), 12.5
        )
        n_s = math.ceil(len(frames) / 25)
        kw["style"] = UnitStream(
            tuple(draw(st.lists(st.integers(0, 2), min_size=n_s, max_size=n_s))), 1.0
        )
    u = Utterance("h", tuple(words), tuple(frames), None, 25.0, **kw)
    speech = draw(st.sets(st.integers(0, n_words - 1)))
    return u, speech


@HYP
@given(aligned_utterances(off_grid=True))
def test_sims_interleaving_matches_slamkit(tiny_model, case):
    u, speech = case
    d = u.dedup()
    aligned = [(" " + w.text, w.start, w.end) for w in u.words]
    modality = ["audio" if i in speech else "text" for i in range(len(aligned))]
    want = slamkit_interleaved(d.units, d.durations, aligned, modality)
    got = encode_prompt(tiny_model("sims-qwen"), u, mode="interleaved", speech_words=speech)
    assert got.text == want


@HYP
@given(aligned_utterances(expressive=True))
def test_spiritlm_expressive_speech_matches_units_to_string(tiny_model, case):
    u, _ = case
    got = encode_prompt(tiny_model("spiritlm-expressive"), u, mode="speech")
    want = spiritlm_units_to_string(u.frames(), u.pitch.frames(), u.style.frames())
    assert got.text == "[Speech]" + want


# --------------------------------------------------------------------------------------------
# position-table invariants, every family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMS)
@HYP
@given(
    case=aligned_utterances(expressive=True),
    mode=st.sampled_from(["interleaved", "speech", "text"]),
)
def test_position_table_invariants(tiny_model, family, case, mode):
    m = tiny_model(family)
    u, speech = case
    r = m.layout.units.frame_rate  # same frames, at the family's rate
    words = tuple(Word(w.text, w.start * 25 / r, w.end * 25 / r) for w in u.words)
    u = Utterance(u.id, words, u.units, None, r, pitch=u.pitch, style=u.style)
    p = encode_prompt(m, u, mode=mode, speech_words=speech if mode == "interleaved" else None)
    tok = m.tokenizer
    n = len(p)
    wi, ui = p.word_index.tolist(), p.unit_index.tolist()

    # the ids are the tokenizer's own for the prompt string, BOS as the family adds it
    plain = tok(p.text, add_special_tokens=False)["input_ids"]
    n_bos = p.kind.count(BOS)
    assert p.tokens.tolist()[n_bos:] == plain and set(p.kind[:n_bos]) <= {BOS}
    if m.spec.prompt.bos is True:
        assert p.tokens[0] == tok.bos_token_id and n_bos == 1

    # every word exactly once, in one modality; spans are exactly the positions of their word
    expect = {"speech": [SPEECH] * len(u.words), "text": [TEXT] * len(u.words)}.get(
        mode, [SPEECH if i in speech else TEXT for i in range(len(u.words))]
    )
    assert list(p.modalities) == expect
    assert [s.index for s in p.spans] == list(range(len(u.words)))
    unit_words = u.unit_words()
    for s in p.spans:
        assert s.text == u.words[s.index].text and s.modality == expect[s.index]
        assert 0 <= s.start <= s.end <= n
        assert [q for q in range(n) if wi[q] == s.index] == list(s.positions)
        kinds = {p.kind[q] for q in s.positions}
        if s.modality == TEXT:
            assert kinds == {TEXT}
            assert tok.decode(p.tokens[s.start : s.end].tolist()).strip() == s.text
        else:
            assert kinds <= {SPEECH, PROSODY}
            # the word's units are exactly those the mapping assigns to it
            got = [ui[q] for q in s.positions if p.kind[q] == SPEECH]
            assert got == [k for k, w in enumerate(unit_words) if w == s.index]

    # units: each position one unit and at most one word, in time order
    sp = [q for q in range(n) if p.kind[q] == SPEECH]
    units = [ui[q] for q in sp]
    assert units == sorted(set(units))
    assigned = [wi[q] for q in sp if wi[q] >= 0]
    assert assigned == sorted(assigned)
    assert all(ui[q] == -1 for q in range(n) if p.kind[q] != SPEECH)
    assert all(wi[q] == -1 for q in range(n) if p.kind[q] in (BOS, MARKER))
    d = u.dedup()
    assert all(m.layout.unit_of(int(p.tokens[q])) == d.units[ui[q]] for q in sp)
    if mode == "speech":
        assert units == list(range(len(d.units)))
    if mode == "text":
        assert not sp
    # modality markers only where the modality changes
    runs = [k for k, _ in itertools.groupby(expect)]
    opens = [
        t
        for t in p.token_strings
        if t in (m.spec.prompt.text_open, m.spec.prompt.speech_open) and t
    ]
    if mode == "interleaved" and m.spec.prompt.text_open:
        assert len(opens) == len(runs)
