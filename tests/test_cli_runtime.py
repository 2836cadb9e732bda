"""The console script's process policy (issue 16): the collector paused while a command imports,
resumed for long commands, everything frozen before exit; main() itself changes nothing."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from calibflow.errors import EXIT_USAGE
from cli import main as cli
from cli import process

REPO = Path(__file__).resolve().parents[1]


def in_fresh_interpreter(code: str) -> str:
    finished = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    return finished.stdout + finished.stderr


def test_main_called_in_process_leaves_the_collector_as_it_was(tmp_path):
    enabled, thresholds, frozen = gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()
    assert cli.main(["status", "--model", "m", "--repo", str(tmp_path / "missing")]) == EXIT_USAGE
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == (enabled, thresholds, frozen)


def test_the_script_pauses_the_collector_for_a_short_command_and_freezes_all_before_exit(tmp_path):
    out = in_fresh_interpreter(
        "import atexit, gc, sys\n"
        "import cli.main as cli\n"
        "atexit.register(lambda: print('at exit: enabled', gc.isenabled(), 'frozen', gc.get_freeze_count() > 10000))\n"
        f"sys.argv = ['calibflow', 'status', '--model', 'm', '--repo', {str(tmp_path / 'missing')!r}]\n"
        "cli.entry_point()\n"
    )
    assert "at exit: enabled False frozen True" in out, out


def test_a_long_command_resumes_collecting_after_its_imports():
    out = in_fresh_interpreter(
        "import gc\n"
        "import cli.process as process\n"
        "process.pause_collector()\n"
        "import torch\n"
        "process.imports_done()\n"
        "print('enabled', gc.isenabled(), 'thresholds', gc.get_threshold(), 'frozen', gc.get_freeze_count() > 10000)\n"
        "process.imports_done()  # a second call changes nothing\n"
        "print('again', gc.isenabled())\n"
    )
    assert f"enabled True thresholds {process.YOUNG_COLLECTION_THRESHOLDS} frozen True" in out, out
    assert "again True" in out
