"""Training a tuned lens: KL(final distribution ‖ lens distribution) per layer, tuned-lens recipe.

Memory stays bounded as layers grow: each micro-batch runs the frozen model twice under
``no_grad`` and without a KV cache. Pass 1 stops at the last block's output and keeps only the
final distribution of the valid positions (unembedded in position chunks). Pass 2 hooks
``blocks.{i}.hook_resid_pre``; when layer ``i``'s residual arrives, its loss is computed in
position chunks and back-propagated into translator ``i`` alone, and the residual is dropped
before the next block runs; the last hook stops the forward. No residual cache is ever held: the
extra memory is the ``[tokens, vocab]`` final distribution plus one layer's residual and one
``[chunk, vocab]`` readout with its graph, whatever the depth (the price is a second frozen
forward per micro-batch; tuned-lens itself keeps all ``hidden_states``).

Recipe (``tuned_lens/scripts/train_loop.py``): SGD with Nesterov momentum 0.9,
``lr = lr_scale·(1−momentum)``, weight decay 1e-3, gradient-norm clip 1.0, linear warm-up then
linear decay to 0, a token budget per step, target shift 0.

A selection of translators (``layers``, e.g. ``layer_stride(n_layers + 1, 3)``) trains only
those: only their rows are read and unembedded each step, the others stay exactly zero (= the
logit lens) and are saved as such, so the file keeps the tuned-lens layout. Each translator's
loss depends on its own parameters only; the one coupling between them is the recipe's global
gradient-norm clip, taken over the translators trained. So a selection's translators are those
of a full run whenever the clip does not bind (and close to them when it does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from speech_lens._tl import final_norm_and_unembed
from speech_lens.lens.kl import FinalDist, kl_sum, stream_layers
from speech_lens.lens.rows import translator_rows
from speech_lens.lens.train_data import (
    DATA_MODES,
    TrainError,
    data_fingerprint,
    pad_right,
    prepare_sequences,
)
from speech_lens.lens.tuned import TunedLens, exact_unembed_hash
from speech_lens.models.load import SpeechLM
from speech_lens.provenance import collect_provenance, write_provenance

CHECKPOINT_FILE = "checkpoint.pt"
PROVENANCE_FILE = "provenance.json"  # beside the lens files, which keep the tuned-lens format
# fields that may change between an interrupted run and its resumption
_RESUME_FREE = ("checkpoint_every",)


@dataclass(frozen=True)
class TrainConfig:
    """Tuned-lens defaults except ``tokens_per_step`` (2**18 in tuned-lens; CPU-sized here)."""

    steps: int = 250
    tokens_per_step: int = 2**16
    batch_size: int = 8  # sequences per forward pass
    max_seq_len: int = 2048  # longer sequences are split into windows of this length
    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_steps: int = 0
    grad_clip: float = 1.0
    chunk_tokens: int = 512  # positions unembedded at once: bounds the [chunk, vocab] readout
    seed: int = 0
    checkpoint_every: int = 50
    data_mode: str = "text"

    def __post_init__(self) -> None:
        if self.data_mode not in DATA_MODES:
            raise TrainError(f"data_mode {self.data_mode!r} is not one of {DATA_MODES}")
        for name in (
            "steps",
            "tokens_per_step",
            "batch_size",
            "max_seq_len",
            "chunk_tokens",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise TrainError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise TrainError(
                f"warmup_steps {self.warmup_steps} must be in 0..steps-1 ({self.steps - 1})"
            )

    @property
    def lr(self) -> float:
        return self.lr_scale * (1.0 - self.momentum)


@dataclass(frozen=True)
class TrainResult:
    lens: TunedLens
    train_kl: Float[Tensor, "step layer"]  # mean KL per step and trained layer (nats/token)
    layers: tuple[int, ...]  # the translators trained: train_kl's columns
    steps_done: int
    tokens_seen: int
    finished: bool  # False when stopped early by ``stop_after`` (checkpoint written)


def _order(n: int, seed: int, cursor: int) -> Iterator[int]:
    """Sequence indices from global position ``cursor`` on: a fresh seeded shuffle per epoch."""
    while True:
        epoch, start = divmod(cursor, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for j in range(start, n):
            yield int(perm[j])
        cursor = (epoch + 1) * n


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then linear decay to 0 at ``steps`` (HF's linear schedule)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    return factor


def train_tuned_lens(
    model: SpeechLM,
    sequences: Sequence[Tensor],
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
    rank: int = 0,
    world: int = 1,
    reduce_grads: Callable[[list[Tensor], Tensor], None] | None = None,
    data: str | Path | None = None,
    layers: Sequence[int] | None = None,
    params_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train a tuned lens on ``sequences`` (1-D token-id tensors, e.g. ``EncodedPrompt.tokens``).

    With ``out``, a checkpoint is written atomically every ``checkpoint_every`` steps and a run
    resumes from it (same config, data and model, else ``TrainError``); at the end the lens is
    saved to ``out`` in the tuned-lens layout and the checkpoint removed. ``stop_after=k`` stops
    after step k with a checkpoint written (what an interruption leaves behind).
    ``extra_config`` is stored in ``config.json`` under ``training``; ``provenance.json`` beside
    the lens records model, code, ``data`` (the manifest path) and lens hashes.

    Data parallel (``speech_lens.distributed``): every rank draws the same step batch, micro-batch
    ``m`` runs on rank ``m % world``, and ``reduce_grads(params, step_kl)`` sums gradients and
    KL across ranks before clipping; only rank 0 writes checkpoints and the lens.

    ``layers``: lens rows whose translators train (``layer_stride`` / ``selected_rows`` rows;
    the output row has no translator); the rest stay zero. Recorded in the lens config
    (``trained_layers``) and in the checkpoint: a resumed run must ask for the same rows.
    ``params_dtype`` (e.g. ``torch.float16``): the trained lens is rounded to it and saved in it
    (half the bytes); the returned lens holds the rounded values, so it is the saved one.
    """
    cfg = config or TrainConfig()
    model.require_eval()
    try:
        trained = translator_rows(layers, model.n_layers)
    except ValueError as e:
        raise TrainError(str(e)) from None
    seqs = prepare_sequences(sequences, cfg.max_seq_len)
    fingerprint = data_fingerprint(seqs)
    norm, unembed = final_norm_and_unembed(model.bridge)
    model_hash = exact_unembed_hash(norm, unembed)

    lens = TunedLens.from_model(model, data_mode=cfg.data_mode, trained_layers=trained)
    opt, sched = optimizer(lens, cfg, trained)
    step, cursor, tokens_seen = 0, 0, 0
    history: list[Tensor] = []

    ckpt_path = Path(out) / CHECKPOINT_FILE if out is not None else None
    identity = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE},
        "data": fingerprint,
        "model": model_hash,
        "layers": list(trained),
    }
    if ckpt_path is not None and resume and ckpt_path.exists():
        step, cursor, tokens_seen, history = resume_from(ckpt_path, identity, lens, opt, sched)

    order = _order(len(seqs), cfg.seed, cursor)
    bar = tqdm(total=cfg.steps, initial=step, desc="tuned lens", disable=not progress or rank > 0)
    while step < cfg.steps:
        batch = step_batch(seqs, order, cfg.tokens_per_step)
        n_tok = sum(len(x) for x in batch)
        cursor += len(batch)
        step_kl = train_step(
            model, lens, batch, cfg, opt, sched, rank, world, reduce_grads, trained
        )
        step += 1
        tokens_seen += n_tok
        history.append((step_kl[list(trained)] / n_tok).float())
        bar.update(1)
        bar.set_postfix(kl=f"{history[-1].mean():.4f}", tokens=tokens_seen)

        stopping = stop_after is not None and step >= stop_after and step < cfg.steps
        due = step % cfg.checkpoint_every == 0 or stopping
        if ckpt_path is not None and due and rank == 0:
            _save_checkpoint(
                ckpt_path, identity, lens, opt, sched, step, cursor, tokens_seen, history
            )
        if stopping:
            bar.close()
            return TrainResult(
                lens, torch.stack(history), trained, step, tokens_seen, finished=False
            )
    bar.close()

    final_kl = history[-1] if history else torch.zeros(len(trained))
    training = {"n_sequences": len(seqs), "data_sha256": fingerprint, "final_kl": final_kl}
    if params_dtype is not None:
        round_params(lens, params_dtype)
        extra_config = {**(extra_config or {}), "params_dtype": str(params_dtype).split(".")[-1]}
    lens.config = trained_config(lens, cfg, tokens_seen, training, extra_config)
    if out is not None and rank == 0:
        lens.save(out, params_dtype=params_dtype)
        write_lens_provenance(model, lens, out, data=data)
        if ckpt_path is not None and ckpt_path.exists():
            ckpt_path.unlink()  # the lens is saved; a full-size optimizer state is not worth keeping
    return TrainResult(lens, torch.stack(history), trained, step, tokens_seen, finished=True)


def round_params(lens: TunedLens, dtype: torch.dtype) -> None:
    """Round the translators to ``dtype`` in place (they stay float32 tensors)."""
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(p.to(dtype))


def write_lens_provenance(
    model: SpeechLM, lens: TunedLens, out: str | Path, *, data: str | Path | None = None
) -> Path:
    """``out/provenance.json`` for the lens saved in ``out`` (rewrite it after every save: it
    holds the sha256 of the lens files). Settings: the training config, without its results."""

    results = ("final_train_kl", "heldout_kl_logit", "heldout_kl_tuned")
    training = {k: v for k, v in (lens.config.training or {}).items() if k not in results}
    prov = collect_provenance(model, data=data, lens=f"tuned:{out}", settings=training)
    return write_provenance(Path(out) / PROVENANCE_FILE, prov)


def _accumulate(
    model: SpeechLM,
    lens: TunedLens,
    tokens: Tensor,
    mask: Tensor,
    scale: float,
    chunk: int,
    step_kl: Tensor,
    layers: Sequence[int] | None = None,
) -> None:
    """Back-propagate each layer's KL into its own translator while the model streams
    (``layers``: only these translators' rows are read; default all)."""

    def fn(layer: int, h: Tensor, final: FinalDist) -> None:
        params = list(lens.layer_translators[layer].parameters())
        for s in range(0, h.shape[0], chunk):
            with torch.enable_grad():
                kl = kl_sum(lens, model, layer, h[s : s + chunk], final[s : s + chunk])
                # inputs=: gradients reach this translator only, never the frozen model
                (kl * scale).backward(inputs=params)
            step_kl[layer] += float(kl.detach())

    stream_layers(model, tokens, mask, fn, chunk, layers=layers)


def _save_checkpoint(
    path: Path,
    identity: dict[str, Any],
    lens: TunedLens,
    opt: torch.optim.Optimizer,
    sched: Any,
    step: int,
    cursor: int,
    tokens_seen: int,
    history: list[Tensor],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "identity": json.dumps(identity, sort_keys=True),
        "lens": lens.layer_translators.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "cursor": cursor,
        "tokens_seen": tokens_seen,
        "history": torch.stack(history),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, identity: dict[str, Any], n_layers: int) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: say which
        raise TrainError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != 1:
        raise TrainError(f"{path} is not a speech_lens tuned-lens checkpoint")
    stored = json.loads(ck["identity"])
    for key, what in (("model", "model"), ("data", "training data"), ("config", "training config")):
        if stored[key] != identity[key]:
            detail = ""
            if key == "config":
                diff = {
                    k: (stored[key].get(k), v)
                    for k, v in identity[key].items()
                    if stored[key].get(k) != v
                }
                detail = f" (checkpoint vs now: {diff})"
            raise TrainError(
                f"checkpoint {path} was written for a different {what}{detail}; "
                f"use another --out directory or delete the checkpoint to start over"
            )
    # a checkpoint from before layer selection trained every translator
    was = stored.get("layers", list(range(n_layers)))
    if was != identity["layers"]:
        raise TrainError(
            f"checkpoint {path} trains the translators of rows {_rows_text(was, n_layers)}, "
            f"this run asks for rows {_rows_text(identity['layers'], n_layers)}; resume with "
            "the same --layers / --layer-stride, use another --out directory or delete the "
            "checkpoint to start over"
        )
    return ck


def _rows_text(rows: Sequence[int], n_layers: int) -> str:
    return "all" if list(rows) == list(range(n_layers)) else ",".join(map(str, rows))


def config_from_args(args: Any) -> TrainConfig:
    """``TrainConfig`` from parsed arguments: the options given, defaults for the rest."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def trained_parameters(lens: TunedLens, layers: Sequence[int] | None = None) -> list[Tensor]:
    """The parameters of translators ``layers`` (default all), in the lens's order."""
    rows = range(lens.n_layers) if layers is None else layers
    return [p for i in rows for p in lens.layer_translators[i].parameters()]


def optimizer(
    lens: TunedLens, cfg: TrainConfig, layers: Sequence[int] | None = None
) -> tuple[torch.optim.SGD, Any]:
    """SGD with Nesterov momentum and the warmup / decay schedule (tuned-lens recipe), over the
    translators ``layers`` (default all; the others get no update, not even weight decay)."""
    opt = torch.optim.SGD(
        trained_parameters(lens, layers),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))


def step_batch(seqs: Sequence[Tensor], order: Iterator[int], tokens_per_step: int) -> list[Tensor]:
    """The next sequences in ``order`` until they hold at least ``tokens_per_step`` tokens."""
    batch: list[Tensor] = []
    n_tok = 0
    while n_tok < tokens_per_step:
        s = seqs[next(order)]
        batch.append(s)
        n_tok += len(s)
    return batch


def train_step(
    model: SpeechLM,
    lens: TunedLens,
    batch: list[Tensor],
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    sched: Any,
    rank: int,
    world: int,
    reduce_grads: Callable[[list[Tensor], Tensor], None] | None,
    layers: Sequence[int] | None = None,
) -> Tensor:
    """One optimizer step on ``batch`` for translators ``layers`` (default all); returns the
    summed KL per layer (float64, all ranks'; 0 at layers not trained)."""
    n_tok = sum(len(x) for x in batch)
    params = trained_parameters(lens, layers)
    opt.zero_grad(set_to_none=False)
    step_kl = torch.zeros(model.n_layers, dtype=torch.float64)
    for m, i in enumerate(range(0, len(batch), cfg.batch_size)):
        if m % world == rank:
            tokens, mask = pad_right(batch[i : i + cfg.batch_size])
            _accumulate(model, lens, tokens, mask, 1.0 / n_tok, cfg.chunk_tokens, step_kl, layers)
    if reduce_grads is not None:
        reduce_grads(params, step_kl)
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    return step_kl


def trained_config(
    lens: TunedLens,
    cfg: TrainConfig,
    tokens_seen: int,
    training: dict[str, Any],
    extra_config: dict[str, Any] | None,
) -> Any:
    """The lens config with what training did (stored in the lens's ``config.json``)."""
    extras: dict[str, Any] = {
        "steps": cfg.steps,
        "tokens": tokens_seen,
        "data_mode": cfg.data_mode,
        "training": {
            **dataclasses.asdict(cfg),
            "lr": cfg.lr,
            "n_sequences": training["n_sequences"],
            "data_sha256": training["data_sha256"],
            "trained_layers": list(lens.trained_layers),  # final_train_kl's rows
            "final_train_kl": [round(float(x), 6) for x in training["final_kl"]],
            **(extra_config or {}),
        },
    }
    return dataclasses.replace(lens.config, **extras)


def resume_from(
    path: Path, identity: dict[str, Any], lens: TunedLens, opt: torch.optim.Optimizer, sched: Any
) -> tuple[int, int, int, list[Tensor]]:
    """Load a checkpoint of the same run into ``lens``, ``opt`` and ``sched``; returns
    (step, cursor, tokens seen, KL history)."""
    ck = _load_checkpoint(path, identity, lens.n_layers)
    lens.layer_translators.load_state_dict(ck["lens"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    return int(ck["step"]), int(ck["cursor"]), int(ck["tokens_seen"]), list(ck["history"])
