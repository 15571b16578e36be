"""The README's measured tables are what the committed artifacts give (scripts/readme_tables.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "readme_tables", REPO / "scripts" / "readme_tables.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readmes_match_committed_artifacts(capsys):
    tables = _load_script()
    code = tables.main(["--check"])
    assert code == 0, capsys.readouterr().out[-4000:]


@pytest.fixture
def repo_copy(tmp_path: Path, monkeypatch):
    """The READMEs and their artifacts in a temporary tree, the script pointed at it."""
    tables = _load_script()
    minisims = ("gates_v2.json", "delta.safetensors", "lens_v2/layers.csv", "lens_v2/metrics.json")
    for rel in (
        "README.md",
        "organisms/README.md",
        "organisms/results.json",
        *(f"organisms/minisims/{f}" for f in (*minisims, "lens_v2_scrambled/layers.csv")),
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    shutil.copytree(REPO / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    # the U0 grid's tables read results.json, each organism's layers.csv and words.csv.gz
    skip = shutil.ignore_patterns("*.jsonl", "params.pt", "metrics.json")
    shutil.copytree(REPO / "organisms" / "u0", tmp_path / "organisms" / "u0", ignore=skip)
    for cfg in REPO.glob("organisms/*/tuned_lens/config.json"):
        dest = tmp_path / cfg.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg, dest)
    monkeypatch.setattr(tables, "REPO", tmp_path)
    monkeypatch.setattr(tables, "RESULTS", tmp_path / "organisms" / "results.json")
    monkeypatch.setattr(tables, "BENCH", tmp_path / "benchmarks" / "results")
    return tables, tmp_path


def test_check_fails_when_an_artifact_changes_and_write_repairs_it(repo_copy, capsys):
    tables, root = repo_copy
    assert tables.main(["--check"]) == 0
    path = root / "benchmarks" / "results" / "lens_routes.json"
    doc = json.loads(path.read_text())
    doc["rows"][0]["ratios"]["lens/forward"]["median"] = 9.99
    path.write_text(json.dumps(doc))
    res = root / "organisms" / "results.json"
    doc = json.loads(res.read_text())
    doc["frequency_baseline"]["cur@1"] = 0.5
    res.write_text(json.dumps(doc))
    gates = root / "organisms" / "minisims" / "gates_v2.json"
    doc = json.loads(gates.read_text())
    doc["tokens_500000"]["next_word_after_speech_prefix@1"] = 0.777  # the shipped delta's gate
    gates.write_text(json.dumps(doc))
    capsys.readouterr()
    assert tables.main(["--check"]) == 1
    diff = capsys.readouterr().out
    assert "9.99x" in diff and "cur@1 0.500" in diff and "spoken prefix top-1 0.777" in diff
    assert "9.99x" not in (root / "README.md").read_text()  # --check writes nothing
    assert tables.main([]) == 0
    assert "9.99x" in (root / "README.md").read_text()
    assert "cur@1 0.500" in (root / "organisms" / "README.md").read_text()
    assert tables.main(["--check"]) == 0


def test_a_ratio_below_the_flop_floor_is_marked_as_a_measurement_error(repo_copy):
    tables, root = repo_copy
    path = root / "benchmarks" / "results" / "lens_routes.json"
    doc = json.loads(path.read_text())
    row = doc["rows"][0]["ratios"]["naive/forward"]
    row.update(median=row["flop_floor"] - 0.1, median_below_floor=True)
    path.write_text(json.dumps(doc))
    table = tables.lens_routes()
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {doc['rows'][0]['label']}"))
    assert "below the FLOP floor, a measurement error" in line


def test_missing_block_markers_are_refused(repo_copy):
    tables, root = repo_copy
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("<!-- /readme_tables:lens_routes -->", ""))
    with pytest.raises(SystemExit, match="readme_tables:lens_routes"):
        tables.main(["--check"])
