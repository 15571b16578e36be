"""Build the organisms' corpus: text + vocabulary, Piper speech, units, manifests.

  python scripts/build_corpus.py text      # runs/data/{vocab,text}.json (needs the Debian package)
  python scripts/build_corpus.py speech    # Piper TTS -> runs/data/audio/*.npz (resumable shards)
  python scripts/build_corpus.py units     # features -> k-means -> manifests + unit tokenizer
  python scripts/build_corpus.py u0        # espeak-ng phonemes of every vocabulary word (U0)
  python scripts/build_corpus.py u0-data --data runs/data_u0 --from runs/data_v2
                                           # U0 data folder: vocab + manifests per unit noise p
  python scripts/build_corpus.py ureal --data runs/data_ureal --from runs/data_v2
                                           # U-real units: Piper renditions -> whisper -> k-means
Prerequisite: apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb runs/deb
``text --world 2`` builds the 320-fact world (``knowledge.py``; the shipped organisms use world 1);
``u0`` needs ``espeakng-loader`` (GPL espeak-ng: build time only, as for mini-SIMS).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from speech_lens.organisms import corpus, knowledge, u0
from speech_lens.organisms.checkpoint import OrganismVocab

ROOT = Path(__file__).resolve().parents[1]
N_WORDS = 800  # Austen word types in the vocabulary (plus the world's words)
N_UNITS = 100
N_SPEECH_TRAIN = 20000
N_SPEECH_TEST = 300


def build_text(data: Path, deb: Path, world_version: int = 1) -> None:
    data.mkdir(parents=True, exist_ok=True)
    world = knowledge.get_world(world_version)
    words = knowledge.world_words(world_version)
    c = corpus.build_text_corpus(deb, n_words=N_WORDS, extra_words=words)
    vocab = OrganismVocab(tuple(c.vocab), N_UNITS)
    facts = knowledge.world(version=world_version)
    (data / "vocab.json").write_text(json.dumps(vocab.to_json()))
    train, test = corpus.speech_clauses(c, set(c.vocab), min_len=3, max_len=12)
    rng = random.Random(0)
    rng.shuffle(train)
    # the filler rule for Austen too: no spoken clause pairs a person with a fact's value
    leaking = [x for x in train if knowledge.leaked_facts(x, facts)]
    train = [x for x in train if not knowledge.leaked_facts(x, facts)]
    meta = {
        "world_version": world_version,
        "clauses": c.clauses,
        "held_out": c.held_out,
        "facts": knowledge.fact_sentences(facts, world_version),
        "fillers": knowledge.filler_sentences(world.n_fillers, seed=1, version=world_version),
        "speech_train": [" ".join(x) for x in train[:N_SPEECH_TRAIN]],
        "speech_test": [" ".join(x) for x in test[:N_SPEECH_TEST]],
        "knowledge": [f.__dict__ for f in facts],
    }
    (data / "text.json").write_text(json.dumps(meta))
    print(
        f"world {world_version}: {len(facts)} facts, {len(words)} words; vocab {vocab.size} ids "
        f"({len(c.vocab)} words); {len(c.clauses)} clauses; speech train "
        f"{len(meta['speech_train'])} test {len(meta['speech_test'])}; "
        f"{len(leaking)} leaking clauses dropped {[' '.join(x) for x in leaking][:5]}"
    )


def build_u0(data: Path, out_dir: Path) -> None:
    """espeak-ng phonemes of every vocabulary word (U0 units = ``u0.phoneme_ids``), written to
    the data folder and shipped as ``u0_lexicon.json`` (so nothing after this needs espeak)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts" / "minisims"))
    from data import Espeak  # mini-SIMS's espeak-ng wrapper (the one place it is called)

    vocab = OrganismVocab.from_json(json.loads((data / "vocab.json").read_text()))
    esp = Espeak()
    lex = {w: esp.phonemes(w) for w in vocab.words}
    for w, ph in lex.items():
        u0.phoneme_ids(ph, w)  # every phoneme has a unit and a class
    head = json.dumps({"phonemes": list(u0.U0_PHONEMES), "voice": "en-us"}, ensure_ascii=False)
    rows = ",\n".join(
        f"{json.dumps(w)}: {json.dumps(p, ensure_ascii=False)}" for w, p in lex.items()
    )
    text = head[:-1] + ', "words": {\n' + rows + "\n}}\n"  # one word per line
    for path in (data / "u0_lexicon.json", out_dir / "u0_lexicon.json"):
        path.write_text(text)
    homophones: dict[tuple[str, ...], list[str]] = {}
    for w, ph in lex.items():
        homophones.setdefault(tuple(ph), []).append(w)
    same = [ws for ws in homophones.values() if len(ws) > 1]
    print(f"{len(lex)} words, {len(homophones)} distinct phoneme strings; homophones {same}")


U0_NOISE = (0.0, 0.1, 0.2, 0.35, 0.5)  # issue 17's dose levels
U0_TEST_SEED = 1000  # noise seed of the held-out manifests (training draws use the run's seed)
N_PROBE = 800  # training clauses given to the text probe of evaluate_organisms.py


def build_u0_data(data: Path, source: Path, out_dir: Path) -> None:
    """A U0 data folder from a text data folder (world, clauses, lexicon): vocab.json with the 59
    U0 units, and per noise p the held-out test and spoken-knowledge manifests (shipped under
    ``organisms/u0/``) and the probe's training manifest. Training speech is drawn on the fly."""
    import shutil

    data.mkdir(parents=True, exist_ok=True)
    for name in ("text.json", "u0_lexicon.json"):
        if source.resolve() != data.resolve():
            shutil.copyfile(source / name, data / name)
    src_vocab = OrganismVocab.from_json(json.loads((source / "vocab.json").read_text()))
    vocab = OrganismVocab(src_vocab.words, len(u0.U0_PHONEMES))
    (data / "vocab.json").write_text(json.dumps(vocab.to_json()))
    meta = json.loads((data / "text.json").read_text())
    lexicon = u0.load_lexicon(data / "u0_lexicon.json")
    (out_dir / "u0").mkdir(parents=True, exist_ok=True)
    for p in U0_NOISE:
        test_noise = u0.UnitNoise(p, U0_TEST_SEED)
        test = [
            u0.u0_record(f"test-{i:04d}", "test", s.split(), lexicon, test_noise)
            for i, s in enumerate(meta["speech_test"])
        ]
        train = [
            u0.u0_record(f"train-{i:05d}", "train", s.split(), lexicon, u0.UnitNoise(p, 0))
            for i, s in enumerate(meta["speech_train"][:N_PROBE])
        ]
        items = []
        for i, f in enumerate(meta["knowledge"]):
            prompt = knowledge.ALL_PROMPTS[f["relation"]].format(p=f["person"]).split()
            for role in ("answer", "counterfactual"):
                words = [*prompt, f[role]]
                rec = u0.u0_record(f"fact-{i:03d}-{role}", "test", words, lexicon, test_noise)
                rec.update(fact=i, role=role, relation=f["relation"], person=f["person"])
                rec["prompt_words"] = len(prompt)
                items.append(rec)
        tag = f"p{p:g}"
        corpus.write_jsonl(data / f"manifest_train_{tag}.jsonl", train)
        if p == 0:  # the words of training clauses: the lens's --prior-manifest
            corpus.write_jsonl(out_dir / "u0" / "train_sample.jsonl", train)
        corpus.write_jsonl(out_dir / "u0" / f"test_manifest_{tag}.jsonl", test)
        corpus.write_jsonl(out_dir / "u0" / f"knowledge_manifest_{tag}.jsonl", items)
        print(f"p={p:g}: {len(test)} test, {len(items)} knowledge, {len(train)} probe utterances")


RENDITIONS = 4  # per word: 0-2 train, 3 held out (test utterances and spoken-knowledge items)
GROUP = 8  # words per Piper call


def build_speech(data: Path) -> None:
    """Piper renditions of every vocabulary word, each spoken inside a random 8-word sequence
    (per-word phonemisation gives exact spans); the clip is the word's gap-extended region."""
    import pickle

    import numpy as np
    from tqdm import tqdm

    vocab = OrganismVocab.from_json(json.loads((data / "vocab.json").read_text()))
    out = data / "clips.pkl"
    clips: dict[str, list] = pickle.loads(out.read_bytes()) if out.exists() else {}
    groups = []
    for r in range(RENDITIONS):
        ws = list(vocab.words)
        random.Random(100 + r).shuffle(ws)
        groups += [(r, ws[i : i + GROUP]) for i in range(0, len(ws), GROUP)]
    priority = [0, RENDITIONS - 1, *range(1, RENDITIONS - 1)]  # held-out rendition early
    todo = sorted(
        ((i, g) for i, g in enumerate(groups) if str(i) not in clips),
        key=lambda x: (priority.index(x[1][0]), x[0]),
    )
    tts = corpus.PiperWords(threads=1)
    for n, (i, (r, ws)) in enumerate(tqdm(todo, desc="piper", mininterval=20)):
        audio, spans = tts.synth(ws, noise_scale=0.667, noise_w=0.8)
        bounds = [0.0] + [(e0 + s1) / 2 for (_, _, e0), (_, s1, _) in itertools.pairwise(spans)]
        bounds.append(spans[-1][2])
        sr = 16000
        clips[str(i)] = [
            (w, r, (audio[int(bounds[k] * sr) : int(bounds[k + 1] * sr)] * 32767).astype(np.int16))
            for k, (w, _, _) in enumerate(spans)
        ]
        if n % 40 == 39 or n == len(todo) - 1:
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(clips))
            tmp.replace(out)


def _clip_table(data: Path) -> dict[tuple[str, int], object]:
    import pickle

    clips = pickle.loads((data / "clips.pkl").read_bytes())
    return {(w, r): a for group in clips.values() for (w, r, a) in group}


def render(
    words: list[str], table: dict, renditions: list[int], rng: random.Random
) -> tuple[object, list[tuple[str, float, float]]]:
    """Concatenate word clips (a random rendition each) into one utterance with exact spans."""
    import numpy as np

    parts, spans, t = [], [], 0.0
    for w in words:
        a = table[(w, rng.choice(renditions))]
        parts.append(a)
        spans.append((w, t, t + len(a) / 16000))
        t += len(a) / 16000
    return np.concatenate(parts).astype(np.float32) / 32767, spans


def build_units(data: Path, out_dir: Path) -> None:
    """Fit the unit tokenizer on training renditions, then write train/test manifests (units
    computed from each rendered utterance's audio) and the spoken-knowledge items."""
    import numpy as np
    from tqdm import tqdm

    from speech_lens.organisms import units

    cfg = units.FeatureConfig()
    table = _clip_table(data)
    meta = json.loads((data / "text.json").read_text())
    vocab = OrganismVocab.from_json(json.loads((data / "vocab.json").read_text()))
    # train renditions: those synthesised (the TTS stage may be stopped early to save CPU)
    train_r = [r for r in range(RENDITIONS - 1) if all((w, r) in table for w in vocab.words)]
    if not train_r or not all((w, RENDITIONS - 1) in table for w in vocab.words):
        raise RuntimeError(
            f"{data / 'clips.pkl'}: need rendition 0 and {RENDITIONS - 1} of every word"
        )
    print(f"train renditions {train_r}, test rendition {RENDITIONS - 1}")
    pooled = []
    for (w, r), a in table.items():
        if r in train_r:
            f = units.mfcc(np.asarray(a, dtype=np.float32) / 32767, cfg)
            p, _ = units.pooled_features(f, [(w, 0.0, len(a) / 16000)], cfg)
            pooled.append(p)
    tok = units.fit(np.concatenate(pooled), N_UNITS, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(out_dir / "unit_tokenizer.json")
    tok.save(data / "unit_tokenizer.json")

    def record(
        uid: str, split: str, words: list[str], rends: list[int], rng: random.Random
    ) -> dict:
        audio, spans = render(words, table, rends, rng)
        u, d, wq = tok.encode(audio, spans)
        return corpus.manifest_record(uid, split, wq, cfg.rate, u, d)

    rng = random.Random(7)
    train_sents = meta["speech_train"] + meta["fillers"]
    recs = [
        record(f"train-{i:05d}", "train", s.split(), [0, 1, 2], rng)
        for i, s in enumerate(tqdm(train_sents, desc="train manifest", mininterval=20))
    ]
    corpus.write_jsonl(data / "manifest_train.jsonl", recs)
    test = [
        record(f"test-{i:04d}", "test", s.split(), [RENDITIONS - 1], rng)
        for i, s in enumerate(meta["speech_test"])
    ]
    corpus.write_jsonl(data / "manifest_test.jsonl", test)
    corpus.write_jsonl(out_dir / "test_manifest.jsonl", test)
    # spoken-knowledge items: prompt + each completion, all held-out renditions
    items = []
    for i, f in enumerate(meta["knowledge"]):
        prompt = knowledge.ALL_PROMPTS[f["relation"]].format(p=f["person"]).split()
        for role in ("answer", "counterfactual"):
            rec = record(f"fact-{i:03d}-{role}", "test", [*prompt, f[role]], [RENDITIONS - 1], rng)
            rec.update(
                {
                    "fact": i,
                    "role": role,
                    "relation": f["relation"],
                    "person": f["person"],
                    "prompt_words": len(prompt),
                }
            )
            items.append(rec)
    corpus.write_jsonl(out_dir / "knowledge_manifest.jsonl", items)
    stats = {
        **unit_stats(recs),
        "train_renditions": train_r,
        "test_rendition": RENDITIONS - 1,
        "test": unit_stats(test),
    }
    (data / "unit_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))


def unit_stats(recs: list[dict]) -> dict:
    from collections import Counter, defaultdict

    per_type: dict[str, Counter] = defaultdict(Counter)
    n_units = n_words = n_frames = 0
    for r in recs:
        words, per_word = corpus.word_units(r)
        for w, us in zip(words, per_word, strict=False):
            per_type[w][tuple(us)] += 1
            n_units += len(us)
            n_words += 1
        n_frames += sum(r["durations"])
    modal = sum(c.most_common(1)[0][1] for c in per_type.values())
    return {
        "utterances": len(recs),
        "words": n_words,
        "units_per_word": n_units / n_words,
        "frames_per_word": n_frames / n_words,
        "modal_string_share": modal / n_words,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("stage", choices=["text", "speech", "units", "u0", "u0-data", "ureal"])
    ap.add_argument("--from", dest="source", help="u0-data, ureal: the text data folder (world 2)")
    ap.add_argument("--renditions", type=int, default=24, help="ureal: Piper, the last held out")
    ap.add_argument("--espeak", type=int, default=0, help="ureal: espeak-ng training renditions")
    ap.add_argument("--clips", help="ureal: folder of ureal_audio/ and ureal_feats/ (--data)")
    ap.add_argument("--k", type=int, default=256, help="ureal: k-means clusters")
    ap.add_argument(
        "--mfcc-baseline", help="ureal: also write MFCC-unit manifests of the clips here"
    )
    ap.add_argument("--data", default=str(ROOT / "runs" / "data"))
    ap.add_argument("--deb", default=str(ROOT / "runs" / "deb"))
    ap.add_argument("--out", default=str(ROOT / "organisms"), help="shipped files go here")
    ap.add_argument("--world", type=int, default=1, help="synthetic world version (text stage)")
    a = ap.parse_args()
    if a.stage == "text":
        build_text(Path(a.data), Path(a.deb), a.world)
    elif a.stage == "speech":
        build_speech(Path(a.data))
    elif a.stage == "units":
        build_units(Path(a.data), Path(a.out))
    elif a.stage == "u0":
        build_u0(Path(a.data), Path(a.out))
    elif a.stage == "u0-data":
        build_u0_data(Path(a.data), Path(a.source or a.data), Path(a.out))
    elif a.stage == "ureal":
        import build_ureal  # scripts/build_ureal.py

        rends = build_ureal.Renditions(a.renditions, a.espeak)
        clips = Path(a.clips or a.data)
        src = Path(a.source or a.data)
        out = Path(a.out) / "ureal"
        build_ureal.build_ureal(Path(a.data), src, out, rends, k=a.k, clips=clips)
        if a.mfcc_baseline:
            tok = Path(a.out) / "unit_tokenizer.json"
            build_ureal.build_mfcc_baseline(clips, Path(a.mfcc_baseline), tok, rends)
