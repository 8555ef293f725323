"""What a person sees: in a real terminal (a pty) the bars and the whole-run line appear; piped
into a file, the output carries no bar noise."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time


def run_in_pty(cmd: list[str], timeout: float = 120) -> str:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 x 24
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def train_cmd(recipe, data, out):
    cmd = [sys.executable, "-m", "cifarlab", "train", "--recipe", str(recipe)]
    return cmd + ["--data", str(data), "--out", str(out), "--no-track"]


def test_a_terminal_shows_bars_through_validation_and_scoring_and_the_run_line(
    tiny_folder, tiny_fast_recipe, tmp_path
):
    screen = run_in_pty(train_cmd(tiny_fast_recipe, tiny_folder, tmp_path / "run"))
    assert "train 1/3" in screen and "%|" in screen  # the epoch's bar
    assert "validating" in screen  # each epoch's validation
    assert "scoring val (TTA 2)" in screen  # the final scoring
    assert "writing the plots, report and tracking" in screen
    assert "run: 0/3 epochs done, about" in screen and "finishing about" in screen
    assert "decoding images" in screen  # the first read of a dataset
    lines = [line.split("\r")[-1] for line in screen.splitlines() if "%|" not in line]
    first = next(line for line in lines if line.strip())
    assert first.startswith("device: cpu") and "threads" in first  # the run's first line


def test_output_off_a_terminal_has_no_bar_noise(tiny_folder, tiny_fast_recipe, tmp_path):
    done = subprocess.run(
        train_cmd(tiny_fast_recipe, tiny_folder, tmp_path / "run"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "%|" not in done.stderr
    assert "run: 0/3 epochs done" in done.stderr  # the lines stay
