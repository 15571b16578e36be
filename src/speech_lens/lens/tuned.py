"""Tuned lens: one affine translator per layer, saved in the ``tuned-lens`` package's layout.

Translator ``i`` acts on ``blocks.{i}.hook_resid_pre`` (HF ``hidden_states[i]``; ``i = 0`` is the
embedding output) as ``h + A_i h + b_i`` and the result goes through the model's own final norm
and unembedding. ``A_i`` and ``b_i`` start at zero, so an untrained lens *is* the logit lens.

On disk (same as ``tuned-lens`` 0.2): a directory with ``config.json`` (``TunedLensConfig`` keys,
plus our own extra keys, which tuned-lens ignores with a warning) and ``params.pt`` (the state
dict of the translator list: ``"0.weight"``, ``"0.bias"``, ..., ``"{L-1}.bias"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import align_module_device
from jaxtyping import Float
from torch import Tensor, nn

from speech_lens._tl import final_norm_and_unembed
from speech_lens.lens.numerics import at_least_float32, readout_logits
from speech_lens.models.load import SpeechLM

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.pt"
LENS_TYPE = "linear_tuned_lens"


class LensError(ValueError):
    """A lens directory that is unreadable or does not fit the model; names the file and field."""


@dataclass(frozen=True)
class TunedLensConfig:
    """``tuned_lens.nn.lenses.TunedLensConfig`` fields first, then speech_lens extras.

    Files written by the tuned-lens package carry only the first seven keys; the extras default
    to ``None`` there. ``unembed_hash`` is tuned-lens' coarse fingerprint (kept for
    compatibility); ``unembed_sha256`` is ours and exact.
    """

    base_model_name_or_path: str
    d_model: int
    num_hidden_layers: int
    bias: bool = True
    base_model_revision: str | None = None
    unembed_hash: str | None = None
    lens_type: str = LENS_TYPE
    # --- speech_lens extras ---
    unembed_sha256: str | None = None
    vocab_size: int | None = None
    family: str | None = None
    data_mode: str | None = None  # text | speech | interleaved | mix
    steps: int | None = None
    tokens: int | None = None
    # the translators trained (``train_tuned_lens(layers=)``); the others are zero, i.e. the
    # logit lens. None: every one (or a file that does not say)
    trained_layers: tuple[int, ...] | None = None
    training: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> TunedLensConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:  # newer or foreign files: keep loading, as tuned-lens does
            warnings.warn(f"{source}: ignoring unknown lens config keys {unknown}", stacklevel=2)
        missing = [
            k for k in ("base_model_name_or_path", "d_model", "num_hidden_layers") if k not in raw
        ]
        if missing:
            raise LensError(f"{source}: missing lens config key(s) {missing}")
        fields = {k: v for k, v in raw.items() if k in known}
        rows = fields.get("trained_layers")
        if rows is not None:
            n = raw["num_hidden_layers"]
            if not isinstance(rows, list) or not all(
                isinstance(i, int) and 0 <= i < n for i in rows
            ):
                raise LensError(
                    f"{source}: trained_layers {rows!r} must list translator indices in 0..{n - 1}"
                )
            fields["trained_layers"] = tuple(rows)
        return cls(**fields)


# --------------------------------------------------------------------------------------------
# Fingerprints of the unembedding
# --------------------------------------------------------------------------------------------


def tuned_lens_unembed_hash(weight: Tensor) -> str:
    """tuned-lens' ``Unembed.unembedding_hash``: sha256 of ``np.array_str(W, precision=1)``.

    ``W`` is the ``[vocab, d_model]`` output-embedding weight. numpy abbreviates large arrays to
    their corner rows/columns at one decimal, so this tells models apart only coarsely.
    """
    arr = weight.detach().to("cpu", torch.float32).numpy()
    return hashlib.sha256(np.array_str(arr, precision=1).encode()).hexdigest()


def exact_unembed_hash(norm: nn.Module, unembed: nn.Module) -> str:
    """sha256 over shapes and float32 bytes of every parameter of final norm + unembedding.

    Changes with any weight change, vocabulary resize or final-norm change, all of which make a
    trained translator meaningless. A dtype change (bf16 vs fp32 load) also changes it.
    """

    h = hashlib.sha256()
    for part, mod in (("norm", norm), ("unembed", unembed)):
        # offloaded under a device map (meta placeholder): the hook loads the real weights
        with align_module_device(mod):
            params = [(n, p.detach().to("cpu", torch.float32)) for n, p in mod.named_parameters()]
        for name, p in sorted(params, key=lambda x: x[0]):
            t = p.contiguous()
            h.update(f"{part}.{name}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# The lens
# --------------------------------------------------------------------------------------------


class TunedLens(nn.Module):
    """Affine translators ``h + A_i h + b_i`` for ``resid_pre`` of layers ``0..n_layers-1``.

    Parameters are float32 whatever the model's dtype (training SGD on bf16 weights is lossy);
    ``transform_hidden`` returns the input dtype. ``layer == n_layers`` (the final residual) has
    no translator and is passed through, so ``forward(h, n_layers)`` gives the model's logits.
    """

    def __init__(self, config: TunedLensConfig, model: SpeechLM) -> None:
        super().__init__()
        self.config = config
        self.layer_translators = nn.ModuleList(
            [
                nn.Linear(config.d_model, config.d_model, bias=config.bias)
                for _ in range(config.num_hidden_layers)
            ]
        )
        for i in range(self.n_layers):
            t = self.translator(i)
            nn.init.zeros_(t.weight)
            if t.bias is not None:
                nn.init.zeros_(t.bias)
        # a plain tuple keeps the model's modules out of parameters(), state_dict() and .to()
        self._unembed: tuple[nn.Module, nn.Module] = final_norm_and_unembed(model.bridge)
        self.model_path = str(model.path)

    @classmethod
    def from_model(cls, model: SpeechLM, *, bias: bool = True, **extra: Any) -> TunedLens:
        """A zero-initialised lens (== the logit lens) for ``model``; ``extra`` fills config extras."""
        norm, unembed = final_norm_and_unembed(model.bridge)
        config = TunedLensConfig(
            base_model_name_or_path=str(model.path),
            d_model=model.d_model,
            num_hidden_layers=model.n_layers,
            bias=bias,
            unembed_hash=tuned_lens_unembed_hash(unembed_weight(unembed)),
            unembed_sha256=exact_unembed_hash(norm, unembed),
            vocab_size=int(unembed_weight(unembed).shape[0]),
            family=model.spec.name,
            **extra,
        )
        return cls(config, model).to(model.device)

    def __len__(self) -> int:
        return len(self.layer_translators)

    def __getitem__(self, layer: int) -> nn.Module:
        return self.layer_translators[layer]

    @property
    def n_layers(self) -> int:
        return len(self.layer_translators)

    def translator(self, layer: int) -> nn.Linear:
        t = self.layer_translators[layer]
        assert isinstance(t, nn.Linear)  # for type checkers; built as Linear above
        return t

    def transform_hidden(
        self, h: Float[Tensor, "... d_model"], layer: int
    ) -> Float[Tensor, "... d_model"]:
        """``h + A h + b`` for ``resid_pre`` of ``layer``; the identity at ``layer == n_layers``."""
        if not 0 <= layer <= self.n_layers:
            raise IndexError(f"layer {layer} is out of range 0..{self.n_layers}")
        if layer == self.n_layers:
            return h
        translator = self.translator(layer)
        # residual form: weight decay pulls toward the identity, zero init == logit lens
        w = translator.weight  # under a device map, h lives on its layer's device
        return h + translator(h.to(w.device, w.dtype)).to(h.device, h.dtype)

    def forward(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... vocab"]:
        """Logits read from ``resid_pre`` of ``layer`` through the model's final norm +
        unembedding, in float32 whatever the model's dtype (:mod:`speech_lens.readout`)."""
        norm, unembed = self._unembed
        return readout_logits(norm, unembed, self.transform_hidden(at_least_float32(h), layer))

    @property
    def trained_layers(self) -> tuple[int, ...]:
        """The translators training touched (config ``trained_layers``; all when unrecorded)."""
        rows = self.config.trained_layers
        return tuple(range(self.n_layers)) if rows is None else tuple(rows)

    # --- persistence ----------------------------------------------------------------------------
    def save(
        self, directory: str | Path, *, params_dtype: torch.dtype | None = None, **extra: Any
    ) -> Path:
        """Write ``config.json`` and ``params.pt`` (atomically); ``extra`` updates config extras.

        ``params_dtype`` (e.g. ``torch.float16``) casts the saved parameters; both loaders cast
        them back (``load_state_dict`` copies into the float32 translators). All-zero tensors
        (untrained translators) share one storage, which ``torch.save`` writes once: a strided
        lens costs the bytes of its trained translators, with every key still present.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if extra:
            self.config = dataclasses.replace(self.config, **extra)
        _atomic(d / PARAMS_FILE, lambda p: torch.save(self.saved_state(params_dtype), p))
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        _atomic(d / CONFIG_FILE, lambda p: Path(p).write_text(text))
        return d

    def saved_state(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The translators' state dict as ``save`` writes it (cpu, ``dtype``, zeros shared)."""
        zeros: dict[tuple[tuple[int, ...], torch.dtype], Tensor] = {}
        state: dict[str, Tensor] = {}
        for k, v in self.layer_translators.state_dict().items():
            t = v.detach().to("cpu", dtype or v.dtype)
            if not t.any():
                t = zeros.setdefault((tuple(t.shape), t.dtype), torch.zeros_like(t))
            state[k] = t.clone() if t.data_ptr() == v.data_ptr() else t
        return state

    @classmethod
    def load(cls, directory: str | Path, model: SpeechLM, *, strict: bool = True) -> TunedLens:
        """Load a lens directory for ``model``; refuses a lens trained for another model.

        Geometry (d_model, layer count, vocabulary) must match. With ``strict=False`` a hash
        mismatch is only a warning (e.g. a lens trained on the fp32 model used on a bf16 load).
        """
        d = Path(directory)
        cfg_path, params_path = d / CONFIG_FILE, d / PARAMS_FILE
        for p in (cfg_path, params_path):
            if not p.is_file():
                raise LensError(
                    f"{p} is missing: a tuned-lens directory holds {CONFIG_FILE} and {PARAMS_FILE}"
                )
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise LensError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise LensError(f"{cfg_path} must hold a JSON object")
        config = TunedLensConfig.from_dict(raw, source=str(cfg_path))
        check_compatible(config, model, where=str(cfg_path), strict=strict)

        try:
            state = torch.load(params_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files; name the file
            raise LensError(f"cannot read {params_path}: {type(e).__name__}: {e}") from e
        lens = cls(config, model)
        expected = lens.layer_translators.state_dict()
        if not isinstance(state, dict) or set(state) != set(expected):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise LensError(
                f"{params_path}: expected translator keys {sorted(expected)[:4]}... "
                f"({len(expected)} keys), found {str(got)[:200]}"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise LensError(
                    f"{params_path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
                )
        lens.layer_translators.load_state_dict({k: v.float() for k, v in state.items()})
        return lens.to(model.device)


def check_compatible(
    config: TunedLensConfig, model: SpeechLM, *, where: str, strict: bool = True
) -> None:
    """Raise ``LensError`` naming ``where`` when ``config`` was not made for ``model``."""
    if config.lens_type != LENS_TYPE:
        raise LensError(
            f"{where}: lens_type {config.lens_type!r} is not supported (only {LENS_TYPE!r})"
        )
    if config.d_model != model.d_model:
        raise LensError(
            f"{where}: lens d_model {config.d_model} != model d_model {model.d_model} ({model.path})"
        )
    if config.num_hidden_layers != model.n_layers:
        raise LensError(
            f"{where}: lens has {config.num_hidden_layers} layers, model {model.path} has {model.n_layers}"
        )
    norm, unembed = final_norm_and_unembed(model.bridge)
    vocab = int(unembed_weight(unembed).shape[0])
    if config.vocab_size is not None and config.vocab_size != vocab:
        raise LensError(
            f"{where}: lens vocab_size {config.vocab_size} != model vocabulary {vocab} ({model.path})"
        )
    if config.unembed_sha256 is not None:
        key, stored, actual = (
            "unembed_sha256",
            config.unembed_sha256,
            exact_unembed_hash(norm, unembed),
        )
    elif config.unembed_hash is not None:  # a file written by the tuned-lens package
        key, stored, actual = (
            "unembed_hash",
            config.unembed_hash,
            tuned_lens_unembed_hash(unembed_weight(unembed)),
        )
    else:
        warnings.warn(
            f"{where}: no unembedding hash stored; cannot check the lens fits {model.path}",
            stacklevel=3,
        )
        return
    if stored != actual:
        msg = (
            f"{where}: the lens was trained for another unembedding ({key} in the lens file "
            f"{stored} != {actual} of model {model.path})"
        )
        if strict:
            raise LensError(msg + "; pass strict=False to load it anyway")
        warnings.warn(msg, stacklevel=3)


def lens_from_spec(spec: str | None, model: SpeechLM) -> TunedLens | None:
    """CLI ``--lens`` values: ``logit`` (or None) -> None; ``tuned:PATH`` -> the loaded lens."""
    if spec is None or spec == "logit":
        return None
    if spec.startswith("tuned:") and len(spec) > len("tuned:"):
        return TunedLens.load(spec[len("tuned:") :], model)
    raise LensError(f"unknown lens {spec!r}: use 'logit' or 'tuned:PATH' (a tuned-lens directory)")


def unembed_weight(unembed: nn.Module) -> Tensor:
    w = getattr(unembed, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"unembedding {type(unembed).__name__} has no weight matrix")
    if w.is_meta:  # offloaded under a device map: read it through its accelerate hook
        with align_module_device(unembed):
            return unembed.get_parameter("weight").detach().clone()
    return w


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
