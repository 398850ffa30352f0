"""Run a command (the sweep's ``mlflow server``) and end it, with its children, when the process that
started this one exits, however it exits (a SIGKILLed sweep driver included).

    python orchestrator/tracking/watchdog.py -- mlflow server ...

The watchdog is the leader of its own process group and the command runs in that group, so one
``killpg`` reaches the server's uvicorn workers too. It notices its starter's death by being
re-parented (``getppid`` changes), which also holds when the dead starter is not yet reaped.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def main(argv: list[str]) -> int:
    cmd = argv[1:] if argv and argv[0] == "--" else argv
    starter = os.getppid()
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    child = subprocess.Popen(cmd)
    while child.poll() is None and not stopping and os.getppid() == starter:
        time.sleep(POLL_S)
    if child.poll() is None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)       # ends this process too
    return child.returncode or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
