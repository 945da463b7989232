"""tasks.core.progress: a bar on a real terminal (a pseudo-terminal), none in a pipe, in CI or off rank 0, and the
one-line summary always."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tasks.core import progress

ROOT = Path(__file__).resolve().parents[2]
BAR = "\u2588"  # tqdm's full block
SUMMARY = "keel demo: 50 items, 3 rejects (unreadable 2, too_small 1), 0.5 s"

# a stage's loop as a stage writes it: a bar over its items (one updated by hand, one wrapping an iterable), then
# the summary
CHILD = """
import time
from tasks.core import progress
with progress.progress(total=50, desc="work", unit="item") as bar:
    for _ in range(50):
        time.sleep(0.01)
        bar.update(1)
for _ in progress.progress(range(20), desc="more"):
    time.sleep(0.01)
progress.summary("demo", 50, {"unreadable": 2, "too_small": 1}, 0.5)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "KEEL_PROGRESS", "RANK", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _on_pty(**extra: str) -> str:
    """The child's stdout and stderr as a terminal shows them (both on one pseudo-terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=slave, stdout=slave, stderr=slave,
                                env=_env(**extra), cwd=ROOT)
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    assert proc.wait(timeout=30) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def _piped(**extra: str) -> str:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=_env(**extra),
                          cwd=ROOT, timeout=30, check=True)
    return done.stderr


def _assert_bar(out: str) -> None:
    assert BAR in out and "100%|" in out and "50/50" in out and "20/20" in out, out
    assert "item/s" in out, out  # the rate, in the bar's unit
    assert "work:" in out and "more:" in out, out


def _redraws(out: str) -> bool:
    """A carriage return that is not a terminal's line end: the bar redrawn in place."""
    return re.search(r"\r(?!\n)", out) is not None


def _assert_no_bar(out: str) -> None:
    assert BAR not in out and not _redraws(out) and "%|" not in out and "/s" not in out, out


def test_a_terminal_gets_a_bar_with_rate_and_the_summary():
    out = _on_pty()
    _assert_bar(out)
    assert _redraws(out)
    assert SUMMARY in out


@pytest.mark.parametrize("how", ["stderr is a pipe", "CI=1 on a terminal", "KEEL_PROGRESS=0 on a terminal",
                                 "rank 1 on a terminal, even forced"])
def test_no_bar_in_logs_but_the_summary(how):
    out = {"stderr is a pipe": lambda: _piped(),
           "CI=1 on a terminal": lambda: _on_pty(CI="1"),
           "KEEL_PROGRESS=0 on a terminal": lambda: _on_pty(KEEL_PROGRESS="0"),
           "rank 1 on a terminal, even forced": lambda: _on_pty(KEEL_PROGRESS="1", RANK="1", LOCAL_RANK="1")}[how]()
    _assert_no_bar(out)
    assert out.replace("\r\n", "\n").strip().splitlines() == [SUMMARY]  # the summary is the only line


def test_keel_progress_1_forces_the_bar_into_a_pipe():
    out = _piped(KEEL_PROGRESS="1", CI="true")
    _assert_bar(out)
    assert SUMMARY in out


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("env", "drawn"), [
    ({}, True), ({"CI": "true"}, False), ({"CI": "false"}, True), ({"CI": "0"}, True), ({"CI": ""}, True),
    ({"KEEL_PROGRESS": "0"}, False), ({"KEEL_PROGRESS": "1", "CI": "1"}, True),
    ({"LOCAL_RANK": "1"}, False), ({"RANK": "3", "LOCAL_RANK": "0"}, False), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
])
def test_when_a_bar_is_drawn(monkeypatch, env, drawn):
    for k in ("CI", "KEEL_PROGRESS", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert progress.enabled() is drawn


def test_quiet_stand_in_iterates_and_counts(monkeypatch):
    monkeypatch.setenv("KEEL_PROGRESS", "0")
    bar = progress.progress(range(5), initial=2)
    assert list(bar) == [0, 1, 2, 3, 4] and bar.n == 7
    with progress.progress(total=3) as by_hand:
        by_hand.update(2)
        by_hand.set_postfix(loss="0.1")
    assert by_hand.n == 2


@pytest.mark.parametrize(("rejects", "line"), [
    ({"unreadable": 2, "too_small": 1}, "keel ingest: 1797 items, 3 rejects (unreadable 2, too_small 1), 4.1 s"),
    ({"too_small": 1, "unreadable": 1, "bad_label": 5},
     "keel ingest: 1797 items, 7 rejects (bad_label 5, too_small 1, unreadable 1), 4.1 s"),
    ({}, "keel ingest: 1797 items, 0 rejects, 4.1 s"),
    ({"unreadable": 0}, "keel ingest: 1797 items, 0 rejects, 4.1 s"),
    (None, "keel ingest: 1797 items, 4.1 s"),
])
def test_summary_line_counts_rejects_by_reason_most_first(rejects, line):
    assert progress.summary_line("ingest", 1797, rejects, 4.06) == line


def test_summary_prints_one_line_to_stderr(capsys):
    line = progress.summary("validate", 10, {"expect_column_values_to_not_be_null": 1}, 0.31,
                            rejects_word="failed expectations")
    assert line == "keel validate: 10 items, 1 failed expectations (expect_column_values_to_not_be_null 1), 0.3 s"
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""
