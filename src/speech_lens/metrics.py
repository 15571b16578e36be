"""Word-level lens metrics as in the paper: Recall@k of the current / next word, modality mass.

One utterance's ``word_lens`` result becomes an :class:`UtteranceRecord` (plain JSON: what the
runner appends per utterance, so a run can resume). Records aggregate into
:class:`DatasetMetrics`: per-layer curves with bootstrap confidence intervals that resample
utterances (words of one utterance are not independent).

Word matching rules (``MATCH_RULES``), applied to the pooled, text-restricted ranking:
``first``: the word's first sub-token in its spaced (``" cat"``) or bare (``"cat"``) form, a hit
if either is in the top k [default]; ``first-spaced`` / ``first-bare``: only that form;
``any``: any sub-token of either form. Sub-tokens never start with a lone word-boundary piece
(``prompts.word_piece_ids``). SentencePiece families write the bare form with the dummy prefix,
so ``first`` has one candidate there and two on byte-level BPE: across them compare
``first-spaced``.

Ranks count ties against the target (``readout.TIE_RULE``). A spoken word with no unit position
is recorded (``UtteranceRecord.words_without_units``) and, by the ``zero_unit_words`` policy of
:func:`aggregate`, left out of Recall@k (``skip``) or scored as a miss (``miss``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from speech_lens.hooks import MASS_GROUPS
from speech_lens.lens.logit import DEFAULT_ZERO_UNIT_WORDS, ZERO_UNIT_WORDS, LensResult
from speech_lens.prompts import SPEECH, EncodedPrompt, WordTarget
from speech_lens.vocab import VocabLayout

MATCH_RULES = ("first", "first-spaced", "first-bare", "any")
DEFAULT_MATCH = "first"


def match_ids(target: WordTarget, rule: str = DEFAULT_MATCH) -> tuple[int, ...]:
    """The token ids that count as a hit for ``target`` under ``rule``."""
    if rule == "first":
        ids = [*target.spaced[:1], *target.bare[:1]]
    elif rule == "first-spaced":
        ids = list(target.spaced[:1])
    elif rule == "first-bare":
        ids = list(target.bare[:1])
    elif rule == "any":
        ids = [*target.spaced, *target.bare]
    else:
        raise ValueError(f"unknown match rule {rule!r}; one of {MATCH_RULES}")
    if not ids:
        raise ValueError(f"word {target.word!r} has no tokens under match rule {rule!r}")
    return tuple(dict.fromkeys(ids))


# ------------------------------------------------------------------------------------------------
# one utterance
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UtteranceRecord:
    """Everything the dataset metrics need from one utterance; JSON-serialisable.

    ``ranks[rule]["current" | "next"][j][row]``: pooled text rank of spoken word ``j`` under
    ``rule`` (0 = top-1; -1 for "next" of the utterance's last word). ``top_ids[j][row]``: the
    pooled top-k text ids. ``mass_sums[group][row]``: probability mass summed over the speech
    (unit) positions; ``unit_top1[row]``: how many of them have a speech unit as top-1 overall.
    ``words_without_units``: utterance word indices of spoken words with no unit position (not
    in ``words``); ``n_utterance_words``: the utterance's word count (which of them have a next
    word).
    """

    utterance_id: str
    n_layers: int
    words: list[str]
    word_index: list[int]
    next_words: list[str]
    ranks: dict[str, dict[str, list[list[int]]]]
    top_ids: list[list[list[int]]]
    mass_sums: dict[str, list[float]]
    unit_top1: list[int]
    n_speech_positions: int
    words_without_units: list[int] = field(default_factory=list)
    n_utterance_words: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UtteranceRecord:
        return cls(**d)

    def rank_array(self, rule: str, which: str) -> np.ndarray:
        """``[row, word]`` ranks (-1 = no target)."""
        r = self.ranks[rule][which]
        if not r:
            return np.zeros((self.n_layers + 1, 0), dtype=np.int64)
        return np.asarray(r, dtype=np.int64).T


def utterance_record(
    result: LensResult, prompt: EncodedPrompt, layout: VocabLayout
) -> UtteranceRecord:
    """Reduce a ``word_lens`` result on ``prompt`` to an :class:`UtteranceRecord`."""
    w = result.words
    if w is None:
        raise ValueError(
            f"utterance {prompt.utterance_id}: the lens result has no word readout (use word_lens)"
        )
    if result.layers is not None:
        raise ValueError(f"utterance {prompt.utterance_id}: the lens must read every layer")
    # only unit positions are read here, so a lens restricted to them (positions="speech") will do
    speech = prompt.positions_of(SPEECH)
    col = torch.searchsorted(result.positions, speech).clamp(max=len(result.positions) - 1)
    if not torch.equal(result.positions[col], speech):
        raise ValueError(f"utterance {prompt.utterance_id}: the lens must read every unit position")
    ranks: dict[str, dict[str, list[list[int]]]] = {}
    for rule in MATCH_RULES:
        cur = [w.rank_of(j, match_ids(t, rule)).tolist() for j, t in enumerate(w.current)]
        nxt = [
            w.rank_of(j, match_ids(t, rule)).tolist() if t is not None else [-1] * result.n_rows
            for j, t in enumerate(w.next)
        ]
        ranks[rule] = {"current": cur, "next": nxt}
    mass = result.mass[:, col]  # [row, n_speech, group]
    sums = {g: mass[..., i].double().sum(1).tolist() for i, g in enumerate(MASS_GROUPS)}
    top1 = result.topk_ids_all[:, col, 0]
    unit_top1 = layout.is_unit(top1).sum(1).tolist()
    return UtteranceRecord(
        utterance_id=prompt.utterance_id,
        n_layers=result.n_layers,
        words=list(w.words),
        word_index=list(w.word_index),
        next_words=[t.word if t is not None else "" for t in w.next],
        ranks=ranks,
        top_ids=[w.topk_ids[:, j].tolist() for j in range(len(w))],
        mass_sums=sums,
        unit_top1=[int(x) for x in unit_top1],
        n_speech_positions=int(speech.numel()),
        words_without_units=list(w.no_unit_words),
        n_utterance_words=len(prompt.words),
    )


def _check_policy(zero_unit_words: str) -> None:
    if zero_unit_words not in ZERO_UNIT_WORDS:
        raise ValueError(f"zero_unit_words={zero_unit_words!r}: one of {ZERO_UNIT_WORDS}")


def _scored_without_units(
    no_unit: Sequence[int], n_words: int, which: str, zero_unit_words: str
) -> int:
    """Words with no unit position that Recall@k counts (as misses): none under ``skip``."""
    if zero_unit_words != "miss":
        return 0
    return sum(1 for i in no_unit if which == "current" or i + 1 < n_words)


def word_recall(
    result: LensResult,
    k: int,
    *,
    match: str = DEFAULT_MATCH,
    which: str = "current",
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS,
) -> np.ndarray:
    """Recall@k per row for one ``word_lens`` result (NaN rows where there is no word).

    Words with no unit position are left out (``skip``) or count as misses (``miss``)."""
    _check_policy(zero_unit_words)
    w = result.words
    if w is None:
        raise ValueError("word_recall needs a word_lens result")
    targets = w.current if which == "current" else w.next
    cols = [w.rank_of(j, match_ids(t, match)).numpy() for j, t in enumerate(targets) if t]
    misses = _scored_without_units(w.no_unit_words, w.n_utterance_words, which, zero_unit_words)
    if not cols and not misses:
        return np.full(result.n_rows, np.nan)
    hits = (np.stack(cols, axis=1) < k).sum(axis=1) if cols else np.zeros(result.n_rows)
    return hits / (len(cols) + misses)


# ------------------------------------------------------------------------------------------------
# a data set
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """A per-layer statistic with its bootstrap confidence band."""

    mean: list[float]
    lo: list[float]
    hi: list[float]


@dataclass(frozen=True)
class DatasetMetrics:
    """Per-layer curves over a data set; ``match``, ``ks`` and bootstrap settings recorded."""

    label: str
    n_layers: int
    match: str
    ks: list[int]
    n_utterances: int
    n_words: int  # scored in Recall@k (under "miss" with the words that have no unit)
    n_next_words: int
    n_speech_positions: int
    recall_current: dict[int, Curve]
    recall_next: dict[int, Curve]
    mass: dict[str, Curve]
    unit_top1: Curve
    ci: float
    n_boot: int
    seed: int
    bootstrap_unit: str = "utterance"
    extra: dict[str, Any] = field(default_factory=dict)
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS  # the policy applied (see ZERO_UNIT_WORDS)
    n_words_without_units: int = 0  # spoken words with no unit position (skipped or missed)

    @property
    def layers(self) -> list[int]:
        return list(range(self.n_layers + 1))

    @property
    def relative_depth(self) -> list[float]:
        return [i / self.n_layers for i in self.layers]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall_current"] = {str(k): v for k, v in d["recall_current"].items()}
        d["recall_next"] = {str(k): v for k, v in d["recall_next"].items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetMetrics:
        d = dict(d)
        for key in ("recall_current", "recall_next"):
            d[key] = {int(k): Curve(**v) for k, v in d[key].items()}
        d["mass"] = {g: Curve(**v) for g, v in d["mass"].items()}
        d["unit_top1"] = Curve(**d["unit_top1"])
        return cls(**d)


def _ratio_curve(num: np.ndarray, den: np.ndarray, weights: np.ndarray, alpha: float) -> Curve:
    """Ratio of sums over utterances (``num [U, row]``, ``den [U]``) with a percentile CI.

    ``weights [B, U]`` are bootstrap multiplicities (how often each utterance was drawn).
    """
    total = den.sum()
    mean = num.sum(0) / total if total > 0 else np.full(num.shape[1], np.nan)
    bn = weights @ num  # [B, row]
    bd = weights @ den  # [B]
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = bn / bd[:, None]
    boot = boot[bd > 0]
    if len(boot) == 0:
        nan = [math.nan] * num.shape[1]
        return Curve(mean.tolist(), nan, nan)
    lo = np.quantile(boot, alpha / 2, axis=0)
    hi = np.quantile(boot, 1 - alpha / 2, axis=0)
    return Curve(mean.tolist(), lo.tolist(), hi.tolist())


def aggregate(
    records: Sequence[UtteranceRecord],
    *,
    match: str = DEFAULT_MATCH,
    ks: Sequence[int] = (1, 5, 10),
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    label: str = "",
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS,
) -> DatasetMetrics:
    """Per-layer Recall@k (current, next word) and modality mass with utterance-bootstrap CIs.

    Recall is hits over all words pooled (micro average); mass is averaged over all speech
    positions. Each bootstrap replicate redraws utterances with replacement (``seed``).
    Spoken words with no unit position are counted (``n_words_without_units``) and left out of
    Recall@k (``zero_unit_words="skip"``) or scored as misses, current and next word (``"miss"``).
    """
    if match not in MATCH_RULES:
        raise ValueError(f"unknown match rule {match!r}; one of {MATCH_RULES}")
    _check_policy(zero_unit_words)
    if not records:
        raise ValueError("aggregate: no utterance records")
    n_layers = records[0].n_layers
    for r in records:
        if r.n_layers != n_layers:
            raise ValueError(
                f"utterance {r.utterance_id}: {r.n_layers} layers, others have {n_layers}"
            )
    rows = n_layers + 1
    rng = np.random.default_rng(seed)
    u = len(records)
    weights = rng.multinomial(u, np.full(u, 1.0 / u), size=n_boot).astype(np.float64)
    alpha = 1.0 - ci

    def recall(which: str, k: int) -> tuple[Curve, int]:
        hits = np.zeros((u, rows))
        count = np.zeros(u)
        for i, r in enumerate(records):
            a = r.rank_array(match, which)  # [row, word]
            valid = a >= 0
            hits[i] = ((a < k) & valid).sum(1)
            count[i] = valid[0].sum() if a.shape[1] else 0
            n = r.n_utterance_words or len(r.words) + len(r.words_without_units)
            count[i] += _scored_without_units(r.words_without_units, n, which, zero_unit_words)
        return _ratio_curve(hits, count, weights, alpha), int(count.sum())

    rc: dict[int, Curve] = {}
    rn: dict[int, Curve] = {}
    n_words = n_next = 0
    for k in ks:
        rc[k], n_words = recall("current", int(k))
        rn[k], n_next = recall("next", int(k))
    npos = np.array([r.n_speech_positions for r in records], dtype=np.float64)
    mass = {
        g: _ratio_curve(
            np.array([r.mass_sums[g] for r in records], dtype=np.float64), npos, weights, alpha
        )
        for g in MASS_GROUPS
    }
    top1 = _ratio_curve(
        np.array([r.unit_top1 for r in records], dtype=np.float64), npos, weights, alpha
    )
    return DatasetMetrics(
        label=label,
        n_layers=n_layers,
        match=match,
        ks=[int(k) for k in ks],
        n_utterances=u,
        n_words=n_words,
        n_next_words=n_next,
        n_speech_positions=int(npos.sum()),
        recall_current=rc,
        recall_next=rn,
        mass=mass,
        unit_top1=top1,
        ci=ci,
        n_boot=n_boot,
        seed=seed,
        zero_unit_words=zero_unit_words,
        n_words_without_units=sum(len(r.words_without_units) for r in records),
    )


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


def layer_table(m: DatasetMetrics) -> list[dict[str, Any]]:
    """One row per lens row: recall@k (current / next) with CI, masses at speech positions."""
    rows = []
    for i in m.layers:
        row: dict[str, Any] = {
            "layer": i,
            "relative_depth": round(i / m.n_layers, 4),
            "match": m.match,
        }
        for k in m.ks:
            for name, curves in (("current", m.recall_current), ("next", m.recall_next)):
                c = curves[k]
                row[f"recall@{k}_{name}"] = c.mean[i]
                row[f"recall@{k}_{name}_lo"] = c.lo[i]
                row[f"recall@{k}_{name}_hi"] = c.hi[i]
        for g, c in m.mass.items():
            row[f"{g}_mass"] = c.mean[i]
        row["unit_top1"] = m.unit_top1.mean[i]
        rows.append(row)
    return rows


def word_table(
    records: Sequence[UtteranceRecord],
    *,
    match: str = DEFAULT_MATCH,
    tokenizer: Any = None,
    top: int = 5,
) -> list[dict[str, Any]]:
    """Drill-down rows (utterance, word, layer, ranks, top pooled text tokens)."""
    rows = []
    for r in records:
        cur = r.rank_array(match, "current")
        nxt = r.rank_array(match, "next")
        for j, word in enumerate(r.words):
            for layer in range(r.n_layers + 1):
                ids = r.top_ids[j][layer][:top]
                toks = (
                    tokenizer.convert_ids_to_tokens(ids)
                    if tokenizer is not None
                    else [str(i) for i in ids]
                )
                rows.append(
                    {
                        "utterance": r.utterance_id,
                        "word_index": r.word_index[j],
                        "word": word,
                        "next_word": r.next_words[j],
                        "layer": layer,
                        "match": match,
                        "rank_current": int(cur[layer, j]),
                        "rank_next": int(nxt[layer, j]),
                        "top_tokens": " | ".join(str(t) for t in toks),
                    }
                )
    return rows
