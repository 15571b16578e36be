"""Patching sweeps: plan cells (layer set x position x head), run them in batched forwards."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from speech_lens.batching import padded_inputs, plan_batches
from speech_lens.data.encoded import EncodedPrompt

if TYPE_CHECKING:
    from speech_lens.models.load import SpeechLM
from speech_lens.patching.hooks import (
    HookFn,
    Patch,
    SourceRun,
    T,
    cache_source,
    check_pair,
    hook_name,
    resolve_layer_sets,
    row_patches,
    rows_hook,
    unpad,
)
from speech_lens.patching.metrics import Metric, metric_name
from speech_lens.patching.positions import PatchingError, PositionMap
from speech_lens.patching.result import PatchResult


@dataclass(frozen=True, eq=False)
class _Row:
    """One patched (or plain) run to measure: ``tokens`` (1-D, unpadded) with ``patches``
    written in, reduced to a scalar by ``metric``."""

    tokens: Int[Tensor, " pos"]
    metric: Metric
    patches: tuple[Patch, ...] = ()


def _known(metric: Metric, run: SourceRun | None) -> float | None:
    """``metric`` on a run already made (its logits, or the activation it reads, if cached)."""
    if run is None:
        return None
    point = getattr(metric, "hook_point", None)
    with torch.no_grad():  # a lens readout applies the model's own weights
        if point is None:
            return float(metric(run[0]))
        return float(metric(run[1][point])) if point in run[1] else None


def _forward_rows(
    model: SpeechLM,
    rows: Sequence[_Row],
    padding_side: str,
    fwd_hooks: Sequence[tuple[Any, HookFn]],
) -> list[Tensor]:
    """One padded forward of ``rows``, each patched by its own patches only; every metric reads
    its own row at its real columns (logits, or the activation at its ``hook_point``)."""
    batch, tokens, kwargs = padded_inputs(model, [r.tokens for r in rows], padding_side)
    by_point: dict[str, list[tuple[int, Patch]]] = {}
    for b, r in enumerate(rows):
        for patch in r.patches:
            by_point.setdefault(patch.name, []).append((b, patch))
    seen: dict[str, Tensor] = {}

    def reader(point: str) -> Callable[..., None]:
        def grab(act: Tensor, *, hook: Any) -> None:
            seen[point] = act.detach()  # keyed by the metric's name: hook.name is canonical (P6)

        return grab

    # readers go last: at a patched hook point they see the patch
    points = sorted({p for r in rows if (p := getattr(r.metric, "hook_point", None))})
    hooks = [(n, rows_hook(e, batch)) for n, e in by_point.items()]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(
            tokens, fwd_hooks=[*hooks, *fwd_hooks, *[(p, reader(p)) for p in points]], **kwargs
        )
        out = []
        for b, r in enumerate(rows):
            point = getattr(r.metric, "hook_point", None)
            x = unpad(logits if point is None else seen[point], batch, b)
            out.append(torch.as_tensor(r.metric(x)).detach().float().cpu())
    return out


def _run_rows(
    model: SpeechLM,
    rows: Sequence[_Row],
    *,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    progress: bool = False,
    desc: str = "patch",
) -> list[Tensor]:
    """Metric values of ``rows`` in order, ``batch_size`` rows (an int, or ``"auto"``) per
    forward; rows of similar length go together."""
    batches = plan_batches(
        model, [len(r.tokens) for r in rows], batch_size, memory_budget_gb=memory_budget_gb
    )
    values: dict[int, Tensor] = {}
    with tqdm(total=len(rows), disable=not progress, desc=desc, leave=False) as bar:
        for idx in batches:
            got = _forward_rows(model, [rows[i] for i in idx], padding_side, fwd_hooks)
            values.update(zip(idx, got, strict=True))
            bar.update(len(idx))
    return [values[i] for i in range(len(rows))]


@dataclass(frozen=True, eq=False)
class Plan:
    """A sweep laid out as rows: its cells in ``values`` order, then the unpatched target run
    if its metric could not be read from a run already made."""

    template: PatchResult
    rows: tuple[_Row, ...]
    baseline_row: bool

    def finish(self, values: Sequence[Tensor]) -> PatchResult:
        shape = self.template.values.shape
        n = self.template.values.numel()
        baseline = float(values[n]) if self.baseline_row else self.template.baseline
        return replace(
            self.template, values=torch.stack(list(values[:n])).reshape(shape), baseline=baseline
        )


def run_plans(
    model: SpeechLM,
    plans: Sequence[Plan],
    *,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
    fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
    progress: bool = False,
    desc: str = "patch",
) -> list[PatchResult]:
    """Run the rows of all ``plans`` together (rows of different plans share forwards)."""
    rows = [r for p in plans for r in p.rows]
    values = _run_rows(
        model,
        rows,
        batch_size=batch_size,
        memory_budget_gb=memory_budget_gb,
        padding_side=padding_side,
        fwd_hooks=fwd_hooks,
        progress=progress,
        desc=desc,
    )
    parts = cut_runs(values, [len(p.rows) for p in plans])
    return [p.finish(v) for p, v in zip(plans, parts, strict=True)]


def cut_runs(items: Sequence[T], sizes: Iterable[int]) -> list[Sequence[T]]:
    """``items`` cut into consecutive runs of ``sizes``."""
    out, k = [], 0
    for n in sizes:
        out.append(items[k : k + n])
        k += n
    return out


def _head_cells(
    model: SpeechLM, component: str, heads: str | Sequence[int] | None
) -> tuple[list[tuple[int, ...] | None], tuple[int, ...] | None]:
    """Head sets to patch one at a time, and the head labels of the result."""
    if heads is not None and component != "z":
        raise PatchingError(f"heads= applies to component 'z' only, not {component!r}")
    if heads == "each":
        n_heads = int(model.bridge.cfg.n_heads)
        return [(h,) for h in range(n_heads)], tuple(range(n_heads))
    if heads is None:
        return [None], None
    if isinstance(heads, str):
        raise PatchingError(f"heads must be None, 'each' or a list of heads, not {heads!r}")
    labels = tuple(int(h) for h in heads)
    return [labels], labels


def source_hook_names(
    model: SpeechLM, component: str, layers: Sequence[tuple[int, ...]], metric: Metric | None
) -> set[str]:
    """Hook points a source run must cache: the patched ones and the one ``metric`` reads."""
    names = {hook_name(component, x) for e in layers for x in e}
    point = getattr(metric, "hook_point", None)
    return names | ({point} if point else set())


def plan_sweep(
    model: SpeechLM,
    source: EncodedPrompt,
    target: EncodedPrompt,
    pmap: PositionMap,
    metric: Metric,
    *,
    component: str,
    layers: int | Iterable[int | Iterable[int]] | None,
    positions: str,
    heads: str | Sequence[int] | None,
    source_metric: Metric | None,
    source_run: SourceRun,
    target_run: SourceRun | None,
    extra: Mapping[str, str] | None = None,
) -> Plan:
    """Check a sweep, read what runs already made can tell, and lay out its rows."""
    check_pair(model, source, target, pmap)
    layer_sets = resolve_layer_sets(model, layers)
    head_cells, head_labels = _head_cells(model, component, heads)
    cells = pmap.subsets(positions)
    if source_metric is None and len(source) == len(target):
        source_metric = metric
    missing = sorted(source_hook_names(model, component, layer_sets, None) - set(source_run[1]))
    if missing:
        raise PatchingError(f"source_run has no cached {missing[0]!r}")
    source_value = None
    if source_metric is not None:
        source_value = _known(source_metric, source_run)
        if source_value is None:  # the source run did not cache the point the metric reads
            source_value = float(_run_rows(model, [_Row(source.tokens, source_metric)])[0])
    rows = [
        _Row(target.tokens, metric, row_patches(source_run[1], sub, component, layer_set, hs))
        for layer_set in layer_sets
        for _, sub in cells
        for hs in head_cells
    ]
    baseline = _known(metric, target_run)
    if baseline is None:
        rows.append(_Row(target.tokens, metric))
    shape = [len(layer_sets)] + ([len(cells)] if positions != "all" else [])
    shape += [len(head_cells)] if heads == "each" else []
    axes = ("layer",) + (("position",) if positions != "all" else ())
    axes += ("head",) if heads == "each" else ()
    template = PatchResult(
        values=torch.zeros(shape),
        axes=axes,
        layers=tuple(layer_sets),
        positions=tuple(label for label, _ in cells),
        heads=head_labels,
        component=component,
        rule=pmap.rule,
        metric=metric_name(metric),
        baseline=float("nan") if baseline is None else baseline,
        source_value=source_value,
        source_id=pmap.source_id,
        target_id=pmap.target_id,
        position_mode=positions,
        head_mode="each" if heads == "each" else ("all" if heads is None else "set"),
        extra=dict(extra or {}),
    )
    return Plan(template, tuple(rows), baseline is None)


def rows_budget(
    memory_budget_gb: float | None, held: Iterable[tuple[Tensor, Mapping[str, Tensor]]]
) -> float | None:
    """What a stated budget leaves for patched forwards while the cached runs are held (free
    memory, when measured, already counts them)."""
    if memory_budget_gb is None:
        return None
    nbytes = sum(t.numel() * t.element_size() for lg, c in held for t in (lg, *c.values()))
    return memory_budget_gb - nbytes / 2**30


def patch_sweep(
    model: SpeechLM,
    source: EncodedPrompt,
    target: EncodedPrompt,
    pmap: PositionMap,
    metric: Metric,
    *,
    component: str = "resid_pre",
    layers: int | Iterable[int | Iterable[int]] | None = None,
    positions: str = "group",
    heads: str | Sequence[int] | None = None,
    fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
    source_metric: Metric | None = None,
    source_run: tuple[Tensor, Mapping[str, Tensor]] | None = None,
    target_logits: Tensor | None = None,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    progress: bool = False,
) -> PatchResult:
    """Patch ``component`` from ``source`` into ``target`` once per cell and record ``metric``.

    ``layers``: None (every layer, one at a time), or entries that are a layer or a set of layers
    patched together. ``positions``: ``"group"`` (each map group, e.g. word, alone), ``"pair"``
    (each patched target position alone), or ``"all"`` (the whole map at once). ``heads`` (for
    component ``"z"``): None (all heads), ``"each"`` (one head at a time: a head axis), or a
    list patched together. ``fwd_hooks`` are added to every patched forward (which holds
    ``batch_size`` rows). ``source_metric`` reads the same quantity on the unpatched source run
    (e.g. at the source's own position of the word); by default ``metric`` itself when both
    prompts have the same length. ``source_run`` (``cache_source`` output covering the needed
    hook points) and ``target_logits`` (the unpatched target run) skip recomputing them across
    many sweeps.

    ``batch_size``: cells measured per forward, an int or ``"auto"`` (from ``memory_budget_gb``,
    default the free memory): the target repeated, each row patched with its own cell's hooks
    and read on its own, so values equal the one-cell-at-a-time sweep (fp32: up to summation
    order, <= 1e-6).
    """
    check_pair(model, source, target, pmap)
    layer_sets = resolve_layer_sets(model, layers)
    if source_run is None:
        # cache the point a lens source metric reads too: its source value needs no extra run
        reads = source_metric if source_metric is not None or len(source) != len(target) else metric
        source_run = cache_source(
            model, source, source_hook_names(model, component, layer_sets, reads)
        )
    plan = plan_sweep(
        model,
        source,
        target,
        pmap,
        metric,
        component=component,
        layers=layer_sets,
        positions=positions,
        heads=heads,
        source_metric=source_metric,
        source_run=(source_run[0], dict(source_run[1])),
        target_run=None if target_logits is None else (target_logits, {}),
    )
    (result,) = run_plans(
        model,
        [plan],
        batch_size=batch_size,
        memory_budget_gb=rows_budget(memory_budget_gb, [source_run]),
        fwd_hooks=fwd_hooks,
        progress=progress,
        desc=f"patch {component}",
    )
    return result
