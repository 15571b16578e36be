"""VocabLayout: which ids of an extended vocabulary are text, speech units, markers, prosody.

A layout is built once per model from its tokenizer and adapter spec (see ``adapters.py``) and
then answers the questions every analysis asks: is this id a unit, which unit is it, which ids
does a text-restricted lens rank over.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Int
from torch import Tensor


class VocabError(ValueError):
    """A unit string, unit id or token that does not fit the model's vocabulary layout."""


@dataclass(frozen=True)
class UnitBlock:
    """A contiguous block of unit tokens: unit k is token ``pattern.format(k=k)`` at ``first_id + k``."""

    name: str
    pattern: str
    first_id: int
    count: int
    frame_rate: float
    dedup: bool

    @property
    def last_id(self) -> int:
        return self.first_id + self.count - 1

    def token(self, k: int) -> str:
        return self.pattern.format(k=k)

    def id_of(self, k: int) -> int:
        if not 0 <= k < self.count:
            raise VocabError(f"{self.name} unit {k} is out of range 0..{self.count - 1}")
        return self.first_id + k

    def contains(self, ids: Tensor) -> Tensor:
        return (ids >= self.first_id) & (ids <= self.last_id)

    @property
    def regex(self) -> re.Pattern[str]:
        head, tail = self.pattern.split("{k}")
        return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


@dataclass(frozen=True, eq=False)
class VocabLayout:
    """Frozen description of a model's id partitions.

    ``units`` is the speech-unit block (HuBERT / mHuBERT units); ``prosody`` holds the extra unit
    streams some families have (SpiritLM expressive pitch ``[Pi*]`` and style ``[St*]``);
    ``marker_ids`` the modality markers; ``control_ids`` special and chat tokens. Text ids are
    every tokenizer id that is none of these. Ids at or past ``n_tokenizer`` are unused
    embedding rows (padding) and belong to no partition.
    """

    vocab_size: int
    n_tokenizer: int
    units: UnitBlock
    prosody: dict[str, UnitBlock] = field(default_factory=dict)
    marker_ids: dict[str, int] = field(default_factory=dict)
    marker_tokens: dict[str, str] = field(default_factory=dict)
    control_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        blocks = [self.units, *self.prosody.values()]
        for b in blocks:
            if b.last_id >= self.vocab_size:
                raise VocabError(
                    f"{b.name} units end at id {b.last_id} but the model has only "
                    f"{self.vocab_size} embedding rows"
                )
        text = torch.zeros(self.vocab_size, dtype=torch.bool)
        text[: self.n_tokenizer] = True
        for b in blocks:
            text[b.first_id : b.last_id + 1] = False
        for i in (*self.marker_ids.values(), *self.control_ids.values()):
            text[i] = False
        object.__setattr__(self, "text_mask", text)

    # the masks are derived in __post_init__; declared here for type checkers
    text_mask: Bool[Tensor, " vocab"] = field(init=False, repr=False)

    # --- partitions as id tensors -------------------------------------------------------------
    @property
    def unit_ids(self) -> Int[Tensor, " n_units"]:
        """Unit k -> token id."""
        return torch.arange(self.units.first_id, self.units.last_id + 1)

    @property
    def text_ids(self) -> Int[Tensor, " n_text"]:
        return self.text_mask.nonzero().squeeze(-1)

    @property
    def prosody_ids(self) -> Int[Tensor, " n_prosody"]:
        parts = [torch.arange(b.first_id, b.last_id + 1) for b in self.prosody.values()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def unit_mask(self) -> Bool[Tensor, " vocab"]:
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        m[self.units.first_id : self.units.last_id + 1] = True
        return m

    @property
    def speech_mask(self) -> Bool[Tensor, " vocab"]:
        """Units and prosody tokens: everything that is speech."""
        m = self.unit_mask.clone()
        for b in self.prosody.values():
            m[b.first_id : b.last_id + 1] = True
        return m

    # --- single-id questions ------------------------------------------------------------------
    def is_unit(self, ids: Tensor | int | Sequence[int]) -> Tensor:
        return self.units.contains(torch.as_tensor(ids))

    def is_text(self, ids: Tensor | int | Sequence[int]) -> Tensor:
        t = torch.as_tensor(ids)
        inside = (t >= 0) & (t < self.vocab_size)
        return inside & self.text_mask[t.clamp(0, self.vocab_size - 1)]

    def unit_of(self, token_id: int) -> int:
        """Token id -> unit index k; raises for ids that are not speech units."""
        if not self.units.first_id <= int(token_id) <= self.units.last_id:
            raise VocabError(
                f"token id {token_id} is not a speech unit (units are ids "
                f"{self.units.first_id}..{self.units.last_id})"
            )
        return int(token_id) - self.units.first_id

    def unit_id(self, k: int) -> int:
        return self.units.id_of(k)

    def unit_ids_of(self, units: Iterable[int], block: str = "units") -> list[int]:
        b = self.block(block)
        return [b.id_of(int(k)) for k in units]

    def block(self, name: str) -> UnitBlock:
        if name in ("units", self.units.name):
            return self.units
        if name in self.prosody:
            return self.prosody[name]
        raise VocabError(
            f"no unit stream {name!r}; this layout has units and {sorted(self.prosody)}"
        )

    # --- unit strings -------------------------------------------------------------------------
    def format_units(self, units: Iterable[int], block: str = "units") -> str:
        b = self.block(block)
        return "".join(b.token(int(k)) for k in units)

    def parse_units(self, text: str, block: str = "units") -> list[int]:
        """``"[Hu12][Hu7]"`` -> ``[12, 7]``; anything that is not a unit token of the block is refused."""
        b = self.block(block)
        rx = b.regex
        out: list[int] = []
        pos = 0
        s = text.strip()
        for m in rx.finditer(s):
            gap = s[pos : m.start()].strip()
            if gap:
                raise VocabError(
                    f"unknown unit string {gap!r} at character {pos} (expected {b.pattern})"
                )
            k = int(m.group(1))
            if not 0 <= k < b.count:
                raise VocabError(f"unit {b.token(k)!r} is out of range 0..{b.count - 1}")
            out.append(k)
            pos = m.end()
        rest = s[pos:].strip()
        if rest:
            raise VocabError(
                f"unknown unit string {rest!r} at character {pos} (expected {b.pattern})"
            )
        return out

    # --- description --------------------------------------------------------------------------
    def partition_table(self) -> list[tuple[str, int, str]]:
        """Rows of (partition, count, ids) for ``speech-lens inspect``."""
        rows = [("text", int(self.text_mask.sum()), _ranges(self.text_ids.tolist()))]
        for b in [self.units, *self.prosody.values()]:
            rows.append(
                (f"{b.name} {b.pattern.format(k='*')}", b.count, f"{b.first_id}-{b.last_id}")
            )
        for name, i in self.marker_ids.items():
            rows.append((f"marker {name} {self.marker_tokens.get(name, '')}".rstrip(), 1, str(i)))
        for name, i in self.control_ids.items():
            rows.append((f"control {name}", 1, str(i)))
        if self.vocab_size > self.n_tokenizer:
            rows.append(
                (
                    "unused rows",
                    self.vocab_size - self.n_tokenizer,
                    f"{self.n_tokenizer}-{self.vocab_size - 1}",
                )
            )
        return rows


def _ranges(ids: list[int]) -> str:
    """Compact ``0-2,5-9`` rendering of sorted ids."""
    if not ids:
        return "-"
    parts, start, prev = [], ids[0], ids[0]
    for i in ids[1:]:
        if i != prev + 1:
            parts.append(f"{start}-{prev}" if prev > start else str(start))
            start = i
        prev = i
    parts.append(f"{start}-{prev}" if prev > start else str(start))
    return ",".join(parts)
