"""Data-parallel lens runs on ``torch.distributed`` (launched by ``torchrun``), sharded and resumable.

Rank ``r`` of ``world`` lenses utterances ``i`` with ``i % world == r`` (manifest order, after
``limit``). Each rank owns two files under ``out/shards/``:

- ``rank-{r}.jsonl``: one :class:`~speech_lens.metrics.UtteranceRecord` per line, appended and
  fsynced;
- ``rank-{r}.done.json``: the commit record, replaced atomically (temp file + ``os.replace``)
  after every append: the run settings, the finished ids and the committed byte length of the
  shard. Bytes past that length (a rank killed mid-write) are not trusted and are cut off when
  the rank reopens its shard.

A rerun (any world size) skips every id committed in any shard. After a barrier, rank 0 merges:
every utterance exactly once (duplicates, missing or foreign ids are refused), then the very code
path of the single-process :func:`~speech_lens.run_lens.run_dataset` writes ``metrics.json``,
``layers.csv``, ``words.csv`` and ``report.html`` (it finds every record done and computes
nothing), so the outputs equal a single-process run's.

Launch: ``torchrun --nproc_per_node 8 -m speech_lens.distributed lens CKPT DATA --out DIR``;
``python -m speech_lens.distributed merge CKPT DATA --out DIR`` merges finished shards alone;
``torchrun ... -m speech_lens.distributed tuned-lens CKPT DATA --out LENS_DIR`` trains a tuned
lens with gradients averaged across ranks (:func:`train_tuned_lens_distributed`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from speech_lens.data.word_targets import word_targets
from speech_lens.files import atomic_write_text
from speech_lens.guards import finite_guard_hooks
from speech_lens.lens.logit import word_lens
from speech_lens.lens.metrics import DatasetMetrics
from speech_lens.lens.records import UtteranceRecord, utterance_record
from speech_lens.lens.train import train_tuned_lens
from speech_lens.runs.lens import PARTIAL, RunError, run_dataset
from speech_lens.runs.lens_settings import LensRunConfig, encode_for_lens, lens_utterances
from speech_lens.runs.shards import SHARDS, ShardStore, clear_shards, read_finished

FAIL_ENV = "SPEECH_LENS_FAIL_AFTER"  # fault injection for tests: "rank:n" exits abruptly
RATE_TOLERANCE = 0.02  # SpiritLM writes 24.99 Hz for the 25 Hz mHuBERT: same tokenizer


class InputError(RunError):
    """A data set this run refuses: empty, duplicate ids, mixed unit rates, too long for the model."""


# ------------------------------------------------------------------------------------------------
# process group
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``world == 1`` without a process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    def barrier(self) -> None:
        if self.backend is not None:
            dist.barrier()


def init_distributed(backend: str | None = None, *, timeout_hours: float = 24.0) -> DistContext:
    """Join the ``torchrun`` job described by the environment (``RANK``, ``WORLD_SIZE``, ...).

    Without ``WORLD_SIZE`` (plain ``python``), a one-process context with no group. ``backend``
    defaults to nccl when CUDA is available, else gloo. The timeout is long because ranks reach
    the final barrier hours apart when their shards differ in length.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "RANK" not in os.environ:
        return DistContext()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(hours=timeout_hours))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, backend)


def shard_of(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Items ``i`` with ``i % world == rank``: deterministic, disjoint, covering."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return [x for i, x in enumerate(items) if i % world == rank]


# ------------------------------------------------------------------------------------------------
# input limits
# ------------------------------------------------------------------------------------------------


def context_length(model: Any) -> int:
    """The model's context: ``bridge.cfg.n_ctx``, else the HF ``max_position_embeddings``."""
    n = getattr(model.bridge.cfg, "n_ctx", None) or getattr(
        model.hf_model.config, "max_position_embeddings", None
    )
    if not n:
        raise InputError(f"model {model.path}: cannot tell its context length (n_ctx)")
    return int(n)


def check_inputs(model: Any, utterances: Sequence[Any], cfg: LensRunConfig) -> None:
    """Refuse what would fail or mislead hours into a run, naming the utterance.

    Empty data set; an id twice; unit frame rates that differ (units from different speech
    tokenizers / families mixed in one manifest); a prompt longer than the model's context
    (positional encodings past ``n_ctx`` are garbage, and nothing chunks the lens).
    """

    if not utterances:
        raise InputError(f"{cfg.data}: no utterances to analyse (empty data set)")
    seen: set[str] = set()
    for u in utterances:
        if u.id in seen:
            raise InputError(f"{cfg.data}: utterance id {u.id!r} appears twice")
        seen.add(u.id)
    first = utterances[0]
    for u in utterances:
        if abs(u.frame_rate - first.frame_rate) > RATE_TOLERANCE * first.frame_rate:
            raise InputError(
                f"{cfg.data}: utterance {u.id!r} has units at {u.frame_rate:g} Hz but "
                f"{first.id!r} at {first.frame_rate:g} Hz: units of different speech tokenizers "
                "(families) in one run; split the manifest"
            )
    n_ctx = context_length(model)
    for u in utterances:
        n = len(encode_for_lens(model, u, cfg))
        if n > n_ctx:
            raise InputError(
                f"{cfg.data}: utterance {u.id!r} encodes to {n} tokens ({cfg.mode} prompt) but "
                f"the model's context is {n_ctx}; cut the utterance or drop it from the manifest"
            )


# ------------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# run + merge
# ------------------------------------------------------------------------------------------------


def _fail_point(rank: int) -> int | None:
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return None
    r, n = spec.split(":")
    return int(n) if int(r) == rank else None


def merge_shards(
    model: Any,
    utterances: Sequence[Any],
    out_dir: str | Path,
    cfg: LensRunConfig,
    *,
    progress: bool = False,
) -> DatasetMetrics:
    """Check the shards cover the data set exactly once, then write the single-process outputs."""
    out = Path(out_dir)
    utts = list(utterances)[: cfg.limit] if cfg.limit is not None else list(utterances)
    finished = read_finished(out, cfg)
    ids = [u.id for u in utts]
    missing = [i for i in ids if i not in finished]
    if missing:
        raise RunError(
            f"{out / SHARDS}: {len(missing)} of {len(ids)} utterances not finished "
            f"(e.g. {missing[:5]}); rerun the lens to complete them"
        )
    extra = sorted(set(finished) - set(ids))
    if extra:
        raise RunError(
            f"{out / SHARDS}: {len(extra)} finished utterances are not in {cfg.data} "
            f"(e.g. {extra[:5]}); the data changed since they were computed"
        )
    lines = [json.dumps({"header": cfg.resume_key()})]
    lines += [json.dumps(finished[i].to_json(), ensure_ascii=False) for i in ids]
    atomic_write_text(out / PARTIAL, "".join(ln + "\n" for ln in lines))

    def computed(rec: UtteranceRecord) -> None:  # cannot happen after the checks above
        raise RunError(f"merge would recompute utterance {rec.utterance_id!r}")

    return run_dataset(model, utts, out, cfg, progress=progress, on_record=computed)


def run_distributed(
    model: Any,
    utterances: Iterable[Any],
    out_dir: str | Path,
    cfg: LensRunConfig,
    ctx: DistContext | None = None,
    *,
    restart: bool = False,
    progress: bool = True,
    guard: bool = True,
) -> DatasetMetrics | None:
    """Lens this rank's share of ``utterances`` into its shard; rank 0 then merges.

    Every rank checks the whole data set (:func:`check_inputs`) so all fail alike before any
    work. Returns the merged metrics on rank 0, None elsewhere. ``guard``: NaN/inf checks
    (:mod:`speech_lens.guards`) in every forward pass.
    """

    ctx = ctx or DistContext()
    out = Path(out_dir)
    given = list(utterances)
    if cfg.limit is not None:
        given = given[: cfg.limit]
    utts = lens_utterances(given, cfg)  # scrambled for the control; the merge scrambles `given`
    check_inputs(model, utts, cfg)
    cfg.rows(model.n_layers)  # a selection that does not fit the model: refused on every rank
    if restart and ctx.rank == 0:
        clear_shards(out)
    ctx.barrier()  # nobody reads the shards while rank 0 clears them
    done = set(read_finished(out, cfg))
    store = ShardStore(out, ctx.rank, cfg)
    todo = [u for u in shard_of(utts, ctx.rank, ctx.world) if u.id not in done]
    fail_after = _fail_point(ctx.rank)
    bar = tqdm(
        total=len(todo),
        desc=f"lens rank {ctx.rank}/{ctx.world}",
        unit="utt",
        disable=not progress,
        position=ctx.rank,
    )
    for n, u in enumerate(todo):
        if fail_after is not None and n == fail_after:
            os._exit(17)  # a rank dying with no cleanup at all (tests only)
        prompt = encode_for_lens(model, u, cfg)
        hooks = finite_guard_hooks(model, u.id) if guard else []
        # unit positions only: the records read nothing else (as run_lens.run_dataset)
        res = word_lens(
            model,
            prompt,
            word_targets(model, u),
            k=cfg.k,
            layers=cfg.rows(model.n_layers),
            positions="speech",
            fwd_hooks=hooks,
            zero_unit_words=cfg.zero_unit_words,
        )
        store.append(utterance_record(res, prompt, model.layout))
        bar.update(1)
    bar.close()
    ctx.barrier()
    if ctx.rank != 0:
        return None
    return merge_shards(model, given, out, cfg)


# ------------------------------------------------------------------------------------------------
# tuned-lens training, data-parallel
# ------------------------------------------------------------------------------------------------


def train_tuned_lens_distributed(
    model: Any,
    sequences: Sequence[torch.Tensor],
    config: Any = None,
    ctx: DistContext | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    data: str | Path | None = None,
    layers: Sequence[int] | None = None,
) -> Any:
    """``tuned_train.train_tuned_lens`` with each step's micro-batches split across ranks.

    Every rank draws the same step batch (same seeded order); micro-batch ``m`` runs on rank
    ``m % world``; gradients (scaled by the whole step's token count) are summed with
    ``all_reduce``, which is what ``DistributedDataParallel`` does (the translators are applied
    inside the lens hooks, not through a module forward, so the DDP wrapper itself cannot see
    them). Clipping and the SGD step then run on identical gradients on every rank, so the lens
    equals the single-process one up to float summation order. Rank 0 writes the checkpoint and
    the lens; every rank resumes from the checkpoint.
    """

    ctx = ctx or DistContext()

    def reduce_grads(params: list[torch.Tensor], step_kl: torch.Tensor) -> None:
        if ctx.backend is None:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
        dist.all_reduce(flat)  # gloo/nccl sum: the single-process step's gradient
        kl = step_kl.to(flat.device)  # nccl reduces device tensors only
        dist.all_reduce(kl)
        step_kl.copy_(kl.cpu())
        o = 0
        for p in params:
            if p.grad is not None:
                p.grad.copy_(flat[o : o + p.numel()].view_as(p))
                o += p.numel()

    result = train_tuned_lens(
        model,
        sequences,
        config,
        out=out,
        resume=resume,
        progress=progress,
        extra_config={"world": ctx.world},
        rank=ctx.rank,
        world=ctx.world,
        reduce_grads=reduce_grads,
        data=data,
        layers=layers,
    )
    ctx.barrier()
    return result
