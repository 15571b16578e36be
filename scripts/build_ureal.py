"""U-real units (issue 17 §2): many Piper renditions per word -> whisper tiny.en encoder features
pooled per 40 ms -> k-means (K = 256) -> a data folder for ``train_organism.py`` (``units =
"manifest"``) and the held-out manifests under ``organisms/ureal/``.

Run as ``scripts/build_corpus.py ureal --from runs/data_v2 --data runs/data_ureal``. Steps, each
resumable (files written atomically, finished shards kept):

1. ``synth``: rendition r of every vocabulary word, each spoken inside a random 8-word group (as
   ``build_speech``), Piper ``joe`` with length_scale, noise_scale and noise_w drawn per group
   (``PIPER_RANGES``); the clip is the word's gap-extended region. One shard per (rendition,
   chunk of groups): ``ureal_audio/rRR-CC.npz``.
2. ``features``: whisper tiny.en encoder on each shard's clips packed in order into 30 s windows
   (``ureal.pack_clips``), pooled per 40 ms inside each clip -> ``ureal_feats/rRR-CC.npz``.
3. ``units``: k-means on the pooled features of the training renditions 0..R-2 only; every
   (word, rendition) becomes a deduplicated unit string; manifests as ``build_units`` renders
   them (each word occurrence a random training rendition; held-out items rendition R-1).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from speech_lens.organisms import corpus, knowledge, ureal
from speech_lens.organisms.checkpoint import OrganismVocab

RENDITIONS = 12  # 0..R-2 train, R-1 held out
GROUP = 8  # words per Piper call
CHUNK = 40  # groups per shard
PIPER_RANGES = {"length_scale": (0.8, 1.25), "noise_scale": (0.4, 0.9), "noise_w": (0.5, 1.1)}
N_PROBE = 800  # training clauses in the probe's sample (train_sample.jsonl)


def groups_of(words: list[str], r: int) -> list[list[str]]:
    ws = list(words)
    random.Random(100 + r).shuffle(ws)
    return [ws[i : i + GROUP] for i in range(0, len(ws), GROUP)]


def piper_params(r: int, g: int) -> dict[str, float]:
    rng = random.Random(f"piper-{r}-{g}")
    return {k: round(rng.uniform(lo, hi), 3) for k, (lo, hi) in PIPER_RANGES.items()}


def save_npz(path: Path, **arrays: Any) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def synth_shard(tts: corpus.PiperWords, groups: list[list[str]], r: int, first: int) -> dict:
    audio, words, starts, lens, params = [], [], [], [], []
    t = 0
    for g, ws in enumerate(groups, first):
        p = piper_params(r, g)
        a, spans = tts.synth(ws, **p)
        bounds = [0.0] + [(e0 + s1) / 2 for (_, _, e0), (_, s1, _) in itertools.pairwise(spans)]
        bounds.append(spans[-1][2])
        cut = [int(b * ureal.SR) for b in bounds]
        for k, (w, _, _) in enumerate(spans):
            clip = a[cut[k] : cut[k + 1]]
            audio.append((np.clip(clip, -1, 1) * 32767).astype(np.int16))
            words.append(w)
            starts.append(t)
            lens.append(len(clip))
            params.append([g, p["length_scale"], p["noise_scale"], p["noise_w"]])
            t += len(clip)
    return {
        "audio": np.concatenate(audio),
        "words": np.array(words),
        "starts": np.array(starts, dtype=np.int64),
        "lengths": np.array(lens, dtype=np.int64),
        "params": np.array(params, dtype=np.float32),  # group, length, noise, noise_w
    }


def shard_names(n_words: int, renditions: int) -> list[tuple[int, int, str]]:
    n_groups = -(-n_words // GROUP)
    return [
        (r, c, f"r{r:02d}-{c:02d}")
        for r in [renditions - 1, *range(renditions - 1)]  # held-out rendition first
        for c in range(-(-n_groups // CHUNK))
    ]


def synth(data: Path, words: list[str], renditions: int) -> None:
    from tqdm import tqdm

    out = data / "ureal_audio"
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shard_names(len(words), renditions) if not (out / f"{s[2]}.npz").exists()]
    if not todo:
        return
    tts = corpus.PiperWords(threads=1)
    for r, c, name in tqdm(todo, desc="piper shards"):
        gs = groups_of(words, r)[c * CHUNK : (c + 1) * CHUNK]
        save_npz(out / f"{name}.npz", **synth_shard(tts, gs, r, c * CHUNK))


def clips_of(shard: Any) -> list[np.ndarray]:
    a = shard["audio"].astype(np.float32) / 32767
    return [a[s : s + n] for s, n in zip(shard["starts"], shard["lengths"], strict=True)]


def features(data: Path, words: list[str], renditions: int) -> None:
    from tqdm import tqdm

    src, out = data / "ureal_audio", data / "ureal_feats"
    out.mkdir(parents=True, exist_ok=True)
    todo = [
        n
        for _, _, n in shard_names(len(words), renditions)
        if (src / f"{n}.npz").exists() and not (out / f"{n}.npz").exists()
    ]
    if not todo:
        return
    enc = ureal.WhisperEncoder(threads=1)
    for name in tqdm(todo, desc="whisper shards"):
        sh = np.load(src / f"{name}.npz")
        pooled = enc.encode_clips(clips_of(sh))
        save_npz(
            out / f"{name}.npz",
            pooled=np.concatenate(pooled).astype(np.float16),
            n=np.array([len(p) for p in pooled], dtype=np.int64),
            words=sh["words"],
        )


def load_pooled(data: Path, words: list[str], renditions: int) -> dict[tuple[str, int], Any]:
    """(word, rendition) -> pooled features [n, 384]; every shard must exist."""
    table: dict[tuple[str, int], Any] = {}
    for r, _, name in shard_names(len(words), renditions):
        path = data / "ureal_feats" / f"{name}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: run the synth and features steps first")
        sh = np.load(path)
        cuts = np.concatenate([[0], np.cumsum(sh["n"])])
        for i, w in enumerate(sh["words"]):
            table[(str(w), r)] = sh["pooled"][cuts[i] : cuts[i + 1]].astype(np.float32)
    missing = [w for w in words for r in range(renditions) if (w, r) not in table]
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
    data: Path, out_dir: Path, strings: dict, renditions: int, rate: float, speaker: str
) -> dict:
    meta = json.loads((data / "text.json").read_text())
    train_r, test_r = list(range(renditions - 1)), [renditions - 1]
    rng = random.Random(7)

    def rec(uid: str, split: str, words: list[str], rends: list[int]) -> dict:
        return ureal.manifest_from_strings(
            uid, split, [(w, strings[(w, rng.choice(rends))]) for w in words], rate, speaker
        )

    train = [
        rec(f"train-{i:05d}", "train", s.split(), train_r)
        for i, s in enumerate(meta["speech_train"] + meta["fillers"])
    ]
    test = [
        rec(f"test-{i:04d}", "test", s.split(), test_r) for i, s in enumerate(meta["speech_test"])
    ]
    items = []
    for i, f in enumerate(meta["knowledge"]):
        prompt = knowledge.ALL_PROMPTS[f["relation"]].format(p=f["person"]).split()
        for role in ("answer", "counterfactual"):
            r = rec(f"fact-{i:03d}-{role}", "test", [*prompt, f[role]], test_r)
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


def build_ureal(data: Path, source: Path, out_dir: Path, *, renditions: int, k: int) -> None:
    t0 = time.time()
    words = prepare(data, source, k)
    synth(data, words, renditions)
    t1 = time.time()
    features(data, words, renditions)
    t2 = time.time()
    table = load_pooled(data, words, renditions)
    train = np.concatenate([v for (_, r), v in table.items() if r < renditions - 1])
    book = ureal.Codebook.fit(train, k, seed=0)
    book.save(data / "ureal_codebook.npz")
    strings = word_strings(table, book)
    counts = manifests(data, out_dir, strings, renditions, ureal.UNIT_RATE, "piper-joe-varied")
    info: dict[str, Any] = {
        "renditions": renditions,
        "train_renditions": list(range(renditions - 1)),
        "test_rendition": renditions - 1,
        "k": k,
        "piper_ranges": PIPER_RANGES,
        "features": ureal.FEATURES,
        "pooled_train_frames": len(train),
        "units_per_word": float(np.mean([len(u) for u, _ in strings.values()])),
        "utterances": counts,
        "seconds": {
            "synth": round(t1 - t0),
            "features": round(t2 - t1),
            "units_and_manifests": round(time.time() - t2),
        },
    }
    tmp = data / "ureal_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, data / "ureal_info.json")
    print(json.dumps(info))
