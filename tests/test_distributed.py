"""Sharded lens runs: torchrun (2 gloo ranks) equals one process; a killed rank resumes with no
duplicate or lost utterance; merge refusals; input limits; NaN guards; bf16 readout."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speech_lens import Utterance, Word, load_model, write_manifest
from speech_lens.guards import NumericError, guarded_hook_names
from speech_lens.lens.logit import logit_lens
from speech_lens.runs.distributed import (
    FAIL_ENV,
    DistContext,
    InputError,
    check_inputs,
    merge_shards,
    run_distributed,
    shard_of,
)
from speech_lens.runs.lens import PARTIAL, RunError, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig
from speech_lens.runs.shards import SHARDS, ShardStore, read_finished
from speech_lens.testing.families import random_utterances

OUTPUTS = ("metrics.json", "layers.csv", "words.csv", PARTIAL)
N_UTT = 5


def _cfg(path: Path, data: Path, **kw: object) -> LensRunConfig:
    # what `python -m speech_lens.distributed lens ... --k 5 --n-boot 20` builds
    base = dict(
        checkpoint=str(path.resolve()),
        data=str(data.resolve()),
        family="spiritlm",
        k=5,
        ks=(1, 5),
        n_boot=20,
    )
    return LensRunConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The torchrun workers run one thread each (OMP_NUM_THREADS=1 below); the reference and the
    in-process runs do too, so the byte-equality checks compare one float computation whatever
    thread count the suite runs under."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_checkpoint, tiny_model):
    """The single-process run (run_lens.run_dataset) on a small manifest."""
    path, kw = tiny_checkpoint("spiritlm")
    assert kw == {}
    root = tmp_path_factory.mktemp("dist")
    data = root / "data.jsonl"
    write_manifest(data, random_utterances(N_UTT))
    ref = root / "ref"
    run_dataset(
        tiny_model("spiritlm"), random_utterances(N_UTT), ref, _cfg(path, data), progress=False
    )
    return path, data, ref


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(path: Path, data: Path, out: Path, *, fail: str | None = None) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAIL_ENV, None)
    if fail is not None:
        env[FAIL_ENV] = fail
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),  # tests may run side by side
        "-m",
        "speech_lens.distributed",
        "lens",
        str(path),
        str(data),
        "--out",
        str(out),
        "--k",
        "5",
        "--n-boot",
        "20",
        "--no-progress",
        "--backend",
        "gloo",
    ]
    # own session: on a timeout the launcher and both workers are killed together
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if fail is None and proc.returncode != 0:
        print(log.decode(errors="replace")[-4000:])
    return proc.returncode


def _assert_same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["metrics"] == mb["metrics"] and ma["metrics"]["n_utterances"] == N_UTT
    assert (b / "report.html").stat().st_size > 100_000


def _done(out: Path, rank: int) -> dict:
    return json.loads((out / SHARDS / f"rank-{rank}.done.json").read_text())


def test_torchrun_two_gloo_ranks_equal_single_process(reference, tmp_path):
    path, data, ref = reference
    out = tmp_path / "out"
    assert _torchrun(path, data, out) == 0
    # rank r took utterances i % 2 == r
    assert _done(out, 0)["ids"] == ["u0", "u2", "u4"] and _done(out, 1)["ids"] == ["u1", "u3"]
    _assert_same_outputs(ref, out)


def test_killed_rank_resumes_without_duplicates_or_losses(reference, tmp_path):
    path, data, ref = reference
    out = tmp_path / "out"
    # rank 1 dies abruptly (os._exit) after its first utterance; torchrun stops the job
    assert _torchrun(path, data, out, fail="1:1") != 0
    assert _done(out, 1)["ids"] == ["u1"]
    assert not (out / "metrics.json").exists()
    # and, as if it had died mid-write, half a record after its last commit
    shard1 = out / SHARDS / "rank-1.jsonl"
    committed1 = shard1.read_bytes()
    with shard1.open("a") as f:
        f.write('{"utterance_id": "u3", "n_lay')
    before0 = (out / SHARDS / "rank-0.jsonl").read_bytes() if (out / SHARDS).exists() else b""
    assert _torchrun(path, data, out) == 0
    after1 = shard1.read_bytes()
    assert after1.startswith(committed1) and after1.count(b"\n") == 2  # u1 kept, torn line gone
    assert _done(out, 1)["ids"] == ["u1", "u3"]
    # rank 0's finished utterances were not recomputed (its shard only grew)
    assert (out / SHARDS / "rank-0.jsonl").read_bytes().startswith(before0)
    ids = [json.loads(ln).get("utterance_id") for ln in (out / PARTIAL).read_text().splitlines()]
    assert ids[1:] == [f"u{i}" for i in range(N_UTT)]  # each once, in manifest order
    _assert_same_outputs(ref, out)


def test_in_process_shards_resume_across_world_sizes_and_merge(reference, tiny_model, tmp_path):
    path, data, ref = reference
    model = tiny_model("spiritlm")
    utts, cfg, out = random_utterances(N_UTT), _cfg(path, data), tmp_path / "out"
    assert shard_of(list(range(7)), 1, 3) == [1, 4]
    # rank 1 of a 2-rank job (no process group: barriers are no-ops) does its share only
    assert run_distributed(model, utts, out, cfg, DistContext(1, 2), progress=False) is None
    assert sorted(read_finished(out, cfg)) == ["u1", "u3"]
    with pytest.raises(RunError, match="3 of 5 utterances not finished"):
        merge_shards(model, utts, out, cfg)
    # a 1-rank rerun does the rest and merges: the same files as the single-process run
    m = run_distributed(model, utts, out, cfg, progress=False)
    assert m is not None and m.n_utterances == N_UTT
    assert _done(out, 0)["ids"] == ["u0", "u2", "u4"]
    _assert_same_outputs(ref, out)
    # a record committed twice (a shard copied by hand) is refused, naming both shards
    rec = read_finished(out, cfg)["u2"]
    ShardStore(out, 7, cfg).append(rec)
    with pytest.raises(RunError, match="'u2' is committed twice: in rank-0.jsonl and rank-7"):
        merge_shards(model, utts, out, cfg)
    (out / SHARDS / "rank-7.jsonl").unlink()
    (out / SHARDS / "rank-7.done.json").unlink()
    # ids that are not in the data set, and shards of other settings, are refused
    with pytest.raises(RunError, match="not in .*the data changed"):
        merge_shards(model, utts[:4], out, cfg)
    with pytest.raises(RunError, match="rank-0.done.json was written with other settings"):
        merge_shards(model, utts, out, _cfg(path, data, family="speechgpt"))
    # --restart discards the shards
    m2 = run_distributed(model, utts[:2], out, _cfg(path, data), restart=True, progress=False)
    assert m2 is not None and m2.n_utterances == 2 and _done(out, 0)["ids"] == ["u0", "u1"]


def test_input_limits_are_refused_naming_the_utterance(tiny_model, tmp_path):
    model = tiny_model("spiritlm")
    cfg = _cfg(Path("ck"), Path("data.jsonl"))
    utts = random_utterances(3)
    with pytest.raises(InputError, match="empty data set"):
        run_distributed(model, [], tmp_path / "a", cfg, progress=False)
    with pytest.raises(InputError, match="'u1' appears twice"):
        check_inputs(model, [*utts, utts[1]], cfg)
    mixed = [*utts, *random_utterances(1, rate=50.0, prefix="sgpt")]
    with pytest.raises(InputError, match="'sgpt0' has units at 50 Hz but 'u0' at 25 Hz"):
        check_inputs(model, mixed, cfg)
    check_inputs(
        model, [*utts, *random_utterances(1, rate=24.99, prefix="x")], cfg
    )  # same tokenizer
    n_ctx = int(model.bridge.cfg.n_ctx)
    # alternating units never deduplicate: about one token per frame, past the context
    frames = n_ctx + 40
    units = tuple(int(u) for u in (torch.arange(frames) % 2) * 7 + 3)
    long = Utterance(
        id="long",
        words=(Word("cat", 0.0, frames / 25.0),),
        units=units,
        durations=None,
        frame_rate=25.0,
    )
    with pytest.raises(InputError, match=rf"'long' encodes to \d+ tokens .* context is {n_ctx}"):
        run_distributed(model, [*utts, long], tmp_path / "b", cfg, progress=False)
    assert not (tmp_path / "b").exists()  # refused before any work


def test_nan_guard_names_layer_and_utterance(tiny_checkpoint, tmp_path):
    path, kw = tiny_checkpoint("spiritlm")
    model = load_model(path, **kw)  # a private copy: we poison it
    names = guarded_hook_names(model.n_layers)
    assert names[0] == "hook_embed" and names[-1] == "hook_unembed" and len(names) == 2 * 2 + 2
    utts = random_utterances(2)
    cfg = _cfg(path, tmp_path / "d.jsonl")
    down = model.hf_model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        down[3, 5] = float("nan")
    with pytest.raises(NumericError, match=r"utterance u0: non-finite .* blocks\.1\.mlp\.hook_out"):
        run_distributed(model, utts, tmp_path / "o", cfg, progress=False)
    # without the guard the NaN flows silently into the lens
    res = logit_lens(model, [1, 5, 9, 14])
    assert torch.isnan(res.topk_logprobs[-1]).all()
    with torch.no_grad():
        down[3, 5] = float("inf")
    with pytest.raises(NumericError, match=r"blocks\.1\.mlp\.hook_out \(\d+ NaN, \d+ inf"):
        run_distributed(model, utts, tmp_path / "o", cfg, progress=False, restart=True)


def test_bf16_load_keeps_lens_reductions_in_fp32(tiny_checkpoint, tiny_model):
    path, kw = tiny_checkpoint("spiritlm")
    fp32 = tiny_model("spiritlm")
    bf16 = load_model(path, dtype=torch.bfloat16, **kw)
    assert bf16.describe()["dtype"] == "bfloat16"
    tokens = torch.randint(
        0, int(fp32.bridge.cfg.d_vocab), (48,), generator=torch.Generator().manual_seed(0)
    )
    a = logit_lens(fp32, tokens, k=5)
    b = logit_lens(bf16, tokens, k=5)
    # the readout (final norm + unembedding) and its reductions run in fp32 (test_readout.py)
    assert b.topk_logprobs.dtype == torch.float32 and b.mass.dtype == torch.float32
    assert torch.isfinite(b.topk_logprobs).all()
    # text, speech (units + prosody), marker, other partition the vocabulary
    parts = b.mass[..., [0, 2, 3, 4]].sum(-1)
    torch.testing.assert_close(parts, torch.ones_like(parts), atol=1e-5, rtol=0)
    agree = (a.topk_ids[..., 0] == b.topk_ids[..., 0]).float().mean().item()
    # a random tiny model has near-flat logits, so bf16 rounding flips some near ties
    assert agree >= 0.8, f"bf16 top-1 agrees with fp32 on only {agree:.1%} of (layer, position)"
    torch.testing.assert_close(b.mass, a.mass, atol=0.01, rtol=0)


DDP_SCRIPT = """
import sys, torch
from speech_lens import load_model
from speech_lens.runs.distributed import init_distributed, train_tuned_lens_distributed
from speech_lens.lens.train import TrainConfig
ctx = init_distributed("gloo")
model = load_model(sys.argv[1])
g = torch.Generator().manual_seed(0)
vocab = int(model.bridge.cfg.d_vocab)
seqs = [torch.randint(0, vocab, (12 + 3 * i,), generator=g) for i in range(8)]
cfg = TrainConfig(steps=4, tokens_per_step=60, batch_size=1, chunk_tokens=16, checkpoint_every=2)
res = train_tuned_lens_distributed(model, seqs, cfg, ctx, out=sys.argv[2], progress=False)
if ctx.rank == 0:
    torch.save({"sd": res.lens.layer_translators.state_dict(), "kl": res.train_kl}, sys.argv[3])
"""


def test_tuned_lens_training_on_two_gloo_ranks_equals_single_process(
    tiny_checkpoint, tiny_model, tmp_path
):
    from speech_lens.lens.train import TrainConfig, train_tuned_lens

    path, _ = tiny_checkpoint("spiritlm")
    model = tiny_model("spiritlm")
    g = torch.Generator().manual_seed(0)
    vocab = int(model.bridge.cfg.d_vocab)
    seqs = [torch.randint(0, vocab, (12 + 3 * i,), generator=g) for i in range(8)]
    cfg = TrainConfig(steps=4, tokens_per_step=60, batch_size=1, chunk_tokens=16)
    ref = train_tuned_lens(model, seqs, cfg, progress=False)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    res = tmp_path / "res.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(script), str(path), str(tmp_path / "lens")]
    proc = subprocess.run([*cmd, str(res)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(res)
    want = ref.lens.layer_translators.state_dict()
    assert any(bool(v.abs().max() > 1e-4) for v in want.values())  # the lens did learn
    for name, v in want.items():
        torch.testing.assert_close(got["sd"][name], v, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["kl"], ref.train_kl, rtol=1e-5, atol=1e-7)
    saved = tmp_path / "lens"
    assert (saved / "config.json").is_file() and (saved / "params.pt").is_file()
    assert not (saved / "checkpoint.pt").exists()
