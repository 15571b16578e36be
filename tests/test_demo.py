"""The demo on two shipped organisms and a few utterances: every section is built from real runs."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

ORGS = Path(__file__).parents[1] / "organisms"


@pytest.fixture(scope="module")
def small_organisms(tmp_path_factory):
    if not (ORGS / "results.json").exists():
        pytest.fail("organisms/ is missing from the repository")
    root = tmp_path_factory.mktemp("orgs")
    for name in ("textinit_interleaved", "control_planted_l3"):
        shutil.copytree(ORGS / name, root / name)
    for f in ("results.json", "test_manifest.jsonl"):
        shutil.copy(ORGS / f, root / f)
    return root


def test_demo_report(small_organisms, tmp_path):
    from speech_lens.runs.demo import run_demo

    path = run_demo(
        tmp_path / "out", organisms=small_organisms, limit=25, patch_utterances=2, progress=False
    )
    html = path.read_text()
    for title in (
        "Positive control: control_planted_l3 (planted at layer 3)",
        "Tuned lens vs logit lens",
        "Causal patching: text residual into the speech run",
        "Layer x position: textinit_interleaved",
        "Spoken knowledge",
    ):
        assert title in html, title
    assert not re.search(r"<script[^>]+src=\"https?://", html)  # self-contained, no CDN
    # the control is planted through the lens's own readout: the text says what it validates
    assert "lm_head(final_norm(h_3)), the very readout the logit lens computes" in html
    assert "validates the plumbing" in html and "not the lens&#x27;s sensitivity" in html
    summary = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert summary["torch_threads"] == torch.get_num_threads()
    # each summary column names its source and size: lens recomputed on --limit utterances,
    # gates and knowledge read from results.json (its held-out set and fact count)
    results = json.loads((small_organisms / "results.json").read_text())
    n_test = results["corpus"]["test"]["utterances"]
    n_facts = results["organisms"]["control_planted_l3"]["knowledge"]["n_facts"]
    assert (n_test, n_facts) == (300, 48)
    columns = list(summary["table"][0])
    assert all(list(row) == columns for row in summary["table"])
    assert columns == [
        "organism",
        "role",
        "cur@1 peak (layer) [recomputed: 25 utt.]",
        "cur@5 peak (layer) [recomputed: 25 utt.]",
        "next@5 peak (layer) [recomputed: 25 utt.]",
        "units overtake text at layer [recomputed: 25 utt.]",
        "next word after speech / text prefix [results.json: 300 utt.]",
        "transcription acc [results.json: 300 utt.]",
        "spoken knowledge acc [results.json: 48 facts]",
    ]
    for column in columns[2:]:
        assert html.count(column) >= 1, column
    assert set(summary["organisms"]) == {"textinit_interleaved", "control_planted_l3"}
    # the planted signature: current-word Recall@5 of the control peaks at its planted row 3
    cur5 = summary["organisms"]["control_planted_l3"]["recall_current"]["5"]["mean"]
    assert max(range(1, len(cur5)), key=lambda i: cur5[i]) == 3
