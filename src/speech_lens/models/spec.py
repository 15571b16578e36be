"""Family specs: the TOML schema that describes a checkpoint family, and the shipped families."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speech_lens.options import SPAN_SAMPLERS

SPEC_DIR = Path(__file__).parents[1] / "model_adapters"
FAMILIES_ENV = "SPEECH_LENS_FAMILIES"  # extra directories of family specs
CHECKPOINT_SPEC = "speech_lens.toml"  # a family spec shipped inside a checkpoint directory


class AdapterError(ValueError):
    """A checkpoint or spec that cannot be loaded as described; the message names file, field or token."""


class MissingTokenizerError(AdapterError):
    """The family stores no tokenizer (SIMS) and no base text tokenizer was given."""


class WeightFileError(AdapterError):
    """A weight file is missing, unreadable, or does not match the architecture."""


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSpec:
    """A marker or control token: an absolute ``id``, or an ``offset`` from the first unit id."""

    token: str
    id: int | None = None
    offset: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class UnitSpec:
    pattern: str
    count: int
    first_id: int | None  # None: right after the text tokenizer (SIMS)
    frame_rate: float
    dedup: bool
    # "after_text" families: first unit id of each released base (documentation; a base named
    # here whose tokenizer length differs gets a warning, not a refusal)
    released_first_ids: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSpec:
    """How the family writes speech and text spans (read by ``prompts.py``)."""

    bos: bool | str = True  # True, False, or "tokenizer" (whatever add_special_tokens does)
    text_open: str = ""
    text_close: str = ""
    speech_open: str = ""
    speech_close: str = ""
    marker_on_change_only: bool = True
    speech_only_marker: bool = True
    # how interleaved prompts choose their spoken words by default (options.SPAN_SAMPLERS)
    span_sampler: str = "poisson"


@dataclass(frozen=True)
class DetectSpec:
    config_model_type: str | None = None
    tokens_present: tuple[str, ...] = ()
    tokens_absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    description: str
    architectures: tuple[str, ...]
    units: UnitSpec
    prompt: PromptSpec
    detect: DetectSpec = DetectSpec()
    vocab_size: int | None = None
    vocab_size_min: int | None = None
    tokenizer_source: str = "checkpoint"  # or "base"
    added_tokens: tuple[str, ...] = ()
    prosody: dict[str, UnitSpec] = field(default_factory=dict)
    markers: dict[str, TokenSpec] = field(default_factory=dict)
    control: dict[str, TokenSpec] = field(default_factory=dict)
    weights_prefix: str = ""
    nested_config: str | None = None
    source: str = ""

    @classmethod
    def from_toml(cls, path: str | Path) -> AdapterSpec:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise AdapterError(f"spec file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise AdapterError(f"spec file {path} is not valid TOML: {e}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> AdapterSpec:
        def need(d: dict[str, Any], key: str, where: str) -> Any:
            return need_field(d, key, where, source)

        def unit_spec(d: dict[str, Any], where: str) -> UnitSpec:
            return parse_unit_spec(d, where, source)

        def tokens(d: dict[str, Any], where: str) -> dict[str, TokenSpec]:
            return parse_tokens(d, where, source)

        det = raw.get("detect", {})
        tok = raw.get("tokenizer", {})
        w = raw.get("weights", {})
        source_kind = tok.get("source", "checkpoint")
        if source_kind not in ("checkpoint", "base"):
            raise AdapterError(f"spec {source}: tokenizer.source must be 'checkpoint' or 'base'")
        prompt = raw.get("prompt", {})
        if prompt.get("span_sampler", "poisson") not in SPAN_SAMPLERS:
            raise AdapterError(
                f"spec {source}: prompt.span_sampler {prompt['span_sampler']!r} is not one of "
                f"{', '.join(SPAN_SAMPLERS)}"
            )
        return cls(
            name=need(raw, "name", ""),
            description=raw.get("description", ""),
            architectures=tuple(raw.get("architectures", ())),
            units=unit_spec(need(raw, "units", ""), "units."),
            prompt=PromptSpec(**prompt),
            detect=DetectSpec(
                config_model_type=det.get("config_model_type"),
                tokens_present=tuple(det.get("tokens_present", ())),
                tokens_absent=tuple(det.get("tokens_absent", ())),
            ),
            vocab_size=raw.get("vocab_size"),
            vocab_size_min=raw.get("vocab_size_min"),
            tokenizer_source=source_kind,
            added_tokens=tuple(tok.get("added_tokens", ())),
            prosody={k: unit_spec(v, f"prosody.{k}.") for k, v in raw.get("prosody", {}).items()},
            markers=tokens(raw.get("markers", {}), "markers."),
            control=tokens(raw.get("control", {}), "control."),
            weights_prefix=w.get("prefix", ""),
            nested_config=w.get("nested_config"),
            source=source,
        )


def need_field(d: dict[str, Any], key: str, where: str, source: str) -> Any:
    """``d[key]``, or an error naming the spec file and the field."""
    if key not in d:
        raise AdapterError(f"spec {source}: missing field {where}{key}")
    return d[key]


def parse_unit_spec(d: dict[str, Any], where: str, source: str) -> UnitSpec:
    """A ``[units]`` / ``[prosody.*]`` table."""
    pattern = need_field(d, "pattern", where, source)
    if "{k}" not in pattern:
        raise AdapterError(f"spec {source}: {where}pattern {pattern!r} must contain {{k}}")
    first = need_field(d, "first_id", where, source)
    if "first_id_by_model_type" in d:
        raise AdapterError(
            f"spec {source}: {where}first_id_by_model_type is no longer read (unit ids "
            f"follow len(base tokenizer)); name released bases in {where}released_first_ids"
        )
    if first != "after_text" and not isinstance(first, int):
        raise AdapterError(f"spec {source}: {where}first_id must be an int or 'after_text'")
    return UnitSpec(
        pattern=pattern,
        count=int(need_field(d, "count", where, source)),
        first_id=None if first == "after_text" else first,
        frame_rate=float(need_field(d, "frame_rate", where, source)),
        dedup=bool(d.get("dedup", True)),
        released_first_ids=dict(d.get("released_first_ids", {})),
    )


def parse_tokens(d: dict[str, Any], where: str, source: str) -> dict[str, TokenSpec]:
    """A ``[markers]`` / ``[control]`` table: a token string or ``{token, id|offset, optional}``."""
    out = {}
    for name, t in d.items():
        if isinstance(t, str):
            t = {"token": t}
        out[name] = TokenSpec(
            token=need_field(t, "token", f"{where}{name}.", source),
            id=t.get("id"),
            offset=t.get("offset"),
            optional=bool(t.get("optional", False)),
        )
    return out


def family_dirs() -> list[Path]:
    """Where family specs are found: the shipped ones, then each directory in
    ``$SPEECH_LENS_FAMILIES`` (``os.pathsep``-separated)."""
    extra = os.environ.get(FAMILIES_ENV, "")
    return [SPEC_DIR, *(Path(d) for d in extra.split(os.pathsep) if d)]


def available_families() -> dict[str, AdapterSpec]:
    """Every family spec (one TOML file each, see :func:`family_dirs`), by name."""
    specs: dict[str, AdapterSpec] = {}
    found: dict[str, Path] = {}
    for d in family_dirs():
        for p in sorted(d.glob("*.toml")):
            s = AdapterSpec.from_toml(p)
            if s.name in found:
                raise AdapterError(f"family {s.name!r} is defined twice: {found[s.name]} and {p}")
            specs[s.name], found[s.name] = s, p
    return specs


def get_spec(family: str | Path | AdapterSpec) -> AdapterSpec:
    if isinstance(family, AdapterSpec):
        return family
    fams = available_families()
    if str(family) in fams:
        return fams[str(family)]
    if str(family).endswith(".toml") or Path(family).is_file():
        return AdapterSpec.from_toml(family)
    raise AdapterError(
        f"unknown family {family!r}; known: {', '.join(fams)} (or pass a .toml spec)"
    )
