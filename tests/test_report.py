"""The HTML report is self-contained; the lens runner writes its outputs and resumes."""

from __future__ import annotations

import csv
import json
import re

import plotly.graph_objects as go
import pytest

from speech_lens import write_manifest
from speech_lens.report.html import Report, Table
from speech_lens.runs.lens import PARTIAL, RunError, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.testing.families import random_utterances

SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=", re.IGNORECASE)
REMOTE = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//""", re.IGNORECASE)


def test_report_is_self_contained_and_escaped(tmp_path):
    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[0.1, 0.5, 0.2]))
    rep = Report("lens <test>", subtitle="tiny")
    rep.add_section("Curves", text="a < b\n\nsecond paragraph", figures=[fig, fig])
    rep.add_section(
        "Numbers", tables=[[{"layer": 0, "x": 0.123456}, {"layer": 1, "x": float("nan")}]]
    )
    rep.add_section("Capped", tables=[Table([{"i": i} for i in range(30)], max_rows=10)])
    out = rep.write(tmp_path / "r" / "report.html")
    html = out.read_text()
    assert not SCRIPT_SRC.search(html), "a script is loaded from elsewhere"
    # outside the inlined plotly.js (whose strings hold links), nothing points off the page
    assert not REMOTE.search(html.split("</head>")[1]), "a resource is fetched over the network"
    body = html.split("</head>")[1]
    assert "cdn.plot.ly" not in body and "mathjax" not in body.lower()
    assert len(html) > 3_000_000  # plotly.js itself is inlined
    assert html.count('class="plotly-graph-div"') == 2
    assert "lens &lt;test&gt;" in html and "a &lt; b" in html
    assert "<td>0.1235</td>" in html and "20 more rows not shown" in html
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left behind
    with pytest.raises(TypeError, match="plotly"):
        rep.add_section("bad", figures=["not a figure"])  # type: ignore[list-item]


def test_runner_outputs_and_resume(tmp_path, tiny_model):
    model = tiny_model("spiritlm")
    utts = random_utterances(3)
    cfg = LensRunConfig(checkpoint="tiny", data="mem", family="spiritlm", k=5, ks=(1, 5), n_boot=50)
    out = tmp_path / "run"
    computed: list[str] = []

    def crash_after_first(rec):
        computed.append(rec.utterance_id)
        if len(computed) == 1:
            raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        run_dataset(model, utts, out, cfg, progress=False, on_record=crash_after_first)
    assert len((out / PARTIAL).read_text().splitlines()) == 2  # header + the finished utterance
    # a crash in the middle of the next append leaves a torn line; it is dropped and redone
    with (out / PARTIAL).open("a") as f:
        f.write('{"utterance_id": "u1", "n_la')
    m = run_dataset(
        model, utts, out, cfg, progress=False, on_record=lambda r: computed.append(r.utterance_id)
    )
    assert computed == ["u0", "u1", "u2"]  # u0 was not recomputed
    assert m.n_utterances == 3 and m.n_words == 3 + 4 + 3
    info = json.loads((out / "metrics.json").read_text())
    assert info["config"]["match"] == "first" and info["metrics"]["match"] == "first"
    with (out / "words.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == m.n_words * (model.n_layers + 1)
    assert {r["utterance"] for r in rows} == {"u0", "u1", "u2"} and rows[0]["match"] == "first"
    with (out / "layers.csv").open() as f:
        layers = list(csv.DictReader(f))
    assert len(layers) == model.n_layers + 1
    # the mismatched-word baseline goes end to end: metrics.json, layers.csv, the recall figure
    assert sorted(info["metrics"]["recall_mismatched"]) == ["1", "5"]
    base = [float(r["recall@5_mismatched"]) for r in layers]
    assert base == pytest.approx(m.recall_mismatched[5].mean)
    html = (out / "report.html").read_text()
    assert not SCRIPT_SRC.search(html) and "One utterance: u0" in html
    assert "current word R@5 (mismatched-word baseline)" in html
    # so do the confounds: first / last-unit recall and the frequency priors (recounted from the
    # records in tests/test_confounds.py)
    for name, curves in (
        ("first_unit", m.recall_first_unit),
        ("last_unit", m.recall_last_unit),
        ("current_prior", m.recall_prior_current),
        ("next_prior", m.recall_prior_next),
    ):
        assert [float(r[f"recall@5_{name}"]) for r in layers] == pytest.approx(curves[5].mean)
        assert [float(r[f"recall@1_{name}_hi"]) for r in layers] == pytest.approx(curves[1].hi)
    for trace in ("first unit only", "last unit only", "frequency prior"):
        assert f"current word R@5 ({trace})" in html
    assert "next word R@5 (frequency prior)" in html
    # a finished run reruns with another matching rule without computing anything
    again = LensRunConfig(**{**cfg.__dict__, "match": "any"})
    m2 = run_dataset(
        model, utts, out, again, progress=False, on_record=lambda r: computed.append("!")
    )
    assert "!" not in computed and m2.match == "any"
    # other settings that change the records are refused, naming the file
    with pytest.raises(RunError, match="partial.jsonl"):
        run_dataset(model, utts, out, LensRunConfig(**{**cfg.__dict__, "k": 3}), progress=False)


def test_cli_lens_end_to_end(tmp_path, tiny_checkpoint, capsys):
    from speech_lens.cli.main import main

    path, kw = tiny_checkpoint("speechgpt")
    data = tmp_path / "data.jsonl"
    write_manifest(data, random_utterances(2, rate=50.0))  # SpeechGPT's mHuBERT rate
    out = tmp_path / "out"
    assert kw == {}  # the family is detected
    head = ["lens", str(path), str(data), "--out", str(out), "--no-progress", "--n-boot", "20"]
    argv = [*head, "--k", "3", "--match", "first-bare"]
    assert main(argv) == 0
    assert "Recall@3" in capsys.readouterr().out
    for name in ("report.html", "metrics.json", "layers.csv", "words.csv", PARTIAL):
        assert (out / name).is_file()
    assert json.loads((out / "metrics.json").read_text())["metrics"]["ks"] == [1, 3, 5]
    assert main([*head, "--match", "last"]) == 2  # an unknown rule: a clear error, no traceback
    assert "match rule 'last'" in capsys.readouterr().err


@pytest.mark.parametrize("batch_size", ["1", "3", "auto"])
def test_resumed_cli_lens_run_writes_the_uninterrupted_outputs(
    tmp_path, tiny_checkpoint, monkeypatch, batch_size
):
    """`speech-lens lens` killed after two records and rerun writes byte-identical metrics.json,
    words.csv and layers.csv to an uninterrupted run's (and the same records)."""
    import speech_lens.runs.lens as rl
    from speech_lens.cli.main import main

    path, _ = tiny_checkpoint("spiritlm")
    data = tmp_path / "data.jsonl"
    write_manifest(data, random_utterances(5, seed=4))
    args = ["lens", str(path), str(data), "--no-progress", "--n-boot", "50", "--k", "3"]
    args += ["--batch-size", batch_size, "--memory-budget", "1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main([*args, "--out", str(full)]) == 0
    real = rl.utterance_record
    made: list[str] = []

    def killed_at_third(res, prompt, layout):
        made.append(prompt.utterance_id)
        if len(made) == 3:
            raise KeyboardInterrupt
        return real(res, prompt, layout)

    monkeypatch.setattr(rl, "utterance_record", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(resumed)])
    assert len((resumed / PARTIAL).read_text().splitlines()) == 1 + 2  # header + 2 records
    assert not (resumed / "metrics.json").exists()
    monkeypatch.setattr(rl, "utterance_record", real)
    assert main([*args, "--out", str(resumed)]) == 0
    for name in ("metrics.json", "words.csv", "layers.csv"):
        assert (resumed / name).read_bytes() == (full / name).read_bytes(), name

    def records(d):
        return sorted((resumed if d else full).joinpath(PARTIAL).read_text().splitlines())

    assert records(True) == records(False)
