"""Resumable training of the organisms (text pretraining, then the speech-text stage).

A run is a directory ``runs/<name>/`` holding ``state.pt`` (model + optimiser + step, written
atomically every few minutes), ``log.jsonl`` and, when finished, the exported checkpoint. Re-running
the same command resumes from ``state.pt``. Batches are a pure function of (seed, step), so a
resumed run sees exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from speech_lens.organisms.checkpoint import OrganismVocab, export, llama_config
from speech_lens.organisms.corpus import read_jsonl, word_units
from speech_lens.organisms.u0 import U0_PHONEMES, UnitNoise, load_lexicon


@dataclass(frozen=True)
class TrainConfig:
    name: str
    init: str = "random"  # "random" or the name of a finished run to start from
    mix: dict[str, float] = field(default_factory=lambda: {"text": 1.0})
    steps: int = 600
    lr: float = 1e-3
    warmup: int = 50
    batch: int = 16
    seq_len: int = 256
    seed: int = 0
    d_model: int = 192
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int = 512
    fact_rate: float = 0.05  # share of text examples that state a world fact
    span_probs: tuple[float, ...] = (0.7, 0.3)  # interleaving span length 1, 2, ... words
    aux_layer: int | None = None  # positive control: plant the current word at this layer
    aux_weight: float = 0.0
    # rotated control: the auxiliary loss reads lm_head(norm(Q h)), Q = aux_rotation(d, seed)
    aux_rotation_seed: int | None = None
    # speech units: "manifest" (the data folder's manifest_train.jsonl) or "u0" (idealised phoneme
    # units from u0_lexicon.json, a fresh noisy rendition of dose unit_noise at every draw)
    units: str = "manifest"
    unit_noise: float = 0.0
    autocast_bf16: bool = False  # bf16 autocast of forward + loss (weights and AdamW stay fp32)
    save_every_s: float = 150.0

    @classmethod
    def from_toml(cls, path: str | Path, name: str) -> TrainConfig:
        raw = tomllib.loads(Path(path).read_text())
        if name not in raw:
            raise KeyError(f"{path}: no run named {name!r} (have {', '.join(raw)})")
        d = dict(raw.get("defaults", {}))
        d.update(raw[name])
        if "span_probs" in d:
            d["span_probs"] = tuple(d["span_probs"])
        return cls(name=name, **d)


@dataclass
class Data:
    vocab: OrganismVocab
    clauses: list[np.ndarray]  # training clauses (held-out removed), word ids
    facts: list[np.ndarray]
    fillers: list[np.ndarray]
    utts: list[tuple[np.ndarray, list[np.ndarray]]]  # (word ids, unit ids per word)
    unit_noise: UnitNoise | None = None  # U0: a fresh noisy rendition of each utterance per draw


def load_data(
    data_dir: str | Path,
    *,
    need_speech: bool,
    units: str = "manifest",
    noise: float = 0.0,
    seed: int = 0,
) -> Data:
    d = Path(data_dir)
    meta = json.loads((d / "text.json").read_text())
    vocab = OrganismVocab.from_json(json.loads((d / "vocab.json").read_text()))
    if units not in ("manifest", "u0"):
        raise ValueError(f"units must be 'manifest' or 'u0', not {units!r}")

    def ids(ws: list[str]) -> np.ndarray:
        return np.array([vocab.word_id(w) for w in ws], dtype=np.int64)

    clauses = [ids(c) for c, h in zip(meta["clauses"], meta["held_out"], strict=True) if not h]
    utts = []
    if need_speech and units == "u0":
        utts = u0_utterances(d, meta["speech_train"], vocab)
    elif need_speech:
        for rec in read_jsonl(d / "manifest_train.jsonl"):
            words, per_word = word_units(rec)
            utts.append((ids(words), [np.array([vocab.unit_id(u) for u in us]) for us in per_word]))
    return Data(
        vocab,
        clauses,
        [ids(s.split()) for s in meta["facts"]],
        [ids(s.split()) for s in meta["fillers"]],
        utts,
        UnitNoise(noise, seed) if units == "u0" else None,
    )


def u0_utterances(
    data_dir: Path, clauses: list[str], vocab: OrganismVocab
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """The spoken training clauses with each word's clean U0 unit ids (``u0_lexicon.json``)."""
    if vocab.n_units != len(U0_PHONEMES):
        raise ValueError(
            f"{data_dir / 'vocab.json'}: n_units is {vocab.n_units}, U0 has {len(U0_PHONEMES)}"
        )
    lexicon = load_lexicon(data_dir / "u0_lexicon.json")
    out = []
    for clause in clauses:
        words = clause.split()
        missing = [w for w in words if w not in lexicon]
        if missing:
            raise ValueError(f"{data_dir / 'u0_lexicon.json'}: no phonemes for {missing}")
        per_word = [np.array([vocab.unit_id(u) for u in lexicon[w]]) for w in words]
        out.append((np.array([vocab.word_id(w) for w in words]), per_word))
    return out


def draw_utterance(data: Data, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A training utterance; under U0 a fresh rendition with the run's unit noise (the
    rendition key is drawn from the batch's generator, so batches stay a function of the step)."""
    words, units = data.utts[int(rng.integers(len(data.utts)))]
    if data.unit_noise is None:
        return words, units
    key = int(rng.integers(1 << 31))
    first = data.vocab.first_unit
    noisy = [
        np.array(data.unit_noise((us - first).tolist(), key, j)) + first
        for j, us in enumerate(units)
    ]
    return words, noisy


def text_example(data: Data, cfg: TrainConfig, rng: np.random.Generator) -> list[int]:
    v = data.vocab
    if rng.random() < cfg.fact_rate:
        body = np.concatenate([data.facts[rng.integers(len(data.facts))] for _ in range(3)])
    else:
        i = int(rng.integers(len(data.clauses)))
        body = np.concatenate(data.clauses[i : i + int(rng.integers(2, 6))])
    return [1, v.text_id, *body.tolist()]


def speech_example(data: Data, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    v = data.vocab
    words, units = draw_utterance(data, rng)
    toks, cur = [1, v.speech_id], [-100, -100]
    for w, us in zip(words.tolist(), units, strict=True):
        toks += us.tolist()
        cur += [w] * len(us)
    return toks, cur


def interleaved_example(
    data: Data, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Word-level spans, modality alternating at every span, markers on change (SpiritLM)."""
    v = data.vocab
    words, units = draw_utterance(data, rng)
    speech = bool(rng.integers(2))
    toks, cur = [1], [-100]
    i = 0
    p = np.asarray(cfg.span_probs) / sum(cfg.span_probs)
    while i < len(words):
        n = int(rng.choice(len(p), p=p)) + 1
        toks.append(v.speech_id if speech else v.text_id)
        cur.append(-100)
        for j in range(i, min(i + n, len(words))):
            if speech:
                toks += units[j].tolist()
                cur += [int(words[j])] * len(units[j])
            else:
                toks.append(int(words[j]))
                cur.append(-100)
        i += n
        speech = not speech
    return toks, cur


def batch(data: Data, cfg: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, current-word labels) [batch, seq_len]; a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    kinds = sorted(cfg.mix)
    probs = np.array([cfg.mix[k] for k in kinds], dtype=float)
    probs /= probs.sum()
    rows, labs = [], []
    for _ in range(cfg.batch):
        toks: list[int] = []
        cur: list[int] = []
        while len(toks) < cfg.seq_len:
            kind = kinds[int(rng.choice(len(kinds), p=probs))]
            if kind == "text":
                t = text_example(data, cfg, rng)
                c = [-100] * len(t)
            elif kind == "speech":
                t, c = speech_example(data, rng)
            elif kind == "interleaved":
                t, c = interleaved_example(data, cfg, rng)
            else:
                raise ValueError(f"config {cfg.name}: unknown data kind {kind!r} in mix")
            toks += t
            cur += c
        rows.append(toks[: cfg.seq_len])
        labs.append(cur[: cfg.seq_len])
    return torch.tensor(rows), torch.tensor(labs)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def aux_rotation(d_model: int, seed: int) -> torch.Tensor:
    """The rotated control's fixed random orthogonal Q [d, d]: QR of a seeded fp64 Gaussian,
    column signs fixed by R's diagonal (so Q is Haar-distributed and unique), cast to fp32.
    Rebuilt from (d_model, aux_rotation_seed) of the run's config, which every checkpoint keeps."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d_model, d_model, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def rotation_of(cfg: TrainConfig) -> torch.Tensor | None:
    if cfg.aux_rotation_seed is None:
        return None
    return aux_rotation(cfg.d_model, cfg.aux_rotation_seed)


def losses(
    model: Any,
    toks: torch.Tensor,
    cur: torch.Tensor,
    cfg: TrainConfig,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token loss, and the positive control's auxiliary loss: the current word from
    lm_head(norm(h)) at layer ``aux_layer`` at unit positions -- the logit lens's own readout --
    or, given ``rotation`` Q, from lm_head(norm(Q h)), which the logit lens does not compute."""
    aux = cfg.aux_layer is not None and cfg.aux_weight > 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
        out = model(input_ids=toks, output_hidden_states=aux)
        logits = out.logits[:, :-1].flatten(0, 1).float()
        lm = F.cross_entropy(logits, toks[:, 1:].flatten())
        if not aux:
            return lm, None
        mask = cur >= 0
        h = out.hidden_states[cfg.aux_layer][mask]
        if rotation is not None:
            h = h @ rotation.T.to(h.dtype)  # rows are hidden states: (Q h)^T = h^T Q^T
        z = model.lm_head(model.model.norm(h)).float()
        return lm, F.cross_entropy(z, cur[mask])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def build_model(cfg: TrainConfig, vocab: OrganismVocab, runs: Path) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    hf_cfg = llama_config(vocab, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff)
    model = LlamaForCausalLM(hf_cfg)
    if cfg.init != "random":
        src = runs / cfg.init / "state.pt"
        st = torch.load(src, map_location="cpu", weights_only=False)
        if not st.get("done"):
            raise RuntimeError(f"run {cfg.name}: init run {cfg.init} is not finished ({src})")
        model.load_state_dict(st["model"])
    return model


def train(cfg: TrainConfig, data_dir: str | Path, runs: str | Path = "runs") -> Path:
    """Train (or resume) run ``cfg.name``; returns the run directory."""
    from tqdm import tqdm

    runs = Path(runs)
    rd = runs / cfg.name
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=list))
    need_speech = any(k != "text" for k in cfg.mix)
    data = load_data(
        data_dir, need_speech=need_speech, units=cfg.units, noise=cfg.unit_noise, seed=cfg.seed
    )
    model = build_model(cfg, data.vocab, runs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step, tokens, wall = 0, 0, 0.0
    ema: float | None = None
    state_path = rd / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, tokens, wall = st["step"], st["tokens"], st["wall"]
        ema = st.get("ema")  # the loss EMA continues too (it was restarted on resume)
        if st.get("done"):
            return rd
    model.train()
    rotation = rotation_of(cfg)
    last_save, t0 = time.time(), time.time() - wall
    log = (rd / "log.jsonl").open("a")
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, mininterval=30)
    while step < cfg.steps:
        toks, cur = batch(data, cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        lm, aux = losses(model, toks, cur, cfg, rotation)
        loss = lm + cfg.aux_weight * aux if aux is not None else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += toks.numel()
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        bar.update(1)
        if step % 20 == 0:
            rec = {
                "step": step,
                "lm": round(lm.item(), 4),
                "ema": round(ema, 4),
                "aux": None if aux is None else round(aux.item(), 4),
                "tokens": tokens,
                "wall": round(time.time() - t0, 1),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
        done = step >= cfg.steps
        if done or time.time() - last_save > cfg.save_every_s:
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "tokens": tokens,
                    "wall": time.time() - t0,
                    "done": done,
                    "ema": ema,
                    "config": cfg.__dict__,
                },
                state_path,
            )
            last_save = time.time()
    bar.close()
    return rd


def export_run(rd: Path, out: Path, data_dir: str | Path, frame_rate: float) -> Path:
    """Export a finished run as a shippable checkpoint directory."""
    from transformers import LlamaForCausalLM

    st = torch.load(rd / "state.pt", map_location="cpu", weights_only=False)
    if not st.get("done"):
        raise RuntimeError(f"run {rd} is not finished")
    vocab = OrganismVocab.from_json(json.loads((Path(data_dir) / "vocab.json").read_text()))
    c = st["config"]
    cfg = replace(TrainConfig(name=c["name"]), **{k: v for k, v in c.items() if k != "name"})
    model = LlamaForCausalLM(llama_config(vocab, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff))
    model.load_state_dict(st["model"])
    extra = {
        "config": c,
        "steps": st["step"],
        "tokens": st["tokens"],
        "wall_seconds": round(st["wall"], 1),
        "final_loss_ema": st["ema"],
    }
    return export(model, vocab, out, frame_rate=frame_rate, extra=extra)
