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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from speech_lens._tl import final_norm_and_unembed, resid_post_name, resid_pre_name
from speech_lens.adapters import SpeechLM
from speech_lens.data import Utterance
from speech_lens.lens.tuned import TunedLens, exact_unembed_hash, unembed_weight
from speech_lens.readout import readout_logits

CHECKPOINT_FILE = "checkpoint.pt"
PROVENANCE_FILE = "provenance.json"  # beside the lens files, which keep the tuned-lens format
DATA_MODES = ("text", "speech", "interleaved", "mix")
# fields that may change between an interrupted run and its resumption
_RESUME_FREE = ("checkpoint_every",)


class TrainError(ValueError):
    """Bad training input or a checkpoint that does not belong to this run (names the file)."""


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
    train_kl: Float[Tensor, "step layer"]  # mean KL per step and layer (nats/token)
    steps_done: int
    tokens_seen: int
    finished: bool  # False when stopped early by ``stop_after`` (checkpoint written)


# --------------------------------------------------------------------------------------------
# Streaming the residuals
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last resid_pre hook: the rest of the forward is not needed."""


@dataclass(frozen=True)
class FinalDist:
    """The final distribution at the valid positions, in the form the KL needs.

    ``KL(p‖q) = Σ p log p − Σ p·logits_q + logsumexp(logits_q)·Σ p``: keeping ``p`` and
    ``Σ p log p`` avoids a log-softmax and an exp over ``[n, vocab]`` per layer.
    """

    probs: Float[Tensor, "n vocab"]
    plogp: Float[Tensor, " n"]
    mass: Float[Tensor, " n"]  # Σ p, 1 up to rounding; kept so the identity is exact

    @classmethod
    def from_residual(cls, model: SpeechLM, h: Float[Tensor, "n d_model"], chunk: int) -> FinalDist:
        """Final norm + unembedding of the last residual, ``chunk`` rows at a time, so that
        only ``probs`` is ``[n, vocab]`` (no full logits / log-prob copies alongside it)."""
        norm, unembed = final_norm_and_unembed(model.bridge)
        n, vocab = h.shape[0], int(unembed_weight(unembed).shape[0])
        probs = torch.empty(n, vocab, device=h.device)
        plogp = torch.empty(n, device=h.device)
        for s in range(0, n, chunk):
            logp = readout_logits(norm, unembed, h[s : s + chunk]).log_softmax(-1)
            p = torch.exp(logp, out=probs[s : s + chunk])
            plogp[s : s + chunk] = torch.einsum("nv,nv->n", p, logp)
        return cls(probs, plogp, probs.sum(-1))

    def __getitem__(self, sl: slice) -> FinalDist:
        return FinalDist(self.probs[sl], self.plogp[sl], self.mass[sl])


LayerFn = Callable[[int, Float[Tensor, "n d_model"], FinalDist], None]


def stream_layers(
    model: SpeechLM,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    fn: LayerFn,
    chunk: int = 512,
) -> None:
    """Call ``fn(layer, resid_pre[mask], final_dist[mask])`` for layer 0..n_layers-1.

    Two frozen passes (see module docstring); only one layer's residual is alive at a time.
    Pass 1 stops at the last block's output and unembeds it ``chunk`` positions at a time.
    """
    bridge = model.bridge
    tokens = tokens.to(model.device)
    mask = mask.to(model.device)
    last = model.n_layers - 1
    with torch.no_grad():
        got: list[Tensor] = []

        def final_resid(act: Tensor, *, hook: Any) -> None:
            got.append(act[mask])
            raise _StopForward  # the model's own unembedding of all positions is not needed

        with contextlib.suppress(_StopForward):
            bridge.run_with_hooks(
                tokens, fwd_hooks=[(resid_post_name(last), final_resid)], use_cache=False
            )
        if not got:  # pragma: no cover - would mean the bridge skipped a block
            raise RuntimeError(f"the hook on {resid_post_name(last)} never fired")
        final = FinalDist.from_residual(model, got.pop(), chunk)

        def read(act: Tensor, *, hook: Any, layer: int) -> None:
            fn(layer, act[mask], final)
            if layer == last:
                raise _StopForward

        hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (resid_pre_name(i), functools.partial(read, layer=i)) for i in range(model.n_layers)
        ]
        try:
            bridge.run_with_hooks(tokens, fwd_hooks=hooks, use_cache=False)
        except _StopForward:
            pass
        else:  # pragma: no cover - would mean the bridge skipped a block
            raise RuntimeError(f"the hook on {resid_pre_name(last)} never fired")


def kl_sum(
    lens: TunedLens | None,
    model: SpeechLM,
    layer: int,
    h: Float[Tensor, "n d_model"],
    final: FinalDist,
) -> Tensor:
    """Σ over positions of KL(p_final ‖ lens_layer(h)); ``lens=None`` is the logit lens."""
    if lens is None:
        norm, unembed = final_norm_and_unembed(model.bridge)
        logits = readout_logits(norm, unembed, h)
    else:
        logits = lens(h, layer)
    logits = logits.float()
    cross = torch.einsum("nv,nv->n", final.probs, logits) - torch.logsumexp(logits, -1) * final.mass
    return (final.plogp - cross).sum()


def lens_kl(
    model: SpeechLM,
    lens: TunedLens | None,
    sequences: Sequence[Tensor],
    *,
    batch_size: int = 8,
    chunk_tokens: int = 512,
    progress: bool = False,
) -> Float[Tensor, " layer"]:
    """Mean KL(final ‖ lens) per token at ``resid_pre`` of every layer (``lens=None``: logit lens).

    Returns ``n_layers + 1`` values; the last row reads the final residual and is 0 by definition.
    """
    model.require_eval()
    seqs = [s for s in sequences if len(s) > 0]
    if not seqs:
        raise TrainError("no sequences to evaluate")
    total = torch.zeros(model.n_layers + 1, dtype=torch.float64)
    n_tok = 0

    def fn(layer: int, h: Tensor, final: FinalDist) -> None:
        for s in range(0, h.shape[0], chunk_tokens):
            total[layer] += float(
                kl_sum(lens, model, layer, h[s : s + chunk_tokens], final[s : s + chunk_tokens])
            )

    batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
    for batch in tqdm(batches, desc="held-out KL", disable=not progress):
        tokens, mask = pad_right(batch)
        n_tok += int(mask.sum())
        with torch.no_grad():
            stream_layers(model, tokens, mask, fn, chunk_tokens)
    return (total / n_tok).float()


def pad_right(
    seqs: Sequence[Tensor], pad_id: int = 0
) -> tuple[Int[Tensor, "b pos"], Bool[Tensor, "b pos"]]:
    """Right padding is harmless under causal attention: real positions never see the pads."""
    n = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = True
    return tokens, mask


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def encode_training_data(
    model: SpeechLM, utterances: Iterable[Utterance], mode: str, *, seed: int = 0
) -> tuple[list[Tensor], dict[str, int]]:
    """Token sequences of ``utterances`` in the family's prompt format, and how many per mode.

    ``mode`` is text, speech or interleaved (``prompts.encode_prompt``), or ``mix``: each
    utterance in one of the three, drawn with a seeded RNG. Which one the translators see
    changes what they reveal at speech positions, so the choice is recorded in the lens config.
    """
    from speech_lens.prompts import encode_prompt

    if mode not in DATA_MODES:
        raise TrainError(f"data mode {mode!r} is not one of {DATA_MODES}")
    rng = random.Random(seed)
    seqs: list[Tensor] = []
    counts = dict.fromkeys(DATA_MODES[:3], 0)
    for j, utt in enumerate(utterances):
        m = rng.choice(DATA_MODES[:3]) if mode == "mix" else mode
        prompt = encode_prompt(model, utt, mode=m, seed=seed * 1_000_003 + j)  # type: ignore[arg-type]
        seqs.append(prompt.tokens)
        counts[m] += 1
    if not seqs:
        raise TrainError("no utterances to encode")
    return seqs, {k: v for k, v in counts.items() if v}


def split_heldout(
    utterances: Iterable[Utterance], fraction: float
) -> tuple[list[Utterance], list[Utterance]]:
    """(train, held-out) by a hash of the utterance id: stable across runs and manifest order."""
    if not 0.0 <= fraction < 1.0:
        raise TrainError(f"held-out fraction must be in [0, 1), got {fraction}")
    train: list[Utterance] = []
    held: list[Utterance] = []
    for u in utterances:
        x = int.from_bytes(hashlib.sha256(u.id.encode()).digest()[:8], "big") / 2**64
        (held if x < fraction else train).append(u)
    return train, held


def prepare_sequences(sequences: Sequence[Tensor], max_seq_len: int) -> list[Tensor]:
    """1-D id tensors split into windows of at most ``max_seq_len`` (tuned-lens chunks too)."""
    out: list[Tensor] = []
    for i, s in enumerate(sequences):
        s = torch.as_tensor(s, dtype=torch.long)
        if s.ndim != 1:
            raise TrainError(
                f"training sequence {i} has shape {tuple(s.shape)}; expected 1-D token ids"
            )
        out.extend(w for w in s.split(max_seq_len) if len(w) > 0)
    if not out:
        raise TrainError("no training tokens: every sequence is empty")
    return out


def data_fingerprint(sequences: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(len(s).to_bytes(8, "little"))
        h.update(s.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


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
    """
    cfg = config or TrainConfig()
    model.require_eval()
    seqs = prepare_sequences(sequences, cfg.max_seq_len)
    fingerprint = data_fingerprint(seqs)
    norm, unembed = final_norm_and_unembed(model.bridge)
    model_hash = exact_unembed_hash(norm, unembed)

    lens = TunedLens.from_model(model, data_mode=cfg.data_mode)
    opt = torch.optim.SGD(
        lens.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    step, cursor, tokens_seen = 0, 0, 0
    history: list[Tensor] = []

    ckpt_path = Path(out) / CHECKPOINT_FILE if out is not None else None
    identity = {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE},
        "data": fingerprint,
        "model": model_hash,
    }
    if ckpt_path is not None and resume and ckpt_path.exists():
        ck = _load_checkpoint(ckpt_path, identity)
        lens.layer_translators.load_state_dict(ck["lens"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, cursor, tokens_seen = int(ck["step"]), int(ck["cursor"]), int(ck["tokens_seen"])
        history = list(ck["history"])

    order = _order(len(seqs), cfg.seed, cursor)
    bar = tqdm(total=cfg.steps, initial=step, desc="tuned lens", disable=not progress or rank > 0)
    while step < cfg.steps:
        batch: list[Tensor] = []
        n_tok = 0
        while n_tok < cfg.tokens_per_step:
            s = seqs[next(order)]
            batch.append(s)
            n_tok += len(s)
        cursor += len(batch)

        opt.zero_grad(set_to_none=False)
        step_kl = torch.zeros(model.n_layers, dtype=torch.float64)
        for m, i in enumerate(range(0, len(batch), cfg.batch_size)):
            if m % world == rank:
                tokens, mask = pad_right(batch[i : i + cfg.batch_size])
                _accumulate(model, lens, tokens, mask, 1.0 / n_tok, cfg.chunk_tokens, step_kl)
        if reduce_grads is not None:
            reduce_grads(list(lens.parameters()), step_kl)
        torch.nn.utils.clip_grad_norm_(lens.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        tokens_seen += n_tok
        history.append((step_kl / n_tok).float())
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
            return TrainResult(lens, torch.stack(history), step, tokens_seen, finished=False)
    bar.close()

    final_kl = history[-1] if history else torch.zeros(model.n_layers)
    extras: dict[str, Any] = {
        "steps": cfg.steps,
        "tokens": tokens_seen,
        "data_mode": cfg.data_mode,
        "training": {
            **dataclasses.asdict(cfg),
            "lr": cfg.lr,
            "n_sequences": len(seqs),
            "data_sha256": fingerprint,
            "final_train_kl": [round(float(x), 6) for x in final_kl],
            **(extra_config or {}),
        },
    }
    lens.config = dataclasses.replace(lens.config, **extras)
    if out is not None and rank == 0:
        lens.save(out)
        write_lens_provenance(model, lens, out, data=data)
        if ckpt_path is not None and ckpt_path.exists():
            ckpt_path.unlink()  # the lens is saved; a full-size optimizer state is not worth keeping
    return TrainResult(lens, torch.stack(history), step, tokens_seen, finished=True)


def write_lens_provenance(
    model: SpeechLM, lens: TunedLens, out: str | Path, *, data: str | Path | None = None
) -> Path:
    """``out/provenance.json`` for the lens saved in ``out`` (rewrite it after every save: it
    holds the sha256 of the lens files). Settings: the training config, without its results."""
    from speech_lens.provenance import collect_provenance, write_provenance

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
) -> None:
    """Back-propagate each layer's KL into its own translator while the model streams."""

    def fn(layer: int, h: Tensor, final: FinalDist) -> None:
        params = list(lens.layer_translators[layer].parameters())
        for s in range(0, h.shape[0], chunk):
            with torch.enable_grad():
                kl = kl_sum(lens, model, layer, h[s : s + chunk], final[s : s + chunk])
                # inputs=: gradients reach this translator only, never the frozen model
                (kl * scale).backward(inputs=params)
            step_kl[layer] += float(kl.detach())

    stream_layers(model, tokens, mask, fn, chunk)


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


def _load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
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
    return ck


def held_out_table(logit_kl: Tensor, tuned_kl: Tensor) -> str:
    """Plain-text table of per-layer held-out KL, logit lens vs tuned lens."""
    lines = [f"{'layer':>5}  {'logit lens':>11}  {'tuned lens':>11}  {'ratio':>6}"]
    for i, (a, b) in enumerate(zip(logit_kl.tolist(), tuned_kl.tolist(), strict=True)):
        ratio = f"{b / a:6.3f}" if a > 0 and not math.isnan(a) else "     -"
        lines.append(f"{i:>5}  {a:11.4f}  {b:11.4f}  {ratio}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line: ``speech-lens tuned-lens train|eval`` (the parser is in cli.py)
# --------------------------------------------------------------------------------------------


def cli_load(args: Any) -> tuple[SpeechLM, list[Utterance]]:
    from speech_lens.adapters import load_from_args
    from speech_lens.data import read_manifest

    model = load_from_args(args)
    reader = read_manifest(args.data, layout=model.layout)
    utts = list(reader)
    if reader.report.n_skipped:
        print(reader.report.summary(), file=sys.stderr)
    if not utts:
        raise TrainError(f"{args.data}: no usable utterances")
    return model, utts


def config_from_args(args: Any) -> TrainConfig:
    """``TrainConfig`` from parsed arguments: the options given, defaults for the rest."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in given.items() if v is not None})


def cli_train(args: Any) -> int:
    from speech_lens.lens.tuned import LensError

    try:
        model, utts = cli_load(args)
        train_u, held_u = split_heldout(utts, args.heldout)
        seeds = args.seed if args.seed is not None else TrainConfig.seed
        seqs, modes = encode_training_data(model, train_u, args.data_mode, seed=seeds)
        cfg = config_from_args(args)
        info = {
            "data": str(args.data),
            "n_utterances": len(train_u),
            "modes": modes,
            "heldout_fraction": args.heldout,
        }
        result = train_tuned_lens(
            model,
            seqs,
            cfg,
            out=args.out,
            resume=not args.no_resume,
            progress=not args.no_progress,
            extra_config=info,
            data=args.data,
        )
        print(
            f"saved tuned lens ({result.steps_done} steps, {result.tokens_seen} tokens) to {args.out}"
        )
        if held_u:
            held, _ = encode_training_data(model, held_u, args.data_mode, seed=seeds + 1)
            logit = lens_kl(
                model, None, held, batch_size=cfg.batch_size, progress=not args.no_progress
            )
            tuned = lens_kl(
                model, result.lens, held, batch_size=cfg.batch_size, progress=not args.no_progress
            )
            training = {**(result.lens.config.training or {}), "heldout_utterances": len(held_u)}
            training["heldout_kl_logit"] = [round(float(x), 6) for x in logit]
            training["heldout_kl_tuned"] = [round(float(x), 6) for x in tuned]
            result.lens.save(args.out, training=training)
            write_lens_provenance(model, result.lens, args.out, data=args.data)
            print(
                f"held-out KL(final ‖ lens), nats/token, {len(held_u)} utterances ({args.data_mode}):"
            )
            print(held_out_table(logit, tuned))
    except (TrainError, LensError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli_eval(args: Any) -> int:
    from speech_lens.lens.tuned import LensError

    try:
        model, utts = cli_load(args)
        lens = TunedLens.load(args.lens, model)
        mode = args.data_mode or lens.config.data_mode or "mix"
        if args.heldout is not None:
            utts = split_heldout(utts, args.heldout)[1]
        seqs, _ = encode_training_data(model, utts, mode, seed=args.seed + 1)
        logit = lens_kl(model, None, seqs, batch_size=args.batch_size)
        tuned = lens_kl(model, lens, seqs, batch_size=args.batch_size)
    except (TrainError, LensError) as e:
        print(f"speech-lens: error: {e}", file=sys.stderr)
        return 2
    print(f"KL(final ‖ lens), nats/token, {len(utts)} utterances ({mode}):")
    print(held_out_table(logit, tuned))
    return 0


def kl_figure(
    logit_kl: Float[Tensor, " row"], tuned_kl: Float[Tensor, " row"], title: str = ""
) -> go.Figure:
    """Per-layer KL(final ‖ lens), logit lens vs tuned lens.

    Rows are lens rows: 0 = embeddings (``resid_pre`` of block 0) ... ``n_layers`` = output.
    """
    rows = list(range(len(logit_kl)))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=rows, y=logit_kl.tolist(), mode="lines+markers", name="logit lens"))
    fig.add_trace(go.Scatter(x=rows, y=tuned_kl.tolist(), mode="lines+markers", name="tuned lens"))
    fig.update_layout(
        title=title or "KL(final distribution ‖ lens) per layer",
        xaxis_title="layer (resid_pre; last = output)",
        yaxis_title="KL, nats/token",
        template="plotly_white",
    )
    return fig
