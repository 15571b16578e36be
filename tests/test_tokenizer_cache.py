"""The rebuilt-tokenizer cache (SIMS): keyed by the base tokenizer's content, and entries appear
whole (a temporary folder renamed), so interleaved torchrun ranks never read a half-written one."""

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from speech_lens import load_model
from speech_lens.testing.families import build_sims
from speech_lens.testing.tokenizers import small_base_tokenizer


@pytest.fixture
def sims_on_small_base(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECH_LENS_CACHE", str(tmp_path / "cache"))
    tok_dir = small_base_tokenizer(tmp_path / "base-tok", 1000)
    path = build_sims(tmp_path / "sims", tok_dir, base_name="org/tiny-base", sharded=False)
    return path, tok_dir, tmp_path / "cache" / "tokenizers"


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def interrupt_first_save(monkeypatch, tok_dir: Path, scratch: Path, during) -> None:
    """The first tokenizer save writes tokenizer_config.json (a partial entry), runs ``during``
    (another rank, or a crash), then writes the rest; later saves are untouched."""
    cls = type(AutoTokenizer.from_pretrained(str(tok_dir)))
    original = cls.save_pretrained
    calls = []

    def save(self, save_directory, *args, **kwargs):
        calls.append(save_directory)
        if len(calls) > 1:
            return original(self, save_directory, *args, **kwargs)
        original(self, str(scratch), *args, **kwargs)
        shutil.copy(scratch / "tokenizer_config.json", Path(save_directory))
        during()
        return original(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(cls, "save_pretrained", save)


def test_ranks_interleaved_share_one_whole_entry(sims_on_small_base, monkeypatch, tmp_path):
    path, tok_dir, cache = sims_on_small_base
    second = []
    interrupt_first_save(
        monkeypatch,
        tok_dir,
        tmp_path / "scratch",
        lambda: second.append(load_model(path, base_tokenizer=tok_dir)),
    )
    first = load_model(path, base_tokenizer=tok_dir)
    for model in (first, second[0]):
        assert model.layout.units.first_id == 1000
        assert model.tokenizer("<Un7> the", add_special_tokens=False).input_ids[0] == 1007
        assert model.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert len(entries(cache)) == 1 and not entries(cache)[0].startswith(".")


def test_a_writer_that_dies_leaves_no_entry(sims_on_small_base, monkeypatch, tmp_path):
    path, tok_dir, cache = sims_on_small_base

    def crash():
        raise RuntimeError("rank killed mid-write")

    with monkeypatch.context() as m:
        interrupt_first_save(m, tok_dir, tmp_path / "scratch", crash)
        with pytest.raises(RuntimeError, match="mid-write"):
            load_model(path, base_tokenizer=tok_dir)
    assert entries(cache) == []
    model = load_model(path, base_tokenizer=tok_dir)
    assert model.tokenizer.convert_ids_to_tokens([1000, 1501]) == ["<Un0>", "<text>"]


def test_a_base_tokenizer_changed_in_place_is_not_served_stale(sims_on_small_base):
    path, tok_dir, cache = sims_on_small_base
    before = load_model(path, base_tokenizer=tok_dir)
    assert before.tokenizer.convert_ids_to_tokens([998]) != ["<|begin_of_text|>"]
    shutil.rmtree(tok_dir)
    small_base_tokenizer(tok_dir, 1000, bos=True)  # same path, same length, other content
    after = load_model(path, base_tokenizer=tok_dir)
    assert after.tokenizer.convert_ids_to_tokens([998]) == ["<|begin_of_text|>"]
    assert after.tokenizer.bos_token == "<|begin_of_text|>"
    assert len(entries(cache)) == 2
