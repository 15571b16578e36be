"""The public surface is pinned: ``speech_lens.__all__`` and every CLI command, option and choice.

``data/public_surface.json`` was written from the flat layout before the package restructure
(issue 15); a change to the surface must change that file on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import speech_lens
from speech_lens.cli import distributed as cli_distributed
from speech_lens.cli.main import build_parser

PINNED = Path(__file__).parent / "data" / "public_surface.json"


def _surface(parser: argparse.ArgumentParser, prefix: list[str], out: dict[str, Any]) -> None:
    """``out["cmd sub"]``: the sorted option strings (positionals by dest), with their choices."""
    opts = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                _surface(sub, [*prefix, name], out)
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        key = "/".join(action.option_strings) if action.option_strings else action.dest
        if action.choices is not None:
            key += "=" + ",".join(map(str, action.choices))
        opts.append(key)
    out[" ".join(prefix)] = sorted(opts)


def test_public_names_are_pinned():
    pinned = json.loads(PINNED.read_text())
    assert sorted(speech_lens.__all__) == pinned["__all__"]
    for name in speech_lens.__all__:
        assert getattr(speech_lens, name) is not None, name


def test_cli_commands_and_options_are_pinned():
    surface: dict[str, Any] = {}
    _surface(build_parser(), ["speech-lens"], surface)
    _surface(cli_distributed.build_parser(), ["python -m speech_lens.distributed"], surface)
    pinned = json.loads(PINNED.read_text())["cli"]
    assert sorted(surface) == sorted(pinned)
    for command, options in pinned.items():
        assert surface[command] == options, command


def test_torchrun_entry_point_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in (["--help"], ["lens", "--help"], ["merge", "--help"], ["tuned-lens", "--help"]):
        out = subprocess.run(
            [sys.executable, "-m", "speech_lens.distributed", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout
