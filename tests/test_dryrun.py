"""--dry-run: a plan with memory and a calibrated time estimate, and nothing written."""

import time

import torch

from speech_lens.cli.dryrun import calibrate
from speech_lens.cli.main import main
from speech_lens.data.manifest import write_manifest
from speech_lens.data.utterance import Utterance, Word

WORDS = "the cat sat on a mat and then it ran off to see dog".split()


def _manifest(model, path, n: int = 5):
    rate = model.layout.units.frame_rate
    g = torch.Generator().manual_seed(3)
    utts = []
    for j in range(n):
        picks = torch.randint(0, len(WORDS), (4,), generator=g).tolist()
        words = tuple(Word(WORDS[p], k * 0.2, (k + 1) * 0.2) for k, p in enumerate(picks))
        units = torch.randint(0, 100, (round(0.8 * rate),), generator=g).tolist()
        utts.append(Utterance(f"u{j}", words, tuple(units), None, rate))
    write_manifest(path, utts)
    return path


def test_calibrate_skips_the_warm_up_and_averages():
    calls = []

    def work(seconds: float) -> None:
        calls.append(seconds)
        time.sleep(seconds)

    per, n = calibrate(work, [0.3, 0.02, 0.04, 0.5], n=2)
    assert n == 2 and calls == [0.3, 0.02, 0.04]  # warm-up first, then n items, no more
    assert 0.03 <= per < 0.2
    assert calibrate(work, [], n=2) == (0.0, 0)
    per1, n1 = calibrate(work, [0.05], n=2)
    assert n1 == 1 and per1 >= 0.05


def test_lens_patch_and_tuned_dry_runs_write_nothing(tiny_checkpoint, tiny_model, tmp_path, capsys):
    path, _ = tiny_checkpoint("spiritlm")
    data = _manifest(tiny_model("spiritlm"), tmp_path / "utts.jsonl")
    for argv, title in [
        (["lens", str(path), str(data), "--out", str(tmp_path / "lens")], "lens"),
        (
            ["patch", str(path), str(data), "--out", str(tmp_path / "patch"), "--layers", "0,1"],
            "patch",
        ),
        (
            [
                "tuned-lens",
                "train",
                str(path),
                str(data),
                "--out",
                str(tmp_path / "tl"),
                "--steps",
                "40",
            ],
            "tuned-lens train",
        ),
    ]:
        assert main([*argv, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"dry run: speech-lens {title}" in out
        assert "memory: weights" in out and "estimated time:" in out
        assert not any(p.name in ("lens", "patch", "tl") for p in tmp_path.iterdir())
    assert "training  40 steps x 65536 tokens" in out  # the given steps, TrainConfig's default
    assert "training: 40 step(s)" in out


def test_lens_dry_run_counts_finished_utterances(tiny_checkpoint, tiny_model, tmp_path, capsys):
    path, _ = tiny_checkpoint("spiritlm")
    data = _manifest(tiny_model("spiritlm"), tmp_path / "utts.jsonl")
    out = tmp_path / "run"
    assert (
        main(
            [
                "lens",
                str(path),
                str(data),
                "--out",
                str(out),
                "--limit",
                "2",
                "--n-boot",
                "10",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    assert main(["lens", str(path), str(data), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "5 utterances, 2 already in" in text and "word lens: 3 utterance(s)" in text
    assert sorted(p.name for p in out.iterdir()) == before
    argv = ["lens", str(path), str(data), "--out", str(out), "--batch-size", "2", "--dry-run"]
    assert main(argv) == 0
    assert "batches         2 (batch size 2: up to 2 utterances)" in capsys.readouterr().out


def test_demo_dry_run(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(["demo", "--out", str(out), "--limit", "6", "--patch-utterances", "2", "--dry-run"])
        == 0
    )
    text = capsys.readouterr().out
    assert "dry run: speech-lens demo" in text and "organisms" in text
    assert "lens: " in text and "patching: " in text and "estimated time:" in text
    assert f"torch threads: {torch.get_num_threads()} " in text
    assert "mini-SIMS" in text and "not in this estimate" in text  # the plan says what it omits
    assert not out.exists()


def test_distributed_dry_runs_plan_one_rank(tiny_checkpoint, tiny_model, tmp_path, capsys):
    from speech_lens.cli.distributed import main as dist_main

    path, _ = tiny_checkpoint("spiritlm")
    data = _manifest(tiny_model("spiritlm"), tmp_path / "utts.jsonl")
    base = [str(path), str(data), "--out", str(tmp_path / "d"), "--dry-run", "--world", "2"]
    assert dist_main(["lens", *base]) == 0
    text = capsys.readouterr().out
    assert "dry run: speech-lens distributed lens" in text and "ranks           2" in text
    assert "word lens per rank: 3 utterance(s)" in text  # 5 utterances over 2 ranks
    assert dist_main(["tuned-lens", *base, "--steps", "7"]) == 0
    text = capsys.readouterr().out
    assert "distributed tuned-lens" in text and "training: 7 step(s)" in text
    assert not (tmp_path / "d").exists()


def test_lens_dry_run_refuses_a_run_dir_with_other_settings(
    tiny_checkpoint, tiny_model, tmp_path, capsys
):
    path, _ = tiny_checkpoint("spiritlm")
    data = _manifest(tiny_model("spiritlm"), tmp_path / "utts.jsonl")
    out = tmp_path / "run"
    argv = ["lens", str(path), str(data), "--out", str(out)]
    assert main([*argv, "--limit", "1", "--n-boot", "10", "--no-progress"]) == 0
    before = (out / "partial.jsonl").read_bytes()
    assert main([*argv, "--k", "5", "--dry-run"]) == 2  # the run itself would refuse too
    assert "other settings" in capsys.readouterr().err
    assert (out / "partial.jsonl").read_bytes() == before
