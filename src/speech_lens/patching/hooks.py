"""Patching hooks: cache source activations and write them into a target run at mapped positions."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from speech_lens._tl import get_act_name
from speech_lens.batching import PaddedBatch, padded_inputs, plan_batches
from speech_lens.data.encoded import EncodedPrompt

if TYPE_CHECKING:
    from speech_lens.models.load import SpeechLM
from speech_lens.patching.positions import PatchingError, PositionMap, check_prompt

# component -> TransformerLens activation name (legacy alias; the bridge answers to it)
COMPONENTS: dict[str, str] = {
    "resid_pre": "resid_pre",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out": "attn_out",
    "mlp_out": "mlp_out",
    "z": "z",  # per-head attention output before W_O: [batch, pos, head, d_head]
}
HookFn = Callable[..., Tensor]
T = TypeVar("T")
# an unpatched run: logits [1, pos, vocab] and the activations cached by hook name
SourceRun = tuple[Tensor, dict[str, Tensor]]


def _batch(tokens: Tensor, device: torch.device) -> Int[Tensor, "1 pos"]:
    return tokens.to(device=device, dtype=torch.long).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


def hook_name(component: str, layer: int) -> str:
    """TransformerLens name of ``component`` at ``layer`` (the legacy alias the bridge answers to)."""
    if component not in COMPONENTS:
        raise PatchingError(f"unknown component {component!r}; one of {tuple(COMPONENTS)}")
    return str(get_act_name(COMPONENTS[component], layer))


def _gather(
    source_act: Float[Tensor, "batch src_pos *rest"], pmap: PositionMap
) -> tuple[Int[Tensor, " n"], Float[Tensor, "batch n *rest"]]:
    """Target indices and the source values written there (mean over each pair's sources)."""
    if source_act.shape[1] != pmap.source_len:
        raise PatchingError(
            f"source activation has {source_act.shape[1]} positions but the map's source prompt "
            f"{pmap.source_id!r} has {pmap.source_len}"
        )
    rows = []
    for _, srcs in pmap.pairs:
        if len(srcs) == 1:  # plain indexing: bit-identical to transformer_lens.patching
            rows.append(source_act[:, srcs[0]])
        else:
            rows.append(source_act[:, list(srcs)].mean(dim=1))
    tgt = torch.tensor(pmap.target_positions, dtype=torch.long, device=source_act.device)
    return tgt, torch.stack(rows, dim=1)


@dataclass(frozen=True, eq=False)
class Patch:
    """One hook point's patch of one target run: ``values`` go to ``target`` positions
    (unpadded; :func:`_put` adds a padded row's offset), restricted to ``heads`` if given."""

    name: str
    target: Int[Tensor, " n"]
    values: Float[Tensor, "1 n *rest"]
    heads: Int[Tensor, " h"] | None
    target_len: int
    target_id: str


def _make_patch(
    name: str,
    source_act: Float[Tensor, "batch src_pos *rest"],
    pmap: PositionMap,
    heads: Sequence[int] | None = None,
) -> Patch:
    tgt, values = _gather(source_act.detach(), pmap)
    head_idx = None
    if heads is not None:
        if source_act.ndim != 4:
            raise PatchingError(
                f"heads= needs a per-head activation [batch, pos, head, d_head]; got shape "
                f"{tuple(source_act.shape)} (use component='z')"
            )
        n_heads = int(source_act.shape[2])
        bad = [h for h in heads if not 0 <= int(h) < n_heads]
        if bad:
            raise PatchingError(f"head {bad[0]} out of range 0..{n_heads - 1}")
        head_idx = torch.tensor([int(h) for h in heads], dtype=torch.long, device=tgt.device)
        values = values[:, :, head_idx]
    return Patch(name, tgt, values, head_idx, pmap.target_len, pmap.target_id)


def _put(out: Tensor, patch: Patch, offset: int = 0) -> None:
    """Write ``patch`` into every batch row of ``out`` in place (a one-row view writes one
    row), at its positions shifted by ``offset`` (a left-padded row's pad columns)."""
    tgt = (patch.target + offset).to(out.device)
    v = patch.values.to(device=out.device, dtype=out.dtype)
    if patch.heads is None:
        out[:, tgt] = v
    else:
        out[:, tgt.unsqueeze(1), patch.heads.to(out.device).unsqueeze(0)] = v


def patch_hook(
    source_act: Float[Tensor, "batch src_pos *rest"],
    pmap: PositionMap,
    *,
    heads: Sequence[int] | None = None,
) -> HookFn:
    """A hook ``fn(act, *, hook)`` writing ``source_act`` (one hook point's activation from the
    source run) into the target run at the map's positions; ``heads`` restricts a per-head
    activation (``attn.hook_z``, ``[batch, pos, head, d_head]``) to those heads."""
    return _patch_fn(_make_patch("", source_act, pmap, heads))


def _patch_fn(patch: Patch) -> HookFn:
    def hook(act: Tensor, *, hook: Any) -> Tensor:
        if act.shape[1] != patch.target_len:
            raise PatchingError(
                f"{hook.name}: target run has {act.shape[1]} positions but the map's target "
                f"prompt {patch.target_id!r} has {patch.target_len}"
            )
        out = act.clone()  # never write into a tensor autograd or another hook may hold
        _put(out, patch)
        return out

    return hook


def rows_hook(entries: Sequence[tuple[int, Patch]], batch: PaddedBatch) -> HookFn:
    """One hook for a hook point of a batched forward: row ``b`` gets its own patch at its own
    (offset) positions; rows without an entry pass through unchanged."""

    def hook(act: Tensor, *, hook: Any) -> Tensor:
        out = act.clone()
        for b, patch in entries:
            _put(out[b : b + 1], patch, batch.offsets[b])
        return out

    return hook


def check_pair(
    model: SpeechLM, source: EncodedPrompt, target: EncodedPrompt, pmap: PositionMap
) -> None:
    model.require_eval()
    check_prompt(model, source, "source")
    check_prompt(model, target, "target")
    pmap.check(source, target)


def resolve_layer_sets(
    model: SpeechLM, layers: int | Iterable[int | Iterable[int]] | None
) -> list[tuple[int, ...]]:
    n = model.n_layers
    if layers is None:
        entries: list[tuple[int, ...]] = [(i,) for i in range(n)]
    elif isinstance(layers, int):
        entries = [(layers,)]
    else:
        entries = [(int(e),) if isinstance(e, int) else tuple(int(x) for x in e) for e in layers]
    for e in entries:
        if not e:
            raise PatchingError("an empty layer set patches nothing")
        bad = [x for x in e if not 0 <= x < n]
        if bad:
            raise PatchingError(f"layer {bad[0]} out of range 0..{n - 1} for {model.path}")
    return entries


def unpad(x: Tensor, batch: PaddedBatch, b: int) -> Tensor:
    """Row ``b`` of a batched activation at its real columns, as ``[1, own length, ...]``."""
    if len(batch) == 1:
        return x
    return x[b : b + 1, batch.columns(b)].clone()  # a copy: the batch tensor can be freed


def cache_bytes_per_token(model: SpeechLM, names: Collection[str]) -> int:
    cfg = model.bridge.cfg
    width = torch.finfo(next(model.bridge.parameters()).dtype).bits // 8
    per_point = max(int(cfg.d_model), int(cfg.n_heads) * int(cfg.d_head))  # resid / z
    return len(names) * per_point * width


def cache_sources(
    model: SpeechLM,
    prompts: Sequence[EncodedPrompt],
    names: Iterable[str],
    *,
    batch_size: int | str = 1,
    memory_budget_gb: float | None = None,
    padding_side: str = "right",
) -> list[SourceRun]:
    """Run every prompt once, caching only ``names``: ``batch_size`` prompts (an int, or
    ``"auto"`` from the memory budget) per padded forward. Each prompt's logits and cache come
    back un-padded, ``[1, its length, ...]``, as from its own run (fp32: up to summation
    order)."""
    wanted = sorted(set(names))
    seqs = [p.tokens for p in prompts]
    batches = plan_batches(
        model,
        [len(x) for x in seqs],
        batch_size,
        memory_budget_gb=memory_budget_gb,
        extra_bytes_per_token=cache_bytes_per_token(model, wanted),
    )
    runs: dict[int, SourceRun] = {}
    for idx in batches:
        batch, tokens, kwargs = padded_inputs(model, [seqs[i] for i in idx], padding_side)
        with torch.no_grad():
            logits, cache = model.bridge.run_with_cache(tokens, names_filter=wanted, **kwargs)
        for b, i in enumerate(idx):
            runs[i] = (unpad(logits, batch, b), {n: unpad(cache[n], batch, b) for n in wanted})
    return [runs[i] for i in range(len(seqs))]


def cache_source(model: SpeechLM, source: EncodedPrompt, names: Iterable[str]) -> SourceRun:
    """Run ``source`` once, caching only ``names`` (``names_filter``); returns logits and cache."""
    return cache_sources(model, [source], names)[0]


def row_patches(
    source_cache: Mapping[str, Tensor],
    pmap: PositionMap,
    component: str,
    layers: Iterable[int],
    heads: Sequence[int] | None,
) -> tuple[Patch, ...]:
    if heads is not None and component != "z":
        raise PatchingError(f"heads= applies to component 'z' only, not {component!r}")
    out = []
    for layer in layers:
        name = hook_name(component, layer)
        if name not in source_cache:
            raise PatchingError(f"source cache has no {name!r}; cache it with cache_source")
        out.append(_make_patch(name, source_cache[name], pmap, heads))
    return tuple(out)


def patching_hooks(
    source_cache: Mapping[str, Tensor],
    pmap: PositionMap,
    *,
    component: str = "resid_pre",
    layers: Iterable[int],
    heads: Sequence[int] | None = None,
) -> list[tuple[str, HookFn]]:
    """``fwd_hooks`` for ``bridge.run_with_hooks`` / ``bridge.hooks()``: patch ``component`` at
    every layer in ``layers`` (jointly) from ``source_cache`` into the target at ``pmap``."""
    patches = row_patches(source_cache, pmap, component, layers, heads)
    return [(p.name, _patch_fn(p)) for p in patches]


def run_patched(
    model: SpeechLM,
    source: EncodedPrompt,
    target: EncodedPrompt,
    pmap: PositionMap,
    *,
    component: str = "resid_pre",
    layers: int | Iterable[int] = 0,
    heads: Sequence[int] | None = None,
    fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
) -> Float[Tensor, "1 pos vocab"]:
    """Logits of ``target`` with ``component`` at ``layers`` (patched jointly) taken from
    ``source`` at ``pmap``'s positions; ``fwd_hooks`` run alongside (e.g. lens readers)."""
    check_pair(model, source, target, pmap)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    resolve_layer_sets(model, [tuple(layer_list)])
    _, cache = cache_source(model, source, [hook_name(component, i) for i in layer_list])
    hooks = patching_hooks(cache, pmap, component=component, layers=layer_list, heads=heads)
    with torch.no_grad():
        return model.bridge.run_with_hooks(
            _batch(target.tokens, model.device), fwd_hooks=[*hooks, *fwd_hooks]
        )
