"""The demo on two shipped organisms and a few utterances: every section is built from real runs."""

import json
import re
import shutil
from pathlib import Path

import pytest

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
    summary = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert set(summary["organisms"]) == {"textinit_interleaved", "control_planted_l3"}
    # the planted signature: current-word Recall@5 of the control peaks at its planted row 3
    cur5 = summary["organisms"]["control_planted_l3"]["recall_current"]["5"]["mean"]
    assert max(range(1, len(cur5)), key=lambda i: cur5[i]) == 3
