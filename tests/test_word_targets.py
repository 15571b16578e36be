"""Word targets never start with a lone word-boundary piece (``▁`` / ``Ġ``), in the lens and in
patching alike, and the rule is recorded in a run's outputs."""

from __future__ import annotations

import json

import pytest

from speech_lens.data.word_targets import (
    WORD_PIECE_RULE,
    bare_form_is_spaced,
    word_piece_ids,
    word_targets,
)
from speech_lens.lens.records import MATCH_RULES, match_ids
from speech_lens.patching.metrics import word_token_ids
from speech_lens.runs.lens import run_dataset
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.testing.families import random_utterances
from speech_lens.testing.tokenizers import llama2_sentencepiece

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "she said that it was there when we went to the market",
    "a man and a woman were talking about the weather in the park",
    "they played with their friends at the house by the river",
    "in 1987 and 2024 there were 365 days and 56 nights",  # every digit, as single pieces
] * 25
RARE = ["1990", "42", "Zyzzyva", "Xerxes"]  # numbers (split digits) and words the corpus lacks


@pytest.fixture(scope="module")
def llama2_tok(tmp_path_factory):
    """A SentencePiece tokenizer trained with Llama-2's settings, loaded as the families'
    tokenizers are (``tokenizer.model`` + ``tokenizer_config.json``, AutoTokenizer)."""
    from transformers import AutoTokenizer

    d = llama2_sentencepiece(tmp_path_factory.mktemp("sp") / "tok", CORPUS, vocab_size=400)
    return AutoTokenizer.from_pretrained(str(d))


def _raw(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_rare_words_and_numbers_skip_the_lone_sentencepiece_boundary(llama2_tok):
    tok = llama2_tok
    lone = tok.convert_tokens_to_ids("▁")
    for word in RARE:
        for form in (" " + word, word):
            raw = _raw(tok, form)
            # what Llama-2 does: the lone "▁", then the word's own pieces
            assert raw[0] == lone and len(raw) > 1, (form, tok.convert_ids_to_tokens(raw))
            assert word_piece_ids(tok, form) == tuple(raw[1:])
        [t] = word_targets(tok, [word])
        assert t.spaced[0] == _raw(tok, " " + word)[1]
        for rule in MATCH_RULES:  # the most frequent id is a hit for no word under no rule
            assert lone not in match_ids(t, rule), (word, rule)
    first = {w: match_ids(t, "first") for w, t in zip(RARE, word_targets(tok, RARE), strict=True)}
    assert first["1990"] == (tok.convert_tokens_to_ids("1"),)
    assert first["42"] == (tok.convert_tokens_to_ids("4"),)
    # a word with its own "▁word" piece is untouched, and both forms are that piece
    [cat] = word_targets(tok, ["cat"])
    assert (
        cat.spaced == cat.bare == tuple(_raw(tok, " cat")) == (tok.convert_tokens_to_ids("▁cat"),)
    )
    assert bare_form_is_spaced(tok)


def test_byte_level_bpe_numbers_skip_the_lone_g(tiny_model):
    tok = tiny_model("sims-qwen").tokenizer
    raw = _raw(tok, " 1990")
    assert tok.convert_ids_to_tokens(raw) == ["Ġ", "1", "9", "9", "0"]
    [t] = word_targets(tok, ["1990"])
    assert t.spaced == tuple(raw[1:]) and t.bare == tuple(raw[1:])
    [cat] = word_targets(tok, ["cat"])
    assert tok.convert_ids_to_tokens(list(cat.spaced)) == ["Ġc", "at"]  # the tiny merges
    assert tok.convert_ids_to_tokens(list(cat.bare)) == ["c", "at"]
    assert len(match_ids(cat, "first")) == 2
    assert not bare_form_is_spaced(tok)  # two candidates under "first" here, one on Llama-2


@pytest.mark.parametrize("family", ["spiritlm", "speechgpt", "sims-qwen", "sims-llama"])
def test_patching_and_lens_choose_the_same_first_sub_token(tiny_model, family):
    model = tiny_model(family)
    lone = {model.tokenizer.convert_tokens_to_ids(p) for p in ("▁", "Ġ")}
    for word in ["the", "cat", "1990", "zyx"]:
        targets = match_ids(word_targets(model, [word])[0], "first")
        assert word_token_ids(model, word) == targets, word
        assert not lone & set(targets), word


def test_run_records_the_word_piece_rule(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    cfg = LensRunConfig(checkpoint="tiny", data="mem", family="spiritlm", k=5, ks=(1, 5), n_boot=5)
    assert cfg.resume_key()["word_pieces"] == WORD_PIECE_RULE
    run_dataset(model, random_utterances(2), tmp_path, cfg, progress=False)
    prov = json.loads((tmp_path / "metrics.json").read_text())["provenance"]
    assert prov["settings"]["word_pieces"] == WORD_PIECE_RULE == "skip-lone-boundary-piece"
    assert prov["model"]["bare_form_is_spaced"] is True
    header = json.loads((tmp_path / "partial.jsonl").read_text().split("\n")[0])["header"]
    assert header["word_pieces"] == WORD_PIECE_RULE
