"""Shard files of a distributed lens run: each rank's records and its commit log, read back for
resume and merge."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from speech_lens.files import atomic_write_text
from speech_lens.lens.records import UtteranceRecord
from speech_lens.runs.lens import PARTIAL, RunError
from speech_lens.runs.lens_settings import LensRunConfig

SHARDS = "shards"


def _shard_paths(out: Path, rank: int) -> tuple[Path, Path]:
    d = out / SHARDS
    return d / f"rank-{rank}.jsonl", d / f"rank-{rank}.done.json"


def _read_done(path: Path, cfg: LensRunConfig) -> dict[str, Any]:
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # written atomically, so this is damage, not a crash
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if done.get("header") != cfg.resume_key():
        raise RunError(
            f"{path} was written with other settings {done.get('header')}; these are "
            f"{cfg.resume_key()} (another checkpoint, family, data or mode in the same --out); "
            "use another --out or --restart"
        )
    return done


def _committed(jsonl: Path, done: dict[str, Any]) -> list[UtteranceRecord]:
    """The records a commit file vouches for: the first ``bytes`` of the shard, one per id."""
    n = int(done["bytes"])
    size = jsonl.stat().st_size if jsonl.exists() else 0
    if size < n:
        raise RunError(f"{jsonl}: {size} bytes, but {n} were committed (file truncated?)")
    with jsonl.open("rb") as f:
        raw = f.read(n)
    recs = [UtteranceRecord.from_json(json.loads(ln)) for ln in raw.decode().splitlines() if ln]
    ids = [r.utterance_id for r in recs]
    if ids != list(done["ids"]):
        raise RunError(f"{jsonl}: the committed records do not match {jsonl.stem}.done.json")
    return recs


def read_finished(out: str | Path, cfg: LensRunConfig) -> dict[str, UtteranceRecord]:
    """Every committed record in ``out/shards`` (any rank, any earlier world size).

    Refuses an id committed twice (in one shard or two) and shards written with other settings.
    """
    d = Path(out) / SHARDS
    found: dict[str, UtteranceRecord] = {}
    where: dict[str, str] = {}
    for done_path in sorted(d.glob("rank-*.done.json")):
        jsonl = done_path.with_name(done_path.name.replace(".done.json", ".jsonl"))
        for rec in _committed(jsonl, _read_done(done_path, cfg)):
            uid = rec.utterance_id
            if uid in found:
                raise RunError(
                    f"utterance {uid!r} is committed twice: in {where[uid]} and {jsonl.name}"
                )
            found[uid] = rec
            where[uid] = jsonl.name
    return found


class ShardStore:
    """One rank's append-only shard plus its atomically replaced commit file."""

    def __init__(self, out: str | Path, rank: int, cfg: LensRunConfig) -> None:
        self.jsonl, self.done_path = _shard_paths(Path(out), rank)
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.header = cfg.resume_key()
        self.ids: list[str] = []
        self.bytes = 0
        if self.done_path.exists():
            done = _read_done(self.done_path, cfg)
            _committed(self.jsonl, done)  # checks the committed prefix before we extend it
            self.ids, self.bytes = list(done["ids"]), int(done["bytes"])
        # drop anything written after the last commit (a rank killed between append and commit)
        with self.jsonl.open("ab") as f:
            f.truncate(self.bytes)
        self._commit()

    def _commit(self) -> None:
        body = {"header": self.header, "ids": self.ids, "bytes": self.bytes}
        atomic_write_text(self.done_path, json.dumps(body))

    def append(self, rec: UtteranceRecord) -> None:
        line = (json.dumps(rec.to_json(), ensure_ascii=False) + "\n").encode()
        with self.jsonl.open("ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.ids.append(rec.utterance_id)
        self.bytes += len(line)
        self._commit()


def clear_shards(out: Path) -> None:
    d = out / SHARDS
    for p in d.glob("rank-*"):
        p.unlink()
    (out / PARTIAL).unlink(missing_ok=True)
