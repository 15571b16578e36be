"""The pre-registered reading (E1-E3) of layers.csv rows, on rows built to pass or fail each test."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from speech_lens.report import criteria


def row(layer: int, *, cur: float = 0.02, last: float | None = None, first: float = 0.02,
        nxt: float = 0.02, units: float = 0.01, half: float = 0.01) -> dict[str, float]:  # fmt: skip
    r = {"layer": float(layer), "unit_mass": units, "text_mass": 1.0 - units}
    vals = {
        "current": cur, "last_unit": cur if last is None else last, "first_unit": first,
        "next": nxt, "mismatched": 0.03, "current_prior": 0.12, "next_prior": 0.10,
    }  # fmt: skip
    for name, v in vals.items():
        r[f"recall@5_{name}"] = v
        r[f"recall@5_{name}_lo"] = v - half
        r[f"recall@5_{name}_hi"] = v + half
    return r


def model(**mid: float) -> list[dict[str, float]]:
    """Rows 0..6: embeddings (unit mass 1), five candidates, the output row (units win)."""
    rows = [row(0, units=1.0)] + [row(i) for i in range(1, 6)] + [row(6, units=0.9)]
    for i in (2, 3):
        rows[i] = row(i, **mid)
    return rows


def test_transcription_and_next_word_in_text_make_the_effect() -> None:
    rows = model(cur=0.40, nxt=0.30)
    got = criteria.reading(rows, model(cur=0.40, nxt=0.05))
    assert got.l_units == 6 and got.e1.rows == (2, 3) and got.e1.first_row == 2
    assert got.e1_kind == "transcription" and got.e2.holds and got.e3
    assert got.verdict == "shows the effect" and got.peak_row == 2


def test_the_scrambled_control_and_a_missing_control_block_e2() -> None:
    rows = model(cur=0.40, nxt=0.30)
    assert not criteria.reading(rows, model(cur=0.40, nxt=0.30)).e2.holds  # control as high
    got = criteria.reading(rows, None)
    assert not got.e2.holds and got.verdict == "partly"


def test_one_row_is_not_enough_and_first_unit_only_is_context() -> None:
    rows = model()
    rows[3] = row(3, cur=0.40)
    assert criteria.reading(rows).e1.rows == (3,) and criteria.reading(rows).verdict == "null"
    rows = model(cur=0.40, last=0.02, first=0.40)
    got = criteria.reading(rows)
    assert got.e1.holds and got.e1_kind == "current word from context"


def test_rows_at_or_after_units_overtake_do_not_count() -> None:
    rows = model(cur=0.40, nxt=0.30)
    rows[3] = row(3, cur=0.40, nxt=0.30, units=0.6)
    got = criteria.reading(rows, model())
    assert got.l_units == 3 and got.e1.rows == (2,) and got.verdict == "null"


def test_ci_overlap_with_the_prior_fails_and_rows_read_back_from_csv(tmp_path: Path) -> None:
    rows = model(cur=0.12, nxt=0.30, half=0.01)  # lower bound 0.11 < the prior's upper 0.13
    path = tmp_path / "layers.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["layer", "match", *rows[0].keys() - {"layer"}])
        w.writeheader()
        w.writerows({**r, "match": "first"} for r in rows)
    back = criteria.read_layers(path)
    assert back == rows and not criteria.reading(back).e1.holds
    with pytest.raises(ValueError, match="other rows"):
        criteria.reading(rows, rows[:-1])


def test_phases_can_come_from_another_lens() -> None:
    """A tuned lens's rows: unit mass high everywhere, so its own L_units is row 1; with the
    logit lens's phases the same recall passes."""
    tuned = [row(i, cur=0.40, units=0.9) for i in range(7)]
    assert criteria.reading(tuned).l_units == 1 and not criteria.reading(tuned).e1.holds
    got = criteria.reading(tuned, phases_from=model())
    assert got.l_units == 6 and got.e1.rows == (1, 2, 3, 4, 5) and got.e1_kind == "transcription"


def test_dose_response_is_read_only_with_every_registered_dose() -> None:
    every = [0.0, 0.0, 0.1, 0.2, 0.35, 0.5]  # seeds repeat a dose
    assert criteria.dose_verdict(every, lo=-0.8, hi=-0.2).startswith("confirmed")
    assert criteria.dose_verdict(every, lo=-0.3, hi=0.1) == "not confirmed (CI includes 0)"
    assert "opposite sign" in criteria.dose_verdict(every, lo=0.1, hi=0.6)
    assert criteria.dose_verdict([0.0, 0.1, 0.2], lo=-1, hi=-0.9).startswith("incomplete (3 of 5")
