"""The world's build lock: a second caller waits, and says on stderr what it waits for."""
from __future__ import annotations

import fcntl
import threading
import time

from softdimo.world.build import _lock


def test_a_caller_that_must_wait_for_the_world_lock_says_so(tmp_path, capsys):
    path = tmp_path / "w.lock"
    entered = threading.Event()

    def second_caller():
        with _lock(path):
            entered.set()

    with _lock(path):                                     # a free lock: taken without a word
        assert capsys.readouterr().err == ""
        waiter = threading.Thread(target=second_caller)
        waiter.start()
        deadline = time.time() + 10
        while "waiting for another process" not in capsys.readouterr().err:
            assert time.time() < deadline, "no message while the lock is held"
            time.sleep(0.05)
        assert not entered.is_set()                       # it really waits
    waiter.join(10)
    assert entered.is_set()
    with open(path) as handle:                            # and it let go again
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
