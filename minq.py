"""minq: an embeddable message broker in one file, doing the job of NSQ's nsqd.

Topics fan out to channels; a channel load-balances its messages across its
consumers; a delivered message is *in flight* with a deadline until it is
finished, requeued or times out.  minq runs threaded inside a Python process
(this module's ``Broker``) or as a server speaking NSQ's protocols.

Quick start::

    import minq
    broker = minq.Broker()
    broker.publish("orders", b"order #1")
    with broker.consumer("orders", "billing", max_in_flight=10) as c:
        msg = c.get(timeout=1.0)
        print(msg.body, msg.attempts)      # b'order #1' 1
        msg.finish()
    broker.close()
"""

from __future__ import annotations

import bisect
import collections
import errno
import fcntl
import heapq
import itertools
import json
import logging
import math
import os
import platform
import queue
import re
import shutil
import struct
import threading
import time
import zlib
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = [
    # errors
    "MinqError", "InvalidName", "InvalidMessage", "InvalidArgument", "NotInFlight",
    "PublishFailed", "TopicNotFound", "ChannelNotFound", "BrokerClosed", "DataPathInUse",
    # core
    "Message", "SegmentLog", "Channel", "Topic", "Broker", "Consumer",
    "SystemClock", "FakeClock",
    # in-process clients
    "PullConsumer", "Subscription",
    # constants
    "VERSION", "NSQ_VERSION", "DISPATCH_POLICIES", "ACK_BUFFER",
]

log = logging.getLogger("minq")

# =============================================================================
# Errors and constants
#
# Defaults are nsqd's, named like its flags; durations in the Python API are
# seconds as floats.  One exception class per failure a caller may handle.
# =============================================================================

VERSION = "0.1.0"
NSQ_VERSION = "1.3.0"  # the nsqd version whose behaviour minq reproduces

DEFAULT_MEM_QUEUE_SIZE = 10_000
DEFAULT_MSG_TIMEOUT = 60.0
DEFAULT_MAX_MSG_TIMEOUT = 15 * 60.0
DEFAULT_MAX_MSG_SIZE = 1024 * 1024
DEFAULT_MAX_BODY_SIZE = 5 * 1024 * 1024
DEFAULT_MAX_REQ_TIMEOUT = 60 * 60.0
DEFAULT_MAX_RDY_COUNT = 2500

EPHEMERAL_SUFFIX = "#ephemeral"
MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[.a-zA-Z0-9_-]+(#ephemeral)?")
DISPATCH_POLICIES = ("round_robin", "weighted", "hash")

# How long the timer thread may sleep when nothing is due; it is woken early
# whenever a sooner deadline is scheduled, so this only bounds idle wake-ups.
_TIMER_IDLE_WAIT = 1.0
_ID_MASK = (1 << 64) - 1


class MinqError(Exception):
    """Base class of every error minq raises on purpose."""


class InvalidName(MinqError, ValueError):
    """A topic or channel name breaks nsqd's naming rule (E_BAD_TOPIC / E_BAD_CHANNEL)."""


class InvalidMessage(MinqError, ValueError):
    """A message body is empty, too big or not bytes (E_BAD_MESSAGE)."""


class InvalidArgument(MinqError, ValueError):
    """An option or parameter is out of its allowed range (E_INVALID)."""


class NotInFlight(MinqError):
    """FIN / REQ / TOUCH of a message not in flight for this consumer (E_FIN_FAILED ...)."""


class PublishFailed(MinqError):
    """The broker could not accept a publish; nothing of it was accepted (E_PUB_FAILED)."""


class TopicNotFound(MinqError, KeyError):
    """An admin operation named a topic that does not exist (TOPIC_NOT_FOUND)."""


class ChannelNotFound(MinqError, KeyError):
    """An admin operation named a channel that does not exist (CHANNEL_NOT_FOUND)."""


class BrokerClosed(MinqError):
    """The broker (or the consumer) has been closed."""


class DataPathInUse(MinqError):
    """Another broker holds the lock of this data path."""


def validate_name(name: str, kind: str = "topic") -> str:
    """Return *name* if it is a valid topic/channel name, else raise InvalidName."""
    if (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH
            or not _NAME_RE.fullmatch(name)):
        raise InvalidName(
            f"{kind} name {name!r} is not valid: 1-{MAX_NAME_LENGTH} characters of "
            f"[.a-zA-Z0-9_-], optionally ending in {EPHEMERAL_SUFFIX}")
    return name


def is_ephemeral(name: str) -> bool:
    return name.endswith(EPHEMERAL_SUFFIX)


class SystemClock:
    """The real clock: ``monotonic()`` for deadlines, ``time_ns()`` for timestamps."""

    monotonic = staticmethod(time.monotonic)
    time_ns = staticmethod(time.time_ns)


class FakeClock:
    """A clock that moves only when told to, for tests: ``clock.advance(61)``.

    A broker built with it registers a listener, so ``advance`` fires every
    deadline and deferral that fell due before it returns.
    """

    def __init__(self, start: float = 1000.0, wall_ns: int = 1_700_000_000 * 10**9) -> None:
        self._lock = threading.Lock()  # guards _now and _listeners
        self._now = float(start)
        self._wall0 = wall_ns - int(start * 1e9)
        self._listeners: List[Callable[[], None]] = []

    def monotonic(self) -> float:
        return self._now

    def time_ns(self) -> int:
        return self._wall0 + int(self._now * 1e9)

    def add_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def advance(self, seconds: float) -> None:
        """Move time forward and run what fell due (in the calling thread)."""
        if seconds < 0:
            raise InvalidArgument("a clock cannot go backwards")
        with self._lock:
            self._now += seconds
            listeners = list(self._listeners)
        for callback in listeners:
            callback()


# =============================================================================
# Message
#
# The stored unit: id, body, publish timestamp, delivery count.  A delivered
# message is a fresh ``Message`` handle carrying who holds it and until when,
# so a stale handle can never settle a later delivery of the same message.
# =============================================================================

_MSG_HEADER = struct.Struct(">qH16s")  # timestamp ns, attempts, id: nsqd's layout
MSG_HEADER_SIZE = _MSG_HEADER.size     # 26


class Message:
    """A message: ``id`` (16 hex bytes), ``body``, ``timestamp`` (ns), ``attempts``.

    Messages handed to a consumer also support ``finish()``, ``requeue(delay)``
    and ``touch()``; on any other message these raise NotInFlight.
    """

    # _pos: where the message is stored in its queue's log (durable mode), else None.
    __slots__ = ("id", "body", "timestamp", "attempts", "_pos")

    def __init__(self, id: bytes, body: bytes, timestamp: int, attempts: int = 0) -> None:
        self.id = id
        self.body = body
        self.timestamp = timestamp
        self.attempts = attempts
        self._pos: Optional[int] = None

    def __repr__(self) -> str:
        return (f"<Message id={self.id.decode()} attempts={self.attempts} "
                f"body={self.body[:32]!r}{'...' if len(self.body) > 32 else ''}>")

    def encode(self) -> bytes:
        """nsqd's message layout: timestamp, attempts, id, body (wire and disk)."""
        return _MSG_HEADER.pack(self.timestamp, self.attempts, self.id) + self.body

    @classmethod
    def decode(cls, data: bytes) -> "Message":
        if len(data) < MSG_HEADER_SIZE:
            raise InvalidMessage(f"message record of {len(data)} bytes is shorter "
                                 f"than the {MSG_HEADER_SIZE}-byte header")
        timestamp, attempts, msg_id = _MSG_HEADER.unpack_from(data)
        return cls(msg_id, bytes(data[MSG_HEADER_SIZE:]), timestamp, attempts)

    # Settling is only possible on a delivered handle (see _Delivery).
    def finish(self) -> None:
        """Acknowledge the message: it is done and will not be delivered again."""
        raise NotInFlight(f"message {self.id.decode()} was not delivered to a consumer")

    def requeue(self, delay: float = 0.0) -> None:
        """Give the message back; it is delivered again after *delay* seconds."""
        raise NotInFlight(f"message {self.id.decode()} was not delivered to a consumer")

    def touch(self) -> None:
        """Reset the in-flight deadline (never past max_msg_timeout after delivery)."""
        raise NotInFlight(f"message {self.id.decode()} was not delivered to a consumer")


class _Delivery(Message):
    """One delivery of a message to one consumer: the handle the consumer gets."""

    __slots__ = ("consumer", "deadline", "delivered_at")

    def __init__(self, msg: Message, consumer: "Consumer", deadline: float,
                 delivered_at: float) -> None:
        self.id = msg.id
        self.body = msg.body
        self.timestamp = msg.timestamp
        self.attempts = msg.attempts + 1
        self._pos = msg._pos
        self.consumer = consumer
        self.deadline = deadline
        self.delivered_at = delivered_at

    def finish(self) -> None:
        self.consumer.channel._finish(self)

    def requeue(self, delay: float = 0.0) -> None:
        self.consumer.channel._settle(self, "requeue", delay)

    def touch(self) -> None:
        self.consumer.channel._settle(self, "touch", 0.0)


# =============================================================================
# Segment log
#
# Bytes in, bytes out: an append-only log of CRC-framed records in numbered
# segment files, a read cursor, and a commit point before which everything
# may be deleted.  In ack mode (minq's durable mode) records are acknowledged
# in any order and the commit point trails the oldest unacknowledged one.
# Knows nothing about messages, topics or channels.
# =============================================================================

DEFAULT_MAX_BYTES_PER_FILE = 100 * 1024 * 1024
DEFAULT_SYNC_EVERY = 2500
DEFAULT_SYNC_TIMEOUT = 2.0

_REC = struct.Struct(">II")          # payload length, crc32(payload)
_REC_SIZE = _REC.size
_ACK = struct.Struct(">Q")           # an acknowledged record position
_SEG_SHIFT = 40                      # position = segment number << 40 | offset
_SEG_MASK = (1 << _SEG_SHIFT) - 1
_READ_AHEAD = 256 * 1024
ACK_BUFFER = 64          # durable mode: finishes written per batch (lost at most on a crash)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    """Replace *path* with *data*: temp file, fsync, rename, fsync the directory."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


class SegmentLog:
    """An append-only record log in ``<name>.NNNNNN.seg`` files under *directory*.

    ``append`` writes records to the OS at once (a killed process loses none);
    ``sync`` fsyncs and saves the metadata (``<name>.meta``) atomically;
    ``sync_to`` is a group commit: concurrent callers share one fsync.
    Opening costs O(segments) plus a scan of what was written after the last
    metadata sync.  A torn tail is cut off; a record whose CRC fails is
    skipped, its segment copied aside as ``.bad`` and the loss counted.
    Every method is thread-safe (one lock, never held across an fsync).
    """

    def __init__(self, directory: str, name: str, *, ack_mode: bool = False,
                 max_bytes_per_file: int = DEFAULT_MAX_BYTES_PER_FILE,
                 max_record_size: int = 1 << 30) -> None:
        self.directory = directory
        self.name = name
        self.ack_mode = ack_mode
        self.max_bytes_per_file = max_bytes_per_file
        self.max_record_size = max_record_size
        # _lock guards all state below and is held only briefly.
        # _append_lock serialises writers and is held across the write itself
        # (taken before _lock, never after); _fsync_lock serialises fsyncs and
        # is never taken while _lock is held.
        self._append_lock = threading.Lock()
        self._lock = threading.Lock()
        self._fsync_lock = threading.Lock()
        self._meta_path = os.path.join(directory, f"{name}.meta")
        self._acks_path = os.path.join(directory, f"{name}.acks")
        self.bytes_written = 0
        self.fsync_count = 0
        self.corrupt_count = 0
        self.ops = 0                       # appends + reads since the last sync
        self.sync_requested = False        # the broker was asked to sync this log
        self._retired: List[int] = []      # fds of rolled segments, closed at sync
        self._read_fd: Optional[int] = None
        self._read_fd_num = -1
        self._rbuf = b""                   # read-ahead: bytes at [_rbuf_pos, ...)
        self._rbuf_pos = 0
        self._skip: set = set()            # records at >= cursor consumed elsewhere
        self._unacked: List[int] = []      # heap of consumed, unacknowledged positions
        self._acked: set = set()           # lazily removed from _unacked
        self._restart_acks: set = set()    # acks of records not yet read since open
        self._acks_fd: Optional[int] = None
        self._ack_buf: List[int] = []      # acks not yet written to the acks file
        self._pending_acks: Optional[List[int]] = None   # acks written during a rewrite
        self._durable_pos = 0              # everything before it is fsynced
        # _commit_cond guards _committing / _commit_waiters (group commit):
        # followers wait on it for the leader's fsync.
        self._commit_cond = threading.Condition(threading.Lock())
        self._committing = False
        self._commit_waiters = 0
        self._open()

    # -- positions and files ---------------------------------------------------
    def _seg_path(self, num: int) -> str:
        return os.path.join(self.directory, f"{self.name}.{num:06d}.seg")

    def _segment_numbers(self) -> List[int]:
        prefix, out = f"{self.name}.", []
        for fn in os.listdir(self.directory):
            if fn.startswith(prefix) and fn.endswith(".seg"):
                mid = fn[len(prefix):-4]
                if len(mid) == 6 and mid.isdigit():
                    out.append(int(mid))
        return sorted(out)

    @staticmethod
    def _pos(num: int, off: int) -> int:
        return (num << _SEG_SHIFT) | off

    # -- open and recovery -----------------------------------------------------
    def _open(self) -> None:
        meta = {}
        if os.path.exists(self._meta_path):
            try:
                with open(self._meta_path, "rb") as f:
                    meta = json.loads(f.read())
            except (OSError, ValueError) as e:
                log.error("segment log %s: unreadable metadata (%s); rescanning", self.name, e)
                meta = {}
        nums = self._segment_numbers()
        read_pos = int(meta.get("read", 0))
        write_num, write_off = divmod(int(meta.get("write", 0)), 1 << _SEG_SHIFT)
        depth = int(meta.get("depth", 0))
        if not meta and nums:   # no metadata: everything on disk is unread
            read_pos = self._pos(nums[0], 0)
            write_num, write_off = nums[0], 0
        # Salvage records written after the last metadata sync (crash).
        short = False
        for num in nums:
            if num < write_num:
                continue
            start = write_off if num == write_num else 0
            end, count = self._scan(num, start)
            short = short or end < start
            depth += count
            write_num, write_off = num, end
        if short:
            # Data the metadata counted did not survive (power loss): never
            # reuse those positions (old acks may name them); write anew.
            write_num, write_off = write_num + 1, 0
        acked_since = 0
        if self.ack_mode and os.path.exists(self._acks_path):
            with open(self._acks_path, "rb") as f:
                data = f.read()
            n = len(data) // _ACK.size      # a torn last entry is ignored
            acks = {_ACK.unpack_from(data, i * _ACK.size)[0] for i in range(n)}
            self._restart_acks = {p for p in acks if p >= read_pos}
            acked_since = max(n - int(meta.get("acks_base", 0)), 0)
        self.depth = max(depth - acked_since, 0)   # unread, unacknowledged records
        if write_num not in nums:
            write_off = 0
        self._read_pos = read_pos
        self._commit = read_pos
        self._write_num, self._write_off = write_num, write_off
        path = self._seg_path(write_num)
        self._write_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._write_fd).st_size > write_off:
            os.ftruncate(self._write_fd, write_off)     # cut a torn tail
        if not nums:
            _fsync_dir(self.directory)
        self._durable_pos = self.write_pos
        if self.ack_mode:
            self._acks_fd = os.open(self._acks_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                    0o600)
        self._save_meta()

    def _scan(self, num: int, start: int) -> Tuple[int, int]:
        """Count whole, valid records in segment *num* from *start*; return (end, count)."""
        with open(self._seg_path(num), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < start:
                log.error("segment log %s: segment %d is shorter (%d) than its metadata "
                          "says (%d)", self.name, num, size, start)
                return size, 0
            f.seek(start)
            data = f.read()
        count, off = 0, start
        view = memoryview(data)
        while len(view) - (off - start) >= _REC_SIZE:
            i = off - start
            size, crc = _REC.unpack_from(view, i)
            if size == 0 or size > self.max_record_size or i + _REC_SIZE + size > len(view):
                break
            if zlib.crc32(view[i + _REC_SIZE:i + _REC_SIZE + size]) != crc:
                break
            off += _REC_SIZE + size
            count += 1
        if off - start < len(data):
            log.warning("segment log %s: cut %d bytes of torn tail from segment %d",
                        self.name, len(data) - (off - start), num)
            with open(self._seg_path(num), "r+b") as f:
                f.truncate(off)
        return off, count

    # -- writing ---------------------------------------------------------------
    @property
    def write_pos(self) -> int:
        return self._pos(self._write_num, self._write_off)

    @property
    def needs_sync(self) -> bool:
        """Whether anything happened since the last sync (writes, reads, acks)."""
        return bool(self.ops or self._ack_buf)

    @property
    def unread(self) -> bool:
        """Whether records lie past the cursor (``depth`` is only an estimate)."""
        return self._read_pos < (self._write_num << _SEG_SHIFT) | self._write_off

    def append(self, payloads: List[bytes], consume: bool = False) -> List[int]:
        """Write records; return their positions.  Raises OSError with nothing written.

        With *consume* the records are taken as already read (their data lives
        in memory): the cursor, which must be at the end, moves past them.
        """
        n = len(payloads)
        positions: List[int] = []
        chunks: List[bytes] = []
        if not n:
            return positions
        with self._append_lock:
            with self._lock:
                num, off = self._write_num, self._write_off
                at_end = self._read_pos == (num << _SEG_SHIFT) | off
                total = sum(map(len, payloads)) + _REC_SIZE * n
                # A batch never spans segments (so it is written whole or not
                # at all); a batch bigger than a segment gets one of its own.
                if off > 0 and off + total > self.max_bytes_per_file:
                    self._roll()
                    num, off = self._write_num, 0
            base = num << _SEG_SHIFT
            if n == 1:
                p = payloads[0]
                data = _REC.pack(len(p), zlib.crc32(p)) + p
                positions.append(base | off)
            else:
                end = off
                for p in payloads:
                    positions.append(base | end)
                    chunks.append(_REC.pack(len(p), zlib.crc32(p)))
                    chunks.append(p)
                    end += _REC_SIZE + len(p)
                data = b"".join(chunks)
            end = off + len(data)
            # Written with only _append_lock held: readers and acks go on.
            # Nothing past _write_off is read, so the records appear at once
            # when it moves, below.
            self._write_data(data, off)
            self._lock.acquire()
        try:
            self._write_off = end
            self.ops += n
            if not consume:
                self.depth += n
            else:
                if at_end:
                    self._read_pos = base | end
                else:
                    self._skip.update(positions)
                if self.ack_mode:
                    for p in positions:
                        heapq.heappush(self._unacked, p)
            return positions
        finally:
            self._lock.release()

    def unappend(self, positions: List[int], consume: bool = False) -> None:
        """Undo the last ``append`` (nothing may have been appended since)."""
        with self._append_lock, self._lock:
            first = positions[0]
            num, off = first >> _SEG_SHIFT, first & _SEG_MASK
            if num != self._write_num:
                raise ValueError("unappend of a batch that is not the last one")
            os.ftruncate(self._write_fd, off)
            self._write_off = off
            self._rbuf = b""          # it may hold the bytes just cut off
            self.ops -= len(positions)
            if not consume:
                self.depth -= len(positions)
                return
            gone = set(positions)
            self._skip -= gone
            if self._read_pos > first:
                self._read_pos = first
            if self.ack_mode:
                self._unacked = [p for p in self._unacked if p not in gone]
                heapq.heapify(self._unacked)

    def _write_data(self, data: bytes, offset: int) -> None:
        try:
            done = os.pwrite(self._write_fd, data, offset)
            while done < len(data):      # short writes are rare: finish them
                n = os.pwrite(self._write_fd, memoryview(data)[done:], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError:
            try:
                os.ftruncate(self._write_fd, offset)   # nothing half-written stays
            except OSError:
                pass
            raise
        self.bytes_written += len(data)

    def _roll(self) -> None:
        os.fsync(self._write_fd)       # a finished segment is durable, as nsqd
        self.fsync_count += 1
        self._retired.append(self._write_fd)
        self._write_num += 1
        self._write_off = 0
        self._write_fd = os.open(self._seg_path(self._write_num),
                                 os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        _fsync_dir(self.directory)

    # -- reading ---------------------------------------------------------------
    def read(self) -> Optional[Tuple[int, bytes]]:
        """The next unread record as (position, payload), or None at the end."""
        with self._lock:
            while self._read_pos < self.write_pos:
                pos = self._read_pos
                rec = self._read_record(pos)
                if rec is None:
                    continue          # moved to the next segment or skipped damage
                payload, nxt = rec
                self._read_pos = nxt
                self.ops += 1
                if pos in self._skip:
                    self._skip.discard(pos)
                    continue
                if pos in self._restart_acks:    # acked before a restart
                    continue      # (kept until the commit point passes it)
                self.depth -= 1
                if self.ack_mode:
                    heapq.heappush(self._unacked, pos)
                else:
                    self._advance_commit_locked()
                return pos, payload
            self._advance_commit_locked()
            return None

    def _read_record(self, pos: int) -> Optional[Tuple[bytes, int]]:
        num, off = pos >> _SEG_SHIFT, pos & _SEG_MASK
        header = self._read_bytes(num, off, _REC_SIZE)
        if header is None:      # end of a finished segment: go to the next one
            self._next_segment(num)
            return None
        size, crc = _REC.unpack(header)
        payload = None
        if 0 < size <= self.max_record_size:
            payload = self._read_bytes(num, off + _REC_SIZE, size)
        if payload is None:
            self._damaged(num, off, "bad record length")
            return None
        if zlib.crc32(payload) != crc:
            self._damaged(num, off, "CRC mismatch", skip_to=off + _REC_SIZE + size)
            return None
        return payload, self._pos(num, off + _REC_SIZE + size)

    def _read_bytes(self, num: int, off: int, n: int) -> Optional[bytes]:
        if self._read_fd_num != num:
            self._close_read_fd()
            try:
                self._read_fd = os.open(self._seg_path(num), os.O_RDONLY)
            except FileNotFoundError:
                return None
            self._read_fd_num = num
            self._rbuf, self._rbuf_pos = b"", 0
        i = off - self._rbuf_pos
        if i < 0 or i + n > len(self._rbuf):
            self._rbuf = os.pread(self._read_fd, max(n, _READ_AHEAD), off)
            self._rbuf_pos = off
            i = 0
        if i + n > len(self._rbuf):
            return None
        return self._rbuf[i:i + n]

    def _next_segment(self, num: int) -> None:
        if num >= self._write_num:    # the write segment ended early: torn data
            self._read_pos = self.write_pos
            return
        self._read_pos = self._pos(num + 1, 0)

    def _damaged(self, num: int, off: int, why: str, skip_to: Optional[int] = None) -> None:
        self.corrupt_count += 1
        bad = self._seg_path(num) + ".bad"
        if not os.path.exists(bad):
            try:
                shutil.copyfile(self._seg_path(num), bad)
            except OSError:
                log.exception("segment log %s: could not keep a copy of damaged segment %d",
                              self.name, num)
        end = self._write_off if num == self._write_num else None
        size = os.fstat(self._read_fd).st_size if self._read_fd is not None else 0
        limit = end if end is not None else size
        if skip_to is not None and skip_to <= limit:
            log.error("segment log %s: %s at segment %d offset %d; record skipped, "
                      "copy kept as %s", self.name, why, num, off, bad)
            self._read_pos = self._pos(num, skip_to)
        else:
            log.error("segment log %s: %s at segment %d offset %d; rest of the segment "
                      "lost, copy kept as %s", self.name, why, num, off, bad)
            self._next_segment(num)
        if self.depth > 0:
            self.depth -= 1

    def _close_read_fd(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
        self._read_fd, self._read_fd_num = None, -1

    # -- consuming and acknowledging ------------------------------------------
    def ack(self, pos: int) -> None:
        """Acknowledge a consumed record (ack mode): it will not be read again."""
        with self._lock:
            if not self.ack_mode:
                return
            self._acked.add(pos)
            self._ack_buf.append(pos)
            if len(self._ack_buf) >= ACK_BUFFER:
                self._flush_acks_locked()
            self._advance_commit_locked()

    def _flush_acks_locked(self) -> None:
        # Acks are written in batches: a crash loses at most ACK_BUFFER of them
        # (those since the last flush or sync), which only causes redelivery.
        buf, self._ack_buf = self._ack_buf, []
        if not buf or self._acks_fd is None:
            return
        if self._pending_acks is not None:
            self._pending_acks.extend(buf)
        try:
            os.write(self._acks_fd, b"".join([_ACK.pack(p) for p in buf]))
        except OSError as e:   # the records may be redelivered after a crash
            log.error("segment log %s: could not record %d ack(s) (%s)", self.name,
                      len(buf), e)

    def _advance_commit_locked(self) -> None:
        heap, acked = self._unacked, self._acked
        # Acked records past the cursor (deferred ones) stay until the cursor
        # passes them: their acks must outlive a restart.
        while heap and heap[0] in acked and heap[0] < self._read_pos:
            acked.discard(heapq.heappop(heap))
        commit = min(heap[0], self._read_pos) if heap else self._read_pos
        if commit >> _SEG_SHIFT > self._commit >> _SEG_SHIFT:
            for num in range(self._commit >> _SEG_SHIFT, commit >> _SEG_SHIFT):
                self._delete_segment(num)
        self._commit = commit

    def _delete_segment(self, num: int) -> None:
        if num == self._read_fd_num:
            self._close_read_fd()
        try:
            os.unlink(self._seg_path(num))
        except FileNotFoundError:
            pass

    # -- syncing ---------------------------------------------------------------
    def sync_to(self, pos: int) -> None:
        """Return once every record before *pos* is fsynced (group commit).

        One caller leads an fsync while the others wait for it; the leader
        first yields the GIL when others are waiting, so that writers already
        on their way join this fsync instead of needing the next one.
        """
        if self._durable_pos >= pos:
            return
        cond = self._commit_cond
        with cond:
            self._commit_waiters += 1
            try:
                while self._durable_pos < pos and self._committing:
                    cond.wait()
                if self._durable_pos >= pos:
                    return
                self._committing = True
                crowd = self._commit_waiters > 1
            finally:
                self._commit_waiters -= 1
        try:
            if crowd:
                time.sleep(0)
            with self._fsync_lock:
                with self._lock:
                    target, fd = self.write_pos, self._write_fd
                os.fsync(fd)
                self.fsync_count += 1
        finally:
            with cond:
                self._committing = False
                if self._durable_pos < target:
                    self._durable_pos = target
                cond.notify_all()

    def sync(self) -> None:
        """fsync the data and save the metadata (nsqd's sync_every / sync_timeout)."""
        with self._fsync_lock:
            with self._lock:
                target, fd = self.write_pos, self._write_fd
                retired, self._retired = self._retired, []
            os.fsync(fd)
            self.fsync_count += 1
            self._durable_pos = max(self._durable_pos, target)
            for rfd in retired:
                os.close(rfd)
            self._save_meta()

    def _save_meta(self) -> None:
        # Order matters for a crash in between: the metadata first (the old
        # acks file still holds every ack), then the acks file is rewritten
        # with what lies past the new commit point, plus the acks made while
        # it was being written, and swapped in atomically.
        with self._lock:
            self.ops = 0
            self.sync_requested = False
            meta = {"read": self._commit, "write": self.write_pos, "depth": self.depth}
            if self.ack_mode:
                self._flush_acks_locked()
                self._restart_acks = {p for p in self._restart_acks if p >= self._commit}
                live = sorted(self._restart_acks | {p for p in self._acked if p >= self._commit})
                meta["depth"] = self.depth + len(self._unacked) - len(self._acked)
                meta["acks_base"] = len(live)
                self._pending_acks = []
        _write_atomic(self._meta_path, json.dumps(meta).encode())
        if not self.ack_mode:
            return
        tmp = f"{self._acks_path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            os.write(fd, b"".join(_ACK.pack(p) for p in live))
            os.fsync(fd)
            with self._lock:
                if self._pending_acks:
                    os.write(fd, b"".join(_ACK.pack(p) for p in self._pending_acks))
                self._pending_acks = None
                os.replace(tmp, self._acks_path)
                if self._acks_fd is not None:
                    os.close(self._acks_fd)
                self._acks_fd, fd = fd, -1
        finally:
            if fd >= 0:
                os.close(fd)
        _fsync_dir(self.directory)

    # -- life cycle --------------------------------------------------------------
    def empty(self) -> None:
        """Drop every record: delete the segments and start a new one."""
        with self._append_lock, self._lock:
            first = self._commit >> _SEG_SHIFT
            self._close_read_fd()
            for num in range(first, self._write_num + 1):
                if num != self._write_num:
                    self._delete_segment(num)
            self._retired.append(self._write_fd)
            self._write_num += 1
            self._write_off = 0
            self._write_fd = os.open(self._seg_path(self._write_num),
                                     os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._delete_segment(self._write_num - 1)
            self._read_pos = self._commit = self.write_pos
            self.depth = 0
            self._skip.clear()
            self._unacked.clear()
            self._acked.clear()
            self._restart_acks.clear()
        self.sync()

    def close(self) -> None:
        """Sync and release the files."""
        self.sync()
        with self._append_lock, self._lock:
            self._close_read_fd()
            os.close(self._write_fd)
            if self._acks_fd is not None:
                os.close(self._acks_fd)
                self._acks_fd = None

    def destroy(self) -> None:
        """Close and delete every file of the log."""
        with self._append_lock, self._lock:
            self._close_read_fd()
            for fd in self._retired + [self._write_fd]:
                os.close(fd)
            self._retired = []
            if self._acks_fd is not None:
                os.close(self._acks_fd)
                self._acks_fd = None
        for num in self._segment_numbers():
            self._delete_segment(num)
        for path in (self._meta_path, self._acks_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


# =============================================================================
# Channel
#
# Owns message state for one consumer group: the ready queue, the in-flight
# table with its deadline heap, the deferred heap, the consumers and how a
# message picks one of them.  One lock per channel guards all of it; user
# code and consumer delivery callbacks always run after it is released.
# =============================================================================

_RECORD_DUE = struct.Struct(">q")   # due time (wall-clock ns, 0 = not deferred), then the message
_RECORD_HEAD = struct.Struct(">q" + _MSG_HEADER.format[1:])   # due + nsqd's message header


def _encode_record(msg: Message, due_ns: int = 0) -> bytes:
    return _RECORD_HEAD.pack(due_ns, msg.timestamp, msg.attempts, msg.id) + msg.body


def _decode_record(payload: bytes) -> Tuple[Message, int]:
    (due_ns,) = _RECORD_DUE.unpack_from(payload)
    return Message.decode(memoryview(payload)[_RECORD_DUE.size:]), due_ns


class _MessageQueue:
    """The ready queue of a channel or topic: memory first, then a SegmentLog.

    Up to ``mem_limit`` messages live in memory; beyond that (or while the log
    holds older ones, to keep FIFO order) they go to the log.  In durable mode
    every message is written to the log and the memory part is a cache; a
    message leaves the log when ``done`` acknowledges it.  Without a log the
    queue is memory only (ephemeral ones drop beyond ``mem_limit``).
    Called with the owner's lock held.
    """

    def __init__(self, seglog: Optional[SegmentLog], mem_limit: int, durable: bool,
                 ephemeral: bool, on_deferred: Callable[[Message, int], None],
                 on_write: Callable[[SegmentLog], None]) -> None:
        self.log = seglog
        self.mem: Deque[Message] = collections.deque()
        self.mem_limit = mem_limit
        self.durable = durable and seglog is not None
        self.ephemeral = ephemeral
        self.drop_count = 0
        self._on_deferred = on_deferred   # a record read from disk is due later
        self._on_write = on_write         # tell the broker a log was written

    def __len__(self) -> int:
        return len(self.mem) + (self.log.depth if self.log is not None else 0)

    @property
    def backlog(self) -> int:
        """How many queued messages are only on disk (nsqd's backend_depth)."""
        return self.log.depth if self.log is not None else 0

    @property
    def on_disk(self) -> bool:
        """Whether unread records wait in the log."""
        return self.log is not None and self.log.unread

    # -- putting: prepare (may fail, nothing visible) then commit ---------------
    def prepare(self, msgs: List[Message], due_ns: int = 0) -> Tuple[Any, ...]:
        """Write what must be written; raise OSError with nothing written.

        Deferred messages (*due_ns* > 0) are held by the caller in memory; in
        durable mode their records are written too.
        """
        seglog = self.log
        if seglog is None:
            return (msgs, None, False, not due_ns)
        to_mem = (not due_ns and not seglog.unread
                  and len(self.mem) + len(msgs) <= self.mem_limit)
        if self.durable:
            consume = to_mem or bool(due_ns)
        elif to_mem or due_ns:
            return (msgs, None, False, to_mem)
        else:
            consume = False
        records = [_encode_record(m, due_ns) for m in msgs]
        positions = seglog.append(records, consume=consume)
        self._on_write(seglog)
        return (msgs, positions, consume, to_mem)

    def abort(self, token: Tuple[Any, ...]) -> None:
        msgs, positions, consume, _ = token
        if positions:
            self.log.unappend(positions, consume)

    def commit(self, token: Tuple[Any, ...]) -> None:
        msgs, positions, _, to_mem = token
        if positions is not None and self.durable:
            for m, p in zip(msgs, positions):
                m._pos = p
        if to_mem:
            self.push(msgs)

    def push(self, msgs: List[Message]) -> None:
        """Put messages (already stored, if they need to be) in memory."""
        if self.ephemeral:
            room = max(self.mem_limit - len(self.mem), 0)
            if room < len(msgs):
                self.drop_count += len(msgs) - room
                log.warning("ephemeral queue is full: dropped %d message(s)",
                            len(msgs) - room)
                msgs = msgs[:room]
        self.mem.extend(msgs)

    # -- taking ------------------------------------------------------------------
    def pop(self, now_ns: int) -> Optional[Message]:
        """The next message due now, or None; deferred ones found go to on_deferred."""
        if self.mem:
            return self.mem.popleft()
        seglog = self.log
        while seglog is not None and seglog.unread:
            rec = seglog.read()
            if rec is None:
                return None
            pos, payload = rec
            try:
                msg, due_ns = _decode_record(payload)
            except (InvalidMessage, struct.error):
                log.error("segment log %s: record at %d is not a message; skipped",
                          seglog.name, pos)
                seglog.corrupt_count += 1
                seglog.ack(pos)
                continue
            if self.durable:
                msg._pos = pos
            if due_ns > now_ns:
                self._on_deferred(msg, due_ns)
                continue
            return msg
        return None

    def fill(self, n: int, now_ns: int) -> None:
        """Bring up to *n* messages into memory (for look-ahead)."""
        while len(self.mem) < n and self.on_disk:
            m = self.pop(now_ns)
            if m is None:
                return
            self.mem.append(m)

    def done(self, msg: Message) -> None:
        """The message left the queue for good (finished, dead-lettered, dropped)."""
        if msg._pos is not None and self.durable:
            self.log.ack(msg._pos)

    # -- life cycle ----------------------------------------------------------------
    def clear(self) -> None:
        self.mem.clear()
        if self.log is not None:
            self.log.empty()

    def persist(self, extra: List[Tuple[Message, int]]) -> None:
        """At a clean close: store what lives only in memory (with due times)."""
        if self.log is None:
            return
        items = [(m, 0) for m in self.mem] + extra
        self.mem.clear()
        if not items:
            return
        records = [_encode_record(m, due) for m, due in items]
        try:
            self.log.append(records)
        except OSError as e:
            log.error("could not persist %d message(s) to %s: %s", len(items),
                      self.log.name, e)
            return
        for m, _ in items:     # the new records supersede the old ones
            self.done(m)


Deliveries = List[Tuple["Consumer", _Delivery]]


class Consumer:
    """A subscriber of a channel as the core sees it (in-process or a TCP client).

    Front ends subclass it and implement ``_deliver`` (called without any
    broker lock held; must not block) and optionally ``_on_channel_closed``.
    ``ready_count`` is nsqd's RDY: messages are delivered while
    ``in_flight_count < ready_count``.
    """

    _ids = itertools.count(1)

    def __init__(self, ready_count: int = 1, msg_timeout: Optional[float] = None,
                 weight: int = 1, client_id: Optional[str] = None) -> None:
        self.channel: Optional[Channel] = None
        self.id = next(Consumer._ids)
        self.client_id = client_id if client_id is not None else f"minq-{self.id}"
        self.ready_count = ready_count
        self.msg_timeout = msg_timeout   # None: the broker's msg_timeout
        self.weight = weight
        self.in_flight_count = 0
        self.message_count = 0
        self.finish_count = 0
        self.requeue_count = 0
        self.connect_ts = int(time.time())
        self.closed = False
        self._current_weight = 0          # smooth weighted round-robin state

    # -- hooks for front ends -------------------------------------------------
    def _deliver(self, msg: _Delivery) -> None:
        raise NotImplementedError

    def _on_channel_closed(self) -> None:
        """The channel was deleted or the broker closed: stop consuming."""
        self.closed = True

    def client_stats(self) -> Dict[str, Any]:
        """nsqd's client object for /stats; TCP clients override the address fields."""
        return {
            "client_id": self.client_id, "hostname": platform.node(), "version": "V2",
            "remote_address": "inproc", "state": 4 if self.closed else 3,
            "ready_count": self.ready_count, "in_flight_count": self.in_flight_count,
            "message_count": self.message_count, "finish_count": self.finish_count,
            "requeue_count": self.requeue_count, "connect_ts": self.connect_ts,
            "sample_rate": 0, "deflate": False, "snappy": False,
            "user_agent": f"minq/{VERSION}", "topology_zone": "", "topology_region": "",
            "tls": False, "tls_cipher_suite": "", "tls_version": "",
            "tls_negotiated_protocol": "", "tls_negotiated_protocol_is_mutual": False,
            "weight": self.weight,
        }

    def is_ready(self) -> bool:
        return not self.closed and self.in_flight_count < self.ready_count


class _HashRing:
    """Consistent hashing of keys onto consumers (64 virtual nodes each)."""

    REPLICAS = 64

    def __init__(self, consumers: List[Consumer]) -> None:
        points = []
        for c in consumers:
            for r in range(self.REPLICAS):
                points.append((self._hash(f"{c.id}-{r}".encode()), c.id, c))
        points.sort(key=lambda p: (p[0], p[1]))
        self._keys = [p[0] for p in points]
        self._consumers = [p[2] for p in points]

    @staticmethod
    def _hash(data: bytes) -> int:
        return zlib.crc32(data) * 2654435761 % (1 << 32)  # spread crc32 over the ring

    def lookup(self, key: bytes) -> Optional[Consumer]:
        if not self._keys:
            return None
        i = bisect.bisect(self._keys, self._hash(key)) % len(self._keys)
        return self._consumers[i]


def _key_bytes(key: Any) -> bytes:
    if isinstance(key, bytes):
        return key
    return str(key).encode()


class Channel:
    """A consumer group of a topic; each channel gets its own copy of every message.

    Create through ``topic.channel(name)``.  Its state is guarded by one lock;
    public methods may be called from any thread.
    """

    # How many queued messages the hash policy looks past a blocked head.
    HASH_LOOKAHEAD = 64

    def __init__(self, topic: "Topic", name: str, *, max_attempts: Optional[int] = None,
                 dead_letter_topic: Optional[str] = None, dispatch: str = "round_robin",
                 key: Optional[Callable[[Message], Any]] = None) -> None:
        self.topic = topic
        self.broker = topic.broker
        self.name = name
        self.ephemeral = is_ephemeral(name)
        self._monotonic = self.broker.clock.monotonic
        # _lock guards every field below; it is never held while calling user
        # code, consumer callbacks or another topic's methods.
        self._lock = threading.Lock()
        self._queue = self.broker._new_queue(f"{topic.name}:{name}", self.ephemeral,
                                             self._defer_from_disk)
        self._in_flight: Dict[bytes, _Delivery] = {}
        self._in_flight_heap: List[Tuple[float, bytes]] = []   # (deadline, id), lazy
        self._deferred: Dict[bytes, Message] = {}
        self._deferred_heap: List[Tuple[float, bytes]] = []    # (due, id), lazy
        self._consumers: List[Consumer] = []
        self._rr_next = 0
        self._ring: Optional[_HashRing] = None
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.requeue_count = 0
        self.timeout_count = 0
        self.dead_count = 0
        self.max_attempts: Optional[int] = None
        self.dead_letter_topic: Optional[str] = None
        self.dispatch = "round_robin"
        self.key: Optional[Callable[[Message], Any]] = None
        self.configure(max_attempts=max_attempts, dead_letter_topic=dead_letter_topic,
                       dispatch=dispatch, key=key)

    def __repr__(self) -> str:
        return f"<Channel {self.topic.name}/{self.name} depth={self.depth}>"

    # -- configuration ---------------------------------------------------------
    def configure(self, *, max_attempts: Optional[int] = None,
                  dead_letter_topic: Optional[str] = None, dispatch: Optional[str] = None,
                  key: Optional[Callable[[Message], Any]] = None) -> None:
        """Set per-channel options; arguments left as None keep their value."""
        if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 0):
            raise InvalidArgument(f"max_attempts must be an int >= 0 (0 = unlimited), "
                                  f"not {max_attempts!r}")
        if dead_letter_topic is not None:
            validate_name(dead_letter_topic, "dead-letter topic")
        if dispatch is not None and dispatch not in DISPATCH_POLICIES:
            raise InvalidArgument(f"dispatch must be one of {', '.join(DISPATCH_POLICIES)}, "
                                  f"not {dispatch!r}")
        effective = dispatch or self.dispatch
        if effective == "hash" and key is None and self.key is None:
            raise InvalidArgument("dispatch='hash' needs key=callable(message) -> key")
        with self._lock:
            if max_attempts is not None:
                self.max_attempts = max_attempts
            if dead_letter_topic is not None:
                self.dead_letter_topic = dead_letter_topic
            if dispatch is not None:
                self.dispatch = dispatch
            if key is not None:
                self.key = key
            self._ring = None
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries)

    @property
    def effective_max_attempts(self) -> int:
        return self.max_attempts if self.max_attempts is not None else self.broker.max_attempts

    @property
    def dead_letter_name(self) -> str:
        """The topic that receives messages out of attempts (see max_attempts)."""
        if self.dead_letter_topic:
            return self.dead_letter_topic
        return dead_letter_name(self.topic.name, self.name)

    # -- counts ----------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    @property
    def deferred_count(self) -> int:
        return len(self._deferred)

    @property
    def client_count(self) -> int:
        return len(self._consumers)

    # -- putting messages in (the topic holds its lock and this channel's) ----
    def _prepare_locked(self, msgs: List[Message], defer: float) -> Tuple[Any, ...]:
        """Store messages where they must be stored; OSError means nothing was.

        Called with the topic's lock held, and with this channel's lock held
        unless the topic has no other channel (the log has its own locks).
        """
        due_ns = self.broker._time_ns() + int(defer * 1e9) if defer > 0 else 0
        return self._queue.prepare(msgs, due_ns)

    def _commit_locked(self, token: Tuple[Any, ...], defer: float, out: Deliveries) -> None:
        """Make prepared messages visible; deliveries to make are appended to *out*."""
        self._queue.commit(token)
        msgs = token[0]
        self.message_count += len(msgs)
        if defer > 0:
            due = self._monotonic() + defer
            for m in msgs:
                self._defer_locked(m, due)
        elif self._consumers and not self.paused:
            self._dispatch_locked(out)

    def _put_memory(self, msgs: List[Message], defer: float, out: Deliveries) -> None:
        """The fast path of prepare+commit for a channel without a log (cannot fail)."""
        with self._lock:
            self.message_count += len(msgs)
            if defer > 0:
                due = self._monotonic() + defer
                for m in msgs:
                    self._defer_locked(m, due)
                return
            q = self._queue
            if q.ephemeral:
                q.push(msgs)
            else:
                q.mem.extend(msgs)
            if self._consumers and not self.paused:
                self._dispatch_locked(out)

    def _defer_locked(self, msg: Message, due: float) -> None:
        self._deferred[msg.id] = msg
        heapq.heappush(self._deferred_heap, (due, msg.id))
        self.broker._schedule(due)

    def _defer_from_disk(self, msg: Message, due_ns: int) -> None:
        # A deferred record met while reading the log (after a restart).
        self._defer_locked(msg, self._monotonic() + (due_ns - self.broker._time_ns()) / 1e9)

    # -- consumers -------------------------------------------------------------
    def add_consumer(self, consumer: Consumer) -> None:
        """Attach a consumer (nsqd's SUB)."""
        with self._lock:
            if self.deleted:
                raise BrokerClosed(f"channel {self.topic.name}/{self.name} was deleted")
            consumer.channel = self
            self._consumers.append(consumer)
            self._ring = None
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries)

    def remove_consumer(self, consumer: Consumer) -> None:
        """Detach a consumer; its in-flight messages are requeued at once."""
        dead: List[Message] = []
        with self._lock:
            if consumer not in self._consumers:
                return
            self._consumers.remove(consumer)
            consumer.closed = True
            self._ring = None
            mine = [h for h in self._in_flight.values() if h.consumer is consumer]
            for h in mine:
                del self._in_flight[h.id]
                self._return_locked(h, 0.0, dead)
            consumer.in_flight_count = 0
            deliveries = self._dispatch_locked([])
            last_gone = self.ephemeral and not self._consumers
        self._hand_over(deliveries, dead)
        if last_gone:
            self.topic._delete_channel_if_unused(self)

    def set_ready(self, consumer: Consumer, count: int) -> None:
        """Change a consumer's RDY window and deliver what now fits."""
        with self._lock:
            consumer.ready_count = count
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries)

    # -- settling (FIN / REQ / TOUCH) ------------------------------------------
    def finish(self, consumer: Consumer, msg_id: bytes) -> None:
        """FIN by id for *consumer*; raise NotInFlight if it does not hold it."""
        self._settle_id(consumer, msg_id, "finish", 0.0)

    def requeue(self, consumer: Consumer, msg_id: bytes, delay: float = 0.0) -> None:
        """REQ by id: back to the queue, or to the deferred set if delay > 0."""
        self._settle_id(consumer, msg_id, "requeue", delay)

    def touch(self, consumer: Consumer, msg_id: bytes) -> None:
        """TOUCH by id: restart the in-flight deadline."""
        self._settle_id(consumer, msg_id, "touch", 0.0)

    def _settle_id(self, consumer: Consumer, msg_id: bytes, action: str, delay: float) -> None:
        h = self._in_flight.get(msg_id)
        if h is None or h.consumer is not consumer:
            raise NotInFlight(f"{_ACTION_CODES[action]} {msg_id!r} failed: "
                              f"ID not in flight for this consumer")
        self._settle(h, action, delay)

    def _finish(self, h: _Delivery) -> None:
        # The hot path of _settle(h, "finish"): no requeue, no dead letters.
        with self._lock:
            if self._in_flight.get(h.id) is not h:
                raise NotInFlight(f"FIN {h.id.decode()} failed: message not in flight "
                                  f"(finished, requeued, timed out or emptied)")
            del self._in_flight[h.id]
            c = h.consumer
            c.in_flight_count -= 1
            c.finish_count += 1
            q = self._queue
            if h._pos is not None:
                q.done(h)
            if not q.mem and (q.log is None or not q.log.unread):
                return
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries)

    def _settle(self, h: _Delivery, action: str, delay: float) -> None:
        if action == "finish":
            return self._finish(h)
        dead: List[Message] = []
        with self._lock:
            if self._in_flight.get(h.id) is not h:
                raise NotInFlight(f"{_ACTION_CODES[action]} {h.id.decode()} failed: "
                                  f"message not in flight (finished, requeued, timed out "
                                  f"or emptied)")
            c = h.consumer
            if action == "touch":
                now = self.broker.clock.monotonic()
                h.deadline = min(now + self._timeout_for(c),
                                 h.delivered_at + self.broker.max_msg_timeout)
                heapq.heappush(self._in_flight_heap, (h.deadline, h.id))
                self.broker._schedule(h.deadline)
                return
            del self._in_flight[h.id]
            c.in_flight_count -= 1
            c.requeue_count += 1
            self.requeue_count += 1
            delay = min(max(delay, 0.0), self.broker.max_req_timeout)
            self._return_locked(h, delay, dead)
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries, dead)

    def _return_locked(self, msg: Message, delay: float, dead: List[Message]) -> None:
        """Put a message that left flight back, or dead-letter it if out of attempts."""
        limit = self.effective_max_attempts
        if limit and msg.attempts >= limit:
            self.dead_count += 1
            dead.append(msg)
            return
        stored = Message(msg.id, msg.body, msg.timestamp, msg.attempts)
        stored._pos = msg._pos     # durable: the same record stays unacknowledged
        if delay > 0:
            self._defer_locked(stored, self._monotonic() + delay)
        else:
            self._queue.push([stored])

    def _timeout_for(self, consumer: Consumer) -> float:
        return consumer.msg_timeout or self.broker.msg_timeout

    # -- dispatch --------------------------------------------------------------
    def _dispatch_locked(self, out: Deliveries) -> Deliveries:
        """Move queued messages into flight for ready consumers (lock held)."""
        q = self._queue
        if self.paused or not self._consumers or not (q.mem or q.log is not None and q.on_disk):
            return out
        now = self._monotonic()
        now_ns = self.broker._time_ns()
        if self.dispatch == "hash":
            self._dispatch_hash_locked(now, now_ns, out)
            return out
        pick = self._pick_weighted if self.dispatch == "weighted" else self._pick_round_robin
        start = self._start_flight_locked
        while q.mem or q.log is not None and q.log.unread:
            c = pick()
            if c is None:
                break
            msg = q.pop(now_ns)
            if msg is None:
                break
            out.append((c, start(msg, c, now)))
        return out

    def _start_flight_locked(self, msg: Message, c: Consumer, now: float) -> _Delivery:
        deadline = now + (c.msg_timeout or self.broker.msg_timeout)
        h = _Delivery(msg, c, deadline, now)
        self._in_flight[h.id] = h
        c.in_flight_count += 1
        c.message_count += 1
        heapq.heappush(self._in_flight_heap, (deadline, h.id))
        if deadline < self.broker._next_due:
            self.broker._schedule(deadline)
        return h

    def _pick_round_robin(self) -> Optional[Consumer]:
        cs = self._consumers
        n = len(cs)
        if n == 1:
            c = cs[0]
            return c if not c.closed and c.in_flight_count < c.ready_count else None
        for i in range(n):
            c = cs[(self._rr_next + i) % n]
            if not c.closed and c.in_flight_count < c.ready_count:
                self._rr_next = (self._rr_next + i + 1) % n
                return c
        return None

    def _pick_weighted(self) -> Optional[Consumer]:
        # Smooth weighted round-robin (as nginx): every ready consumer gains its
        # weight, the richest is picked and pays back the total.
        ready = [c for c in self._consumers
                 if not c.closed and c.in_flight_count < c.ready_count]
        if not ready:
            return None
        total = 0
        best = ready[0]
        for c in ready:
            c._current_weight += c.weight
            total += c.weight
            if c._current_weight > best._current_weight:
                best = c
        best._current_weight -= total
        return best

    def _dispatch_hash_locked(self, now: float, now_ns: int, out: Deliveries) -> None:
        # A key always maps to the same live consumer.  If that consumer is
        # full, its messages wait; others' messages behind them may pass
        # (within HASH_LOOKAHEAD), so per-key order is kept.
        if self._ring is None:
            self._ring = _HashRing([c for c in self._consumers if not c.closed])
        self._queue.fill(self.HASH_LOOKAHEAD, now_ns)
        q = self._queue.mem
        i = 0
        while i < len(q) and i < self.HASH_LOOKAHEAD:
            msg = q[i]
            try:
                key = _key_bytes(self.key(msg))  # type: ignore[misc]
            except Exception:
                log.exception("hash key function failed on message %s; using its id",
                               msg.id.decode())
                key = msg.id
            c = self._ring.lookup(key)
            if c is None:
                return
            if c.in_flight_count < c.ready_count and not c.closed:
                del q[i]
                out.append((c, self._start_flight_locked(msg, c, now)))
            else:
                i += 1

    def _hand_over(self, deliveries: Deliveries, dead: Optional[List[Message]] = None) -> None:
        """Run consumer callbacks and dead-lettering, with no lock held."""
        if deliveries:
            _hand_over_all(deliveries)
        if dead:
            self.broker._dead_letter(self, dead)

    # -- timers ----------------------------------------------------------------
    def _process_due(self, now: float) -> float:
        """Time out expired in-flight messages and release due deferred ones.

        Returns the channel's next due time (inf if none).
        """
        dead: List[Message] = []
        with self._lock:
            heap = self._in_flight_heap
            while heap and heap[0][0] <= now:
                deadline, msg_id = heapq.heappop(heap)
                h = self._in_flight.get(msg_id)
                if h is None or h.deadline != deadline:
                    continue  # finished, requeued or touched since: stale entry
                del self._in_flight[msg_id]
                h.consumer.in_flight_count -= 1
                self.timeout_count += 1
                self._return_locked(h, 0.0, dead)
            dheap = self._deferred_heap
            due: List[Message] = []
            while dheap and dheap[0][0] <= now:
                _, msg_id = heapq.heappop(dheap)
                msg = self._deferred.pop(msg_id, None)
                if msg is not None:
                    due.append(msg)
            if due:
                self._queue.push(due)
            deliveries = self._dispatch_locked([])
            nxt = min(heap[0][0] if heap else math.inf, dheap[0][0] if dheap else math.inf)
        self._hand_over(deliveries, dead)
        return nxt

    # -- admin -----------------------------------------------------------------
    def pause(self) -> None:
        """Stop delivering (messages are still accepted and queued)."""
        with self._lock:
            self.paused = True
        self.broker._metadata_changed()

    def unpause(self) -> None:
        """Resume delivering."""
        with self._lock:
            self.paused = False
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries)
        self.broker._metadata_changed()

    def empty(self) -> None:
        """Drop every queued, in-flight and deferred message (as nsqd)."""
        with self._lock:
            self._empty_locked()

    def _empty_locked(self) -> None:
        try:
            self._queue.clear()
        except OSError as e:
            log.error("channel %s/%s: could not empty its log: %s", self.topic.name,
                      self.name, e)
        self._in_flight.clear()
        self._in_flight_heap.clear()
        self._deferred.clear()
        self._deferred_heap.clear()
        for c in self._consumers:
            c.in_flight_count = 0

    def delete(self) -> None:
        """Delete the channel and its messages; its consumers are closed."""
        self.topic.delete_channel(self.name)

    def _close(self) -> List[Consumer]:
        """Mark deleted, drop messages, return the consumers to notify."""
        with self._lock:
            self.deleted = True
            self._in_flight.clear()
            self._deferred.clear()
            self._queue.mem.clear()
            self.broker._drop_log(self._queue.log)
            consumers, self._consumers = self._consumers, []
            for c in consumers:
                c.closed = True
        return consumers

    def _persist(self) -> None:
        """At a clean broker close: store in-flight and deferred messages, close the log."""
        with self._lock:
            if self._queue.log is None:
                return
            now, now_ns = self._monotonic(), self.broker._time_ns()
            extra: List[Tuple[Message, int]] = [(h, 0) for h in self._in_flight.values()]
            for due, msg_id in self._deferred_heap:
                m = self._deferred.get(msg_id)
                if m is not None:
                    extra.append((m, now_ns + max(int((due - now) * 1e9), 1)))
            self._in_flight.clear()
            self._deferred.clear()
            self._queue.persist(extra)
            for c in self._consumers:
                c.in_flight_count = 0

    def _dead_lettered(self, msgs: List[Message]) -> None:
        """The dead-letter topic has these: release their records."""
        with self._lock:
            for m in msgs:
                self._queue.done(m)

    def stats(self, include_clients: bool = True) -> Dict[str, Any]:
        """nsqd's channel object for /stats (plus minq's dead_count/drop_count)."""
        with self._lock:
            clients = [c.client_stats() for c in self._consumers] if include_clients else None
            return {
                "channel_name": self.name,
                "depth": len(self._queue),
                "backend_depth": self._queue.backlog,
                "in_flight_count": len(self._in_flight),
                "deferred_count": len(self._deferred),
                "message_count": self.message_count,
                "requeue_count": self.requeue_count,
                "timeout_count": self.timeout_count,
                "client_count": len(self._consumers),
                "clients": clients,
                "paused": self.paused,
                "e2e_processing_latency": {"count": 0, "percentiles": None},
                "dead_count": self.dead_count,
                "drop_count": self._queue.drop_count,
                "corrupt_count": self._queue.log.corrupt_count if self._queue.log else 0,
                "max_attempts": self.effective_max_attempts,
                "dispatch": self.dispatch,
            }


_ACTION_CODES = {"finish": "FIN", "requeue": "REQ", "touch": "TOUCH"}


def dead_letter_name(topic: str, channel: str) -> str:
    """Default dead-letter topic ``<topic>.<channel>.dead``, kept within 64 characters.

    ``#ephemeral`` suffixes are dropped (a dead letter should outlive its source);
    a name too long keeps its start and gets a short hash so it stays unique.
    """
    def strip(n: str) -> str:
        return n[:-len(EPHEMERAL_SUFFIX)] if is_ephemeral(n) else n
    base = f"{strip(topic)}.{strip(channel)}"
    name = f"{base}.dead"
    if len(name) <= MAX_NAME_LENGTH:
        return name
    digest = f"{zlib.crc32(base.encode()):08x}"
    return f"{base[:MAX_NAME_LENGTH - len('.dead') - 9]}-{digest}.dead"


# =============================================================================
# Topic
#
# Fans each message out to every channel (the first channel gets the original,
# the others copies).  While it has no channels, or is paused, it keeps the
# messages itself and hands them over later.
# =============================================================================

class Topic:
    """A named stream of messages; create through ``broker.topic(name)``."""

    # How many held messages move to the channels per batch on release.
    RELEASE_BATCH = 1024

    def __init__(self, broker: "Broker", name: str) -> None:
        self.broker = broker
        self.name = name
        self.ephemeral = is_ephemeral(name)
        # _lock guards the fields below.  Order: a topic's lock may be held
        # while taking its channels' locks (in the order of _channels), never
        # the reverse.
        self._lock = threading.Lock()
        self._channels: Dict[str, Channel] = {}
        # Messages waiting for a channel (or for unpause), and deferred ones
        # among them as (due wall-clock ns, message).
        self._queue = broker._new_queue(name, self.ephemeral, self._hold_deferred)
        self._held_deferred: List[Tuple[int, Message]] = []
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.message_bytes = 0

    def __repr__(self) -> str:
        return f"<Topic {self.name} channels={list(self._channels)}>"

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._held_deferred)

    @property
    def channels(self) -> Dict[str, Channel]:
        """A snapshot of the topic's channels by name."""
        with self._lock:
            return dict(self._channels)

    # -- publishing ------------------------------------------------------------
    def _put(self, msgs: List[Message], defer: float) -> Optional[List[Tuple[SegmentLog, int]]]:
        """Accept messages, all or none (OSError: none).

        Returns the (log, position) pairs written, for fsync mode; None if the
        topic was deleted meanwhile (the caller retries on a new topic).
        """
        deliveries: Deliveries = []
        with self._lock:
            if self.deleted:
                return None
            if self.paused or not self._channels:
                written = self._hold_locked(msgs, defer)
            else:
                written = self._fan_out_locked(msgs, defer, deliveries)
            self.message_count += len(msgs)
            self.message_bytes += (len(msgs[0].body) if len(msgs) == 1
                                   else sum(len(m.body) for m in msgs))
        if deliveries:
            _hand_over_all(deliveries)
        return written

    def _hold_locked(self, msgs: List[Message], defer: float) -> List[Tuple[SegmentLog, int]]:
        # Deferral of held messages counts from publish (nsqd starts it at hand-off).
        due_ns = self.broker._time_ns() + int(defer * 1e9) if defer > 0 else 0
        token = self._queue.prepare(msgs, due_ns)
        self._queue.commit(token)
        if due_ns:
            self._held_deferred.extend((due_ns, m) for m in msgs)
        return _written(self._queue, token)

    def _hold_deferred(self, msg: Message, due_ns: int) -> None:
        self._held_deferred.append((due_ns, msg))

    def _fan_out_locked(self, msgs: List[Message], defer: float,
                        out: Deliveries) -> List[Tuple[SegmentLog, int]]:
        """Give every channel its copy: stored everywhere first, then made visible.

        The channels' locks are taken in order and held until all stores
        succeeded, so a failure can undo the stores already made.
        """
        chans = list(self._channels.values())
        if len(chans) == 1:
            ch = chans[0]
            if ch._queue.log is None:
                ch._put_memory(msgs, defer, out)
                return []
            # Stored before taking the channel's lock, so its consumers are
            # not held up by the write; the topic's lock keeps publishers (and
            # channel deletion) out meanwhile.  OSError: nothing stored.
            token = ch._prepare_locked(msgs, defer)
            with ch._lock:
                ch._commit_locked(token, defer, out)
            return _written(ch._queue, token)
        batches = [msgs] + [[Message(m.id, m.body, m.timestamp) for m in msgs]
                            for _ in chans[1:]]
        if self.broker.data_path is None:       # memory only: nothing can fail
            for ch, batch in zip(chans, batches):
                ch._put_memory(batch, defer, out)
            return []
        tokens: List[Tuple[Any, ...]] = []
        try:
            for ch, batch in zip(chans, batches):
                ch._lock.acquire()
                try:
                    tokens.append(ch._prepare_locked(batch, defer))
                except BaseException:
                    ch._lock.release()
                    raise
        except BaseException:
            for ch, token in zip(chans, tokens):
                try:
                    ch._queue.abort(token)
                finally:
                    ch._lock.release()
            raise
        written: List[Tuple[SegmentLog, int]] = []
        for ch, token in zip(chans, tokens):
            try:
                ch._commit_locked(token, defer, out)
            finally:
                ch._lock.release()
            written += _written(ch._queue, token)
        return written

    def _release_held_locked(self, out: Deliveries) -> None:
        """Hand held messages to the channels (first channel, unpause, restart)."""
        if self.paused or not self._channels or self.broker._loading:
            return
        now_ns = self.broker._time_ns()
        q = self._queue
        while q.mem or q.on_disk:
            batch: List[Message] = []
            while len(batch) < self.RELEASE_BATCH:
                m = q.pop(now_ns)
                if m is None:
                    break
                batch.append(m)
            if not batch:
                break
            if not self._release_batch_locked(batch, 0.0, out):
                q.mem.extendleft(reversed(batch))
                return
        deferred, self._held_deferred = self._held_deferred, []
        for i, (due_ns, m) in enumerate(deferred):
            if not self._release_batch_locked([m], max(due_ns - now_ns, 0) / 1e9, out):
                self._held_deferred = deferred[i:]
                return

    def _release_batch_locked(self, batch: List[Message], defer: float,
                              out: Deliveries) -> bool:
        fresh = [Message(m.id, m.body, m.timestamp) for m in batch]
        try:
            self._fan_out_locked(fresh, defer, out)
        except OSError as e:
            log.error("topic %s: could not hand held messages to its channels: %s",
                      self.name, e)
            return False
        for m in batch:
            self._queue.done(m)
        return True

    # -- channels --------------------------------------------------------------
    def channel(self, name: str, **options: Any) -> Channel:
        """Get or create a channel (options as in ``Channel.configure``)."""
        ch = self._channels.get(name)
        if ch is None:
            validate_name(name, "channel")
            deliveries: Deliveries = []
            with self._lock:
                if self.deleted:
                    raise BrokerClosed(f"topic {self.name} was deleted")
                ch = self._channels.get(name)
                if ch is None:
                    ch = Channel(self, name, **options)
                    options = {}
                    self._channels[name] = ch
                    self._release_held_locked(deliveries)
                    created = True
                else:
                    created = False
            _hand_over_all(deliveries)
            if created and not ch.ephemeral:
                self.broker._metadata_changed()
        if options:
            ch.configure(**options)
        return ch

    def get_channel(self, name: str) -> Channel:
        """The existing channel *name*, else ChannelNotFound."""
        ch = self._channels.get(name)
        if ch is None:
            raise ChannelNotFound(f"channel {name!r} of topic {self.name!r} does not exist")
        return ch

    def delete_channel(self, name: str) -> None:
        """Delete a channel, its messages, and close its consumers."""
        with self._lock:
            ch = self._channels.pop(name, None)
            if ch is None:
                raise ChannelNotFound(f"channel {name!r} of topic {self.name!r} does not exist")
            last = self.ephemeral and not self._channels
        self._finish_channel(ch)
        if last:
            self.broker._delete_topic_if_unused(self)

    def _delete_channel_if_unused(self, ch: Channel) -> None:
        """Ephemeral channels vanish with their last consumer."""
        with self._lock:
            if self._channels.get(ch.name) is not ch or ch.client_count:
                return
            del self._channels[ch.name]
            last = self.ephemeral and not self._channels
        self._finish_channel(ch)
        if last:
            self.broker._delete_topic_if_unused(self)

    def _finish_channel(self, ch: Channel) -> None:
        for c in ch._close():
            c._on_channel_closed()
        if not ch.ephemeral:
            self.broker._metadata_changed()

    # -- admin -----------------------------------------------------------------
    def pause(self) -> None:
        """Keep messages at the topic; channels get nothing new until unpause."""
        with self._lock:
            self.paused = True
        self.broker._metadata_changed()

    def unpause(self) -> None:
        deliveries: Deliveries = []
        with self._lock:
            self.paused = False
            self._release_held_locked(deliveries)
        _hand_over_all(deliveries)
        self.broker._metadata_changed()

    def empty(self) -> None:
        """Drop the messages held at the topic itself (channels are untouched)."""
        with self._lock:
            self._held_deferred.clear()
            try:
                self._queue.clear()
            except OSError as e:
                log.error("topic %s: could not empty its log: %s", self.name, e)

    def delete(self) -> None:
        """Delete the topic, all its channels and their messages."""
        self.broker.delete_topic(self.name)

    def _close(self) -> List[Channel]:
        with self._lock:
            self.deleted = True
            chans = list(self._channels.values())
            self._channels.clear()
            self._queue.mem.clear()
            self._held_deferred.clear()
            self.broker._drop_log(self._queue.log)
        for ch in chans:
            for c in ch._close():
                c._on_channel_closed()
        return chans

    def _persist(self) -> None:
        """At a clean broker close: persist channels, then the topic's own queue."""
        for ch in self.channels.values():
            ch._persist()
        with self._lock:
            held, self._held_deferred = self._held_deferred, []
            self._queue.persist([(m, due) for due, m in held])

    def stats(self, channel: Optional[str] = None,
              include_clients: bool = True) -> Dict[str, Any]:
        """nsqd's topic object for /stats."""
        chans = self.channels
        if channel is not None:
            chans = {k: v for k, v in chans.items() if k == channel}
        with self._lock:
            top = {
                "topic_name": self.name,
                "channels": [],
                "depth": len(self._queue) + len(self._held_deferred),
                "backend_depth": self._queue.backlog,
                "message_count": self.message_count,
                "message_bytes": self.message_bytes,
                "paused": self.paused,
                "e2e_processing_latency": {"count": 0, "percentiles": None},
                "drop_count": self._queue.drop_count,
            }
        top["channels"] = [chans[k].stats(include_clients) for k in sorted(chans)]
        return top


def _written(q: _MessageQueue, token: Tuple[Any, ...]) -> List[Tuple[SegmentLog, int]]:
    """The (log, position) a prepared put must be fsynced to, if it wrote anything."""
    positions = token[1]
    return [(q.log, positions[-1] + 1)] if positions else []


def _hand_over_all(deliveries: Deliveries) -> None:
    for c, h in deliveries:
        try:
            c._deliver(h)
        except Exception:
            log.exception("consumer %s failed to take message %s", c.client_id, h.id.decode())


# =============================================================================
# Broker
#
# Topics by name, the options, message ids, the one timer thread that fires
# in-flight deadlines and deferrals, stats and an orderly close.
# =============================================================================

class Broker:
    """An in-process NSQ-style broker.  All methods are thread-safe.

    Options are nsqd's flags (durations in seconds): ``mem_queue_size``,
    ``msg_timeout``, ``max_msg_timeout``, ``max_msg_size``, ``max_body_size``,
    ``max_req_timeout``, ``max_rdy_count``, ``data_path``,
    ``max_bytes_per_file``, ``sync_every``, ``sync_timeout``; plus
    ``max_attempts`` (0 = unlimited; beyond it messages go to a dead-letter
    topic), ``durable`` (every message on disk before publish returns),
    ``fsync`` (and fsynced: group commit) and ``clock``.
    Without ``data_path`` everything is in memory only.
    """

    def __init__(self, *, mem_queue_size: int = DEFAULT_MEM_QUEUE_SIZE,
                 msg_timeout: float = DEFAULT_MSG_TIMEOUT,
                 max_msg_timeout: float = DEFAULT_MAX_MSG_TIMEOUT,
                 max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
                 max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                 max_req_timeout: float = DEFAULT_MAX_REQ_TIMEOUT,
                 max_rdy_count: int = DEFAULT_MAX_RDY_COUNT,
                 max_attempts: int = 0,
                 data_path: Optional[str] = None,
                 durable: bool = False,
                 fsync: bool = False,
                 max_bytes_per_file: int = DEFAULT_MAX_BYTES_PER_FILE,
                 sync_every: int = DEFAULT_SYNC_EVERY,
                 sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
                 clock: Any = None) -> None:
        _check_range("mem_queue_size", mem_queue_size, 0, None)
        _check_range("msg_timeout", msg_timeout, 0.001, None)
        _check_range("max_msg_timeout", max_msg_timeout, msg_timeout, None)
        _check_range("max_msg_size", max_msg_size, 1, None)
        _check_range("max_body_size", max_body_size, 1, None)
        _check_range("max_req_timeout", max_req_timeout, 0, None)
        _check_range("max_rdy_count", max_rdy_count, 1, None)
        _check_range("max_attempts", max_attempts, 0, 65535)
        _check_range("max_bytes_per_file", max_bytes_per_file, 1, None)
        _check_range("sync_every", sync_every, 1, None)
        _check_range("sync_timeout", sync_timeout, 0.001, None)
        if (durable or fsync) and not data_path:
            raise InvalidArgument("durable and fsync modes need a data_path")
        self.mem_queue_size = mem_queue_size
        self.msg_timeout = float(msg_timeout)
        self.max_msg_timeout = float(max_msg_timeout)
        self.max_msg_size = max_msg_size
        self.max_body_size = max_body_size
        self.max_req_timeout = float(max_req_timeout)
        self.max_rdy_count = max_rdy_count
        self.max_attempts = max_attempts
        self.data_path = os.path.abspath(data_path) if data_path else None
        self.fsync = bool(fsync)
        self.durable = bool(durable or fsync)
        self.max_bytes_per_file = max_bytes_per_file
        self.sync_every = sync_every
        self.sync_timeout = float(sync_timeout)
        self.clock = clock if clock is not None else SystemClock()
        self._time_ns = self.clock.time_ns
        self.start_time = int(time.time())
        # _lock guards _topics and _clients; it may be held while taking a
        # topic's lock, never the reverse.
        self._lock = threading.Lock()
        self._topics: Dict[str, Topic] = {}
        self._clients: List[Any] = []          # in-process consumers to close with us
        self._closed = False
        self._id_base = self.clock.time_ns()
        self._id_seq = itertools.count()
        self._health = "OK"
        # Storage (data_path only).  _logs_lock guards _logs; _meta_lock
        # serialises writes of the metadata file.  Both are leaf locks.
        self._logs_lock = threading.Lock()
        self._logs: Dict[str, SegmentLog] = {}
        self._meta_lock = threading.Lock()
        self._loading = False
        self._lock_fd: Optional[int] = None
        self._sync_wake = threading.Event()
        self._syncer: Optional[threading.Thread] = None
        if self.data_path:
            self._open_data_path()
        # _timer_cond guards _next_due.  Channels call _schedule while holding
        # their own lock (channel lock -> timer lock); the timer thread never
        # takes a channel lock while holding it.
        self._timer_cond = threading.Condition(threading.Lock())
        self._next_due = math.inf
        if hasattr(self.clock, "add_listener"):
            self.clock.add_listener(self._on_clock_advance)
        self._timer = threading.Thread(target=self._timer_loop, name="minq-timer")
        self._timer.start()
        if self.data_path:
            self._syncer = threading.Thread(target=self._sync_loop, name="minq-sync")
            self._syncer.start()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- topics ----------------------------------------------------------------
    def topic(self, name: str) -> Topic:
        """Get or create a topic."""
        t = self._topics.get(name)
        if t is not None:
            return t
        validate_name(name, "topic")
        with self._lock:
            self._check_open()
            t = self._topics.get(name)
            if t is None:
                t = self._topics[name] = Topic(self, name)
                created = True
            else:
                created = False
        if created and not t.ephemeral:
            self._metadata_changed()
        return t

    def get_topic(self, name: str) -> Topic:
        """The existing topic *name*, else TopicNotFound."""
        t = self._topics.get(name)
        if t is None:
            raise TopicNotFound(f"topic {name!r} does not exist")
        return t

    @property
    def topics(self) -> Dict[str, Topic]:
        """A snapshot of the topics by name."""
        with self._lock:
            return dict(self._topics)

    def delete_topic(self, name: str) -> None:
        """Delete a topic with all its channels and messages."""
        with self._lock:
            t = self._topics.pop(name, None)
        if t is None:
            raise TopicNotFound(f"topic {name!r} does not exist")
        t._close()
        if not t.ephemeral:
            self._metadata_changed()

    def _delete_topic_if_unused(self, t: Topic) -> None:
        with self._lock:
            if self._topics.get(t.name) is not t or t._channels:
                return
            del self._topics[t.name]
        t._close()

    # -- publishing ------------------------------------------------------------
    def _new_message(self, body: Any) -> Message:
        if not isinstance(body, bytes):
            if isinstance(body, str):
                body = body.encode()
            elif isinstance(body, (bytearray, memoryview)):
                body = bytes(body)
            else:
                raise InvalidMessage(f"message body must be bytes, not {type(body).__name__}")
        n = len(body)
        if n == 0 or n > self.max_msg_size:
            raise InvalidMessage(f"invalid message body size {n}: must be 1-"
                                 f"{self.max_msg_size} bytes" if n == 0 else
                                 f"message too big {n} > {self.max_msg_size}")
        return Message(self._next_id(), body, self.clock.time_ns())

    def _next_id(self) -> bytes:
        return b"%016x" % ((self._id_base + next(self._id_seq)) & _ID_MASK)

    def _check_defer(self, defer: float) -> float:
        if defer is None:
            return 0.0
        if not isinstance(defer, (int, float)) or not 0 <= defer <= self.max_req_timeout:
            raise InvalidArgument(f"defer {defer!r} out of range 0-{self.max_req_timeout:g} s")
        return float(defer)

    def publish(self, topic: str, body: bytes, defer: float = 0.0) -> Message:
        """Publish one message (nsqd's PUB, or DPUB with *defer* seconds).

        Creates the topic if needed.  Returns the stored message (its id and
        timestamp).  Raises InvalidName, InvalidMessage, InvalidArgument,
        PublishFailed or BrokerClosed; on any error nothing was accepted.
        """
        if defer:
            defer = self._check_defer(defer)
        if type(body) is bytes and 0 < len(body) <= self.max_msg_size:
            msg = Message(b"%016x" % ((self._id_base + next(self._id_seq)) & _ID_MASK),
                          body, self._time_ns())
        else:
            msg = self._new_message(body)
        self._put(topic, [msg], defer)
        return msg

    def publish_many(self, topic: str, bodies: Iterable[bytes],
                     defer: float = 0.0) -> List[Message]:
        """Publish several messages atomically: all are accepted or none (MPUB)."""
        defer = self._check_defer(defer)
        msgs = [self._new_message(b) for b in bodies]
        if not msgs:
            raise InvalidMessage("publish_many needs at least one message")
        total = sum(len(m.body) for m in msgs)
        if total > self.max_body_size:
            raise InvalidMessage(f"batch too big {total} > {self.max_body_size}")
        self._put(topic, msgs, defer)
        return msgs

    def _put(self, topic: str, msgs: List[Message], defer: float) -> None:
        for _ in range(3):  # a topic deleted under our feet is recreated
            if self._closed:
                raise BrokerClosed("the broker is closed")
            t = self._topics.get(topic) or self.topic(topic)
            try:
                written = t._put(msgs, defer)
                if written and self.fsync:
                    for seglog, pos in written:
                        seglog.sync_to(pos)
            except OSError as e:
                self._health = f"NOK - {e}"
                log.error("publish of %d message(s) to %s failed: %s", len(msgs), topic, e)
                raise PublishFailed(f"publish to topic {topic!r} failed: {e}") from e
            if written is not None:
                if self._health != "OK":
                    self._health = "OK"
                    log.warning("storage writes succeed again")
                return
        raise PublishFailed(f"topic {topic!r} kept being deleted during publish")

    # -- consuming -------------------------------------------------------------
    def consumer(self, topic: str, channel: str, max_in_flight: int = 1, *,
                 msg_timeout: Optional[float] = None, weight: int = 1) -> "PullConsumer":
        """A pull-style consumer of *topic*/*channel* (created if needed, as SUB)."""
        return PullConsumer(self, topic, channel, max_in_flight,
                            msg_timeout=msg_timeout, weight=weight)

    def subscribe(self, topic: str, channel: str, handler: Callable[[Message], Any],
                  max_in_flight: int = 32, workers: int = 4, *,
                  msg_timeout: Optional[float] = None, weight: int = 1,
                  backoff: float = 1.0, max_backoff: float = 60.0) -> "Subscription":
        """Run *handler* on every message of *topic*/*channel* in *workers* threads.

        A handler that returns finishes the message; one that raises requeues
        it after ``backoff * 2**(attempts-1)`` seconds (at most *max_backoff*).
        """
        return Subscription(self, topic, channel, handler, max_in_flight, workers,
                            msg_timeout=msg_timeout, weight=weight,
                            backoff=backoff, max_backoff=max_backoff)

    def _register_client(self, client: Any) -> None:
        with self._lock:
            self._check_open()
            self._clients.append(client)

    def _unregister_client(self, client: Any) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def _check_consumer_options(self, max_in_flight: int, msg_timeout: Optional[float],
                                weight: int) -> None:
        _check_range("max_in_flight", max_in_flight, 0, self.max_rdy_count)
        if msg_timeout is not None:
            _check_range("msg_timeout", msg_timeout, 0.001, self.max_msg_timeout)
        _check_range("weight", weight, 1, None)

    # -- dead letters ----------------------------------------------------------
    def _dead_letter(self, ch: Channel, msgs: List[Message]) -> None:
        name = ch.dead_letter_name
        for m in msgs:
            log.warning("message %s of %s/%s failed %d attempts: moved to topic %s",
                        m.id.decode(), ch.topic.name, ch.name, m.attempts, name)
        try:
            dl = [Message(self._next_id(), m.body, self.clock.time_ns()) for m in msgs]
            self._put(name, dl, 0.0)
        except MinqError:
            log.exception("could not dead-letter %d message(s) of %s/%s", len(msgs),
                          ch.topic.name, ch.name)
            return
        ch._dead_lettered(msgs)

    # -- timers ----------------------------------------------------------------
    def _schedule(self, due: float) -> None:
        """Make sure the timer thread wakes by *due* (monotonic seconds)."""
        if due < self._next_due:
            with self._timer_cond:
                if due < self._next_due:
                    self._next_due = due
                    self._timer_cond.notify()

    def _timer_loop(self) -> None:
        cond = self._timer_cond
        while True:
            with cond:
                while not self._closed:
                    wait = self._next_due - self.clock.monotonic()
                    if wait <= 0:
                        break
                    cond.wait(min(wait, _TIMER_IDLE_WAIT))
                if self._closed:
                    return
                self._next_due = math.inf
            try:
                self._process_due()
            except Exception:  # never let the timer die: deadlines would stop
                log.exception("timer pass failed")

    def _process_due(self) -> None:
        now = self.clock.monotonic()
        nxt = math.inf
        for t in list(self._topics.values()):
            for ch in list(t._channels.values()):
                nxt = min(nxt, ch._process_due(now))
        if nxt < math.inf:
            self._schedule(nxt)

    def _on_clock_advance(self) -> None:
        if not self._closed:
            self._process_due()

    # -- storage ---------------------------------------------------------------
    def _open_data_path(self) -> None:
        os.makedirs(self.data_path, exist_ok=True)
        lock_path = os.path.join(self.data_path, "minq.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataPathInUse(f"data path {self.data_path} is in use by another broker "
                                f"(lock {lock_path} is held)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        try:
            self._restore()
        except BaseException:
            self._release_data_path()
            raise

    def _restore(self) -> None:
        """Recreate topics and channels (and their pause flags) from minq.dat."""
        path = os.path.join(self.data_path, "minq.dat")
        if not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise MinqError(f"cannot read {path}: {e}") from e
        self._loading = True
        try:
            for td in meta.get("topics") or []:
                try:
                    t = self.topic(td["name"])
                    for cd in td.get("channels") or []:
                        t.channel(cd["name"]).paused = bool(cd.get("paused"))
                    t.paused = bool(td.get("paused"))
                except (MinqError, KeyError, TypeError) as e:
                    log.error("skipping a topic of %s: %s", path, e)
        finally:
            self._loading = False
        for t in list(self._topics.values()):
            deliveries: Deliveries = []
            with t._lock:
                t._release_held_locked(deliveries)
            _hand_over_all(deliveries)

    def _new_queue(self, name: str, ephemeral: bool,
                   on_deferred: Callable[[Message, int], None]) -> _MessageQueue:
        seglog = None
        if self.data_path and not ephemeral:
            seglog = SegmentLog(self.data_path, name, ack_mode=self.durable,
                                max_bytes_per_file=self.max_bytes_per_file,
                                max_record_size=max(self.max_msg_size, self.max_body_size) + 64)
            with self._logs_lock:
                self._logs[name] = seglog
        return _MessageQueue(seglog, self.mem_queue_size, self.durable, ephemeral,
                             on_deferred, self._log_written)

    def _log_written(self, seglog: SegmentLog) -> None:
        if seglog.ops >= self.sync_every and not seglog.sync_requested:
            seglog.sync_requested = True     # once per crossing, not per write
            self._sync_wake.set()

    def _drop_log(self, seglog: Optional[SegmentLog]) -> None:
        """A topic or channel was deleted: delete its files."""
        if seglog is None:
            return
        with self._logs_lock:
            if self._logs.get(seglog.name) is seglog:
                del self._logs[seglog.name]
        try:
            seglog.destroy()
        except OSError as e:
            log.error("could not delete the files of %s: %s", seglog.name, e)

    def _sync_loop(self) -> None:
        # nsqd's sync policy: every sync_timeout, or after sync_every operations.
        while not self._closed:
            self._sync_wake.wait(self.sync_timeout)
            self._sync_wake.clear()
            self._sync_logs()

    def _sync_logs(self) -> None:
        with self._logs_lock:
            logs = list(self._logs.values())
        for seglog in logs:
            if seglog.needs_sync:
                try:
                    seglog.sync()
                except (OSError, ValueError) as e:
                    log.error("sync of %s failed: %s", seglog.name, e)

    def _metadata_changed(self) -> None:
        """Save topics, channels and pause flags (like nsqd.dat), atomically."""
        if not self.data_path or self._loading or self._lock_fd is None:
            return
        topics = []
        for name, t in sorted(self.topics.items()):
            if t.ephemeral:
                continue
            chans = [{"name": cn, "paused": ch.paused}
                     for cn, ch in sorted(t.channels.items()) if not ch.ephemeral]
            topics.append({"name": name, "paused": t.paused, "channels": chans})
        data = json.dumps({"topics": topics, "version": NSQ_VERSION}).encode()
        with self._meta_lock:
            try:
                _write_atomic(os.path.join(self.data_path, "minq.dat"), data)
            except OSError as e:
                log.error("could not save minq.dat: %s", e)

    def _release_data_path(self) -> None:
        with self._logs_lock:
            logs, self._logs = list(self._logs.values()), {}
        for seglog in logs:
            try:
                seglog.close()
            except OSError as e:
                log.error("closing %s failed: %s", seglog.name, e)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def storage_stats(self) -> Dict[str, int]:
        """Totals over every segment log: bytes written, fsyncs, corrupt records."""
        with self._logs_lock:
            logs = list(self._logs.values())
        return {"bytes_written": sum(lg.bytes_written for lg in logs),
                "fsync_count": sum(lg.fsync_count for lg in logs),
                "corrupt_count": sum(lg.corrupt_count for lg in logs),
                "logs": len(logs)}

    # -- stats and life cycle --------------------------------------------------
    def stats(self, topic: Optional[str] = None, channel: Optional[str] = None,
              include_clients: bool = True) -> Dict[str, Any]:
        """A dict shaped like nsqd's ``/stats?format=json``."""
        topics = self.topics
        if topic is not None:
            topics = {k: v for k, v in topics.items() if k == topic}
        tstats = [topics[k].stats(channel, include_clients) for k in sorted(topics)]
        if channel is not None:
            tstats = [t for t in tstats if t["channels"]]
        return {
            "version": NSQ_VERSION,
            "health": self._health,
            "start_time": self.start_time,
            "topics": tstats if (topic is None or tstats) else None,
            "producers": None,
            "storage": self.storage_stats() if self.data_path else None,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosed("the broker is closed")

    def close(self) -> None:
        """Stop consumers and subscriptions, join the threads, persist to disk.

        With a data path, queued, in-flight and deferred messages are written
        to the logs (deferred ones keep their due time) and restored by the
        next Broker on the same folder.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients)
        for client in clients:
            client.close()
        with self._timer_cond:
            self._timer_cond.notify_all()
        self._timer.join()
        if self._syncer is not None:
            self._sync_wake.set()
            self._syncer.join()
        if hasattr(self.clock, "remove_listener"):
            self.clock.remove_listener(self._on_clock_advance)
        if self.data_path:
            for t in self.topics.values():
                t._persist()
            self._metadata_changed()
            self._release_data_path()


def _check_range(name: str, value: Any, low: Optional[float], high: Optional[float]) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or (low is not None and value < low) or (high is not None and value > high)):
        bounds = f"{low if low is not None else '-inf'}-{high if high is not None else 'inf'}"
        raise InvalidArgument(f"{name} {value!r} out of range {bounds}")


# =============================================================================
# In-process clients
#
# PullConsumer: ``get()`` messages at your own pace.  Subscription: a pool of
# worker threads runs a handler per message.  Both are core Consumers whose
# delivery callback only appends to a local buffer.
# =============================================================================

class PullConsumer(Consumer):
    """Pull-style consumer: ``get(timeout)`` returns a Message or None.

    Holds at most ``max_in_flight`` messages (delivered but not yet settled).
    Use as a context manager or call ``close()``: anything still in flight is
    requeued at once.  Iterating yields messages until the consumer closes.
    """

    def __init__(self, broker: Broker, topic: str, channel: str, max_in_flight: int = 1, *,
                 msg_timeout: Optional[float] = None, weight: int = 1) -> None:
        broker._check_consumer_options(max_in_flight, msg_timeout, weight)
        super().__init__(max_in_flight, msg_timeout, weight)
        self.broker = broker
        # Delivered messages not yet taken by get(); a C queue, so delivery
        # (on the publisher's thread) is cheap.  None is a wake-up sentinel.
        self._buffer: "queue.SimpleQueue[Optional[_Delivery]]" = queue.SimpleQueue()
        self._stopping = False   # set by Subscription.close: get() returns None
        broker._register_client(self)
        try:
            broker.topic(topic).channel(channel).add_consumer(self)
        except BaseException:
            broker._unregister_client(self)
            raise

    def _deliver(self, msg: _Delivery) -> None:
        self._buffer.put(msg)

    def _on_channel_closed(self) -> None:
        self.closed = True
        self._buffer.put(None)

    def get(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, waiting up to *timeout* seconds (None: forever).

        Returns None on timeout or once the consumer is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        buf = self._buffer
        while not (self.closed or self._stopping):
            try:
                if deadline is None:
                    h = buf.get()
                else:
                    h = buf.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            if h is None:          # woken to stop: pass the wake-up on
                buf.put(None)
                return None
            ch = self.channel
            # Skip messages that timed out while they sat in the buffer.
            if ch is not None and ch._in_flight.get(h.id) is h:
                return h
        return None

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.get()
            if msg is None:
                return
            yield msg

    def set_max_in_flight(self, n: int) -> None:
        """Change the RDY window (0 pauses delivery to this consumer)."""
        _check_range("max_in_flight", n, 0, self.broker.max_rdy_count)
        if self.channel is not None:
            self.channel.set_ready(self, n)

    def close(self) -> None:
        """Detach from the channel; messages still in flight are requeued."""
        ch = self.channel
        if ch is not None:
            ch.remove_consumer(self)
        self._on_channel_closed()
        self.broker._unregister_client(self)

    def __enter__(self) -> "PullConsumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Subscription(PullConsumer):
    """Push-style consumer: worker threads call ``handler(message)``.

    Returning finishes the message; raising logs the exception and requeues
    it with exponential backoff.  ``close()`` stops delivery, lets running
    handlers finish, joins the workers and requeues what was not handled.
    """

    def __init__(self, broker: Broker, topic: str, channel: str,
                 handler: Callable[[Message], Any], max_in_flight: int = 32,
                 workers: int = 4, *, msg_timeout: Optional[float] = None, weight: int = 1,
                 backoff: float = 1.0, max_backoff: float = 60.0) -> None:
        _check_range("workers", workers, 1, 1024)
        _check_range("backoff", backoff, 0, None)
        _check_range("max_backoff", max_backoff, 0, None)
        self.handler = handler
        self.backoff = backoff
        self.max_backoff = max_backoff
        super().__init__(broker, topic, channel, max_in_flight,
                         msg_timeout=msg_timeout, weight=weight)
        self._workers = [threading.Thread(target=self._work, name=f"minq-sub-{self.id}-{i}")
                         for i in range(workers)]
        for w in self._workers:
            w.start()

    def _work(self) -> None:
        while True:
            msg = self.get()
            if msg is None:  # closed or stopping
                return
            self._handle(msg)

    def _handle(self, msg: Message) -> None:
        try:
            self.handler(msg)
        except Exception:
            delay = min(self.backoff * 2 ** (msg.attempts - 1), self.max_backoff)
            log.exception("handler failed on message %s (attempt %d); requeue in %.3gs",
                          msg.id.decode(), msg.attempts, delay)
            self._settle_quietly(msg, "requeue", delay)
        else:
            self._settle_quietly(msg, "finish", 0.0)

    @staticmethod
    def _settle_quietly(msg: Message, action: str, delay: float) -> None:
        try:
            if action == "finish":
                msg.finish()
            else:
                msg.requeue(delay)
        except NotInFlight:
            pass  # the handler settled it itself, or it timed out meanwhile

    def close(self) -> None:
        """Stop delivering, let running handlers end, join workers, requeue the rest."""
        ch = self.channel
        if ch is not None:
            ch.set_ready(self, 0)
        self._stopping = True
        self._buffer.put(None)
        for w in self._workers:
            if w is not threading.current_thread():
                w.join()
        super().close()
