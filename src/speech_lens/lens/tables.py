"""Lens metric tables: one row per lens row (layer_table) and per word x layer (word_table)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from speech_lens.lens.metrics import Curve, DatasetMetrics
from speech_lens.lens.records import DEFAULT_MATCH, UtteranceRecord


def baseline_curves(m: DatasetMetrics) -> list[tuple[str, dict[int, Curve]]]:
    """The curves beside Recall@k by their layers.csv names (``recall@{k}_{name}``): the
    mismatched-word baseline, first / last-unit recall, the current / next-word frequency prior."""
    return [
        ("mismatched", m.recall_mismatched),
        ("first_unit", m.recall_first_unit),
        ("last_unit", m.recall_last_unit),
        ("current_prior", m.recall_prior_current),
        ("next_prior", m.recall_prior_next),
    ]


def layer_table(m: DatasetMetrics) -> list[dict[str, Any]]:
    """One row per lens row: recall@k (current / next; the mismatched-word baseline, first /
    last-unit recall and the frequency priors where computed) with CI, masses at speech
    positions."""
    rows = []
    # i: index into the curves; layer: the row's true lens row (a selection skips some)
    for i, layer in enumerate(m.layers):
        row: dict[str, Any] = {
            "layer": layer,
            "relative_depth": round(layer / m.n_layers, 4),
            "match": m.match,
        }
        for k in m.ks:
            for name, curves in (("current", m.recall_current), ("next", m.recall_next)):
                c = curves[k]
                row[f"recall@{k}_{name}"] = c.mean[i]
                row[f"recall@{k}_{name}_lo"] = c.lo[i]
                row[f"recall@{k}_{name}_hi"] = c.hi[i]
            for name, curves in baseline_curves(m):  # absent from older metrics
                if k in curves:
                    c = curves[k]
                    row[f"recall@{k}_{name}"] = c.mean[i]
                    row[f"recall@{k}_{name}_lo"] = c.lo[i]
                    row[f"recall@{k}_{name}_hi"] = c.hi[i]
        for g, c in m.mass.items():
            row[f"{g}_mass"] = c.mean[i]
        row["unit_top1"] = m.unit_top1.mean[i]
        for name, c in m.curves.items():
            row[name] = c.mean[i]
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
            for i, layer in enumerate(r.row_layers):
                ids = r.top_ids[j][i][:top]
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
                        "rank_current": int(cur[i, j]),
                        "rank_next": int(nxt[i, j]),
                        "top_tokens": " | ".join(str(t) for t in toks),
                    }
                )
    return rows
