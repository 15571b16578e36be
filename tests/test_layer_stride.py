"""Lens layer selection (``--layer-stride`` / ``--layers``): a strided run reads exactly the full
run's rows at the selected indices, never unembeds the others, keeps true layer indices in every
output, and refuses bad selections and resumes under another selection."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from random_lens import random_tuned
from speech_lens import layer_stride, load_model, write_manifest
from speech_lens._tl import final_norm_and_unembed
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.logit import word_lens
from speech_lens.lens.metrics import aggregate
from speech_lens.lens.records import UtteranceRecord, utterance_record
from speech_lens.lens.rows import check_layers, parse_layers, selected_rows
from speech_lens.report.lens import lens_heatmap, modality_figure, recall_figure
from speech_lens.runs.compare import compare_runs
from speech_lens.runs.lens import PARTIAL, RunError, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.testing.families import build_family, random_utterances

N_LAYERS = 7  # 8 lens rows: stride 3 reads 0, 3, 6 and the output row 7, off the stride's grid
STRIDE3 = (0, 3, 6, 7)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 7-layer SpiritLM-format model (random weights) and its checkpoint path."""
    root = tmp_path_factory.mktemp("deep")
    path, kw = build_family("spiritlm", root, num_hidden_layers=N_LAYERS)
    model = load_model(path, **kw)
    assert model.n_layers == N_LAYERS
    return path, kw, model


# ------------------------------------------------------------------------------------------------
# choosing rows
# ------------------------------------------------------------------------------------------------


def test_layer_stride_always_holds_row_0_and_the_output_row():
    assert layer_stride(31, 1) == tuple(range(31))
    assert layer_stride(31, 3) == tuple(range(0, 31, 3))  # 30 is on the grid
    assert layer_stride(31, 4) == (0, 4, 8, 12, 16, 20, 24, 28, 30)  # 30 is not: added
    assert layer_stride(31, 5) == (0, 5, 10, 15, 20, 25, 30)
    assert layer_stride(8, 3) == STRIDE3
    assert layer_stride(8, 100) == (0, 7)
    assert layer_stride(1, 3) == (0,)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="--layer-stride"):
            layer_stride(31, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no lens rows"),
        ("0,3,8", r"rows \[8\] are out of range.*0\.\.7"),
        ("-1,7", r"rows \[-1\] are out of range"),
        ("0,6,3,7", "strictly increasing"),
        ("0,3,3,7", "strictly increasing"),
        ("0,3,6", "must include the output row 7"),
        ("0,x,7", "'x' is not a lens row"),
        ("0,5-3,7", "range 5-3 runs backwards"),
    ],
)
def test_bad_layer_lists_are_refused_naming_the_option(text, message):
    with pytest.raises(ValueError, match=message) as err:
        selected_rows(8, layers=text)
    assert str(err.value).startswith("--layers")


def test_layer_lists_and_ranges():
    assert parse_layers("0, 2,4-6 ,7") == (0, 2, 4, 5, 6, 7)
    assert selected_rows(8, layers="0,2,4-7") == (0, 2, 4, 5, 6, 7)
    assert selected_rows(8, layers="0-7") is None  # every row: the default run
    assert selected_rows(8, stride=1) is None and selected_rows(8) is None
    assert selected_rows(8, stride=3) == STRIDE3
    with pytest.raises(ValueError, match="--layer-stride and --layers"):
        selected_rows(8, stride=3, layers="0,7")
    assert check_layers([0, 7], 8) == (0, 7)
    with pytest.raises(ValueError, match="--layers"):
        LensRunConfig(checkpoint="c", data="d", family="spiritlm", layers=(3, 0))


# ------------------------------------------------------------------------------------------------
# the lens itself
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tuned", [False, True])
def test_strided_word_lens_equals_the_full_rows(deep, tuned):
    """The selected rows are the full run's rows (same forward, same per-row readout: equal);
    the unembedding runs once per selected row, never for the others."""
    _, _, model = deep
    lens = random_tuned(model) if tuned else None
    _, unembed = final_norm_and_unembed(model.bridge)
    calls: list[int] = []
    handle = unembed.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[-2])))
    try:
        for u in random_utterances(2, seed=4):
            p, t = encode_prompt(model, u, mode="speech"), word_targets(model, u)
            calls.clear()
            full = word_lens(model, p, t, k=5, lens=lens, positions="speech")
            n_full = len(calls)
            calls.clear()
            sub = word_lens(model, p, t, k=5, lens=lens, positions="speech", layers=STRIDE3)
            # the model's own forward unembeds once (the output row reads those logits); the
            # lens adds one unembedding per other row read (positions fit one chunk here)
            assert (n_full, len(calls)) == (N_LAYERS + 1, len(STRIDE3))
            _check_rows(full, sub, list(STRIDE3))
    finally:
        handle.remove()


def _check_rows(full, sub, rows: list[int]) -> None:
    assert sub.layers == tuple(rows) and sub.row_layers == tuple(rows)
    assert sub.layer_labels == ["embed", "3", "6", "output"]
    for name in ("topk_ids", "topk_ids_all"):
        assert torch.equal(getattr(sub, name), getattr(full, name)[rows]), name
    for name in ("topk_logprobs", "topk_logprobs_all", "mass"):
        torch.testing.assert_close(getattr(sub, name), getattr(full, name)[rows], rtol=0, atol=0)
    ws, wf = sub.words, full.words
    assert ws is not None and wf is not None
    assert torch.equal(ws.topk_ids, wf.topk_ids[rows])
    assert torch.equal(ws.cand_ranks, wf.cand_ranks[rows])
    torch.testing.assert_close(ws.cand_logits, wf.cand_logits[rows], rtol=0, atol=0)


def test_records_state_their_rows_and_aggregate_keeps_true_indices(deep):
    _, _, model = deep
    utts = random_utterances(3, seed=6)
    full, sub = [], []
    for u in utts:
        p, t = encode_prompt(model, u, mode="speech"), word_targets(model, u)
        full.append(utterance_record(word_lens(model, p, t, k=5), p, model.layout))
        sub.append(utterance_record(word_lens(model, p, t, k=5, layers=STRIDE3), p, model.layout))
    rows = list(STRIDE3)
    for f, s in zip(full, sub, strict=True):
        assert (f.layers, s.layers) == (list(range(N_LAYERS + 1)), rows)
        assert s.top_ids == [[per_word[i] for i in rows] for per_word in f.top_ids]
        assert s.mass_sums == {g: [v[i] for i in rows] for g, v in f.mass_sums.items()}
        assert s.unit_top1 == [f.unit_top1[i] for i in rows]
        assert UtteranceRecord.from_json(s.to_json()) == s
    mf, ms = aggregate(full, n_boot=50), aggregate(sub, n_boot=50)
    assert (mf.layers, ms.layers) == (list(range(N_LAYERS + 1)), rows)
    assert ms.relative_depth == [0, 3 / 7, 6 / 7, 1]
    # the same words and bootstrap draws: every curve is the full one at the rows read
    for k in (1, 5, 10):
        for a, b in ((ms.recall_current[k], mf.recall_current[k]),
                     (ms.recall_next[k], mf.recall_next[k])):  # fmt: skip
            assert (a.mean, a.lo, a.hi) == tuple([c[i] for i in rows] for c in (b.mean, b.lo, b.hi))
    assert ms.recall_mismatched[5].mean == [mf.recall_mismatched[5].mean[i] for i in rows]
    assert ms.mass["unit"].mean == [mf.mass["unit"].mean[i] for i in rows]
    # old records (no "layers") read as every row; records of other rows are not pooled
    old = {k: v for k, v in full[0].to_json().items() if k != "layers"}
    assert UtteranceRecord.from_json(old).row_layers == list(range(N_LAYERS + 1))
    with pytest.raises(ValueError, match=r"lens rows \[0, 3, 6, 7\], others have"):
        aggregate([full[0], sub[1]], n_boot=5)


# ------------------------------------------------------------------------------------------------
# runs, outputs, figures, compare
# ------------------------------------------------------------------------------------------------


def _cfg(path, **kw) -> LensRunConfig:
    return LensRunConfig(
        checkpoint=str(path), data="mem", family="spiritlm", k=5, ks=(1, 5), n_boot=30, **kw
    )


def _table(path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_strided_run_outputs_are_the_full_runs_rows(deep, tmp_path):
    path, _, model = deep
    utts = random_utterances(3, seed=2)
    mf = run_dataset(model, utts, tmp_path / "full", _cfg(path), progress=False)
    ms = run_dataset(model, utts, tmp_path / "s3", _cfg(path, layers=STRIDE3), progress=False)
    assert ms.layers == list(STRIDE3) and mf.layers == list(range(N_LAYERS + 1))
    full, sub = _table(tmp_path / "full" / "layers.csv"), _table(tmp_path / "s3" / "layers.csv")
    assert [r["layer"] for r in sub] == ["0", "3", "6", "7"]
    assert [float(r["relative_depth"]) for r in sub] == [round(i / 7, 4) for i in STRIDE3]
    assert sub == [full[i] for i in STRIDE3]  # every column: recall, bands, masses
    words = _table(tmp_path / "s3" / "words.csv")
    full_words = _table(tmp_path / "full" / "words.csv")
    assert words == [w for w in full_words if int(w["layer"]) in STRIDE3]
    info = json.loads((tmp_path / "s3" / "metrics.json").read_text())
    assert info["metrics"]["layers"] == list(STRIDE3)
    assert info["provenance"]["settings"]["layers"] == list(STRIDE3)
    assert info["config"]["layers"] == list(STRIDE3)
    records = (tmp_path / "s3" / PARTIAL).read_text().splitlines()
    assert json.loads(records[0])["header"]["layers"] == list(STRIDE3)
    assert all(json.loads(r)["layers"] == list(STRIDE3) for r in records[1:])
    html = (tmp_path / "s3" / "report.html").read_text()
    assert "lens rows read: 4 of 8 rows: 0, 3, 6, 7" in html
    # figures: x = true layer index (or index / n_layers), one point per row read
    for fig in (recall_figure(ms), modality_figure(ms)):
        lines = [t for t in fig.data if t.showlegend is not False]
        assert lines and all(list(t.x) == [0.0, 3.0, 6.0, 7.0] for t in lines)
    lines = [t for t in recall_figure(ms, relative_depth=True).data if t.showlegend is not False]
    assert list(lines[0].x) == [0, 3 / 7, 6 / 7, 1]
    p = encode_prompt(model, utts[0], mode="speech")
    heat = lens_heatmap(
        word_lens(model, p, word_targets(model, utts[0]), layers=STRIDE3), model.tokenizer
    )
    assert list(heat.data[0].y) == ["embed", "3", "6", "output"]
    # compare lines a strided run up with a full one on relative depth (no refusal)
    cmp = compare_runs([tmp_path / "full", tmp_path / "s3"], out=tmp_path / "cmp")
    rows = _table(tmp_path / "cmp" / "compare.csv")
    full_rows = [r for r in rows if r["model"] == cmp.runs[0].label]
    mine = [r for r in rows if r["model"] == cmp.runs[1].label]
    assert [int(r["layer"]) for r in mine] == list(STRIDE3)
    assert [float(r["relative_depth"]) for r in mine] == [i / 7 for i in STRIDE3]
    drop = ("model",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in mine] == [
        {k: v for k, v in full_rows[i].items() if k not in drop} for i in STRIDE3
    ]
    assert "layers" not in cmp.fields  # recorded, not compared


def test_cli_layer_stride_resume_and_bad_selections(deep, tmp_path, capsys):
    from speech_lens.cli.main import main

    path, _, _ = deep
    data = tmp_path / "data.jsonl"
    write_manifest(data, random_utterances(3, seed=3))
    out = tmp_path / "run"
    argv = ["lens", str(path), str(data), "--out", str(out), "--k", "5", "--n-boot", "5"]
    argv += ["--no-progress", "--family", "spiritlm"]
    assert main([*argv, "--layer-stride", "3"]) == 0
    assert "peaks at layer" in capsys.readouterr().out
    info = json.loads((out / "metrics.json").read_text())
    assert info["metrics"]["layers"] == list(STRIDE3)
    # a resume with another selection would mix rows: refused, naming the differing setting
    for other in (["--layer-stride", "2"], [], ["--layers", "0,7"]):
        assert main([*argv, *other]) == 2, other
        err = capsys.readouterr().err
        assert "other settings" in err and "differing: layers" in err, err
    # the same rows, however written, resume (nothing is recomputed: the records stay)
    before = (out / PARTIAL).read_text()
    assert main([*argv, "--layers", "0,3,6,7"]) == 0
    assert (out / PARTIAL).read_text() == before
    assert main([*argv, "--restart"]) == 0  # every row, from scratch
    assert json.loads((out / "metrics.json").read_text())["metrics"]["layers"] == list(range(8))
    for bad, message in (
        (["--layers", "0,3,9"], "--layers 0,3,9: rows [9] are out of range"),
        (["--layers", "3,0,7"], "--layers 3,0,7: rows must be strictly increasing"),
        (["--layers", "0,3"], "must include the output row 7"),
        (["--layers", ","], "--layers (empty): no lens rows"),
        (["--layer-stride", "0"], "--layer-stride 0: a positive integer"),
    ):
        assert main([*argv, "--out", str(tmp_path / "bad"), *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--layer-stride", "3", "--layers", "0,7"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_selection_that_does_not_fit_the_model_is_refused_before_any_work(deep, tmp_path):
    path, _, model = deep
    cfg = _cfg(path, layers=(0, 3, 9))  # rows of a deeper model
    with pytest.raises(ValueError, match=r"--layers 0,3,9: rows \[9\] are out of range"):
        run_dataset(model, random_utterances(2), tmp_path / "x", cfg, progress=False)
    assert not (tmp_path / "x").exists()
    utts, out = random_utterances(2), tmp_path / "y"
    run_dataset(model, utts, out, _cfg(path, layers=STRIDE3), progress=False)
    with pytest.raises(RunError, match="differing: layers"):
        run_dataset(model, utts, out, _cfg(path), progress=False)


def test_lens_kl_at_a_stride_is_the_full_kl_at_those_rows(deep):
    from speech_lens import lens_kl
    from speech_lens.lens.train_data import held_out_table
    from speech_lens.report.tuned import kl_figure

    _, _, model = deep
    tuned = random_tuned(model)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, model.layout.vocab_size, (n,), generator=g) for n in (9, 14, 6)]
    _, unembed = final_norm_and_unembed(model.bridge)
    calls: list[int] = []
    handle = unembed.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        for lens in (None, tuned):
            calls.clear()
            full = lens_kl(model, lens, seqs, batch_size=8)
            n_full = len(calls)
            calls.clear()
            sub = lens_kl(model, lens, seqs, batch_size=8, layers=STRIDE3)
            # one batch: the final distribution, then one readout per block row read
            assert (n_full, len(calls)) == (1 + N_LAYERS, 1 + len(STRIDE3) - 1)
            assert full.shape == (N_LAYERS + 1,) and sub.shape == (len(STRIDE3),)
            torch.testing.assert_close(sub, full[list(STRIDE3)], rtol=0, atol=0)
            assert float(sub[-1]) == 0.0 and bool((sub[:-1] > 0).all())
    finally:
        handle.remove()
    fig = kl_figure(sub, sub, layers=STRIDE3)
    assert all(list(t.x) == list(STRIDE3) for t in fig.data)
    table = held_out_table(sub, sub, layers=STRIDE3).splitlines()
    assert [int(line.split()[0]) for line in table[1:]] == list(STRIDE3)
    for bad in ([3, 0], [], [0, 8]):
        with pytest.raises(ValueError, match="layers"):
            lens_kl(model, None, seqs, layers=bad)


def test_sharded_runner_reads_the_selected_rows_and_refuses_other_shards(deep, tmp_path):
    from speech_lens.runs.distributed import DistContext, merge_shards, run_distributed

    path, _, model = deep
    utts, cfg = random_utterances(3, seed=7), _cfg(path, layers=STRIDE3)
    # rank 1 of 2 writes its shard; the one-rank rerun does the rest and merges
    assert (
        run_distributed(model, utts, tmp_path / "d", cfg, DistContext(1, 2), progress=False) is None
    )
    m = run_distributed(model, utts, tmp_path / "d", cfg, progress=False)
    assert m is not None and m.layers == list(STRIDE3)
    run_dataset(model, utts, tmp_path / "one", cfg, progress=False)
    for name in ("layers.csv", "words.csv", PARTIAL):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    with pytest.raises(RunError, match="written with other settings"):
        merge_shards(model, utts, tmp_path / "d", _cfg(path))
