"""`python -m metric_search` that stops at one chosen point, so a test can SIGKILL the driver exactly there.

A test harness, not part of the product: it wraps two library calls before the CLI runs.
  PAUSE_AFTER_RESULT=k          after the k-th result is appended to candidates.jsonl
  PAUSE_IN_CHECKPOINT_WRITE=g   in the first write of generation g's checkpoint: its temp file is
                                written and fsynced, the rename has not happened yet
"""

from __future__ import annotations

import json
import os
import sys
import time

from fitness.memo import Memo
from metric_search.cli import entry

PAUSE_S = 600.0  # far longer than any test waits: the test kills the driver during the pause


def pause_after_result(k: int) -> None:
    original = Memo.put
    count = 0

    def put(self, canonical, fidelity, result):
        nonlocal count
        record = original(self, canonical, fidelity, result)
        count += 1
        if count == k:
            time.sleep(PAUSE_S)
        return record

    Memo.put = put


def pause_in_checkpoint_write(generation: int) -> None:
    original = os.fsync

    def fsync(fd):
        original(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if ".checkpoint.json." in path:  # the temp file of a checkpoint, whole once fsynced
            with open(path) as fh:
                if json.load(fh)["generation"] == generation:
                    time.sleep(PAUSE_S)

    os.fsync = fsync


if __name__ == "__main__":
    if "PAUSE_AFTER_RESULT" in os.environ:
        pause_after_result(int(os.environ["PAUSE_AFTER_RESULT"]))
    if "PAUSE_IN_CHECKPOINT_WRITE" in os.environ:
        pause_in_checkpoint_write(int(os.environ["PAUSE_IN_CHECKPOINT_WRITE"]))
    entry(sys.argv[1:])
