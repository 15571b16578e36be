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

Beside each Recall@k curve (issue 17 §1): the mismatched-word baseline (``lens/mismatch.py``), the
frequency prior of the current and the next word (``lens/prior.py``) and current-word Recall@k
read at each word's first / last unit alone (``lens/unit_edges.py``), over the same words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from speech_lens.lens.mismatch import has_targets, mismatched_hits, stored_k
from speech_lens.lens.prior import LEAVE_ONE_OUT, FittedPrior, has_prior_targets, prior_hits
from speech_lens.lens.records import (
    DEFAULT_MATCH,
    MATCH_RULES,
    UtteranceRecord,
    match_ids,
)
from speech_lens.lens.registry import LENS_METRICS, MASS_METRICS
from speech_lens.lens.results import LensResult
from speech_lens.lens.unit_edges import edge_hits
from speech_lens.options import DEFAULT_ZERO_UNIT_WORDS, ZERO_UNIT_WORDS

# ------------------------------------------------------------------------------------------------
# one utterance
# ------------------------------------------------------------------------------------------------


def check_policy(zero_unit_words: str) -> None:
    if zero_unit_words not in ZERO_UNIT_WORDS:
        raise ValueError(f"zero_unit_words={zero_unit_words!r}: one of {ZERO_UNIT_WORDS}")


def scored_without_units(
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
    check_policy(zero_unit_words)
    w = result.words
    if w is None:
        raise ValueError("word_recall needs a word_lens result")
    targets = w.current if which == "current" else w.next
    cols = [w.rank_of(j, match_ids(t, match)).numpy() for j, t in enumerate(targets) if t]
    misses = scored_without_units(w.no_unit_words, w.n_utterance_words, which, zero_unit_words)
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
    """Per-layer curves over a data set; ``match``, ``ks`` and bootstrap settings recorded.

    ``layers``: the lens row (true index, 0 = embeddings, ``n_layers`` = output) of each curve
    entry; every row unless the run read a selection (``lens/rows.py``)."""

    label: str
    n_layers: int
    layers: list[int] = field(default_factory=list, kw_only=True)
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
    # registered (non-built-in) speech-position metrics by name (lens/registry.py)
    curves: dict[str, Curve] = field(default_factory=dict)
    # current-word Recall@k against a random other word's target (lens/mismatch.py): the chance
    # level of the same top-k; empty for records without target ids or k beyond the stored top-k
    recall_mismatched: dict[int, Curve] = field(default_factory=dict)
    # confounds (issue 17 §1), empty for records written before them: current-word Recall@k read
    # at each word's first / last unit position alone (lens/unit_edges.py), and the frequency
    # prior of current / next-word Recall@k, flat over rows (lens/prior.py)
    recall_first_unit: dict[int, Curve] = field(default_factory=dict)
    recall_last_unit: dict[int, Curve] = field(default_factory=dict)
    recall_prior_current: dict[int, Curve] = field(default_factory=dict)
    recall_prior_next: dict[int, Curve] = field(default_factory=dict)
    prior_source: str = ""  # what the priors are fit on: LEAVE_ONE_OUT or a training manifest

    def __post_init__(self) -> None:
        if not self.layers:  # every row: metrics written before layer selection, or a full run
            object.__setattr__(self, "layers", list(range(self.n_layers + 1)))

    @property
    def relative_depth(self) -> list[float]:
        return [i / self.n_layers for i in self.layers]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall_current"] = {str(k): v for k, v in d["recall_current"].items()}
        d["recall_next"] = {str(k): v for k, v in d["recall_next"].items()}
        if not d["curves"]:
            del d["curves"]  # metrics.json without registered metrics is unchanged
        for key in BASELINES:  # keyed by k; absent (not empty) where not computed
            d[key] = {str(k): v for k, v in d[key].items()}
            if not d[key]:
                del d[key]
        if not d["prior_source"]:
            del d["prior_source"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetMetrics:
        d = dict(d)
        for key in ("recall_current", "recall_next"):
            d[key] = {int(k): Curve(**v) for k, v in d[key].items()}
        d["mass"] = {g: Curve(**v) for g, v in d["mass"].items()}
        d["unit_top1"] = Curve(**d["unit_top1"])
        d["curves"] = {name: Curve(**v) for name, v in d.get("curves", {}).items()}
        for key in BASELINES:
            d[key] = {int(k): Curve(**v) for k, v in d.get(key, {}).items()}
        return cls(**d)


# Recall@k curves beside the recall itself, keyed by k, written to metrics.json only when computed
BASELINES = (
    "recall_mismatched",
    "recall_first_unit",
    "recall_last_unit",
    "recall_prior_current",
    "recall_prior_next",
)


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
    prior: FittedPrior | None = None,
) -> DatasetMetrics:
    """Per-layer Recall@k (current, next word) and modality mass with utterance-bootstrap CIs.

    Recall is hits over all words pooled (micro average); mass is averaged over all speech
    positions. Each bootstrap replicate redraws utterances with replacement (``seed``).
    Spoken words with no unit position are counted (``n_words_without_units``) and left out of
    Recall@k (``zero_unit_words="skip"``) or scored as misses, current and next word (``"miss"``).
    The mismatched-word baseline (``recall_mismatched``, ``lens/mismatch.py``) scores each word's
    stored top-k against another word's target (draw seeded by ``seed``), over the same words;
    ``confound_curves`` adds the first / last-unit recall and the frequency priors (fit on the
    other utterances, or on the word counts of a training manifest: ``prior``).
    """
    if match not in MATCH_RULES:
        raise ValueError(f"unknown match rule {match!r}; one of {MATCH_RULES}")
    check_policy(zero_unit_words)
    if not records:
        raise ValueError("aggregate: no utterance records")
    n_layers, rows = records[0].n_layers, records[0].row_layers
    for r in records:
        if r.n_layers != n_layers:
            raise ValueError(
                f"utterance {r.utterance_id}: {r.n_layers} layers, others have {n_layers}"
            )
        if r.row_layers != rows:
            raise ValueError(
                f"utterance {r.utterance_id}: lens rows {r.row_layers}, others have {rows}"
            )
    rng = np.random.default_rng(seed)
    u = len(records)
    weights = rng.multinomial(u, np.full(u, 1.0 / u), size=n_boot).astype(np.float64)
    alpha = 1.0 - ci
    rc: dict[int, Curve] = {}
    rn: dict[int, Curve] = {}
    n_words = n_next = 0
    for k in ks:
        rc[k], n_words = recall_curve(
            records, match, "current", int(k), weights, alpha, zero_unit_words
        )
        rn[k], n_next = recall_curve(
            records, match, "next", int(k), weights, alpha, zero_unit_words
        )
    mismatched = mismatched_curves(records, match, ks, seed, weights, alpha, zero_unit_words)
    confounds = confound_curves(records, match, ks, weights, alpha, zero_unit_words, prior)
    prior_source = prior.source if prior is not None else LEAVE_ONE_OUT
    npos = np.array([r.n_speech_positions for r in records], dtype=np.float64)
    mass, top1, curves = position_curves(records, npos, weights, alpha)
    return DatasetMetrics(
        label=label,
        n_layers=n_layers,
        layers=rows,
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
        curves=curves,
        recall_mismatched=mismatched,
        recall_first_unit=confounds.get("recall_first_unit", {}),
        recall_last_unit=confounds.get("recall_last_unit", {}),
        recall_prior_current=confounds.get("recall_prior_current", {}),
        recall_prior_next=confounds.get("recall_prior_next", {}),
        prior_source=prior_source if "recall_prior_current" in confounds else "",
    )


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


def recall_curve(
    records: Sequence[UtteranceRecord],
    match: str,
    which: str,
    k: int,
    weights: np.ndarray,
    alpha: float,
    zero_unit_words: str = DEFAULT_ZERO_UNIT_WORDS,
) -> tuple[Curve, int]:
    """Recall@k of the ``which`` word (hits over all words pooled) and the number of words
    scored (with the words that have no unit position under ``"miss"``)."""
    u, rows = len(records), len(records[0].row_layers)
    hits = np.zeros((u, rows))
    for i, r in enumerate(records):
        a = r.rank_array(match, which)  # [row, word]
        hits[i] = ((a < k) & (a >= 0)).sum(1)
    count = scored_words(records, match, which, zero_unit_words)
    return _ratio_curve(hits, count, weights, alpha), int(count.sum())


def scored_words(
    records: Sequence[UtteranceRecord], match: str, which: str, zero_unit_words: str
) -> np.ndarray:
    """Per utterance, the words Recall@k of the ``which`` word scores (its denominator)."""
    count = np.zeros(len(records))
    for i, r in enumerate(records):
        a = r.rank_array(match, which)
        count[i] = (a[0] >= 0).sum() if a.shape[1] else 0
        n = r.n_utterance_words or len(r.words) + len(r.words_without_units)
        count[i] += scored_without_units(r.words_without_units, n, which, zero_unit_words)
    return count


def mismatched_curves(
    records: Sequence[UtteranceRecord],
    match: str,
    ks: Sequence[int],
    seed: int,
    weights: np.ndarray,
    alpha: float,
    zero_unit_words: str,
) -> dict[int, Curve]:
    """The mismatched-word baseline per k over the words current-word Recall@k scores (none
    for records without target ids, i.e. written before it)."""
    if not has_targets(records, match) or len({w for r in records for w in r.words}) < 2:
        return {}
    count = scored_words(records, match, "current", zero_unit_words)
    hits = mismatched_hits(records, match, ks, seed)
    return {k: _ratio_curve(h, count, weights, alpha) for k, h in hits.items()}


def confound_curves(
    records: Sequence[UtteranceRecord],
    match: str,
    ks: Sequence[int],
    weights: np.ndarray,
    alpha: float,
    zero_unit_words: str,
    prior: FittedPrior | None = None,
) -> dict[str, dict[int, Curve]]:
    """``recall_first_unit`` / ``recall_last_unit`` (each k up to the stored top-k) and
    ``recall_prior_current`` / ``recall_prior_next``, over the words (and denominators) of the
    recall they accompany; none from records written before them."""
    out: dict[str, dict[int, Curve]] = {}
    if all(match in r.unit_ranks for r in records):
        count = scored_words(records, match, "current", zero_unit_words)
        scorable = [int(k) for k in ks if k <= stored_k(records)]
        for edge in ("first", "last"):
            ranks = [r.unit_ranks[match][edge] for r in records]
            hits = edge_hits(ranks, len(records[0].unit_top1), scorable)  # rows held
            out[f"recall_{edge}_unit"] = {
                k: _ratio_curve(h, count, weights, alpha) for k, h in hits.items()
            }
    for which in ("current", "next"):
        if has_prior_targets(records, match, which):
            den = scored_words(records, match, which, zero_unit_words)
            hits = prior_hits(records, match, which, ks, prior)
            out[f"recall_prior_{which}"] = {
                k: _ratio_curve(h, den, weights, alpha) for k, h in hits.items()
            }
    return out


def position_curves(
    records: Sequence[UtteranceRecord], npos: np.ndarray, weights: np.ndarray, alpha: float
) -> tuple[dict[str, Curve], Curve, dict[str, Curve]]:
    """Every registered speech-position metric averaged over all speech positions: (group
    masses, unit top-1, other metrics held by every record)."""

    def curve(sums: list[Any]) -> Curve:
        return _ratio_curve(np.array(sums, dtype=np.float64), npos, weights, alpha)

    mass = {g: curve([r.mass_sums[g] for r in records]) for g in MASS_METRICS.values()}
    top1 = curve([r.unit_top1 for r in records])
    curves = {
        name: curve([r.position_sums[name] for r in records])
        for name in LENS_METRICS
        if all(name in r.position_sums for r in records)
    }
    return mass, top1, curves
