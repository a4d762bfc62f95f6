"""Raw batches held on disk while storage catches up: a burst costs disk, not memory.

The pipeline keeps a small buffer of raw batches in memory; past it, batches
are appended here and read back, oldest first, once the memory buffer has
room. The order in which batches are processed does not matter for the data
(a job's row is a function of the set of its events, see
:mod:`sluice_core.merge`), so the spool is a plain FIFO file.

The file is unlinked as soon as it is created: nothing is left behind by a
crash, and a restart does not replay it (the source's gap is reported as for
any outage). It is reset to empty each time it is drained.
"""

from __future__ import annotations

import pickle
import tempfile
from collections import deque
from collections.abc import Callable
from typing import IO

from sluice_core.model import RawBatch


class Spool:
    def __init__(self, limit_bytes: int, directory: str | None = None) -> None:
        self.limit_bytes = limit_bytes
        self._directory = directory
        self._file: IO[bytes] | None = None
        self._read_at = 0
        self._write_at = 0
        self.batches = 0  # batches held
        self.messages = 0  # their messages
        # Each held batch's ``settled`` (not picklable), in the file's order.
        self._settled: deque[Callable[[], None] | None] = deque()

    @property
    def size(self) -> int:
        """Bytes of the file not read back yet."""
        return self._write_at - self._read_at

    def has_room(self, nbytes: int) -> bool:
        return self.size + nbytes <= self.limit_bytes

    def put(self, batch: RawBatch) -> None:
        if self._file is None:
            # Blocking writes on the event loop's thread: they land in the page cache,
            # a few tens of microseconds for a source read of 256 KiB.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115 (closed by Spool.close)
                prefix="sluice-spool-", dir=self._directory
            )
        self._file.seek(self._write_at)
        pickle.dump(
            (batch.kind, batch.source, batch.messages, batch.received_at),
            self._file,
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        self._write_at = self._file.tell()
        self.batches += 1
        self.messages += len(batch.messages)
        self._settled.append(batch.settled)

    def get(self) -> RawBatch | None:
        """The oldest batch held, or None when the spool is empty."""
        if self._file is None or self.batches == 0:
            return None
        self._file.seek(self._read_at)
        kind, source, messages, received_at = pickle.load(self._file)
        self._read_at = self._file.tell()
        self.batches -= 1
        self.messages -= len(messages)
        if self.batches == 0:
            # Drained: start the file over rather than let it grow for ever.
            self._file.truncate(0)
            self._read_at = self._write_at = 0
        return RawBatch(kind, source, messages, received_at, self._settled.popleft())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
