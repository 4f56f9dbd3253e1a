"""The atomic writer and the inbound poller: complete files only, nothing lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anyio
import pytest

from adapters.erp_legacy.files import (
    UNREADABLE_TRIES,
    InboundPoller,
    PollReport,
    write_atomic,
)
from broker.errors import RetryLater, SchemaInvalid, UpstreamRejected
from tests.polling import eventually

pytestmark = pytest.mark.anyio


def parse(data: bytes) -> bytes:
    if not data.startswith(b"<ok"):
        raise SchemaInvalid(f"not a document: {data[:10]!r}")
    return data


class Recorder:
    """A handler that records what it got and can be told to fail."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.fail_with: BaseException | None = None

    async def __call__(self, name: str, data: bytes) -> None:
        """Record *data*, or raise what the test asked for."""
        if self.fail_with is not None:
            raise self.fail_with
        self.got.append((name, data))


def poller(
    folder: Path,
    handler: Recorder,
    *,
    batch: int = 32,
    max_bytes: int = 1024,
    interval_s: float = 1.0,
) -> InboundPoller[bytes]:
    return InboundPoller(
        folder,
        parse=parse,
        handle=handler,
        settle_s=0.0,
        batch=batch,
        max_bytes=max_bytes,
        interval_s=interval_s,
    )


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


async def test_write_atomic_leaves_only_the_complete_file(tmp_path: Path) -> None:
    """``<name>.tmp`` is renamed to ``<name>.xml``; rewriting replaces it whole."""
    path = await write_atomic(tmp_path, "ORDERS_1", b"<ok>first</ok>")
    assert path == tmp_path / "ORDERS_1.xml"
    await write_atomic(tmp_path, "ORDERS_1", b"<ok>second</ok>")
    assert names(tmp_path) == ["ORDERS_1.xml"]
    assert path.read_bytes() == b"<ok>second</ok>"


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a b", "é"])
async def test_write_atomic_refuses_names_that_are_not_plain(
    tmp_path: Path, name: str
) -> None:
    """A name can neither leave the folder nor hide in it."""
    with pytest.raises(ValueError, match="not a plain file name"):
        await write_atomic(tmp_path, name, b"x")


async def test_write_atomic_failure_leaves_no_tmp_file(tmp_path: Path) -> None:
    """A write that fails (here: the target is a folder) cleans up its ``.tmp``."""
    (tmp_path / "busy.xml").mkdir()
    with pytest.raises(IsADirectoryError):
        await write_atomic(tmp_path, "busy", b"<ok/>")
    assert not (tmp_path / "busy.tmp").exists()


async def test_only_xml_names_are_considered(tmp_path: Path) -> None:
    """``.tmp`` and ``.part`` files are never read, however long they sit."""
    (tmp_path / "a.tmp").write_bytes(b"<ok>tmp</ok>")
    (tmp_path / "b.xml.part").write_bytes(b"<ok>part</ok>")
    (tmp_path / ".c.xml").write_bytes(b"<ok>hidden</ok>")
    handler = Recorder()
    p = poller(tmp_path, handler)
    for _ in range(3):
        assert await p.poll_once() == PollReport()
    assert handler.got == []


async def test_a_file_renamed_into_place_is_read_once_and_whole(tmp_path: Path) -> None:
    """Written as .tmp, then renamed: handed over after two looks, then moved."""
    handler = Recorder()
    p = poller(tmp_path, handler)
    (tmp_path / "x.tmp").write_bytes(b"<ok>whole</ok>")
    assert await p.poll_once() == PollReport()
    (tmp_path / "x.tmp").rename(tmp_path / "x.xml")
    assert await p.poll_once() == PollReport(waiting=1)
    assert await p.poll_once() == PollReport(processed=1)
    assert handler.got == [("x.xml", b"<ok>whole</ok>")]
    assert names(tmp_path / "processed") == ["x.xml"]
    assert await p.poll_once() == PollReport()


async def test_a_growing_file_is_not_read_until_it_stops_growing(
    tmp_path: Path,
) -> None:
    """A writer that appends in place is waited for: size+mtime must hold still."""
    handler = Recorder()
    p = poller(tmp_path, handler)
    path = tmp_path / "grow.xml"
    path.write_bytes(b"<ok>part one")
    assert await p.poll_once() == PollReport(waiting=1)
    with path.open("ab") as f:
        f.write(b" part two")
    assert await p.poll_once() == PollReport(waiting=1)
    with path.open("ab") as f:
        f.write(b"</ok>")
    assert await p.poll_once() == PollReport(waiting=1)
    assert handler.got == []
    assert await p.poll_once() == PollReport(processed=1)
    assert handler.got == [("grow.xml", b"<ok>part one part two</ok>")]


async def test_two_looks_must_be_settle_s_apart(tmp_path: Path) -> None:
    """An unchanged file is taken only once ``settle_s`` passed since it was seen so."""
    now = 100.0
    handler = Recorder()
    p = InboundPoller(
        tmp_path, parse=parse, handle=handler, settle_s=0.5, clock=lambda: now
    )
    (tmp_path / "x.xml").write_bytes(b"<ok/>")
    assert await p.poll_once() == PollReport(waiting=1)
    now += 0.1
    assert await p.poll_once() == PollReport(waiting=1)
    now += 0.5
    assert await p.poll_once() == PollReport(processed=1)


async def test_an_unparsable_file_moves_to_failed_with_its_reason(
    tmp_path: Path,
) -> None:
    """The parse error is kept beside the file; the handler never sees it."""
    handler = Recorder()
    p = poller(tmp_path, handler)
    (tmp_path / "bad.xml").write_bytes(b"garbage")
    await p.poll_once()
    assert await p.poll_once() == PollReport(failed=1)
    assert handler.got == []
    assert names(tmp_path) == []
    assert names(tmp_path / "failed") == ["bad.xml", "bad.xml.reason.txt"]
    assert (tmp_path / "failed" / "bad.xml").read_bytes() == b"garbage"
    reason = (tmp_path / "failed" / "bad.xml.reason.txt").read_text()
    assert reason == "SchemaInvalid: not a document: b'garbage'\n"


async def test_a_parser_crash_fails_the_file_and_the_poller_goes_on(
    tmp_path: Path,
) -> None:
    """A parse error that is no PermanentError (a bug) still moves the file.

    Left in place, the file would crash every poll (and every restarted
    poller) again; the files beside it are handed over as usual.
    """
    handler = Recorder()

    def buggy(data: bytes) -> bytes:
        if data == b"<ok>crash</ok>":
            raise ValueError("multi-byte encodings are not supported")
        return parse(data)

    p = InboundPoller(tmp_path, parse=buggy, handle=handler, settle_s=0.0)
    (tmp_path / "a.xml").write_bytes(b"<ok>crash</ok>")
    (tmp_path / "b.xml").write_bytes(b"<ok>fine</ok>")
    await p.poll_once()
    assert await p.poll_once() == PollReport(processed=1, failed=1)
    assert handler.got == [("b.xml", b"<ok>fine</ok>")]
    assert names(tmp_path) == []
    assert (tmp_path / "failed" / "a.xml").read_bytes() == b"<ok>crash</ok>"
    reason = (tmp_path / "failed" / "a.xml.reason.txt").read_text()
    assert reason == (
        "FileUnparsable: a.xml crashed the parser: "
        "ValueError: multi-byte encodings are not supported\n"
    )


async def test_an_oversize_file_fails_unread(tmp_path: Path) -> None:
    """Files above ``max_bytes`` go to failed/ with FileTooLarge."""
    handler = Recorder()
    p = poller(tmp_path, handler, max_bytes=10)
    (tmp_path / "big.xml").write_bytes(b"<ok>" + b"x" * 100 + b"</ok>")
    await p.poll_once()
    assert await p.poll_once() == PollReport(failed=1)
    reason = (tmp_path / "failed" / "big.xml.reason.txt").read_text()
    assert reason.startswith("FileTooLarge: big.xml has 109 bytes, the limit is 10")


async def test_a_handler_refusal_for_good_fails_the_file(tmp_path: Path) -> None:
    """A PermanentError from the handler is a failed file, with its reason."""
    handler = Recorder()
    handler.fail_with = UpstreamRejected("erp-legacy", "unknown PO")
    p = poller(tmp_path, handler)
    (tmp_path / "x.xml").write_bytes(b"<ok/>")
    await p.poll_once()
    assert await p.poll_once() == PollReport(failed=1)
    assert "unknown PO" in (tmp_path / "failed" / "x.xml.reason.txt").read_text()


async def test_a_transient_failure_leaves_the_batch_for_later(tmp_path: Path) -> None:
    """A TransientError stops the batch; the files are handed over again later."""
    handler = Recorder()
    p = poller(tmp_path, handler)
    for n in (1, 2, 3):
        (tmp_path / f"{n}.xml").write_bytes(b"<ok/>")
    await p.poll_once()
    handler.fail_with = RetryLater("downstream busy")
    assert await p.poll_once() == PollReport(deferred=3)
    assert names(tmp_path) == ["1.xml", "2.xml", "3.xml"]
    handler.fail_with = None
    assert await p.poll_once() == PollReport(processed=3)
    assert [name for name, _ in handler.got] == ["1.xml", "2.xml", "3.xml"]


async def test_a_crash_in_the_handler_redelivers_after_restart(tmp_path: Path) -> None:
    """At least once: a file is moved only after its handler returned."""
    handler = Recorder()
    handler.fail_with = RuntimeError("bug")
    first = poller(tmp_path, handler)
    (tmp_path / "x.xml").write_bytes(b"<ok/>")
    await first.poll_once()
    with pytest.raises(RuntimeError, match="bug"):
        await first.poll_once()
    assert names(tmp_path) == ["x.xml"]

    handler.fail_with = None
    restarted = poller(tmp_path, handler)
    await restarted.poll_once()
    assert await restarted.poll_once() == PollReport(processed=1)
    assert handler.got == [("x.xml", b"<ok/>")]


async def test_batches_are_bounded_and_oldest_first(tmp_path: Path) -> None:
    """At most ``batch`` files per poll, by mtime then name."""
    handler = Recorder()
    p = poller(tmp_path, handler, batch=2)
    for n, name in enumerate(["c", "a", "b", "d", "e"]):
        path = tmp_path / f"{name}.xml"
        path.write_bytes(b"<ok/>")
        mtime_ns = 1_700_000_000_000_000_000 + n * 1_000_000_000
        os.utime(path, ns=(mtime_ns, mtime_ns))
    await p.poll_once()
    assert await p.poll_once() == PollReport(processed=2, waiting=0)
    assert await p.poll_once() == PollReport(processed=2)
    assert await p.poll_once() == PollReport(processed=1)
    assert [name for name, _ in handler.got] == [
        "c.xml",
        "a.xml",
        "b.xml",
        "d.xml",
        "e.xml",
    ]


async def test_a_name_seen_again_keeps_both_files(tmp_path: Path) -> None:
    """processed/ never overwrites: the second copy gets ``~1``."""
    handler = Recorder()
    p = poller(tmp_path, handler)
    for body in (b"<ok>1</ok>", b"<ok>2</ok>"):
        (tmp_path / "x.xml").write_bytes(body)
        await p.poll_once()
        assert await p.poll_once() == PollReport(processed=1)
    assert names(tmp_path / "processed") == ["x.xml", "x~1.xml"]
    assert (tmp_path / "processed" / "x~1.xml").read_bytes() == b"<ok>2</ok>"


async def test_run_polls_until_cancelled(tmp_path: Path) -> None:
    """``run`` creates processed/ and failed/, then keeps handing files over."""
    handler = Recorder()
    p = poller(tmp_path, handler, interval_s=0.01)
    async with anyio.create_task_group() as tg:
        await tg.start(p.run)
        assert (tmp_path / "processed").is_dir()
        assert (tmp_path / "failed").is_dir()
        await write_atomic(tmp_path, "late", b"<ok>late</ok>")

        async def handed_over() -> bool:
            return handler.got == [("late.xml", b"<ok>late</ok>")]

        await eventually(handed_over)
        tg.cancel_scope.cancel()
    assert names(tmp_path / "processed") == ["late.xml"]


async def test_a_file_that_cannot_be_read_is_skipped_then_failed(
    tmp_path: Path,
) -> None:
    """An I/O error reading one file (here from the parse step) ends nothing.

    The files beside it are handed over; it is tried again, and after
    UNREADABLE_TRIES polls in a row moves to failed/ with the error.
    """
    handler = Recorder()

    def flaky(data: bytes) -> bytes:
        if data == b"<ok>stale</ok>":
            raise OSError(errno.ESTALE, "Stale file handle")
        return parse(data)

    p = InboundPoller(tmp_path, parse=flaky, handle=handler, settle_s=0.0)
    (tmp_path / "a.xml").write_bytes(b"<ok>stale</ok>")
    (tmp_path / "b.xml").write_bytes(b"<ok>fine</ok>")
    await p.poll_once()
    assert await p.poll_once() == PollReport(processed=1)
    assert handler.got == [("b.xml", b"<ok>fine</ok>")]
    for _ in range(UNREADABLE_TRIES - 2):
        assert await p.poll_once() == PollReport()
    assert await p.poll_once() == PollReport(failed=1)
    reason = (tmp_path / "failed" / "a.xml.reason.txt").read_text()
    assert reason.startswith("FileUnreadable: a.xml could not be read: OSError")
    assert "Stale file handle" in reason


async def test_a_folder_that_cannot_be_listed_is_looked_at_again(
    tmp_path: Path,
) -> None:
    """The inbound folder gone (an unmounted share): logged, then picked up again."""
    handler = Recorder()
    inbound = tmp_path / "in"
    inbound.mkdir()
    p = poller(inbound, handler)
    inbound.rmdir()
    assert await p.poll_once() == PollReport()
    inbound.mkdir()
    (inbound / "x.xml").write_bytes(b"<ok/>")
    await p.poll_once()
    assert await p.poll_once() == PollReport(processed=1)
