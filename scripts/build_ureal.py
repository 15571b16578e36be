"""U-real units (issue 17 §2): many renditions per word -> whisper tiny.en encoder features
pooled per 40 ms -> k-means (K = 256) -> a data folder for ``train_organism.py`` (``units =
"manifest"``) and the held-out manifests under ``organisms/ureal/``.

  python scripts/build_corpus.py ureal --from runs/data_v2 --data runs/data_ureal --renditions 24

Steps, each resumable (files written atomically, finished shards kept):

1. synth: rendition r of every vocabulary word, each spoken inside a random 8-word group (as
   ``build_speech``). Piper renditions 0..R-1 (``joe``; length_scale, noise_scale, noise_w drawn
   per group from ``PIPER_RANGES``; the clip is the word's gap-extended region), R-1 held out;
   then optional espeak-ng training renditions R.. (a voice variant, rate and pitch per group;
   ``espeak_words.py``). One shard per (rendition, chunk of groups): ``ureal_audio/*.npz``.
2. features: whisper tiny.en encoder, each clip alone at the start of a 3 s input (not packed into
   30 s windows: see ``speech_lens.organisms.ureal``), pooled per 40 ms -> ``ureal_feats/*.npz``.
3. units: k-means on the pooled features of the training renditions only; every (word,
   rendition) becomes a deduplicated unit string; manifests as ``build_units`` renders them (each
   word occurrence of a training clause a random training rendition; held-out clauses and
   spoken-knowledge items the held-out rendition).
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speech_lens.files import atomic_savez, atomic_write_text
from speech_lens.organisms import corpus, knowledge, ureal
from speech_lens.organisms.checkpoint import OrganismVocab

GROUP = 8  # words per Piper call
CHUNK = 40  # groups per shard
PIPER_RANGES = {"length_scale": (0.8, 1.25), "noise_scale": (0.4, 0.9), "noise_w": (0.5, 1.1)}
ESPEAK_VOICES = [
    *(f"m{i}" for i in range(1, 8)),
    *(f"f{i}" for i in range(1, 6)),
    "klatt",
    "klatt2",
]
ESPEAK_RATE = (140, 200)  # words per minute
ESPEAK_PITCH = (25, 75)
N_PROBE = 800  # training clauses in the probe's sample (train_sample.jsonl)


def groups_of(words: list[str], r: int) -> list[list[str]]:
    ws = list(words)
    random.Random(100 + r).shuffle(ws)
    return [ws[i : i + GROUP] for i in range(0, len(ws), GROUP)]


def piper_params(r: int, g: int) -> dict[str, float]:
    rng = random.Random(f"piper-{r}-{g}")
    return {k: round(rng.uniform(lo, hi), 3) for k, (lo, hi) in PIPER_RANGES.items()}


def espeak_params(r: int, g: int) -> tuple[str, int, int]:
    rng = random.Random(f"espeak-{r}-{g}")
    return rng.choice(ESPEAK_VOICES), rng.randint(*ESPEAK_RATE), rng.randint(*ESPEAK_PITCH)


Spoken = tuple[np.ndarray, list[tuple[str, float, float]], list[float]]


def piper_speaker() -> Callable[[list[str], int, int], Spoken]:
    """Piper: a word's clip is its gap-extended region (gap midpoints), as ``build_speech``."""
    tts = corpus.PiperWords(threads=1)

    def speak(ws: list[str], r: int, g: int) -> Spoken:
        p = piper_params(r, g)
        a, spans = tts.synth(ws, **p)
        cuts = [0.0] + [(e0 + s1) / 2 for (_, _, e0), (_, s1, _) in itertools.pairwise(spans)]
        regions = [
            (w, s, e)
            for (w, _, _), s, e in zip(spans, cuts, [*cuts[1:], spans[-1][2]], strict=True)
        ]
        return a, regions, [p["length_scale"], p["noise_scale"], p["noise_w"]]

    return speak


def espeak_speaker() -> Callable[[list[str], int, int], Spoken]:
    """espeak-ng: a word's clip runs from its mark to the next (the word and the break after)."""
    from espeak_words import EspeakWords  # scripts/espeak_words.py (GPL tool, build time only)

    tts = EspeakWords()

    def speak(ws: list[str], r: int, g: int) -> Spoken:
        voice, rate, pitch = espeak_params(r, g)
        a, spans = tts.synth(ws, f"en-us+{voice}", rate, pitch)
        return a, spans, [ESPEAK_VOICES.index(voice), rate, pitch]

    return speak


def synth_shard(speak: Callable, groups: list[list[str]], r: int, first: int) -> dict:
    audio, words, starts, lens, params = [], [], [], [], []
    t = 0
    for g, ws in enumerate(groups, first):
        a, regions, p = speak(ws, r, g)
        for w, s, e in regions:
            clip = a[int(s * ureal.SR) : int(e * ureal.SR)]
            audio.append((np.clip(clip, -1, 1) * 32767).astype(np.int16))
            words.append(w)
            starts.append(t)
            lens.append(len(clip))
            params.append([g, *p])
            t += len(clip)
    return {
        "audio": np.concatenate(audio),
        "words": np.array(words),
        "starts": np.array(starts, dtype=np.int64),
        "lengths": np.array(lens, dtype=np.int64),
        "params": np.array(params, dtype=np.float32),  # group, then the voice's parameters
    }


@dataclass(frozen=True)
class Renditions:
    """Piper renditions 0..piper-1 (the last held out), then espeak-ng renditions (training)."""

    piper: int
    espeak: int = 0

    @property
    def test(self) -> int:
        return self.piper - 1

    @property
    def train(self) -> list[int]:
        return [*range(self.piper - 1), *range(self.piper, self.piper + self.espeak)]

    def shards(self, n_words: int) -> list[tuple[int, int, str]]:
        """(rendition, chunk, shard name), the held-out rendition first."""
        n_groups = -(-n_words // GROUP)
        n_chunks = -(-n_groups // CHUNK)
        out = []
        for r in [self.test, *self.train]:
            tag = "r" if r < self.piper else "e"
            out += [(r, c, f"{tag}{r:02d}-{c:02d}") for c in range(n_chunks)]
        return out


def synth(data: Path, words: list[str], rends: Renditions) -> None:
    from tqdm import tqdm

    out = data / "ureal_audio"
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in rends.shards(len(words)) if not (out / f"{s[2]}.npz").exists()]
    speakers: dict[str, Callable] = {}
    for r, c, name in tqdm(todo, desc="tts shards"):
        engine = "piper" if r < rends.piper else "espeak"
        if engine not in speakers:
            speakers[engine] = piper_speaker() if engine == "piper" else espeak_speaker()
        gs = groups_of(words, r)[c * CHUNK : (c + 1) * CHUNK]
        atomic_savez(out / f"{name}.npz", **synth_shard(speakers[engine], gs, r, c * CHUNK))


def clips_of(shard: Any) -> list[np.ndarray]:
    a = shard["audio"].astype(np.float32) / 32767
    return [a[s : s + n] for s, n in zip(shard["starts"], shard["lengths"], strict=True)]


def features(clips: Path, words: list[str], rends: Renditions) -> None:
    from tqdm import tqdm

    src, out = clips / "ureal_audio", clips / "ureal_feats"
    out.mkdir(parents=True, exist_ok=True)
    names = [n for _, _, n in rends.shards(len(words))]
    todo = [n for n in names if (src / f"{n}.npz").exists() and not (out / f"{n}.npz").exists()]
    if not todo:
        return
    enc = ureal.WhisperEncoder(threads=1)
    for name in tqdm(todo, desc="whisper shards"):
        sh = np.load(src / f"{name}.npz")
        pooled = enc.encode_clips(clips_of(sh))
        atomic_savez(
            out / f"{name}.npz",
            pooled=np.concatenate(pooled).astype(np.float16),
            n=np.array([len(p) for p in pooled], dtype=np.int64),
            words=sh["words"],
        )


def load_pooled(clips: Path, words: list[str], rends: Renditions) -> dict[tuple[str, int], Any]:
    """(word, rendition) -> pooled features [n, 384]; every shard must exist."""
    table: dict[tuple[str, int], Any] = {}
    for r, _, name in rends.shards(len(words)):
        path = clips / "ureal_feats" / f"{name}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: run the synth and features steps first")
        sh = np.load(path)
        cuts = np.concatenate([[0], np.cumsum(sh["n"])])
        for i, w in enumerate(sh["words"]):
            table[(str(w), r)] = sh["pooled"][cuts[i] : cuts[i + 1]].astype(np.float32)
    missing = [w for w in words for r in [rends.test, *rends.train] if (w, r) not in table]
    if missing:
        raise RuntimeError(f"{len(missing)} (word, rendition) clips missing, e.g. {missing[:3]}")
    return table


def word_strings(
    table: dict[tuple[str, int], Any], book: ureal.Codebook
) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
    keys = list(table)
    labels = book.assign(np.concatenate([table[k] for k in keys]))
    cuts = np.concatenate([[0], np.cumsum([len(table[k]) for k in keys])])
    return {k: ureal.dedup_runs(labels[cuts[i] : cuts[i + 1]].tolist()) for i, k in enumerate(keys)}


def manifests(
    data: Path, out_dir: Path, strings: dict, rends: Renditions, rate: float, speaker: str
) -> dict:
    """Training manifest (each word occurrence a random training rendition, as ``build_units``),
    held-out test and spoken-knowledge manifests (the held-out rendition)."""
    meta = json.loads((data / "text.json").read_text())
    rng = random.Random(7)

    def rec(uid: str, split: str, words: list[str], rs: list[int]) -> dict:
        return ureal.manifest_from_strings(
            uid, split, [(w, strings[(w, rng.choice(rs))]) for w in words], rate, speaker
        )

    train = [
        rec(f"train-{i:05d}", "train", s.split(), rends.train)
        for i, s in enumerate(meta["speech_train"] + meta["fillers"])
    ]
    test = [
        rec(f"test-{i:04d}", "test", s.split(), [rends.test])
        for i, s in enumerate(meta["speech_test"])
    ]
    items = []
    for i, f in enumerate(meta["knowledge"]):
        prompt = knowledge.ALL_PROMPTS[f["relation"]].format(p=f["person"]).split()
        for role in ("answer", "counterfactual"):
            r = rec(f"fact-{i:03d}-{role}", "test", [*prompt, f[role]], [rends.test])
            r.update(fact=i, role=role, relation=f["relation"], person=f["person"])
            r["prompt_words"] = len(prompt)
            items.append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus.write_jsonl(data / "manifest_train.jsonl", train)
    corpus.write_jsonl(data / "manifest_test.jsonl", test)
    corpus.write_jsonl(out_dir / "train_sample.jsonl", train[:N_PROBE])
    corpus.write_jsonl(out_dir / "test_manifest.jsonl", test)
    corpus.write_jsonl(out_dir / "knowledge_manifest.jsonl", items)
    return {"train": len(train), "test": len(test), "knowledge": len(items)}


def prepare(data: Path, source: Path, k: int) -> list[str]:
    data.mkdir(parents=True, exist_ok=True)
    if source.resolve() != data.resolve():
        shutil.copyfile(source / "text.json", data / "text.json")
    words = list(OrganismVocab.from_json(json.loads((source / "vocab.json").read_text())).words)
    (data / "vocab.json").write_text(json.dumps(OrganismVocab(tuple(words), k).to_json()))
    return words


def write_info(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=1))
    print(json.dumps(info))


def build_ureal(
    data: Path, source: Path, out_dir: Path, rends: Renditions, *, k: int, clips: Path
) -> None:
    t0 = time.time()
    words = prepare(data, source, k)
    synth(clips, words, rends)
    t1 = time.time()
    features(clips, words, rends)
    t2 = time.time()
    table = load_pooled(clips, words, rends)
    train = np.concatenate([v for (_, r), v in table.items() if r in set(rends.train)])
    book = ureal.Codebook.fit(train, k, seed=0)
    book.save(data / "ureal_codebook.npz")
    strings = word_strings(table, book)
    counts = manifests(data, out_dir, strings, rends, ureal.UNIT_RATE, "tts-varied")
    write_info(
        data / "ureal_info.json",
        {
            "piper_renditions": rends.piper,
            "espeak_renditions": rends.espeak,
            "train_renditions": rends.train,
            "test_rendition": rends.test,
            "k": k,
            "piper_ranges": PIPER_RANGES,
            "espeak": {"voices": ESPEAK_VOICES, "rate": ESPEAK_RATE, "pitch": ESPEAK_PITCH},
            "features": ureal.FEATURES,
            "pooled_train_frames": len(train),
            "units_per_word": round(float(np.mean([len(u) for u, _ in strings.values()])), 3),
            "utterances": counts,
            "seconds_this_run": {
                "synth": round(t1 - t0),
                "features": round(t2 - t1),
                "kmeans_and_manifests": round(time.time() - t2),
            },
        },
    )


def build_mfcc_baseline(clips: Path, out: Path, tokenizer: Path, rends: Renditions) -> None:
    """The shipped MFCC unit tokenizer (``units.UnitTokenizer``, K = 100, 12.5 Hz word-synchronous
    windows) applied to the same clips, each clip alone: the comparison for gate G1."""
    from speech_lens.organisms import units

    t0 = time.time()
    tok = units.UnitTokenizer.load(tokenizer)
    words = prepare(out, clips, tok.k)
    strings: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for r, _, name in rends.shards(len(words)):
        sh = np.load(clips / "ureal_audio" / f"{name}.npz")
        for w, clip in zip(sh["words"], clips_of(sh), strict=True):
            us, ds, _ = tok.encode(clip, [(str(w), 0.0, len(clip) / ureal.SR)])
            strings[(str(w), r)] = (us, ds)
    counts = manifests(out, out / "held_out", strings, rends, tok.config.rate, "tts-varied")
    info = {
        "tokenizer": str(tokenizer),
        "train_renditions": rends.train,
        "test_rendition": rends.test,
        "k": tok.k,
        "utterances": counts,
        "units_per_word": round(float(np.mean([len(u) for u, _ in strings.values()])), 3),
        "seconds": round(time.time() - t0),
    }
    write_info(out / "mfcc_info.json", info)
