"""Speech tokenizers: the Protocol and registry, the SpiritLM adapter against a fake ``spiritlm``
package with the real call signatures and output format, the mHuBERT + k-means adapter on a tiny
random transformers HubertModel checked against scikit-learn, the organism tokenizer against
the organisms' own manifest code, and ``speech-lens tokenize`` end to end."""

from __future__ import annotations

import io
import itertools
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speech_lens.audio.columns import Columns
from speech_lens.audio.tokenizers.hubert import HubertKMeansTokenizer, load_centroids
from speech_lens.audio.tokenizers.lookup import get_speech_tokenizer
from speech_lens.audio.tokenizers.organism import OrganismSpeechTokenizer
from speech_lens.audio.tokenizers.registry import (
    FrameUnits,
    MissingTokenizerFiles,
    SpeechTokenizer,
    SpeechTokenizerError,
    register_speech_tokenizer,
    unregister_speech_tokenizer,
)
from speech_lens.audio.tokenizers.spiritlm import SpiritLMSpeechTokenizer
from speech_lens.cli.main import main
from speech_lens.data.manifest import read_manifest
from speech_lens.data.utterance import Word

SPEECH = Path(__file__).parent / "data" / "speech"


# --------------------------------------------------------------------------------------------
# a simple deterministic tokenizer (frame energy x zero crossings), used as the "model's" one
# --------------------------------------------------------------------------------------------


def energy_units(audio: np.ndarray, hop: int = 640) -> np.ndarray:
    n = len(audio) // hop
    fr = audio[: n * hop].reshape(n, hop).astype(np.float64)
    rms = np.sqrt((fr**2).mean(1))
    zc = (np.diff(np.signbit(fr), axis=1) != 0).mean(1)
    return (
        np.minimum(9, (rms * 60).astype(int)) * 10 + np.minimum(9, (zc * 20).astype(int))
    ).astype(np.int64)


class EnergyTokenizer:
    family = "spiritlm"
    expected_sample_rate = 16000

    def __call__(self, audio: np.ndarray, sample_rate: int) -> FrameUnits:
        assert sample_rate == 16000 and audio.dtype == np.float32 and audio.ndim == 1
        return FrameUnits(energy_units(audio), 25.0)


def make_energy_tokenizer(**kw) -> EnergyTokenizer:
    return EnergyTokenizer()


@pytest.fixture
def energy_registered():
    register_speech_tokenizer("energy-test", make_energy_tokenizer, overwrite=True)
    yield "energy-test"
    unregister_speech_tokenizer("energy-test")


def dedup_runs(x) -> tuple[list[int], list[int]]:
    g = [(k, len(list(v))) for k, v in itertools.groupby(int(u) for u in x)]
    return [k for k, _ in g], [n for _, n in g]


# --------------------------------------------------------------------------------------------
# Protocol, FrameUnits, registry
# --------------------------------------------------------------------------------------------


def test_frame_units_validation():
    fu = FrameUnits(np.array([3.0, 3.0, 4.0]), 25)
    assert fu.units.dtype == np.int64 and fu.n_frames == 3 and fu.duration == pytest.approx(0.12)
    with pytest.raises(SpeechTokenizerError, match="1-D"):
        FrameUnits(np.zeros((2, 3), int), 25.0)
    with pytest.raises(SpeechTokenizerError, match="negative unit -1"):
        FrameUnits(np.array([1, -1]), 25.0)
    with pytest.raises(SpeechTokenizerError, match="integers"):
        FrameUnits(np.array([1.5]), 25.0)
    with pytest.raises(SpeechTokenizerError, match="frame_rate"):
        FrameUnits(np.array([1]), 0)
    with pytest.raises(SpeechTokenizerError, match="do not expand"):
        FrameUnits(np.array([1, 1, 2]), 25.0, runs=((1, 2), (1, 2)))
    assert isinstance(EnergyTokenizer(), SpeechTokenizer)


def test_registry_by_name_factory_and_checkpoint(energy_registered, tiny_checkpoint, monkeypatch):
    assert isinstance(get_speech_tokenizer(energy_registered), EnergyTokenizer)
    assert isinstance(
        get_speech_tokenizer("test_speech_tokenizers:make_energy_tokenizer"), EnergyTokenizer
    )
    with pytest.raises(ValueError, match="already registered"):
        register_speech_tokenizer(energy_registered, lambda: EnergyTokenizer())
    with pytest.raises(ValueError, match=r"unknown speech tokenizer 'nope'.*energy-test"):
        get_speech_tokenizer("nope")
    register_speech_tokenizer("not-a-tokenizer", lambda: object(), overwrite=True)
    with pytest.raises(TypeError, match="lacks family"):
        get_speech_tokenizer("not-a-tokenizer")
    unregister_speech_tokenizer("not-a-tokenizer")
    # a SpiritLM checkpoint resolves to the SpiritLM tokenizer; without the package the error
    # names the package and the checkpoint files it would need
    path, _ = tiny_checkpoint("spiritlm")
    monkeypatch.setitem(sys.modules, "spiritlm", None)
    monkeypatch.setitem(sys.modules, "spiritlm.speech_tokenizer", None)
    with pytest.raises(
        ImportError, match=r"'spiritlm' package.*mhubert_base_25hz\.pt.*L11_quantizer_500\.pt"
    ):
        get_speech_tokenizer(path)
    sims, _ = tiny_checkpoint("sims-qwen")
    with pytest.raises(MissingTokenizerFiles, match=r"slprl/mhubert-base-25hz.*km500"):
        get_speech_tokenizer(sims)


# --------------------------------------------------------------------------------------------
# SpiritLM adapter against a fake spiritlm package
# --------------------------------------------------------------------------------------------


def _fake_spiritlm(root: Path, calls: dict) -> dict[str, types.ModuleType]:
    """Modules with spiritlm's names and signatures: ``HubertTokenizer(hubert_ckpt, hubert_layer,
    quantizer_ckpt, is_linear_quantizer)`` returning one unit per 640 samples,
    ``F0Tokenizer(...)`` at 12.5 Hz, ``Wav2Vec2StyleEncoder.from_pretrained(...)`` at 1 Hz, and
    ``SpiritLMTokenizer.encode_units(tensor)`` returning space-separated strings."""
    import torch

    def mod(name: str) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__path__ = []  # a package, so submodules import
        return m

    class HubertTokenizer:
        def __init__(self, hubert_ckpt, hubert_layer, quantizer_ckpt, is_linear_quantizer=True):
            calls["hubert"] = (
                Path(hubert_ckpt),
                hubert_layer,
                Path(quantizer_ckpt),
                is_linear_quantizer,
            )

        def to(self, device):
            return self

        def __call__(self, x):
            return torch.from_numpy(energy_units(x.numpy()))

    class F0Tokenizer:
        def __init__(
            self,
            f0_extractor_method,
            quantizer_path,
            hop_length,
            sampling_rate,
            interpolate,
            device,
        ):
            calls["f0"] = (f0_extractor_method, Path(quantizer_path), hop_length, sampling_rate)

        def __call__(self, x):
            return torch.from_numpy(energy_units(x.numpy(), hop=1280) % 64)

    class Wav2Vec2StyleEncoder:
        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path):
            calls["style"] = Path(pretrained_model_name_or_path)
            return cls()

        def to(self, device):
            return self

        def __call__(self, x):
            return torch.tensor([7] * max(1, len(x) // 16000))

    class SpiritLMTokenizer:
        def __init__(
            self,
            hubert_model,
            pitch_model=None,
            style_model=None,
            hifigan_model=None,
            hubert_rate=24.99,
            pitch_rate=12.5,
            style_rate=1,
        ):
            self.hubert_model, self.pitch_model, self.style_model = (
                hubert_model,
                pitch_model,
                style_model,
            )
            self.hubert_rate, self.pitch_rate, self.style_rate = hubert_rate, pitch_rate, style_rate

        def encode_units(self, audio, channel_id=None):
            units = {"hubert": " ".join(str(int(i)) for i in self.hubert_model(audio))}
            if self.pitch_model is not None:
                units["pitch"] = " ".join(str(int(i)) for i in self.pitch_model(audio))
            if self.style_model is not None:
                units["style"] = " ".join(str(int(i)) for i in self.style_model(audio))
            return units

    mods = {
        n: mod(n)
        for n in (
            "spiritlm",
            "spiritlm.speech_tokenizer",
            "spiritlm.speech_tokenizer.hubert",
            "spiritlm.speech_tokenizer.hubert.hubert_tokenizer",
            "spiritlm.speech_tokenizer.f0",
            "spiritlm.speech_tokenizer.f0.f0_tokenizer",
            "spiritlm.speech_tokenizer.style_encoder",
            "spiritlm.speech_tokenizer.style_encoder.w2v2_encoder",
        )
    }
    mods["spiritlm.speech_tokenizer"].SpiritLMTokenizer = SpiritLMTokenizer
    mods["spiritlm.speech_tokenizer.hubert"].CHECKPOINT_DIR = root
    mods["spiritlm.speech_tokenizer.hubert.hubert_tokenizer"].HubertTokenizer = HubertTokenizer
    mods["spiritlm.speech_tokenizer.f0.f0_tokenizer"].F0Tokenizer = F0Tokenizer
    mods[
        "spiritlm.speech_tokenizer.style_encoder.w2v2_encoder"
    ].Wav2Vec2StyleEncoder = Wav2Vec2StyleEncoder
    return mods


def _touch(root: Path, names: list[str]) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"x")


def test_spiritlm_adapter_with_fake_package(tmp_path, monkeypatch):
    from speech_lens.audio.decode import load_audio

    calls: dict = {}
    for name, m in _fake_spiritlm(tmp_path / "ckpt", calls).items():
        monkeypatch.setitem(sys.modules, name, m)
    # files missing: the error lists exactly the missing ones
    _touch(tmp_path / "ckpt", ["hubert_25hz/mhubert_base_25hz.pt"])
    with pytest.raises(
        MissingTokenizerFiles,
        match=r"missing under .*ckpt: hubert_25hz/L11_quantizer_500\.pt\. SpiritLM",
    ):
        SpiritLMSpeechTokenizer()
    _touch(tmp_path / "ckpt", ["hubert_25hz/L11_quantizer_500.pt"])
    with pytest.raises(
        MissingTokenizerFiles,
        match=r"vqvae_f0_quantizer/config\.yaml, vqvae_f0_quantizer/model\.pt, style_encoder_w2v2/config\.json",
    ):
        SpiritLMSpeechTokenizer(expressive=True)

    audio, sr = load_audio(SPEECH / "the_cat_sat.flac", sample_rate=16000)
    tok = get_speech_tokenizer("spiritlm")
    assert calls["hubert"] == (
        tmp_path / "ckpt/hubert_25hz/mhubert_base_25hz.pt",
        11,
        tmp_path / "ckpt/hubert_25hz/L11_quantizer_500.pt",
        True,
    )
    fu = tok(audio, sr)
    np.testing.assert_array_equal(fu.units, energy_units(audio))
    assert fu.frame_rate == 24.99 and fu.streams == {} and tok.family == "spiritlm"

    # expressive, with the files under an explicit directory
    other = tmp_path / "elsewhere"
    _touch(
        other,
        [
            f
            for fs in (
                ["hubert_25hz/mhubert_base_25hz.pt", "hubert_25hz/L11_quantizer_500.pt"],
                ["vqvae_f0_quantizer/config.yaml", "vqvae_f0_quantizer/model.pt"],
                ["style_encoder_w2v2/config.json", "style_encoder_w2v2/pytorch_model.bin"],
            )
            for f in fs
        ],
    )
    ex = get_speech_tokenizer("spiritlm-expressive", checkpoint_dir=other)
    assert calls["f0"] == ("fcpe", other / "vqvae_f0_quantizer/model.pt", 80, 16000)
    assert calls["style"] == other / "style_encoder_w2v2"
    fx = ex(audio, sr)
    assert ex.family == "spiritlm-expressive"
    assert fx.streams["pitch"].frame_rate == 12.5 and fx.streams["style"].frame_rate == 1.0
    assert fx.streams["pitch"].units == tuple(int(u) for u in energy_units(audio, 1280) % 64)
    assert fx.streams["style"].units == (7,)

    with pytest.raises(SpeechTokenizerError, match="expects 16000 Hz audio, got 22050"):
        tok(audio, 22050)
    with pytest.raises(SpeechTokenizerError, match="1-D array"):
        tok(np.stack([audio, audio]), 16000)
    with pytest.raises(SpeechTokenizerError, match="float audio"):
        tok((audio * 32767).astype(np.int16), 16000)
    with pytest.raises(SpeechTokenizerError, match="no units for 0.020 s"):
        tok(audio[:320], 16000)


# --------------------------------------------------------------------------------------------
# mHuBERT + k-means on a tiny random transformers HubertModel
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hubert(tmp_path_factory):
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hubert")
    out = {}
    for name, strides in (("h25", (10, 8, 8)), ("h50", (10, 4, 8))):
        cfg = HubertConfig(
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(8, 8, 8),
            conv_stride=strides,
            conv_kernel=strides,
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2,
        )
        HubertModel(cfg).eval().save_pretrained(root / name)
        out[name] = root / name
    return out


def test_hubert_kmeans_matches_sklearn(tiny_hubert, tmp_path):
    import joblib
    import torch
    import torch.nn.functional as F
    from sklearn.cluster import KMeans
    from transformers import HubertModel

    audio = (np.random.default_rng(1).standard_normal(16000) * 0.1).astype(np.float32)
    model = HubertModel.from_pretrained(str(tiny_hubert["h25"])).eval()
    with torch.no_grad():  # the features as slamkit computes them: pad 40 samples each side
        feats = (
            model(F.pad(torch.from_numpy(audio)[None], (40, 40)), output_hidden_states=True)
            .hidden_states[2][0]
            .numpy()
        )
    km = KMeans(n_clusters=6, n_init=2, random_state=0).fit(feats)
    joblib.dump(km, tmp_path / "km.bin")
    np.save(tmp_path / "km.npy", km.cluster_centers_)
    tok = HubertKMeansTokenizer(
        tiny_hubert["h25"], tmp_path / "km.bin", layer=2, pad=40, allow_pickle=True
    )
    fu = tok(audio, 16000)
    assert fu.frame_rate == 25.0 and abs(fu.n_frames - 25) <= 1
    np.testing.assert_array_equal(fu.units, km.predict(feats))
    tok2 = HubertKMeansTokenizer(tiny_hubert["h25"], tmp_path / "km.npy", layer=2, pad=40)
    np.testing.assert_array_equal(tok2(audio, 16000).units, fu.units)
    np.testing.assert_allclose(
        load_centroids(tmp_path / "km.bin", allow_pickle=True), km.cluster_centers_, rtol=1e-6
    )

    with pytest.raises(SpeechTokenizerError, match=r"km\.bin is a pickle.*allow_pickle=True"):
        HubertKMeansTokenizer(tiny_hubert["h25"], tmp_path / "km.bin", layer=2)
    with pytest.raises(
        SpeechTokenizerError, match=r"conv strides give 50 Hz frames, the sims preset needs 25 Hz"
    ):
        HubertKMeansTokenizer(tiny_hubert["h50"], tmp_path / "km.npy", preset="sims")
    with pytest.raises(SpeechTokenizerError, match=r"6 centroids, expected 500"):
        HubertKMeansTokenizer(tiny_hubert["h25"], tmp_path / "km.npy", preset="sims", layer=2)
    np.save(tmp_path / "bad.npy", np.zeros((6, 7), np.float32))
    with pytest.raises(
        SpeechTokenizerError, match=r"7-dim centroids, the model's features are 16-dim"
    ):
        HubertKMeansTokenizer(tiny_hubert["h25"], tmp_path / "bad.npy", layer=2)
    with pytest.raises(
        MissingTokenizerFiles, match=r"model_dir=.*slprl/mhubert-base-25hz.*kmeans="
    ):
        get_speech_tokenizer("sims")
    np.save(tmp_path / "km1000.npy", np.zeros((1000, 16), np.float32))
    sg = get_speech_tokenizer(
        "speechgpt", model_dir=tiny_hubert["h50"], kmeans=tmp_path / "km1000.npy", layer=2
    )
    assert (
        sg.family == "speechgpt" and sg.frame_rate == 50.0 and sg(audio, 16000).n_frames in (49, 50)
    )


# --------------------------------------------------------------------------------------------
# organism tokenizer: identical units to the organisms' own manifest code
# --------------------------------------------------------------------------------------------


def _organism_setup(tmp_path: Path):
    """A unit tokenizer fitted the organisms' way (speech_lens.organisms.units) on the two test
    sentences, their manifest records written by the organisms' own code, the audio on disk."""
    from speech_lens.organisms import corpus, units

    cfg = units.FeatureConfig()
    sents = {}
    pooled = []
    for name in ("the_cat_sat", "tom_lives_in"):
        a, _ = sf.read(SPEECH / f"{name}.flac", dtype="float32")
        spans = [tuple(w) for w in json.loads((SPEECH / f"{name}.json").read_text())["words"]]
        sents[name] = (a, spans)
        pooled.append(units.pooled_features(units.mfcc(a, cfg), spans, cfg)[0])
    tok = units.fit(np.concatenate(pooled), 8, cfg)
    # the shipped layout: organisms/unit_tokenizer.json shared by organisms/<name>/ checkpoints
    ck = tmp_path / "organisms" / "tiny-organism"
    ck.mkdir(parents=True)
    (ck / "organism.json").write_text("{}")
    tok.save(ck.parent / "unit_tokenizer.json")
    tok = units.UnitTokenizer.load(ck.parent / "unit_tokenizer.json")  # what the file holds
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    recs = []
    for name, (a, spans) in sents.items():
        u, d, wq = tok.encode(a, spans)
        recs.append(corpus.manifest_record(name, "test", wq, cfg.rate, u, d))
        sf.write(audio_dir / f"{name}.wav", a, 16000, subtype="FLOAT")
        (audio_dir / f"{name}.json").write_text(json.dumps({"words": [list(s) for s in spans]}))
    return ck, audio_dir, recs


def test_organism_tokenizer_reproduces_manifest_units(tmp_path):
    ck, audio_dir, recs = _organism_setup(tmp_path)
    tok = get_speech_tokenizer(ck)
    assert isinstance(tok, OrganismSpeechTokenizer) and tok.needs_words
    for rec in recs:
        a, sr = sf.read(audio_dir / f"{rec['id']}.wav", dtype="float32")
        words = tuple(
            Word(*w) for w in json.loads((audio_dir / f"{rec['id']}.json").read_text())["words"]
        )
        fu = tok(a, sr, words=words)
        assert fu.runs == (tuple(rec["units"]), tuple(rec["durations"]))
        assert [w.text for w in fu.words] == [w[0] for w in rec["words"]]
        np.testing.assert_allclose(
            [w.end for w in fu.words], [w[2] for w in rec["words"]], atol=1e-4
        )
    with pytest.raises(SpeechTokenizerError, match="word-synchronous"):
        tok(a, sr)
    (ck / "organism.json").unlink()  # not an organism: the shared file is not picked up
    with pytest.raises(MissingTokenizerFiles, match="has no unit_tokenizer.json"):
        OrganismSpeechTokenizer(ck)


def test_tokenize_cli_organism_units_identical(tmp_path):
    """audio of an organism corpus -> speech-lens tokenize -> the same units as its manifest."""
    from speech_lens.organisms.checkpoint import OrganismVocab, spec_toml

    ck, audio_dir, recs = _organism_setup(tmp_path)
    # the organism's spec as its exporter writes it (tokenize reads the spec, not the weights)
    words = sorted({w[0] for r in recs for w in r["words"]})
    (ck / "speech_lens.toml").write_text(spec_toml(OrganismVocab(tuple(words), 8), 12.5))
    out = tmp_path / "org.jsonl"
    assert (
        main(["tokenize", str(audio_dir), "--model", str(ck), "--out", str(out), "--no-progress"])
        == 0
    )
    got = {u.id: u for u in read_manifest(out, strict=True)}
    for rec in recs:
        u = got[rec["id"]]
        assert list(u.units) == rec["units"] and list(u.durations) == rec["durations"]
        assert u.frame_rate == rec["frame_rate"]
        assert [(w.text, round(w.start, 4), round(w.end, 4)) for w in u.words] == [
            tuple(w) for w in rec["words"]
        ]


# --------------------------------------------------------------------------------------------
# speech-lens tokenize end to end
# --------------------------------------------------------------------------------------------


def _textgrid(words: list[tuple[str, float, float]], xmax: float) -> str:
    items = [("", 0.0, words[0][1]), *words, ("", words[-1][2], xmax)]
    lines = [
        'File type = "ooTextFile"',
        'Object class = "TextGrid"',
        "",
        "xmin = 0",
        f"xmax = {xmax}",
        "tiers? <exists>",
        "size = 1",
        "item []:",
        "    item [1]:",
        '        class = "IntervalTier"',
        '        name = "words"',
        "        xmin = 0",
        f"        xmax = {xmax}",
        f"        intervals: size = {len(items)}",
    ]
    for i, (w, s, e) in enumerate(items, 1):
        lines += [
            f"        intervals [{i}]:",
            f"            xmin = {s}",
            f"            xmax = {e}",
            f'            text = "{w}"',
        ]
    return "\n".join(lines) + "\n"


def _expected(path: Path) -> tuple[list[int], list[int]]:
    """Independent decode + resample (soundfile + scipy directly) + energy units + dedup."""
    from math import gcd

    from scipy.signal import resample_poly

    a, sr = sf.read(path, dtype="float32")
    if a.ndim == 2:
        a = a.mean(1)
    if sr != 16000:
        g = gcd(sr, 16000)
        a = resample_poly(a.astype(np.float64), 16000 // g, sr // g).astype(np.float32)
    return dedup_runs(energy_units(a))


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    meta = json.loads((SPEECH / "the_cat_sat.json").read_text())
    (d / "cat.flac").write_bytes((SPEECH / "the_cat_sat.flac").read_bytes())
    (d / "cat.json").write_text(
        json.dumps(
            {"aligned_text": [[" " + w, s, e] for w, s, e in meta["words"]], "text": meta["text"]}
        )
    )
    (d / "tom.flac").write_bytes((SPEECH / "tom_lives_in.flac").read_bytes())
    (d / "tom.txt").write_text("Tom lives in Paris.")  # no timings: aligned by pocketsphinx
    t = np.arange(int(0.8 * 22050)) / 22050
    hum = (0.2 * np.sin(2 * np.pi * 220 * t) * (t > 0.1) * (t < 0.7)).astype(np.float32)
    sf.write(d / "hum.wav", np.stack([hum, hum], 1), 22050)  # stereo, 22.05 kHz
    (d / "hum.TextGrid").write_text(_textgrid([("la", 0.1, 0.4), ("laa", 0.4, 0.7)], 0.8))
    return d


def test_tokenize_cli_end_to_end(
    corpus_dir, tmp_path, tiny_checkpoint, energy_registered, capsys, tiny_model
):
    ckpt, _ = tiny_checkpoint("spiritlm")
    out = tmp_path / "out" / "manifest.jsonl"
    args = [
        "tokenize",
        str(corpus_dir),
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--tokenizer",
        energy_registered,
        "--align",
        "pocketsphinx",
        "--align-cache",
        str(tmp_path / "cache"),
        "--no-progress",
        "--summary-json",
        str(tmp_path / "summary.json"),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "3 utterances (3 new, 0 already there, 0 failed)" in text
    assert "units/s" in text and "words without units:" in text
    utts = {u.id: u for u in read_manifest(out, layout=tiny_model("spiritlm").layout, strict=True)}
    assert set(utts) == {"cat", "tom", "hum"}
    for uid, fname in (("cat", "cat.flac"), ("tom", "tom.flac"), ("hum", "hum.wav")):
        units, durs = _expected(corpus_dir / fname)
        assert list(utts[uid].units) == units and list(utts[uid].durations) == durs
        assert utts[uid].frame_rate == 25.0
    meta = json.loads((SPEECH / "the_cat_sat.json").read_text())
    assert utts["cat"].words == tuple(Word(w, s, e) for w, s, e in meta["words"])
    assert [w.text for w in utts["tom"].words] == ["Tom", "lives", "in", "Paris"]
    assert utts["tom"].text == "Tom lives in Paris."
    assert utts["hum"].words == (Word("la", 0.1, 0.4), Word("laa", 0.4, 0.7))
    summary = json.loads((tmp_path / "summary.json").read_text())
    n_units = sum(len(u.units) for u in utts.values())
    seconds = sum(u.duration for u in utts.values())
    assert summary["units"] == n_units and summary["words"] == 6 + 4 + 2
    assert summary["units_per_second"] == pytest.approx(n_units / seconds, abs=1e-3)
    no_units = sum(
        1 for u in utts.values() for i in range(len(u.words)) if i not in set(u.unit_words())
    )
    assert summary["words_without_units"] == no_units

    # resume: nothing new, the file is unchanged
    before = out.read_bytes()
    assert main(args) == 0
    assert "0 new, 3 already there" in capsys.readouterr().out
    assert out.read_bytes() == before and not out.with_name(out.name + ".partial").exists()

    # a crash left: the output with one record, and a .partial with another + a cut line
    lines = before.decode().splitlines()
    out.write_text(lines[0] + "\n")
    out.with_name(out.name + ".partial").write_text(lines[1] + "\n" + lines[2][:40])
    assert main(args) == 0
    assert "1 new, 2 already there" in capsys.readouterr().out
    assert sorted(out.read_text().splitlines()) == sorted(lines)

    # a silence-only file stops the run with its name; --skip-errors goes on and lists it
    sf.write(corpus_dir / "quiet.wav", np.zeros(8000, np.float32), 16000)
    (corpus_dir / "quiet.txt").write_text("nothing")
    assert main(args) == 2
    assert "quiet.wav: silence only" in capsys.readouterr().err
    assert main([*args, "--skip-errors"]) == 1
    o = capsys.readouterr().out
    assert "1 failed" in o and "failed quiet:" in o
    assert len(out.read_text().splitlines()) == 3


def test_tokenize_cli_errors(corpus_dir, tmp_path, tiny_checkpoint, energy_registered, capsys):
    ckpt, _ = tiny_checkpoint("spiritlm")
    out = tmp_path / "m.jsonl"
    base = ["tokenize", str(corpus_dir), "--model", str(ckpt), "--out", str(out), "--no-progress"]
    # no timings for tom and no aligner asked for
    assert main([*base, "--tokenizer", energy_registered]) == 2
    assert (
        "tom.flac: no word timings; align the transcript with --align pocketsphinx"
        in capsys.readouterr().err
    )
    # a transcript word the aligner cannot place
    (corpus_dir / "tom.txt").write_text("Tom lives in Pariszzq")
    assert (
        main(
            [
                *base,
                "--tokenizer",
                energy_registered,
                "--align",
                "pocketsphinx",
                "--align-cache",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "cannot place word(s) ['Pariszzq']" in capsys.readouterr().err
    # the checkpoint's own tokenizer is not installed: a clear message, no traceback
    assert main(base) == 2
    assert "needs the 'spiritlm' package" in capsys.readouterr().err
    # a tokenizer made for another layout
    sims, _ = tiny_checkpoint("sims-qwen")
    assert (
        main(
            [
                "tokenize",
                str(corpus_dir),
                "--model",
                str(sims),
                "--out",
                str(out),
                "--tokenizer",
                energy_registered,
                "--no-progress",
            ]
        )
        == 2
    )
    assert "targets the 'spiritlm' layout but the checkpoint is 'sims'" in capsys.readouterr().err


def test_tokenize_cli_csfa_parquet(
    tmp_path, tiny_checkpoint, energy_registered, tiny_model, capsys
):
    """A Common-Sense-Facts-Audio-style Parquet table (prompt, renderings, word timings per
    rendering, correct / counterfactual completions) -> tokenize -> a manifest the lens reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy.signal import resample_poly

    meta = json.loads((SPEECH / "tom_lives_in.json").read_text())
    a, _ = sf.read(SPEECH / "tom_lives_in.flac", dtype="float32")
    renders = []
    for sr in (16000, 24000):
        x = a if sr == 16000 else resample_poly(a, 3, 2).astype(np.float32)
        b = io.BytesIO()
        sf.write(b, x, sr, format="WAV", subtype="FLOAT")
        renders.append({"bytes": b.getvalue(), "path": f"tom_{sr}.wav"})
    prompt_words = [{"word": w, "start": s, "end": e} for w, s, e in meta["words"][:3]]
    rows = [
        {
            "id": "fact-000",
            "prompt": "tom lives in",
            "audio": renders,
            "word_timings": [prompt_words, prompt_words],
            "correct": "paris",
            "counterfactual": "london",
            "category": "city",
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "csfa.parquet")
    ckpt, _ = tiny_checkpoint("spiritlm")
    out = tmp_path / "csfa.jsonl"
    cols = "id=id,text=prompt,audio=audio,words=word_timings,meta=correct|counterfactual|category"
    assert Columns.parse(cols).text == "prompt"
    assert (
        main(
            [
                "tokenize",
                str(tmp_path / "csfa.parquet"),
                "--model",
                str(ckpt),
                "--out",
                str(out),
                "--tokenizer",
                energy_registered,
                "--columns",
                cols,
                "--no-progress",
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["fact-000#0", "fact-000#1"]
    assert recs[1]["meta"] == {"correct": "paris", "counterfactual": "london", "category": "city"}
    utts = list(read_manifest(out, layout=tiny_model("spiritlm").layout, strict=True))
    assert [w.text for w in utts[0].words] == ["tom", "lives", "in"] and utts[
        0
    ].text == "tom lives in"
    # both renderings are the same speech: after resampling the energy units nearly agree
    f0, f1 = np.asarray(utts[0].frames()), np.asarray(utts[1].frames())
    n = min(len(f0), len(f1))
    assert abs(len(f0) - len(f1)) <= 1 and (f0[:n] == f1[:n]).mean() > 0.8


def test_tokenized_csfa_manifest_runs_through_the_lens(
    tmp_path, tiny_checkpoint, energy_registered, tiny_model
):
    """The manifest written by tokenize feeds encode_prompt + word_lens on the tiny SpiritLM."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from speech_lens import encode_prompt, word_lens

    meta = json.loads((SPEECH / "tom_lives_in.json").read_text())
    rows = [
        {
            "id": "f0",
            "prompt": "tom lives in paris",
            "audio": [{"bytes": (SPEECH / "tom_lives_in.flac").read_bytes(), "path": "t.flac"}],
            "word_timings": [[{"word": w, "start": s, "end": e} for w, s, e in meta["words"]]],
            "correct": "paris",
            "counterfactual": "london",
            "category": "city",
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    ckpt, _ = tiny_checkpoint("spiritlm")
    out = tmp_path / "t.jsonl"
    assert (
        main(
            [
                "tokenize",
                str(tmp_path / "t.parquet"),
                "--model",
                str(ckpt),
                "--out",
                str(out),
                "--tokenizer",
                energy_registered,
                "--no-progress",
                "--columns",
                "csfa",
            ]
        )
        == 0
    )
    model = tiny_model("spiritlm")
    (utt,) = list(read_manifest(out, layout=model.layout, strict=True))
    prompt = encode_prompt(model, utt, mode="speech")
    unit_ids = [model.layout.units.id_of(u) for u in utt.units]
    assert prompt.tokens.tolist()[-len(unit_ids) :] == unit_ids
    # the word of every unit position is the manifest's unit->word map (slamkit's end rule)
    speech = [i for i, u in enumerate(prompt.unit_index.tolist()) if u >= 0]
    assert prompt.word_index[speech].tolist() == utt.unit_words()
    res = word_lens(model, prompt, k=5)
    spoken = sorted(set(utt.unit_words()) - {-1})
    assert res.words is not None and res.words.words == tuple(utt.words[j].text for j in spoken)
    assert res.topk_ids.shape == (model.n_layers + 1, len(prompt.tokens), 5)


def test_tokenize_cli_expressive_with_fake_spiritlm(
    corpus_dir, tmp_path, tiny_checkpoint, tiny_model, monkeypatch, capsys
):
    """SpiritLM Expressive: pitch and style streams land in the manifest at their own rates and
    fit the checkpoint's [Pi*]/[St*] blocks; the base tokenizer is refused for this layout."""
    calls: dict = {}
    files = tmp_path / "st"
    for name, m in _fake_spiritlm(files, calls).items():
        monkeypatch.setitem(sys.modules, name, m)
    _touch(
        files,
        [
            "hubert_25hz/mhubert_base_25hz.pt",
            "hubert_25hz/L11_quantizer_500.pt",
            "vqvae_f0_quantizer/config.yaml",
            "vqvae_f0_quantizer/model.pt",
            "style_encoder_w2v2/config.json",
            "style_encoder_w2v2/pytorch_model.bin",
        ],
    )
    (corpus_dir / "tom.flac").unlink()  # keep the files that carry timings
    ckpt, _ = tiny_checkpoint("spiritlm-expressive")
    out = tmp_path / "ex.jsonl"
    args = ["tokenize", str(corpus_dir), "--model", str(ckpt), "--out", str(out), "--no-progress"]
    assert main([*args, "--tokenizer", "spiritlm"]) == 2
    assert (
        "targets the 'spiritlm' layout but the checkpoint is 'spiritlm-expressive'"
        in capsys.readouterr().err
    )
    assert main(args) == 0  # the checkpoint's own tokenizer, found through its family
    utts = {
        u.id: u
        for u in read_manifest(out, layout=tiny_model("spiritlm-expressive").layout, strict=True)
    }
    a, _ = sf.read(corpus_dir / "cat.flac", dtype="float32")
    cat = utts["cat"]
    assert cat.pitch.frame_rate == 12.5 and cat.style.frame_rate == 1.0 and cat.frame_rate == 24.99
    assert cat.pitch.units == tuple(int(u) for u in energy_units(a, 1280) % 64)
    assert list(cat.frames()) == list(energy_units(a))


def test_tokenize_cli_single_file_with_text(tmp_path, tiny_checkpoint, energy_registered, capsys):
    ckpt, _ = tiny_checkpoint("spiritlm")
    wav = tmp_path / "clip.flac"
    wav.write_bytes((SPEECH / "tom_lives_in.flac").read_bytes())
    out = tmp_path / "one.jsonl"
    assert (
        main(
            [
                "tokenize",
                str(wav),
                "--text",
                "tom lives in paris",
                "--model",
                str(ckpt),
                "--out",
                str(out),
                "--tokenizer",
                energy_registered,
                "--align",
                "pocketsphinx",
                "--align-cache",
                str(tmp_path / "c"),
                "--no-progress",
            ]
        )
        == 0
    )
    (u,) = list(read_manifest(out, strict=True))
    assert u.id == "clip" and [w.text for w in u.words] == ["tom", "lives", "in", "paris"]
    assert (list(u.units), list(u.durations)) == _expected(wav)


def test_tokenize_cli_bad_table_row_is_skipped(
    tmp_path, tiny_checkpoint, energy_registered, capsys
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.loads((SPEECH / "tom_lives_in.json").read_text())
    audio = {"bytes": (SPEECH / "tom_lives_in.flac").read_bytes(), "path": "t.flac"}
    rows = [
        {
            "id": "good",
            "prompt": "tom lives in paris",
            "audio": audio,
            "word_timings": json.dumps(meta["words"]),
        },
        {"id": "bad", "prompt": "tom lives in paris", "audio": audio, "word_timings": "[[oops"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    ckpt, _ = tiny_checkpoint("spiritlm")
    out = tmp_path / "t.jsonl"
    args = [
        "tokenize",
        str(tmp_path / "t.parquet"),
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--tokenizer",
        energy_registered,
        "--columns",
        "csfa",
        "--no-progress",
    ]
    assert main(args) == 2
    assert "t.parquet row 1 (id bad): word timings are not valid JSON" in capsys.readouterr().err
    assert main([*args, "--skip-errors"]) == 1
    o = capsys.readouterr().out  # "good" was written before the first run stopped at "bad"
    assert "0 new, 1 already there, 1 failed" in o and "failed bad: " in o
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["good"]
