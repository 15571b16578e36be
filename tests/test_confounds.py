"""Confounds of word Recall@k (issue 17 §1): current-word recall read at a word's first / last
unit alone, and the leave-one-utterance-out frequency prior, each against an independent count."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from near_ties import rank_window
from speech_lens import Utterance, Word, encode_prompt, word_lens, word_targets
from speech_lens._tl import final_norm_and_unembed, resid_pre_name
from speech_lens.data.encoded import SPEECH
from speech_lens.lens.metrics import DatasetMetrics, aggregate
from speech_lens.lens.prior import LEAVE_ONE_OUT, prior_lists
from speech_lens.lens.readout import MASS_GROUPS
from speech_lens.lens.records import UtteranceRecord, match_ids, utterance_record
from speech_lens.lens.tables import layer_table
from speech_lens.lens.unit_edges import listed_rank
from speech_lens.report.lens import recall_figure

# ------------------------------------------------------------------------------------------------
# the rank among a listed top-k
# ------------------------------------------------------------------------------------------------


def test_listed_rank_is_pessimistic_and_saturates_at_k():
    ids = torch.tensor([[7, 3, 9, 4], [7, 3, 9, 4], [7, 3, 9, 4], [7, 3, 9, -1], [7, 3, 9, 4]])
    lp = torch.tensor(
        [
            [-1.0, -2.0, -2.0, -3.0],  # 9 ties with 3 inside the list: the tie counts against it
            [-1.0, -2.0, -3.0, -3.0],  # 9 ties with the last listed id: ids beyond may tie too
            [-1.0, -2.0, -3.0, -4.0],  # 9 strictly third
            [-1.0, -2.0, -3.0, float("nan")],  # a list shorter than k holds every text id
            [-1.0, -1.0, -1.0, -1.0],  # a flat readout scores nothing
        ]
    )
    assert listed_rank(ids, lp, [9]).tolist() == [2, 4, 2, 2, 4]
    assert listed_rank(ids, lp, [4]).tolist() == [3, 4, 3, 4, 4]  # the last slot, alone: k - 1
    assert listed_rank(ids, lp, [5]).tolist() == [4] * 5  # not listed
    assert listed_rank(ids, lp, [9, 3]).tolist() == [2, 1, 1, 1, 4]  # the better of two ids


# ------------------------------------------------------------------------------------------------
# first / last-unit ranks on a tiny model, against an independent readout
# ------------------------------------------------------------------------------------------------


def _reference_logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    """[rows, pos, vocab] lens log-probs: resid_pre of each block captured by a hook, through
    the model's own final norm and unembedding; the last row is the model's output."""
    caps: dict[int, torch.Tensor] = {}

    def capture(i):
        def fn(act, *, hook):
            caps[i] = act[0].detach().clone()

        return fn

    hooks = [(resid_pre_name(i), capture(i)) for i in range(model.n_layers)]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
        norm, unembed = final_norm_and_unembed(model.bridge)
        rows = [unembed(norm(caps[i])) for i in range(model.n_layers)] + [logits]
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


def _word_of(model, ids) -> str | None:
    """The first of ``ids`` that is a word's spaced first sub-token, as that word."""
    tok = model.tokenizer
    for i in ids:
        w = tok.convert_ids_to_tokens(int(i)).lstrip("\u2581")
        if w.isalpha() and tok.encode(" " + w, add_special_tokens=False)[:1] == [int(i)]:
            return w
    return None


def _listed_words(model, utt: Utterance, k: int) -> Utterance:
    """``utt`` re-worded so that each word is listed in the lens's top k at layer 1 at its
    first (even words) or last (odd words) unit: the prompt is units only, so it does not
    change, and random words would never be listed (every rank would read "k or worse")."""
    prompt = encode_prompt(model, utt, mode="speech")
    res = word_lens(model, prompt, k=k, positions="speech")
    words = []
    for j, s in enumerate(prompt.speech_spans()):
        units = [p for p in s.positions if prompt.kind[p] == SPEECH]
        col = res.positions.tolist().index(units[0] if j % 2 == 0 else units[-1])
        words.append(_word_of(model, res.topk_ids[1, col]) or utt.words[j].text)
    return replace(
        utt, words=tuple(replace(w, text=t) for w, t in zip(utt.words, words, strict=True)), text=""
    )


def _utterance(uid: str, words, seed: int, units_per_word=(6, 1, 3, 9)) -> Utterance:
    """Words 0.1 s apart with the given unit counts (a single-unit word among them), 25 Hz."""
    g = torch.Generator().manual_seed(seed)
    out, t = [], 0.0
    for j, w in enumerate(words):
        n = units_per_word[j % len(units_per_word)]
        out.append(Word(w, t, t + n * 0.04))
        t += n * 0.04 + 0.1
    units = torch.randint(0, 500, (round(t * 25) + 1,), generator=g).tolist()
    return Utterance(id=uid, words=tuple(out), units=units, durations=None, frame_rate=25.0)


def test_unit_ranks_equal_an_independent_readout_at_the_first_and_last_unit(tiny_model):
    model = tiny_model("spiritlm")
    k = 200  # of 32k text ids, mostly filler pieces no word encodes to: k holds a few words
    text_mask = model.layout.text_mask
    listed = single = 0
    for n in range(4):
        utt = _listed_words(model, _utterance(f"u{n}", ["the", "cat", "sat", "on"], seed=n), k)
        prompt = encode_prompt(model, utt, mode="speech")
        targets = word_targets(model, utt)
        rec = utterance_record(word_lens(model, prompt, targets, k=k), prompt, model.layout)
        ref = _reference_logprobs(model, prompt.tokens).masked_fill(~text_mask, float("-inf"))
        spans = [
            s for s in prompt.speech_spans() if any(prompt.kind[p] == SPEECH for p in s.positions)
        ]
        assert [s.text for s in spans] == rec.words
        for rule, by_edge in rec.unit_ranks.items():
            for edge, per_word in by_edge.items():
                for j, s in enumerate(spans):
                    units = [p for p in s.positions if prompt.kind[p] == SPEECH]
                    text = ref[:, units[0] if edge == "first" else units[-1]]
                    windows = [
                        rank_window(text, text[:, i], bool(text_mask[i]))
                        for i in match_ids(targets[s.index], rule)
                    ]
                    lo = torch.stack([w[0] for w in windows]).amin(0).clamp(max=k)
                    hi = torch.stack([w[1] for w in windows]).amin(0).clamp(max=k)
                    got = torch.tensor(per_word[j])
                    assert bool(((got >= lo) & (got <= hi)).all()), (rule, edge, j, got, lo, hi)
                    clear = lo == hi
                    assert torch.equal(got[clear], lo[clear])
                    listed += int((clear & (lo < k)).sum())
                    if len(units) == 1:  # one unit: first = last = the pooled readout
                        pooled = torch.tensor(rec.ranks[rule]["current"][j])
                        assert torch.equal(got[clear & (pooled < k)], pooled[clear & (pooled < k)])
                        single += int((clear & (pooled < k)).sum())
    assert listed >= 50 and single >= 5, (listed, single)  # not a check of "k or worse" alone


# ------------------------------------------------------------------------------------------------
# first / last-unit recall from constructed records
# ------------------------------------------------------------------------------------------------

IDS = {"the": 0, "cat": 1, "sat": 2, "a": 3, "dog": 4, "zebra": 5}


def _record(uid: str, sentence, first_rank: int, last_rank: int, n_rows: int = 2, k: int = 3):
    """A record whose words rank ``first_rank`` at their first unit and ``last_rank`` at their
    last at every row (pooled rank 0); word ``w``'s hit ids: ``IDS[w]`` and, for "cat", also 9."""
    n = len(sentence)
    hit = [[IDS[w], 9] if w == "cat" else [IDS[w]] for w in sentence]
    nxt = [*hit[1:], []]
    return UtteranceRecord(
        utterance_id=uid,
        n_layers=n_rows - 1,
        words=list(sentence),
        word_index=list(range(n)),
        next_words=[*sentence[1:], ""],
        ranks={
            "first": {
                "current": [[0] * n_rows] * n,
                "next": [[0] * n_rows] * (n - 1) + [[-1] * n_rows],
            }
        },
        top_ids=[[[IDS[w], 90, 91]] * n_rows for w in sentence],
        mass_sums={g: [0.0] * n_rows for g in MASS_GROUPS},
        unit_top1=[0] * n_rows,
        n_speech_positions=3 * n,
        n_utterance_words=n,
        target_ids={"first": hit},
        next_target_ids={"first": nxt},
        unit_ranks={
            "first": {"first": [[first_rank] * n_rows] * n, "last": [[last_rank] * n_rows] * n}
        },
    )


SENTENCES = (("the", "cat", "sat"), ("a", "dog", "the"), ("cat", "the"), ("zebra", "zebra"))


@pytest.mark.parametrize(("first", "last"), [(0, 3), (3, 0)])
def test_first_and_last_unit_recall_of_constructed_records(first, last):
    records = [_record(f"s{i}", s, first, last) for i, s in enumerate(SENTENCES)]
    m = aggregate(records, ks=(1, 3, 5), n_boot=50, seed=0)
    one, zero = [1.0, 1.0], [0.0, 0.0]
    for k in (1, 3):
        assert m.recall_first_unit[k].mean == (one if first == 0 else zero)
        assert m.recall_last_unit[k].mean == (one if last == 0 else zero)
    assert 5 in m.recall_current and 5 not in m.recall_first_unit  # beyond the stored top 3
    assert DatasetMetrics.from_json(json.loads(json.dumps(m.to_json()))) == m
    row = layer_table(m)[1]
    assert (row["recall@1_first_unit"], row["recall@1_last_unit"]) == (
        float(first == 0),
        float(last == 0),
    )
    assert {"recall@3_first_unit_lo", "recall@3_last_unit_hi"} <= set(row)
    fig = recall_figure(m, ks=(1,), which=("current",))
    by_name = {t.name: t for t in fig.data if t.name}
    first_trace = by_name["current word R@1 (first unit only)"]
    last_trace = by_name["current word R@1 (last unit only)"]
    assert (first_trace.line.dash, last_trace.line.dash) == ("dot", "longdash")
    assert list(first_trace.y) == (one if first == 0 else zero)
    assert list(last_trace.y) == (one if last == 0 else zero)


def test_records_written_before_the_confounds_give_the_old_formats():
    old = [_record(f"s{i}", s, 0, 3).to_json() for i, s in enumerate(SENTENCES)]
    for d in old:
        del d["unit_ranks"], d["next_target_ids"]
    m = aggregate([UtteranceRecord.from_json(d) for d in old], ks=(1,), n_boot=10)
    assert m.recall_first_unit == m.recall_last_unit == m.recall_prior_next == {}
    assert m.recall_prior_current  # the current word's hit ids were stored already
    info = m.to_json()
    assert not {"recall_first_unit", "recall_last_unit", "recall_prior_next"} & set(info)
    assert not any(x in key for key in layer_table(m)[0] for x in ("_unit", "next_prior"))
    names = [t.name for t in recall_figure(m, ks=(1,)).data if t.name]
    assert not any("unit only" in n for n in names)
    assert "next word R@1 (frequency prior)" not in names


# ------------------------------------------------------------------------------------------------
# the frequency prior against a direct count
# ------------------------------------------------------------------------------------------------


def _direct_prior(records, which: str, k: int) -> list[int]:
    """Per utterance, the prior's hits counted by brute force: the other utterances' words
    counted, k ids chosen one by one (most words not yet hit, smaller id on ties)."""
    field = "target_ids" if which == "current" else "next_target_ids"
    words = [[frozenset(t) for t in getattr(r, field)["first"] if t] for r in records]
    hits = []
    for u, own in enumerate(words):
        others = Counter(t for v, ws in enumerate(words) if v != u for t in ws)
        listed: list[int] = []
        for _ in range(k):
            best, best_n = None, 0
            for cand in sorted({i for t in others for i in t}):
                n = sum(c for t, c in others.items() if cand in t and not t & set(listed))
                if n > best_n:
                    best, best_n = cand, n
            if best is None:
                break
            listed.append(best)
        hits.append(sum(1 for t in own if t & set(listed)))
    return hits


@pytest.mark.parametrize("which", ["current", "next"])
def test_prior_equals_a_direct_count(which):
    # "zebra" in one utterance only; k = 10 lists every id of the others (a short list)
    sentences = (*SENTENCES, *SENTENCES[:3], ("dog", "a", "sat"))
    records = [_record(f"s{i}", s, 0, 0) for i, s in enumerate(sentences)]
    m = aggregate(records, ks=(1, 2, 3, 10), n_boot=50, seed=1)
    prior = m.recall_prior_current if which == "current" else m.recall_prior_next
    n = m.n_words if which == "current" else m.n_next_words
    assert prior[10].mean[0] < 1  # the lone zebra is never listed for its own utterance
    for k in (1, 2, 3, 10):
        direct = sum(_direct_prior(records, which, k))
        assert len(set(prior[k].mean)) == 1  # flat: the prior reads no layer
        assert prior[k].mean[0] * n == pytest.approx(direct, abs=1e-9)
        assert all(
            lo <= prior[k].mean[0] <= hi for lo, hi in zip(prior[k].lo, prior[k].hi, strict=True)
        )
    row = layer_table(m)[0]
    assert row[f"recall@2_{which}_prior"] == prior[2].mean[0]
    assert f"recall@2_{which}_prior_lo" in row and f"recall@2_{which}_prior_hi" in row
    fig = recall_figure(m, ks=(2,), which=(which,))
    trace = next(t for t in fig.data if t.name == f"{which} word R@2 (frequency prior)")
    assert trace.line.dash == "longdashdot" and list(trace.y) == prior[2].mean


def test_prior_leaves_the_utterance_out_and_spends_one_slot_per_word():
    records = [_record(f"s{i}", s, 0, 0) for i, s in enumerate(SENTENCES)]
    lists = prior_lists(records, "first", "current", 2)
    # "zebra" is only in s3: fit on the others, its list never holds it, though in-sample it
    # would be the most frequent word of that utterance
    assert IDS["zebra"] not in lists[3] and lists[3] == [IDS["the"], IDS["cat"]]
    # "cat" hits with ids 1 and 9: listing 1 covers its words, so 9 never takes a slot
    assert all(9 not in ids for ids in lists)
    # with one hit id per word, the list is the k most frequent target tokens of the others
    single = [r.target_ids["first"] for r in records]
    for r in records:
        r.target_ids["first"] = [ids[:1] for ids in r.target_ids["first"]]
    for u in range(len(records)):
        others = Counter(
            t[0] for v, r in enumerate(records) if v != u for t in r.target_ids["first"]
        )
        top = [i for i, _ in sorted(others.items(), key=lambda x: (-x[1], x[0]))[:3]]
        assert prior_lists(records, "first", "current", 3)[u] == top
    for r, ids in zip(records, single, strict=True):
        r.target_ids["first"] = ids
    m = aggregate(records, ks=(1,), n_boot=10)
    assert m.recall_prior_current[1].mean[0] == pytest.approx((1 + 1 + 1 + 0) / 10)


# ------------------------------------------------------------------------------------------------
# end to end: a tiny-model lens run writes them, and they match a recount from its records
# ------------------------------------------------------------------------------------------------


def test_lens_run_writes_the_confounds_and_they_match_a_recount(tiny_model, tmp_path):
    from speech_lens.runs.lens import PARTIAL, run_dataset
    from speech_lens.runs.lens_settings import LensRunConfig
    from speech_lens.testing.families import random_utterances

    model = tiny_model("spiritlm")
    # words the lens lists at their first or last unit (k = 200 of 32k: see _listed_words), so
    # the recount counts hits; three utterances of "the cat sat on a mat" give the prior words
    k = 200
    utts = [_listed_words(model, u, k) for u in random_utterances(3, prefix="w")]
    utts += random_utterances(3)
    cfg = LensRunConfig(
        checkpoint="tiny", data="mem", family="spiritlm", k=k, ks=(1, 5, k), n_boot=50
    )
    out = tmp_path / "run"
    m = run_dataset(model, utts, out, cfg, progress=False)
    lines = (out / PARTIAL).read_text().splitlines()[1:]
    records = [UtteranceRecord.from_json(json.loads(ln)) for ln in lines]
    info = json.loads((out / "metrics.json").read_text())["metrics"]
    with (out / "layers.csv").open() as f:
        layers = list(csv.DictReader(f))
    for name, curves, which in (
        ("first_unit", m.recall_first_unit, "first"),
        ("last_unit", m.recall_last_unit, "last"),
    ):
        assert sorted(info[f"recall_{name}"], key=int) == ["1", "5", "200"]
        for k in (1, 5, 200):
            hits = sum(
                (np.asarray(r.unit_ranks["first"][which]) < k).sum(0) for r in records
            )  # [word, row] per record, summed over words and records
            assert np.asarray(curves[k].mean) * m.n_words == pytest.approx(hits, abs=1e-9)
            assert k < 200 or hits.sum() > 0  # the lens lists some words there
            for part, values in (
                ("", curves[k].mean),
                ("_lo", curves[k].lo),
                ("_hi", curves[k].hi),
            ):
                got = [float(r[f"recall@{k}_{name}{part}"]) for r in layers]
                assert got == pytest.approx(values)
    for which, curves, n in (
        ("current", m.recall_prior_current, m.n_words),
        ("next", m.recall_prior_next, m.n_next_words),
    ):
        assert sorted(info[f"recall_prior_{which}"], key=int) == ["1", "5", "200"]
        for k in (1, 5, 200):
            direct = sum(_direct_prior(records, which, k))
            assert curves[k].mean == pytest.approx([direct / n] * (model.n_layers + 1))
            assert [float(r[f"recall@{k}_{which}_prior"]) for r in layers] == pytest.approx(
                curves[k].mean
            )
        assert curves[5].mean[0] > 0  # six utterances of "the cat sat on a mat": the prior hits
    html = (out / "report.html").read_text()
    for name in (
        "current word R@5 (first unit only)",
        "current word R@5 (last unit only)",
        "current word R@5 (frequency prior)",
        "next word R@5 (frequency prior)",
    ):
        assert name in html
    assert "Frequency prior (flat, long dash-dot)" in html


# ------------------------------------------------------------------------------------------------
# the prior fit on a training manifest
# ------------------------------------------------------------------------------------------------


def test_prior_fit_on_a_training_manifest(tiny_model, tmp_path):
    from speech_lens import write_manifest
    from speech_lens.lens.prior import manifest_prior
    from speech_lens.runs.compare import CompareError, compare_runs
    from speech_lens.runs.lens import PARTIAL, run_dataset
    from speech_lens.runs.lens_settings import LensRunConfig
    from speech_lens.testing.families import random_utterances

    model = tiny_model("spiritlm")
    train = random_utterances(5, prefix="t", seed=3)
    path = tmp_path / "train.jsonl"
    write_manifest(path, train)
    fitted = manifest_prior(model, train, source=str(path))
    # the counts: every word's hit ids (current) and every word after another (next)
    for rule in ("first", "any"):
        for which, skip in (("current", 0), ("next", 1)):
            direct = Counter(
                tuple(sorted(set(match_ids(t, rule))))
                for u in train
                for t in word_targets(model, u)[skip:]
            )
            assert fitted.counts[rule][which] == direct
    cfg = dict(checkpoint="tiny", data="mem", family="spiritlm", k=5, ks=(1, 5), n_boot=20)
    utts = random_utterances(4)
    out = tmp_path / "run"
    m = run_dataset(
        model, utts, out, LensRunConfig(**cfg, prior_manifest=str(path)), progress=False
    )
    records = [
        UtteranceRecord.from_json(json.loads(x))
        for x in (out / PARTIAL).read_text().splitlines()[1:]
    ]
    assert m.prior_source == str(path)
    for which, n in (("current", m.n_words), ("next", m.n_next_words)):
        words = [
            [
                set(t)
                for t in getattr(r, "target_ids" if which == "current" else "next_target_ids")[
                    "first"
                ]
                if t
            ]
            for r in records
        ]
        counts = fitted.counts["first"][which]
        for k in (1, 5):
            # the k most frequent training targets (one hit id per word on SentencePiece)
            assert all(len(t) == 1 for t in counts)
            top = {t[0] for t, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:k]}
            direct = sum(1 for ws in words for t in ws if t & top)
            got = (m.recall_prior_current if which == "current" else m.recall_prior_next)[k]
            assert got.mean == pytest.approx([direct / n] * (model.n_layers + 1))
    info = json.loads((out / "metrics.json").read_text())
    assert info["metrics"]["prior_source"] == str(path)
    assert info["provenance"]["settings"]["prior"].startswith("manifest sha256:")
    assert f"The priors are fit on: {path}" in (out / "report.html").read_text()
    # a run whose prior leaves each utterance out is not compared with it unless allowed
    loo = tmp_path / "loo"
    run_dataset(model, utts, loo, LensRunConfig(**cfg), progress=False)
    assert (
        json.loads((loo / "metrics.json").read_text())["metrics"]["prior_source"] == LEAVE_ONE_OUT
    )
    with pytest.raises(CompareError, match="prior"):
        compare_runs([out, loo])
    assert compare_runs([out, loo], allow=["prior"]).allowed["prior"][1] == LEAVE_ONE_OUT
