"""`speech-lens compare`: refuses runs whose settings differ, plots models on relative depth."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from speech_lens import load_model, write_manifest
from speech_lens.runs.compare import CompareError, compare_runs, load_run
from speech_lens.runs.lens import run_dataset
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.testing.families import build_family, random_utterances


def _run(model, data: Path, out: Path, k: int = 5, match: str = "first-spaced") -> Path:
    cfg = LensRunConfig(
        checkpoint=str(model.path),
        data=str(data),
        family=model.spec.name,
        k=k,
        match=match,
        ks=tuple(sorted({1, k})),
        n_boot=20,
    )
    run_dataset(model, random_utterances(3), out, cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_checkpoint, tmp_path_factory):
    """spiritlm (2 layers) and a 3-layer SIMS-Qwen on the same manifest, under the cross-family
    rule first-spaced; one more at k=3; both again under the rule first."""
    root = tmp_path_factory.mktemp("cmp")
    data = root / "data.jsonl"
    write_manifest(data, random_utterances(3))
    spirit = tiny_model("spiritlm")
    tiny_checkpoint("sims-qwen")  # the shared base tokenizer is built there
    path, kw = build_family("sims-qwen", root / "deep", num_hidden_layers=3)
    qwen = load_model(path, **kw)
    assert (spirit.n_layers, qwen.n_layers) == (2, 3)
    return {
        "spirit": _run(spirit, data, root / "spirit"),
        "qwen": _run(qwen, data, root / "qwen"),
        "qwen_k3": _run(qwen, data, root / "qwen_k3", k=3),
        "spirit_first": _run(spirit, data, root / "spirit_first", match="first"),
        "qwen_first": _run(qwen, data, root / "qwen_first", match="first"),
    }


def test_compare_writes_relative_depth_table_and_band_figures(runs, tmp_path):
    out = tmp_path / "cmp"
    cmp = compare_runs([runs["spirit"], runs["qwen"]], out=out)
    assert [r.label for r in cmp.runs] == ["spiritlm", "sims-qwen"]
    assert cmp.allowed == {}
    assert cmp.fields["k"] == [5, 5] and cmp.fields["match"] == ["first-spaced"] * 2
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    for label, n in (("spiritlm", 2), ("sims-qwen", 3)):
        mine = [r for r in rows if r["model"] == label]
        assert [int(r["layer"]) for r in mine] == list(range(n + 1))
        assert [float(r["relative_depth"]) for r in mine] == [i / n for i in range(n + 1)]
        run = next(r for r in cmp.runs if r.label == label)
        curve = run.metrics.recall_current[5]
        assert [float(r["recall_current_lo"]) for r in mine] == pytest.approx(curve.lo)
        assert [float(r["unit_mass"]) for r in mine] == pytest.approx(run.metrics.mass["unit"].mean)
        # the baselines and the first / last-unit recall: columns with bands, from metrics.json
        for col, curves in (
            ("recall_current_mismatched", run.metrics.recall_mismatched),
            ("recall_current_prior", run.metrics.recall_prior_current),
            ("recall_next_prior", run.metrics.recall_prior_next),
            ("recall_first_unit", run.metrics.recall_first_unit),
            ("recall_last_unit", run.metrics.recall_last_unit),
        ):
            for part, values in (("", curves[5].mean), ("_hi", curves[5].hi)):
                assert [float(r[col + part]) for r in mine] == pytest.approx(values), col
    fig = cmp.figures["recall_current"]
    bands = [t for t in fig.data if t.fill == "tonexty"]
    lines = [t for t in fig.data if t.showlegend is not False]
    # each run: its curve, the mismatched-word baseline and the frequency prior, in its colour
    assert len(bands) == 6 and [t.name for t in lines] == [
        f"{run} {what}".strip()
        for run in ("spiritlm", "sims-qwen")
        for what in ("", "(mismatched-word baseline)", "(frequency prior)")
    ]
    assert lines[0].line.color == lines[1].line.color == lines[2].line.color
    assert [list(t.x) for t in lines[::3]] == [[0, 0.5, 1], [0, 1 / 3, 2 / 3, 1]]
    assert list(lines[3].y) == cmp.runs[1].metrics.recall_current[5].mean
    assert list(lines[5].y) == cmp.runs[1].metrics.recall_prior_current[5].mean
    assert len(set(lines[5].y)) == 1  # the prior reads no layer: flat
    nxt = [t.name for t in cmp.figures["recall_next"].data if t.showlegend is not False]
    assert nxt == [
        "spiritlm",
        "spiritlm (frequency prior)",
        "sims-qwen",
        "sims-qwen (frequency prior)",
    ]
    assert set(cmp.figures) >= {
        "recall_current",
        "recall_next",
        "recall_first_unit",
        "recall_last_unit",
        "unit_mass",
    }
    info = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in info["runs"]] == ["spiritlm", "sims-qwen"]
    shas = {r["provenance"]["model"]["sha256"] for r in info["runs"]}
    assert len(shas) == 2 and info["allowed_differences"] == {}
    assert info["compared"]["k"] == 5 and info["compared"]["data"] is not None
    html = (out / "compare.html").read_text()
    assert "relative depth" in html and "Provenance" in html


def test_compare_refuses_a_differing_k_unless_allowed(runs, tmp_path):
    pair = [runs["spirit"], runs["qwen_k3"]]
    with pytest.raises(CompareError) as err:
        compare_runs(pair, out=tmp_path / "no")
    msg = str(err.value)
    assert "k: 5 (" in msg and "3 (" in msg and str(runs["qwen_k3"]) in msg
    assert "ks:" in msg and "--allow k,ks" in msg
    assert not (tmp_path / "no").exists()
    with pytest.raises(CompareError, match="ks"):
        compare_runs(pair, allow=["k"])  # every differing field must be named
    with pytest.raises(CompareError, match="unknown field"):
        compare_runs(pair, allow=["k", "ks", "kk"])
    cmp = compare_runs(pair, allow=["k", "ks"], out=tmp_path / "yes")
    assert cmp.allowed == {"k": [5, 3], "ks": [[1, 5], [1, 3]]}
    assert [r.k for r in cmp.runs] == [5, 3]
    names = [t.name for t in cmp.figures["recall_current"].data if t.showlegend is not False]
    assert names[::3] == ["spiritlm (@5)", "sims-qwen (@3)"]
    assert names[2] == "spiritlm (@5) (frequency prior)"
    info = json.loads((tmp_path / "yes" / "compare.json").read_text())
    assert info["allowed_differences"]["k"] == {"spiritlm": 5, "sims-qwen": 3}


def test_cross_family_runs_compare_under_first_spaced_only(runs, tmp_path):
    pair = [runs["spirit_first"], runs["qwen_first"]]
    provs = [load_run(d)[0]["model"]["bare_form_is_spaced"] for d in pair]
    assert provs == [True, False]  # SentencePiece dummy prefix vs byte-level BPE
    with pytest.raises(CompareError) as err:
        compare_runs(pair, out=tmp_path / "no")
    msg = str(err.value)
    assert "bare form = spaced form" in msg and "bare form separate" in msg
    assert "--match first-spaced" in msg and "--allow match" in msg
    assert not (tmp_path / "no").exists()
    cmp = compare_runs(pair, allow=["match"])
    assert cmp.allowed == {"match": ["first", "first"]}
    # rules that differ between the runs are refused as any other setting is
    with pytest.raises(CompareError, match=r"match: 'first-spaced' \(.*'first' \("):
        compare_runs([runs["spirit"], runs["qwen_first"]])
    # one tokenizer kind: first compares (two SentencePiece runs, one of an older speech_lens)
    old = tmp_path / "old"
    shutil.copytree(runs["spirit_first"], old)
    info = json.loads((old / "metrics.json").read_text())
    del info["provenance"]["model"]["bare_form_is_spaced"]
    (old / "metrics.json").write_text(json.dumps(info))
    assert compare_runs([runs["spirit_first"], old]).allowed == {}
    with pytest.raises(CompareError, match="family spiritlm"):
        compare_runs([old, runs["qwen_first"]])


def test_versions_and_old_runs(runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs["qwen"], old)
    info = json.loads((old / "metrics.json").read_text())
    info["provenance"]["versions"]["torch"] = "1.0"
    (old / "metrics.json").write_text(json.dumps(info))
    with pytest.raises(CompareError, match=r"versions\.torch: '[^']+' \(.*'1\.0'"):
        compare_runs([runs["spirit"], old])
    assert compare_runs([runs["spirit"], old], allow=["versions"]).allowed["versions.torch"]
    del info["provenance"]
    (old / "metrics.json").write_text(json.dumps(info))
    with pytest.raises(CompareError, match="no provenance.*older speech_lens"):
        load_run(old)
    with pytest.raises(CompareError, match="no metrics.json"):
        load_run(tmp_path)
    with pytest.raises(CompareError, match="at least two"):
        compare_runs([runs["spirit"]])


def test_cli_compare(runs, tmp_path, capsys):
    from speech_lens.cli.main import main

    out = tmp_path / "c"
    assert main(["compare", str(runs["spirit"]), str(runs["qwen"]), "--out", str(out)]) == 0
    assert "compared 2 runs" in capsys.readouterr().out
    for name in ("compare.html", "compare.csv", "compare.json"):
        assert (out / name).is_file()
    argv = ["compare", str(runs["spirit"]), str(runs["qwen_k3"]), "--out", str(out)]
    assert main(argv) == 2
    assert "--allow k,ks" in capsys.readouterr().err
    assert main([*argv, "--allow", "k", "--allow", "ks"]) == 0
    assert main([*argv, "--allow", "k,ks"]) == 0
    assert "allowed differences: k, ks" in capsys.readouterr().out
