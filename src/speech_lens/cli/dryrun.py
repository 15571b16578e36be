"""``--dry-run`` for the long commands: what would run, its memory, and a time estimate.

The time estimate comes from a short calibration: the command's own per-item work (one
utterance's lens, one utterance's patching sweep, a few hundred tuned-lens training tokens) run on
the first items after one untimed warm-up, then scaled to the whole job. Nothing is written to the
command's output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from speech_lens.batching import plan_batches
from speech_lens.data.manifest import read_manifest
from speech_lens.data.prompts import encode_prompt
from speech_lens.data.word_targets import word_targets
from speech_lens.lens.kl import lens_kl
from speech_lens.lens.logit import word_lens
from speech_lens.lens.rows import describe_rows
from speech_lens.lens.train import TrainConfig, config_from_args, train_tuned_lens
from speech_lens.lens.train_data import encode_training_data, split_heldout
from speech_lens.lens.tuned import lens_from_spec
from speech_lens.models.devices import free_memory_gb
from speech_lens.models.from_args import load_from_args
from speech_lens.models.load import DTYPES, load_model
from speech_lens.models.memory import MemoryEstimate, estimate_memory
from speech_lens.runs.demo import REPO_ORGANISMS, find_organisms
from speech_lens.runs.demo_minisims import MiniSims
from speech_lens.runs.lens import PARTIAL, RunError, lens_batch, parse_batch_size, read_partial
from speech_lens.runs.lens_settings import encode_for_lens, lens_config, lens_utterances
from speech_lens.runs.patch import run_experiment
from speech_lens.runs.shards import read_finished
from speech_lens.runs.tuned import chosen_rows, cli_load

__all__ = ["DryRunPlan", "Stage", "calibrate", "memory_for"]

T = TypeVar("T")


@dataclass(frozen=True)
class Stage:
    """``count`` items of one kind of work, ``seconds_per_item`` measured on ``calibrated_on``."""

    name: str
    count: int
    unit: str
    seconds_per_item: float
    calibrated_on: int

    @property
    def seconds(self) -> float:
        return self.count * self.seconds_per_item


@dataclass(frozen=True)
class DryRunPlan:
    command: str
    facts: tuple[tuple[str, str], ...]
    memory: MemoryEstimate | None
    available_gb: float | None
    stages: tuple[Stage, ...]
    # the calibration's timings depend on it
    torch_threads: int = dataclasses.field(default_factory=torch.get_num_threads)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def render(self) -> str:
        lines = [f"dry run: speech-lens {self.command} (nothing was written)"]
        width = max((len(k) for k, _ in self.facts), default=0)
        lines += [f"  {k:<{width}}  {v}" for k, v in self.facts]
        if self.memory is not None:
            avail = "" if self.available_gb is None else f"; {self.available_gb:.1f} GiB available"
            lines.append(f"  memory: {self.memory} = {self.memory.total_gb:.2f} GiB{avail}")
        for s in self.stages:
            lines.append(
                f"  {s.name}: {s.count} {s.unit}(s) x {s.seconds_per_item:.3f} s "
                f"(measured on {s.calibrated_on}) = {_duration(s.seconds)}"
            )
        lines.append(f"  estimated time: {_duration(self.seconds)}")
        lines.append(f"  torch threads: {self.torch_threads} (the calibration ran with these)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "facts": dict(self.facts),
            "memory_gb": None if self.memory is None else round(self.memory.total_gb, 4),
            "available_gb": self.available_gb,
            "stages": [
                {
                    "name": s.name,
                    "count": s.count,
                    "unit": s.unit,
                    "seconds_per_item": s.seconds_per_item,
                    "calibrated_on": s.calibrated_on,
                }
                for s in self.stages
            ],
            "seconds": self.seconds,
            "torch_threads": self.torch_threads,
        }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def calibrate(run_one: Callable[[T], Any], items: Sequence[T], n: int = 2) -> tuple[float, int]:
    """Seconds per item of ``run_one`` on up to ``n`` items after one untimed warm-up item
    (the first call pays one-off allocation costs); with a single item, that one is timed."""
    if not items:
        return 0.0, 0
    timed = list(items[1 : 1 + n]) if len(items) > 1 else list(items[:1])
    if len(items) > 1:
        run_one(items[0])
    t0 = time.perf_counter()
    for it in timed:
        run_one(it)
    return (time.perf_counter() - t0) / len(timed), len(timed)


def memory_for(model: Any, seq_len: int, batch: int = 1) -> MemoryEstimate:
    """Weights + ``batch`` rows of activations at ``seq_len`` + the streaming lens buffers."""
    dtype = next(model.bridge.parameters()).dtype
    m = estimate_memory(model.hf_model.config.to_dict(), dtype, seq_len=seq_len)
    return MemoryEstimate(weights=m.weights, activations=m.activations * batch, lens=m.lens)


def _print(plan: DryRunPlan, as_json: bool = False) -> int:
    print(json.dumps(plan.to_json(), indent=2) if as_json else plan.render())
    return 0


# --------------------------------------------------------------------------------------------
# One planner per long command (each takes the command's parsed arguments)
# --------------------------------------------------------------------------------------------


def plan_lens(args: Any, model: Any = None, done: set[str] | None = None) -> DryRunPlan:

    model = model if model is not None else load_from_args(args)
    cfg = lens_config(args, model)
    utts = list(read_manifest(args.data, layout=model.layout))
    if args.limit is not None:
        utts = utts[: args.limit]
    utts = lens_utterances(utts, cfg)  # as the run lenses them
    if done is None:
        # the run's own reader (it refuses a run directory with other settings), without repairs
        partial = Path(args.out) / PARTIAL
        done = set() if args.restart else set(read_partial(partial, cfg, repair=False))
    todo = [u for u in utts if u.id not in done]
    prompts = [encode_for_lens(model, u, cfg) for u in todo]
    lens = lens_from_spec(cfg.lens, model)
    size = parse_batch_size(getattr(args, "batch_size", 1))
    budget = getattr(args, "memory_budget", None)
    batches = plan_batches(model, [len(p) for p in prompts], size, memory_budget_gb=budget)
    side = getattr(args, "padding_side", "right")

    def one(idx: list[int]) -> None:
        lens_batch(model, [prompts[i] for i in idx], [todo[i] for i in idx], cfg, lens, side)

    # the longest batches come first, so the estimate errs on the slow side
    per_batch, n = calibrate(one, batches)
    per = per_batch / max(1, len(batches[0])) if batches else 0.0
    longest = max((len(p.tokens) for p in prompts), default=0)
    widest = max((len(b) for b in batches), default=1)
    facts = (
        ("model", f"{model.path} ({model.spec.name}, {model.n_layers} layers)"),
        ("data", f"{args.data}: {len(utts)} utterances, {len(done)} already in {args.out}"),
        ("lens", f"{args.lens}, {args.mode} prompts, k={args.k}, match {args.match}"),
        ("lens rows", describe_rows(cfg.layers, model.n_layers + 1)),
        ("batches", f"{len(batches)} (batch size {size}: up to {widest} utterances)"),
        ("longest prompt", f"{longest} tokens"),
    )
    return DryRunPlan(
        "lens",
        facts,
        memory_for(model, max(longest, 1), batch=widest),
        free_memory_gb(model.device),
        (Stage("word lens", len(todo), "utterance", per, n * widest),),
    )


def plan_patch(args: Any, options: dict[str, Any]) -> DryRunPlan:
    """``options``: the keyword arguments ``speech-lens patch`` passes to ``run_experiment``."""

    model = load_from_args(args)
    utts = list(
        itertools.islice(read_manifest(args.data, layout=model.layout), args.max_utterances)
    )

    # calibrate on groups of utterances, as many as one batch (word-swap needs a donor: >= 2)
    size = options.get("batch_size", 1)
    group = max(2, size) if isinstance(size, int) else 4
    groups = [utts[i : i + group] for i in range(0, len(utts), group)]
    groups = [g for g in groups if len(g) == group] or groups[:1]  # no short tail group
    with tempfile.TemporaryDirectory() as tmp:

        def one(part: list[Any]) -> None:
            run_experiment(model, part, Path(tmp) / part[0].id, **options, progress=False)

        per_group, n = calibrate(one, groups)
    per = per_group / len(groups[0]) if groups else 0.0
    longest = max((len(encode_prompt(model, u, mode="speech").tokens) for u in utts), default=1)
    facts = (
        ("model", f"{model.path} ({model.spec.name}, {model.n_layers} layers)"),
        ("data", f"{args.data}: {len(utts)} utterances (--max-utterances {args.max_utterances})"),
        ("experiment", f"{args.experiment}, component {args.component}, rule {args.rule}"),
        ("layers", str(options["layers"] or f"each of {model.n_layers}")),
    )
    return DryRunPlan(
        "patch",
        facts,
        memory_for(model, 2 * longest),
        free_memory_gb(model.device),
        (Stage("patching", len(utts), "utterance", per, n * group),),
    )


def plan_tuned_train(args: Any, model: Any = None) -> DryRunPlan:

    if model is None:
        model, utts = cli_load(args)
    else:
        utts = list(read_manifest(args.data, layout=model.layout))
    if getattr(args, "limit", None) is not None:
        utts = utts[: args.limit]
    train_u, held_u = split_heldout(utts, args.heldout)
    seed = args.seed if args.seed is not None else TrainConfig.seed
    seqs, _ = encode_training_data(model, train_u, args.data_mode, seed=seed)
    cfg = config_from_args(args)
    rows = chosen_rows(args, model)
    # a step costs a fixed part (optimizer, one readout per layer) plus a part per token: time
    # steps of one and of two micro-batches' worth of tokens and extrapolate the line
    one_batch = sum(len(s) for s in seqs[: cfg.batch_size])
    sizes = sorted({max(1, min(cfg.tokens_per_step, n * one_batch)) for n in (1, 2)})
    times = []
    for n_tok in sizes:
        small = dataclasses.replace(cfg, tokens_per_step=n_tok, steps=2, warmup_steps=0)

        def one(_: int, small: Any = small) -> None:
            train_tuned_lens(
                model, seqs, small, out=None, stop_after=1, progress=False, layers=rows
            )

        times.append(calibrate(one, range(3))[0])
    slope = (times[-1] - times[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else 0.0
    slope = max(slope, 0.0) if len(sizes) > 1 else times[0] / sizes[0]
    per_step = times[0] + slope * (cfg.tokens_per_step - sizes[0])
    facts = (
        ("model", f"{model.path} ({model.spec.name}, {model.n_layers} layers)"),
        ("data", f"{args.data}: {len(train_u)} training, {len(held_u)} held-out utterances"),
        ("training", f"{cfg.steps} steps x {cfg.tokens_per_step} tokens, batch {cfg.batch_size}"),
        ("rows", describe_rows(rows, model.n_layers + 1)),  # translators trained (+ output)
        ("output", f"{args.out} (not written)"),
    )
    longest = max((len(s) for s in seqs), default=1)
    return DryRunPlan(
        "tuned-lens train",
        facts,
        memory_for(model, min(longest, cfg.max_seq_len), batch=cfg.batch_size),
        free_memory_gb(model.device),
        (Stage("training", cfg.steps, "step", per_step, 2 * len(sizes)),),
    )


def plan_demo(args: Any) -> DryRunPlan:

    root = Path(args.organisms) if args.organisms is not None else REPO_ORGANISMS
    orgs, _ = find_organisms(root)
    test = list(read_manifest(root / "test_manifest.jsonl"))
    if args.limit is not None:
        test = test[: args.limit]
    model = load_model(orgs[0].path)
    prompts = [encode_prompt(model, u, mode="speech") for u in test[:3]]
    lens_per, n_lens = calibrate(
        lambda i: word_lens(model, prompts[i], word_targets(model, test[i]), k=10),
        range(len(prompts)),
    )
    seqs = [p.tokens for p in prompts]
    kl_per, n_kl = calibrate(lambda s: lens_kl(model, None, [s], progress=False), seqs)
    with tempfile.TemporaryDirectory() as tmp:
        patch_per, n_patch = calibrate(
            lambda u: run_experiment(model, [u], Path(tmp) / u.id, progress=False), test[:3]
        )
    n_inter = sum(bool((o.config.get("mix") or {}).get("interleaved")) for o in orgs)
    n_tuned = sum((o.path / "tuned_lens" / "params.pt").exists() for o in orgs)
    n_speech = sum(bool(o.saw_speech) for o in orgs)
    n_patch_utts = min(args.patch_utterances, len(test))
    facts = (
        ("organisms", f"{len(orgs)} in {root} ({n_inter} also interleaved, {n_tuned} tuned)"),
        ("data", f"{len(test)} held-out utterances, patching on {n_patch_utts}"),
        ("output", f"{args.out} (not written)"),
        (
            "mini-SIMS",
            "section not in this estimate (rebuilt from its delta on first use, then lensed)"
            if MiniSims.under(root).delta.exists()
            else "no delta: section skipped",
        ),
    )
    return DryRunPlan(
        "demo",
        facts,
        memory_for(model, max(len(s) for s in seqs)),
        free_memory_gb(model.device),
        (
            Stage(
                "lens", len(test) * (len(orgs) + n_inter + n_tuned), "utterance", lens_per, n_lens
            ),
            Stage("tuned-lens KL", 2 * n_tuned * min(100, len(test)), "utterance", kl_per, n_kl),
            Stage("patching", n_speech * n_patch_utts, "utterance", patch_per, n_patch),
        ),
    )


def plan_distributed(args: Any) -> DryRunPlan:
    """``python -m speech_lens.distributed lens|tuned-lens --dry-run --world N``: the plan of
    one rank (no process group is started). Lens: each rank takes every N-th unfinished
    utterance; tuned lens: each rank runs 1/N of every step's micro-batches (the gradient
    all-reduce is not timed)."""

    model = load_from_args(args, dtype=DTYPES[args.dtype])
    world = max(1, int(args.world))
    if args.command == "lens":
        done = set() if args.restart else set(read_finished(args.out, lens_config(args, model)))
        extra = {"lens": "logit", "batch_size": 1, "padding_side": "right", "memory_budget": None}
        plan = plan_lens(argparse.Namespace(**{**vars(args), **extra}), model=model, done=done)
        stages = tuple(
            dataclasses.replace(st, name=f"{st.name} per rank", count=-(-st.count // world))
            for st in plan.stages
        )
    else:
        plan = plan_tuned_train(argparse.Namespace(**vars(args), heldout=0.0), model=model)
        stages = tuple(
            dataclasses.replace(st, seconds_per_item=st.seconds_per_item / world)
            for st in plan.stages
        )
    facts = (*plan.facts, ("ranks", f"{world} (torchrun --nproc_per_node {world})"))
    return dataclasses.replace(
        plan, command=f"distributed {args.command}", facts=facts, stages=stages
    )


def run(command: str, args: Any, *extra: Any) -> int:
    """Print the plan of ``command`` (``lens``, ``patch``, ``tuned-lens train``, ``demo``)."""
    planners: dict[str, Callable[..., DryRunPlan]] = {
        "lens": plan_lens,
        "patch": plan_patch,
        "tuned-lens train": plan_tuned_train,
        "demo": plan_demo,
        "distributed": plan_distributed,
    }

    torch.manual_seed(0)
    try:
        plan = planners[command](args, *extra)
    except (ValueError, RunError, FileNotFoundError) as e:  # as the commands themselves report
        print(f"speech-lens {command} --dry-run: error: {e}", file=sys.stderr)
        return 2
    return _print(plan, as_json=bool(getattr(args, "json", False)))
