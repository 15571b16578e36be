"""Utterance-pair plumbing shared by the experiments: batched pair runs, curves."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from speech_lens.batching import plan_batches
from speech_lens.data.encoded import EncodedPrompt

if TYPE_CHECKING:
    from speech_lens.models.load import SpeechLM
from speech_lens.patching.hooks import SourceRun, cache_bytes_per_token, cache_sources
from speech_lens.patching.metrics import Metric, lens_next_word_logprob, next_word_logprob
from speech_lens.patching.positions import PatchingError, check_prompt
from speech_lens.patching.result import PatchResult
from speech_lens.patching.sweep import Plan, cut_runs, rows_budget, run_plans

# ---------------------------------------------------------------------------------------------
# Worked experiments (used by examples/, the CLI and the demo report)
# ---------------------------------------------------------------------------------------------


def spoken_word_ok(prompt: EncodedPrompt, i: int) -> bool:
    return any(s.index == i and s.end > s.start for s in prompt.spans)


def run_pairs(
    model: SpeechLM,
    pairs: Sequence[tuple[EncodedPrompt, EncodedPrompt]],
    make_plans: Callable[[int, SourceRun, SourceRun], list[Plan]],
    *,
    source_names: Collection[str],
    target_names: Collection[str],
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    progress: bool = False,
    desc: str = "patch",
) -> list[list[PatchResult]]:
    """Sweeps over many (source, target) prompt pairs, ``batch_size`` pairs at a time: the
    group's source and target runs go through padded forwards (caching ``source_names`` /
    ``target_names``), then ``make_plans(pair index, source run, target run)`` lays out its
    sweeps and the rows of all the group's sweeps share padded forwards, ``batch_size`` rows
    each. Results per pair, in input order."""
    for source, target in pairs:
        check_prompt(model, source, "source")
        check_prompt(model, target, "target")
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "memory_budget_gb": memory_budget_gb,
        "padding_side": padding_side,
    }
    # a group's cached runs stay in memory while its patched rows run
    groups = plan_batches(
        model,
        [max(len(s), len(t)) for s, t in pairs],
        batch_size,
        memory_budget_gb=memory_budget_gb,
        extra_bytes_per_token=cache_bytes_per_token(model, [*source_names, *target_names]),
    )
    out: dict[int, Sequence[PatchResult]] = {}
    with tqdm(total=len(pairs), desc=desc, disable=not progress) as bar:
        for idx in groups:
            src_runs = cache_sources(model, [pairs[i][0] for i in idx], source_names, **kw)
            tgt_runs = cache_sources(model, [pairs[i][1] for i in idx], target_names, **kw)
            plans = [make_plans(i, s, t) for i, s, t in zip(idx, src_runs, tgt_runs, strict=True)]
            kw_rows = {
                **kw,
                "memory_budget_gb": rows_budget(memory_budget_gb, src_runs + tgt_runs),
            }
            done = run_plans(model, [p for ps in plans for p in ps], **kw_rows)
            out.update(zip(idx, cut_runs(done, [len(ps) for ps in plans]), strict=True))
            bar.update(len(idx))
    return [list(out[i]) for i in range(len(pairs))]


def next_word_metric(
    model: SpeechLM, prompt: EncodedPrompt, word: int, read_layer: int | None
) -> Metric:
    if read_layer is None:
        return next_word_logprob(model, prompt, word)
    return lens_next_word_logprob(model, prompt, word, read_layer)


def mean_curve(results: Sequence[PatchResult]) -> dict[str, Any]:
    """Average layer curves (``positions="all"`` results on the same layers) over words and
    utterances: mean patched value per layer, mean unpatched target, mean source value."""
    if not results:
        raise PatchingError("no patching results to average")
    layers = results[0].layers
    if any(r.layers != layers or r.axes != ("layer",) for r in results):
        raise PatchingError("mean_curve needs layer-only results over the same layers")
    vals = torch.stack([r.values for r in results])
    srcs = [r.source_value for r in results if r.source_value is not None]
    return {
        "layers": results[0].layer_labels,
        "mean": vals.mean(0),
        "sem": vals.std(0) / max(1, len(results)) ** 0.5 if len(results) > 1 else vals[0] * 0,
        "baseline": sum(r.baseline for r in results) / len(results),
        "source": sum(srcs) / len(srcs) if srcs else None,
        "n": len(results),
    }


def stack_curves(results: Sequence[PatchResult]) -> PatchResult:
    """Layer curves of several words as one layer x word result of *effects* (value minus each
    word's own unpatched baseline), for :func:`~speech_lens.plots_patching.plot_layer_position`."""
    if not results:
        raise PatchingError("no patching results to stack")
    first = results[0]
    eff = torch.stack([r.values - r.baseline for r in results], dim=1)
    labels = tuple(
        f"{r.extra.get('word_index', i)}:{r.extra.get('word', '')}" for i, r in enumerate(results)
    )
    return replace(
        first,
        values=eff,
        axes=("layer", "position"),
        positions=labels,
        metric=f"Δ {first.metric.split('@')[0]} (per word)",
        baseline=0.0,
        source_value=None,
        position_mode="group",
        extra={k: v for k, v in first.extra.items() if k in ("experiment", "utterance")},
    )
