"""One node of a local suite launch, as NeMo-Run's LocalExecutor starts it: ``python -m evolm_nemo.suite.node LOG RC
-- CMD...``.

Runs CMD with its output appended to LOG and writes its exit status to RC. NeMo-Run's local scheduler (torchx) starts
each task in a session of its own, so killing the launcher's process group would not reach the node; this wrapper
watches its parent (the launcher) and, if the launcher disappears, kills its own process group -- itself and the node
-- so a relaunch never races an orphan (committed checkpoints are atomic; the relaunch resumes). SIGTERM / SIGINT (a
cancel from the launcher) are forwarded to CMD, which commits a checkpoint and exits. While CMD runs, ``RC.pid`` holds
this wrapper's pid: where the launcher sends SIGTERM when it is stopped itself (``suite.launch``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    log, rc_path, sep, *cmd = argv
    assert sep == "--" and cmd, "usage: python -m evolm_nemo.suite.node LOG RC -- CMD..."
    parent = os.getppid()
    state = {"proc": None, "pending": False}

    def forward(signum, _frame):  # before CMD has started: remembered, and sent as soon as it has
        proc = state["proc"]
        if proc is None:
            state["pending"] = True
        elif proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    pid_path = pid_file(rc_path)
    tmp = f"{pid_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # whole or absent: the launcher never reads half a pid
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, pid_path)
    with open(log, "a", encoding="utf-8") as f:
        proc = state["proc"] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    if state["pending"]:
        proc.send_signal(signal.SIGTERM)
    try:
        while proc.poll() is None:
            if os.getppid() != parent:  # the launcher is gone: nobody supervises this node any more
                os.killpg(os.getpgid(0), signal.SIGKILL)
            time.sleep(0.1)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(pid_path)
    with open(rc_path, "w", encoding="utf-8") as f:
        f.write(f"{proc.returncode}\n")
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def pid_file(rc_path) -> str:
    return f"{rc_path}.pid"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
