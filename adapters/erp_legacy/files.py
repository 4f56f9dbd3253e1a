"""File drops: an atomic writer and a poller that never reads a half-written file.

A file port has no transactions, so both sides follow one rule: a file named
``*.xml`` is complete. Writers write ``<name>.tmp`` in the target directory,
fsync it, then rename it to ``<name>.xml`` (a rename within one directory is
atomic on POSIX). The poller only looks at ``*.xml`` names and, for writers
that do not follow the rule, also waits until a file's size and mtime are
unchanged across two looks at least ``settle_s`` apart.

Delivery is at least once: a file moves to ``processed/`` only after its
handler returned, so a crash in between hands the same file over again, and
the receiver dedups (on the IDoc number or the business key). A file that
cannot be read as a document, or that its handler refuses for good, moves to
``failed/`` with a ``<name>.reason.txt`` beside it: nothing is deleted.

A writer that must not hand the same document over twice (a redelivered
command) uses `write_once`: it notes each hand-over in a record file of its
own, since the reader's side may delete what it read (an SAP file port
does) and then cannot tell "never written" from "already taken".

Every file-system call runs on a worker thread (``anyio.to_thread``).
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, Literal, NamedTuple, TypeVar, final

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskStatus

from broker.errors import PermanentError, TransientError
from broker.retry import Backoff

__all__ = [
    "UNREADABLE_TRIES",
    "FileTooLarge",
    "FileUnparsable",
    "FileUnreadable",
    "InboundPoller",
    "PollReport",
    "handed_over",
    "write_atomic",
    "write_once",
]

T = TypeVar("T")
_Outcome = Literal["processed", "failed", "deferred", "gone", "changed", "unreadable"]
#: Polls in a row a file may fail to read (permissions, a stale NFS handle)
#: before it moves to ``failed/``; a passing fault heals within them.
UNREADABLE_TRIES = 3
#: The longest wait between two tries to make the folders.
_FOLDERS_RETRY_CAP_S = 60.0

_log = structlog.get_logger(__name__)

# Writers of the same name inside this process take the same lock, so two of
# them never interleave their bytes in the one ``.tmp`` file. Striped and fixed
# in number, so the table never grows.
_LOCKS = tuple(threading.Lock() for _ in range(64))


async def write_atomic(directory: Path, name: str, data: bytes) -> Path:
    """Write *data* to ``directory/<name>.xml`` so no reader sees it half-written.

    Writes ``<name>.tmp`` in the same directory, fsyncs it, renames it over
    ``<name>.xml`` with `os.replace` and fsyncs the directory. Writing the same
    name again replaces the file whole.

    Args:
        directory: an existing directory.
        name: the file name without ``.xml``: letters, digits, ``._-``, not
            starting with a dot.
        data: the whole content.

    Returns:
        The path of the ``.xml`` file.

    Raises:
        ValueError: *name* is not a plain file name.
        OSError: the write, the fsync or the rename failed (the ``.tmp`` file
            is removed when it can be).
    """
    _check_name(name)
    target = directory / f"{name}.xml"
    await anyio.to_thread.run_sync(_write_atomic, target, data)
    return target


async def write_once(
    directory: Path, name: str, data: bytes, *, record: Path, again: bool
) -> bool:
    """`write_atomic`, noted in *record*; when *again*, only if not handed over yet.

    *record* (an empty file; its folder is made as needed) is made only once
    ``<name>.xml`` is in place and fsynced, so it never claims a file that
    was not handed over. With *again* (a redelivery), the file is not
    written when it is still in *directory* (unread) or *record* exists (it
    was handed over, and the reader may have taken it since). The check and
    the write hold the lock that writers of this name in this process share,
    so an earlier attempt still writing on its worker thread (its caller
    timed out) finishes first and is seen.

    Returns:
        Whether it wrote the file.

    Raises:
        ValueError: *name* is not a plain file name.
        OSError: as `write_atomic`. A record that cannot be made after the
            file was handed over is logged (``handover_unrecorded``) instead:
            the file is out, and a retry would only write it again.
    """
    _check_name(name)
    target = directory / f"{name}.xml"
    return await anyio.to_thread.run_sync(_write_once, target, data, record, again)


def handed_over(directory: Path, name: str, *, record: Path) -> bool:
    """Whether ``<name>.xml`` waits in *directory* or *record* notes it handed over.

    Blocking: call it on a worker thread.
    """
    return (directory / f"{name}.xml").exists() or record.exists()


def _write_once(target: Path, data: bytes, record: Path, again: bool) -> bool:
    with _LOCKS[hash(str(target)) % len(_LOCKS)]:
        if again and handed_over(target.parent, target.stem, record=record):
            return False
        _write_locked(target, data)
        _fsync_directory(target.parent)
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            with open(record, "wb") as f:
                os.fsync(f.fileno())
            _fsync_directory(record.parent)
        except OSError as exc:
            _log.error(
                "handover_unrecorded",
                file=target.name,
                record=str(record),
                error=f"{type(exc).__name__}: {exc}",
            )
    return True


def _check_name(name: str) -> None:
    if (
        not name
        or name.startswith(".")
        or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    ):
        raise ValueError(f"{name!r} is not a plain file name")


def _write_atomic(target: Path, data: bytes) -> None:
    with _LOCKS[hash(str(target)) % len(_LOCKS)]:
        _write_locked(target, data)
    _fsync_directory(target.parent)


def _write_locked(target: Path, data: bytes) -> None:
    tmp = target.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileTooLarge(PermanentError):
    """An inbound file is larger than the poller's limit; it was not read."""

    reason = "oversize"


class FileUnparsable(PermanentError):
    """The parser crashed (not a `PermanentError`) on an inbound file's bytes."""

    reason = "malformed"


class FileUnreadable(PermanentError):
    """An inbound file could not be read, poll after poll."""

    reason = "unreadable"


class PollReport(NamedTuple):
    """What one look at the directory did.

    Attributes:
        processed: handed over and moved to ``processed/``.
        failed: moved to ``failed/`` with a reason.
        waiting: ``*.xml`` files seen but not yet stable (new or still growing).
        deferred: files left in place because the handler raised a
            `TransientError` (tried again on a later poll).
    """

    processed: int = 0
    failed: int = 0
    waiting: int = 0
    deferred: int = 0


class _Look(NamedTuple):
    size: int
    mtime_ns: int
    since: float


@final
class InboundPoller(Generic[T]):
    """Hand each complete ``*.xml`` file of a directory to a handler, oldest first.

    Per poll it lists the ``4 * batch`` oldest ``*.xml`` files (by mtime, then
    name). A file is stable when its size and mtime equal those of an earlier
    look at least ``settle_s`` before; up to ``batch`` stable files are taken,
    each in turn: read (refusing files over ``max_bytes``, and files that
    changed since the look), parsed with *parse* on a worker thread, handed
    to ``await handle(name, document)``, then moved to ``processed/`` (a name
    already there gets a ``~<n>`` suffix: nothing is overwritten).

    Failure dispositions:

    * *parse* or *handle* raises a `PermanentError` (e.g. `IdocInvalid`): the
      file moves to ``failed/`` with ``<name>.reason.txt``.
    * *handle* raises a `TransientError`: the file stays; the rest of the
      batch waits for the next poll (the downstream is not taking work).
    * the file cannot be read (an `OSError`: permissions, a stale NFS
      handle): it is skipped, and after `UNREADABLE_TRIES` polls in a row
      moved to ``failed/``. A directory that cannot be listed (unmounted)
      is logged and looked at again next poll; folders that cannot be made
      at start are waited for (see `run`). None of these ends the poller.
    * *parse* raises anything else (a bug the file's bytes found): logged
      with its traceback, and the file moves to ``failed/`` as for a
      `PermanentError` (`FileUnparsable`), so one file cannot stop every poll.
    * anything else *handle* raises is a bug and propagates; the file stays
      where it is.

    Memory is bounded by the listing window, whatever the directory holds. One poller
    per directory: two would both deliver a file (harmless, at least once)
    and race to move it (the loser logs and skips).
    """

    def __init__(
        self,
        directory: Path,
        *,
        parse: Callable[[bytes], T],
        handle: Callable[[str, T], Awaitable[None]],
        batch: int = 32,
        interval_s: float = 1.0,
        settle_s: float = 0.5,
        max_bytes: int = 8 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.directory = directory
        self.processed_dir = directory / "processed"
        self.failed_dir = directory / "failed"
        self._parse = parse
        self._handle = handle
        self._batch = batch
        self._window = 4 * batch
        self._interval_s = interval_s
        self._settle_s = settle_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._seen: dict[str, _Look] = {}
        self._log = _log.bind(directory=str(directory))
        # Failed reads in a row, of files still listed (bounded by the window).
        self._unreadable: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<InboundPoller {self.directory} {len(self._seen)} watched>"

    async def run(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll every ``interval_s`` until cancelled; started once the folders exist.

        Folders that cannot be made (an unmounted share, a path through a
        file, no permission) are logged (``inbound_folders_unavailable``)
        and tried again with back-off, from ``interval_s`` up to a minute:
        the poller waits for them, it never ends for them.
        """
        backoff = Backoff(self._interval_s, max(self._interval_s, _FOLDERS_RETRY_CAP_S))
        while True:
            try:
                await anyio.to_thread.run_sync(self._make_folders)
                break
            except OSError as exc:
                delay = backoff.next_delay()
                self._log.warning(
                    "inbound_folders_unavailable",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 2),
                )
                await anyio.sleep(delay)
        task_status.started()
        while True:
            await self.poll_once()
            await anyio.sleep(self._interval_s)

    async def poll_once(self) -> PollReport:
        """Look once, and hand over the files found stable; see the class docstring."""
        try:
            listing = await anyio.to_thread.run_sync(self._list)
        except OSError as exc:
            self._log.warning(
                "inbound_listing_failed",
                error=f"{type(exc).__name__}: {exc}",
            )
            return PollReport()
        now = self._clock()
        stable: list[str] = []
        seen: dict[str, _Look] = {}
        for name, size, mtime_ns in listing:
            before = self._seen.get(name)
            if before is not None and (before.size, before.mtime_ns) == (
                size,
                mtime_ns,
            ):
                seen[name] = before
                if now - before.since >= self._settle_s:
                    stable.append(name)
            else:
                seen[name] = _Look(size, mtime_ns, now)
        self._seen = seen
        self._unreadable = {n: k for n, k in self._unreadable.items() if n in seen}
        counts = dict.fromkeys(("processed", "failed", "deferred"), 0)
        for position, name in enumerate(stable[: self._batch]):
            outcome = await self._take(name)
            if outcome == "deferred":
                counts["deferred"] = min(len(stable), self._batch) - position
                break
            if outcome in counts:
                counts[outcome] += 1
        return PollReport(
            processed=counts["processed"],
            failed=counts["failed"],
            waiting=len(listing) - len(stable),
            deferred=counts["deferred"],
        )

    async def _take(self, name: str) -> _Outcome:
        look = self._seen[name]
        try:
            document = await anyio.to_thread.run_sync(self._load, name, look)
        except FileNotFoundError:
            self._seen.pop(name, None)
            self._log.info("inbound_file_vanished", file=name)
            return "gone"
        except _Changed:
            self._seen.pop(name, None)
            return "changed"
        except PermanentError as exc:
            await self._fail(name, exc)
            return "failed"
        except OSError as exc:
            return await self._unreadable_file(name, exc)
        except Exception as exc:  # noqa: BLE001 - a parser bug fails the file, not the poller
            # A bug in *parse*, found by this file's bytes: the file fails
            # (with the traceback logged), so it cannot stop every poll after.
            self._log.exception("inbound_parse_crashed", file=name)
            error = f"{name} crashed the parser: {type(exc).__name__}: {exc}"
            await self._fail(name, FileUnparsable(error))
            return "failed"
        self._unreadable.pop(name, None)
        try:
            await self._handle(name, document)
        except TransientError as exc:
            self._log.warning(
                "inbound_file_deferred",
                file=name,
                error=f"{type(exc).__name__}: {exc}",
            )
            return "deferred"
        except PermanentError as exc:
            await self._fail(name, exc)
            return "failed"
        self._seen.pop(name, None)
        try:
            await anyio.to_thread.run_sync(self._move, name, self.processed_dir)
        except FileNotFoundError:
            self._log.info("inbound_file_vanished", file=name)
            return "gone"
        except OSError as exc:
            # Handed over but still in place: it is handed over again next
            # poll, and the receiver's inbox drops the repeat.
            self._log.error(
                "inbound_file_unmovable",
                file=name,
                error=f"{type(exc).__name__}: {exc}",
            )
            return "processed"
        self._log.info("inbound_file_processed", file=name)
        return "processed"

    async def _unreadable_file(self, name: str, exc: OSError) -> _Outcome:
        tries = self._unreadable.get(name, 0) + 1
        self._unreadable[name] = tries
        error = f"{type(exc).__name__}: {exc}"
        self._log.warning(
            "inbound_file_unreadable",
            file=name,
            error=error,
            tries=tries,
        )
        if tries < UNREADABLE_TRIES:
            return "unreadable"
        self._unreadable.pop(name, None)
        await self._fail(name, FileUnreadable(f"{name} could not be read: {error}"))
        return "failed"

    async def _fail(self, name: str, exc: PermanentError) -> None:
        reason = f"{type(exc).__name__}: {exc}\n"
        try:
            await anyio.to_thread.run_sync(self._move_failed, name, reason)
        except OSError as err:
            # It stays in place, and is tried (and failed) again next poll.
            self._log.error(
                "inbound_file_unmovable",
                file=name,
                reason=reason.strip(),
                error=f"{type(err).__name__}: {err}",
            )
            return
        self._seen.pop(name, None)
        self._log.warning(
            "inbound_file_failed",
            file=name,
            reason=reason.strip(),
        )

    # --- worker-thread side ----------------------------------------------------

    def _make_folders(self) -> None:
        self.processed_dir.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(parents=True, exist_ok=True)

    def _list(self) -> list[tuple[str, int, int]]:
        """The oldest ``window`` regular ``*.xml`` files: (name, size, mtime_ns)."""

        def entries() -> list[tuple[int, str, int]]:
            found: list[tuple[int, str, int]] = []
            with os.scandir(self.directory) as it:
                for entry in it:
                    if not entry.name.endswith(".xml") or entry.name.startswith("."):
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
                    if len(found) > 2 * self._window:
                        found = heapq.nsmallest(self._window, found)
            return heapq.nsmallest(self._window, found)

        return [(name, size, mtime) for mtime, name, size in entries()]

    def _load(self, name: str, look: _Look) -> T:
        path = self.directory / name
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != (look.size, look.mtime_ns):
                raise _Changed
            if st.st_size > self._max_bytes:
                raise FileTooLarge(
                    f"{name} has {st.st_size} bytes, the limit is {self._max_bytes}"
                )
            data = f.read(self._max_bytes + 1)
            st = os.fstat(f.fileno())
        if (len(data), st.st_size, st.st_mtime_ns) != (
            look.size,
            look.size,
            look.mtime_ns,
        ):
            raise _Changed  # written to between our last look and the read
        return self._parse(data)

    def _move(self, name: str, folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        target = _free_name(folder, name)
        os.replace(self.directory / name, target)
        return target

    def _move_failed(self, name: str, reason: str) -> None:
        self.failed_dir.mkdir(exist_ok=True)
        target = _free_name(self.failed_dir, name)
        # The reason first: a crash between the two writes leaves the file in
        # place to be failed again, never a failed file without its reason.
        reason_path = target.with_name(f"{target.name}.reason.txt")
        _write_atomic_to(reason_path, reason.encode())
        try:
            os.replace(self.directory / name, target)
        except FileNotFoundError:
            reason_path.unlink(missing_ok=True)


class _Changed(Exception):
    """The file changed after it was last seen stable: look again next poll."""


def _write_atomic_to(target: Path, data: bytes) -> None:
    tmp = target.with_name(f"{target.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _free_name(folder: Path, name: str) -> Path:
    """*name* in *folder*, or ``<stem>~<n><suffix>`` when a file of that name exists."""
    target = folder / name
    n = 0
    while target.exists():
        n += 1
        target = folder / f"{Path(name).stem}~{n}{Path(name).suffix}"
    return target
