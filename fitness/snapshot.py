"""The dense weights a candidate overwrites, kept to restore them bit-identical after every candidate.

On the CPU they go to an unlinked scratch file: restoring reads it straight into the weights (one
copy, as from memory), the OS keeps it in its page cache while memory is free and drops it under
pressure, and the process holds no second copy of the model. On a GPU (or where no scratch file can
be made) they stay in memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, sharing its memory."""
    return memoryview(tensor.view(torch.uint8).numpy().reshape(-1))


class MemorySnapshot:
    def __init__(self, buffers: list[torch.Tensor]):
        self.copies = [buffer.clone() for buffer in buffers]

    def restore(self, buffers: list[torch.Tensor]) -> None:
        for buffer, copy in zip(buffers, self.copies):
            buffer.copy_(copy)


class FileSnapshot:
    """The buffers' bytes in an anonymous file under ``directory`` (deleted when closed, even after a
    crash: it has no name). Use a directory on disk: a tmpfs file would be held in memory again."""

    def __init__(self, buffers: list[torch.Tensor], directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.file = tempfile.TemporaryFile(dir=directory, prefix="dense-weights-")  # noqa: SIM115 (held open)
        self.offsets = []
        for buffer in buffers:
            self.offsets.append(self.file.tell())
            self.file.write(_bytes(buffer.contiguous()))
        self.file.flush()

    def restore(self, buffers: list[torch.Tensor]) -> None:
        descriptor = self.file.fileno()
        for buffer, offset in zip(buffers, self.offsets):
            view, done = _bytes(buffer), 0
            while done < len(view):  # a read may return fewer bytes than asked
                count = os.preadv(descriptor, [view[done:]], offset + done)
                if count == 0:
                    raise OSError(f"the dense-weight scratch file {self.file.name} was truncated")
                done += count


def snapshot(buffers: list[torch.Tensor], scratch: Path | None) -> MemorySnapshot | FileSnapshot:
    """A file snapshot under ``scratch`` when every buffer is a contiguous CPU tensor and this OS reads
    into memory in place (``os.preadv``); else one in memory."""
    on_cpu = all(b.device.type == "cpu" and b.is_contiguous() for b in buffers)
    if scratch is not None and on_cpu and hasattr(os, "preadv"):
        try:
            return FileSnapshot(buffers, scratch)
        except OSError:  # a read-only or full cache dir: memory still works
            pass
    return MemorySnapshot(buffers)
