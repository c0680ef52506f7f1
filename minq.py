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

import argparse
import array
import asyncio
import binascii
import bisect
import collections
import concurrent.futures
import email.utils
import errno
import functools
import gc
try:
    import fcntl           # POSIX: the data folder's lock; a socket's unsent bytes
except ImportError:        # Windows: memory-only brokers and the servers still work
    fcntl = None  # type: ignore[assignment]
import hashlib
import heapq
import http.client
import itertools
import json
import logging
import math
import mmap
import os
import platform
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import types
import urllib.parse
import urllib.request
import zlib
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple, Union)

__all__ = [
    # errors
    "MinqError", "InvalidName", "InvalidMessage", "InvalidArgument", "NotInFlight",
    "PublishFailed", "TopicNotFound", "ChannelNotFound", "BrokerClosed", "DataPathInUse",
    "ProtocolError", "ConnectionLost",
    # core
    "Message", "SegmentLog", "Channel", "Topic", "Broker", "Consumer",
    "SystemClock", "FakeClock",
    # clients: in-process, and over TCP
    "PullConsumer", "Subscription", "Client", "RemoteConsumer", "RemoteSubscription",
    # clients for asyncio: in-process, and over TCP
    "AsyncBroker", "AsyncClient", "AsyncConsumer", "AsyncSubscription",
    "log_timing", "dedup", "keep_touching", "requeue_on", "HTTPForwarder", "message_key",
    "SnappyCompressor", "SnappyDecompressor", "SnappyError", "crc32c",
    # servers and the command line
    "TCPServer", "HTTPServer", "MemoryBudget", "Authorizer", "LookupdRegistrar",
    "StatsdPusher", "broadcast_address",
    "nsqd_stats", "prometheus_metrics", "parse_duration", "main",
    # constants
    "VERSION", "__version__", "NSQ_VERSION", "DISPATCH_POLICIES", "ACK_BUFFER",
]

log = logging.getLogger("minq")

# =============================================================================
# Errors and constants
#
# Defaults are nsqd's, named like its flags; durations in the Python API are
# seconds as floats.  One exception class per failure a caller may handle.
# =============================================================================

VERSION = "0.1.0"
__version__ = VERSION
NSQ_VERSION = "1.3.0"  # the nsqd version whose behaviour minq reproduces

DEFAULT_MEM_QUEUE_SIZE = 10_000
DEFAULT_MSG_TIMEOUT = 60.0
DEFAULT_E2E_WINDOW = 600.0         # nsqd's --e2e-processing-latency-window-time
DEFAULT_STATSD_PREFIX = "nsq.%s"   # %s: the host's broadcast address and HTTP port
DEFAULT_STATSD_INTERVAL = 60.0
DEFAULT_STATSD_PACKET_SIZE = 508
DEFAULT_MAX_MSG_TIMEOUT = 15 * 60.0
DEFAULT_MAX_MSG_SIZE = 1024 * 1024
DEFAULT_MAX_BODY_SIZE = 5 * 1024 * 1024
DEFAULT_BODY_MEMORY_FACTOR = 8      # request bodies held at once: 8 x max_body_size
DEFAULT_MAX_REQ_TIMEOUT = 60 * 60.0
DEFAULT_MAX_RDY_COUNT = 2500
TCP_PORT, HTTP_PORT, HTTPS_PORT = 4150, 4151, 4152   # nsqd's
LOOKUPD_TCP_PORT = 4160                                 # nsqlookupd's
DEFAULT_TCP_ADDRESS = f"127.0.0.1:{TCP_PORT}"   # nsqd binds 0.0.0.0; minq stays on loopback
DEFAULT_HTTP_ADDRESS = f"127.0.0.1:{HTTP_PORT}"
DEFAULT_HTTPS_ADDRESS = f"127.0.0.1:{HTTPS_PORT}"  # served only when a TLS certificate is given
DEFAULT_HTTP_HEADER_TIMEOUT = 10.0        # request line and headers (and a TLS handshake)
DEFAULT_HTTP_READ_TIMEOUT = 60.0          # a request's body; a response's writing
DEFAULT_HTTP_IDLE_TIMEOUT = 120.0         # a keep-alive connection between requests
DEFAULT_SHUTDOWN_TIMEOUT = 5.0            # grace for requests in progress at a stop
DEFAULT_DATA_PATH = "minq-data"
DEFAULT_HEARTBEAT_INTERVAL = 30.0         # nsqd: ClientTimeout / 2
DEFAULT_MAX_HEARTBEAT_INTERVAL = 60.0
DEFAULT_OUTPUT_BUFFER_SIZE = 16 * 1024
DEFAULT_MAX_OUTPUT_BUFFER_SIZE = 64 * 1024
DEFAULT_OUTPUT_BUFFER_TIMEOUT = 0.25
DEFAULT_MIN_OUTPUT_BUFFER_TIMEOUT = 0.025
DEFAULT_MAX_OUTPUT_BUFFER_TIMEOUT = 30.0
DEFAULT_MAX_DEFLATE_LEVEL = 6
MAX_LINE_LENGTH = 16 * 1024               # nsqd's read buffer: longer lines close the connection
MAGIC_V2 = b"  V2"
FRAME_TYPE_RESPONSE, FRAME_TYPE_ERROR, FRAME_TYPE_MESSAGE = 0, 1, 2

EPHEMERAL_SUFFIX = "#ephemeral"
MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[.a-zA-Z0-9_-]+(#ephemeral)?")
DISPATCH_POLICIES = ("round_robin", "weighted", "hash", "random")

# End-to-end latency (publish to FIN) is counted per channel in these buckets
# (upper bounds, seconds), for /metrics' histograms.
E2E_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)
_E2E_BOUNDS_NS = tuple(int(b * 1e9) for b in E2E_LATENCY_BUCKETS)

# How long the timer thread may sleep when nothing is due; it is woken early
# whenever a sooner deadline is scheduled, so this only bounds idle wake-ups.
_TIMER_IDLE_WAIT = 1.0
_DEADLINE_GRAIN = 0.01   # in-flight deadlines fire at most this late (seconds)
_PUMP_RETRY = 1.0      # seconds before a topic's pump tries again after a write error
_READ_RETRY = 1.0      # seconds before a channel reads its log again after a read error
_PUT_RETRIES = 3       # a publish racing deletes of its topic tries this often
_random = random.Random()   # the random dispatch policy's draws (tests may seed it)
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


class _NotFound(MinqError, KeyError):
    # A KeyError (``except KeyError`` keeps working) that prints as its text,
    # not as a quoted key.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TopicNotFound(_NotFound):
    """An admin operation named a topic that does not exist (TOPIC_NOT_FOUND)."""


class ChannelNotFound(_NotFound):
    """An admin operation named a channel that does not exist (CHANNEL_NOT_FOUND)."""


class BrokerClosed(MinqError):
    """The broker (or the consumer) has been closed."""


class DataPathInUse(MinqError):
    """Another broker holds the lock of this data path."""


class ProtocolError(MinqError):
    """An NSQ server answered with an error frame, or broke the protocol.

    ``code`` is nsqd's error code (``E_INVALID``, ``E_BAD_BODY``, ...), or
    ``E_PROTOCOL`` for a malformed reply.
    """

    def __init__(self, code: str, text: str = "") -> None:
        super().__init__(f"{code} {text}".strip())
        self.code = code
        self.text = text


class ConnectionLost(MinqError, ConnectionError):
    """A client's connection to the server closed, or could not be opened."""


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


def _wait_get(q: "queue.SimpleQueue[Any]", deadline: Optional[float]) -> Any:
    """``q.get()`` waiting until the monotonic *deadline* (None: for ever);
    queue.Empty after it.  A wait of (almost) nothing is a non-blocking get:
    Python 3.9's SimpleQueue, asked for a timed wait that is over by the
    time it looks again (an item taken meanwhile), waits for ever."""
    if deadline is None:
        return q.get()
    left = deadline - time.monotonic()
    return q.get(timeout=left) if left > 0.001 else q.get_nowait()


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
_LEN = struct.Struct(">l")              # a length or count on the wire (big-endian int32)
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
    """A message the broker owns: queued (``consumer`` None) or in flight.

    In flight it is the handle its consumer holds.  Dispatch binds a queued
    one in place (nobody else holds it); a message that leaves flight goes
    back to the queue as a fresh object, so a stale handle can never settle
    a later delivery of the same message.  A plain ``Message`` (one that
    ``Broker.publish`` returned to its caller) is copied instead.
    """

    # _bucket: in flight, the channel's deadline bucket that holds it.
    # _finished: its consumer finished it; the channel settles that soon.
    __slots__ = ("consumer", "deadline", "delivered_at", "_bucket", "_finished")

    def __init__(self, id: bytes, body: bytes, timestamp: int, attempts: int = 0) -> None:
        self.id = id
        self.body = body
        self.timestamp = timestamp
        self.attempts = attempts
        self._pos = None
        self.consumer: Optional["Consumer"] = None
        self._finished = False

    def finish(self) -> None:
        c = self.consumer
        if c is None or c.channel is None:
            Message.finish(self)
        c.channel._finish(self)  # type: ignore[union-attr]

    def requeue(self, delay: float = 0.0) -> None:
        c = self.consumer
        if c is None or c.channel is None:
            Message.requeue(self)
        c.channel._requeue(self, delay)  # type: ignore[union-attr]

    def touch(self) -> None:
        c = self.consumer
        if c is None or c.channel is None:
            Message.touch(self)
        c.channel._touch(self)  # type: ignore[union-attr]


class _BodyRun:
    """Bodies of one size in a row inside a larger bytes (an MPUB's payload,
    every length already checked), sliced only when they are used: a batch
    that waits in memory costs no object per message."""

    __slots__ = ("data", "first", "size", "step", "count")

    def __init__(self, data: bytes, first: int, size: int, step: int, count: int) -> None:
        self.data, self.first, self.size, self.step, self.count = data, first, size, step, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunk(0, self.count))

    def chunk(self, a: int, b: int) -> List[bytes]:
        """Bodies *a* to *b* (exclusive) as bytes."""
        data, size, step = self.data, self.size, self.step
        start = self.first + a * step
        return [data[o:o + size] for o in range(start, start + (b - a) * step, step)]

    def sliced(self, a: int, b: int) -> "_BodyRun":
        return _BodyRun(self.data, self.first + a * self.step, self.size, self.step, b - a)

    @property
    def nbytes(self) -> int:
        return self.size * self.count


class _BodySpans:
    """Bodies of any size inside a larger bytes, found by their offsets (a
    text /mpub's lines): 8 bytes per message instead of a bytes object each."""

    __slots__ = ("data", "starts", "ends")

    def __init__(self, data: bytes, starts: "array.array[int]", ends: "array.array[int]") -> None:
        self.data, self.starts, self.ends = data, starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunk(0, len(self.starts)))

    def chunk(self, a: int, b: int) -> List[bytes]:
        data = self.data
        return [data[s:e] for s, e in zip(self.starts[a:b], self.ends[a:b])]

    def sliced(self, a: int, b: int) -> "_BodySpans":
        return _BodySpans(self.data, self.starts[a:b], self.ends[a:b])

    @property
    def nbytes(self) -> int:
        return sum(self.ends) - sum(self.starts)


_PACKED_BODIES = (_BodyRun, _BodySpans)
Bodies = Any     # a List[bytes], a _BodyRun or a _BodySpans


def _nbytes(bodies: Bodies) -> int:
    return bodies.nbytes if bodies.__class__ in _PACKED_BODIES else sum(map(len, bodies))


def _body_chunk(bodies: Bodies, a: int, b: int) -> List[bytes]:
    return bodies.chunk(a, b) if bodies.__class__ in _PACKED_BODIES else bodies[a:b]


def _body_slice(bodies: Bodies, a: int, b: int) -> Bodies:
    return bodies.sliced(a, b) if bodies.__class__ in _PACKED_BODIES else bodies[a:b]


def _offsets(data: bytes) -> "array.array[int]":
    return array.array("I" if len(data) < 1 << 32 else "q")


class _BadMPUB(MinqError):
    """A binary MPUB payload that does not parse: *code* is nsqd's (without
    the ``E_`` its TCP form has: ``BAD_BODY`` or ``BAD_MESSAGE``)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


def _split_mpub(payload: bytes, max_size: int, max_body_size: int) -> Bodies:
    """nsqd's binary MPUB body ``[count][(size, bytes) x count]`` -> bodies,
    each size checked before it is used (TCP ``MPUB`` and HTTP ``/mpub?binary``).

    Bodies of one size (the usual batch) are checked a column at a time and
    become a _BodyRun; others a _BodySpans.  Raises _BadMPUB.
    """
    if len(payload) < 4:
        raise _BadMPUB("BAD_BODY", "MPUB failed to read message count")
    count = _LEN.unpack_from(payload)[0]
    if not 0 < count <= (max_body_size - 4) // 5:     # 5: the smallest message
        raise _BadMPUB("BAD_BODY", f"MPUB invalid message count {count}")
    if len(payload) >= 8:
        size = _LEN.unpack_from(payload, 4)[0]
        step = size + 4
        if (0 < size <= max_size and len(payload) == 4 + count * step
                and _same_length_run(payload, 4, step, count) == count):
            return _BodyRun(payload, 8, size, step, count)
    starts, ends = _offsets(payload), _offsets(payload)
    unpack, pos, total = _LEN.unpack_from, 4, len(payload)
    for i in range(count):
        if pos + 4 > total:
            raise _BadMPUB("BAD_MESSAGE", f"MPUB failed to read message({i}) body size")
        size = unpack(payload, pos)[0]
        pos += 4
        if size <= 0:
            raise _BadMPUB("BAD_MESSAGE", f"MPUB invalid message({i}) body size {size}")
        if size > max_size:
            raise _BadMPUB("BAD_MESSAGE", f"MPUB message too big {size} > {max_size}")
        if pos + size > total:
            raise _BadMPUB("BAD_MESSAGE", "MPUB failed to read message body")
        starts.append(pos)
        pos += size
        ends.append(pos)
    return _BodySpans(payload, starts, ends)


def _split_lines(body: bytes, max_size: int) -> Bodies:
    """nsqd's text ``/mpub``: a message per line, empty lines skipped.

    Raises InvalidMessage for a line over *max_size*.  A big body is cut
    without a bytes object per line: lines of one size become a _BodyRun,
    others a _BodySpans, so its cost in memory stays a small multiple of
    the body's own size.
    """
    if len(body) < 4096:
        lines = [line for line in body.split(b"\n") if line]
        if lines and max(map(len, lines)) > max_size:
            raise InvalidMessage(f"message too big {max(map(len, lines))} > {max_size}")
        return lines
    size = body.find(b"\n")
    step = size + 1
    count = (len(body) + 1) // step if size > 0 else 0
    if 0 < size <= max_size and len(body) in (count * step, count * step - 1):
        newlines = body[size::step]
        if newlines.count(b"\n") == len(newlines) == body.count(b"\n"):
            return _BodyRun(body, 0, size, step, count)
    starts, ends = _offsets(body), _offsets(body)
    add_start, add_end = starts.append, ends.append
    pos, total = 0, len(body)
    while pos < total:
        cut = body.find(b"\n", pos + 65536)
        cut = total if cut < 0 else cut + 1
        for n in map(len, body[pos:cut].split(b"\n")):
            if n:
                if n > max_size:
                    raise InvalidMessage(f"message too big {n} > {max_size}")
                add_start(pos)
                add_end(pos + n)
            pos += n + 1
        pos = cut
    return _BodySpans(body, starts, ends)


class _Batch:
    """Messages published together that only the broker will hold: bodies, one
    timestamp, and ids numbered from *first*.  A batch bound for a log goes
    there as records; one kept in memory stays a single entry of the queue,
    and its ids and message objects are made when it is taken."""

    __slots__ = ("first", "bodies", "timestamp", "_ids")

    def __init__(self, first: int, bodies: List[bytes], timestamp: int) -> None:
        self.first = first
        self.bodies = bodies
        self.timestamp = timestamp
        self._ids: Optional[List[bytes]] = None

    def __len__(self) -> int:
        return len(self.bodies)

    @property
    def ids(self) -> List[bytes]:
        if self._ids is None:
            self._ids = _format_ids(self.first, len(self.bodies))
        return self._ids

    def split(self, k: int) -> Tuple["_Batch", "_Batch"]:
        """The first *k* messages and the others, as two batches."""
        n, ids = len(self.bodies), self._ids
        head = _Batch(self.first, _body_slice(self.bodies, 0, k), self.timestamp)
        rest = _Batch((self.first + k) & _ID_MASK, _body_slice(self.bodies, k, n),
                      self.timestamp)
        if ids is not None:
            head._ids, rest._ids = ids[:k], ids[k:]
        return head, rest

    def messages(self) -> List[Message]:
        """Fresh message objects (each call makes its own)."""
        ts = self.timestamp
        return [_Delivery(i, b, ts) for i, b in zip(self.ids, self.bodies)]


def _format_ids(first: int, n: int) -> List[bytes]:
    """Message ids *first* ... *first* + n - 1 as 16 hex digits, formatted in one call."""
    numbers = range(first, first + n) if first + n <= _ID_MASK else [
        (first + i) & _ID_MASK for i in range(n)]
    blob = binascii.hexlify(struct.pack(f">{n}Q", *numbers))
    return [blob[i:i + 16] for i in range(0, 16 * n, 16)]


Messages = Any       # a List[Message] or a _Batch


def _objects(msgs: Messages) -> List[Message]:
    return msgs.messages() if msgs.__class__ is _Batch else msgs


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
# A length field with this bit set frames a supersede marker: its payload
# names (as _ACK positions, _NO_POS for none) the records that the records
# right after it replace (see SegmentLog.supersede).  Readers pass it over.
_SUPERSEDES = 0x80000000
_MAX_RECORD = _SUPERSEDES - 1         # the largest payload a record may carry
_NO_POS = (1 << 64) - 1
_SEG_SHIFT = 40                      # position = segment number << 40 | offset
_SEG_MASK = (1 << _SEG_SHIFT) - 1
_READ_AHEAD = 256 * 1024
ACK_BUFFER = 64          # durable mode: finishes written per batch (lost at most on a crash)
_ACKS_SLACK = 65536      # acks file entries beyond twice the live ones before it is compacted
_UNPIN_ACKS = 65536      # acks held behind the oldest unacknowledged record before it moves
# Records are copied into a window of the segment mapped in memory, its space
# reserved first with posix_fallocate (so a full disk is an OSError there, not
# a SIGBUS later).  A copy releases no GIL, where a pwrite per record would
# hand the GIL to a waiting consumer thread for every message.  Linux only:
# there fsync also covers what was written through the mapping.
_MAP_OK = sys.platform.startswith("linux") and hasattr(os, "posix_fallocate")
# Bigger writes go through pwrite all the same: there one kernel copy beats
# a page fault per 4 KiB page (measured: 1.6x the bytes per second at 64 KiB).
_MAP_MAX_WRITE = 8192
# The first bytes of a segment go through pwrite too: a log that stores little
# (one of 10,000 quiet topics) never reserves and maps a window, whose space
# costs a file system's block allocation and, at close, freeing (measured:
# 0.3 ms a log).
_MAP_FROM = 64 * 1024


def _fsync_file(path: str) -> None:
    """fsync a file or a directory (its entries) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes, fsync: bool = True) -> None:
    """Replace *path* with *data*: temp file, fsync, rename, fsync the
    directory (without *fsync* the caller syncs the file system after,
    once for many files)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        _fsync_file(os.path.dirname(path) or ".")


_BULK_RUN = 16    # records of one length in a row checked as a run (see _take_run_locked)


def _same_length_run(buf: bytes, i: int, step: int, k: int) -> int:
    """How many of the *k* records of *step* bytes from *i* carry the same
    length field as the first: compared a byte column at a time."""
    for b in range(_REC_SIZE // 2):
        column = buf[i + b:i + k * step:step]
        k = min(k, len(column) - len(column.lstrip(buf[i + b:i + b + 1])))
    return k


def _crcs_match(computed: bytes, buf: bytes, at: int, step: int, k: int) -> int:
    """How many of *k* records, whose CRC fields lie every *step* bytes from
    *at*, carry the CRCs in *computed* (big-endian, 4 bytes each) in a row."""
    good = k
    for b in range(4):
        mine, theirs = computed[b::4], buf[at + b:at + k * step:step]
        if mine != theirs:
            good = min(good, next(n for n in range(k) if mine[n] != theirs[n]))
    return good


def _take_records(buf: bytes, i: int, end: int, limit: int, biggest: int, skip: set,
                  payloads: List[bytes], found: Optional[List[int]], base: int) -> int:
    """Append to *payloads* the payloads of up to *limit* whole, valid records
    in a row in ``buf[i:end]`` (and to *found* their positions: *base* +
    index) until one needs a closer look (a bad length or CRC, one in
    *skip*); return the index after the last one taken.

    Records of one length in a row (a backlog of similar messages) are taken
    a run at a time: lengths and CRCs compared in bulk, so the per-record
    work is one slice and one crc32.
    """
    unpack, crc32 = _REC.unpack_from, zlib.crc32
    while limit > 0 and i + _REC_SIZE <= end:
        size, crc = unpack(buf, i)
        step = _REC_SIZE + size
        if size == 0 or size > biggest or i + step > end:
            break
        k = min((end - i) // step, limit)
        if k >= _BULK_RUN and not skip:
            k = _same_length_run(buf, i, step, k)
        if k >= _BULK_RUN and not skip:
            stop = i + k * step
            run = [buf[o:o + size] for o in range(i + _REC_SIZE, stop, step)]
            good = _crcs_match(struct.pack(f">{k}I", *map(crc32, run)), buf, i + 4, step, k)
            if good < k:
                del run[good:]          # the bad one takes a closer look
            payloads += run
            if found is not None:
                found += range(base + i, base + i + good * step, step)
            i += good * step
            limit -= good
            if good < k:
                break
            continue
        payload = buf[i + _REC_SIZE:i + step]
        if crc32(payload) != crc or skip and base + i in skip:
            break
        if found is not None:
            found.append(base + i)
        payloads.append(payload)
        limit -= 1
        i += step
    return i


def _span_records(buf: bytes, i: int, end: int, stop: int, biggest: int, skip: set,
                  positions: List[int], base: int) -> int:
    """Append to *positions* (*base* + index) the records in a row from
    ``buf[i:]`` whose lengths check out, ending by *stop* (the first one may
    reach on to *end*), until one is in *skip*; return the index after the
    last.  CRCs are not checked: the bytes are copied as they are."""
    unpack = _REC.unpack_from
    while i + _REC_SIZE <= end:
        size = unpack(buf, i)[0]
        step = _REC_SIZE + size
        j = i + step
        if size == 0 or size > biggest or j > end or (j > stop and positions):
            break
        k = (stop - i) // step
        if k >= _BULK_RUN and not skip:        # a run of one length: no loop
            k = _same_length_run(buf, i, step, k)
            if k >= _BULK_RUN:
                positions += range(base + i, base + i + k * step, step)
                i += k * step
                continue
        if skip and base + i in skip:
            break
        positions.append(base + i)
        i = j
    return i


class _GroupCommit:
    """fsync shared by concurrent callers (fsync mode's publishers).

    ``sync_to(pos)`` returns once everything before *pos* is on disk: one
    caller leads an fsync (``fsync()``, which returns the position it made
    durable) while the others queue; when it ends, the leader releases each
    follower it covered (a lock per follower, so none waits on a shared lock
    to wake) and goes on with those who came meanwhile; after a few rounds it
    hands the lead to the first of them.  An fsync's failure reaches every
    caller it covered.  ``_lock`` guards ``durable_pos``, ``_leading`` and
    ``_waiters``; it is never held across the fsync.  ``_turn`` is held
    across every fsync, the leader's and those of ``exclusive()`` (a full
    sync): one at a time, so none runs on a descriptor another has closed.
    """

    _LEAD = object()          # a follower's turn to lead the next fsync
    ROUNDS = 4                # fsyncs one leader makes before handing the lead on

    def __init__(self, fsync: Callable[[], int]) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._turn = threading.Lock()              # taken before _lock, never after
        self.durable_pos = 0                       # everything before it is fsynced
        self._leading = False
        self._waiters: List[List[Any]] = []        # [pos, lock, outcome]

    def exclusive(self) -> "threading.Lock":
        """``with group.exclusive():`` no group fsync runs meanwhile."""
        return self._turn

    def advance(self, pos: int) -> None:
        """Another fsync made everything before *pos* durable."""
        with self._lock:
            if self.durable_pos < pos:
                self.durable_pos = pos

    def sync_to(self, pos: int) -> None:
        """Return once every record before *pos* is fsynced (OSError if that failed)."""
        if self.durable_pos >= pos:
            return
        with self._lock:
            if self.durable_pos >= pos:
                return
            if self._leading:
                me: Optional[List[Any]] = [pos, threading.Lock(), None]
                me[1].acquire()      # type: ignore[index]
                self._waiters.append(me)   # type: ignore[arg-type]
            else:
                self._leading = True
                me = None
        if me is not None:
            me[1].acquire()              # until the leader says how it went
            outcome = me[2]
            if outcome is not self._LEAD:
                if isinstance(outcome, OSError):   # the fsync failed: each caller gets its own
                    raise OSError(outcome.errno, outcome.strerror)
                if outcome is not None:
                    raise OSError(errno.EIO, f"fsync failed: {outcome!r}")
                return
        self._lead()

    def _lead(self) -> None:
        # The leader goes on with those who came during its fsync, for a few
        # rounds, before it hands the lead on: getting the GIL back after an
        # fsync is the slow part with many publishers, so the fewer threads
        # need it between two fsyncs the better.
        rounds = self.ROUNDS
        with self._lock:
            batch, self._waiters = self._waiters, []
        while True:
            error: Optional[BaseException] = None
            target = -1
            try:
                with self._turn:
                    target = self._fsync()
            except BaseException as e:   # followers must never be left waiting
                error = e
            rounds -= 1
            with self._lock:
                if error is None and self.durable_pos < target:
                    self.durable_pos = target
                for w in batch:
                    w[2] = error
                    w[1].release()
                batch, self._waiters = self._waiters, []
                if not batch:
                    self._leading = False
                elif error is not None or rounds <= 0:
                    nxt = batch.pop(0)      # hand the lead on, with the rest
                    nxt[2] = self._LEAD
                    self._waiters = batch
                    nxt[1].release()
                    batch = []
            if error is not None:
                raise error
            if not batch:
                return


class _AckLedger:
    """Durable mode's acknowledgements for one log: which of the records
    handed out are finished, kept so that a restart hands out none of them
    again.

    A record is ``consumed`` (read, or written as already read) and later
    acknowledged (``ack``); ``commit_point(cursor)`` is the oldest record
    handed out and not yet acknowledged (or the cursor): the log may delete
    everything before it.  Acks reach ``<name>.acks`` in batches of
    ACK_BUFFER (a crash loses at most those, which only causes redelivery),
    and at a metadata save the file is compacted once it holds many more
    entries than are live.  ``_lock`` guards everything here; the log may
    call in while holding its own lock, never the other way round.
    """

    def __init__(self, directory: str, name: str) -> None:
        self.name = name
        self._path = os.path.join(directory, f"{name}.acks")
        self._lock = threading.Lock()
        self._unacked: List[int] = []      # heap of consumed positions not yet released
        self._acked: set = set()           # acknowledged, lazily removed from _unacked
        self._restart: set = set()         # acks read at open, kept until the commit point passes
        self._open = False                 # between load and close: acks are written
        self._buf: List[int] = []          # acks not yet written to the file
        self._pending: Optional[List[int]] = None   # acks written during a compaction
        self._count = 0                    # entries in the file
        self._compact = False              # compact at the next save (a write failed)
        # Many acks (unpin_at) wait behind the oldest unacknowledged record
        # (a message deferred or in flight for long): its owner should
        # rewrite it, and may raise unpin_at when that is not worth it yet.
        self.pinned = False
        self.unpin_at = _UNPIN_ACKS

    def load(self, cursor: int, meta_write: int, acks_base: int,
             segments: Iterable[int]) -> Tuple[set, int]:
        """Read the acks file (a torn last entry is ignored).  Returns the
        acks of records at or past *cursor* (to be passed over unread) and
        how many acks the metadata's depth does not know: those after *acks_base*, of records it counted (before
        *meta_write*) or a scan counted (in *segments*, still on disk); a
        segment written and consumed after the save was deleted uncounted,
        and so are its acks."""
        listed: List[int] = []
        if os.path.exists(self._path):
            with open(self._path, "rb") as f:
                data = f.read()
            n = len(data) // _ACK.size
            listed = [p for (p,) in _ACK.iter_unpack(data[:n * _ACK.size])]
        here = set(segments)
        since = sum(1 for p in listed[acks_base:] if p < meta_write or p >> _SEG_SHIFT in here)
        with self._lock:
            self._count = len(listed)
            self._restart = {p for p in listed if p >= cursor}
            self._open = True
            return set(self._restart), since

    def restore(self, positions: Iterable[int], cursor: int) -> set:
        """At open, after ``load``: acks found outside the file (records that
        supersede markers release), kept as restart acks and written at the
        next flush.  Returns those at or past *cursor* that the file lacked."""
        with self._lock:
            new = {p for p in positions if p >= cursor} - self._restart
            self._restart |= new
            self._buf.extend(sorted(new))
            return new

    def consumed(self, positions: Iterable[int]) -> None:
        """These records were handed out: each holds the commit point until acked."""
        with self._lock:
            push, heap = heapq.heappush, self._unacked
            for p in positions:
                push(heap, p)

    def withdraw(self, positions: set) -> None:
        """These records were never stored after all (an append undone)."""
        with self._lock:
            self._unacked = [p for p in self._unacked if p not in positions]
            heapq.heapify(self._unacked)

    def ack(self, positions: Union[List[int], Tuple[int, ...]], at_once: bool = False) -> bool:
        """Acknowledge consumed records; True when the acks were written to
        the file (a batch filled up, or *at_once*): the commit point may move."""
        with self._lock:
            self._acked.update(positions)
            self._buf.extend(positions)
            if len(self._buf) < ACK_BUFFER and not at_once:
                return False
            self._flush_locked()
            self.pinned = len(self._acked) >= self.unpin_at
            return True

    def commit_point(self, cursor: int) -> int:
        """The oldest consumed record not acknowledged, or *cursor* if older.

        Acked records past the cursor (deferred ones, rewritten ahead) stay
        until the cursor passes them: their acks must outlive a restart."""
        with self._lock:
            heap, acked = self._unacked, self._acked
            while heap and heap[0] in acked and heap[0] < cursor:
                acked.discard(heapq.heappop(heap))
            return min(heap[0], cursor) if heap else cursor

    @property
    def behind(self) -> int:
        """Acknowledged records kept (in memory, and their segments on disk)
        because an older one is not acknowledged yet."""
        return len(self._acked)

    @property
    def buffered(self) -> bool:
        """Whether acks wait to be written to the file."""
        return bool(self._buf)

    def flush(self) -> None:
        """Write buffered acks to the file (to the OS: a killed process keeps them)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        buf, self._buf = self._buf, []
        if not buf or not self._open:
            return
        if self._pending is not None:
            self._pending.extend(buf)
        try:
            # Opened for each batch, not kept open: thousands of logs would
            # hold as many descriptors for a write every ACK_BUFFER acks.
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, b"".join([_ACK.pack(p) for p in buf]))
            finally:
                os.close(fd)
            self._count += len(buf)
        except OSError as e:   # the records may be redelivered after a crash
            log.error("segment log %s: could not record %d ack(s) (%s)", self.name,
                      len(buf), e)
            self._compact = True   # a part may have been written: start afresh

    def checkpoint(self, commit: int) -> Tuple[int, int, Optional[str], Optional[List[int]]]:
        """For a metadata save with the commit point at *commit*: write what is
        buffered; return (records consumed and not acknowledged, the
        metadata's ``acks_base``, the file to fsync before the metadata is
        written, or the live acks ``compact`` is to write once it is)."""
        with self._lock:
            self._flush_locked()
            if self._restart:
                self._restart = {p for p in self._restart if p >= commit}
            outstanding = len(self._unacked) - len(self._acked)
            bound = 2 * (len(self._acked) + len(self._restart)) + _ACKS_SLACK
            if self._compact or self._count > bound:
                live = sorted(self._restart | {p for p in self._acked if p >= commit})
                self._pending = []
                return outstanding, len(live), None, live
            return outstanding, self._count, self._path if self._count else None, None

    def compact(self, live: List[int]) -> None:
        """Swap in a file holding *live* and the acks made since ``checkpoint``
        (the metadata naming it is saved first: a crash keeps the old file,
        which holds every ack).  On failure the old file stays and the next
        save tries again."""
        tmp = f"{self._path}.tmp"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.write(fd, b"".join(_ACK.pack(p) for p in live))
            os.fsync(fd)
            with self._lock:
                pending = self._pending or []
                if pending:
                    os.write(fd, b"".join(_ACK.pack(p) for p in pending))
                self._pending = None
                self._count = len(live) + len(pending)
                self._compact = False
                os.replace(tmp, self._path)
        except BaseException:
            with self._lock:
                self._pending = None
                self._compact = True
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        _fsync_file(os.path.dirname(self._path) or ".")

    def reset(self) -> None:
        """Every record is gone (the log was emptied)."""
        with self._lock:
            self._unacked.clear()
            self._acked.clear()
            self._restart.clear()

    def close(self) -> None:
        """Write no more acks (those still buffered are dropped)."""
        with self._lock:
            self._open = False

    def destroy(self) -> None:
        """Close and delete the file."""
        self.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class _SegmentWriter:
    """Writes bytes at offsets of the write segment, the file at ``path``.

    The file is opened at the first write, and created then if it is new
    (``exists`` False): a log with nothing to store holds no file and no
    descriptor.  ``close`` gives the descriptor back (``_OpenFiles`` bounds
    how many logs hold theirs); the next write opens it again.  A file it
    created has a directory entry to fsync (``dir_dirty``) before an fsync
    of its data can be called durable.

    Small writes are copies into a window of the file mapped in memory
    (``map``, holding the file's bytes [``start``, ``end``)), its space
    reserved first with posix_fallocate, so a full disk is an OSError there
    and not a SIGBUS later; bigger writes, and any when no window can be
    had, go through pwrite.  A write that fails leaves nothing of itself in
    the file.  While a window is reserved the file is longer than what was
    written: ``trim`` cuts it.  Not thread-safe: SegmentLog serialises its
    writers (its ``_append_lock``, and ``_writing`` for its lean path).
    """

    def __init__(self, path: str, name: str, exists: bool,
                 on_open: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.name = name                   # the log's, for messages
        self.exists = exists
        self.dir_dirty = False
        self._on_open = on_open
        self.fd: Optional[int] = None
        self.map: Optional[mmap.mmap] = None
        self.start = self.end = 0

    def open(self) -> int:
        """The file's descriptor, opened (the file created if new) if need be."""
        if self.fd is None:
            flags = os.O_RDWR | os.O_CREAT | (0 if self.exists else os.O_TRUNC)
            self.fd = os.open(self.path, flags, 0o600)
            if not self.exists:
                self.exists = self.dir_dirty = True
            self._on_open()
        return self.fd

    def fsync(self) -> None:
        """fsync what was written, through a descriptor of its own if the
        writer's was given back meanwhile (an fsync covers the file)."""
        if self.fd is not None:
            os.fsync(self.fd)
        elif self.exists:
            _fsync_file(self.path)

    def write(self, data: bytes, offset: int, window: int) -> None:
        """Write *data* at *offset*, through a window of *window* bytes (0: pwrite)."""
        end = offset + len(data)
        self.open()
        if len(data) <= _MAP_MAX_WRITE and offset >= _MAP_FROM:
            if self.map is None or offset < self.start or end > self.end:
                self._remap(offset, end, window)
            if self.map is not None:
                self.map[offset - self.start:end - self.start] = data
                return
        try:
            done = os.pwrite(self.fd, data, offset)
            while done < len(data):      # short writes are rare: finish them
                n = os.pwrite(self.fd, memoryview(data)[done:], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                done += n
        except OSError:
            try:
                self.truncate(offset)    # nothing half-written stays
            except OSError:
                pass
            raise

    def write_chunks(self, chunks: Iterable[bytes], offset: int, size: int,
                     window: int) -> None:
        """Write each chunk after the last, *size* bytes in all; on any failure
        nothing of them stays."""
        at = offset
        try:
            for chunk in chunks:
                self.write(chunk, at, window)
                at += len(chunk)
            if at != offset + size:
                raise ValueError(f"framed chunks of {at - offset} bytes, {size} announced")
        except BaseException:
            if at > offset:
                try:
                    self.truncate(offset)
                except OSError:
                    pass
            raise

    def _remap(self, offset: int, end: int, window: int) -> None:
        """Map a fresh window holding [offset, end), or leave none (use pwrite).

        When reserving its space fails (a full disk, a file size limit, a
        file system without fallocate) writes go through pwrite, which fails
        or not on its own, and a later write tries again.
        """
        self.unmap()
        if not _MAP_OK or window <= 0 or end - offset > window // 2:
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        if end > start + window:      # a window smaller than the alignment needs
            return
        try:
            os.posix_fallocate(self.fd, start, window)
            self.map = mmap.mmap(self.fd, window, offset=start)
        except (OSError, ValueError) as e:
            log.debug("segment log %s: no mapped window at %d (%s)", self.name, start, e)
            return
        self.start, self.end = start, start + window

    def unmap(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None

    def truncate(self, length: int) -> None:
        """Cut the file to *length* bytes (unmapped first: never under a mapping)."""
        self.unmap()
        os.ftruncate(self.open(), length)

    def trim(self, length: int) -> None:
        """Unmap, and cut the reserved space past *length* off the file."""
        self.unmap()
        if self.fd is not None and os.fstat(self.fd).st_size > length:
            os.ftruncate(self.fd, length)

    def close(self, length: int) -> None:
        """Trim (to *length*) and give the descriptor back; the next write
        opens the file again."""
        try:
            self.trim(length)
        finally:
            self.release()

    def release(self) -> None:
        """Unmap and close the file, as it is (what a crash leaves)."""
        self.unmap()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class _SegmentReader:
    """Reads segment files through one open descriptor and a read-ahead buffer.

    ``bytes_at(num, off, n, end)`` returns *n* bytes at *off* of segment *num*,
    or None past what the file holds (or if it is gone), reading ahead
    _READ_AHEAD bytes at a time but never past *end*: the write segment's
    records end there, and what follows is reserved space or not written
    yet.  ``buf`` holds the file's bytes from ``start``, for parsing in
    place (``at``).  Not thread-safe: SegmentLog uses it under its ``_lock``.
    """

    def __init__(self, seg_path: Callable[[int], str],
                 on_open: Callable[[], None] = lambda: None) -> None:
        self._seg_path = seg_path
        self._on_open = on_open            # a descriptor was opened
        self.fd: Optional[int] = None
        self.num = -1                      # the segment open, if any
        self.buf = b""
        self.start = 0

    def bytes_at(self, num: int, off: int, n: int, end: Optional[int] = None) -> Optional[bytes]:
        if self.num != num:
            self.close()
            try:
                self.fd = os.open(self._seg_path(num), os.O_RDONLY)
            except FileNotFoundError:
                return None
            self.num = num
            self._on_open()
        i = off - self.start
        if i < 0 or i + n > len(self.buf):
            ahead = max(n, _READ_AHEAD)
            if end is not None:
                ahead = max(min(ahead, end - off), n)
            self.buf = os.pread(self.fd, ahead, off)  # type: ignore[arg-type]
            self.start = off
            i = 0
        if i + n > len(self.buf):
            return None
        return self.buf[i:i + n]

    def at(self, num: int, off: int, end: Optional[int] = None) -> Tuple[int, int]:
        """(index of *off* of segment *num* in ``buf``, index where what may be
        parsed ends), or (-1, -1) if ``buf`` does not hold it."""
        i = off - self.start
        if num != self.num or i < 0:
            return -1, -1
        stop = len(self.buf)
        if end is not None:
            stop = min(stop, end - self.start)
        return i, stop

    def size(self) -> int:
        """The length of the segment open (0: none)."""
        return os.fstat(self.fd).st_size if self.fd is not None else 0

    def good_record(self, num: int, off: int, end: int, biggest: int) -> bool:
        """Whether a whole record whose length (at most *biggest*) and CRC
        check out starts at *off* of segment *num*, ending by *end*."""
        header = self.bytes_at(num, off, _REC_SIZE, end)
        if header is None:
            return False
        size, crc = _REC.unpack(header)
        size &= _MAX_RECORD
        if not 0 < size <= biggest or off + _REC_SIZE + size > end:
            return False
        payload = self.bytes_at(num, off + _REC_SIZE, size, end)
        return payload is not None and zlib.crc32(payload) == crc

    def next_record(self, off: int, end: int, biggest: int) -> Optional[int]:
        """The offset of the first record after *off* (before *end*) of the
        segment open whose length and CRC check out, or None: a damaged
        length hides where the next record starts.  Scanned a window at a
        time."""
        unpack, crc32, fd = _REC.unpack_from, zlib.crc32, self.fd
        window = 1 << 20
        at = off + 1
        while at + _REC_SIZE <= end and fd is not None:
            buf = os.pread(fd, min(window + _REC_SIZE + biggest, end - at), at)
            view = memoryview(buf)
            for i in range(min(window, len(buf) - _REC_SIZE + 1)):
                size, crc = unpack(buf, i)
                size &= _MAX_RECORD       # a supersede marker is a good record too
                if 0 < size <= biggest and i + _REC_SIZE + size <= len(buf) and \
                        crc32(view[i + _REC_SIZE:i + _REC_SIZE + size]) == crc:
                    return at + i
            at += window
        return None

    def drop_buffer(self) -> None:
        """Drop the read-ahead (the bytes it holds were cut off the file)."""
        self.buf, self.start = b"", 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.num = None, -1
        self.drop_buffer()


def _frame_records(payloads: List[bytes], chunks: Optional[List[bytes]] = None
                   ) -> Tuple[List[bytes], List[int]]:
    """*payloads* framed as records, after *chunks* (what comes first):
    (every piece to write, in order; each record's offset from the start)."""
    chunks = chunks or []
    rel: List[int] = []
    size = sum(map(len, chunks))
    pack, crc32 = _REC.pack, zlib.crc32
    for p in payloads:
        rel.append(size)
        chunks.append(pack(len(p), crc32(p)))
        chunks.append(p)
        size += _REC_SIZE + len(p)
    return chunks, rel


def _list_segments(directory: str) -> Dict[str, List[int]]:
    """Every log's segment numbers under *directory*, by log name: one listing."""
    out: Dict[str, List[int]] = {}
    for fn in os.listdir(directory):
        if fn.endswith(".seg") and len(fn) > 11 and fn[-11] == "." and fn[-10:-4].isdigit():
            out.setdefault(fn[:-11], []).append(int(fn[-10:-4]))
    return out


def _segment_numbers(directory: str, name: str) -> List[int]:
    """The numbers of log *name*'s segment files, in order."""
    return sorted(_list_segments(directory).get(name, ()))


class _Recovery:
    """What a log's files say when it opens: its metadata, then a scan of
    what was written since the last fsync before that was saved.

    The scan checks records the metadata counts that no fsync had covered
    (after a power loss they may read as zeros: a segment's space is
    reserved ahead, so its length proves nothing; a gap cuts the segment
    there, and then it is short), salvages and counts records written after
    the save (a crash), and collects the positions that supersede markers
    written since the fsync name, for the replacing records it finds whole
    (``replaced``).  Torn tails are cut off the files.
    """

    def __init__(self, directory: str, name: str, biggest: int,
                 segments: Optional[List[int]] = None) -> None:
        self.directory, self.name, self.biggest = directory, name, biggest
        path = os.path.join(directory, f"{name}.meta")
        meta: Dict[str, Any] = {}
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    meta = json.loads(f.read())
            except (OSError, ValueError) as e:
                log.error("segment log %s: unreadable metadata (%s); rescanning", name, e)
                meta = {}
        self.meta = meta
        self.segments = nums = (_segment_numbers(directory, name) if segments is None
                                else sorted(segments))
        self.read_pos = int(meta.get("read", 0))
        write_num, write_off = divmod(int(meta.get("write", 0)), 1 << _SEG_SHIFT)
        depth = int(meta.get("depth", 0))
        if not meta and nums:   # no metadata: everything on disk is unread
            self.read_pos = nums[0] << _SEG_SHIFT
            write_num, write_off = nums[0], 0
        meta_num, meta_off = write_num, write_off
        first = min(int(meta.get("synced", meta.get("write", 0))),
                    (write_num << _SEG_SHIFT) | write_off) if meta else write_num << _SEG_SHIFT
        short = False
        self.replaced: List[int] = []
        for num in nums:
            if num < first >> _SEG_SHIFT:
                continue
            start = first & _SEG_MASK if num == first >> _SEG_SHIFT else 0
            if num < meta_num:       # finished (fsynced when rolled): markers only
                self.replaced += self._scan(num, start, _SEG_MASK + 1, cut=False)[2]
                continue
            end, count, found = self._scan(num, start, meta_off if num == meta_num else 0)
            self.replaced += found
            if num == meta_num and end < meta_off:
                log.error("segment log %s: segment %d is shorter (%d) than its metadata "
                          "says (%d)", name, num, end, meta_off)
                short = True
            depth += count
            write_num, write_off = num, end
        if short:
            # Data the metadata counted did not survive (power loss): never
            # reuse those positions (old acks may name them); write anew.
            write_num, write_off = write_num + 1, 0
        self.depth, self.write_num, self.write_off = depth, write_num, write_off

    def _scan(self, num: int, start: int, count_from: int = 0,
              cut: bool = True) -> Tuple[int, int, List[int]]:
        """Check the records of segment *num* from *start* up to the first
        that is not whole and valid, and (*cut*) cut the segment there.
        Returns (where they end, how many lie at or past *count_from*, the
        positions replaced by the records of supersede markers among them:
        those of the replacing records that are there)."""
        path = os.path.join(self.directory, f"{self.name}.{num:06d}.seg")
        size = os.stat(path).st_size
        if size < start:
            log.error("segment log %s: segment %d is shorter (%d) than its metadata "
                      "says (%d)", self.name, num, size, start)
            return size, 0, []
        if size == start:              # nothing past it (a clean stop): not opened
            return start, 0, []
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
        count, off = 0, start
        replaced: List[int] = []
        olds: List[int] = []          # of the last marker, for the records still to come
        view = memoryview(data)
        while len(view) - (off - start) >= _REC_SIZE:
            i = off - start
            field, crc = _REC.unpack_from(view, i)
            size = field & _MAX_RECORD
            if size == 0 or size > self.biggest or i + _REC_SIZE + size > len(view):
                break
            payload = view[i + _REC_SIZE:i + _REC_SIZE + size]
            if zlib.crc32(payload) != crc:
                break
            if field & _SUPERSEDES:
                olds = [p for (p,) in _ACK.iter_unpack(payload[:size - size % _ACK.size])]
                olds.reverse()
            else:
                if olds:
                    old = olds.pop()
                    if old != _NO_POS:
                        replaced.append(old)
                count += off >= count_from
            off += _REC_SIZE + size
        rest = len(data) - (off - start)
        if rest and cut:
            if data.count(0, off - start) != rest:     # zeros are reserved space
                log.warning("segment log %s: cut %d bytes of torn tail from segment %d",
                            self.name, rest, num)
            with open(path, "r+b") as f:
                f.truncate(off)
        return off, count, replaced


class _OpenFiles:
    """Bounds how many segment logs hold open descriptors at once.

    A log registers (``opened``) when it opens its first descriptor and
    leaves (``closed``) when it gives them all back.  Past ``limit`` logs,
    the one that registers makes another give its descriptors back
    (``SegmentLog.release_files``), chosen by the clock algorithm: logs are
    visited oldest first, and one used since the last visit (its ``_used``
    flag, set without a lock on every read and write) gets a second chance.
    A log busy in a write, a read or an fsync is passed over: its locks are
    only tried, never waited for, so no lock order is imposed.  A log holds
    at most four descriptors (the write segment, its mapping, a read
    segment, a rolled segment until the next sync).  ``_lock`` guards
    ``_ring`` and is never held while a log is asked to close.
    """

    PER_LOG = 4

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.limit = max(1, max_files // self.PER_LOG)
        self._lock = threading.Lock()
        self._ring: "collections.OrderedDict[SegmentLog, None]" = collections.OrderedDict()
        self.released = 0                  # logs made to give their descriptors back

    def __len__(self) -> int:
        return len(self._ring)

    def opened(self, seglog: "SegmentLog") -> None:
        with self._lock:
            self._ring[seglog] = None
            over = len(self._ring) - self.limit
        if over > 0:
            self._evict(seglog, over)

    def closed(self, seglog: "SegmentLog") -> None:
        with self._lock:
            self._ring.pop(seglog, None)

    def _evict(self, keep: "SegmentLog", n: int) -> None:
        # Two rounds at most: the first may only clear _used flags.
        for _ in range(2 * len(self._ring)):
            with self._lock:
                if len(self._ring) <= self.limit or not self._ring:
                    return
                victim = next(iter(self._ring))
                self._ring.move_to_end(victim)
            if victim is keep:
                continue
            if victim._used:
                victim._used = False
                continue
            if victim.release_files():
                self.released += 1
                n -= 1
                if n <= 0:
                    return


class SegmentLog:
    """An append-only record log in ``<name>.NNNNNN.seg`` files under *directory*.

    ``append`` writes records to the OS at once (a killed process loses none);
    ``read_many`` hands out the next records; ``sync`` fsyncs and saves the
    metadata (``<name>.meta``) atomically; ``sync_to`` is a group commit
    (``_GroupCommit``): concurrent callers share one fsync.  In ack mode an
    ``_AckLedger`` (``acks``) keeps what was handed out until ``ack``.
    Opening costs O(segments) plus a scan of what was written after the last
    metadata sync.  A torn tail is cut off; a record whose CRC fails is
    skipped, its segment copied aside as ``.bad`` and the loss counted.
    Every method is thread-safe: ``_lock`` guards the state and is never
    held across an fsync or a big write; ``_append_lock`` serialises writers
    (and rolls), taken before ``_lock``, never after.  fsyncs of the write
    segment and metadata saves happen in turn (``_GroupCommit.exclusive``).

    Records are written by a ``_SegmentWriter``, through a mapped window of
    ``map_window`` bytes (0: plain pwrite) whose space is reserved beforehand,
    so the write segment is longer than its records until it is rolled or
    closed.
    """

    map_window = 256 * 1024

    def __init__(self, directory: str, name: str, *, ack_mode: bool = False,
                 max_bytes_per_file: int = DEFAULT_MAX_BYTES_PER_FILE,
                 max_record_size: int = 1 << 30,
                 clock: Callable[[], float] = time.monotonic, sync_every: int = 0,
                 on_sync_due: Optional[Callable[[], None]] = None,
                 segments: Optional[List[int]] = None,
                 files: Optional[_OpenFiles] = None) -> None:
        self.directory = directory
        self.name = name
        self.max_bytes_per_file = max_bytes_per_file
        if not 0 < max_record_size <= _MAX_RECORD:
            raise ValueError(f"max_record_size must be 1-{_MAX_RECORD}, not {max_record_size}")
        self.max_record_size = max_record_size
        self._clock = clock
        # _lock guards all state below and is held only briefly.
        # _append_lock serialises writers and is held across the write itself
        # (taken before _lock, never after).
        self._append_lock = threading.Lock()
        self._lock = threading.Lock()
        self._meta_path = os.path.join(directory, f"{name}.meta")
        self.acks = _AckLedger(directory, name) if ack_mode else None
        self.bytes_written = 0
        self.fsync_count = 0
        self.corrupt_count = 0
        self._depth_suspect = False      # damage was skipped: depth may count lost records
        # Past sync_every appends and reads since the last sync (0: never),
        # a write sets sync_requested and calls on_sync_due once.
        self.ops = 0
        self.sync_every = sync_every or math.inf
        self.sync_requested = False
        self._on_sync_due = on_sync_due
        self._retired: List[int] = []      # fds of rolled segments, closed at sync
        # The writer of the write segment (set by _open) is used under
        # _append_lock, and with _writing set (under _lock) when _lock is not
        # held too: append_record writes under _lock alone while it is clear.
        self._writer: _SegmentWriter
        self._writing = False
        # Descriptors are opened when first needed; _files (if any) bounds
        # how many logs hold theirs.  _held: registered there; _used: read
        # or written since _files last looked (set without a lock).
        self._files = files
        self._held = False
        self._used = True
        self._has_files = False            # a segment or the metadata exists
        self._reader = _SegmentReader(self._seg_path, self._opened_files)
        # Records at or past the cursor to pass over unread: consumed
        # elsewhere (appended as already read) or acked before a restart.
        self._skip: set = set()
        # Supersedes written and not yet covered by an fsync: (the position
        # after their records, the positions they replace).  Those are
        # acknowledged by the sync that covers it, before it saves metadata.
        self._superseding: List[Tuple[int, List[int]]] = []
        self._meta_stale = False           # a sync fsynced the data only
        self.meta_saved_at = 0.0           # clock() of the last metadata save
        self._commits = _GroupCommit(self._fsync_data)
        self._open(segments)

    # -- positions and files ---------------------------------------------------
    @property
    def ack_mode(self) -> bool:
        """Whether records are kept until acknowledged (durable mode)."""
        return self.acks is not None

    def _seg_path(self, num: int) -> str:
        return os.path.join(self.directory, f"{self.name}.{num:06d}.seg")

    @staticmethod
    def _pos(num: int, off: int) -> int:
        return (num << _SEG_SHIFT) | off

    # -- open and recovery -----------------------------------------------------
    def _open(self, segments: Optional[List[int]]) -> None:
        # *segments*: the numbers of the log's segment files, if the caller
        # listed the directory already (a broker lists it once for all logs).
        found = _Recovery(self.directory, self.name, self.max_record_size, segments)
        meta, nums, read_pos = found.meta, found.segments, found.read_pos
        write_num, write_off = found.write_num, found.write_off
        acked_since = 0
        if self.acks is not None:
            self._skip, acked_since = self.acks.load(
                read_pos, int(meta.get("write", 0)), int(meta.get("acks_base", 0)), nums)
            released = self.acks.restore(found.replaced, read_pos)
            self._skip |= released
            acked_since += len(released)
        self.depth = max(found.depth - acked_since, 0)   # unread, unacknowledged records
        if write_num not in nums:
            write_off = 0
        self._read_pos = read_pos
        self._commit = read_pos
        self._write_num, self._write_off = write_num, write_off
        self._writer = _SegmentWriter(self._seg_path(write_num), self.name, write_num in nums,
                                      self._opened_files)
        self._commits.advance(self.write_pos)
        # The metadata says all there is when it was saved after the last
        # write and fsync (a clean stop), and the scan found nothing more:
        # then opening touches no file.  Else what a killed process left is
        # made durable and the metadata saved anew.
        if not meta and not nums:
            return
        self._has_files = True
        settled = (meta and int(meta.get("synced", -1)) == int(meta.get("write", -2))
                   == self.write_pos and found.depth == int(meta.get("depth", -1))
                   and not acked_since and not found.replaced and read_pos == meta.get("read"))
        if not settled:
            if write_num in nums:
                self._writer.open()
                self._writer.trim(write_off)     # cut a torn tail
                self._writer.fsync()
            self._save_meta(self.write_pos)

    def _opened_files(self) -> None:
        # A descriptor was opened: be counted by _files (who may close others').
        self._used = self._has_files = True
        if not self._held and self._files is not None:
            self._held = True
            self._files.opened(self)

    def release_files(self) -> bool:
        """Give back every descriptor, unless the log is busy (a write, a
        read or an fsync under way): then False.  Used by ``_OpenFiles``;
        the next read or write opens what it needs again."""
        turn = self._commits.exclusive()
        if not turn.acquire(blocking=False):
            return False
        try:
            if not self._append_lock.acquire(blocking=False):
                return False
            try:
                if not self._lock.acquire(blocking=False):
                    return False
                try:
                    self._release_files_locked()
                finally:
                    self._lock.release()
            finally:
                self._append_lock.release()
        finally:
            turn.release()
        return True

    def _release_files_locked(self) -> None:
        # With the commit turn, _append_lock and _lock held (or at close).
        self._reader.close()
        retired, self._retired = self._retired, []
        try:
            self._writer.close(self._write_off)
        finally:
            for fd in retired:              # rolled segments: fsynced then
                os.close(fd)
            self._held = False
            if self._files is not None:
                self._files.closed(self)

    # -- writing ---------------------------------------------------------------
    @property
    def write_pos(self) -> int:
        return self._pos(self._write_num, self._write_off)

    @property
    def needs_sync(self) -> bool:
        """Whether anything happened since the last sync (writes, reads, acks),
        or the last sync left the metadata for later."""
        return bool(self.ops or self._meta_stale or self.acks is not None and self.acks.buffered)

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
        if not n:
            return []
        if n == 1:
            p = payloads[0]
            base, off, _ = self._append_framed(_REC.pack(len(p), zlib.crc32(p)) + p, 1,
                                               consume, None)
            return [base | off]
        chunks, rel = _frame_records(payloads)
        base, off, _ = self._append_framed(b"".join(chunks), n, consume, rel)
        return [base | (off + r) for r in rel]

    def append_record(self, payload: bytes, consume: bool = False) -> Tuple[int, int]:
        """Write one record; return its position and the one after it.  Raises
        OSError with nothing written.  ``append`` of one record (*consume*: as
        already read), made lean: a single publish's path (a copy into the
        mapped window)."""
        data = _REC.pack(len(payload), zlib.crc32(payload)) + payload
        n = len(data)
        lock = self._lock       # not _append_lock: _writing says a writer is at work
        lock.acquire()          # (not "with": a third of the cost of this call)
        try:
            off = self._write_off
            end = off + n
            w = self._writer
            m = w.map
            fits = (m is not None and not self._writing and w.start <= off and end <= w.end
                    and end <= self.max_bytes_per_file and n <= _MAP_MAX_WRITE)
            if fits:
                m[off - w.start:end - w.start] = data  # type: ignore[index]
                self.bytes_written += n
                self._write_off = end
                self._used = True
                base = self._write_num << _SEG_SHIFT
                if not consume:
                    self.depth += 1
                else:
                    if self._read_pos == base | off:
                        self._read_pos = base | end
                    else:
                        self._skip.add(base | off)
                    if self.acks is not None:
                        self.acks.consumed((base | off,))
                self.ops = ops = self.ops + 1
                if ops < self.sync_every or not self._sync_due_locked():
                    return base | off, base | end
        finally:
            lock.release()
        if not fits:                 # no window here, or a writer at work
            if consume:
                pos = self.append([payload], consume=True)[0]
                return pos, pos + n
            return self.append_framed(data, 1)
        self._on_sync_due()  # type: ignore[misc]
        return base | off, base | end

    def append_framed(self, data: Union[bytes, Iterable[bytes]], count: int,
                      size: Optional[int] = None) -> Tuple[int, int]:
        """Write *count* records already framed as stored (``peek_framed``'s bytes),
        unread; return the positions of the first and after the last.  Raises
        OSError with nothing written.

        *data* is one bytes, or, with *size*, chunks of *size* bytes in all,
        made as they are written (a huge batch is never whole in memory).
        """
        base, off, end = self._append_framed(data, count, False, None, size)
        return base | off, base | end

    def supersede(self, payloads: List[bytes], old: List[int], consume: bool) -> List[int]:
        """Ack mode: write *payloads* as records that replace those at *old*
        (one each, or _NO_POS), as ``append`` does; return their positions.

        One write holds a marker naming the old positions, then the new
        records, so whatever the moment of a crash a restart finds one live
        copy of each: the old records stay unacknowledged until an fsync
        covers the new ones (the next ``sync``, asked for at once); until
        then ``_open``, which scans from the last fsync, finds the marker and
        releases the old records of the new ones it finds whole.

        Many records go in several such writes (a marker is a record, within
        ``max_record_size``).  OSError if the first fails; if a later one
        fails, the positions of those written (the first ones) are returned.
        """
        if self.acks is None:
            raise ValueError("supersede needs ack mode")
        step = max(1, min(4096, self.max_record_size // _ACK.size))
        positions: List[int] = []
        for k in range(0, len(payloads), step):
            olds = old[k:k + step]
            marker = struct.pack(f">{len(olds)}Q", *olds)
            chunks, rel = _frame_records(payloads[k:k + step],
                                         [_REC.pack(len(marker) | _SUPERSEDES, zlib.crc32(marker)),
                                          marker])
            try:
                base, off, _ = self._append_framed(
                    b"".join(chunks), len(rel), consume, rel,
                    replaced=[p for p in olds if p != _NO_POS])
            except OSError as e:
                if not positions:
                    raise
                log.error("segment log %s: %d of %d replacing records written: %s",
                          self.name, len(positions), len(payloads), e)
                break
            positions += [base | (off + r) for r in rel]
        return positions

    @property
    def superseding(self) -> bool:
        """Whether a supersede waits for the fsync that releases its old records."""
        return bool(self._superseding)

    def _append_framed(self, data: Any, n: int, consume: bool, rel: Optional[List[int]],
                       size: Optional[int] = None,
                       replaced: Optional[List[int]] = None) -> Tuple[int, int, int]:
        # Returns (segment base, offset of the first record, offset after the last).
        chunks = None
        if size is None:
            size = len(data)
        else:
            chunks, data = data, None
        lock, append_lock = self._lock, self._append_lock
        append_lock.acquire()
        try:
            # A batch never spans segments (so it is written whole or not at
            # all); a batch bigger than a segment gets one of its own.
            if self._write_off > 0 and self._write_off + size > self.max_bytes_per_file:
                self._roll()
            lock.acquire()
            try:
                num, off = self._write_num, self._write_off
                base = num << _SEG_SHIFT
                at_end = self._read_pos == base | off
                end = off + size
                w = self._writer
                m = w.map
                if (m is not None and size <= _MAP_MAX_WRITE and chunks is None
                        and w.start <= off and end <= w.end):
                    m[off - w.start:end - w.start] = data   # a copy: no I/O
                else:
                    # Written with only _append_lock held: readers and acks go
                    # on.  Nothing past _write_off is read, so the records
                    # appear at once when it moves, below.
                    self._writing = True
                    lock.release()
                    try:
                        if chunks is None:
                            w.write(data, off, self.map_window)
                        else:
                            w.write_chunks(chunks, off, size, self.map_window)
                    finally:
                        lock.acquire()
                        self._writing = False
                self.bytes_written += size
                self._write_off = end
                self._used = True
                self.ops += n
                due = self.ops >= self.sync_every and self._sync_due_locked()
                if replaced is not None:    # visible to a sync with the records
                    self._superseding.append((base | end, replaced))
                    due = self._sync_due_locked() or due
                if not consume:
                    self.depth += n
                else:
                    if at_end:
                        self._read_pos = base | end
                    else:
                        self._skip.update([base | (off + r) for r in (rel or (0,))])
                    if self.acks is not None:
                        self.acks.consumed([base | (off + r) for r in (rel or (0,))])
            finally:
                lock.release()
        finally:
            append_lock.release()
        if due:
            self._on_sync_due()  # type: ignore[misc]
        return base, off, end

    def _sync_due_locked(self) -> bool:
        # sync_every was reached: whether to call on_sync_due (once per sync).
        if self.sync_requested or self._on_sync_due is None:
            return False
        self.sync_requested = True
        return True

    def unappend(self, positions: List[int], consume: bool = False) -> None:
        """Undo the last ``append`` (nothing may have been appended since)."""
        with self._append_lock, self._lock:
            first = self._cut_locked(positions[0], len(positions))
            if not consume:
                self.depth -= len(positions)
                return
            gone = set(positions)
            self._skip -= gone
            if self._read_pos > first:
                self._read_pos = first
            if self.acks is not None:
                self.acks.withdraw(gone)

    def unappend_framed(self, start: int, count: int) -> None:
        """Undo the last ``append_framed`` (nothing may have been appended since)."""
        with self._append_lock, self._lock:
            self._cut_locked(start, count)
            self.depth -= count

    def _cut_locked(self, first: int, count: int) -> int:
        num, off = first >> _SEG_SHIFT, first & _SEG_MASK
        if num != self._write_num:
            raise ValueError("unappend of a batch that is not the last one")
        self._writer.truncate(off)
        self._write_off = off
        self._reader.drop_buffer()          # it may hold the bytes just cut off
        self.ops -= count
        return first

    def _roll(self) -> None:
        # Called with _append_lock held (not _lock): readers go on meanwhile.
        with self._lock:
            self._writing = True        # append_record keeps off the window
        old = self._writer
        try:
            old.trim(self._write_off)
            old.fsync()                 # a finished segment is durable, as nsqd
            self.fsync_count += 1
            if old.dir_dirty:
                _fsync_file(self.directory)
                old.dir_dirty = False
        finally:
            with self._lock:
                self._writing = False
        with self._lock:
            if old.fd is not None:      # closed at the next sync: one may use it now
                self._retired.append(old.fd)
                old.fd = None
            self._write_num += 1
            self._write_off = 0
            # The next segment is created by the write that needs it.
            self._writer = _SegmentWriter(self._seg_path(self._write_num), self.name, False,
                                          self._opened_files)

    # -- reading ---------------------------------------------------------------
    def read(self) -> Optional[Tuple[int, bytes]]:
        """The next unread record as (position, payload), or None at the end."""
        with self._lock:
            self._used = True
            rec = self._read_one_locked()
            if self.acks is None:
                self._advance_commit_locked()
            return rec

    def read_many(self, limit: int) -> Tuple[List[bytes], Optional[List[int]]]:
        """Up to *limit* unread records: (payloads, positions in ack mode, else None).

        Whole records are parsed in one pass out of a large read-ahead buffer;
        a segment's end, a skipped record or damage take ``read``'s path.
        """
        payloads: List[bytes] = []
        positions: Optional[List[int]] = [] if self.acks is not None else None
        with self._lock:
            self._used = True
            while len(payloads) < limit and self._read_pos < self.write_pos:
                if self._take_run_locked(payloads, positions, limit):
                    continue
                rec = self._read_one_locked()
                if rec is None:
                    break
                payloads.append(rec[1])
                if positions is not None:
                    positions.append(rec[0])
            self._caught_up_locked()
            if self.acks is None:
                self._advance_commit_locked()
        return payloads, positions

    def _read_one_locked(self) -> Optional[Tuple[int, bytes]]:
        while self._read_pos < self.write_pos:
            pos = self._read_pos
            rec = self._read_record(pos)
            if rec is None:
                continue          # moved to the next segment, past damage or a marker
            payload, nxt = rec
            self._read_pos = nxt
            self.ops += 1
            if pos in self._skip:
                self._skip.discard(pos)
                continue
            if self.depth > 0:        # an estimate: never below zero
                self.depth -= 1
            if self.acks is not None:
                self.acks.consumed((pos,))
            return pos, payload
        self._caught_up_locked()
        return None

    def _buffered_at_cursor(self) -> Tuple[int, int, int]:
        """(index of the cursor in the read-ahead buffer, index where what may be
        read ends, position of the buffer's start), or (-1, -1, 0) if the
        buffer does not hold the cursor."""
        pos = self._read_pos
        num, off = pos >> _SEG_SHIFT, pos & _SEG_MASK
        i, end = self._reader.at(num, off, self._records_end(num))
        return i, end, (num << _SEG_SHIFT) + self._reader.start

    def _take_run_locked(self, payloads: List[bytes], positions: Optional[List[int]],
                         limit: int) -> int:
        """Take whole, valid, wanted records at the cursor out of the read-ahead
        buffer (``_take_records``); stop, taking nothing more, at anything
        ``read``'s path must handle.  Returns how many were taken."""
        i, end, base = self._buffered_at_cursor()
        first = len(payloads)
        found: List[int] = []
        i = _take_records(self._reader.buf, i, end, limit - first, self.max_record_size,
                          self._skip, payloads, found if positions is not None else None, base)
        count = len(payloads) - first
        if count:
            self._consumed_locked(base + i, count, found)
            if positions is not None:
                positions.extend(found)
        return count

    def _consumed_locked(self, end: int, count: int, found: List[int]) -> None:
        # The cursor passes *count* records (at positions *found*, in ack mode).
        self._read_pos = end
        self.ops += count
        self.depth = max(self.depth - count, 0)
        if self.acks is not None:
            self.acks.consumed(found)

    def peek_framed(self, max_bytes: int) -> Optional[Tuple[bytes, List[int], int]]:
        """The next unread records exactly as stored: (bytes, positions, end position).

        The cursor stays; ``consume_framed`` moves it past them once the
        caller has stored them elsewhere (``append_framed``).  Only lengths
        are checked: CRCs are checked by whoever reads the copies.  None
        when nothing is unread or the next record needs ``read``'s path (a
        segment's end, a skipped record, a bad length): call ``read``.
        """
        with self._lock:
            if self._read_pos >= self.write_pos:
                return None
            self._used = True
            i, end, base = self._buffered_at_cursor()
            if i < 0 or i + _REC_SIZE > end:
                # Refill the read-ahead buffer at the cursor (None: next segment).
                num, off = self._read_pos >> _SEG_SHIFT, self._read_pos & _SEG_MASK
                if self._read_bytes(num, off, _REC_SIZE) is None:
                    return None
                i, end, base = self._buffered_at_cursor()
            buf = self._reader.buf
            positions: List[int] = []
            j = _span_records(buf, i, end, min(end, i + max_bytes), self.max_record_size,
                              self._skip, positions, base)
            if not positions:
                return None
            return buf[i:j], positions, base + j

    def consume_framed(self, positions: List[int], end: int) -> None:
        """Move the cursor to *end*, past the records ``peek_framed`` returned; in
        ack mode they are acknowledged at once (a crash will not bring them back)."""
        with self._lock:
            self._read_pos = end
            self.ops += len(positions)
            self.depth = max(self.depth - len(positions), 0)
            self._caught_up_locked()
            if self.acks is not None:
                self.acks.consumed(positions)
                self.acks.ack(positions, at_once=True)
            self._advance_commit_locked()

    def _read_record(self, pos: int) -> Optional[Tuple[bytes, int]]:
        num, off = pos >> _SEG_SHIFT, pos & _SEG_MASK
        header = self._read_bytes(num, off, _REC_SIZE)
        if header is None:      # end of a finished segment: go to the next one
            self._next_segment(num)
            return None
        field, crc = _REC.unpack(header)
        size = field & _MAX_RECORD
        payload = None
        if 0 < size <= self.max_record_size:
            payload = self._read_bytes(num, off + _REC_SIZE, size)
        if payload is None:
            self._damaged(num, off, "bad record length")
            return None
        if zlib.crc32(payload) != crc:
            # Only the record is bad if its length is right: a good record
            # (or the end) follows it.  Else the length is damaged too.
            nxt = off + _REC_SIZE + size
            end = self._segment_end(num)
            if nxt == end or self._reader.good_record(num, nxt, end, self.max_record_size):
                self._damaged(num, off, "CRC mismatch", skip_to=nxt)
            else:
                self._damaged(num, off, "CRC mismatch and bad record length")
            return None
        if field & _SUPERSEDES:         # a marker, no message: pass it over
            self._read_pos = self._pos(num, off + _REC_SIZE + size)
            return None
        return payload, self._pos(num, off + _REC_SIZE + size)

    def _records_end(self, num: int) -> Optional[int]:
        """Where the records of segment *num* end, if it is the write segment."""
        return self._write_off if num == self._write_num else None

    def _segment_end(self, num: int) -> int:
        end = self._records_end(num)
        return self._reader.size() if end is None else end

    def _read_bytes(self, num: int, off: int, n: int) -> Optional[bytes]:
        return self._reader.bytes_at(num, off, n, self._records_end(num))

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
        self._depth_suspect = True
        if skip_to is None:
            skip_to = self._reader.next_record(off, self._segment_end(num), self.max_record_size)
            if skip_to is not None:
                log.error("segment log %s: %s at segment %d offset %d; %d bytes skipped to "
                          "the next good record, copy kept as %s", self.name, why, num, off,
                          skip_to - off, bad)
        else:
            log.error("segment log %s: %s at segment %d offset %d; record skipped, "
                      "copy kept as %s", self.name, why, num, off, bad)
        if skip_to is not None and skip_to <= self._segment_end(num):
            self._read_pos = self._pos(num, skip_to)
        else:
            log.error("segment log %s: no good record after segment %d offset %d; the rest "
                      "of the segment is lost", self.name, num, off)
            self._next_segment(num)
        if self.depth > 0:
            self.depth -= 1

    def _caught_up_locked(self) -> None:
        """The cursor reached the end: nothing is left, whatever depth said.
        What damage hid (records inside a skipped stretch) is counted here."""
        if self.depth and self._read_pos >= self.write_pos:
            if self._depth_suspect:
                log.error("segment log %s: %d more record(s) were lost in damaged stretches",
                          self.name, self.depth)
                self.corrupt_count += self.depth
            self.depth = 0
        self._depth_suspect = False

    # -- acknowledging ---------------------------------------------------------
    def ack(self, pos: int) -> None:
        """Acknowledge a consumed record (ack mode): it will not be read again."""
        self.ack_many((pos,))

    def ack_many(self, positions: Union[List[int], Tuple[int, ...]]) -> None:
        """``ack`` each of *positions*; the commit point moves once per batch."""
        if self.acks is not None and self.acks.ack(positions):
            with self._lock:
                self._advance_commit_locked()

    def _advance_commit_locked(self) -> None:
        commit = self._read_pos if self.acks is None else self.acks.commit_point(self._read_pos)
        if commit >> _SEG_SHIFT > self._commit >> _SEG_SHIFT:
            for num in range(self._commit >> _SEG_SHIFT, commit >> _SEG_SHIFT):
                self._delete_segment(num)
        self._commit = commit

    def _delete_segment(self, num: int) -> None:
        if num == self._reader.num:
            self._reader.close()
        try:
            os.unlink(self._seg_path(num))
        except FileNotFoundError:
            pass

    # -- syncing ---------------------------------------------------------------
    def sync_to(self, pos: int) -> None:
        """Return once every record before *pos* is fsynced (group commit)."""
        self._commits.sync_to(pos)

    def _fsync_data(self) -> int:
        # One fsync of the write segment (in _GroupCommit's turn); returns the
        # position it made durable.
        with self._lock:
            target, w = self.write_pos, self._writer
        self._fsync_writer(w)
        return target

    def _fsync_writer(self, w: _SegmentWriter) -> None:
        # In the commit turn (so no one closes the descriptor meanwhile).
        if w.dir_dirty:                    # a new segment's entry first
            _fsync_file(self.directory)
            w.dir_dirty = False
        w.fsync()
        self.fsync_count += 1

    def sync(self, save_meta: bool = True, batched: bool = False) -> None:
        """fsync the data and save the metadata (nsqd's sync_every / sync_timeout).

        Without *save_meta* only the data is fsynced and buffered acks are
        written: the metadata, and the fsync of the acks file, wait for a
        later sync.  Open copes with old metadata by scanning what was written
        since; saving it costs three more fsyncs, each a journal commit that
        stalls writers.  *batched*: no fsync here, the caller syncs the file
        system before (the data) and after (the metadata), once for many
        logs.  A log that never stored anything has nothing to sync.
        """
        if not self._has_files:
            return
        with self._commits.exclusive():
            with self._lock:
                target, w = self.write_pos, self._writer
                retired, self._retired = self._retired, []
            if not batched:
                self._fsync_writer(w)
            self._commits.advance(target)
            for rfd in retired:           # rolled segments: fsynced then, idle since
                os.close(rfd)
            self._release_superseded(target)
            if save_meta:
                self._save_meta(target, not batched)
                return
            with self._lock:
                self.ops = 0
                self.sync_requested = False
                self._meta_stale = True
            if self.acks is not None:
                self.acks.flush()         # to the OS now (a crash keeps them)

    def _release_superseded(self, synced: int) -> None:
        # The records of supersedes before *synced* are fsynced: acknowledge
        # the ones they replace (written to the acks file before the metadata
        # saying a restart need not look for their markers).
        with self._lock:
            done = [e for e in self._superseding if e[0] <= synced]
            if not done:
                return
            self._superseding = [e for e in self._superseding if e[0] > synced]
            self.acks.ack([p for _, olds in done for p in olds])  # type: ignore[union-attr]

    def _save_meta(self, synced: int, fsync: bool = True) -> None:
        # The acks file is appended to, and compacted only once it holds many
        # more entries than are live (acks past the commit point), so a sync
        # costs the same however far one old message holds the commit point.
        # "acks_base" is how many entries the file held when the metadata was
        # taken: those after it are acks the metadata's depth does not know.
        # Order matters for a crash in between: the acks the metadata counts
        # are fsynced first, or else the metadata is written before a
        # compacted acks file replaces the old one (which holds every ack).
        acks_file: Optional[str] = None
        live: Optional[List[int]] = None
        with self._lock:
            self.ops = 0
            self.sync_requested = False
            self._meta_stale = False
            self.meta_saved_at = self._clock()
            if self.acks is not None:
                self._advance_commit_locked()
            meta = {"read": self._commit, "write": self.write_pos, "depth": self.depth,
                    "synced": synced}      # everything before it was fsynced
            if self.acks is not None:
                outstanding, meta["acks_base"], acks_file, live = self.acks.checkpoint(self._commit)
                meta["depth"] = self.depth + outstanding
        if acks_file is not None and fsync:
            _fsync_file(acks_file)
        _write_atomic(self._meta_path, json.dumps(meta).encode(), fsync)
        if live is not None:
            self.acks.compact(live)  # type: ignore[union-attr]

    # -- life cycle --------------------------------------------------------------
    def empty(self) -> None:
        """Drop every record: delete the segments and start a new one."""
        with self._append_lock, self._lock:
            first = self._commit >> _SEG_SHIFT
            self._reader.close()
            for num in range(first, self._write_num + 1):
                if num != self._write_num:
                    self._delete_segment(num)
            old = self._writer
            old.unmap()
            if old.fd is not None:
                self._retired.append(old.fd)
                old.fd = None
            self._write_num += 1
            self._write_off = 0
            self._writer = _SegmentWriter(self._seg_path(self._write_num), self.name, False,
                                          self._opened_files)
            self._delete_segment(self._write_num - 1)
            self._read_pos = self._commit = self.write_pos
            self.depth = 0
            self._skip.clear()
            self._superseding.clear()
            if self.acks is not None:
                self.acks.reset()
        self.sync()

    def close(self, batched: bool = False) -> None:
        """Sync and release the files (*batched*: as ``sync``).  One
        untouched since it opened or last synced has nothing to sync (a
        restart of 10,000 idle topics stops without an fsync)."""
        if self.needs_sync or self._superseding:
            self.sync(batched=batched)
        with self._append_lock, self._lock:
            try:
                self._release_files_locked()
            except OSError as e:     # only reserved space is left over
                log.warning("segment log %s: could not trim its last segment: %s",
                            self.name, e)
        if self.acks is not None:
            self.acks.close()

    def destroy(self) -> None:
        """Close and delete every file of the log."""
        with self._append_lock, self._lock:
            self._release_files_locked()
            first, last = self._commit >> _SEG_SHIFT, self._write_num
        if self.acks is not None:
            self.acks.destroy()
        for num in range(first, last + 1):     # those before the commit point are gone
            self._delete_segment(num)
        try:
            os.unlink(self._meta_path)
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


_RECORD_HEAD_SIZE = _RECORD_HEAD.size
_RECORD_SLACK = 64     # a log record may exceed the largest body by its head and framing
_RECORD_FIXED = struct.Struct(">qqH")   # the head up to the id: due, timestamp, attempts
_RECORD_LAYOUTS: Dict[int, struct.Struct] = {}   # payload size -> the record with its body


_FRAMING_CHUNK = 4096     # records framed per bytes object when a batch goes to a log


def _framed_size(msgs: Messages) -> int:
    """The bytes ``_framed_chunks`` makes of *msgs*."""
    bodies = msgs.bodies if msgs.__class__ is _Batch else [m.body for m in msgs]
    return len(msgs) * (_REC_SIZE + _RECORD_HEAD_SIZE) + _nbytes(bodies)


def _framed_chunks(msgs: Messages, due_ns: int) -> Iterator[bytes]:
    """Records of *msgs* framed as a log stores them (``SegmentLog.append_framed``),
    made a chunk at a time: a batch of a million tiny messages never exists
    as a million records (or ids) at once."""
    frame, crc32 = _REC.pack, zlib.crc32
    for k in range(0, len(msgs), _FRAMING_CHUNK):
        n = min(_FRAMING_CHUNK, len(msgs) - k)
        parts: List[bytes] = []
        add = parts.append
        if msgs.__class__ is _Batch:     # one timestamp, attempts 0: a shared prefix
            prefix = _RECORD_FIXED.pack(due_ns, msgs.timestamp, 0)
            ids = (msgs._ids[k:k + n] if msgs._ids is not None
                   else _format_ids((msgs.first + k) & _ID_MASK, n))
            for i, b in zip(ids, _body_chunk(msgs.bodies, k, k + n)):
                p = prefix + i + b
                add(frame(len(p), crc32(p)))
                add(p)
        else:
            head = _RECORD_HEAD.pack
            for m in msgs[k:k + n]:
                p = head(due_ns, m.timestamp, m.attempts, m.id) + m.body
                add(frame(len(p), crc32(p)))
                add(p)
        yield b"".join(parts)


def _decode_framed(data: bytes, now_ns: int) -> List[Tuple[List[Message], float]]:
    """Records as ``peek_framed`` returns them (checked already), as messages:
    [(those due now, 0.0)] then ([one deferred message], its delay in seconds)."""
    now: List[Message] = []
    out: List[Tuple[List[Message], float]] = [(now, 0.0)]
    unpack_rec, unpack_head = _REC.unpack_from, _RECORD_HEAD.unpack_from
    i, head = 0, _REC_SIZE + _RECORD_HEAD_SIZE
    while i < len(data):
        size = unpack_rec(data, i)[0]
        if size < _RECORD_HEAD_SIZE:
            log.error("a record of %d bytes is too short to be a message; skipped", size)
            i += _REC_SIZE + size
            continue
        due_ns, timestamp, attempts, msg_id = unpack_head(data, i + _REC_SIZE)
        m = _Delivery(msg_id, data[i + head:i + _REC_SIZE + size], timestamp, attempts)
        if due_ns > now_ns:
            out.append(([m], (due_ns - now_ns) / 1e9))
        else:
            now.append(m)
        i += _REC_SIZE + size
    return out


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
                 time_ns: Callable[[], int]) -> None:
        self.log = seglog
        # Messages in memory: Message objects, and _Batch entries not yet
        # taken (each counts for all its messages in mem_count).
        self.mem: Deque[Any] = collections.deque()
        self.mem_count = 0
        self._mem_batches = 0              # _Batch entries in mem
        self.mem_limit = mem_limit
        self.durable = durable and seglog is not None
        self.ephemeral = ephemeral
        self.drop_count = 0
        self._on_deferred = on_deferred   # a record read from disk is due later
        self._time_ns = time_ns           # wall clock: is a record read from the log due?
        self.read_error: Optional[OSError] = None   # the log could not be read: retry later

    def __len__(self) -> int:
        return self.mem_count + (self.log.depth if self.log is not None else 0)

    @property
    def backlog(self) -> int:
        """How many queued messages are only on disk (nsqd's backend_depth)."""
        return self.log.depth if self.log is not None else 0

    @property
    def on_disk(self) -> bool:
        """Whether unread records wait in the log."""
        return self.log is not None and self.log.unread

    # -- putting: prepare (may fail, nothing visible) then commit ---------------
    def prepare(self, msgs: Messages, due_ns: int = 0) -> Tuple[Any, ...]:
        """Write what must be written; raise OSError with nothing written.

        Returns a token for ``commit`` (or ``abort``): (messages, positions
        of records kept as consumed, whether they go to memory, the end of
        what was written).  Deferred messages (*due_ns* > 0) are held by the
        caller in memory; in durable mode their records are written too.
        """
        seglog = self.log
        if seglog is None:
            return (msgs if not due_ns else _objects(msgs), None, not due_ns, None)
        if not due_ns and (self.mem_count + len(msgs) > self.mem_limit or seglog.unread):
            # Bound for the log, to be read back later: records only.
            if len(msgs) == 1 and msgs.__class__ is list:    # one publish: no chunking
                m = msgs[0]
                return (msgs, None, False, seglog.append_record(
                    _RECORD_HEAD.pack(0, m.timestamp, m.attempts, m.id) + m.body))
            return (msgs, None, False, seglog.append_framed(
                _framed_chunks(msgs, 0), len(msgs), _framed_size(msgs)))
        to_mem = not due_ns
        if not self.durable:
            return (msgs if to_mem else _objects(msgs), None, to_mem, None)
        msgs = _objects(msgs)
        # Durable: in memory (or deferred) and on disk, the record consumed.
        if len(msgs) == 1:
            span = seglog.append_record(_encode_record(msgs[0], due_ns), consume=True)
            return (msgs, [span[0]], to_mem, span)
        records = [_encode_record(m, due_ns) for m in msgs]
        positions = seglog.append(records, consume=True)
        return (msgs, positions, to_mem, (positions[0], positions[-1] + 1))

    def abort(self, token: Tuple[Any, ...]) -> None:
        msgs, positions, _, span = token
        if positions:
            self.log.unappend(positions, consume=True)  # type: ignore[union-attr]
        elif span:
            self.log.unappend_framed(span[0], len(msgs))  # type: ignore[union-attr]

    def commit(self, token: Tuple[Any, ...]) -> None:
        msgs, positions, to_mem, _ = token
        if positions is not None:
            for m, p in zip(msgs, positions):
                m._pos = p
        if to_mem:
            self.push(msgs)

    def push(self, msgs: Messages) -> None:
        """Put messages (already stored, if they need to be) in memory, after
        the others; an ephemeral queue drops (and counts) what does not fit."""
        n = len(msgs)
        if self.ephemeral and self.mem_count + n > self.mem_limit:
            room = max(self.mem_limit - self.mem_count, 0)
            self.drop_count += n - room
            log.warning("ephemeral queue is full: dropped %d message(s)", n - room)
            msgs, n = _objects(msgs)[:room], room
        if msgs.__class__ is _Batch:
            self.mem.append(msgs)
            self._mem_batches += 1
        else:
            self.mem.extend(msgs)
        self.mem_count += n

    def unshift(self, msgs: List[Message]) -> None:
        """Put taken messages back in front (they could not be handed on)."""
        self.mem.extendleft(reversed(msgs))
        self.mem_count += len(msgs)

    def take_batch(self) -> Optional[_Batch]:
        """The first entry of memory, if it is a whole batch (not cut into messages)."""
        mem = self.mem
        if mem and mem[0].__class__ is _Batch:
            b = mem.popleft()
            self.mem_count -= len(b)
            self._mem_batches -= 1
            return b
        return None

    def unshift_batch(self, b: _Batch) -> None:
        """Put a batch ``take_batch`` took back in front (it could not be handed on)."""
        self.mem.appendleft(b)
        self.mem_count += len(b)
        self._mem_batches += 1

    def remove_at(self, i: int) -> Message:
        """Take the message at index *i* of memory (``fill`` made it an object)."""
        msg = self.mem[i]
        del self.mem[i]
        self.mem_count -= 1
        return msg

    def drop_memory(self) -> None:
        self.mem.clear()
        self.mem_count = self._mem_batches = 0

    # -- taking ------------------------------------------------------------------
    def take(self, n: int) -> List[Message]:
        """Up to *n* messages due now, oldest first; deferred ones found in the
        log go to on_deferred."""
        mem = self.mem
        if not self._mem_batches:                 # objects only
            if len(mem) >= n:
                self.mem_count -= n
                if n == 1:
                    return [mem.popleft()]
                popleft = mem.popleft
                return [popleft() for _ in range(n)]
            out = list(mem)
            mem.clear()
        else:
            out = self._take_memory(n)
        self.mem_count -= len(out)
        seglog = self.log
        while len(out) < n and seglog is not None and seglog.unread:
            try:
                payloads, positions = seglog.read_many(n - len(out))
            except OSError as e:
                # Out of descriptors, an I/O error: the records stay unread
                # (what was taken from memory is handed out) and the owner
                # tries again later.  Logged once per cause.
                if self.read_error is None or self.read_error.errno != e.errno:
                    log.error("segment log %s: could not read (retrying): %s", seglog.name, e)
                self.read_error = e
                break
            self.read_error = None
            if not payloads:
                break
            self._decode_into(out, payloads, positions, self._time_ns())
        return out

    def _take_memory(self, n: int) -> List[Message]:
        # Up to n from memory, unpacking batches (a part left goes back in front).
        mem, out = self.mem, []
        while mem and len(out) < n:
            entry = mem.popleft()
            if entry.__class__ is not _Batch:
                out.append(entry)
                continue
            need = n - len(out)
            if len(entry) > need:       # the rest stays a batch
                entry, rest = entry.split(need)
                mem.appendleft(rest)
            else:
                self._mem_batches -= 1
            out += entry.messages()
        return out

    def _decode_into(self, out: List[Message], payloads: List[bytes],
                     positions: Optional[List[int]], now_ns: int) -> None:
        size = len(payloads[0])
        if (len(payloads) >= _BULK_RUN and size >= _RECORD_HEAD_SIZE
                and len(set(map(len, payloads))) == 1):
            self._decode_run(out, payloads, positions, now_ns)
            return
        unpack, head, add = _RECORD_HEAD.unpack_from, _RECORD_HEAD_SIZE, out.append
        for k, p in enumerate(payloads):
            try:
                due_ns, timestamp, attempts, msg_id = unpack(p)
            except struct.error:
                self._not_a_message(positions[k] if positions is not None else None)
                continue
            m = _Delivery(msg_id, p[head:], timestamp, attempts)
            if positions is not None:      # durable: acknowledged when finished
                m._pos = positions[k]
            if due_ns > now_ns:
                self._on_deferred(m, due_ns)
            else:
                add(m)

    def _decode_run(self, out: List[Message], payloads: List[bytes],
                    positions: Optional[List[int]], now_ns: int) -> None:
        # Records of one length: every field of every record unpacked in one call.
        size = len(payloads[0])
        layout = _RECORD_LAYOUTS.get(size)
        if layout is None:
            layout = _RECORD_LAYOUTS[size] = struct.Struct(
                f"{_RECORD_HEAD.format}{size - _RECORD_HEAD_SIZE}s")
        rows = layout.iter_unpack(b"".join(payloads))
        add, deliver = out.append, _Delivery
        if positions is None:
            for due_ns, timestamp, attempts, msg_id, body in rows:
                m = deliver(msg_id, body, timestamp, attempts)
                if due_ns > now_ns:
                    self._on_deferred(m, due_ns)
                else:
                    add(m)
            return
        for (due_ns, timestamp, attempts, msg_id, body), pos in zip(rows, positions):
            m = deliver(msg_id, body, timestamp, attempts)
            m._pos = pos                   # durable: acknowledged when finished
            if due_ns > now_ns:
                self._on_deferred(m, due_ns)
            else:
                add(m)

    def _not_a_message(self, pos: Optional[int]) -> None:
        seglog = self.log
        log.error("segment log %s: a record is too short to be a message; skipped",
                  seglog.name)  # type: ignore[union-attr]
        seglog.corrupt_count += 1  # type: ignore[union-attr]
        if pos is not None:
            seglog.ack(pos)  # type: ignore[union-attr]

    def fill(self, n: int) -> None:
        """Make the first *n* messages objects in memory (look-ahead by index)."""
        if self.mem_count < n and self.on_disk or self._mem_batches:
            self.unshift(self.take(n))

    def done(self, msg: Message) -> None:
        """The message left the queue for good (finished, dead-lettered, dropped)."""
        if msg._pos is not None and self.durable:
            self.log.ack(msg._pos)

    # -- life cycle ----------------------------------------------------------------
    def clear(self) -> None:
        self.drop_memory()
        if self.log is not None:
            self.log.empty()

    def rewrite(self, held: List[Tuple[Message, int]]) -> bool:
        """Durable mode: write the records of *held* messages (with the due
        times they keep) anew at the log's tail, replacing their old ones
        (``SegmentLog.supersede``); False if nothing could be written."""
        items = [(m, due) for m, due in held if m._pos is not None]
        if not items:
            return False
        seglog = self.log
        try:
            positions = seglog.supersede([_encode_record(m, due) for m, due in items],  # type: ignore[union-attr]
                                         [m._pos for m, _ in items], consume=True)
        except OSError as e:     # the old records stay; tried again later
            log.error("could not rewrite %d held record(s) of %s: %s", len(items),
                      seglog.name, e)  # type: ignore[union-attr]
            return False
        for (m, _), pos in zip(items, positions):      # (the first ones, if not all)
            m._pos = pos
        log.info("%s: rewrote %d in-flight or deferred record(s) held back by acks",
                 seglog.name, len(positions))  # type: ignore[union-attr]
        return True

    def persist(self, extra: List[Tuple[Message, int]]) -> None:
        """At a clean close: store what lives only in memory (with due times)."""
        if self.log is None:
            return
        items = [(m, 0) for m in self._take_memory(self.mem_count)] + extra
        self.drop_memory()
        if not items:
            return
        records = [_encode_record(m, due) for m, due in items]
        try:
            if self.durable:     # the new records replace the old ones, atomically
                self.log.supersede(records, [_NO_POS if m._pos is None else m._pos
                                             for m, _ in items], consume=False)
            else:
                self.log.append(records)
        except OSError as e:
            log.error("could not persist %d message(s) to %s: %s", len(items),
                      self.log.name, e)


# What a dispatch hands over, once no lock is held: each consumer with its messages.
Deliveries = List[Tuple["Consumer", List[_Delivery]]]


class _LatencyHistogram:
    """Publish-to-FIN latencies of a channel's finished messages: how many
    fell in each of the E2E_LATENCY_BUCKETS (and beyond), and their sum.
    Guarded by its channel's lock."""

    def __init__(self) -> None:
        self.counts = [0] * (len(_E2E_BOUNDS_NS) + 1)   # the last one: over 300 s
        self.sum_ns = 0

    def count(self, stamps: List[int], now_ns: int) -> None:
        """Count the messages published at *stamps* (ns), finished at *now_ns*."""
        counts = self.counts
        self.sum_ns += now_ns * len(stamps) - sum(stamps)
        if len(stamps) == 1:
            counts[bisect.bisect_left(_E2E_BOUNDS_NS, now_ns - stamps[0])] += 1
            return
        # latency <= bound  <=>  stamp >= now - bound: bisect the sorted stamps
        stamps.sort()
        below = len(stamps)         # those with latency above every bound so far
        for j, bound in enumerate(_E2E_BOUNDS_NS):
            above = bisect.bisect_left(stamps, now_ns - bound)
            counts[j] += below - above
            below = above
        counts[-1] += below

    def stats(self) -> Dict[str, Any]:
        return {"buckets": dict(zip(E2E_LATENCY_BUCKETS, self.counts)),
                "count": sum(self.counts), "sum": self.sum_ns / 1e9}


class _E2EQuantiles:
    """nsqd's end-to-end processing latency quantiles of a channel
    (``--e2e-processing-latency-percentile``): publish-to-FIN times of the
    last *window* seconds, kept as nsqd keeps them, in two streams of half a
    window each (the older one is dropped when the newer one is half a
    window old), and queried merged.

    A stream is a sparse histogram on a log scale: 64 buckets per power of
    two (a latency's bit length and its next six bits name its bucket), so
    a quantile, reported as its bucket's middle, is within 1 % of the exact
    one, and memory follows the spread of latencies (at most 64 buckets per
    doubling), not their number.  A batch of FINs is counted a bucket at a
    time (its stamps sorted, each bucket's run found by bisection), so
    latencies that are close, as under load, cost little each.  Guarded by
    its channel's lock."""

    def __init__(self, percentiles: Sequence[float], window: float, now: float) -> None:
        self.percentiles = tuple(percentiles)
        self.half = window / 2
        self._streams: List[Dict[int, int]] = [{}, {}]
        self._current = 0
        self._moved_at = now

    def _advance(self, now: float) -> None:
        # Drop the older stream for each half window that has passed.
        if now >= self._moved_at + 2 * self.half:            # a whole window: both
            self._streams = [{}, {}]
            self._moved_at = now
        while now >= self._moved_at + self.half:
            self._current ^= 1
            self._streams[self._current] = {}
            self._moved_at += self.half

    def count(self, stamps: List[int], now_ns: int, now: float) -> None:
        """Count messages published at *stamps* (ns; sorted here) and finished
        at *now_ns* (*now*: the broker's monotonic clock, for the window)."""
        self._advance(now)
        stream = self._streams[self._current]
        get, right = stream.get, bisect.bisect_right
        stamps.sort()
        i, n = 0, len(stamps)
        while i < n:
            ns = now_ns - stamps[i]              # the longest latency left
            if ns < 64:                          # (and all shorter): the first bucket
                stream[448] = get(448, 0) + n - i
                return
            bits = ns.bit_length()
            m = (ns >> (bits - 7)) & 63
            k = (bits << 6) | m
            j = right(stamps, now_ns - ((64 + m) << (bits - 7)), i)   # those in bucket k
            stream[k] = get(k, 0) + j - i
            i = j

    def buckets(self, now: float) -> Dict[int, int]:
        """The window's counts by bucket (both streams merged)."""
        self._advance(now)
        return _merge_buckets(self._streams)

    @staticmethod
    def result(percentiles: Sequence[float],
               buckets: Optional[Dict[int, int]]) -> Dict[str, Any]:
        """nsqd's ``e2e_processing_latency`` object: the count and each
        percentile's value in ns (None: not tracked, as nsqd's null)."""
        if buckets is None:
            return {"count": 0, "percentiles": None}
        total = sum(buckets.values())
        keys = sorted(buckets)
        out = []
        for q in percentiles:
            rank, seen, value = q * total, 0, 0
            for k in keys:
                seen += buckets[k]
                if seen >= rank:                 # the bucket's middle
                    value = int((64 + (k & 63) + 0.5) * 2.0 ** ((k >> 6) - 7))
                    break
            out.append({"quantile": q, "value": value})
        return {"count": total, "percentiles": out}


def _merge_buckets(parts: Iterable[Dict[int, int]]) -> Dict[int, int]:
    """Histograms of latency buckets added up (a window's two halves, a topic's channels)."""
    merged: Dict[int, int] = {}
    for part in parts:
        for k, n in part.items():
            merged[k] = merged.get(k, 0) + n
    return merged


class Consumer:
    """A subscriber of a channel as the core sees it (in-process or a TCP client).

    Front ends subclass it and implement ``_deliver`` (called without any
    broker lock held; must not block) and optionally ``_on_channel_closed``.
    ``ready_count`` is nsqd's RDY: messages are delivered while
    ``in_flight_count < ready_count``.
    """

    _ids = itertools.count(1)

    #: what /stats shows as the client's user agent
    user_agent = f"minq/{VERSION}"

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
        # The channel's view, guarded by its lock: the room (RDY above in
        # flight) it counts for this consumer, 0 while it is not among those
        # with room; and the order it joined in (ties of the weighted policy).
        self._room = 0
        self._seq = 0

    # -- hooks for front ends -------------------------------------------------
    def _deliver(self, msg: _Delivery) -> None:
        raise NotImplementedError

    def _deliver_many(self, msgs: List[_Delivery]) -> None:
        """Take several messages at once (front ends may do it faster than one by one)."""
        for msg in msgs:
            self._deliver(msg)

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
            "user_agent": self.user_agent, "topology_zone": "", "topology_region": "",
            "tls": False, "tls_cipher_suite": "", "tls_version": "",
            "tls_negotiated_protocol": "", "tls_negotiated_protocol_is_mutual": False,
            "weight": self.weight,
        }

    def is_ready(self) -> bool:
        return not self.closed and self.in_flight_count < self.ready_count


class _ReadySet:
    """The consumers of a channel that have room, kept where a dispatch finds
    them without looking at the others (so its cost follows the messages it
    hands out, not the number of consumers).  The channel adds a consumer
    when it gains room and discards it when its room is gone; a subclass per
    dispatch policy keeps them in the order that policy needs.  This base
    keeps nothing: the hash policy asks the ring for a key's consumer.
    Guarded by the channel's lock."""

    def __len__(self) -> int:
        return 0

    def add(self, c: Consumer) -> None:
        """*c* has room now (the caller knows it was not here)."""

    def discard(self, c: Consumer) -> None:
        """*c* has no room any more (a no-op if it was not here)."""


class _ReadyRing(_ReadySet):
    """Round robin: the consumers with room in turn order, in an OrderedDict
    (O(1) to add, discard and rotate).  One served goes to the back; one
    that gets room back joins at the back (nsqd serves its waiting clients
    first come, first served, too)."""

    def __init__(self) -> None:
        self.ring: "collections.OrderedDict[Consumer, None]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.ring)

    def add(self, c: Consumer) -> None:
        self.ring[c] = None

    def discard(self, c: Consumer) -> None:
        self.ring.pop(c, None)


class _ReadyPool(_ReadySet):
    """Random: the consumers with room in a list, for a uniform draw by index;
    one leaving swaps the last one into its place (O(1))."""

    def __init__(self) -> None:
        self.members: List[Consumer] = []
        self._at: Dict[Consumer, int] = {}

    def __len__(self) -> int:
        return len(self.members)

    def add(self, c: Consumer) -> None:
        if c not in self._at:
            self._at[c] = len(self.members)
            self.members.append(c)

    def discard(self, c: Consumer) -> None:
        i = self._at.pop(c, None)
        if i is None:
            return
        last = self.members.pop()
        if last is not c:
            self.members[i] = last
            self._at[last] = i


class _ReadyWeighted(_ReadySet):
    """Weighted: nginx's smooth weighted round robin over the consumers with
    room, exactly, in O(log n + distinct weights) a pick instead of O(n).

    The algorithm: at each pick every consumer with room gains its weight,
    the richest (the first to join, on a tie) is picked and pays back the
    total weight of those with room; one without room neither gains nor
    pays.  Here the gains stay implicit: a consumer with room is worth
    ``base + weight * picks``, so a pick changes only the picked one's base.
    Consumers of one weight gain alike and keep their order, so a heap per
    distinct weight (richest base first, then join order) has its richest at
    the top; a pick compares those tops (one per distinct weight: usually one
    or two).  A consumer leaving keeps its worth in ``_current_weight`` and
    its heap entry goes stale, dropped once it surfaces (or in a rebuild once
    stale entries outnumber live ones)."""

    def __init__(self) -> None:
        self.picks = 0
        self.total = 0                                  # weight of those with room
        self._base: Dict[Consumer, Tuple[int, int]] = {}    # consumer -> (base, weight)
        self._heaps: Dict[int, List[Tuple[int, int, Consumer]]] = {}  # (-base, seq, c)
        self._entries = 0

    def __len__(self) -> int:
        return len(self._base)

    def add(self, c: Consumer) -> None:
        if c in self._base:
            return
        w = c.weight
        base = c._current_weight - w * self.picks
        self._base[c] = (base, w)
        self.total += w
        heapq.heappush(self._heaps.setdefault(w, []), (-base, c._seq, c))
        self._entries += 1

    def discard(self, c: Consumer) -> None:
        entry = self._base.pop(c, None)
        if entry is None:
            return
        base, w = entry
        c._current_weight = base + w * self.picks
        self.total -= w
        if self._entries > 2 * len(self._base) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        heaps: Dict[int, List[Tuple[int, int, Consumer]]] = {}
        for c, (base, w) in self._base.items():
            heaps.setdefault(w, []).append((-base, c._seq, c))
        for h in heaps.values():
            heapq.heapify(h)
        self._heaps = heaps
        self._entries = len(self._base)

    def pick(self) -> Optional[Consumer]:
        """The consumer the next message goes to (None if none has room)."""
        if not self._base:
            return None
        self.picks += 1
        t = self.picks
        bases = self._base
        best: Optional[Consumer] = None
        best_worth = best_seq = best_w = 0
        for w, heap in self._heaps.items():
            while heap:
                neg, seq, c = heap[0]
                entry = bases.get(c)
                if entry is not None and entry[0] == -neg and entry[1] == w:
                    break
                heapq.heappop(heap)                     # stale: it left or moved
                self._entries -= 1
            else:
                continue
            worth = w * t - neg
            if best is None or worth > best_worth or worth == best_worth and seq < best_seq:
                best, best_worth, best_seq, best_w = c, worth, seq, w
        assert best is not None
        base = bases[best][0] - self.total              # the picked pays back the total
        bases[best] = (base, best_w)
        heapq.heapreplace(self._heaps[best_w], (-base, best_seq, best))
        return best


def _new_ready_set(dispatch: str) -> _ReadySet:
    """The structure that keeps the consumers with room for *dispatch*."""
    if dispatch == "weighted":
        return _ReadyWeighted()
    if dispatch == "random":
        return _ReadyPool()
    if dispatch == "hash":
        return _ReadySet()
    return _ReadyRing()


class _HashRing:
    """Consistent hashing of keys onto consumers (64 virtual nodes each).

    Points are kept sorted by (hash, consumer id); a consumer joining or
    leaving inserts or removes its own points (bisect), so churn among many
    consumers does not rebuild the ring each time."""

    REPLICAS = 64

    def __init__(self, consumers: Iterable[Consumer] = ()) -> None:
        self._points: List[Tuple[int, int]] = []       # (hash, consumer id), sorted
        self._owners: Dict[int, Consumer] = {}
        for c in consumers:
            self.add(c)

    @staticmethod
    def _hash(data: bytes) -> int:
        return zlib.crc32(data) * 2654435761 % (1 << 32)  # spread crc32 over the ring

    def _points_of(self, c: Consumer) -> List[Tuple[int, int]]:
        return [(self._hash(f"{c.id}-{r}".encode()), c.id) for r in range(self.REPLICAS)]

    def add(self, c: Consumer) -> None:
        if c.id in self._owners:
            return
        self._owners[c.id] = c
        for p in self._points_of(c):
            bisect.insort(self._points, p)

    def remove(self, c: Consumer) -> None:
        if self._owners.pop(c.id, None) is None:
            return
        points = self._points
        for p in self._points_of(c):
            del points[bisect.bisect_left(points, p)]

    def lookup(self, key: bytes) -> Optional[Consumer]:
        points = self._points
        if not points:
            return None
        i = bisect.bisect(points, (self._hash(key), math.inf)) % len(points)
        return self._owners[points[i][1]]


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
        self.broker = topic.broker             # for its options (public attributes)
        self._env: _BrokerServices = topic._env
        self.name = name
        self.ephemeral = is_ephemeral(name)
        self._monotonic = self._env.monotonic
        # _lock guards every field below; it is never held while calling user
        # code, consumer callbacks or another topic's methods.
        self._lock = threading.Lock()
        self._queue = self._env.new_queue(f"{topic.name}:{name}", self.ephemeral,
                                             self._defer_from_disk)
        self._in_flight: Dict[bytes, _Delivery] = {}
        # In-process finishes not yet settled: appended without the lock (a
        # deque), settled in a batch under it (``_settle_finished_locked``)
        # by the consumer once RDY/4 wait or before it waits for messages,
        # and by anyone who takes the lock to time out, remove, count or
        # persist.  Taking a lock the publishing thread takes, once per
        # message, would make the two threads convoy on it and the GIL.
        self._finished: Deque[_Delivery] = collections.deque()
        # In-flight deadlines, in buckets _DEADLINE_GRAIN wide: bucket k holds
        # the messages due in ((k-1)*grain, k*grain] and fires at k*grain (never
        # early, at most a grain late); a settled message leaves its bucket.
        self._buckets: Dict[int, Dict[bytes, _Delivery]] = {}
        self._bucket_heap: List[int] = []
        self._last_bucket: Tuple[int, Dict[bytes, _Delivery]] = (0, {})
        self._deferred: Dict[bytes, Message] = {}
        self._deferred_heap: List[Tuple[float, bytes]] = []    # (due, id), lazy
        self._consumers: List[Consumer] = []
        self._joined = itertools.count(1)      # consumers' _seq: the order they joined
        # The consumers with room, in the structure the policy dispatches
        # from, and their total room (each one's is its ``_room``).  Kept up
        # to date by ``_refresh_locked`` at every change of a consumer's RDY,
        # in-flight count or closed flag, so no dispatch scans the consumers.
        self._ready: _ReadySet = _ReadyRing()
        self._room = 0
        self._ring: Optional[_HashRing] = None
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.requeue_count = 0
        self.timeout_count = 0
        self.dead_count = 0
        self._e2e = _LatencyHistogram()
        # The time the broker's timer will next visit (guarded by its lock).
        self._wake_at = math.inf
        # nsqd's quantiles, when the broker tracks some (None: not tracked).
        self._quantiles = (_E2EQuantiles(self.broker.e2e_percentiles, self.broker.e2e_window,
                                         self._monotonic())
                           if self.broker.e2e_percentiles else None)
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
            if dispatch is not None and dispatch != self.dispatch:
                self.dispatch = dispatch
                old, self._ready = self._ready, _new_ready_set(dispatch)
                for c in self._consumers:
                    old.discard(c)            # (weighted: keeps each one's worth)
                    if c._room:
                        self._ready.add(c)
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
    def _prepare_locked(self, msgs: Messages, defer: float) -> Tuple[Any, ...]:
        """Store messages where they must be stored; OSError means nothing was.

        Called with the topic's lock held, and with this channel's lock held
        unless the topic has no other channel (the log has its own locks).
        """
        due_ns = self._env.time_ns() + int(defer * 1e9) if defer > 0 else 0
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

    def _put_memory(self, msgs: Messages, defer: float, out: Deliveries) -> None:
        """The fast path of prepare+commit for a channel without a log (cannot fail).

        When the one consumer is full, the messages are queued with no Python
        call under the lock: a thread switch there would make a finishing
        consumer wait for the lock and the GIL in turn (a lock convoy)."""
        lock = self._lock
        lock.acquire()
        try:
            self.message_count += len(msgs)
            if defer > 0:
                due = self._monotonic() + defer
                for m in _objects(msgs):
                    self._defer_locked(m, due)
                return
            cs, q = self._consumers, self._queue
            if len(cs) == 1 and msgs.__class__ is list and not (
                    self.paused or cs[0].closed or self.dispatch == "hash"):
                c = cs[0]
                room = c.ready_count - c.in_flight_count
                if not q.mem and room >= len(msgs):
                    # Nothing waits before them and the consumer has room: hand over.
                    self._start_flight_locked(msgs, c, self._monotonic(), out)
                    return
                if room <= 0 and not q.ephemeral:
                    q.mem.extend(msgs)             # q.push(msgs), in place
                    q.mem_count += len(msgs)
                    return
            q.push(msgs)
            if cs and not self.paused:
                self._dispatch_locked(out)
        finally:
            lock.release()

    def _defer_locked(self, msg: Message, due: float) -> None:
        self._deferred[msg.id] = msg
        heapq.heappush(self._deferred_heap, (due, msg.id))
        self._wake_by(due)

    def _defer_from_disk(self, msg: Message, due_ns: int) -> None:
        # A deferred record met while reading the log (after a restart).
        self._defer_locked(msg, self._monotonic() + (due_ns - self._env.time_ns()) / 1e9)

    # -- consumers -------------------------------------------------------------
    def add_consumer(self, consumer: Consumer) -> None:
        """Attach a consumer (nsqd's SUB)."""
        with self._lock:
            if self.deleted:
                raise BrokerClosed(f"channel {self.topic.name}/{self.name} was deleted")
            consumer.channel = self
            consumer._seq = next(self._joined)
            consumer._room = 0
            self._consumers.append(consumer)
            self._refresh_locked(consumer)
            if self._ring is not None:
                self._ring.add(consumer)
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
            self._refresh_locked(consumer)
            if self._ring is not None:
                self._ring.remove(consumer)
            self._settle_finished_locked()     # what it finished is not requeued
            mine = [h for h in self._in_flight.values() if h.consumer is consumer]
            for h in mine:
                self._take_out_of_flight_locked(h)
                self._return_locked(h, 0.0, dead)
            deliveries = self._dispatch_locked([])
            last_gone = self.ephemeral and not self._consumers
        self._hand_over(deliveries, dead)
        if last_gone:
            self.topic._delete_channel_if_unused(self)

    def holds(self, msg: Message) -> bool:
        """Whether the delivered handle *msg* is still in flight here.  One
        dict lookup (atomic without the lock); like any answer about flight,
        true only until its deadline passes."""
        return self._in_flight.get(msg.id) is msg

    def set_ready(self, consumer: Consumer, count: int) -> None:
        """Change a consumer's RDY window and deliver what now fits."""
        with self._lock:
            consumer.ready_count = count
            self._refresh_locked(consumer)
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries)

    # -- settling (FIN / REQ / TOUCH) ------------------------------------------
    def finish(self, consumer: Consumer, msg_id: bytes) -> None:
        """FIN by id for *consumer*; raise NotInFlight if it does not hold it."""
        if self.finish_many(consumer, (msg_id,)):
            raise NotInFlight(f"FIN {msg_id!r} failed: ID not in flight for this consumer")

    def finish_many(self, consumer: Consumer, msg_ids: Iterable[bytes]) -> List[bytes]:
        """FIN each id *consumer* holds, under one lock; return those it did not hold.

        The slots freed are filled once, for all of them (nsqd's FIN, batched
        the way a busy client's FINs arrive: many per read).
        """
        failed: List[bytes] = []
        with self._lock:
            in_flight = self._in_flight
            pop = in_flight.pop
            done: List[_Delivery] = []
            for msg_id in msg_ids:
                h = pop(msg_id, None)
                if h is None or h.consumer is not consumer:
                    if h is not None:
                        in_flight[msg_id] = h       # someone else's: put it back
                    failed.append(msg_id)
                    continue
                done.append(h)
            if not done:
                return failed
            self._finished_locked(done)
            deliveries = self._dispatch_locked([])
        if deliveries:
            _hand_over_all(deliveries)
        return failed

    def _finished_locked(self, done: List[_Delivery]) -> None:
        """Messages taken out of ``_in_flight`` were finished: count them, release
        their records (durable), free their consumers' slots."""
        stamps: List[int] = []
        acks: List[int] = []
        durable = self._queue.durable
        last: Optional[Consumer] = None
        for h in done:
            del h._bucket[h.id]
            stamps.append(h.timestamp)
            c = h.consumer
            c.in_flight_count -= 1  # type: ignore[union-attr]
            c.finish_count += 1  # type: ignore[union-attr]
            if c is not last:                     # (FINs come in runs per consumer)
                if last is not None:
                    self._refresh_locked(last)
                last = c
            if durable and h._pos is not None:    # release its record
                acks.append(h._pos)
        if last is not None:
            self._refresh_locked(last)
        now_ns = self._env.time_ns()
        if self._quantiles is not None:
            self._quantiles.count(stamps, now_ns, self._monotonic())
        self._e2e.count(stamps, now_ns)
        if acks:
            self._ack_locked(acks)

    def _settle_finished_locked(self) -> None:
        """Settle the in-process finishes that wait (see ``_finished``)."""
        fin, in_flight = self._finished, self._in_flight
        done: List[_Delivery] = []
        while fin:
            h = fin.popleft()
            if in_flight.get(h.id) is h:
                del in_flight[h.id]
                done.append(h)
        if done:
            self._finished_locked(done)

    def settle(self) -> None:
        """Settle waiting in-process finishes now and refill the freed slots."""
        with self._lock:
            self._settle_finished_locked()
            deliveries = self._dispatch_locked([])
        _hand_over_all(deliveries)

    def requeue(self, consumer: Consumer, msg_id: bytes, delay: float = 0.0) -> None:
        """REQ by id: back to the queue, or to the deferred set if delay > 0."""
        with self._lock:
            h = self._held_locked(consumer, msg_id, "REQ")
            deliveries, dead = self._requeue_locked(h, delay)
        self._hand_over(deliveries, dead)

    def touch(self, consumer: Consumer, msg_id: bytes) -> None:
        """TOUCH by id: restart the in-flight deadline."""
        with self._lock:
            self._touch_locked(self._held_locked(consumer, msg_id, "TOUCH"))

    # The same, for a delivered handle (in-process consumers settle these).
    def _finish(self, h: _Delivery) -> None:
        # The in-process hot path: settled later, in a batch (see _finished),
        # unless the channel is durable: its acks are what a crash keeps.
        if self._in_flight.get(h.id) is not h or h._finished:
            raise _not_in_flight(h, "FIN")
        h._finished = True
        if self._queue.durable:
            self._settle_now(h)
            return
        fin = self._finished
        fin.append(h)
        if len(fin) > h.consumer.ready_count >> 2:  # type: ignore[union-attr]
            self.settle()

    def _settle_now(self, h: _Delivery) -> None:
        with self._lock:
            self._settle_finished_locked()
            if self._in_flight.get(h.id) is h:
                del self._in_flight[h.id]
                self._finished_locked([h])
            deliveries = self._dispatch_locked([])
        _hand_over_all(deliveries)

    def _requeue(self, h: _Delivery, delay: float) -> None:
        with self._lock:
            if self._in_flight.get(h.id) is not h or h._finished:
                raise _not_in_flight(h, "REQ")
            deliveries, dead = self._requeue_locked(h, delay)
        self._hand_over(deliveries, dead)

    def _touch(self, h: _Delivery) -> None:
        with self._lock:
            if self._in_flight.get(h.id) is not h or h._finished:
                raise _not_in_flight(h, "TOUCH")
            self._touch_locked(h)

    # -- the steps they share ------------------------------------------------------
    def _held_locked(self, consumer: Consumer, msg_id: bytes, code: str) -> _Delivery:
        """The in-flight message *msg_id* if *consumer* holds it, else NotInFlight."""
        h = self._in_flight.get(msg_id)
        if h is None or h.consumer is not consumer:
            raise NotInFlight(f"{code} {msg_id!r} failed: ID not in flight for this consumer")
        return h

    def _take_out_of_flight_locked(self, h: _Delivery) -> Consumer:
        """Take *h* out of flight (and its deadline bucket); return who held it."""
        del self._in_flight[h.id]
        del h._bucket[h.id]
        c = h.consumer
        c.in_flight_count -= 1  # type: ignore[union-attr]
        self._refresh_locked(c)  # type: ignore[arg-type]
        return c  # type: ignore[return-value]

    def _requeue_locked(self, h: _Delivery, delay: float) -> Tuple[Deliveries, List[Message]]:
        c = self._take_out_of_flight_locked(h)
        c.requeue_count += 1
        self.requeue_count += 1
        dead: List[Message] = []
        self._return_locked(h, min(max(delay, 0.0), self.broker.max_req_timeout), dead)
        return self._dispatch_locked([]), dead

    def _touch_locked(self, h: _Delivery) -> None:
        now = self._monotonic()
        h.deadline = min(now + self._timeout_for(h.consumer),  # type: ignore[arg-type]
                         h.delivered_at + self.broker.max_msg_timeout)
        del h._bucket[h.id]
        h._bucket = self._bucket_locked(h.deadline)
        h._bucket[h.id] = h

    def _ack_locked(self, positions: List[int]) -> None:
        """Durable mode: release the records of finished messages."""
        seglog = self._queue.log
        seglog.ack_many(positions)  # type: ignore[union-attr]
        if seglog.acks.pinned:  # type: ignore[union-attr]
            self._unpin_locked()

    def _return_locked(self, msg: Message, delay: float, dead: List[Message]) -> None:
        """Put a message that left flight back, or dead-letter it if out of attempts."""
        limit = self.effective_max_attempts
        if limit and msg.attempts >= limit:
            self.dead_count += 1
            dead.append(msg)
            return
        stored = _Delivery(msg.id, msg.body, msg.timestamp, msg.attempts)
        stored._pos = msg._pos     # durable: the same record stays unacknowledged
        if delay > 0:
            self._defer_locked(stored, self._monotonic() + delay)
        else:
            self._queue.push([stored])

    def _timeout_for(self, consumer: Consumer) -> float:
        return consumer.msg_timeout or self.broker.msg_timeout

    # -- dispatch --------------------------------------------------------------
    def _refresh_locked(self, c: Consumer) -> None:
        """*c*'s RDY, in-flight count or closed flag changed: bring its room,
        the channel's total and its place among those with room up to date.
        A consumer closed without the lock (its front end is going) keeps
        its place until a dispatch meets it and calls this."""
        room = 0 if c.closed else c.ready_count - c.in_flight_count
        old = c._room
        if room > 0:
            if room != old:
                self._room += room - old
                c._room = room
                if not old:
                    self._ready.add(c)
        elif old:
            self._room -= old
            c._room = 0
            self._ready.discard(c)

    def _dispatch_locked(self, out: Deliveries) -> Deliveries:
        """Move queued messages into flight for ready consumers (lock held).

        Costs O(messages handed out), whatever the number of consumers: the
        total room and the consumers with room are kept (``_refresh_locked``).
        """
        q = self._queue
        if self.paused or self._room <= 0 or not (q.mem or q.log is not None and q.log.unread):
            return out
        now = self._monotonic()
        if self.dispatch == "hash":
            self._dispatch_hash_locked(now, out)
        else:
            self._share_locked(now, out)
        if q.read_error is not None:
            self._wake_by(now + _READ_RETRY)            # the log is read again then
        return out

    def _share_locked(self, now: float, out: Deliveries) -> None:
        q, cs = self._queue, self._consumers
        if len(cs) == 1:
            c = cs[0]
            if c.closed:
                self._refresh_locked(c)
            else:
                self._start_flight_locked(q.take(c._room), c, now, out)
            return
        # Several consumers: take what all of them have room for, then share it.
        msgs = q.take(self._room)
        if not msgs:
            return
        if self.dispatch == "weighted":
            left = self._share_weighted_locked(msgs, now, out)
        elif self.dispatch == "random":
            left = self._share_random_locked(msgs, now, out)
        else:
            left = self._share_round_robin_locked(msgs, now, out)
        if left < len(msgs):           # some had closed: what was theirs goes back
            q.unshift(msgs[left:])

    # The shares below hand out *msgs* and return how many they handed out
    # (fewer only if consumers counted as having room turn out closed).  A
    # consumer's room during a share is its ``_room``; one whose room the
    # share used up leaves the ready set at once, and ``_start_flight_locked``
    # (once per consumer, for its whole share) settles the rest.

    def _share_of_locked(self, shares: Dict[Consumer, List[Message]],
                         c: Consumer) -> Optional[List[Message]]:
        """*c*'s share so far (a new one if none), or None if *c* turned out
        closed: then it leaves the ready set."""
        share = shares.get(c)
        if share is None:
            if c.closed:
                self._refresh_locked(c)
                return None
            share = shares[c] = []
        return share

    def _share_round_robin_locked(self, msgs: List[Message], now: float,
                                  out: Deliveries) -> int:
        # One message each in turn among those with room, in the ring's order.
        ring = self._ready.ring  # type: ignore[attr-defined]
        if len(ring) == 1:             # one has room (a burst of its FINs): no sharing
            c = next(iter(ring))
            if not c.closed:
                self._start_flight_locked(msgs, c, now, out)
                return len(msgs)
        shares: Dict[Consumer, List[Message]] = {}
        to_back = ring.move_to_end
        i, n = 0, len(msgs)
        while i < n and ring:
            c = next(iter(ring))
            share = self._share_of_locked(shares, c)
            if share is None:
                continue
            share.append(msgs[i])
            i += 1
            if len(share) < c._room:
                to_back(c)
            else:
                del ring[c]            # full: out of turn until it has room again
        for c, share in shares.items():
            self._start_flight_locked(share, c, now, out)
        return i

    def _share_random_locked(self, msgs: List[Message], now: float, out: Deliveries) -> int:
        # Each message to a consumer drawn uniformly among those with room.
        pool: _ReadyPool = self._ready  # type: ignore[assignment]
        members = pool.members
        shares: Dict[Consumer, List[Message]] = {}
        draw = _random.randrange
        i, n = 0, len(msgs)
        while i < n and members:
            c = members[draw(len(members))]
            share = self._share_of_locked(shares, c)
            if share is None:
                continue
            share.append(msgs[i])
            i += 1
            if len(share) >= c._room:  # full: no longer drawn
                pool.discard(c)
        for c, share in shares.items():
            self._start_flight_locked(share, c, now, out)
        return i

    def _share_weighted_locked(self, msgs: List[Message], now: float,
                               out: Deliveries) -> int:
        # Each message to the smooth weighted round robin's pick (_ReadyWeighted).
        wrr: _ReadyWeighted = self._ready  # type: ignore[assignment]
        shares: Dict[Consumer, List[Message]] = {}
        i, n = 0, len(msgs)
        while i < n:
            c = wrr.pick()
            if c is None:
                break
            share = self._share_of_locked(shares, c)
            if share is None:
                continue
            share.append(msgs[i])
            i += 1
            if len(share) >= c._room:  # full: neither gains nor pays from now on
                wrr.discard(c)
        for c, share in shares.items():
            self._start_flight_locked(share, c, now, out)
        return i

    def _start_flight_locked(self, msgs: Iterable[Message], c: Consumer, now: float,
                             out: Deliveries) -> None:
        """Put *msgs* in flight with consumer *c*; their deliveries go to *out*."""
        deadline = now + (c.msg_timeout or self.broker.msg_timeout)    # _timeout_for(c)
        last_k, bucket = self._last_bucket
        if last_k != math.ceil(deadline / _DEADLINE_GRAIN):
            bucket = self._bucket_locked(deadline)
        in_flight = self._in_flight
        handed: List[_Delivery] = []
        for m in msgs:
            if m.__class__ is _Delivery:      # ours alone: bound in place
                h = m
                h.attempts += 1
            else:                             # a publisher holds it: copy
                h = _Delivery(m.id, m.body, m.timestamp, m.attempts + 1)
                h._pos = m._pos
            h.consumer = c
            h.deadline = deadline
            h.delivered_at = now
            h._bucket = bucket
            in_flight[h.id] = bucket[h.id] = h
            handed.append(h)
        if handed:
            c.in_flight_count += len(handed)
            c.message_count += len(handed)
            self._refresh_locked(c)
            out.append((c, handed))

    def _wake_by(self, due: float) -> None:
        """Have the broker's timer visit this channel by *due* (monotonic):
        a deadline, a deferral or a retry.  Nothing to do when it will
        already (``_wake_at``, read here without the timer's lock: a stale
        read costs one more heap entry, never a missed visit)."""
        if due < self._wake_at:
            self._env.schedule(due, self)

    def _bucket_locked(self, deadline: float) -> Dict[bytes, _Delivery]:
        k = math.ceil(deadline / _DEADLINE_GRAIN)
        bucket = self._buckets.get(k)
        if bucket is None:
            bucket = self._buckets[k] = {}
            heapq.heappush(self._bucket_heap, k)
            self._wake_by(k * _DEADLINE_GRAIN)
        self._last_bucket = (k, bucket)     # deliveries in a row share one
        return bucket

    def _dispatch_hash_locked(self, now: float, out: Deliveries) -> None:
        # A key always maps to the same live consumer.  If that consumer is
        # full, its messages wait; others' messages behind them may pass
        # (within HASH_LOOKAHEAD), so per-key order is kept.
        if self._ring is None:
            self._ring = _HashRing([c for c in self._consumers if not c.closed])
        queue = self._queue
        queue.fill(self.HASH_LOOKAHEAD)
        q = queue.mem
        i = 0
        while i < len(q) and i < self.HASH_LOOKAHEAD and self._room > 0:
            msg = q[i]
            if msg.__class__ is _Batch:     # removals brought a batch into reach
                queue.fill(i + self.HASH_LOOKAHEAD)
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
            if c.is_ready():
                queue.remove_at(i)
                self._start_flight_locked((msg,), c, now, out)
            else:
                i += 1

    def _hand_over(self, deliveries: Deliveries, dead: Optional[List[Message]] = None) -> None:
        """Run consumer callbacks and dead-lettering, with no lock held."""
        if deliveries:
            _hand_over_all(deliveries)
        if dead:
            self._env.dead_letter(self, dead)

    # -- timers ----------------------------------------------------------------
    def _process_due(self, now: float) -> float:
        """Time out expired in-flight messages and release due deferred ones.

        Returns the channel's next due time (inf if none).
        """
        dead: List[Message] = []
        with self._lock:
            self._settle_finished_locked()     # a finished message never times out
            heap, grain = self._bucket_heap, _DEADLINE_GRAIN
            while heap and heap[0] * grain <= now:
                self._last_bucket = (0, {})     # it may be the bucket now gone
                for msg_id, h in self._buckets.pop(heapq.heappop(heap)).items():
                    del self._in_flight[msg_id]      # (a settled message left its bucket)
                    h.consumer.in_flight_count -= 1
                    self._refresh_locked(h.consumer)
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
            nxt = min(heap[0] * grain if heap else math.inf, dheap[0][0] if dheap else math.inf)
            if self._queue.read_error is not None:      # its log to be read again soon
                nxt = min(nxt, now + _READ_RETRY)
        self._hand_over(deliveries, dead)
        return nxt

    # -- admin -----------------------------------------------------------------
    def pause(self) -> None:
        """Stop delivering (messages are still accepted and queued)."""
        with self._lock:
            self.paused = True
        self._env.metadata_changed(self.topic.name, self.name)

    def unpause(self) -> None:
        """Resume delivering."""
        with self._lock:
            self.paused = False
            deliveries = self._dispatch_locked([])
        self._hand_over(deliveries)
        self._env.metadata_changed(self.topic.name, self.name)

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
        self._clear_flight_locked()
        self._deferred.clear()
        self._deferred_heap.clear()
        for c in self._consumers:
            c.in_flight_count = 0
            self._refresh_locked(c)

    def _clear_flight_locked(self) -> None:
        self._finished.clear()
        self._in_flight.clear()
        self._buckets.clear()
        self._bucket_heap.clear()
        self._last_bucket = (0, {})

    def delete(self) -> None:
        """Delete the channel and its messages; its consumers are closed."""
        self.topic.delete_channel(self.name)

    def _close(self) -> List[Consumer]:
        """Mark deleted, drop messages, return the consumers to notify."""
        with self._lock:
            self.deleted = True
            self._clear_flight_locked()
            self._deferred.clear()
            self._queue.drop_memory()
            self._env.drop_log(self._queue.log)
            consumers, self._consumers = self._consumers, []
            self._ready, self._room = _new_ready_set(self.dispatch), 0
            for c in consumers:
                c.closed = True
                c._room = 0
        return consumers

    def _persist(self) -> None:
        """At a clean broker close: store in-flight and deferred messages, close the log."""
        with self._lock:
            if self._queue.log is None:
                return
            self._settle_finished_locked()
            extra = self._held_records_locked()
            self._clear_flight_locked()
            self._deferred.clear()
            self._queue.persist(extra)
            for c in self._consumers:
                c.in_flight_count = 0
                self._refresh_locked(c)

    def _held_records_locked(self) -> List[Tuple[Message, int]]:
        """In-flight and deferred messages with the due time their record keeps
        (wall-clock ns; 0: deliver at once)."""
        now, now_ns = self._monotonic(), self._env.time_ns()
        out: List[Tuple[Message, int]] = [(h, 0) for h in self._in_flight.values()]
        for due, msg_id in self._deferred_heap:
            m = self._deferred.get(msg_id)
            if m is not None:
                out.append((m, now_ns + max(int((due - now) * 1e9), 1)))
        return out

    def _unpin_locked(self) -> None:
        """Durable mode: rewrite the records of in-flight and deferred messages
        at the log's tail, releasing their old ones.

        An old record not yet acknowledged holds back every later ack (in
        memory) and every later segment (on disk): a message deferred for an
        hour would keep an hour of finished messages.  Rewriting costs one
        record per in-flight or deferred message, done only once at least
        twice as many acks wait, so at most half a write per finish.
        """
        seglog = self._queue.log
        acks = seglog.acks
        acks.pinned = False
        if seglog.superseding:          # the last rewrite is not released yet
            return
        held = len(self._in_flight) + len(self._deferred)
        if acks.behind < 2 * held:      # not worth it yet: ask again later
            acks.unpin_at = 2 * held
            return
        if self._queue.rewrite(self._held_records_locked()):
            acks.unpin_at = _UNPIN_ACKS

    def _dead_lettered(self, msgs: List[Message]) -> None:
        """The dead-letter topic has these: release their records."""
        with self._lock:
            for m in msgs:
                self._queue.done(m)

    def _quantile_buckets_locked(self) -> Optional[Dict[int, int]]:
        q = self._quantiles
        return q.buckets(self._monotonic()) if q is not None else None

    def _quantile_buckets(self) -> Optional[Dict[int, int]]:
        """The e2e quantiles' counts of the window (None: not tracked)."""
        if self._quantiles is None:
            return None
        with self._lock:
            return self._quantile_buckets_locked()

    def stats(self, include_clients: bool = True) -> Dict[str, Any]:
        """nsqd's channel object for /stats (plus minq's dead_count/drop_count)."""
        with self._lock:
            self._settle_finished_locked()
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
                "e2e_processing_latency": _E2EQuantiles.result(
                    self.broker.e2e_percentiles, self._quantile_buckets_locked()),
                "dead_count": self.dead_count,
                "drop_count": self._queue.drop_count,
                "corrupt_count": self._queue.log.corrupt_count if self._queue.log else 0,
                "max_attempts": self.effective_max_attempts,
                "dispatch": self.dispatch,
                "e2e_latency": self._e2e.stats(),
            }




def _not_in_flight(h: Message, code: str) -> NotInFlight:
    return NotInFlight(f"{code} {h.id.decode()} failed: message not in flight "
                       f"(finished, requeued, timed out or emptied)")


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

    # How many held messages move to the channels per chunk of the pump, or
    # how many bytes of them when they move straight from log to log.
    RELEASE_BATCH = 1024
    PUMP_BYTES = 256 * 1024
    INLINE_CHUNKS = 4     # moved at once by a new channel or unpause

    def __init__(self, broker: "Broker", name: str) -> None:
        self.broker = broker                   # for its options (public attributes)
        self._env: _BrokerServices = broker._services
        self.name = name
        self.ephemeral = is_ephemeral(name)
        # _lock guards the fields below.  Order: a topic's lock may be held
        # while taking its channels' locks (in the order of _channels), never
        # the reverse.
        self._lock = threading.Lock()
        self._channels: Dict[str, Channel] = {}
        self._fan: Tuple[Channel, ...] = ()   # its values, in order, for each publish
        self._opening = 0      # channels made but not yet on record: messages wait
        # Messages waiting for a channel (or for unpause), and deferred ones
        # among them as (due wall-clock ns, message).
        self._queue = self._env.new_queue(name, self.ephemeral, self._hold_deferred)
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

    def _channels_changed_locked(self) -> None:
        self._fan = tuple(self._channels.values())

    @property
    def channels(self) -> Dict[str, Channel]:
        """A snapshot of the topic's channels by name."""
        with self._lock:
            return dict(self._channels)

    # -- publishing ------------------------------------------------------------
    def _put(self, msgs: Messages, defer: float) -> Optional[List[Tuple[SegmentLog, int]]]:
        """Accept messages, all or none (OSError: none).

        Returns the (log, position) pairs written, for fsync mode; None if the
        topic was deleted meanwhile (the caller retries on a new topic).
        """
        deliveries: Deliveries = []
        lock = self._lock
        lock.acquire()         # (not "with": measurably cheaper on a per-message path)
        try:
            if self.deleted:
                return None
            q = self._queue
            if (self.paused or self._opening or not self._channels or q.mem
                    or q.log is not None and q.log.unread):
                # Held; behind a backlog the pump is moving, to keep the order.
                written = self._hold_locked(msgs, defer)
            else:
                written = self._fan_out_locked(msgs, defer, deliveries)
            self.message_count += len(msgs)
            self.message_bytes += (_nbytes(msgs.bodies) if msgs.__class__ is _Batch
                                   else len(msgs[0].body) if len(msgs) == 1
                                   else sum(len(m.body) for m in msgs))
        finally:
            lock.release()
        if deliveries:
            _hand_over_all(deliveries)
        return written

    def _hold_locked(self, msgs: Messages, defer: float) -> List[Tuple[SegmentLog, int]]:
        # Deferral of held messages counts from publish (nsqd starts it at hand-off).
        due_ns = self._env.time_ns() + int(defer * 1e9) if defer > 0 else 0
        token = self._queue.prepare(msgs, due_ns)
        self._queue.commit(token)
        if due_ns:
            self._held_deferred.extend((due_ns, m) for m in token[0])
        return _written(self._queue, token)

    def _hold_deferred(self, msg: Message, due_ns: int) -> None:
        self._held_deferred.append((due_ns, msg))

    def _fan_out_locked(self, msgs: Messages, defer: float,
                        out: Deliveries) -> List[Tuple[SegmentLog, int]]:
        """Give every channel its copy: stored everywhere first, then made visible.

        The channels' locks are taken in order and held until all stores
        succeeded, so a failure can undo the stores already made.
        """
        chans = self._fan
        if len(chans) == 1:
            ch = chans[0]
            if ch._queue.log is None:
                ch._put_memory(msgs, defer, out)
                return []
            # Stored before taking the channel's lock, so its consumers are
            # not held up by the write; the topic's lock keeps publishers (and
            # channel deletion) out meanwhile.  OSError: nothing stored.
            token = ch._prepare_locked(msgs, defer) if defer else ch._queue.prepare(msgs)
            lock = ch._lock
            lock.acquire()
            try:
                ch._commit_locked(token, defer, out)
            finally:
                lock.release()
            return _written(ch._queue, token)
        if msgs.__class__ is _Batch:       # each channel makes its own objects
            batches = [msgs] * len(chans)
        else:
            batches = [msgs] + [[_Delivery(m.id, m.body, m.timestamp) for m in msgs]
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

    # -- the pump: held messages to the channels, one bounded chunk at a time --
    def _pump(self) -> bool:
        """Move one chunk of held messages to the channels; return whether more wait.

        Run by the broker's pump thread (nsqd's topic message pump), so that a
        SUB on a topic holding a million messages is answered at once while
        they flow to the channels; the lock is held for one chunk at a time,
        and publishers queue behind the backlog meanwhile, in order.
        Raises OSError if a chunk could not be stored (nothing of it moved).
        """
        deliveries: Deliveries = []
        with self._lock:
            more = self._pump_locked(deliveries)
        _hand_over_all(deliveries)
        return more

    def _start_pump_locked(self, out: Deliveries) -> None:
        # On a new channel or unpause: the first few chunks at once (a small
        # backlog is there when the call returns), the rest in the background.
        try:
            more = True
            for _ in range(self.INLINE_CHUNKS):
                more = self._pump_locked(out)
                if not more:
                    break
        except OSError as e:
            log.error("topic %s: could not hand held messages to its channels: %s",
                      self.name, e)
            self._env.schedule_pump(self, retry=True)
            return
        if more:
            self._env.schedule_pump(self)

    def _pump_locked(self, out: Deliveries) -> bool:
        if (self.deleted or self.paused or self._opening or not self._channels
                or self._env.loading):
            return False
        q = self._queue
        if q.mem and not self._release_whole_batches_locked(out):
            batch = q.take(min(q.mem_count, self.RELEASE_BATCH))
            try:
                self._release_batch_locked(batch, 0.0, out)
            except OSError:
                q.unshift(batch)
                raise
        elif q.log is not None and q.log.unread:
            framed = q.log.peek_framed(self.PUMP_BYTES)
            if framed is not None:
                self._release_framed_locked(*framed, out)
            else:   # a segment's end, a skipped or damaged record: the slow path
                batch = q.take(1)
                if batch:
                    try:
                        self._release_batch_locked(batch, 0.0, out)
                    except OSError:
                        q.unshift(batch)
                        raise
        elif self._held_deferred:
            now_ns = self._env.time_ns()
            chunk = self._held_deferred[:self.RELEASE_BATCH]
            for i, (due_ns, m) in enumerate(chunk):
                try:
                    self._release_batch_locked([m], max(due_ns - now_ns, 0) / 1e9, out)
                except OSError:
                    del self._held_deferred[:i]
                    raise
            del self._held_deferred[:len(chunk)]
        return bool(q.mem or q.log is not None and q.log.unread or self._held_deferred)

    def _release_whole_batches_locked(self, out: Deliveries) -> int:
        """Hand batches held in memory (MPUBs, not cut into messages) to every
        channel as they are, up to 16 x RELEASE_BATCH messages' worth (at least
        one batch): no message object is made for them here, so a new
        consumer of a big backlog reads at full speed from its first second.
        Returns how many messages moved."""
        q, moved = self._queue, 0
        while moved < self.RELEASE_BATCH * 16:
            b = q.take_batch()
            if b is None:
                break
            try:
                self._fan_out_locked(b, 0.0, out)
            except OSError:
                q.unshift_batch(b)
                raise
            moved += len(b)
        return moved

    def _release_batch_locked(self, batch: List[Message], defer: float,
                              out: Deliveries) -> None:
        # Durable: the channels' copies are stored before the topic's records
        # are released, so a crash in between duplicates, never loses.
        if self._queue.durable:
            fresh: List[Message] = [_Delivery(m.id, m.body, m.timestamp) for m in batch]
        else:
            fresh = batch
        written = self._fan_out_locked(fresh, defer, out)
        if self.broker.fsync:
            for seglog, pos in written:
                seglog.sync_to(pos)
        for m in batch:
            self._queue.done(m)

    def _release_framed_locked(self, data: bytes, positions: List[int], end: int,
                               out: Deliveries) -> None:
        """Hand records read from the topic's log to every channel as they are:
        copied unchanged into the logs of channels that have one, decoded once
        for those that live in memory."""
        count = len(positions)
        chans = list(self._channels.values())
        logged = [ch for ch in chans if ch._queue.log is not None]
        appended: List[Tuple[Channel, int]] = []
        locked = logged if len(logged) > 1 else []
        for ch in locked:           # in order; held so a failure can be undone
            ch._lock.acquire()
        try:
            try:
                for ch in logged:
                    appended.append((ch, ch._queue.log.append_framed(data, count)))  # type: ignore[union-attr]
            except BaseException:
                for ch, (start, _) in appended:
                    ch._queue.log.unappend_framed(start, count)  # type: ignore[union-attr]
                raise
        finally:
            for ch in locked:
                ch._lock.release()
        if self.broker.fsync:
            for ch, (_, stop) in appended:
                ch._queue.log.sync_to(stop)  # type: ignore[union-attr]
        self._queue.log.consume_framed(positions, end)  # type: ignore[union-attr]
        for ch in logged:
            with ch._lock:
                ch.message_count += count
                ch._dispatch_locked(out)
        in_memory = [ch for ch in chans if ch._queue.log is None]
        if in_memory:
            now_ns = self._env.time_ns()
            for ch in in_memory:
                for msgs, defer in _decode_framed(data, now_ns):
                    ch._put_memory(msgs, defer, out)

    # -- channels --------------------------------------------------------------
    def channel(self, name: str, **options: Any) -> Channel:
        """Get or create a channel (options as in ``Channel.configure``)."""
        ch = self._channels.get(name)
        if ch is None:
            validate_name(name, "channel")
            with self._lock:
                if self.deleted:
                    raise BrokerClosed(f"topic {self.name} was deleted")
                ch = self._channels.get(name)
                created = ch is None
                if created:
                    ch = Channel(self, name, **options)
                    options = {}
                    self._channels[name] = ch
                    self._channels_changed_locked()
                    # Messages reach it only once it is on record (minq.dat),
                    # or a crash in between would lose what it had taken.
                    self._opening += 1
            if created:
                self._opened(ch)
        if options:
            ch.configure(**options)
        return ch

    def _opened(self, ch: Channel) -> None:
        deliveries: Deliveries = []
        try:
            self._env.announce("create", self.name, ch.name)
            if not ch.ephemeral:
                self._env.metadata_changed(self.name, ch.name)
        finally:
            with self._lock:
                self._opening -= 1
                if not self._opening:
                    self._start_pump_locked(deliveries)
        _hand_over_all(deliveries)

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
            self._channels_changed_locked()
            if ch is None:
                raise ChannelNotFound(f"channel {name!r} of topic {self.name!r} does not exist")
            last = self.ephemeral and not self._channels
        self._finish_channel(ch)
        if last:
            self._env.delete_topic_if_unused(self)

    def _delete_channel_if_unused(self, ch: Channel) -> None:
        """Ephemeral channels vanish with their last consumer."""
        with self._lock:
            if self._channels.get(ch.name) is not ch or ch.client_count:
                return
            del self._channels[ch.name]
            self._channels_changed_locked()
            last = self.ephemeral and not self._channels
        self._finish_channel(ch)
        if last:
            self._env.delete_topic_if_unused(self)

    def _finish_channel(self, ch: Channel) -> None:
        for c in ch._close():
            c._on_channel_closed()
        self._env.announce("delete", self.name, ch.name)
        if not ch.ephemeral:
            self._env.metadata_changed(self.name, ch.name)

    # -- admin -----------------------------------------------------------------
    def pause(self) -> None:
        """Keep messages at the topic; channels get nothing new until unpause."""
        with self._lock:
            self.paused = True
        self._env.metadata_changed(self.name)

    def unpause(self) -> None:
        deliveries: Deliveries = []
        with self._lock:
            self.paused = False
            self._start_pump_locked(deliveries)
        _hand_over_all(deliveries)
        self._env.metadata_changed(self.name)

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
            self._channels_changed_locked()
            self._queue.drop_memory()
            self._held_deferred.clear()
            self._env.drop_log(self._queue.log)
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
        """nsqd's topic object for /stats.

        Taken under the topic's lock, channels included, so a message the
        pump is moving counts once: at the topic or at its channel.
        """
        with self._lock:
            chans = dict(self._channels)
            if channel is not None:
                chans = {k: v for k, v in chans.items() if k == channel}
            top = {
                "topic_name": self.name,
                "depth": len(self._queue) + len(self._held_deferred),
                "backend_depth": self._queue.backlog,
                "message_count": self.message_count,
                "message_bytes": self.message_bytes,
                "paused": self.paused,
                "e2e_processing_latency": None,
                "drop_count": self._queue.drop_count,
                "corrupt_count": self._queue.log.corrupt_count if self._queue.log else 0,
            }
            channels = [chans[k].stats(include_clients) for k in sorted(chans)]
            # As nsqd: the topic's quantiles are those of all its channels merged.
            parts = [ch._quantile_buckets() for ch in self._channels.values()]
            parts = [b for b in parts if b is not None]
            top["e2e_processing_latency"] = _E2EQuantiles.result(
                self.broker.e2e_percentiles, _merge_buckets(parts) if parts else None)
        return {"topic_name": top.pop("topic_name"), "channels": channels, **top}


def _written(q: _MessageQueue, token: Tuple[Any, ...]) -> List[Tuple[SegmentLog, int]]:
    """The (log, position) a prepared put must be fsynced to, if it wrote anything."""
    span = token[3]
    return [(q.log, span[1])] if span else []  # type: ignore[list-item]


def _hand_over_all(deliveries: Deliveries) -> None:
    for c, hs in deliveries:
        try:
            c._deliver_many(hs)
        except Exception:
            log.exception("consumer %s failed to take %d message(s)", c.client_id, len(hs))


# =============================================================================
# Broker
#
# Topics by name, the options, message ids, the one timer thread that fires
# in-flight deadlines and deferrals, stats and an orderly close.
# =============================================================================

_JOURNAL = "minq.journal"
_BATCHED_SYNC = 64       # logs to sync at close beyond which the file system is synced whole


def _default_open_files() -> int:
    """Descriptors segment logs may hold: half the soft RLIMIT_NOFILE (the
    rest is for connections), 4096 where there is no such limit."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 4096
    return 4096 if soft == resource.RLIM_INFINITY else max(16, soft // 2)


def _read_topology(directory: str) -> Dict[str, Tuple[bool, Dict[str, bool]]]:
    """Topics and channels with their pause flags, by name: minq.dat, then
    each change minq.journal records since (a torn last line is ignored)."""
    model: Dict[str, Tuple[bool, Dict[str, bool]]] = {}
    path = os.path.join(directory, "minq.dat")
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read())
            for td in meta.get("topics") or []:
                model[td["name"]] = (bool(td.get("paused")), {
                    cd["name"]: bool(cd.get("paused")) for cd in td.get("channels") or []})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MinqError(f"cannot read {path}: {e}") from e
    path = os.path.join(directory, _JOURNAL)
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        lines = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name, chan, exists = rec["topic"], rec.get("channel"), bool(rec["exists"])
        except (ValueError, KeyError, TypeError) as e:
            if k < len(lines) - 1:
                log.error("%s line %d unreadable (%s): skipped", path, k + 1, e)
            continue
        paused = bool(rec.get("paused"))
        if chan is None:
            if exists:
                model[name] = (paused, model.get(name, (False, {}))[1])
            else:
                model.pop(name, None)
        elif exists:
            model.setdefault(name, (False, {}))[1][chan] = paused
        elif name in model:
            model[name][1].pop(chan, None)
    return model


class _BrokerServices:
    """What topics and channels need from their broker, named, so that their
    arrows point here and not at the broker's insides: the clock, the timer,
    the topic pump, saving the metadata, change notices, dead-lettering and
    making queues.  Each is the broker's own method (see there for locking)."""

    __slots__ = ("_broker", "time_ns", "monotonic", "schedule", "schedule_pump",
                 "metadata_changed", "announce", "new_queue", "drop_log", "dead_letter",
                 "delete_topic_if_unused")

    def __init__(self, broker: "Broker") -> None:
        self._broker = broker
        self.time_ns = broker.clock.time_ns               # wall clock, ns (timestamps, due times)
        self.monotonic = broker.clock.monotonic           # deadlines
        self.schedule = broker._schedule                  # visit a channel by a monotonic time
        self.schedule_pump = broker._schedule_pump        # a topic has held messages to move
        self.metadata_changed = broker._metadata_changed  # minq.dat must be saved
        self.announce = broker._announce                  # a topic or channel came or went
        self.new_queue = broker._new_queue                # a ready queue, with its log if any
        self.drop_log = broker._drop_log                  # a deleted queue's log goes
        self.dead_letter = broker._dead_letter            # messages out of attempts
        self.delete_topic_if_unused = broker._delete_topic_if_unused

    @property
    def loading(self) -> bool:
        """Whether the broker is restoring its state from the data path."""
        return self._broker._loading


class Broker:
    """An in-process NSQ-style broker.  All methods are thread-safe.

    Options are nsqd's flags (durations in seconds): ``mem_queue_size``,
    ``msg_timeout``, ``max_msg_timeout``, ``max_msg_size``, ``max_body_size``,
    ``max_req_timeout``, ``max_rdy_count``, ``data_path``,
    ``max_bytes_per_file``, ``sync_every``, ``sync_timeout``; plus
    ``max_attempts`` (0 = unlimited; beyond it messages go to a dead-letter
    topic), ``durable`` (every message on disk before publish returns),
    ``fsync`` (and fsynced: group commit), ``max_open_files`` (descriptors
    the segment logs may hold at once; default half the soft RLIMIT_NOFILE),
    ``e2e_percentiles`` and ``e2e_window`` (nsqd's end-to-end processing
    latency quantiles, reported in ``stats()``) and ``clock``.  Without ``data_path`` everything is in memory only.
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
                 max_open_files: Optional[int] = None,
                 e2e_percentiles: Sequence[float] = (),
                 e2e_window: float = DEFAULT_E2E_WINDOW,
                 clock: Any = None) -> None:
        _check_range("mem_queue_size", mem_queue_size, 0, None)
        if max_open_files is not None:
            _check_range("max_open_files", max_open_files, 4, None)
        for q in e2e_percentiles:
            if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 1):
                raise InvalidArgument(f"invalid E2E processing latency percentile: {q!r} "
                                      f"(a number in (0, 1])")
        _check_range("e2e_window", e2e_window, 0.001, None)
        _check_range("msg_timeout", msg_timeout, 0.001, None)
        _check_range("max_msg_timeout", max_msg_timeout, msg_timeout, None)
        # A log record carries a body or a batch in a 31-bit length field.
        _check_range("max_msg_size", max_msg_size, 1, _MAX_RECORD - _RECORD_SLACK)
        _check_range("max_body_size", max_body_size, 1, _MAX_RECORD - _RECORD_SLACK)
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
        # Sorted from the highest, as nsqd reports them.
        self.e2e_percentiles: Tuple[float, ...] = tuple(sorted(map(float, e2e_percentiles),
                                                               reverse=True))
        self.e2e_window = float(e2e_window)
        self.data_path = os.path.abspath(data_path) if data_path else None
        self.fsync = bool(fsync)
        self.durable = bool(durable or fsync)
        self.max_bytes_per_file = max_bytes_per_file
        self.sync_every = sync_every
        self.sync_timeout = float(sync_timeout)
        self.clock = clock if clock is not None else SystemClock()
        self._time_ns = self.clock.time_ns
        self._services = _BrokerServices(self)    # what topics and channels may call
        self.start_time = int(time.time())
        # _lock guards _topics and _clients; it may be held while taking a
        # topic's lock, never the reverse.
        self._lock = threading.Lock()
        self._topics: Dict[str, Topic] = {}
        self._clients: List[Any] = []          # in-process consumers to close with us
        self._producers: List[Any] = []        # front-end clients that published (stats)
        # Replaced, never changed in place (under _lock), so _announce reads it lock-free.
        self._watchers: Tuple[Callable[[str, str, Optional[str]], None], ...] = ()
        self._closed = False
        # Message ids: _id_base + a sequence number (next() on a count is
        # atomic under the GIL), as 16 hex digits.
        self._id_base = self.clock.time_ns()
        self._id_lock = threading.Lock()    # guards _id_next: a batch takes a run of ids
        self._id_next = self._id_base
        self._spare_ids: List[bytes] = []   # made a block at a time for single publishes
        self._health = "OK"
        # Storage (data_path only).  _logs_lock guards _logs; _meta_lock
        # serialises writes of the metadata files.  Both are leaf locks.
        # _files bounds the logs holding descriptors.
        self._logs_lock = threading.Lock()
        self._logs: Dict[str, SegmentLog] = {}
        self._files = _OpenFiles(max_open_files or _default_open_files())
        self._listing: Dict[str, List[int]] = {}   # segment files found at open, by log
        self._meta_lock = threading.Lock()         # guards the journal's state below
        self._journal_fd: Optional[int] = None
        self._journal_lines: float = 0
        self._journal_dirty = False                # written, not fsynced
        self._loading = False
        self._lock_fd: Optional[int] = None
        self._sync_wake = threading.Event()
        self._syncer: Optional[threading.Thread] = None
        # _pump_cond guards _pump_queue (topics whose held messages are to be
        # moved to their channels, each once) and _pump_retry (after a
        # failure: (when, topic)); the pump thread waits on it.
        self._pump_cond = threading.Condition(threading.Lock())
        self._pump_queue: Dict[Topic, None] = {}   # in order; a set's lookups (10,000 topics)
        self._pump_retry: List[Tuple[float, Topic]] = []
        if self.data_path:
            self._open_data_path()
        # _timer_cond guards _next_due, _due and the channels' _wake_at.
        # Channels call _schedule while holding their own lock (channel lock
        # -> timer lock); the timer thread never takes a channel lock while
        # holding it.
        self._timer_cond = threading.Condition(threading.Lock())
        self._next_due = math.inf
        # Channels to visit, by due time: (due, sequence, channel); a channel's
        # _wake_at is its earliest entry's (later ones of it are stale).
        self._due: List[Tuple[float, int, Channel]] = []
        self._due_seq = itertools.count()
        if hasattr(self.clock, "add_listener"):
            self.clock.add_listener(self._on_clock_advance)
        self._timer = threading.Thread(target=self._timer_loop, name="minq-timer")
        self._timer.start()
        self._pumper = threading.Thread(target=self._pump_loop, name="minq-pump")
        self._pumper.start()
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
        if created:
            self._announce("create", name, None)
            if not t.ephemeral:
                self._metadata_changed(name)
        return t

    def has_topic(self, name: str) -> bool:
        """Whether topic *name* exists (a dict lookup: a front end asks it
        per request, to tell a publish that may create a topic)."""
        return name in self._topics

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
        self._announce("delete", name, None)
        if not t.ephemeral:
            self._metadata_changed(name)

    def _delete_topic_if_unused(self, t: Topic) -> None:
        with self._lock:
            if self._topics.get(t.name) is not t or t._channels:
                return
            del self._topics[t.name]
        t._close()
        self._announce("delete", t.name, None)

    # -- watching ----------------------------------------------------------------
    def watch(self, callback: Callable[[str, str, Optional[str]], None]) -> None:
        """Call ``callback(action, topic, channel)`` whenever a topic or channel is
        created or deleted (*action* ``"create"`` or ``"delete"``; *channel* None
        for a topic).  Front ends use it to tell nsqlookupd.  The callback runs on
        the thread that made the change, with no lock held, and must not block.
        """
        with self._lock:
            self._watchers += (callback,)

    def unwatch(self, callback: Callable[[str, str, Optional[str]], None]) -> None:
        with self._lock:
            self._watchers = tuple(w for w in self._watchers if w != callback)

    def _announce(self, action: str, topic: str, channel: Optional[str]) -> None:
        for callback in self._watchers:
            try:
                callback(action, topic, channel)
            except Exception:
                log.exception("watcher %r failed on %s %s/%s", callback, action, topic, channel)

    # -- publishing ------------------------------------------------------------
    def _checked_body(self, body: Any) -> bytes:
        if not isinstance(body, bytes):
            if isinstance(body, str):
                body = body.encode()           # UTF-8, as the Client does
            elif isinstance(body, (bytearray, memoryview)):
                body = bytes(body)
            else:
                raise InvalidMessage(f"message body must be bytes or str, "
                                     f"not {type(body).__name__}")
        n = len(body)
        if n == 0 or n > self.max_msg_size:
            raise InvalidMessage(f"invalid message body size {n}: must be 1-"
                                 f"{self.max_msg_size} bytes" if n == 0 else
                                 f"message too big {n} > {self.max_msg_size}")
        return body

    def _reserve_ids(self, n: int) -> int:
        """The first of *n* new message id numbers, in a row."""
        with self._id_lock:
            first = self._id_next
            self._id_next = first + n
        return first

    def _next_ids(self, n: int) -> List[bytes]:
        """*n* new message ids (16 hex digits each)."""
        return _format_ids(self._reserve_ids(n), n)

    def _refill_ids(self) -> bytes:
        # Formatting ids a block at a time costs a fifth of one by one.  Two
        # threads may refill at once: each takes its own ids, some go unused.
        ids = self._next_ids(256)
        ids.reverse()                      # pop() hands them out in order
        msg_id = ids.pop()
        self._spare_ids = ids
        return msg_id

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
        if type(body) is not bytes or not 0 < len(body) <= self.max_msg_size:
            body = self._checked_body(body)
        try:
            msg_id = self._spare_ids.pop()
        except IndexError:
            msg_id = self._refill_ids()
        msg = Message(msg_id, body, self._time_ns())
        t = self._topics.get(topic)
        if t is None or self._closed or not self._put_into(t, [msg], defer):
            self._put(topic, [msg], defer)     # (an existing topic: put to directly)
        return msg

    def publish_many(self, topic: str, bodies: Iterable[bytes],
                     defer: float = 0.0) -> List[Message]:
        """Publish several messages atomically: all are accepted or none (MPUB)."""
        return self._publish_batch(topic, bodies, defer, Message)

    def publish_bodies(self, topic: str, bodies: Iterable[bytes], defer: float = 0.0) -> int:
        """As ``publish_many``, but return only how many were published.

        The broker keeps the messages to itself: it makes no message objects
        for those that go straight to disk, and delivers the others without
        a copy.  What a front end relaying bytes wants.
        """
        return len(self._publish_batch(topic, bodies, defer, _Batch))

    def _publish_batch(self, topic: str, bodies: Iterable[bytes], defer: float,
                       kind: Callable[..., Any],
                       unsynced: Optional[List[Tuple[SegmentLog, int]]] = None) -> Messages:
        defer = self._check_defer(defer)
        if bodies.__class__ in _PACKED_BODIES and kind is _Batch:   # checked as cut
            if bodies.__class__ is _BodyRun and not 0 < bodies.size <= self.max_msg_size:  # type: ignore[attr-defined]
                bodies = [self._checked_body(b) for b in bodies]
        else:
            bodies = list(bodies)
            if not (bodies and set(map(type, bodies)) == {bytes} and 0 < min(map(len, bodies))
                    and max(map(len, bodies)) <= self.max_msg_size):
                bodies = [self._checked_body(b) for b in bodies]
        if not len(bodies):  # type: ignore[arg-type]
            raise InvalidMessage("publish_many needs at least one message")
        total = _nbytes(bodies)
        if total > self.max_body_size:
            raise InvalidMessage(f"batch too big {total} > {self.max_body_size}")
        now = self._time_ns()
        if kind is _Batch:
            msgs: Messages = _Batch(self._reserve_ids(len(bodies)), bodies, now)  # type: ignore[arg-type]
        else:
            msgs = [kind(i, b, now) for i, b in zip(self._next_ids(len(bodies)), bodies)]
        self._put(topic, msgs, defer, unsynced)
        return msgs

    def _put(self, topic: str, msgs: Messages, defer: float,
             unsynced: Optional[List[Tuple[SegmentLog, int]]] = None) -> None:
        for _ in range(_PUT_RETRIES):  # a topic deleted under our feet is recreated
            if self._closed:
                raise BrokerClosed("the broker is closed")
            try:
                t = self._topics.get(topic) or self.topic(topic)
            except OSError as e:
                raise self._put_failed(topic, len(msgs), e) from e
            if self._put_into(t, msgs, defer, unsynced):
                return
        raise PublishFailed(f"topic {topic!r} kept being deleted during publish")

    def _put_into(self, t: Topic, msgs: Messages, defer: float,
                  unsynced: Optional[List[Tuple[SegmentLog, int]]] = None) -> bool:
        """Put to topic *t* (and, in fsync mode, wait for the fsync, or list
        in *unsynced* the (log, position) pairs to wait for); False if it was
        deleted meanwhile.  PublishFailed if storing failed: health says so
        until a put succeeds."""
        try:
            written = t._put(msgs, defer)
            if written and self.fsync:
                if unsynced is not None:
                    unsynced.extend(written)
                else:
                    for seglog, pos in written:
                        seglog.sync_to(pos)
        except OSError as e:
            raise self._put_failed(t.name, len(msgs), e) from e
        if self._health != "OK" and written is not None:
            self._health = "OK"
            log.warning("storage writes succeed again")
        return written is not None

    def _put_failed(self, topic: str, count: int, e: OSError) -> PublishFailed:
        self._health = f"NOK - {e}"
        log.error("publish of %d message(s) to %s failed: %s", count, topic, e)
        return PublishFailed(f"publish to topic {topic!r} failed: {e}")

    def _publish_unsynced(self, topic: str, bodies: List[bytes], defer: float,
                          unsynced: List[Tuple[SegmentLog, int]]) -> List[Message]:
        """Publish as ``publish_many`` (one body: as ``publish``) without
        waiting for fsync mode's fsync: *unsynced* gets the (log, position)
        pairs to pass to ``_sync_written`` before telling the publisher."""
        if len(bodies) == 1:
            defer = self._check_defer(defer) if defer else 0.0
            msgs = [Message(self._next_ids(1)[0], self._checked_body(bodies[0]), self._time_ns())]
            self._put(topic, msgs, defer, unsynced)
            return msgs
        msgs = self._publish_batch(topic, bodies, defer, Message, unsynced)
        return msgs  # type: ignore[return-value]

    def _sync_written(self, topic: str, written: List[Tuple[SegmentLog, int]]) -> None:
        """Wait for the fsync of what ``_publish_unsynced`` wrote (PublishFailed if it failed)."""
        try:
            for seglog, pos in written:
                seglog.sync_to(pos)
        except OSError as e:
            raise self._put_failed(topic, len(written), e) from e

    # -- consuming -------------------------------------------------------------
    def consumer(self, topic: str, channel: str, max_in_flight: int = 1, *,
                 msg_timeout: Optional[float] = None, weight: int = 1) -> "PullConsumer":
        """A pull-style consumer of *topic*/*channel* (created if needed, as SUB)."""
        return PullConsumer(self, topic, channel, max_in_flight,
                            msg_timeout=msg_timeout, weight=weight)

    def subscribe(self, topic: str, channel: str, handler: Callable[[Message], Any],
                  max_in_flight: int = 32, workers: int = 4, *,
                  msg_timeout: Optional[float] = None, weight: int = 1,
                  backoff: float = 1.0, max_backoff: float = 60.0,
                  middleware: Iterable[Any] = ()) -> "Subscription":
        """Run *handler* on every message of *topic*/*channel* in *workers* threads.

        A handler that returns finishes the message; one that raises requeues
        it after ``backoff * 2**(attempts-1)`` seconds (at most *max_backoff*).
        *middleware*: layers ``layer(message, next)`` around the handler, the
        first listed outermost (see ``log_timing``, ``dedup``, ...).
        """
        return Subscription(self, topic, channel, handler, max_in_flight, workers,
                            msg_timeout=msg_timeout, weight=weight,
                            backoff=backoff, max_backoff=max_backoff, middleware=middleware)

    def _register_client(self, client: Any) -> None:
        with self._lock:
            self._check_open()
            self._clients.append(client)

    def _unregister_client(self, client: Any) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def add_producer(self, producer: Any) -> None:
        """List a front end's publishing client (anything with ``client_stats()``) in stats."""
        with self._lock:
            if producer not in self._producers:
                self._producers.append(producer)

    def remove_producer(self, producer: Any) -> None:
        with self._lock:
            if producer in self._producers:
                self._producers.remove(producer)

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
            now = self._time_ns()
            dl: List[Message] = [_Delivery(i, m.body, now)
                                 for i, m in zip(self._next_ids(len(msgs)), msgs)]
            self._put(name, dl, 0.0)
        except MinqError:
            log.exception("could not dead-letter %d message(s) of %s/%s", len(msgs),
                          ch.topic.name, ch.name)
            return
        ch._dead_lettered(msgs)

    # -- timers ----------------------------------------------------------------
    def _schedule(self, due: float, channel: Channel) -> None:
        """Make sure the timer thread visits *channel* by *due* (monotonic seconds)."""
        with self._timer_cond:
            if due < channel._wake_at:
                channel._wake_at = due
                heapq.heappush(self._due, (due, next(self._due_seq), channel))
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
        """Visit the channels whose time came, and only those: a pass costs
        what is due, not the number of channels (10,000 topics)."""
        now = self.clock.monotonic()
        due: List[Channel] = []
        with self._timer_cond:
            heap = self._due
            while heap and heap[0][0] <= now:
                ch = heapq.heappop(heap)[2]
                if ch._wake_at <= now:        # (else a later entry of it is stale)
                    ch._wake_at = math.inf
                    due.append(ch)
        for ch in due:
            if not ch.deleted:
                nxt = ch._process_due(now)
                if nxt < math.inf:
                    self._schedule(nxt, ch)
        with self._timer_cond:
            if heap and heap[0][0] < self._next_due:
                self._next_due = heap[0][0]

    def _schedule_pump(self, topic: Topic, retry: bool = False) -> None:
        """Have the pump thread move *topic*'s held messages (after a second
        when *retry*: the last chunk could not be stored)."""
        with self._pump_cond:
            if retry:
                self._pump_retry.append((time.monotonic() + _PUMP_RETRY, topic))
            else:
                self._pump_queue.setdefault(topic)
            self._pump_cond.notify()

    def _pump_loop(self) -> None:
        # Topics take turns, one chunk each (a topic is out of the queue while
        # its chunk moves, so a request made meanwhile is never lost).
        cond = self._pump_cond
        while True:
            with cond:
                while not self._closed:
                    now = time.monotonic()
                    for due, t in [r for r in self._pump_retry if r[0] <= now]:
                        self._pump_retry.remove((due, t))
                        self._pump_queue.setdefault(t)
                    if self._pump_queue:
                        break
                    cond.wait(min((r[0] for r in self._pump_retry), default=now + 60) - now)
                if self._closed:
                    return
                topic = next(iter(self._pump_queue))
                del self._pump_queue[topic]
            try:
                more = topic._pump()
            except OSError as e:
                log.error("topic %s: could not hand held messages to its channels "
                          "(retrying in %gs): %s", topic.name, _PUMP_RETRY, e)
                self._schedule_pump(topic, retry=True)
                continue
            except Exception:       # never let the pump die: backlogs would stop
                log.exception("topic %s: moving held messages failed", topic.name)
                self._schedule_pump(topic, retry=True)
                continue
            if more:
                self._schedule_pump(topic)

    def _on_clock_advance(self) -> None:
        if not self._closed:
            self._process_due()
            if self._syncer is not None:
                self._sync_wake.set()        # a sync may have fallen due

    # -- storage ---------------------------------------------------------------
    def _open_data_path(self) -> None:
        if fcntl is None or not hasattr(os, "pread"):
            raise InvalidArgument(f"data_path {self.data_path!r}: storing messages needs a "
                                  f"POSIX system (Linux, macOS, BSD); on {sys.platform} run "
                                  f"memory only (data_path=None, serve --data-path '')")
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
        """Recreate topics and channels (and their pause flags) from minq.dat
        and the changes minq.journal records since, after one listing of the
        data folder (every log's segment files, found at once)."""
        self._listing = _list_segments(self.data_path)
        model = _read_topology(self.data_path)
        self._loading = True
        # Thousands of topics make tens of thousands of objects, none of them
        # garbage: with the collector on, each full collection would walk all
        # made so far (restart time grows with the square of the topics).
        collecting = gc.isenabled()
        gc.disable()
        try:
            for name, (paused, chans) in model.items():
                try:
                    t = self.topic(name)
                    for cn, cpaused in chans.items():
                        t.channel(cn).paused = cpaused
                    t.paused = paused
                except MinqError as e:
                    log.error("skipping topic %s of %s: %s", name, self.data_path, e)
        finally:
            self._loading = False
            self._listing = {}
            if collecting:
                gc.enable()
        if os.path.exists(os.path.join(self.data_path, _JOURNAL)):
            self._save_metadata()           # the journal folded in: a short one to come
        for t in list(self._topics.values()):
            self._schedule_pump(t)       # held messages move once the pump runs

    def _new_queue(self, name: str, ephemeral: bool,
                   on_deferred: Callable[[Message, int], None]) -> _MessageQueue:
        seglog = None
        if self.data_path and not ephemeral:
            # A name not in the listing made at open has no files: those of
            # a deleted log are deleted with it, and no one else writes here.
            seglog = SegmentLog(self.data_path, name, ack_mode=self.durable,
                                clock=self.clock.monotonic, sync_every=self.sync_every,
                                on_sync_due=self._sync_wake.set,
                                max_bytes_per_file=self.max_bytes_per_file,
                                max_record_size=max(self.max_msg_size, self.max_body_size)
                                + _RECORD_SLACK,
                                segments=self._listing.pop(name, []), files=self._files)
            with self._logs_lock:
                self._logs[name] = seglog
        return _MessageQueue(seglog, self.mem_queue_size, self.durable, ephemeral,
                             on_deferred, self._time_ns)

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
        # nsqd's sync policy: every sync_timeout (on the broker's clock: a
        # FakeClock's advance wakes this loop), or after sync_every operations.
        clock = self.clock
        due = clock.monotonic() + self.sync_timeout
        while not self._closed:
            self._sync_wake.wait(min(max(due - clock.monotonic(), 0.0), self.sync_timeout))
            self._sync_wake.clear()
            now = clock.monotonic()
            every = now >= due
            if every:
                due = now + self.sync_timeout
                self._sync_journal()
            self._sync_logs(every)

    def _sync_logs(self, every: bool = True) -> None:
        """Sync the logs asked for by sync_every, or (*every*) all that need it."""
        with self._logs_lock:
            logs = list(self._logs.values())
        now = self.clock.monotonic()
        for seglog in logs:
            if seglog.needs_sync and (every or seglog.sync_requested):
                try:
                    # The data at every sync; the metadata (three more
                    # fsyncs) at most twice per sync_timeout.
                    seglog.sync(now - seglog.meta_saved_at >= self.sync_timeout / 2)
                except (OSError, ValueError) as e:
                    log.error("sync of %s failed: %s", seglog.name, e)

    def _metadata_changed(self, topic: str, channel: Optional[str] = None) -> None:
        """A topic or channel was created, deleted, paused or unpaused: append
        its state as it is now to minq.journal (to the OS at once: a killed
        process keeps it; fsynced at once in fsync mode, else by the next
        sync).  A change costs one short write however many topics exist;
        the journal is folded into minq.dat once it outgrows them."""
        if not self.data_path or self._loading or self._lock_fd is None:
            return
        t = self._topics.get(topic)            # read without a lock: the state
        ch = None                              # now is what is recorded
        if channel is None:
            rec: Dict[str, Any] = {"topic": topic}
            if t is not None:
                if t.ephemeral:
                    return
                rec["paused"] = t.paused
        else:
            rec = {"topic": topic, "channel": channel}
            ch = t._channels.get(channel) if t is not None else None
            if ch is not None:
                if ch.ephemeral:
                    return
                rec["paused"] = ch.paused
        rec["exists"] = (t if channel is None else ch) is not None
        line = json.dumps(rec).encode() + b"\n"
        with self._meta_lock:
            try:
                if self._journal_fd is None:
                    self._journal_fd = os.open(os.path.join(self.data_path, _JOURNAL),
                                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.write(self._journal_fd, line)
                self._journal_lines += 1
                self._journal_dirty = True
                if self.fsync:
                    os.fsync(self._journal_fd)
                    self._journal_dirty = False
            except OSError as e:
                log.error("could not record %s in %s (saved with the next change): %s",
                          f"{topic}/{channel}" if channel else topic, _JOURNAL, e)
                self._journal_lines = math.inf    # the next change saves minq.dat
            if self._journal_lines > max(1024, 2 * len(self._topics)):
                self._save_metadata_locked()

    def _save_metadata(self) -> None:
        """Save every topic and channel (and pause flags) to minq.dat and
        empty the journal (nsqd saves nsqd.dat so, at each change)."""
        if self.data_path and self._lock_fd is not None:
            with self._meta_lock:
                self._save_metadata_locked()

    def _save_metadata_locked(self) -> None:
        # State read without locks (dict copies are atomic): _meta_lock stays
        # a leaf.  A change racing with this save is journaled after it.
        topics = []
        for name, t in sorted(dict(self._topics).items()):
            if t.ephemeral:
                continue
            chans = [{"name": cn, "paused": ch.paused}
                     for cn, ch in sorted(dict(t._channels).items()) if not ch.ephemeral]
            topics.append({"name": name, "paused": t.paused, "channels": chans})
        data = json.dumps({"topics": topics, "version": NSQ_VERSION}).encode()
        try:
            _write_atomic(os.path.join(self.data_path, "minq.dat"), data)  # type: ignore[arg-type]
            if self._journal_fd is not None:
                os.ftruncate(self._journal_fd, 0)
            self._journal_lines = 0
            self._journal_dirty = False
        except OSError as e:
            log.error("could not save minq.dat: %s", e)

    def _sync_journal(self) -> None:
        # The sync loop's: changes journaled since the last one reach the disk
        # (and a change the journal could not take is saved in minq.dat).
        with self._meta_lock:
            if self._journal_lines == math.inf:
                self._save_metadata_locked()
            if self._journal_dirty and self._journal_fd is not None:
                try:
                    os.fsync(self._journal_fd)
                    self._journal_dirty = False
                except OSError as e:
                    log.error("fsync of %s failed: %s", _JOURNAL, e)

    def _release_data_path(self) -> None:
        with self._logs_lock:
            logs, self._logs = list(self._logs.values()), {}
        # Many logs to sync (thousands of topics, each with a message): the
        # file system is synced once before their metadata is written (the
        # data) and once after, instead of three fsyncs a log, each a journal
        # commit (30,000 logs: 54 s).  os.sync is the standard library's only
        # sync of a whole file system; it covers other files too.
        batched = sum(1 for lg in logs if lg.needs_sync or lg.superseding) > _BATCHED_SYNC
        if batched:
            os.sync()
        for seglog in logs:
            try:
                seglog.close(batched=batched)
            except OSError as e:
                log.error("closing %s failed: %s", seglog.name, e)
        if batched:
            os.sync()
        with self._meta_lock:
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
            if not self._journal_lines:       # all in minq.dat
                try:
                    os.unlink(os.path.join(self.data_path, _JOURNAL))  # type: ignore[arg-type]
                except OSError:
                    pass
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
            "producers": ([p.client_stats() for p in self._producers]
                          if include_clients and self._producers else None),
            "storage": self.storage_stats() if self.data_path else None,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def health(self) -> str:
        """``OK``, or ``NOK - <last storage error>`` until writes succeed again."""
        return self._health

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
        with self._pump_cond:
            self._pump_cond.notify_all()
        self._pumper.join()
        if self._syncer is not None:
            self._sync_wake.set()
            self._syncer.join()
        if hasattr(self.clock, "remove_listener"):
            self.clock.remove_listener(self._on_clock_advance)
        if self.data_path:
            for t in self.topics.values():
                t._persist()
            self._save_metadata()
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
# worker threads runs a handler per message, through middleware layers.
# Both are core Consumers whose delivery callback only appends to a local
# buffer.
# =============================================================================

class _LocalConsumer(Consumer):
    """What the in-process consumers (threaded and async) share: joining a
    channel of their broker, changing RDY, and leaving it."""

    broker: Broker

    def _join(self, broker: Broker, topic: str, channel: str, closer: Any) -> None:
        """Subscribe to *topic*/*channel*; ``broker.close()`` will call ``closer.close()``."""
        self.broker = broker
        broker._register_client(closer)
        try:
            broker.topic(topic).channel(channel).add_consumer(self)
        except BaseException:
            broker._unregister_client(closer)
            raise

    def set_max_in_flight(self, n: int) -> None:
        """Change the RDY window (0 pauses delivery to this consumer)."""
        _check_range("max_in_flight", n, 0, self.broker.max_rdy_count)
        if self.channel is not None:
            self.channel.set_ready(self, n)

    def _leave(self, closer: Any) -> None:
        """Detach from the channel (in-flight messages are requeued); stop consuming."""
        ch = self.channel
        if ch is not None:
            ch.remove_consumer(self)
        self._on_channel_closed()
        self.broker._unregister_client(closer)


class PullConsumer(_LocalConsumer):
    """Pull-style consumer: ``get(timeout)`` returns a Message or None.

    Holds at most ``max_in_flight`` messages (delivered but not yet settled).
    Use as a context manager or call ``close()``: anything still in flight is
    requeued at once.  Iterating yields messages until the consumer closes.
    """

    def __init__(self, broker: Broker, topic: str, channel: str, max_in_flight: int = 1, *,
                 msg_timeout: Optional[float] = None, weight: int = 1) -> None:
        broker._check_consumer_options(max_in_flight, msg_timeout, weight)
        super().__init__(max_in_flight, msg_timeout, weight)
        # Delivered messages not yet taken by get(); a C queue, so delivery
        # (on the publisher's thread) is cheap.  None is a wake-up sentinel.
        self._buffer: "queue.SimpleQueue[Optional[_Delivery]]" = queue.SimpleQueue()
        self._stopping = False   # set by Subscription.close: get() returns None
        self._join(broker, topic, channel, self)

    def _deliver(self, msg: _Delivery) -> None:
        self._buffer.put(msg)

    def _deliver_many(self, msgs: List[_Delivery]) -> None:
        put = self._buffer.put
        for msg in msgs:
            put(msg)

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
            ch = self.channel
            if ch is not None and ch._finished and buf.empty():
                ch.settle()        # about to wait: the freed slots first
            try:
                h = _wait_get(buf, deadline)
            except queue.Empty:
                return None
            if h is None:          # woken to stop: pass the wake-up on
                buf.put(None)
                return None
            ch = self.channel
            # Skip messages that timed out while they sat in the buffer.
            if ch is not None and ch.holds(h):
                return h
        return None

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.get()
            if msg is None:
                return
            yield msg

    def close(self) -> None:
        """Detach from the channel; messages still in flight are requeued."""
        self._leave(self)

    def __enter__(self) -> "PullConsumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- middleware: layers around a subscription's handler --------------------------
# A layer is ``layer(message, next)``: it runs code before and after calling
# ``next(message)`` (the next layer, the handler last), or settles the message
# itself and does not call it, or raises.  The first listed is the outermost.
# Around an async handler a layer is ``async layer(message, next)`` awaiting
# ``next(message)``; the built-in layers carry that form as ``layer.aio``.

Handler = Callable[[Message], Any]
Layer = Callable[[Message, Handler], Any]


def _chain(handler: Handler, middleware: Iterable[Layer]) -> Handler:
    call = handler
    for layer in reversed(list(middleware)):
        call = functools.partial(_through, layer, call)
    return call


def _through(layer: Layer, inner: Handler, msg: Message) -> Any:
    return layer(msg, inner)


def log_timing(logger: Optional[logging.Logger] = None, level: int = logging.INFO) -> Layer:
    """A layer that logs how long each message took, and failures with their error."""
    out = logger or log

    def took(msg: Message, start: float, error: Optional[Exception] = None) -> None:
        ms = (time.perf_counter() - start) * 1000
        if error is None:
            out.log(level, "message %s handled in %.1f ms", msg.id.decode(), ms)
        else:
            out.log(level, "message %s failed after %.1f ms (attempt %d): %s", msg.id.decode(),
                    ms, msg.attempts, error)

    def layer(msg: Message, nxt: Handler) -> Any:
        start = time.perf_counter()
        try:
            result = nxt(msg)
        except Exception as e:
            took(msg, start, e)
            raise
        took(msg, start)
        return result

    async def async_layer(msg: Message, nxt: Callable[[Message], Any]) -> Any:
        start = time.perf_counter()
        try:
            result = await nxt(msg)
        except Exception as e:
            took(msg, start, e)
            raise
        took(msg, start)
        return result
    return _with_aio(layer, async_layer)


def dedup(window: int = 10_000, key: Optional[Callable[[Message], Any]] = None) -> Layer:
    """A layer that finishes, unhandled, a message whose key (its id, or
    ``key(message)``) was handled among the last *window* keys: at-least-once
    delivery made at-most-once within that window, in bounded memory."""
    _check_range("window", window, 1, None)
    seen: "collections.OrderedDict[Any, None]" = collections.OrderedDict()
    lock = threading.Lock()

    def layer(msg: Message, nxt: Handler) -> Any:
        k, dup = seen_before(msg)
        if dup:
            return None
        result = nxt(msg)              # a failure is not remembered: it will be retried
        remember(k)
        return result

    def seen_before(msg: Message) -> Tuple[Any, bool]:
        k = key(msg) if key is not None else msg.id
        with lock:
            if k in seen:
                seen.move_to_end(k)
                log.debug("message %s: a duplicate of %r; finished unhandled",
                          msg.id.decode(), k)
                return k, True
        return k, False

    def remember(k: Any) -> None:
        with lock:
            seen[k] = None
            if len(seen) > window:
                seen.popitem(last=False)

    async def async_layer(msg: Message, nxt: Callable[[Message], Any]) -> Any:
        k, dup = seen_before(msg)
        if dup:
            return None
        result = await nxt(msg)
        remember(k)
        return result
    return _with_aio(layer, async_layer)


def keep_touching(interval: float) -> Layer:
    """A layer that TOUCHes a message every *interval* seconds while its handler
    runs, so a long job does not time out (up to the server's max_msg_timeout)."""
    _check_range("interval", interval, 0.001, None)

    def layer(msg: Message, nxt: Handler) -> Any:
        done = threading.Event()

        def touch() -> None:
            while not done.wait(interval):
                try:
                    msg.touch()
                except (NotInFlight, ConnectionLost):
                    return
        toucher = threading.Thread(target=touch, name="minq-touch")
        toucher.start()
        try:
            return nxt(msg)
        finally:
            done.set()
            toucher.join()

    async def async_layer(msg: Message, nxt: Callable[[Message], Any]) -> Any:
        async def touch() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    msg.touch()
                except (NotInFlight, ConnectionLost):
                    return
        toucher = asyncio.ensure_future(touch())
        try:
            return await nxt(msg)
        finally:
            toucher.cancel()
            await asyncio.gather(toucher, return_exceptions=True)
    return _with_aio(layer, async_layer)


def requeue_on(*exceptions: type, delay: float = 0.0) -> Layer:
    """A layer that turns the given exceptions into a requeue after *delay*
    seconds: no error logged, no backoff (a known, temporary condition)."""
    _check_range("delay", delay, 0, None)
    kinds = exceptions or (Exception,)

    def layer(msg: Message, nxt: Handler) -> Any:
        try:
            return nxt(msg)
        except kinds as e:
            log.info("message %s: %s; requeued in %gs", msg.id.decode(), e, delay)
            msg.requeue(delay)
            return None

    async def async_layer(msg: Message, nxt: Callable[[Message], Any]) -> Any:
        try:
            return await nxt(msg)
        except kinds as e:
            log.info("message %s: %s; requeued in %gs", msg.id.decode(), e, delay)
            msg.requeue(delay)
            return None
    return _with_aio(layer, async_layer)


def _with_aio(layer: Layer, async_layer: Callable[..., Any]) -> Layer:
    """A built-in layer, with its form for async handlers as ``layer.aio``."""
    layer.aio = async_layer  # type: ignore[attr-defined]
    return layer


class _HandlerPool:
    """Worker threads that run a handler on each message ``self.get()`` returns.

    Shared by Subscription (in-process) and RemoteSubscription (TCP): a handler
    that returns finishes the message; one that raises requeues it after
    ``backoff * 2**(attempts-1)`` seconds, at most *max_backoff*.
    """

    handler: Callable[[Message], Any]
    get: Callable[..., Optional[Message]]

    def _init_pool(self, handler: Callable[[Message], Any], workers: int,
                   backoff: float, max_backoff: float, middleware: Iterable[Layer] = ()) -> None:
        _check_range("workers", workers, 1, 1024)
        _check_range("backoff", backoff, 0, None)
        _check_range("max_backoff", max_backoff, 0, None)
        self.handler = _chain(handler, middleware)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._workers = [threading.Thread(target=self._work, name=f"minq-handler-{i}")
                         for i in range(workers)]

    def _start_workers(self) -> None:
        for w in self._workers:
            w.start()

    def _join_workers(self) -> None:
        for w in self._workers:
            if w is not threading.current_thread() and w.ident is not None:
                w.join()

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
            _handler_failed(msg, self.backoff, self.max_backoff)
        else:
            self._settle_quietly(msg, "finish", 0.0)

    @staticmethod
    def _settle_quietly(msg: Message, action: str, delay: float) -> None:
        try:
            if action == "finish":
                msg.finish()
            else:
                msg.requeue(delay)
        except (NotInFlight, ConnectionLost):
            pass  # settled by the handler itself, timed out, or its connection is gone


def _handler_failed(msg: Message, backoff: float, max_backoff: float) -> None:
    """In a handler's ``except``: log, and requeue after ``backoff * 2**(attempts-1)``
    seconds, at most *max_backoff* (threaded and async subscriptions alike)."""
    delay = min(backoff * 2 ** (msg.attempts - 1), max_backoff)
    log.exception("handler failed on message %s (attempt %d); requeue in %.3gs",
                  msg.id.decode(), msg.attempts, delay)
    _HandlerPool._settle_quietly(msg, "requeue", delay)


class Subscription(_HandlerPool, PullConsumer):
    """Push-style consumer: worker threads call ``handler(message)``.

    Returning finishes the message; raising logs the exception and requeues
    it with exponential backoff.  ``close()`` stops delivery, lets running
    handlers finish, joins the workers and requeues what was not handled.
    """

    def __init__(self, broker: Broker, topic: str, channel: str,
                 handler: Callable[[Message], Any], max_in_flight: int = 32,
                 workers: int = 4, *, msg_timeout: Optional[float] = None, weight: int = 1,
                 backoff: float = 1.0, max_backoff: float = 60.0,
                 middleware: Iterable[Layer] = ()) -> None:
        self._init_pool(handler, workers, backoff, max_backoff, middleware)
        super().__init__(broker, topic, channel, max_in_flight,
                         msg_timeout=msg_timeout, weight=weight)
        self._start_workers()

    def close(self) -> None:
        """Stop delivering, let running handlers end, join workers, requeue the rest."""
        ch = self.channel
        if ch is not None:
            ch.set_ready(self, 0)
        self._stopping = True
        self._buffer.put(None)
        self._join_workers()
        super().close()


# =============================================================================
# TCP client
#
# The wire both ends share (frames, the connection stream with its TLS,
# deflate and snappy layers), then ``Client``: the Broker's API over NSQ's
# TCP protocol, against minq or any nsqd, with remote consumers and
# subscriptions; and ``HTTPForwarder`` (``to-http``), a consumer that hands
# each message to HTTP services.
# =============================================================================

# -- snappy: NSQ's other compression, in Python (framing format, CRC-32C) ----------

_CRC32C_TABLES: List[List[int]] = []


def _crc32c_tables() -> List[List[int]]:
    if not _CRC32C_TABLES:
        first = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            first.append(c)
        tables = [first]
        for _ in range(7):            # slicing by 8: a table per byte position
            prev = tables[-1]
            tables.append([(p >> 8) ^ first[p & 0xFF] for p in prev])
        _CRC32C_TABLES[:] = tables
    return _CRC32C_TABLES


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as snappy's framing format checksums its chunks."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _crc32c_tables()
    crc ^= 0xFFFFFFFF
    n = len(data) & ~7
    for a, b in struct.iter_unpack("<II", memoryview(data)[:n]):
        a ^= crc
        crc = (t7[a & 0xFF] ^ t6[(a >> 8) & 0xFF] ^ t5[(a >> 16) & 0xFF] ^ t4[a >> 24]
               ^ t3[b & 0xFF] ^ t2[(b >> 8) & 0xFF] ^ t1[(b >> 16) & 0xFF] ^ t0[b >> 24])
    for byte in data[n:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class SnappyError(MinqError, ValueError):
    """Snappy input that does not decode (a bad chunk, checksum or copy)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _literal(out: bytearray, data: bytes, start: int, end: int) -> None:
    n = end - start - 1
    if n < 0:
        return
    if n < 60:
        out.append(n << 2)
    elif n < 0x100:
        out += bytes((60 << 2, n))
    elif n < 0x10000:
        out.append(61 << 2)
        out += n.to_bytes(2, "little")
    else:
        out.append(62 << 2)
        out += n.to_bytes(3, "little")
    out += data[start:end]


def _copy(out: bytearray, offset: int, length: int) -> None:
    while length > 0:                  # copies of at most 64 bytes, never under 4 left
        n = 64 if length >= 68 else 60 if length > 64 else length
        out.append(((n - 1) << 2) | 2)
        out += offset.to_bytes(2, "little")
        length -= n


def snappy_compress_block(data: bytes) -> bytes:
    """One snappy block (at most 64 KiB): a greedy matcher over 4-byte
    sequences, skipping ahead faster through input that does not compress."""
    out = bytearray(_varint(len(data)))
    n = len(data)
    table: Dict[bytes, int] = {}
    i = lit = 0
    misses = 32
    while i + 4 <= n:
        key = data[i:i + 4]
        cand = table.get(key)
        table[key] = i
        if cand is None or i - cand > 0xFFFF:
            i += misses >> 5
            misses += 1
            continue
        m = 4
        while i + m + 8 <= n and data[cand + m:cand + m + 8] == data[i + m:i + m + 8]:
            m += 8
        while i + m < n and data[cand + m] == data[i + m]:
            m += 1
        _literal(out, data, lit, i)
        _copy(out, i - cand, m)
        i += m
        lit = i
        misses = 32
    _literal(out, data, lit, n)
    return bytes(out)


def snappy_decompress_block(data: bytes) -> bytes:
    """Decode one snappy block; SnappyError if it is not one."""
    n = shift = pos = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise SnappyError("bad length preamble")
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    out = bytearray()
    end = len(data)
    while pos < end:
        tag = data[pos]
        kind = tag & 3
        pos += 1
        if kind == 0:
            length = (tag >> 2) + 1
            if length > 60:
                extra = length - 60
                length = int.from_bytes(data[pos:pos + extra], "little") + 1
                pos += extra
            if pos + length > end:
                raise SnappyError("literal runs past the end")
            out += data[pos:pos + length]
            pos += length
            continue
        if kind == 1:
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | (data[pos] if pos < end else 0)
            pos += 1
        else:
            length = (tag >> 2) + 1
            size = 2 if kind == 2 else 4
            offset = int.from_bytes(data[pos:pos + size], "little")
            pos += size
        if pos > end or not 0 < offset <= len(out):
            raise SnappyError("bad copy offset")
        start = len(out) - offset
        if offset >= length:
            out += out[start:start + length]
        else:                                   # overlapping: the pattern repeats
            out += (out[start:] * (length // offset + 1))[:length]
        if len(out) > n:
            raise SnappyError("block longer than its preamble says")
    if len(out) != n:
        raise SnappyError("block shorter than its preamble says")
    return bytes(out)


_SNAPPY_STREAM_ID = b"\xff\x06\x00\x00sNaPpY"
_SNAPPY_MAX_CHUNK = 65536


class SnappyCompressor:
    """Snappy's framing format, as nsqd's snappy writer sends it: the stream
    identifier first, then a chunk per 64 KiB (kept uncompressed when
    compressing saves less than an eighth).  zlib's compressobj interface."""

    def __init__(self) -> None:
        self._started = False

    def compress(self, data: bytes) -> bytes:
        out = []
        if not self._started:
            out.append(_SNAPPY_STREAM_ID)
            self._started = True
        for i in range(0, len(data), _SNAPPY_MAX_CHUNK):
            piece = data[i:i + _SNAPPY_MAX_CHUNK]
            packed = snappy_compress_block(piece)
            kind, body = (0, packed) if len(packed) < len(piece) - len(piece) // 8 else (1, piece)
            size = 4 + len(body)
            out.append(bytes((kind,)) + size.to_bytes(3, "little") + _masked_crc(piece) + body)
        return b"".join(out)

    def flush(self, mode: int = 0) -> bytes:
        return b""


class SnappyDecompressor:
    """Reads snappy's framing format, with zlib's decompressobj interface:
    output is bounded by *max_length* per call, and input left unread for
    that is in ``unconsumed_tail``, which the caller passes back in front of
    what comes next (as with zlib).  A chunk that has not wholly arrived is
    kept here.  Raises SnappyError for a bad stream identifier, chunk type
    or checksum; when chunks before the bad one decoded in the same call,
    their data is returned and the bad chunk raises on the next call."""

    def __init__(self) -> None:
        self.unconsumed_tail = b""
        self._partial = b""          # the start of a chunk still coming
        self._started = False

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        buf = self._partial + data if self._partial else data
        out: List[bytes] = []
        made = pos = 0
        try:
            while pos + 4 <= len(buf) and not (max_length and made >= max_length):
                piece = self._chunk(buf, pos)
                if piece is None:
                    break                       # the rest of the chunk is still coming
                pos += 4 + int.from_bytes(buf[pos + 1:pos + 4], "little")
                if piece:
                    out.append(piece)
                    made += len(piece)
        except SnappyError:
            if not out:
                raise
            # What came before the bad chunk is returned first (a command in it
            # is answered, as nsqd would); the bad chunk fails the next call.
            self.unconsumed_tail, self._partial = buf[pos:], b""
            return b"".join(out)
        if len(buf) - pos > 4 + (1 << 24) and not (max_length and made >= max_length):
            raise SnappyError("chunk too large")
        if max_length and made >= max_length:
            self.unconsumed_tail, self._partial = buf[pos:], b""
        else:
            self.unconsumed_tail, self._partial = b"", buf[pos:]
        return b"".join(out)

    def _chunk(self, buf: bytes, pos: int) -> Optional[bytes]:
        """The data of the chunk at *pos* (b"" for one without data), or None
        if it has not wholly arrived."""
        kind = buf[pos]
        size = int.from_bytes(buf[pos + 1:pos + 4], "little")
        if pos + 4 + size > len(buf):
            return None
        body = buf[pos + 4:pos + 4 + size]
        if kind == 0xFF:
            if body != b"sNaPpY":
                raise SnappyError("bad stream identifier")
            self._started = True
            return b""
        if not self._started:
            raise SnappyError("no stream identifier")
        if kind in (0, 1):
            if size < 4:
                raise SnappyError("chunk too short for its checksum")
            piece = snappy_decompress_block(body[4:]) if kind == 0 else body[4:]
            if len(piece) > _SNAPPY_MAX_CHUNK:
                raise SnappyError("chunk larger than 64 KiB")
            if _masked_crc(piece) != body[:4]:
                raise SnappyError("checksum mismatch")
            return piece
        if kind <= 0x7F:
            raise SnappyError(f"reserved unskippable chunk type {kind:#x}")
        return b""                              # 0x80 - 0xfe: padding, skippable chunks



# -- the wire: frames and the connection stream (used by Client and TCPServer)

_FRAME_HEAD = struct.Struct(">lL")   # size = 4 + len(data), frame type
_FRAME_SLACK = 64    # a frame may exceed the largest body by its headers
_HEARTBEAT = b"_heartbeat_"


def _frame(frame_type: int, data: bytes) -> bytes:
    """A server frame: ``[size][type][data]``, size counting the type word."""
    return _FRAME_HEAD.pack(len(data) + 4, frame_type) + data


def _body(data: bytes) -> bytes:
    """A command body: 4-byte length, then the bytes."""
    return _LEN.pack(len(data)) + data


class _Layers:
    """NSQ's optional layers over a connection's bytes, without I/O: TLS on
    memory BIOs, then deflate or snappy.  One implementation for both ends
    (``_ClientWire`` of the clients, ``_ServerConnection`` of the servers).

    Raw bytes from the peer go in with ``feed``; ``read`` returns what they
    decode to, inflating at most *limit* bytes per call (a small compressed
    input never balloons); ``encode`` turns bytes to send into raw bytes,
    and ``outgoing`` returns what TLS itself has to send (its handshake,
    tickets).  ``_lock`` guards the TLS object, which a client's reading and
    writing threads share; it is held for CPU work only, never across I/O.
    """

    def __init__(self) -> None:
        self.tls: Optional[ssl.SSLObject] = None
        self._in: Optional[ssl.MemoryBIO] = None
        self._out: Optional[ssl.MemoryBIO] = None
        self._lock = threading.Lock()
        self.handshaking = False
        self.compression = ""            # "", "deflate" or "snappy"
        self._compress: Any = None
        self._decompress: Any = None
        self._plain = b""                # decrypted, not yet inflated or read
        self.eof = False                 # the TLS peer ended the stream

    def start_tls(self, context: ssl.SSLContext, server_side: bool,
                  server_hostname: Optional[str] = None) -> None:
        """TLS from now on; ``handshake`` runs it as raw bytes come in."""
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side,
                                    server_hostname=server_hostname)
        self.handshaking = True

    def handshake(self) -> bool:
        """Go on with the TLS handshake; True once it is done (ssl.SSLError if it failed)."""
        with self._lock:
            try:
                self.tls.do_handshake()  # type: ignore[union-attr]
            except ssl.SSLWantReadError:
                return False
        self.handshaking = False
        return True

    def start_compression(self, kind: str, level: int = 6, leftover: bytes = b"") -> None:
        """Deflate (raw, at *level*) or snappy both ways from now on; *leftover*
        (decoded bytes read past the upgrade) is the first input to inflate."""
        self._plain = leftover + self._plain
        if kind == "snappy":
            self._compress, self._decompress = SnappyCompressor(), SnappyDecompressor()
        else:
            self._compress = zlib.compressobj(level, zlib.DEFLATED, -15)
            self._decompress = zlib.decompressobj(-15)
        self.compression = kind

    def feed(self, raw: bytes) -> None:
        """Bytes received from the peer."""
        if self.tls is not None:
            with self._lock:
                self._in.write(raw)  # type: ignore[union-attr]
        else:
            self._plain += raw

    def read(self, limit: int) -> bytes:
        """What the bytes fed so far decode to: at most *limit* bytes inflated
        at once (b"" when more input is needed).  Raises ssl.SSLError,
        zlib.error or SnappyError on a broken stream."""
        if self.tls is not None and not self.handshaking:
            parts = [self._plain] if self._plain else []
            with self._lock:
                while True:
                    try:
                        chunk = self.tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        self.eof = True
                        break
                    if not chunk:
                        break
                    parts.append(chunk)
            self._plain = b"".join(parts)
        data, d = self._plain, self._decompress
        if d is None:
            self._plain = b""
            return data
        src = d.unconsumed_tail + data if d.unconsumed_tail else data
        self._plain = b""
        return d.decompress(src, limit)

    @property
    def more(self) -> bool:
        """Whether ``read`` has more to give without new input (inflating is bounded)."""
        return bool(self._decompress is not None and self._decompress.unconsumed_tail)

    def take_plain(self) -> bytes:
        """Decoded bytes not yet read (a layer starting now must see them)."""
        data, self._plain = self._plain, b""
        return data

    def encode(self, data: bytes) -> bytes:
        """Bytes to send, through the layers (a sync flush after every piece)."""
        if self._compress is not None:
            data = self._compress.compress(data) + self._compress.flush(zlib.Z_SYNC_FLUSH)
        if self.tls is not None:
            with self._lock:
                self.tls.write(data)
                data = self._out.read()  # type: ignore[union-attr]
        return data

    def outgoing(self) -> bytes:
        """What TLS itself has to send now (handshake records, tickets)."""
        if self._out is None or not self._out.pending:
            return b""
        with self._lock:
            return self._out.read()

    def tls_stats(self) -> Dict[str, Any]:
        """nsqd's tls fields of a client object."""
        obj = self.tls
        if obj is None or self.handshaking:
            return {"tls": False, "tls_cipher_suite": "", "tls_version": ""}
        cipher = obj.cipher()
        version = (obj.version() or "").replace("TLSv", "TLS")
        return {"tls": True, "tls_cipher_suite": cipher[0] if cipher else "",
                "tls_version": version}


class _ClientWire:
    """NSQ protocol V2's client side without I/O: the handshake (magic,
    IDENTIFY, the TLS and snappy or deflate upgrades, AUTH), then frames.

    Both clients drive it: ``_Connection`` over a blocking socket,
    ``_AsyncConnection`` over an asyncio transport.  A driver sends
    ``hello()``, hands every read to ``feed`` (which returns the frames
    that are the owner's: none until ``ready``), and after each feed sends
    ``outgoing()`` (the handshake's own bytes: TLS records, AUTH) and one
    NOP per heartbeat counted in ``heartbeats``.  Its commands go out
    through ``encode``; encoding is stateful (deflate, TLS), so a driver
    serialises ``encode`` with its sends.  Malformed input raises
    ProtocolError (or ssl.SSLError, zlib.error, SnappyError from a layer).
    """

    def __init__(self, options: "_ClientOptions", host: str) -> None:
        self.options = options
        self.host = host
        self.layers = _Layers()
        self.raw = True                   # no layer yet: bytes are frames as they are
        self.ready = False
        self.server_info: Dict[str, Any] = {}
        self.auth_info: Optional[Dict[str, Any]] = None
        self.heartbeats = 0               # heartbeats seen, to answer with NOP
        self._buf = bytearray()
        self._pos = 0
        self._out: List[bytes] = []
        self._step: Callable[[bytes], bool] = self._identified   # the next reply's meaning

    def hello(self) -> bytes:
        """The first bytes to send: the magic and IDENTIFY with the options."""
        o = self.options
        ident = {
            "client_id": o.client_id, "hostname": platform.node(),
            "user_agent": o.user_agent, "feature_negotiation": True,
            "heartbeat_interval": int(o.heartbeat_interval * 1000) if o.heartbeat_interval > 0 else -1,
            "tls_v1": o.tls is not None, "deflate": o.deflate, "deflate_level": o.deflate_level,
            "snappy": o.snappy, "output_buffer_size": o.output_buffer_size,
            "output_buffer_timeout": int(o.output_buffer_timeout * 1000),
        }
        if o.msg_timeout:
            ident["msg_timeout"] = int(o.msg_timeout * 1000)
        return MAGIC_V2 + b"IDENTIFY\n" + _body(json.dumps(ident).encode())

    def encode(self, data: bytes) -> bytes:
        """Commands to send, through the negotiated layers."""
        return data if self.raw else self.layers.encode(data)

    def outgoing(self) -> bytes:
        """What the handshake itself has to send now."""
        if self.layers.tls is not None:
            self._out.append(self.layers.outgoing())
        data = b"".join(self._out)
        self._out.clear()
        return data

    def feed(self, raw: bytes) -> List[Tuple[int, bytes]]:
        """Bytes read from the server -> the complete frames they end, in order."""
        frames: List[Tuple[int, bytes]] = []
        layers = self.layers
        if self.raw:
            self._append(raw)
        else:
            layers.feed(raw)
        while True:
            data = b""
            if not self.raw:
                if layers.handshaking and not layers.handshake():
                    break                     # the TLS handshake needs more input
                data = layers.read(65536)
                if data:
                    self._append(data)
                elif layers.eof:
                    raise ConnectionLost("the server ended the TLS stream")
            if self._parse(frames):           # a layer started: read on through it
                continue
            if self.raw or not (data or layers.more):
                break
        return frames

    def _append(self, data: bytes) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def _parse(self, frames: List[Tuple[int, bytes]]) -> bool:
        """Cut complete frames; True when a handshake step started a layer."""
        buf, pos, end_of = self._buf, self._pos, len(self._buf)
        limit = self.options.max_frame_size
        while end_of - pos >= 4:
            size = _LEN.unpack_from(buf, pos)[0]
            if not 4 <= size <= limit:
                raise ProtocolError("E_PROTOCOL", f"frame size {size} out of range 4-{limit}")
            end = pos + 4 + size
            if end > end_of:
                break
            ftype = _FRAME_HEAD.unpack_from(buf, pos)[1]
            data = bytes(buf[pos + 8:end])
            pos = end
            if ftype == FRAME_TYPE_RESPONSE and data == _HEARTBEAT:
                self.heartbeats += 1
            elif self.ready:
                frames.append((ftype, data))
            else:
                self._pos = pos
                if self._handshake(ftype, data):
                    return True
                buf, pos, end_of = self._buf, self._pos, len(self._buf)
        self._pos = pos
        return False

    # -- the handshake: each step reads one reply, says whether a layer started
    def _handshake(self, ftype: int, data: bytes) -> bool:
        if ftype == FRAME_TYPE_ERROR:
            code, _, text = data.decode(errors="replace").partition(" ")
            raise ProtocolError(code, text)
        if ftype != FRAME_TYPE_RESPONSE:
            raise ProtocolError("E_PROTOCOL", f"unexpected frame type {ftype} before the "
                                              f"handshake ended")
        return self._step(data)

    def _rest(self) -> bytes:
        """Bytes past the reply that started a layer: the layer's first input."""
        data = bytes(self._buf[self._pos:])
        self._buf.clear()
        self._pos = 0
        return data

    def _identified(self, reply: bytes) -> bool:
        if reply.startswith(b"{"):
            try:
                self.server_info = json.loads(reply)
            except ValueError as e:
                raise ProtocolError("E_PROTOCOL", f"IDENTIFY reply is not JSON: {e}") from e
        tls = self.options.tls
        if self.server_info.get("tls_v1") and tls is not None:
            self.layers.start_tls(tls, False, self.host if tls.check_hostname else None)
            self.layers.feed(self._rest())
            self.raw = False
            self._step = functools.partial(self._upgraded, "TLS", self._compress)
            return True
        return self._compress()

    def _compress(self) -> bool:
        info = self.server_info
        kind = "snappy" if info.get("snappy") else "deflate" if info.get("deflate") else ""
        if not kind:
            return self._authenticate()
        level = int(info.get("deflate_level") or self.options.deflate_level)
        self.layers.start_compression(kind, level, self._rest())
        self.raw = False
        self._step = functools.partial(self._upgraded, kind, self._authenticate)
        return True

    def _upgraded(self, what: str, then: Callable[[], bool], reply: bytes) -> bool:
        if reply != b"OK":
            raise ProtocolError("E_PROTOCOL", f"expected OK after the {what} upgrade, got {reply!r}")
        return then()

    def _authenticate(self) -> bool:
        if not self.server_info.get("auth_required"):
            self.ready = True
            return False
        secret = self.options.auth_secret
        if secret is None:
            raise ProtocolError("E_AUTH_FIRST", "the server requires AUTH: pass auth_secret")
        self._out.append(self.encode(b"AUTH\n" + _body(secret.encode())))
        self._step = self._authorized
        return False

    def _authorized(self, reply: bytes) -> bool:
        try:
            self.auth_info = json.loads(reply)
        except ValueError as e:
            raise ProtocolError("E_PROTOCOL", f"AUTH reply is not JSON: {e}") from e
        self.ready = True
        return False


# -- Client: the same publish/consume API over NSQ's TCP protocol -------------

_PUBLISH_ERRORS: Dict[str, type] = {
    "E_BAD_TOPIC": InvalidName, "E_BAD_CHANNEL": InvalidName,
    "E_BAD_MESSAGE": InvalidMessage, "E_BAD_BODY": InvalidMessage,
    "E_INVALID": InvalidArgument,
    "E_PUB_FAILED": PublishFailed, "E_MPUB_FAILED": PublishFailed,
    "E_DPUB_FAILED": PublishFailed,
}


def _split_address(address: Any, default_port: int) -> Tuple[str, int]:
    """``"host:port"``, ``":port"`` or a (host, port) tuple -> (host, port)."""
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    host, sep, port = str(address).rpartition(":")
    if not sep:
        return str(address), default_port
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise InvalidArgument(f"address {address!r} is not host:port") from None


class _Connection:
    """A client connection, ready for SUB/PUB: magic, IDENTIFY, upgrades, AUTH done.

    The blocking driver of ``_ClientWire``.  ``serve(on_frame)`` reads frames
    until the connection ends, answering heartbeats with NOP and passing
    every other frame to *on_frame*; ``send`` may be called from any thread.
    """

    def __init__(self, client: "_ClientOptions", address: Any = None) -> None:
        self.client = client
        host, port = _split_address(client.address if address is None else address, TCP_PORT)
        try:
            sock = socket.create_connection((host, port), timeout=client.timeout)
        except OSError as e:
            raise ConnectionLost(f"cannot connect to {host}:{port}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.wire = _ClientWire(client, host)
        self._send_lock = threading.Lock()   # serialises encoding and writing
        self._early: List[Tuple[int, bytes]] = []   # frames read with the handshake's end
        self.closed = False
        try:
            self._handshake()
        except socket.timeout:
            self.close()
            raise ConnectionLost(f"no answer from {host}:{port} within {client.timeout:g}s") \
                from None
        except BaseException:
            self.close()
            raise
        # Reads block for up to two heartbeat intervals, then the peer is dead.
        sock.settimeout(2 * client.heartbeat_interval if client.heartbeat_interval > 0 else None)

    @property
    def server_info(self) -> Dict[str, Any]:
        """The server's IDENTIFY reply (empty if it negotiated nothing)."""
        return self.wire.server_info

    def _handshake(self) -> None:
        wire = self.wire
        self.sock.sendall(wire.hello())
        while not wire.ready:
            self._early += self._read()

    def _read(self) -> List[Tuple[int, bytes]]:
        """The frames of one read; answers heartbeats, sends the handshake's bytes."""
        wire = self.wire
        raw = self.sock.recv(65536)
        if not raw:
            raise ConnectionLost("connection closed by the peer")
        frames = wire.feed(raw)
        out = wire.outgoing()
        if out:
            self.sock.sendall(out)
        if wire.heartbeats:
            nops, wire.heartbeats = wire.heartbeats, 0
            self.send(b"NOP\n" * nops)
        return frames

    def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost("the connection is closed")
        try:
            with self._send_lock:
                self.sock.sendall(self.wire.encode(data))
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise ConnectionLost(f"send failed: {e}") from e

    def serve(self, on_frame: Callable[[int, bytes], None]) -> Optional[BaseException]:
        """Read frames until the connection ends; return why it ended."""
        try:
            frames, self._early = self._early, []
            while True:
                for ftype, data in frames:
                    on_frame(ftype, data)
                if self.closed:
                    return None
                try:
                    frames = self._read()
                except socket.timeout:
                    raise ConnectionLost("no data from the server within two heartbeat "
                                         "intervals") from None
        except (MinqError, OSError, ssl.SSLError, zlib.error, SnappyError) as e:
            return e
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class _RemoteMessage(Message):
    """A message received over TCP; finish/requeue/touch send FIN/REQ/TOUCH."""

    __slots__ = ("_conn", "_settled")

    def __init__(self, conn: _Connection, data: bytes) -> None:
        timestamp, attempts, msg_id = _MSG_HEADER.unpack_from(data)
        super().__init__(msg_id, data[MSG_HEADER_SIZE:], timestamp, attempts)
        self._conn = conn
        self._settled = False

    def _command(self, line: bytes, final: bool) -> None:
        if self._settled or self._conn.closed:
            raise NotInFlight(f"message {self.id.decode()} is not in flight "
                              f"(already settled, or its connection was lost)")
        self._settled = final
        self._conn.send(line)

    def finish(self) -> None:
        self._command(b"FIN %s\n" % self.id, True)

    def requeue(self, delay: float = 0.0) -> None:
        self._command(b"REQ %s %d\n" % (self.id, max(0, int(delay * 1000))), True)

    def touch(self) -> None:
        self._command(b"TOUCH %s\n" % self.id, False)


class _ClientOptions:
    """What a client connection negotiates and how it reconnects: the options
    ``Client`` and ``AsyncClient`` share (and ``_ClientWire`` reads)."""

    def __init__(self, address: Any = DEFAULT_TCP_ADDRESS, *,
                 tls: Optional[ssl.SSLContext] = None, deflate: bool = False,
                 deflate_level: int = 6, auth_secret: Optional[str] = None,
                 client_id: Optional[str] = None,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 output_buffer_size: int = DEFAULT_OUTPUT_BUFFER_SIZE,
                 output_buffer_timeout: float = DEFAULT_OUTPUT_BUFFER_TIMEOUT,
                 msg_timeout: Optional[float] = None,
                 timeout: float = 5.0, max_backoff: float = 10.0,
                 max_frame_size: int = DEFAULT_MAX_BODY_SIZE + _FRAME_SLACK,
                 user_agent: str = f"minq/{VERSION}", snappy: bool = False) -> None:
        """Check and keep the options (see ``Client``)."""
        _check_range("deflate_level", deflate_level, 1, 9)
        if snappy and deflate:
            raise InvalidArgument("choose deflate or snappy, not both (as nsqd)")
        self.snappy = snappy
        self.user_agent = user_agent
        _check_range("timeout", timeout, 0.001, None)
        self.address = address
        self.tls = tls
        self.deflate = deflate
        self.deflate_level = deflate_level
        self.auth_secret = auth_secret
        self.client_id = client_id if client_id is not None else platform.node().split(".")[0]
        self.heartbeat_interval = heartbeat_interval
        self.output_buffer_size = output_buffer_size
        self.output_buffer_timeout = output_buffer_timeout
        self.msg_timeout = msg_timeout
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.max_frame_size = max_frame_size


class Client(_ClientOptions):
    """Publish to and consume from minq or nsqd over TCP, with the Broker's API.

    ``publish``, ``publish_many``, ``consumer`` and ``subscribe`` behave as on
    ``Broker`` (``publish`` returns None: NSQ does not tell the message id).
    Connections are opened lazily, negotiate features with IDENTIFY (TLS when
    *tls* is an ``ssl.SSLContext``, deflate when *deflate* is true), answer
    heartbeats, send AUTH when the server asks for it, and reconnect with
    exponential backoff (at most *max_backoff* seconds).
    """

    def __init__(self, address: Any = DEFAULT_TCP_ADDRESS, **options: Any) -> None:
        super().__init__(address, **options)
        # _pub_lock serialises publishes: one command, one reply, in order.
        self._pub_lock = threading.Lock()
        self._pub_conn: Optional[_Connection] = None
        self._pub_thread: Optional[threading.Thread] = None
        self._replies: "queue.SimpleQueue[Optional[Tuple[int, bytes]]]" = queue.SimpleQueue()
        self._consumers: List["RemoteConsumer"] = []
        self._closed = False

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- publishing --------------------------------------------------------------
    def publish(self, topic: str, body: bytes, defer: float = 0.0) -> None:
        """PUB (or DPUB when *defer* > 0 seconds); returns once the server said OK."""
        self._request(_cmd_pub(topic, body, defer))

    def publish_many(self, topic: str, bodies: Iterable[bytes], defer: float = 0.0) -> None:
        """MPUB: all messages are accepted or none."""
        self._request(_cmd_mpub(topic, bodies, defer))

    def _request(self, data: bytes) -> None:
        with self._pub_lock:
            conn = self._producer()
            try:
                conn.send(data)
            except ConnectionLost:
                # The server may have refused the command (an error frame, then
                # close) while we were still sending: report its reason.
                try:
                    reply = self._replies.get(timeout=self.timeout)
                except queue.Empty:
                    reply = None
                if reply is None or reply[0] != FRAME_TYPE_ERROR:
                    raise
            else:
                reply = self._replies.get()
            if reply is None:
                raise ConnectionLost("connection lost before the reply: the message may "
                                     "or may not have been published")
            ftype, payload = reply
            if ftype == FRAME_TYPE_ERROR:
                # Every publishing error is fatal in NSQ: the server closes the
                # connection after it. Close our end now, so the next publish
                # reconnects instead of writing to a socket that is going away.
                conn.close()
                raise _reply_error(payload)

    def _producer(self) -> _Connection:
        """The publishing connection, (re)connected with backoff within *timeout*."""
        if self._closed:
            raise BrokerClosed("the client is closed")
        conn = self._pub_conn
        if conn is not None and not conn.closed:
            return conn
        if self._pub_thread is not None:
            self._pub_thread.join()
        conn = _retry(lambda: _Connection(self), self.timeout, self.max_backoff)
        self._replies = queue.SimpleQueue()
        replies = self._replies
        self._pub_conn = conn
        self._pub_thread = threading.Thread(target=self._read_replies, args=(conn, replies),
                                            name="minq-client-pub")
        self._pub_thread.start()
        return conn

    @staticmethod
    def _read_replies(conn: _Connection, replies: "queue.SimpleQueue[Any]") -> None:
        why = conn.serve(lambda ftype, data: replies.put((ftype, data)))
        if why is not None:
            log.debug("publishing connection closed: %s", why)
        replies.put(None)

    # -- consuming ---------------------------------------------------------------
    def consumer(self, topic: str, channel: str, max_in_flight: int = 1) -> "RemoteConsumer":
        """A pull consumer of *topic*/*channel* over TCP (SUB + RDY max_in_flight)."""
        return RemoteConsumer(self, topic, channel, max_in_flight)

    def subscribe(self, topic: str, channel: str, handler: Callable[[Message], Any],
                  max_in_flight: int = 32, workers: int = 4, *,
                  backoff: float = 1.0, max_backoff: float = 60.0,
                  middleware: Iterable[Layer] = ()) -> "RemoteSubscription":
        """Run *handler* on every message in *workers* threads (see Broker.subscribe)."""
        return RemoteSubscription(self, topic, channel, handler, max_in_flight, workers,
                                  backoff=backoff, max_backoff=max_backoff,
                                  middleware=middleware)

    def close(self) -> None:
        """Close every consumer and the publishing connection; join their threads."""
        self._closed = True
        for c in list(self._consumers):
            c.close()
        with self._pub_lock:
            if self._pub_conn is not None:
                self._pub_conn.close()
            if self._pub_thread is not None:
                self._pub_thread.join()
                self._pub_thread = None


def _cmd_pub(topic: str, body: Any, defer: float) -> bytes:
    """PUB, or DPUB when *defer* > 0 seconds, checked as the server would."""
    validate_name(topic)
    body = _as_body(body)
    if defer:
        _check_range("defer", defer, 0, None)
        return b"DPUB %s %d\n" % (topic.encode(), int(defer * 1000)) + _body(body)
    return b"PUB %s\n" % topic.encode() + _body(body)


def _cmd_mpub(topic: str, bodies: Iterable[Any], defer: float) -> bytes:
    """MPUB of *bodies*, checked as the server would (NSQ's MPUB cannot defer)."""
    validate_name(topic)
    if defer:
        raise InvalidArgument("NSQ's MPUB cannot defer; publish deferred messages one by one")
    parts = [_body(_as_body(b)) for b in bodies]
    if not parts:
        raise InvalidMessage("publish_many needs at least one message")
    return b"MPUB %s\n" % topic.encode() + _body(_LEN.pack(len(parts)) + b"".join(parts))


def _reply_error(payload: bytes) -> MinqError:
    """The exception for an error frame answering a publish."""
    code, _, text = payload.decode(errors="replace").partition(" ")
    if code in _PUBLISH_ERRORS:
        return _PUBLISH_ERRORS[code](f"{code} {text}")
    return ProtocolError(code, text)


def _as_body(body: Any) -> bytes:
    """A message body as bytes: ``str`` is encoded as UTF-8 (as ``Broker.publish`` does)."""
    if isinstance(body, str):
        body = body.encode()
    elif isinstance(body, (bytearray, memoryview)):
        body = bytes(body)
    if not isinstance(body, bytes):
        raise InvalidMessage(f"message body must be bytes or str, not {type(body).__name__}")
    if not body:
        raise InvalidMessage("message body must not be empty")
    return body


_FIRST_RETRY = 0.05      # seconds before reconnecting the first time; doubles each time


def _retry(connect: Callable[[], _Connection], timeout: float, max_backoff: float,
           stop: Optional[threading.Event] = None) -> _Connection:
    """Call *connect* until it succeeds, backing off exponentially, within *timeout*."""
    deadline = time.monotonic() + timeout
    delay = _FIRST_RETRY
    while True:
        try:
            return connect()
        except ConnectionLost:
            left = deadline - time.monotonic()
            if left <= 0 or (stop is not None and stop.is_set()):
                raise
            wait = min(delay, left, max_backoff)
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)
            delay *= 2


class RemoteConsumer:
    """A pull consumer over TCP: ``get()``, iteration, ``set_max_in_flight()``, ``close()``.

    One connection, kept by a thread that reconnects with backoff (SUB and
    RDY again) when it is lost.  Messages of a lost connection can no longer
    be settled (the server requeued them); ``get()`` skips them.
    """

    def __init__(self, client: Client, topic: str, channel: str, max_in_flight: int = 1) -> None:
        validate_name(topic)
        validate_name(channel, "channel")
        _check_range("max_in_flight", max_in_flight, 0, None)
        self.client = client
        self.topic = topic
        self.channel = channel
        self.max_in_flight = max_in_flight
        self._buffer: "queue.SimpleQueue[Optional[_RemoteMessage]]" = queue.SimpleQueue()
        self._conn: Optional[_Connection] = None
        self._stop = threading.Event()
        self._stopping = False
        self.connected = threading.Event()   # set while subscribed
        client._consumers.append(self)
        self._thread = threading.Thread(target=self._run, name=f"minq-consumer-{topic}-{channel}")
        self._thread.start()

    def _run(self) -> None:
        delay = _FIRST_RETRY
        while not self._stop.is_set():
            try:
                conn = _Connection(self.client)
            except (MinqError, OSError, ssl.SSLError) as e:
                log.warning("consumer %s/%s: %s", self.topic, self.channel,
                            e if isinstance(e, ConnectionLost) else
                            f"cannot connect to {self.client.address}: {e}")
                self._stop.wait(delay)
                delay = min(delay * 2, self.client.max_backoff)
                continue
            self._conn = conn
            try:
                conn.send(b"SUB %s %s\n" % (self.topic.encode(), self.channel.encode()))
                conn.send(b"RDY %d\n" % self.max_in_flight)
            except ConnectionLost:
                continue
            if self._stop.is_set():
                conn.close()
                break
            why = conn.serve(self._on_frame)
            self.connected.clear()
            if not self._stop.is_set():
                log.warning("consumer %s/%s: connection lost (%s); reconnecting",
                            self.topic, self.channel, why)
                self._stop.wait(delay)
                delay = min(delay * 2, self.client.max_backoff)
        self._buffer.put(None)

    def _on_frame(self, ftype: int, data: bytes) -> None:
        if ftype == FRAME_TYPE_MESSAGE:
            self._buffer.put(_RemoteMessage(self._conn, data))  # type: ignore[arg-type]
        elif ftype == FRAME_TYPE_ERROR:
            log.warning("consumer %s/%s: %s", self.topic, self.channel,
                        data.decode(errors="replace"))
        elif data == b"OK":
            self.connected.set()

    def get(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, waiting up to *timeout* seconds; None on timeout or close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping:
            try:
                msg = _wait_get(self._buffer, deadline)
            except queue.Empty:
                return None
            if msg is None:
                self._buffer.put(None)
                return None
            if not msg._conn.closed:
                return msg
        return None

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.get()
            if msg is None:
                return
            yield msg

    def set_max_in_flight(self, n: int) -> None:
        """Send a new RDY window (0 pauses delivery)."""
        _check_range("max_in_flight", n, 0, None)
        self.max_in_flight = n
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.send(b"RDY %d\n" % n)

    def close(self) -> None:
        """Disconnect: the server requeues whatever this consumer held in flight."""
        self._stopping = True
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._buffer.put(None)
        if self in self.client._consumers:
            self.client._consumers.remove(self)

    def __enter__(self) -> "RemoteConsumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteSubscription(_HandlerPool, RemoteConsumer):
    """Worker threads run ``handler(message)`` on messages received over TCP."""

    def __init__(self, client: Client, topic: str, channel: str,
                 handler: Callable[[Message], Any], max_in_flight: int = 32,
                 workers: int = 4, *, backoff: float = 1.0, max_backoff: float = 60.0,
                 middleware: Iterable[Layer] = ()) -> None:
        self._init_pool(handler, workers, backoff, max_backoff, middleware)
        super().__init__(client, topic, channel, max_in_flight)
        self._start_workers()

    def close(self) -> None:
        """Stop receiving, let running handlers finish, then disconnect."""
        try:
            self.set_max_in_flight(0)
        except ConnectionLost:
            pass
        self._stopping = True
        self._buffer.put(None)
        self._join_workers()
        super().close()


# -- forwarding to HTTP services (nsq_to_http) -------------------------------------

TO_HTTP_MODES = ("hostpool", "round-robin", "epsilon-greedy", "random", "weighted", "hash")


class _Backend:
    """One HTTP endpoint of a forwarder, with its health and figures."""

    __slots__ = ("url", "weight", "current", "dead_until", "retry_delay", "latency",
                 "ok", "failed")

    def __init__(self, url: str, weight: int) -> None:
        self.url, self.weight, self.current = url, weight, 0
        self.dead_until = 0.0              # monotonic time it is tried again
        self.retry_delay = 0.0
        self.latency = 0.0                 # moving average of good requests (seconds)
        self.ok = self.failed = 0


class _BackendPool:
    """Picks the backend for each message by a mode: nsq_to_http's ``hostpool``
    (round-robin over the healthy ones), ``round-robin``, ``epsilon-greedy``
    (mostly the fastest, sometimes another), and ``random``, ``weighted``
    (smooth weighted round-robin, as nginx) and ``hash`` (a consistent hash of
    ``key(message)``: one key, one backend while it is healthy, else the next
    on the ring).  A backend that fails sits out *retry_delay* seconds,
    doubling on each failure up to *max_retry_delay* (as go-hostpool); when
    all sit out, all are tried.
    """

    EPSILON = 0.1           # epsilon-greedy: how often a backend other than the fastest
    VIRTUAL_NODES = 64      # hash: points per backend on the ring

    def __init__(self, urls: Iterable[str], mode: str = "hostpool",
                 weights: Optional[Iterable[int]] = None,
                 key: Optional[Callable[[Message], Any]] = None,
                 retry_delay: float = 30.0, max_retry_delay: float = 900.0) -> None:
        urls = list(urls)
        if not urls:
            raise InvalidArgument("to-http needs at least one URL")
        if mode not in TO_HTTP_MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(TO_HTTP_MODES)}, not {mode!r}")
        weights = list(weights) if weights is not None else [1] * len(urls)
        if len(weights) != len(urls) or any(not isinstance(w, int) or w < 1 for w in weights):
            raise InvalidArgument("weights: one whole number >= 1 per URL")
        if mode == "hash" and key is None:
            raise InvalidArgument("mode 'hash' needs a key (a JSON field or a header)")
        self.mode, self.key = mode, key
        self.retry_delay, self.max_retry_delay = retry_delay, max_retry_delay
        self.backends = [_Backend(u, w) for u, w in zip(urls, weights)]
        self._lock = threading.Lock()
        self._next = 0
        self._ring = sorted((_ring_point(f"{b.url}#{i}".encode()), n)
                            for n, b in enumerate(self.backends)
                            for i in range(self.VIRTUAL_NODES))

    def order(self, msg: Message) -> List[_Backend]:
        """The backends to try for *msg*: the one the mode picks, then the
        other healthy ones (in ring order for ``hash``)."""
        now = time.monotonic()
        with self._lock:
            live = [b for b in self.backends if b.dead_until <= now] or list(self.backends)
            if self.mode == "hash":
                return self._ring_walk(msg, live)
            first = self._pick(live)
        return [first] + [b for b in live if b is not first]

    def _pick(self, live: List[_Backend]) -> _Backend:
        mode = self.mode
        if mode == "random" or mode == "epsilon-greedy" and _random.random() < self.EPSILON:
            return _random.choice(live)
        if mode == "epsilon-greedy":
            return min(live, key=lambda b: b.latency)
        if mode == "weighted":
            total = sum(b.weight for b in live)
            for b in live:
                b.current += b.weight
            best = max(live, key=lambda b: b.current)
            best.current -= total
            return best
        self._next += 1                    # hostpool, round-robin
        return live[self._next % len(live)]

    def _ring_walk(self, msg: Message, live: List[_Backend]) -> List[_Backend]:
        try:
            point = _ring_point(_key_bytes(self.key(msg)))  # type: ignore[misc]
        except Exception as e:
            log.warning("to-http: no hash key in message %s (%s); using its id",
                        msg.id.decode(), e)
            point = _ring_point(msg.id)
        start = bisect.bisect(self._ring, (point, -1))
        seen: List[_Backend] = []
        for i in range(len(self._ring)):
            b = self.backends[self._ring[(start + i) % len(self._ring)][1]]
            if b in live and b not in seen:
                seen.append(b)
        return seen

    def mark(self, backend: _Backend, ok: bool, elapsed: float) -> None:
        with self._lock:
            if ok:
                backend.ok += 1
                backend.retry_delay = 0.0
                backend.dead_until = 0.0
                backend.latency = elapsed if not backend.latency else \
                    0.8 * backend.latency + 0.2 * elapsed
                return
            backend.failed += 1
            backend.retry_delay = min(max(backend.retry_delay * 2, self.retry_delay),
                                      self.max_retry_delay)
            backend.dead_until = time.monotonic() + backend.retry_delay


def _ring_point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def message_key(spec: str) -> Callable[[Message], Any]:
    """A key function from ``json:<field>[.<field>...]`` (a field of a JSON body)
    or ``header:<Name>`` (a ``Name: value`` line in the header lines that open
    the body, up to a blank line, as in an HTTP or mail message)."""
    kind, _, name = spec.partition(":")
    if kind == "json" and name:
        path = name.split(".")

        def json_key(msg: Message) -> Any:
            value: Any = json.loads(msg.body)
            for part in path:
                value = value[part]
            return value
        return json_key
    if kind == "header" and name:
        wanted = name.strip().lower().encode()

        def header_key(msg: Message) -> Any:
            for line in msg.body.split(b"\n", 64)[:64]:
                line = line.rstrip(b"\r")
                if not line:
                    break
                field, sep, value = line.partition(b":")
                if sep and field.strip().lower() == wanted:
                    return value.strip()
            raise KeyError(f"no {name} header")
        return header_key
    raise InvalidArgument(f"hash key {spec!r}: use json:<field> or header:<Name>")


class HTTPForwarder:
    """Deliver every message of *topic*/*channel* to HTTP services (nsq_to_http).

    *sources* is a Broker, a Client, or a list of them (one subscription
    each, sharing the backends).  Each message is POSTed (the body as the
    request body) or, with ``method="GET"``, sent as ``url % quoted_body``.
    A 2xx (GET: 200) finishes it; any other answer, a timeout or a refused
    connection marks that backend failed and tries the other healthy ones;
    when none answered, the message is requeued after ``requeue_delay *
    attempts`` seconds (at most *max_requeue_delay*) and every worker backs
    off (``backoff * 2**n``, at most *max_backoff*).  A message delivered
    more than *max_attempts* times goes to the dead-letter topic
    ``<topic>.<channel>.dead``.  Defaults are nsq_to_http's and go-nsq's.
    """

    def __init__(self, sources: Any, topic: str, channel: str, urls: Iterable[str], *,
                 method: str = "POST", mode: str = "hostpool",
                 weights: Optional[Iterable[int]] = None,
                 key: Optional[Callable[[Message], Any]] = None,
                 content_type: str = "application/octet-stream",
                 headers: Optional[Dict[str, str]] = None,
                 connect_timeout: float = 2.0, request_timeout: float = 20.0,
                 workers: int = 100, max_in_flight: int = 200, sample: float = 1.0,
                 status_every: int = 250, max_attempts: int = 5, requeue_delay: float = 90.0,
                 max_requeue_delay: float = 900.0, backoff: float = 1.0,
                 max_backoff: float = 120.0, retry_delay: float = 30.0,
                 middleware: Iterable[Layer] = ()) -> None:
        if method not in ("POST", "GET"):
            raise InvalidArgument(f"method must be POST or GET, not {method!r}")
        urls = list(urls)
        if method == "GET" and any(u.count("%s") != 1 for u in urls):
            raise InvalidArgument("invalid GET address - must be a printf string")
        _check_range("sample", sample, 0.0, 1.0)
        self.topic, self.channel, self.method = topic, channel, method
        self.pool = _BackendPool(urls, mode, weights, key, retry_delay)
        self.headers = {"User-Agent": f"nsq_to_http v{NSQ_VERSION} (minq {VERSION})",
                        **({"Content-Type": content_type} if method == "POST" else {}),
                        **(headers or {})}
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        self.sample, self.status_every, self.max_attempts = sample, status_every, max_attempts
        self.requeue_delay, self.max_requeue_delay = requeue_delay, max_requeue_delay
        self.backoff, self.max_backoff = backoff, max_backoff
        self.sent = self.failed = self.dead_lettered = 0
        self._lock = threading.Lock()
        self._backoff_level = 0
        self._backoff_until = 0.0
        self._closing = threading.Event()
        self._local = threading.local()        # each worker's open connections
        self._open: List[http.client.HTTPConnection] = []     # all of them, to close
        self._sources: List[Any] = []
        self._subs: List[Any] = []
        try:
            for source in sources if isinstance(sources, (list, tuple)) else [sources]:
                self.add_source(source, max_in_flight, workers, middleware)
        except BaseException:
            self.close()
            raise

    def add_source(self, source: Any, max_in_flight: int = 200, workers: int = 100,
                   middleware: Iterable[Layer] = ()) -> None:
        """Also forward what *source* (a Broker or Client) has for the topic
        and channel: a producer that lookupd found later."""
        sub = source.subscribe(self.topic, self.channel, self._forward, max_in_flight, workers,
                               middleware=middleware)
        sub.user_agent = self.headers["User-Agent"]
        self._sources.append(source)
        self._subs.append(sub)

    def close(self) -> None:
        """Stop taking messages, let requests in progress end, join the workers."""
        self._closing.set()
        for sub in self._subs:
            sub.close()
        self._subs = []
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:             # the workers' keep-alive connections
            conn.close()

    def __enter__(self) -> "HTTPForwarder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- one message -------------------------------------------------------------
    def _forward(self, msg: Message) -> None:
        if self.sample < 1.0 and _random.random() > self.sample:
            return                                  # not sampled: finished unsent
        if self.max_attempts and msg.attempts > self.max_attempts:
            self._to_dead_letters(msg)
            return
        wait = self._backoff_until - time.monotonic()
        if wait > 0:
            self._closing.wait(wait)
        for backend in self.pool.order(msg):
            if self._closing.is_set():       # stopping: back at once, not a failure
                msg.requeue(0.0)
                return
            started = time.monotonic()
            error = self._send(backend.url, msg.body)
            self.pool.mark(backend, error is None, time.monotonic() - started)
            if error is None:
                self._count(True)
                return
            log.warning("to-http: %s failed for message %s: %s; it sits out %gs",
                        backend.url, msg.id.decode(), error, backend.retry_delay)
        self._count(False)
        delay = min(self.requeue_delay * msg.attempts, self.max_requeue_delay)
        log.warning("to-http: message %s (attempt %d) reached no backend; requeued in %gs",
                    msg.id.decode(), msg.attempts, delay)
        msg.requeue(delay)

    def _to_dead_letters(self, msg: Message) -> None:
        name = dead_letter_name(self.topic, self.channel)
        source = self._sources[0]
        source.publish(name, msg.body)
        with self._lock:
            self.dead_lettered += 1
        log.warning("to-http: message %s failed %d times; moved to %s", msg.id.decode(),
                    msg.attempts - 1, name)

    def _count(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.sent += 1
                self._backoff_level = 0
            else:
                self.failed += 1
                self._backoff_level += 1
                self._backoff_until = time.monotonic() + min(
                    self.backoff * 2 ** (self._backoff_level - 1), self.max_backoff)
            n = self.sent + self.failed
        if self.status_every and n % self.status_every == 0:
            log.info("to-http [aggregate]: %d requests, %d delivered, %d failed; %s", n,
                     self.sent, self.failed,
                     ", ".join(f"{b.url} ok {b.ok} failed {b.failed} "
                               f"{b.latency * 1000:.1f} ms" for b in self.pool.backends))

    def _send(self, url: str, body: bytes) -> Optional[str]:
        """One request; None if the backend accepted it, else what went wrong."""
        if self.method == "GET":
            url = url % urllib.parse.quote_plus(body)
        parts = urllib.parse.urlsplit(url)
        conns = self._local.__dict__.setdefault("conns", {})
        where = (parts.scheme, parts.netloc)
        conn = conns.get(where)
        try:
            if conn is None:
                cls = (http.client.HTTPSConnection if parts.scheme == "https"
                       else http.client.HTTPConnection)
                conn = conns[where] = cls(parts.hostname or "", parts.port,
                                          timeout=self.connect_timeout)
                with self._lock:
                    self._open.append(conn)
                conn.connect()
                conn.sock.settimeout(self.request_timeout)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request(self.method, target, body=body if self.method == "POST" else None,
                         headers=self.headers)
            reply = conn.getresponse()
            reply.read()
            status = reply.status
            if reply.will_close:
                self._discard(conns, where)
        except (OSError, http.client.HTTPException) as e:
            self._discard(conns, where)
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        ok = status == 200 if self.method == "GET" else 200 <= status < 300
        return None if ok else f"got status code {status}"

    def _discard(self, conns: Dict[Any, Any], where: Any) -> None:
        conn = conns.pop(where, None)
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)


# =============================================================================
# asyncio clients
#
# The same API for asyncio programs, in-process (AsyncBroker, over a Broker
# in the same process) and over TCP (AsyncClient, against minq or nsqd,
# directly or through nsqlookupd).  Nothing here blocks the event loop:
# deliveries made on the broker's threads wake the loop once per batch,
# fsync mode's group commit is waited for on one thread per AsyncBroker,
# and a TCP connection is _ClientWire driven by an asyncio Protocol, with
# every command written in one pass of the loop sent at once.
# =============================================================================

_TURN = 0.001     # seconds of minq calls that need not wait, per turn of the loop


class _Turns:
    """Turns of the event loop for minq calls that need not wait (a publish
    in memory, a get from a full inbox), so that tasks draining thousands
    of buffered messages or publishing in a loop never hold it for long.

    A turn is ``_TURN`` seconds of such calls, back to back.  The caller
    that uses it up yields; the next caller also yields and starts a new
    turn at the loop's next pass, which goes first to the tasks queued after
    the one that had it: turns move round the tasks, and a pass of the loop
    holds at most one.  A gap between calls (the loop idled, or did other
    work) begins a turn at once.
    """

    __slots__ = ("start", "last", "spent", "next_due")

    def __init__(self) -> None:
        self.start = self.last = 0.0
        self.spent = False         # the turn is used up
        self.next_due = False      # a new turn is scheduled for the next pass

    def over(self) -> bool:
        """Whether the caller must yield to the loop before its call."""
        now = time.perf_counter()
        if now - self.last > _TURN:          # not back to back: a new turn
            self.start, self.spent = now, False
        self.last = now
        if not self.spent:
            if now - self.start <= _TURN:
                return False
            self.spent = True                # this caller used it up: it waits
            return True
        if not self.next_due:
            self.next_due = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        return True

    def _next_turn(self) -> None:
        self.start = self.last = time.perf_counter()
        self.spent = self.next_due = False


def _loop_wake(fut: "asyncio.Future[Any]") -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncConsumer:
    """A consumer for asyncio: ``await get(timeout)``, ``async for``,
    ``set_max_in_flight()``, ``await close()``; an async context manager.

    Messages are minq's ``Message``: ``finish()``, ``requeue(delay)`` and
    ``touch()`` never block, so a coroutine calls them as they are.  Any
    number of tasks may wait in ``get()`` at once; cancelling one loses no
    message.  ``AsyncBroker.consumer`` and ``AsyncClient.consumer`` make them.
    """

    topic: str
    channel: str

    def _init_inbox(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Delivered, not yet taken: a deque, appended to from any thread.
        self._inbox: Deque[Any] = collections.deque()
        self._getters: Deque["asyncio.Future[Any]"] = collections.deque()
        self._ending = False      # get() returns None (closing, or a subscription stopping)
        self._turns = _Turns()

    def _valid(self, msg: Any) -> bool:
        """Whether a buffered message is still in flight for us."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Wake as many waiting getters as there are messages (all, once ending)."""
        getters, n = self._getters, len(self._inbox)
        while getters and (n > 0 or self._ending):
            fut = getters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def _before_wait(self) -> None:
        """About to wait for a message (the in-process consumer frees slots)."""

    async def get(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, waiting up to *timeout* seconds (None: until one
        comes); None on timeout or once the consumer is closing."""
        if self._turns.over():         # a full inbox is drained without waiting
            await asyncio.sleep(0)
        loop, inbox = self._loop, self._inbox
        deadline = None if timeout is None else loop.time() + timeout
        while not self._ending:
            while inbox:
                msg = inbox.popleft()
                if self._valid(msg):
                    return msg
            self._before_wait()
            if inbox:
                continue
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return None
            fut = loop.create_future()
            self._getters.append(fut)
            timer = None if left is None else loop.call_later(left, _loop_wake, fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake()            # our wake-up goes to another getter
                raise
            finally:
                if timer is not None:
                    timer.cancel()
        return None

    def __aiter__(self) -> "AsyncConsumer":
        return self

    async def __anext__(self) -> Message:
        msg = await self.get()
        if msg is None:
            raise StopAsyncIteration
        return msg

    def set_max_in_flight(self, n: int) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        """Make every ``get()`` return None, now and later."""
        self._ending = True
        self._wake()

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> "AsyncConsumer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncSubscription:
    """Tasks that run ``await handler(message)`` on what a consumer gets, at
    most *concurrency* at once.  Returning finishes the message; raising
    logs and requeues it after ``backoff * 2**(attempts-1)`` seconds (at
    most *max_backoff*), as ``subscribe`` does.  ``await close()`` stops
    delivery, lets running handlers end, and gives the rest back."""

    def __init__(self, consumer: AsyncConsumer, handler: Callable[[Message], Any],
                 concurrency: int, backoff: float, max_backoff: float,
                 middleware: Iterable[Layer]) -> None:
        _check_range("concurrency", concurrency, 1, 100_000)
        _check_range("backoff", backoff, 0, None)
        _check_range("max_backoff", max_backoff, 0, None)
        self.consumer = consumer
        self.handler = _chain_async(handler, middleware)
        self.backoff, self.max_backoff = backoff, max_backoff
        self._tasks = [asyncio.ensure_future(self._work()) for _ in range(concurrency)]
        self._closed = False

    async def _work(self) -> None:
        get, handler = self.consumer.get, self.handler
        while True:
            msg = await get()
            if msg is None:
                return
            try:
                await handler(msg)
            except Exception:
                _handler_failed(msg, self.backoff, self.max_backoff)
            else:
                _HandlerPool._settle_quietly(msg, "finish", 0.0)

    async def close(self) -> None:
        """Stop delivery, let running handlers end, give back what was not handled."""
        if self._closed:
            return
        self._closed = True
        try:
            self.consumer.set_max_in_flight(0)
        except (ConnectionLost, MinqError):
            pass
        self.consumer._end()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.consumer.close()

    async def __aenter__(self) -> "AsyncSubscription":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


AsyncHandler = Callable[[Message], Any]


def _chain_async(handler: AsyncHandler, middleware: Iterable[Layer]) -> AsyncHandler:
    """*handler* inside its async layers (a built-in layer's ``aio`` form)."""
    call = handler
    for layer in reversed(list(middleware)):
        call = functools.partial(_through_async, getattr(layer, "aio", layer), call)
    return call


async def _through_async(layer: Callable[..., Any], inner: AsyncHandler, msg: Message) -> Any:
    return await layer(msg, inner)


# -- in-process: AsyncBroker ------------------------------------------------------

class _AsyncLocalConsumer(_LocalConsumer, AsyncConsumer):
    """A channel's consumer whose messages reach the event loop's tasks.

    The broker delivers on its threads (a publisher's, the timer's) into a
    deque and wakes the loop once per batch with ``call_soon_threadsafe``;
    on the loop's own thread it wakes the getters directly.
    """

    def __init__(self, owner: "AsyncBroker", topic: str, channel: str, max_in_flight: int,
                 msg_timeout: Optional[float], weight: int) -> None:
        broker = owner.broker
        broker._check_consumer_options(max_in_flight, msg_timeout, weight)
        Consumer.__init__(self, max_in_flight, msg_timeout, weight)
        self._init_inbox()
        self._turns = owner._turns
        self.owner, self.topic, self.channel_name = owner, topic, channel
        self._loop_thread = threading.get_ident()
        self._wake_sent = False
        # What Broker.close calls, on its thread: a plain close() of its own.
        self._closer = types.SimpleNamespace(close=self._detach)
        self._join(broker, topic, channel, self._closer)
        owner._consumers.append(self)

    # ``channel`` is the Consumer's Channel object; the name is channel_name.
    def _deliver(self, msg: _Delivery) -> None:
        self._deliver_many([msg])

    def _deliver_many(self, msgs: List[_Delivery]) -> None:
        self._inbox.extend(msgs)
        if threading.get_ident() == self._loop_thread:
            self._wake()
        elif not self._wake_sent:
            self._wake_sent = True
            self._call_in_loop(self._woken)

    def _woken(self) -> None:
        self._wake_sent = False       # first: a delivery after this sends its own wake-up
        self._wake()

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:          # the loop is closed: nobody is waiting any more
            pass

    def _on_channel_closed(self) -> None:
        self.closed = True
        self._ending = True
        if threading.get_ident() == self._loop_thread:
            self._wake()
        else:
            self._call_in_loop(self._wake)

    def _valid(self, msg: Any) -> bool:
        ch = self.channel
        return ch is not None and ch.holds(msg)   # not timed out while it waited here

    def _before_wait(self) -> None:
        ch = self.channel
        if ch is not None and ch._finished:
            ch.settle()                # the slots of finished messages, before waiting

    def _detach(self) -> None:
        self._leave(self._closer)

    async def close(self) -> None:
        """Detach from the channel; messages still in flight are requeued."""
        self._detach()
        if self in self.owner._consumers:
            self.owner._consumers.remove(self)


class _Committer:
    """One thread that waits for fsync mode's group commits on behalf of an
    event loop: each publish's (log, position) pairs go in with a future;
    every future of a round is resolved in one call on the loop."""

    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self.broker, self.loop = broker, loop
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._ended = loop.create_future()      # set by the thread as it returns
        self._thread = threading.Thread(target=self._run, name="minq-async-commit")
        self._thread.start()

    def wait(self, topic: str, written: List[Tuple[SegmentLog, int]],
             fut: "asyncio.Future[Any]") -> None:
        self._queue.put((topic, written, fut))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            done = []
            for item in batch:
                if item is None:
                    continue
                topic, written, fut = item
                try:
                    self.broker._sync_written(topic, written)
                    done.append((fut, None))
                except Exception as e:       # every waiter hears its outcome
                    done.append((fut, e))
            if done or stop:
                try:
                    self.loop.call_soon_threadsafe(self._resolve, done, stop and self._ended)
                except RuntimeError:
                    pass                   # the loop is gone
            if stop:
                return

    @staticmethod
    def _resolve(done: List[Tuple["asyncio.Future[Any]", Optional[BaseException]]],
                 ended: Any = None) -> None:
        if ended:
            _loop_wake(ended)
        for fut, error in done:
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def close(self) -> None:
        """Stop once every queued wait is answered (never blocking the loop)."""
        self._queue.put(None)
        await self._ended
        self._thread.join()           # it has returned, or is about to


class AsyncBroker:
    """A ``Broker`` of this process for asyncio code: the Broker's publish,
    consumer and subscribe shapes, as coroutines and async iterators.

    Publishing never blocks the loop on a disk: in fsync mode the publish
    is written at once and awaited while its group commit runs on one
    helper thread.  ``await close()`` closes this wrapper's consumers and
    subscriptions (not the broker, which stays its owner's).
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._consumers: List[_AsyncLocalConsumer] = []
        self._subscriptions: List[AsyncSubscription] = []
        self._committer: Optional[_Committer] = None
        self._turns = _Turns()

    async def publish(self, topic: str, body: bytes, defer: float = 0.0) -> Message:
        """Publish one message (as ``Broker.publish``); returns the stored message."""
        if not self.broker.fsync:
            if self._turns.over():              # nothing to wait for: still, take turns
                await asyncio.sleep(0)
            return self.broker.publish(topic, body, defer)
        return (await self._publish_synced(topic, [body], defer))[0]

    async def publish_many(self, topic: str, bodies: Iterable[bytes]) -> List[Message]:
        """Publish several messages atomically (as ``Broker.publish_many``)."""
        if not self.broker.fsync:
            if self._turns.over():
                await asyncio.sleep(0)
            return self.broker.publish_many(topic, bodies)
        return await self._publish_synced(topic, list(bodies), 0.0)

    async def _publish_synced(self, topic: str, bodies: List[bytes],
                              defer: float) -> List[Message]:
        written: List[Tuple[SegmentLog, int]] = []
        msgs = self.broker._publish_unsynced(topic, bodies, defer, written)
        if written:
            loop = asyncio.get_running_loop()
            if self._committer is None:
                self._committer = _Committer(self.broker, loop)
            fut = loop.create_future()
            self._committer.wait(topic, written, fut)
            await fut
        return msgs

    def consumer(self, topic: str, channel: str, max_in_flight: int = 1, *,
                 msg_timeout: Optional[float] = None, weight: int = 1) -> AsyncConsumer:
        """An async consumer of *topic*/*channel* (as ``Broker.consumer``); call it
        from a coroutine of the loop that will read it."""
        return _AsyncLocalConsumer(self, topic, channel, max_in_flight, msg_timeout, weight)

    async def subscribe(self, topic: str, channel: str, handler: AsyncHandler,
                        max_in_flight: int = 32, concurrency: int = 4, *,
                        msg_timeout: Optional[float] = None, weight: int = 1,
                        backoff: float = 1.0, max_backoff: float = 60.0,
                        middleware: Iterable[Layer] = ()) -> AsyncSubscription:
        """Run ``await handler(message)`` on every message, *concurrency* at once."""
        cons = self.consumer(topic, channel, max_in_flight, msg_timeout=msg_timeout,
                             weight=weight)
        sub = AsyncSubscription(cons, handler, concurrency, backoff, max_backoff, middleware)
        self._subscriptions.append(sub)
        return sub

    async def close(self) -> None:
        """Close this wrapper's subscriptions and consumers; stop its commit thread."""
        for sub in list(self._subscriptions):
            await sub.close()
        self._subscriptions.clear()
        for cons in list(self._consumers):
            await cons.close()
        if self._committer is not None:
            committer, self._committer = self._committer, None
            await committer.close()

    async def __aenter__(self) -> "AsyncBroker":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# -- over TCP: AsyncClient ---------------------------------------------------------

class _AsyncConnection(asyncio.Protocol):
    """One AsyncClient connection: ``_ClientWire`` over an asyncio transport.

    ``send`` queues a command; what one pass of the loop queued is encoded
    and written at its end, in one piece.  Heartbeats are answered; with no
    data for two heartbeat intervals the connection is dropped as dead.
    ``on_frame(conn, type, data)`` gets every frame after the handshake;
    ``lost`` is a future set to why it ended (a ConnectionLost or the error seen).
    """

    def __init__(self, options: "_ClientOptions", host: str,
                 on_frame: Callable[["_AsyncConnection", int, bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.wire = _ClientWire(options, host)
        self.on_frame = on_frame
        self.transport: Optional[asyncio.Transport] = None
        self.closed = False
        self.ready: "asyncio.Future[None]" = loop.create_future()
        self.lost: "asyncio.Future[BaseException]" = loop.create_future()   # why it ended
        self.requests: Deque[Tuple["asyncio.Future[None]", bytes]] = collections.deque()
        self.refused = False            # the server answered a command with a fatal error
        self.rdy = 0                    # the RDY last sent (consumers)
        self._why: Optional[BaseException] = None
        self._out: List[bytes] = []
        self._interval = options.heartbeat_interval
        self._last_read = loop.time()
        self._watch: Optional[asyncio.TimerHandle] = None

    # -- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.wire.hello())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        wire = self.wire
        try:
            frames = wire.feed(data)
        except (MinqError, ssl.SSLError) as e:
            self.abort(e)
            return
        except zlib.error as e:
            self.abort(ProtocolError("E_PROTOCOL", f"a broken deflate stream: {e}"))
            return
        out = wire.outgoing()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        if wire.heartbeats:
            nops, wire.heartbeats = wire.heartbeats, 0
            self.send(b"NOP\n" * nops)
        if not self.ready.done() and wire.ready:
            self.ready.set_result(None)
            if self._interval > 0:
                self._watch = self.loop.call_later(2 * self._interval, self._check_alive)
        on_frame = self.on_frame
        for ftype, payload in frames:
            on_frame(self, ftype, payload)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        why = self._why or ConnectionLost(f"connection lost: {exc}" if exc else
                                          "connection closed by the peer")
        if self._watch is not None:
            self._watch.cancel()
        if not self.ready.done():
            self.ready.set_exception(why)
            self.ready.exception()      # retrieved: the connector reports it
        if not self.lost.done():
            self.lost.set_result(why)

    # -- ours ---------------------------------------------------------------------
    def _check_alive(self) -> None:
        idle = self.loop.time() - self._last_read
        if idle >= 2 * self._interval:
            self.abort(ConnectionLost("no data from the server within two heartbeat intervals"))
        else:
            self._watch = self.loop.call_later(2 * self._interval - idle, self._check_alive)

    def send(self, data: bytes) -> None:
        """Queue a command; written (with the others of this pass) at its end."""
        if self.closed:
            raise ConnectionLost("the connection is closed")
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._out and not self.closed:
            data = b"".join(self._out)
            self._out.clear()
            try:
                self.transport.write(self.wire.encode(data))  # type: ignore[union-attr]
            except (ssl.SSLError, zlib.error) as e:
                self.abort(e)
        else:
            self._out.clear()

    def abort(self, why: BaseException) -> None:
        """Drop the connection at once, for *why*."""
        if self._why is None:
            self._why = why
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Write what is queued, then close."""
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.closed = True
            if self._why is None:
                self._why = ConnectionLost("closed by this client")
            self.transport.close()

    async def closed_within(self, timeout: float) -> None:
        """Close, and wait until the connection is gone: a peer that does not
        read what is still queued for it is cut off after *timeout* seconds."""
        self.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)
        except asyncio.TimeoutError:
            self.abort(ConnectionLost("the server did not take the last bytes"))
            await self.lost


async def _async_connect(options: "_ClientOptions", address: Any,
                         on_frame: Callable[[_AsyncConnection, int, bytes], None]
                         ) -> _AsyncConnection:
    """A connection through its handshake, within the options' *timeout*."""
    host, port = _split_address(address, TCP_PORT)
    loop = asyncio.get_running_loop()
    conn = _AsyncConnection(options, host, on_frame)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: conn, host, port),
                               options.timeout)
        await asyncio.wait_for(asyncio.shield(conn.ready), options.timeout)
    except asyncio.TimeoutError:
        conn.abort(ConnectionLost("timed out"))
        raise ConnectionLost(f"no answer from {host}:{port} within "
                             f"{options.timeout:g}s") from None
    except OSError as e:
        raise ConnectionLost(f"cannot connect to {host}:{port}: {e}") from e
    except BaseException:
        conn.abort(ConnectionLost("connecting was abandoned"))
        raise
    return conn


class _Resend(Exception):
    """A command the server never read (an earlier one was refused): send again."""


class AsyncClient(_ClientOptions):
    """``Client`` for asyncio: publish to and consume from minq or nsqd over TCP.

    ``await publish()`` and ``await publish_many()`` share one connection:
    every task's command is written at once and the replies are matched in
    order, so a thousand concurrent publishers need one connection, not a
    thousand.  ``consumer()`` and ``await subscribe()`` read one server
    (*address*), or, with *lookupd_http_addresses*, every nsqd that those
    nsqlookupds list for the topic, asked every *lookupd_poll_interval*
    seconds: producers that appear are connected, those that go are
    dropped, and *max_in_flight* is shared among the connections.  The
    other options are ``Client``'s.  ``await close()`` leaves no task behind.
    """

    def __init__(self, address: Any = DEFAULT_TCP_ADDRESS, *,
                 lookupd_http_addresses: Iterable[str] = (),
                 lookupd_poll_interval: float = 60.0, **options: Any) -> None:
        super().__init__(address, **options)
        if isinstance(lookupd_http_addresses, str):
            lookupd_http_addresses = [lookupd_http_addresses]
        self.lookupd_http_addresses = list(lookupd_http_addresses)
        _check_range("lookupd_poll_interval", lookupd_poll_interval, 0.01, None)
        self.lookupd_poll_interval = lookupd_poll_interval
        self._pub_conn: Optional[_AsyncConnection] = None
        self._connecting: Optional["asyncio.Future[_AsyncConnection]"] = None
        self._consumers: List["_AsyncRemoteConsumer"] = []
        self._subscriptions: List[AsyncSubscription] = []
        self._closed = False

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- publishing --------------------------------------------------------------
    async def publish(self, topic: str, body: bytes, defer: float = 0.0) -> None:
        """PUB (or DPUB when *defer* > 0 seconds); returns once the server said OK."""
        await self._request(_cmd_pub(topic, body, defer))

    async def publish_many(self, topic: str, bodies: Iterable[bytes],
                           defer: float = 0.0) -> None:
        """MPUB: all messages are accepted or none."""
        await self._request(_cmd_mpub(topic, bodies, defer))

    async def _request(self, data: bytes) -> None:
        while True:
            conn = self._pub_conn
            if conn is None or conn.closed or conn.refused:
                conn = await self._producer()
            fut = conn.loop.create_future()
            conn.requests.append((fut, data))
            conn.send(data)
            try:
                return await fut
            except _Resend:
                continue

    async def _producer(self) -> _AsyncConnection:
        """The publishing connection, (re)connected with backoff within *timeout*."""
        if self._closed:
            raise BrokerClosed("the client is closed")
        if self.address is None:
            raise InvalidArgument("this client has no address to publish to (only lookupd)")
        if self._connecting is None:        # the first caller connects; the others wait
            self._connecting = asyncio.ensure_future(self._connect_producer())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect_producer(self) -> _AsyncConnection:
        deadline = asyncio.get_running_loop().time() + self.timeout
        conn = await _async_retry(lambda: _async_connect(self, self.address, self._on_reply),
                                  deadline, self.max_backoff)
        self._pub_conn = conn
        conn.lost.add_done_callback(functools.partial(self._producer_lost, conn))
        return conn

    @staticmethod
    def _on_reply(conn: _AsyncConnection, ftype: int, payload: bytes) -> None:
        if ftype == FRAME_TYPE_MESSAGE:
            return
        if not conn.requests:
            log.warning("publishing connection: a reply to no command: %r", payload[:80])
            return
        fut, _ = conn.requests.popleft()
        if ftype == FRAME_TYPE_ERROR:
            # Every publishing error is fatal in NSQ: the server closes the
            # connection after it, reading no further.  Commands sent after
            # this one were never read: they go again on a new connection.
            conn.refused = True
            if not fut.done():
                fut.set_exception(_reply_error(payload))
            conn.abort(ProtocolError("E_PROTOCOL", "the server refused a command"))
        elif not fut.done():
            fut.set_result(None)

    @staticmethod
    def _producer_lost(conn: _AsyncConnection, lost: "asyncio.Future[Any]") -> None:
        why = lost.result()
        for fut, _ in conn.requests:
            if fut.done():
                continue
            if conn.refused:
                fut.set_exception(_Resend())
            else:
                fut.set_exception(ConnectionLost(
                    f"connection lost before the reply ({why}): the message may or may "
                    f"not have been published"))
        conn.requests.clear()

    # -- consuming ---------------------------------------------------------------
    def consumer(self, topic: str, channel: str, max_in_flight: int = 1) -> AsyncConsumer:
        """An async consumer of *topic*/*channel* (SUB, RDY *max_in_flight* shared
        among its connections); call it from a coroutine.  Its ``subscribed``
        future is done once a server confirmed the SUB."""
        if self._closed:
            raise BrokerClosed("the client is closed")
        return _AsyncRemoteConsumer(self, topic, channel, max_in_flight)

    async def subscribe(self, topic: str, channel: str, handler: AsyncHandler,
                        max_in_flight: int = 32, concurrency: int = 4, *,
                        backoff: float = 1.0, max_backoff: float = 60.0,
                        middleware: Iterable[Layer] = ()) -> AsyncSubscription:
        """Run ``await handler(message)`` on every message, *concurrency* at once;
        returns once the server confirmed the SUB (at most *timeout* seconds
        with a direct address; it keeps trying after that)."""
        cons = self.consumer(topic, channel, max_in_flight)
        sub = AsyncSubscription(cons, handler, concurrency, backoff, max_backoff, middleware)
        self._subscriptions.append(sub)
        if not self.lookupd_http_addresses:
            try:
                await asyncio.wait_for(asyncio.shield(cons.subscribed), self.timeout)
            except asyncio.TimeoutError:
                log.warning("subscription %s/%s: not subscribed within %gs; still trying",
                            topic, channel, self.timeout)
        return sub

    async def close(self) -> None:
        """Close subscriptions (running handlers end first), consumers and the
        publishing connection; no task of this client is left."""
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        self._subscriptions.clear()
        for cons in list(self._consumers):
            await cons.close()
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        conn = self._pub_conn
        if conn is not None:
            await conn.closed_within(self.timeout)


async def _async_retry(connect: Callable[[], Any], deadline: float,
                       max_backoff: float) -> _AsyncConnection:
    """Await *connect()* until it succeeds, backing off exponentially, until *deadline*."""
    loop = asyncio.get_running_loop()
    delay = _FIRST_RETRY
    while True:
        try:
            return await connect()
        except (ConnectionLost, ssl.SSLError) as e:
            left = deadline - loop.time()
            if left <= 0:
                raise e if isinstance(e, ConnectionLost) else ConnectionLost(str(e)) from e
            await asyncio.sleep(min(delay, left, max_backoff))
            delay *= 2


_RDY_ROTATE = 5.0     # seconds between moves of RDY when connections outnumber max_in_flight


class _AsyncRemoteConsumer(AsyncConsumer):
    """An AsyncClient's consumer: a task per server it reads (reconnecting
    with backoff), and with lookupd a task that follows the topic's servers.

    *max_in_flight* is split among the connections, never more in all;
    when there are more connections than that, the RDY of 1 moves round
    them every few seconds, so none starves (as go-nsq does).
    """

    def __init__(self, client: AsyncClient, topic: str, channel: str, max_in_flight: int) -> None:
        validate_name(topic)
        validate_name(channel, "channel")
        _check_range("max_in_flight", max_in_flight, 0, None)
        self._init_inbox()
        self.client, self.topic, self.channel = client, topic, channel
        self.max_in_flight = max_in_flight
        self._conns: Dict[str, _AsyncConnection] = {}       # address -> subscribed connection
        self._tasks: Dict[str, "asyncio.Task[None]"] = {}    # address -> the task that keeps it
        self._listed: Optional[set] = None     # what lookupd lists (None: no lookupd)
        self._recheck: Optional["asyncio.Future[None]"] = None
        self._turn = 0
        self._rotation: Optional[asyncio.TimerHandle] = None
        self._lookup_task: Optional["asyncio.Task[None]"] = None
        self.subscribed: "asyncio.Future[None]" = self._loop.create_future()   # a first SUB's OK
        client._consumers.append(self)
        if client.lookupd_http_addresses:
            self._listed = set()
            self._lookup_task = asyncio.ensure_future(self._follow_lookupd())
        else:
            self._keep(_address_text(client.address))

    @property
    def connections(self) -> List[str]:
        """The servers this consumer is subscribed to now."""
        return sorted(self._conns)

    def _keep(self, address: str) -> None:
        self._tasks[address] = asyncio.ensure_future(self._run(address))

    async def _run(self, address: str) -> None:
        client = self.client
        delay = _FIRST_RETRY
        while not self._ending:
            if self._listed is not None and address not in self._listed:
                break                               # lookupd no longer lists it
            try:
                conn = await _async_connect(client, address, self._on_frame)
            except (MinqError, OSError, ssl.SSLError) as e:
                log.warning("consumer %s/%s: %s", self.topic, self.channel, e)
                if self._listed is not None:
                    break                           # lookupd says when to try again
                await asyncio.sleep(delay)
                delay = min(delay * 2, client.max_backoff)
                continue
            try:
                conn.send(b"SUB %s %s\n" % (self.topic.encode(), self.channel.encode()))
            except ConnectionLost:
                continue
            self._conns[address] = conn
            self._share_rdy()
            delay = _FIRST_RETRY
            try:
                why = await asyncio.shield(conn.lost)
            except asyncio.CancelledError:
                conn.abort(ConnectionLost("the consumer closed"))
                raise
            finally:
                if self._conns.get(address) is conn:
                    del self._conns[address]
                    self._share_rdy()
            if self._ending:
                break
            log.warning("consumer %s/%s: connection to %s lost (%s)%s", self.topic, self.channel,
                        address, why, "" if self._listed is None else "; asking lookupd")
            if self._listed is not None:
                self._listed.discard(address)
                self._poll_soon()
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, client.max_backoff)
        if self._tasks.get(address) is asyncio.current_task():
            del self._tasks[address]

    def _on_frame(self, conn: _AsyncConnection, ftype: int, payload: bytes) -> None:
        if ftype == FRAME_TYPE_MESSAGE:
            try:
                msg = _RemoteMessage(conn, payload)  # type: ignore[arg-type]
            except struct.error:
                conn.abort(ProtocolError("E_PROTOCOL", "a message frame too short"))
                return
            self._inbox.append(msg)
            if self._getters:
                self._wake()
        elif ftype == FRAME_TYPE_ERROR:
            log.warning("consumer %s/%s: %s", self.topic, self.channel,
                        payload.decode(errors="replace"))
        elif payload == b"OK" and not self.subscribed.done():
            self.subscribed.set_result(None)

    def _valid(self, msg: Any) -> bool:
        return not msg._conn.closed            # its connection's messages were requeued

    # -- RDY: max_in_flight shared among the connections --------------------------
    def set_max_in_flight(self, n: int) -> None:
        """A new RDY window in all (0 pauses delivery)."""
        _check_range("max_in_flight", n, 0, None)
        self.max_in_flight = n
        self._share_rdy()

    def _share_rdy(self) -> None:
        conns = [self._conns[a] for a in sorted(self._conns)]
        if not conns:
            return
        n, total = len(conns), self.max_in_flight
        each, extra = divmod(total, n)
        for i, conn in enumerate(conns):
            rdy = each + (1 if (i - self._turn) % n < extra else 0)
            if rdy != conn.rdy and not conn.closed:
                conn.rdy = rdy
                conn.send(b"RDY %d\n" % rdy)
        if self._rotation is not None:
            self._rotation.cancel()
            self._rotation = None
        if 0 < total < n and not self._ending:
            self._rotation = self._loop.call_later(_RDY_ROTATE, self._rotate)

    def _rotate(self) -> None:
        self._rotation = None
        self._turn += self.max_in_flight
        self._share_rdy()

    # -- lookupd ---------------------------------------------------------------------
    async def _follow_lookupd(self) -> None:
        client, loop = self.client, self._loop
        while not self._ending:
            answers = await asyncio.gather(*[
                _lookup_async(lookupd, self.topic, client.timeout)
                for lookupd in client.lookupd_http_addresses])
            found = [a for a in answers if a is not None]
            if found:                       # none answered: keep what we had
                self._listed = set().union(*found)
                for address in sorted(self._listed):
                    if address not in self._tasks:
                        self._keep(address)
            self._recheck = loop.create_future()
            timer = loop.call_later(client.lookupd_poll_interval, _loop_wake, self._recheck)
            try:
                await self._recheck
            finally:
                timer.cancel()
                self._recheck = None

    def _poll_soon(self) -> None:
        if self._recheck is not None:
            self._loop.call_later(_FIRST_RETRY, _loop_wake, self._recheck)

    async def close(self) -> None:
        """Disconnect: the servers requeue whatever this consumer held in flight."""
        self._end()
        if self._rotation is not None:
            self._rotation.cancel()
        tasks = list(self._tasks.values())
        if self._lookup_task is not None:
            tasks.append(self._lookup_task)
        conns = list(self._conns.values())
        for conn in conns:
            conn.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            await conn.closed_within(self.client.timeout)
        self._conns.clear()
        if self in self.client._consumers:
            self.client._consumers.remove(self)


def _address_text(address: Any) -> str:
    host, port = _split_address(address, TCP_PORT)
    return f"{host}:{port}"


async def _lookup_async(lookupd: str, topic: str, timeout: float) -> Optional[set]:
    """The TCP addresses nsqlookupd lists for *topic* (an empty set for a topic
    it does not know); None if it could not be asked."""
    base = lookupd if "://" in lookupd else f"http://{lookupd}"
    url = urllib.parse.urlsplit(f"{base}/lookup?{urllib.parse.urlencode({'topic': topic})}")
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            url.hostname, url.port or (443 if url.scheme == "https" else 80),
            ssl=url.scheme == "https" or None), timeout)
        writer.write(f"GET {url.path}?{url.query} HTTP/1.0\r\nHost: {url.netloc}\r\n"
                     f"Accept: application/vnd.nsq; version=1.0\r\n\r\n".encode())
        reply = await asyncio.wait_for(reader.read(), timeout)
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split(None, 2)[1])
        if status == 404:
            return set()                    # lookupd does not know the topic (yet)
        if status != 200:
            raise ValueError(f"status {status}")
        data = json.loads(body)
        data = data.get("data", data) if isinstance(data, dict) else data
        return {f"{p['broadcast_address']}:{p['tcp_port']}" for p in data.get("producers") or []}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            asyncio.TimeoutError) as e:
        log.warning("lookupd %s: %s", lookupd, e or type(e).__name__)
        return None
    finally:
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass


# =============================================================================
# The faces: one I/O loop, its connections, NSQ protocol V2 and HTTP/1.1
#
# One thread's event loop (_EventLoop) serves every connection of the TCP
# and HTTP faces (_Face: listener, accepting, workers, an orderly close).
# A _ServerConnection knows bytes, its layers (TLS, compression), buffers
# and timers; the protocol spoken over it is _NSQProtocol (nsqd's client
# protocol; to the core, a Consumer) or _HTTPProtocol (a strict HTTP/1.1
# reader and response writer for an application, HTTPServer).  Each read
# runs every complete command in the buffer; output is written once per
# pass of the loop.  Single publishes of one pass go to the core together
# (_PublishBatch).  Deliveries made on other threads reach the loop through
# its inbox, one wake-up per batch; commands that may block run on worker
# threads while their connection waits.  Only the core's public methods are
# called.  First what the faces share (AUTH's Authorizer, the body memory
# budget, listening, TLS settings); last the nsqlookupd registration loop
# (lookupd's TCP protocol V1), which follows the broker's topics and
# channels through Broker.watch.
# =============================================================================

STATE_INIT, STATE_SUBSCRIBED, STATE_CLOSING = 0, 3, 4
_NON_FATAL = frozenset({"E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"})
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}")


class _ClientError(Exception):
    """An error frame to send; fatal unless the code is one of _NON_FATAL."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.fatal = code not in _NON_FATAL


def _parse_uint(value: bytes, what: str) -> int:
    """nsqd parses numbers as unsigned decimal digits only."""
    if not _DIGITS.fullmatch(value):
        raise _ClientError("E_INVALID", f"{what} {value.decode(errors='replace')}")
    return int(value)


class _AuthState:
    """What an AUTH secret allows: nsqd's authorizations, with an expiry.

    Raises ValueError for a reply of any other shape (an auth server is
    trusted for its answer, not for its JSON).
    """

    def __init__(self, reply: Any, now: float) -> None:
        if not isinstance(reply, dict):
            raise ValueError("not a JSON object")
        self.identity = _auth_field(reply, "identity", str, "")
        self.identity_url = _auth_field(reply, "identity_url", str, "")
        ttl = _auth_field(reply, "ttl", (int, float), None)
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl {ttl} is not positive")
        self.expires = now + ttl if ttl is not None else math.inf
        self.rules: List[Tuple[Any, List[Any], frozenset]] = []
        rules = _auth_field(reply, "authorizations", list, [])
        for a in rules:
            if not isinstance(a, dict):
                raise ValueError("an authorization is not a JSON object")
            topic = _auth_field(a, "topic", str, None)
            if topic is None:
                raise ValueError("an authorization without a topic")
            channels = _auth_field(a, "channels", list, [])
            perms = _auth_field(a, "permissions", list, [])
            if not all(isinstance(x, str) for x in channels + perms):
                raise ValueError("channels and permissions must be strings")
            if not perms or not set(perms) <= {"subscribe", "publish"}:
                raise ValueError(f"unknown permissions {sorted(perms)}")
            try:
                self.rules.append((re.compile(topic), [re.compile(c) for c in channels],
                                   frozenset(perms)))
            except re.error as e:
                raise ValueError(f"bad regular expression: {e}") from None

    def allows(self, permission: str, topic: str, channel: str) -> bool:
        # Regexes are unanchored, as nsqd's MatchString; PUB checks channel "".
        return any(permission in perms and t.search(topic) and any(c.search(channel) for c in chans)
                   for t, chans, perms in self.rules)


def _auth_field(reply: Dict[str, Any], key: str, kind: Any, default: Any) -> Any:
    value = reply.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key!r} has the wrong type ({type(value).__name__})")
    return value


class Authorizer:
    """Answers AUTH: from nsqd's auth servers (``--auth-http-address``) or a secrets file.

    The secrets file is JSON mapping each secret to what an auth server would
    reply: ``{"s3cret": {"identity": "ingest", "authorizations": [{"topic":
    "^orders$", "channels": [".*"], "permissions": ["publish"]}]}}``.

    Guessing is throttled: after ``max_failures`` failed AUTHs from one
    address within ``failure_window`` seconds, AUTH from it fails at once
    for ``lockout`` seconds.
    """

    max_failures = 10
    failure_window = 60.0
    lockout = 30.0

    def __init__(self, http_addresses: Iterable[str] = (), secrets_file: Optional[str] = None,
                 timeout: float = 5.0) -> None:
        self.urls = [a if "://" in a else f"http://{a}/auth" for a in http_addresses]
        self.timeout = timeout
        self.secrets: Dict[str, Dict[str, Any]] = {}
        self._failures: Dict[str, List[float]] = {}    # address -> recent failure times
        self._locked: Dict[str, float] = {}
        self._lock = threading.Lock()
        if secrets_file:
            try:
                with open(secrets_file, "rb") as f:
                    data = json.load(f)
                if not isinstance(data, dict):
                    raise ValueError("expected a JSON object of secrets")
                for secret, reply in data.items():
                    _AuthState(reply, 0.0)  # fail now on a bad rule, not at AUTH time
            except (ValueError, RecursionError) as e:
                raise InvalidArgument(f"{secrets_file}: {e}") from None
            self.secrets = data
        if not self.urls and not self.secrets:
            raise InvalidArgument("an Authorizer needs auth server addresses or a secrets file")

    def locked_out(self, address: str) -> float:
        """Seconds until *address* may try AUTH again (0: it may now)."""
        with self._lock:
            left = self._locked.get(address, 0.0) - time.monotonic()
            if left <= 0:
                self._locked.pop(address, None)
            return max(left, 0.0)

    def failed(self, address: str) -> None:
        """Count a failed AUTH from *address*; lock it out after too many."""
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 10_000:       # forget the quiet ones
                self._failures = {a: t for a, t in self._failures.items()
                                  if t[-1] > now - self.failure_window}
            times = [t for t in self._failures.get(address, ()) if t > now - self.failure_window]
            times.append(now)
            if len(times) >= self.max_failures:
                self._locked[address] = now + self.lockout
                log.warning("AUTH: %d failures from %s within %gs; locked out for %gs",
                            len(times), address, self.failure_window, self.lockout)
                times = []
            self._failures[address] = times

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)

    def authorize(self, secret: str, remote_ip: str, tls: bool,
                  common_name: str = "") -> Optional[_AuthState]:
        """The grant for *secret*, or None if it is unknown; raises OSError/ValueError."""
        now = time.monotonic()
        if secret in self.secrets:
            return _AuthState(self.secrets[secret], now)
        if not self.urls:
            return None
        query = urllib.parse.urlencode({"remote_ip": remote_ip, "tls": str(tls).lower(),
                                        "secret": secret, "common_name": common_name})
        last: Optional[BaseException] = None
        for url in random.sample(self.urls, len(self.urls)):
            try:
                with urllib.request.urlopen(f"{url}?{query}", timeout=self.timeout) as r:
                    reply = json.loads(r.read(DEFAULT_MAX_BODY_SIZE))
                if not isinstance(reply, dict) or reply.get("ttl") is None:
                    raise ValueError("a reply without a ttl")
                return _AuthState(reply, now)
            except RecursionError:
                last = ValueError("a reply nested too deep")
                log.warning("auth server %s failed: %s", url, last)
            except (OSError, ValueError) as e:
                last = e
                log.warning("auth server %s failed: %s", url, e)
        raise last if last is not None else OSError("no auth server answered")


class MemoryBudget:
    """Bytes of request bodies that all connections may hold at once.

    A front end takes a body's size from it before reading the body (TCP
    ``PUB``/``MPUB``/``DPUB``, HTTP ``/pub``/``/mpub``) and gives it back when
    the publish is done, so a thousand connections that each send a
    maximum-size MPUB wait for each other instead of exhausting memory.
    Bodies under ``SMALL`` bytes are not counted; one body is always let
    through when nothing else is held, whatever its size.
    """

    SMALL = 64 * 1024

    def __init__(self, limit: int) -> None:
        _check_range("limit", limit, 1, None)
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition(threading.Lock())
        self._waiters: List[Callable[[], None]] = []

    def try_take(self, n: int, waiter: Optional[Callable[[], None]] = None) -> bool:
        """Take *n* bytes if they fit now; else remember *waiter*, called
        (on the thread that frees memory) when some is given back."""
        with self._cond:
            if self.used and self.used + n > self.limit:
                if waiter is not None:
                    self._waiters.append(waiter)
                return False
            self.used += n
            return True

    def take(self, n: int, timeout: float) -> bool:
        """Take *n* bytes, waiting up to *timeout* seconds for them to fit."""
        with self._cond:
            if not self._cond.wait_for(lambda: not self.used or self.used + n <= self.limit,
                                       timeout):
                return False
            self.used += n
            return True

    def give_back(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter()


def _listen(address: Any, default_port: int, face: str) -> socket.socket:
    """A listening socket on *address*; InvalidArgument naming the face and
    address when it cannot be had (in use, not an address of this host)."""
    host, port = _split_address(address, default_port)
    try:
        return socket.create_server((host, port), backlog=_LISTEN_BACKLOG,
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise InvalidArgument(f"cannot listen on {face} address {host}:{port}: "
                              f"{e.strerror or e}") from None


_TLS_VERSIONS = {"ssl3.0": "SSLv3", "tls1.0": "TLSv1", "tls1.1": "TLSv1_1",
                 "tls1.2": "TLSv1_2", "tls1.3": "TLSv1_3"}
_TLS_CLIENT_AUTH = ("", "require", "require-verify")


def _server_tls_context(cert: Optional[str], key: Optional[str], root_ca: Optional[str] = None,
                        client_auth: str = "", min_version: str = "") -> Optional[ssl.SSLContext]:
    """nsqd's server TLS settings as an SSLContext (None without a certificate).

    *client_auth* ``require`` or ``require-verify`` asks every client for a
    certificate, verified against *root_ca* (Python's ssl module cannot take
    a certificate without verifying it, so ``require`` verifies too, against
    the system's CAs when no *root_ca* is given).  *min_version* is nsqd's
    ``ssl3.0`` ... ``tls1.3`` ('' = Python's default, TLS 1.2 today).
    """
    if client_auth not in _TLS_CLIENT_AUTH:
        raise InvalidArgument(f"tls client auth policy {client_auth!r}: use require or "
                              f"require-verify")
    if min_version and min_version.lower() not in _TLS_VERSIONS:
        raise InvalidArgument(f"tls min version {min_version!r}: use one of "
                              f"{', '.join(_TLS_VERSIONS)}")
    if not (cert or key):
        if root_ca or client_auth:
            raise InvalidArgument("client certificates need tls_cert and tls_key")
        return None
    if not (cert and key):
        raise InvalidArgument("TLS needs both tls_cert and tls_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
        if root_ca:
            ctx.load_verify_locations(cafile=root_ca)
        elif client_auth:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgument(f"TLS files {cert}, {key}{', ' + root_ca if root_ca else ''}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
    if client_auth:
        ctx.verify_mode = ssl.CERT_REQUIRED
    if min_version:
        ctx.minimum_version = getattr(ssl.TLSVersion, _TLS_VERSIONS[min_version.lower()])
    return ctx


class _EventLoop:
    """One thread's ``selectors`` loop: socket events, timers, calls from other threads.

    Everything registered with it runs on its thread, which runs while a
    face uses it (``attach`` / ``detach``: the TCP and HTTP faces of
    ``serve`` share one loop).  Other threads reach it only through
    ``post``, which appends to an inbox (a deque: thread-safe) and wakes the
    loop once per batch, not once per call.  Timers are kept in heaps with
    lazy deletion: an object with ``_timer_at`` and ``_on_timer(now)`` is
    armed with ``arm``; an entry whose time no longer matches the object's
    ``_timer_at`` is skipped when it comes due.  Two kinds: ``arm`` for
    real time (the mechanics of I/O: lingering, polling a full send queue,
    pausing accepts; and the HTTP face's timeouts) and ``arm_deadline``
    (``_deadline_at``, ``_on_deadline(now)``) for the NSQ protocol's
    deadlines, on *clock*, the broker's: heartbeats, output buffering,
    write deadlines.  A FakeClock's ``advance`` wakes the loop to run those
    that fell due.
    """

    def __init__(self, clock: Any = SystemClock) -> None:
        # epoll straight where there is one (a handler per descriptor, called
        # with epoll's mask); else a selectors selector (its masks).
        self._epoll = select.epoll() if _EPOLL else None
        self._selector = None if _EPOLL else selectors.DefaultSelector()
        self._handlers: Dict[int, Callable[[int], None]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.register(self._wake_r, _EV_READ, self._drain_wake)
        self._inbox: Deque[Tuple[Callable[..., None], Any]] = collections.deque()
        self._woken = False            # a wake-up byte is on its way
        self._timers: List[Tuple[float, int, Any]] = []
        self._deadlines: List[Tuple[float, int, Any]] = []
        self.clock = clock
        self._seq = itertools.count()
        self.dirty: List[Any] = []     # objects whose _after_pass() runs at the end of a pass
        self.ident: Optional[int] = None
        self.stopping = False
        self.now = time.monotonic()    # when the pass began: for timeouts of seconds
        # _users_lock guards _users and _thread: the faces attached, and the
        # thread that runs while there are any.
        self._users_lock = threading.Lock()
        self._users = 0
        self._thread: Optional[threading.Thread] = None

    def attach(self) -> None:
        """A face starts using the loop: its thread runs from now on."""
        with self._users_lock:
            self._users += 1
            if self._thread is None:
                if hasattr(self.clock, "add_listener"):
                    self.clock.add_listener(self.clock_moved)
                self._thread = threading.Thread(target=self.run, name="minq-io")
                self._thread.start()

    def detach(self) -> None:
        """A face is done with the loop; the last one stops and joins its
        thread and releases it.  Not from the loop's own thread."""
        with self._users_lock:
            self._users -= 1
            thread = self._thread if self._users <= 0 else None
        if thread is None:
            return
        if hasattr(self.clock, "remove_listener"):
            self.clock.remove_listener(self.clock_moved)
        self.post(self._stop)
        thread.join()

    def _stop(self, _: Any = None) -> None:
        self.stopping = True

    def call(self, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``fn(arg)`` on the loop's thread and wait for it (from another
        thread; at once if the loop does not run)."""
        if self._thread is None or threading.get_ident() == self.ident:
            fn(arg)
            return
        done = threading.Event()

        def run(_: Any) -> None:
            try:
                fn(arg)
            finally:
                done.set()
        self.post(run)
        done.wait()

    def post(self, fn: Callable[..., None], arg: Any = None) -> None:
        """Run ``fn(arg)`` on the loop's thread soon (from any thread)."""
        self._inbox.append((fn, arg))
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass            # the pipe is full: the loop is awake anyway

    def register(self, sock: Any, events: int, handler: Callable[[int], None]) -> None:
        """Call ``handler(mask)`` when *sock* is ready for *events* (_EV_READ, _EV_WRITE);
        *mask* has _GOT_READ / _GOT_WRITE bits."""
        if self._epoll is not None:
            fd = sock.fileno()
            self._epoll.register(fd, events)
            self._handlers[fd] = handler
        else:
            self._selector.register(sock, events, handler)  # type: ignore[union-attr]

    def modify(self, sock: Any, events: int, handler: Callable[[int], None]) -> None:
        if self._epoll is not None:
            self._epoll.modify(sock.fileno(), events)
        else:
            self._selector.modify(sock, events, handler)  # type: ignore[union-attr]

    def unregister(self, sock: Any) -> None:
        if self._epoll is not None:
            fd = sock.fileno()
            self._epoll.unregister(fd)
            del self._handlers[fd]
        else:
            self._selector.unregister(sock)  # type: ignore[union-attr]

    def arm(self, obj: Any, when: float) -> None:
        """Make sure ``obj._on_timer`` runs by *when* (``time.monotonic()`` seconds)."""
        if when < obj._timer_at:
            obj._timer_at = when
            heapq.heappush(self._timers, (when, next(self._seq), obj))

    def arm_deadline(self, obj: Any, when: float) -> None:
        """Make sure ``obj._on_deadline`` runs by *when* (``clock.monotonic()`` seconds)."""
        if when < obj._deadline_at:
            obj._deadline_at = when
            heapq.heappush(self._deadlines, (when, next(self._seq), obj))

    def clock_moved(self) -> None:
        """A FakeClock was advanced (from any thread): look at the deadlines."""
        self.post(_nothing)

    def run(self) -> None:
        """Serve events until ``stopping`` is set, then release the loop."""
        self.ident = threading.get_ident()
        inbox, handlers = self._inbox, self._handlers
        poll = self._epoll.poll if self._epoll is not None else None
        timers, deadlines, clock = self._timers, self._deadlines, self.clock
        try:
            while not self.stopping:
                if inbox or self.dirty:
                    timeout: Optional[float] = 0.0
                else:
                    timeout = _LOOP_IDLE_WAIT
                    if timers:
                        timeout = min(max(timers[0][0] - time.monotonic(), 0.0), timeout)
                    if deadlines:
                        timeout = min(max(deadlines[0][0] - clock.monotonic(), 0.0), timeout)
                if poll is not None:
                    events = poll(timeout)
                    self.now = time.monotonic()
                    for fd, mask in events:
                        handler = handlers.get(fd)       # (None: closed meanwhile)
                        if handler is not None:
                            handler(mask)
                else:
                    ready = self._selector.select(timeout)  # type: ignore[union-attr]
                    self.now = time.monotonic()
                    for key, mask in ready:
                        key.data(mask)
                if inbox:
                    self._run_inbox()
                if timers and timers[0][0] <= time.monotonic():
                    self._run_timers(timers, "_timer_at", "_on_timer", time.monotonic())
                if deadlines and deadlines[0][0] <= clock.monotonic():
                    self._run_timers(deadlines, "_deadline_at", "_on_deadline",
                                     clock.monotonic())
                if self.dirty:
                    self._end_pass()
        finally:
            self._end_pass()
            self._run_inbox()
            self.close()

    def close(self) -> None:
        """Release the poller and the wake-up sockets (the loop is not running)."""
        with self._users_lock:
            self._thread = None
        (self._epoll or self._selector).close()  # type: ignore[union-attr]
        self._wake_r.close()
        self._wake_w.close()

    def _drain_wake(self, _: int = 0) -> None:
        # Cleared only once the bytes are read: a post() that found it set
        # appended its call before this point, so this pass's inbox run sees
        # it; one that finds it clear sends a byte that wakes the next select.
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._woken = False

    def _run_inbox(self) -> None:
        inbox = self._inbox
        for _ in range(len(inbox)):      # what came meanwhile waits for the next pass
            fn, arg = inbox.popleft()
            try:
                fn(arg)
            except Exception:
                log.exception("I/O loop: %r failed", fn)

    @staticmethod
    def _run_timers(timers: List[Tuple[float, int, Any]], at: str, run: str,
                    now: float) -> None:
        # Every entry of the heap *timers* due by *now* whose object's
        # attribute *at* still names its time: reset it, call method *run*.
        while timers and timers[0][0] <= now:
            when, _, obj = heapq.heappop(timers)
            if getattr(obj, at) != when:
                continue             # re-armed earlier, or already run
            setattr(obj, at, math.inf)
            try:
                getattr(obj, run)(now)
            except Exception:
                log.exception("I/O loop: %s of %r failed", run, obj)

    def _end_pass(self) -> None:
        # Output is written once per pass: every frame a read produced goes
        # out in one send (an _after_pass may dirty others: run until none).
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for obj in dirty:
                try:
                    obj._after_pass()
                except Exception:
                    log.exception("I/O loop: %r failed", obj)


_LOOP_IDLE_WAIT = 1.0            # the longest wait for events when nothing is due
_EPOLL = hasattr(select, "epoll")
if _EPOLL:                       # what to watch for; what a handler's mask may hold
    _EV_READ, _EV_WRITE = select.EPOLLIN, select.EPOLLOUT
    _GOT_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
    _GOT_WRITE = select.EPOLLOUT | select.EPOLLERR
else:
    _EV_READ, _EV_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
    _GOT_READ, _GOT_WRITE = _EV_READ, _EV_WRITE
_LISTEN_BACKLOG = 1024           # pending connections the kernel queues for accept
_RECV_SIZE = 64 * 1024           # bytes read per readable event (above 128 KiB, malloc maps and unmaps each)
_INFLATE_CHUNK = 1 << 20         # bytes inflated per pass (a small input can not balloon)
_MAX_UNSENT = 1 << 20            # unsent bytes beyond which a connection is not read
_TLS_HANDSHAKE_TIMEOUT = 5.0
_LINGER = 0.5                    # after a fatal error: how long unread input is drained
_LINGER_BYTES = 4 << 20          # ... and how much of it, so the error frame is not reset
_OUTQ_CHECK = 256 * 1024         # bytes sent between two looks at the kernel's send queue
_OUTQ_POLL = 0.01                # while it is full: how often to look again
try:                             # bytes a socket has not had acknowledged (Linux, BSDs)
    import termios
    _TIOCOUTQ: Optional[int] = getattr(termios, "TIOCOUTQ", None)
except ImportError:
    _TIOCOUTQ = None


def _nothing(_: Any = None) -> None:
    """What a post() that only wakes the loop runs."""


class _Face:
    """A listening socket served by an event loop (the base of TCPServer and
    HTTPServer): accepts connections and keeps them, runs commands that may
    block on worker threads, and closes in order.

    ``_conns_lock`` guards ``_conns`` (the loop adds and removes; others
    list) and ``_closing``.  Subclasses name their protocol in
    ``_protocol(connection)`` and their threads in ``_name``.
    """

    _name = "face"

    def __init__(self, address: Any, default_port: int, label: str, clock: Any,
                 loop: Optional[_EventLoop], workers: int) -> None:
        self._listener = _listen(address, default_port, label)
        self._listener.setblocking(False)
        self.server_address: Tuple[Any, ...] = self._listener.getsockname()
        self.loop = loop if loop is not None else _EventLoop(clock)
        self._own_loop = loop is None
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"minq-{self._name}-worker")
        self._conns_lock = threading.Lock()
        self._conns: set = set()
        self._closing = False
        self._started = False
        self._accepting = False
        self._accept_paused_until = 0.0
        self._timer_at = math.inf

    @property
    def address(self) -> str:
        """Where the server listens, as ``host:port`` (``[host]:port`` for IPv6)."""
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> "_Face":
        """Serve connections from the loop's thread."""
        self._started = True
        self.loop.attach()
        self.loop.call(self._listen_now)
        return self

    def _listen_now(self, _: Any = None) -> None:
        self.loop.register(self._listener, _EV_READ, self._on_accept)
        self._accepting = True

    def connections(self) -> List["_ServerConnection"]:
        with self._conns_lock:
            return list(self._conns)

    def stop_accepting(self) -> None:
        """Accept no more connections (those open go on)."""
        with self._conns_lock:
            self._closing = True
        self.loop.call(self._unlisten)

    def _unlisten(self, _: Any = None) -> None:
        if self._accepting:
            self.loop.unregister(self._listener)
            self._accepting = False
        self._listener.close()

    def _close_connections(self, _: Any = None) -> None:
        for conn in self.connections():
            conn.shutdown("the server is closing", graceful=False)

    def _finish_close(self) -> None:
        """After the connections: release the loop, join the workers."""
        if self._started:
            self._started = False
            self.loop.detach()
        elif self._own_loop:
            self.loop.close()
        self._workers.shutdown(wait=True)

    def _on_accept(self, mask: int) -> None:
        if time.monotonic() < self._accept_paused_until:
            return
        for _ in range(64):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of file descriptors (EMFILE) and the like: the listener
                # stays readable, so pause accepting instead of spinning.
                log.error("%s: cannot accept a connection: %s; pausing accepts for 0.1s",
                          self._name.upper(), e)
                self._accept_paused_until = time.monotonic() + 0.1
                self.loop.arm(self, self._accept_paused_until)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _ServerConnection(self, sock, addr)
            except OSError as e:
                log.info("%s: dropped a new connection from %s: %s", self._name.upper(),
                         addr, e)
                sock.close()
                continue
            with self._conns_lock:
                self._conns.add(conn)
            conn.start()

    def _on_timer(self, now: float) -> None:
        if self._accepting:
            self._on_accept(_GOT_READ)      # accepts were paused

    def _forget(self, conn: "_ServerConnection") -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def _protocol(self, conn: "_ServerConnection") -> Any:
        raise NotImplementedError

    def _submit(self, conn: "_ServerConnection", fn: Callable[..., Any], *args: Any) -> None:
        """Run *fn* on a worker thread; its outcome, (result, None) or (None,
        exception), goes back to the loop: ``conn.job_done``."""
        def job() -> None:
            try:
                result: Tuple[Any, Optional[BaseException]] = (fn(*args), None)
            except Exception as e:
                result = (None, e)
            conn.proto.job_ended()
            self.loop.post(conn.job_done, result)
        try:
            self._workers.submit(job)
        except RuntimeError:            # the pool is shut down: the server is closing
            conn.shutdown("the server is closing", graceful=False)

    def __enter__(self) -> "_Face":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # type: ignore[attr-defined]


class _PublishBatch:
    """Single publishes that arrive during one pass of the loop, published
    together at its end, before anything is written: one call into the core
    per topic (``Broker.publish_bodies``) instead of one per message.  A
    producer that waits for each OK gets it in the same pass as it would
    anyway; nothing is answered before it is stored.

    ``add(topic, body, waiter)`` queues a body; at the end of the pass each
    waiter hears ``waiter.published(topic, error)`` (error None, or the
    MinqError that refused the whole topic's batch), in the order added.
    A batch never exceeds the broker's ``max_body_size``.  The loop's thread
    only.
    """

    def __init__(self, broker: Broker, loop: _EventLoop) -> None:
        self.broker = broker
        self.loop = loop
        self._topics: Dict[str, Tuple[List[bytes], List[Any]]] = {}
        self._bytes = 0
        self._dirty = False

    def add(self, topic: str, body: bytes, waiter: Any) -> None:
        if self._bytes + len(body) > self.broker.max_body_size:
            self._after_pass()
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = ([], [])
        entry[0].append(body)
        entry[1].append(waiter)
        self._bytes += len(body)
        if not self._dirty:
            self._dirty = True
            self.loop.dirty.append(self)

    def _after_pass(self) -> None:
        self._dirty = False
        topics, self._topics, self._bytes = self._topics, {}, 0
        publish, publish_bodies = self.broker.publish, self.broker.publish_bodies
        for topic, (bodies, waiters) in topics.items():
            error: Optional[MinqError] = None
            try:
                if len(bodies) == 1:
                    publish(topic, bodies[0])
                else:
                    publish_bodies(topic, bodies)
            except MinqError as e:
                error = e
            for waiter in waiters:
                try:
                    waiter.published(topic, error)
                except Exception:
                    log.exception("I/O loop: %r failed to take its publish's outcome", waiter)


class _ServerConnection:
    """One accepted socket in the event loop: bytes in and out, and the
    mechanics around them, for the protocol spoken over it (``proto``:
    ``_NSQProtocol`` or ``_HTTPProtocol``), as nsqd keeps ``client_v2.go``
    apart from ``protocol_v2.go``.

    Input is parsed in place by the protocol: ``rbuf[rpos:]`` holds what was
    read, and the protocol is called (``received``) once ``need`` bytes are
    there, so a big body is joined once, not once per read.  Output goes to
    ``out`` and is written once per pass of the loop (``urgent``: a reply is
    in it; otherwise the protocol decides, ``buffered``).  A peer that does
    not read what it is sent is not read either, once ``_MAX_UNSENT`` waits
    for it here or in the kernel.  ``layers`` (TLS, compression) are None
    until the protocol starts one.  Commands that may block run on the
    face's workers (``submit``) while the connection reads nothing more.
    All of it runs on the loop's thread.
    """

    def __init__(self, face: _Face, sock: socket.socket, address: Any) -> None:
        self.face = face
        self.loop = face.loop
        self.sock = sock
        self.remote_address = f"{address[0]}:{address[1]}"
        self.remote_ip = str(address[0])
        self.layers: Optional[_Layers] = None
        # Input: rbuf[rpos:] then _chunks, avail bytes in all.
        self.rbuf = b""
        self.rpos = 0
        self._chunks: List[bytes] = []
        self.avail = 0
        self.need = 1
        self.busy = False          # a command runs on a worker thread
        self.waiting = False       # the protocol waits for something else (body memory)
        self.eof = False           # the peer ended its side
        self._processing = False   # the protocol's received() is on the stack
        self._redecode = False     # a layer started mid-input: decode what is left
        # Output
        self.out: List[bytes] = []
        self.out_bytes = 0
        self.urgent = False
        self.write_timeout = math.inf    # (the protocol's clock) for a peer that reads nothing
        self._unsent: List[bytes] = []
        self._unsent_bytes = 0
        self._sent_unchecked = 0
        self._outq_full = False
        self._dirty = False
        self._events = 0
        # Timers: I/O mechanics on time.monotonic(); the write deadline on the loop's clock.
        self._timer_at = math.inf
        self._deadline_at = math.inf
        self._linger_until = math.inf
        self._linger_left = 0
        self._handshake_until = math.inf
        self._write_deadline = math.inf
        self.closing = False       # no more requests (a fatal error, EOF, close)
        self.gone = False          # the socket is closed and forgotten
        self.proto = face._protocol(self)

    def __repr__(self) -> str:
        return f"<{self.face._name} connection {self.remote_address}>"

    # -- life ------------------------------------------------------------------
    def start(self) -> None:
        self._set_events(_EV_READ)
        self.proto.started()

    def _set_events(self, events: int) -> None:
        if events == self._events or self.gone:
            return
        loop = self.loop
        if not self._events:
            loop.register(self.sock, events, self._on_event)
        elif not events:
            loop.unregister(self.sock)
        else:
            loop.modify(self.sock, events, self._on_event)
        self._events = events

    @property
    def unsent(self) -> int:
        """Bytes of output the peer has not taken yet."""
        return self._unsent_bytes

    def held_back(self) -> bool:
        """Whether the peer reads so little that its requests must wait."""
        return self._unsent_bytes >= _MAX_UNSENT or self._outq_full

    def update_events(self) -> None:
        """Read while input may be processed (or discarded), write while output waits."""
        reading = self.closing or not (
            self.eof or self.busy or self.waiting or self.held_back()
            or self.avail >= _MAX_UNSENT + self.need
            or self.layers is not None and self.layers.more)
        self._set_events((_EV_READ if reading else 0) | (_EV_WRITE if self._unsent else 0))

    def shutdown(self, reason: str, graceful: bool, level: int = logging.DEBUG) -> None:
        """End the connection: the protocol lets go of what it holds now
        (``closed``); a graceful end first writes what is buffered, then
        half-closes and drains unread input for a moment, so the peer reads
        our last reply instead of a reset."""
        if self.closing and not graceful:
            self._destroy()
            return
        if not self.closing:
            log.log(level, "%s client %s: %s", self.face._name, self.remote_address, reason)
            self.closing = True
            self.proto.connection_lost()
        self.flush()
        if not graceful or self.gone:
            self._destroy()
        elif not self._unsent and self._linger_until == math.inf:
            self._linger()
        # else: _write_unsent lingers once the buffer is out

    def _linger(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._destroy()
            return
        if self.eof:
            self._destroy()
            return
        self._linger_until = time.monotonic() + _LINGER
        self._linger_left = _LINGER_BYTES
        self._set_events(_EV_READ)
        self.loop.arm(self, self._linger_until)

    def _destroy(self) -> None:
        if self.gone:
            return
        if not self.closing:
            self.closing = True
            self.proto.connection_lost()
        self.gone = True
        if self._events:
            self.loop.unregister(self.sock)
            self._events = 0
        self.sock.close()
        self.face._forget(self)

    def close(self) -> None:
        """Close the connection (from any thread)."""
        self.loop.post(self._close_now)

    def _close_now(self, _: Any = None) -> None:
        self.shutdown("closed by the server", graceful=False)

    # -- reading -----------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if mask & _GOT_WRITE and self._unsent:
            self._write_unsent()
        if not mask & _GOT_READ or self.gone:
            return
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.shutdown(f"connection error: {e}", graceful=False, level=logging.INFO)
            return
        if data and self.layers is None and not self.closing:     # the common case
            if not self.avail:                 # (one whole request, often)
                self.rbuf, self.rpos, self.avail = data, 0, len(data)
            else:
                self._chunks.append(data)
                self.avail += len(data)
            if self.avail >= self.need and not self.busy:
                self._process()
                if self._redecode:
                    self._decode()
            return
        self._on_data(data)

    def _on_data(self, data: bytes) -> None:
        # What the common case above leaves: closing, EOF, layers.
        if self.closing:               # no more requests: discard what still comes
            self._linger_left -= len(data)
            if not data or (self._linger_until < math.inf and self._linger_left <= 0):
                self._destroy()
            return
        if not data:
            self.eof = True
            self.update_events()
            if not self.busy:
                self.proto.ended()
            return
        self.layers.feed(data)  # type: ignore[union-attr]
        self._decode()

    def _decode(self) -> None:
        # Through the layers: drive a TLS handshake, then decode a bounded
        # piece at a time, each processed before the next, while input may
        # be processed (the rest waits, compressed, for _resume).
        layers = self.layers
        self._redecode = False
        try:
            if layers.handshaking:  # type: ignore[union-attr]
                done = layers.handshake()  # type: ignore[union-attr]
                self.send_raw(layers.outgoing())  # type: ignore[union-attr]
                if not done:
                    return
                self._handshake_until = math.inf
                self.proto.tls_ready()
            while not (self.busy or self.closing or self.gone or self.held_back()):
                data = layers.read(_INFLATE_CHUNK)  # type: ignore[union-attr]
                out = layers.outgoing()  # type: ignore[union-attr]
                if out:                      # post-handshake messages (tickets, key updates)
                    self.send_raw(out)
                if data:
                    if not self.avail:
                        self.rbuf, self.rpos, self.avail = data, 0, len(data)
                    else:
                        self._chunks.append(data)
                        self.avail += len(data)
                    if self.avail >= self.need:
                        self._process()
                    if self._redecode:       # a new layer took what was left
                        self._redecode = False
                        layers = self.layers
                        continue
                if layers.eof:  # type: ignore[union-attr]
                    self.eof = True
                    if not self.busy:
                        self.proto.ended()
                    return
                if not layers.more or self.avail >= _MAX_UNSENT + self.need:  # type: ignore[union-attr]
                    break
        except ssl.SSLError as e:
            if layers.handshaking:  # type: ignore[union-attr]
                self.proto.tls_failed(str(e))
            else:
                self.shutdown(f"connection error: {e}", graceful=False, level=logging.INFO)
            return
        except (zlib.error, SnappyError) as e:
            self.proto.decode_failed(e)
            return
        except Exception as e:       # a bug: this client gets an error, not a stall
            log.exception("%s client %s: its input could not be read", self.face._name,
                          self.remote_address)
            self.proto.failed(e)
            return
        self.update_events()

    def _process(self) -> None:
        # The protocol parses rbuf[rpos:] (chunks joined first) in place.
        if self._processing:
            return              # a layer started mid-request: the running pass goes on
        if self._chunks:
            self.rbuf = self.rbuf[self.rpos:] + b"".join(self._chunks)
            self.rpos = 0
            self._chunks = []
        self._processing = True
        try:
            self.proto.received()
        except Exception as e:       # a bug: this client gets an error, not a stall
            log.exception("%s client %s: its input could not be read", self.face._name,
                          self.remote_address)
            self.proto.failed(e)
        finally:
            self._processing = False

    def consume(self, n: int) -> None:
        """The protocol took *n* bytes from ``rbuf[rpos:]``."""
        self.rpos += n
        self.avail -= n
        if self.rpos >= len(self.rbuf):
            self.rbuf, self.rpos = b"", 0

    def take_input(self) -> bytes:
        """Everything read and not parsed: it belongs to a layer starting now."""
        data = self.rbuf[self.rpos:] + b"".join(self._chunks)
        self.rbuf, self.rpos, self._chunks, self.avail = b"", 0, [], 0
        return data

    def resume(self) -> None:
        """Go on with input held back (by a worker's command, unsent output, a wait)."""
        if self.gone:
            return
        if self.layers is not None and (self.layers.more or self._redecode):
            self._decode()
            return
        if self.avail >= self.need and not (self.busy or self.waiting or self.closing):
            self._process()
            if self._redecode:
                self._decode()
                return
        self.update_events()

    # -- layers ------------------------------------------------------------------
    def start_tls(self, context: ssl.SSLContext) -> None:
        """TLS from now on (the server's side); input not yet parsed goes through it."""
        self.layers = self.layers or _Layers()
        self.layers.start_tls(context, server_side=True)
        self._handshake_until = time.monotonic() + _TLS_HANDSHAKE_TIMEOUT
        self.loop.arm(self, self._handshake_until)
        leftover = self.take_input()
        if leftover:
            self.layers.feed(leftover)
        self._redecode = True

    def start_compression(self, kind: str, level: int) -> None:
        """Deflate or snappy from now on; input not yet parsed is inflated first."""
        self.layers = self.layers or _Layers()
        self.layers.start_compression(kind, level, self.take_input())
        self._redecode = True

    # -- jobs on workers ---------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run *fn* on a worker; input waits; ``proto.job_done`` gets the outcome."""
        self.busy = True
        self.face._submit(self, fn, *args)

    def job_done(self, result: Tuple[Any, Optional[BaseException]]) -> None:
        self.busy = False
        if self.gone:
            return
        self.proto.job_done(*result)
        if self.closing:
            return
        self.resume()
        if self.eof and not self.busy:
            self.proto.ended()

    # -- writing -----------------------------------------------------------------
    def write(self, data: bytes, urgent: bool = True) -> None:
        """Queue *data*: written at the end of the pass (*urgent*), or when the
        protocol's ``buffered`` says so."""
        self.out.append(data)
        self.out_bytes += len(data)
        if urgent:
            self.urgent = True
        if not self._dirty:
            self._dirty = True
            self.loop.dirty.append(self)

    def _after_pass(self) -> None:
        self._dirty = False
        if self.gone:
            return
        proto = self.proto
        if proto.pass_hook:
            proto.after_pass()
        out = self.out
        if not out:
            return
        if not self.urgent:
            proto.buffered()
            return
        self.urgent = False                    # flush(), in place
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        if self.layers is not None:
            data = self.layers.encode(data)
        self.send_raw(data)

    def flush(self) -> None:
        """Write the output buffer out now (through the layers)."""
        out = self.out
        self.urgent = False
        if not out or self.gone:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.out_bytes = 0
        if self.layers is not None:
            data = self.layers.encode(data)
        self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        """Send bytes past the layers (what they made, or a refusal in plain text)."""
        if not data or self.gone:
            return
        if self._unsent:
            self._unsent.append(data)
            self._unsent_bytes += len(data)
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.shutdown(f"write failed: {e}", graceful=False, level=logging.INFO)
            return
        self._sent_unchecked += n
        if self._sent_unchecked >= _OUTQ_CHECK:
            self._check_outq()
        if n < len(data):
            self._unsent.append(data[n:])
            self._unsent_bytes += len(data) - n
            self._write_deadline = self.loop.clock.monotonic() + self.write_timeout
            self.update_events()
            self.loop.arm_deadline(self, self._write_deadline)

    def _check_outq(self) -> None:
        self._sent_unchecked = 0
        if _TIOCOUTQ is None or fcntl is None:
            return
        try:
            queued = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), _TIOCOUTQ, b"\0" * 4))[0]
        except OSError:
            return
        full = queued > _MAX_UNSENT
        if full != self._outq_full:
            self._outq_full = full
            if full:
                self.update_events()
            else:
                self.resume()
        if full:
            self.loop.arm(self, time.monotonic() + _OUTQ_POLL)

    def _write_unsent(self) -> None:
        data = b"".join(self._unsent)
        self._unsent.clear()
        self._unsent_bytes = 0
        self.send_raw(data)
        if self.gone:
            return
        if not self._unsent:
            self._write_deadline = math.inf
            if self.closing and self._linger_until == math.inf:
                self._linger()
                return
            self.proto.drained()
        else:      # progress: the write deadline starts again, as nsqd's
            self._write_deadline = self.loop.clock.monotonic() + self.write_timeout
            self.loop.arm_deadline(self, self._write_deadline)
        if not self.busy:
            self.resume()           # input held back by the unsent output
        else:
            self.update_events()

    # -- timers --------------------------------------------------------------------
    def _on_timer(self, now: float) -> None:
        # The mechanics of I/O, on time.monotonic().
        if self.gone:
            return
        if now >= self._linger_until:
            self._destroy()
            return
        if now >= self._handshake_until:
            self._handshake_until = math.inf
            self.proto.tls_failed("timed out")
            return
        if self._outq_full:
            self._check_outq()
        when = min(self._linger_until, self._handshake_until)
        if when < math.inf:
            self.loop.arm(self, when)

    def _on_deadline(self, now: float) -> None:
        # A peer that reads nothing, on the loop's clock.
        if self.gone or not self._unsent:
            return
        if now >= self._write_deadline:
            self.shutdown("write timed out (the client reads nothing)", graceful=False,
                          level=logging.INFO)
        else:
            self.loop.arm_deadline(self, self._write_deadline)


_ASYNC = object()                # a command's reply comes later, from a worker thread
_MSG_FRAME = struct.Struct(">lLqH16s")   # frame size, type, then the message header
_MSG_FRAME_OVERHEAD = _MSG_FRAME.size            # 34 bytes before a message's body
_MSG_FRAME_SIZE_FIELD = _MSG_FRAME.size - 4      # the size field counts all but itself
_FIN_LINE = 21                   # b"FIN " + a 16-byte id + b"\n"
_OK_FRAME = struct.pack(">lL", 6, FRAME_TYPE_RESPONSE) + b"OK"
_PUB_HEAD = struct.Struct(">l")


def _fin_run(buf: bytes, pos: int) -> List[bytes]:
    """The ids of the well-formed ``FIN <id>\\n`` lines in a row at *pos*.

    Checked a column at a time (every line is _FIN_LINE bytes), so a burst of
    FINs costs a few C calls, not a parse per line; any line that is not
    exactly that ends the run (and is parsed as a command of its own).
    """
    k = (len(buf) - pos) // _FIN_LINE
    for col, char in ((0, b"F"), (1, b"I"), (2, b"N"), (3, b" "), (_FIN_LINE - 1, b"\n")):
        column = buf[pos + col:pos + k * _FIN_LINE:_FIN_LINE]
        k = min(k, len(column) - len(column.lstrip(char)))
    run = buf[pos:pos + k * _FIN_LINE]
    if not k or run.count(b" ") != k or run.count(b"\n") != k or b"\r" in run:
        return []
    ids = run.replace(b"FIN ", b"").split(b"\n")
    ids.pop()                          # after the last newline
    return ids


def _identify_settings(data: Dict[str, Any], srv: "TCPServer"
                       ) -> Tuple[float, int, float, int, float]:
    """IDENTIFY's settings, checked as nsqd checks them (_ClientError
    E_BAD_BODY otherwise): (heartbeat interval, output buffer size, output
    buffer timeout, sample rate, msg timeout), seconds for durations (0: off
    for the heartbeat and the timeout; the server's default msg timeout)."""
    def bad(what: str, value: int) -> _ClientError:
        return _ClientError("E_BAD_BODY", f"IDENTIFY {what} ({value}) is invalid")
    hb = _json_int(data, "heartbeat_interval", 0)
    if hb == -1:
        hb_s = 0.0
    elif hb == 0:
        hb_s = srv.heartbeat_interval
    elif 1000 <= hb <= srv.max_heartbeat_interval * 1000:
        hb_s = hb / 1000
    else:
        raise bad("heartbeat interval", hb)
    size = _json_int(data, "output_buffer_size", 0)
    if size == -1:
        size, obt_off = 1, True
    elif size == 0:
        size, obt_off = DEFAULT_OUTPUT_BUFFER_SIZE, False
    elif 64 <= size <= srv.max_output_buffer_size:
        obt_off = False
    else:
        raise bad("output buffer size", size)
    obt = _json_int(data, "output_buffer_timeout", 0)
    if obt == -1:
        obt_s = 0.0
    elif obt == 0:
        obt_s = srv.output_buffer_timeout
    elif srv.min_output_buffer_timeout * 1000 <= obt <= srv.max_output_buffer_timeout * 1000:
        obt_s = obt / 1000
    else:
        raise bad("output buffer timeout", obt)
    rate = _json_int(data, "sample_rate", 0)
    if not 0 <= rate <= 99:
        raise bad("sample rate", rate)
    mt = _json_int(data, "msg_timeout", 0)
    if mt and not 1000 <= mt <= srv.broker.max_msg_timeout * 1000:
        raise bad("msg timeout", mt)
    return hb_s, size, 0.0 if obt_off else obt_s, rate, mt / 1000


class _AuthSession:
    """A connection's AUTH (nsqd's client auth state): its grant, and the
    check a command makes against it.  A grant past its ttl is asked of the
    auth server again, which may block: callers run that on a worker
    (``expired`` says when)."""

    def __init__(self, authorizer: Optional[Authorizer], remote_ip: str, address: str) -> None:
        self.authorizer = authorizer
        self.remote_ip = remote_ip
        self.address = address
        self.state: Optional[_AuthState] = None
        self._secret = ""

    @property
    def expired(self) -> bool:
        """Whether the next ``check`` asks the auth server again."""
        return self.state is not None and time.monotonic() >= self.state.expires

    def login(self, secret: str, tls: bool) -> _AuthState:
        """AUTH *secret*: the grant, or _ClientError (failures are throttled per address)."""
        authorizer = self.authorizer
        assert authorizer is not None
        wait = authorizer.locked_out(self.remote_ip)
        if wait:
            log.info("client %s: AUTH refused: locked out for %.0fs more", self.address, wait)
            raise _ClientError("E_AUTH_FAILED", "AUTH failed: too many failures; "
                                                f"retry in {math.ceil(wait)}s")
        try:
            state = authorizer.authorize(secret, self.remote_ip, tls)
        except (OSError, ValueError) as e:
            log.warning("client %s: AUTH failed: %s", self.address, e)
            state = None
        if state is None:
            authorizer.failed(self.remote_ip)
            raise _ClientError("E_AUTH_FAILED", "AUTH failed")
        authorizer.succeeded(self.remote_ip)
        self.state, self._secret = state, secret
        return state

    def check(self, cmd: str, permission: str, topic: str, channel: str, tls: bool) -> None:
        """_ClientError unless the grant allows *cmd* (no authorizer: all is allowed)."""
        if self.authorizer is None:
            return
        if self.state is None:
            raise _ClientError("E_AUTH_FIRST", f"AUTH required before {cmd}")
        if self.expired:
            self.login(self._secret, tls)
        if not self.state.allows(permission, topic, channel):
            raise _ClientError("E_UNAUTHORIZED", f'AUTH failed for {cmd} on "{topic}" "{channel}"')


class _NSQProtocol(Consumer):
    """nsqd's client protocol V2 over one ``_ServerConnection`` (nsqd's
    protocol_v2.go): commands in, replies and message frames out; to the
    core, the connection's consumer.

    Every complete command in the input runs at once, in order; a single
    PUB (the request most producers make) is published and answered
    without leaving ``received``.  Replies are written at the end of the
    loop's pass; message frames once the output buffer fills or the
    client's RDY window does, else after ``output_buffer_timeout`` (nsqd's
    output buffering).  Heartbeats, the read deadline (two missed ones) and
    the buffering timer are deadlines on the broker's clock.  Commands that
    may block (fsync-mode publishes, a topic or channel's first use, AUTH
    against an auth server) run on a worker while the connection waits.
    """

    def __init__(self, server: "TCPServer", conn: _ServerConnection) -> None:
        super().__init__(ready_count=0, client_id=conn.remote_ip)
        self.server = server
        self.broker = server.broker
        self.conn = conn
        self.loop = conn.loop
        self.remote_address = conn.remote_address
        self.remote_ip = conn.remote_ip
        self.hostname = conn.remote_ip
        self.user_agent = ""
        self.state = STATE_INIT
        self.heartbeat_interval = server.heartbeat_interval
        self.output_buffer_size = DEFAULT_OUTPUT_BUFFER_SIZE
        self.output_buffer_timeout = server.output_buffer_timeout
        self.sample_rate = 0
        self.deflate = False
        self.snappy = False
        self.identified = False
        self._session = _AuthSession(server.authorizer, conn.remote_ip, conn.remote_address)
        self.pub_counts: Dict[str, int] = {}
        self._topics_seen: Dict[bytes, str] = {}    # valid topic names published to
        # Topics this connection published to with a plain PUB, by the bytes
        # naming them: later PUBs to them take the fast path (``_pub``), as
        # long as none may block: no AUTH, no fsync, TLS as required.
        self._pub_topics: Dict[bytes, Topic] = {}
        self._pub_limit = min(self.broker.max_msg_size, MemoryBudget.SMALL - 1)
        self._batched = 0        # PUBs in the server's publish batch, not yet answered
        self._stalled = False    # a command after them waits for their answers
        self._magic = False
        # A command whose body is still coming: [handler, params, limit, code, what, size].
        self._pending: Optional[List[Any]] = None
        self._budget_held = 0            # bytes of the body being read, taken from the budget
        self._drops: List[bytes] = []    # ids dropped by sample_rate, finished after the pass
        self.pass_hook = False           # _drops wait: after_pass runs
        # compression to start once TLS is up: ("deflate", level), ("snappy", 0) or None
        self._then_compress: Optional[Tuple[str, int]] = None
        # Deadlines on the broker's clock (inf: none).
        self._now = self.loop.clock.monotonic
        now = self._now()
        self._deadline_at = math.inf
        self._next_beat = now + self.heartbeat_interval
        self._read_deadline = now + 2 * self.heartbeat_interval
        self._flush_at = math.inf
        conn.need = 4                    # the protocol magic comes first
        conn.write_timeout = self.heartbeat_interval or DEFAULT_MAX_HEARTBEAT_INTERVAL

    def __repr__(self) -> str:
        return f"<TCP client {self.remote_address}>"

    # -- the connection's events ---------------------------------------------------
    def started(self) -> None:
        self._arm()

    def ended(self) -> None:
        """The peer ended its side (and no command runs): end ours."""
        self.conn.shutdown("closed by the peer", graceful=True)

    def connection_lost(self) -> None:
        """The connection is ending: drops count as finished, what was in
        flight is requeued, the producer leaves the stats."""
        self._finish_drops()
        self.closed = True
        ch = self.channel
        if ch is not None:
            ch.remove_consumer(self)
        self.broker.remove_producer(self)
        self._give_back_budget()

    def job_ended(self) -> None:
        # On the worker's thread: a SUB that raced the connection's close.
        if self.conn.gone and self.channel is not None:
            self.channel.remove_consumer(self)

    def tls_ready(self) -> None:
        self.conn.write(_OK_FRAME)
        if self._then_compress:
            self.conn.flush()              # the TLS OK is not compressed
            self._start_compression(*self._then_compress)

    def tls_failed(self, why: str) -> None:
        self.conn.layers = None            # the error goes out in plain text
        self._fatal(_ClientError("E_IDENTIFY_FAILED", f"IDENTIFY failed {why}"))

    def decode_failed(self, e: Exception) -> None:
        codec = "snappy" if self.snappy else "deflate"
        self._fatal(_ClientError("E_INVALID", f"failed to read command - {codec}: {e}"))

    def failed(self, e: Exception) -> None:
        """Reading the input failed unexpectedly: end the connection with an error."""
        self._fatal(_ClientError("E_INVALID", f"internal error: {e}"))

    def drained(self) -> None:
        """Unsent output went out."""

    # -- deadlines -------------------------------------------------------------------
    def _arm(self) -> None:
        conn = self.conn
        if conn.gone:
            return
        hb = self.heartbeat_interval
        due = self._flush_at if conn.out else math.inf
        if hb > 0 and not conn.closing:
            due = min(due, self._next_beat)
            if not conn.busy:
                due = min(due, self._read_deadline)
        if due < math.inf:
            self.loop.arm_deadline(self, due)

    def _on_deadline(self, now: float) -> None:
        conn = self.conn
        if conn.gone:
            return
        hb = self.heartbeat_interval
        if hb > 0 and not conn.closing:
            if now >= self._read_deadline and not conn.busy:
                conn.shutdown("no command within two heartbeat intervals", graceful=False,
                              level=logging.INFO)
                return
            if now >= self._next_beat:
                self._next_beat = now + hb
                conn.write(_frame(FRAME_TYPE_RESPONSE, _HEARTBEAT))
        if conn.out and now >= self._flush_at:
            self._flush_at = math.inf
            conn.flush()
        self._arm()

    # -- output: message frames and nsqd's buffering -------------------------------------
    def _respond(self, frame: bytes) -> None:
        """Queue a reply (or error): written at the end of the pass."""
        self.conn.write(frame)

    def _deliver(self, msg: _Delivery) -> None:
        self._deliver_many([msg])

    def _deliver_many(self, msgs: List[_Delivery]) -> None:
        # The core calls this on whatever thread dispatched, with no lock held;
        # from another thread, the messages wait in the loop's inbox.
        if threading.get_ident() != self.loop.ident:
            self.loop.post(self._deliver_many, msgs)
            return
        conn = self.conn
        if conn.closing:
            return           # still in flight: requeued when it left the channel
        add, pack, size, rate = conn.out.append, _MSG_FRAME.pack, conn.out_bytes, self.sample_rate
        for m in msgs:
            if rate and random.randrange(100) > rate:
                self._drops.append(m.id)       # nsqd drops it for this client
                self.pass_hook = True
                continue
            body = m.body
            n = len(body)
            add(pack(n + _MSG_FRAME_SIZE_FIELD, FRAME_TYPE_MESSAGE, m.timestamp, m.attempts,
                     m.id))
            add(body)                          # joined when written
            size += n + _MSG_FRAME_OVERHEAD
        conn.out_bytes = size
        if not conn._dirty:
            conn._dirty = True
            self.loop.dirty.append(conn)

    def after_pass(self) -> None:
        self.pass_hook = False
        self._finish_drops()

    def buffered(self) -> None:
        """Only message frames wait: nsqd's rule says when they go out."""
        conn = self.conn
        if (conn.out_bytes >= self.output_buffer_size or self.in_flight_count >= self.ready_count
                or self.output_buffer_timeout <= 0):
            self._flush_at = math.inf
            conn.flush()
        elif self._flush_at == math.inf:
            self._flush_at = self._now() + self.output_buffer_timeout
            self._arm()

    def _finish_drops(self) -> None:
        drops, self._drops = self._drops, []
        if drops and self.channel is not None:
            self.channel.finish_many(self, drops)

    # -- reading commands ------------------------------------------------------------------
    def received(self) -> None:
        """Run every complete command at ``conn.rbuf[conn.rpos:]``, in order; set
        ``conn.need`` when the next one is not complete."""
        conn = self.conn
        if not self._magic:
            magic = conn.rbuf[conn.rpos:conn.rpos + 4]
            conn.consume(4)
            if magic != MAGIC_V2:
                log.info("client %s: bad protocol magic %r", self.remote_address, magic)
                self._fatal(_ClientError("E_BAD_PROTOCOL", ""))
                return
            self._magic = True
            conn.need = 1
        if self.heartbeat_interval > 0:
            self._read_deadline = self._now() + 2 * self.heartbeat_interval
        while not (conn.busy or conn.closing or conn.waiting) and conn.avail >= conn.need:
            if conn._unsent_bytes >= _MAX_UNSENT or conn._outq_full:
                return                         # the client reads nothing: wait for it
            if self._pending is not None:
                if not self._take_body():
                    return
                continue
            buf, pos = conn.rbuf, conn.rpos
            if buf.startswith(b"PUB ", pos) and self._pub(buf, pos):
                continue
            if self._batched:           # answers come in order: wait for the batch's
                self._stalled = True
                return
            if buf.startswith(b"FIN ", pos) and self.channel is not None and \
                    self.state != STATE_INIT:
                ids = _fin_run(buf, pos)
                if ids:                   # the hot path: a burst of FINs, settled at once
                    conn.consume(len(ids) * _FIN_LINE)
                    self._fin_ids(ids)
                    continue
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_LINE_LENGTH:
                    conn.shutdown(f"command line longer than {MAX_LINE_LENGTH} bytes; closing",
                                  graceful=False, level=logging.WARNING)
                    return
                conn.need = len(buf) - pos + 1
                return
            line = buf[pos:nl]
            conn.consume(nl + 1 - pos)
            conn.need = 1
            self._run(line[:-1] if line.endswith(b"\r") else line)

    def _pub(self, buf: bytes, pos: int) -> bool:
        """A whole ``PUB <topic>\\n<size><body>`` at *pos*, added to the server's
        publish batch (answered at the end of the pass); False leaves it to
        the general path (it is not whole, not plain, or needs more than a
        publish into memory or a log)."""
        nl = buf.find(b"\n", pos, pos + 80)
        if nl < 0 or nl + 5 > len(buf):
            return False
        size = _PUB_HEAD.unpack_from(buf, nl + 1)[0]
        end = nl + 5 + size
        if end > len(buf) or not 0 < size <= self._pub_limit:
            return False
        t = self._pub_topics.get(buf[pos + 4:nl])
        if t is None or t.deleted:
            return False
        conn = self.conn
        conn.avail -= end - pos                # conn.consume(end - pos), in place
        if end < len(buf):
            conn.rpos = end
        else:
            conn.rbuf, conn.rpos = b"", 0
        self._batched += 1
        self.server.batch.add(t.name, buf[nl + 5:end], self)
        return True

    def published(self, topic: str, error: Optional[MinqError]) -> None:
        """The outcome of a PUB in the server's publish batch."""
        self._batched -= 1
        conn = self.conn
        if conn.closing:
            return
        if error is not None:
            self._error(_publish_error("PUB", error))
            return
        self.pub_counts[topic] += 1
        conn.out.append(_OK_FRAME)             # conn.write(_OK_FRAME), in place
        conn.out_bytes += len(_OK_FRAME)
        conn.urgent = True
        if not conn._dirty:
            conn._dirty = True
            self.loop.dirty.append(conn)
        if self._stalled and not self._batched:
            self._stalled = False
            conn.resume()

    def _run(self, line: bytes) -> None:
        params = line.split(b" ")
        name = params[0]
        try:
            cmd = self._COMMANDS.get(name)
            if cmd is None:
                raise _ClientError("E_INVALID", f"invalid command {name.decode(errors='replace')}")
            if self.server.tls_required and self.conn.layers is None and name != b"IDENTIFY":
                raise _ClientError("E_INVALID", f"cannot {name.decode()} in current "
                                                f"state (TLS required)")
            reply = cmd(self, params)
        except _ClientError as e:
            self._error(e)
            return
        if reply is not None and reply is not _ASYNC:
            self._respond(_OK_FRAME if reply == b"OK" else _frame(FRAME_TYPE_RESPONSE, reply))

    def _expect_body(self, then: Callable[["_NSQProtocol", List[Any], bytes], Any],
                     params: List[Any], limit: int, code: str,
                     what: str = "body") -> object:
        """A command continues with a 4-byte length and that many bytes: the
        length is checked as soon as it arrives, before the body is read."""
        self._pending = [then, params, limit, code, what, -1]
        self.conn.need = 4
        return _ASYNC

    def _take_body(self) -> bool:
        """Go on with the command waiting for its body; False if more input is needed."""
        conn = self.conn
        pending = self._pending
        then, params, limit, code, what, size = pending  # type: ignore[misc]
        have = conn.avail
        if size < 0:
            if have < 4:
                conn.need = 4
                return False
            size = _LEN.unpack_from(conn.rbuf, conn.rpos)[0]
            conn.consume(4)
            have -= 4
            if size <= 0 or size > limit:
                self._pending = None
                conn.need = 1
                cmd = params[0].decode()
                self._error(_ClientError(code, f"{cmd} invalid {what} size {size}" if size <= 0
                                         else f"{cmd} {'message' if what == 'message body' else 'body'} "
                                              f"too big {size} > {limit}"))
                return True
            pending[5] = size  # type: ignore[index]
        if size >= MemoryBudget.SMALL and not self._budget_held:
            # A big body is read only once the server's body memory has room.
            if not self.server.body_budget.try_take(size, self._budget_freed):
                conn.waiting = True
                conn.need = size
                conn.update_events()
                return False
            self._budget_held = size
        if have < size:
            conn.need = size
            return False
        body = conn.rbuf[conn.rpos:conn.rpos + size]
        conn.consume(size)
        conn.need = 1
        self._pending = None
        try:
            reply = then(self, params, body)
        except _ClientError as e:
            self._give_back_budget()
            self._error(e)
            return True
        if reply is not _ASYNC:           # else job_done gives it back
            self._give_back_budget()
            if reply is not None:
                self._respond(_OK_FRAME if reply == b"OK" else
                              _frame(FRAME_TYPE_RESPONSE, reply))
        return True

    def _give_back_budget(self) -> None:
        if self._budget_held:
            self.server.body_budget.give_back(self._budget_held)
            self._budget_held = 0

    def _budget_freed(self) -> None:
        # Called by whichever thread gave memory back: retry on the loop.
        self.loop.post(self._retry_body)

    def _retry_body(self, _: Any = None) -> None:
        conn = self.conn
        if conn.gone or not conn.waiting:
            return
        conn.waiting = False
        conn.resume()

    def _error(self, e: _ClientError) -> None:
        if e.fatal:
            self._fatal(e)
        else:
            log.debug("client %s: %s", self.remote_address, e)
            self._respond(_frame(FRAME_TYPE_ERROR, str(e).encode()))

    def _fatal(self, e: _ClientError) -> None:
        log.warning("client %s: %s", self.remote_address, e)
        self._respond(_frame(FRAME_TYPE_ERROR, str(e).encode().rstrip()))
        self.conn.shutdown(str(e), graceful=True)

    def _later(self, fn: Callable[..., Optional[bytes]], *args: Any) -> object:
        """Run a command that may block on a worker; the reply follows."""
        self.conn.submit(fn, *args)
        self.conn.update_events()
        return _ASYNC

    def job_done(self, reply: Any, error: Optional[BaseException]) -> None:
        self._give_back_budget()
        if self.heartbeat_interval > 0:
            self._read_deadline = self._now() + 2 * self.heartbeat_interval
        if isinstance(error, _ClientError):
            self._error(error)
        elif error is not None:       # a bug: the client gets an error, not silence
            log.error("client %s: command failed: %r", self.remote_address, error)
            self._error(_ClientError("E_INVALID", f"internal error: {error}"))
        elif reply is not None:
            self._respond(_frame(FRAME_TYPE_RESPONSE, reply))
        self._arm()

    # -- commands ----------------------------------------------------------------
    def _identify(self, params: List[bytes]) -> object:
        if self.state != STATE_INIT:
            raise _ClientError("E_INVALID", "cannot IDENTIFY in current state")
        return self._expect_body(_NSQProtocol._identify_body, params, self.broker.max_body_size,
                                 "E_BAD_BODY")

    def _identify_body(self, params: List[bytes], body: bytes) -> Optional[bytes]:
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):       # RecursionError: nested too deep
            raise _ClientError("E_BAD_BODY", "IDENTIFY failed to decode JSON body") from None
        self._apply_identify(data)
        if not data.get("feature_negotiation"):
            return b"OK"
        srv = self.server
        tls = bool(data.get("tls_v1")) and srv.tls_context is not None
        deflate = bool(data.get("deflate")) and srv.deflate
        snappy = bool(data.get("snappy")) and srv.snappy
        if deflate and snappy:
            raise _ClientError("E_IDENTIFY_FAILED",
                               "cannot enable both deflate and snappy compression")
        level = _json_int(data, "deflate_level", 0) or 6
        level = min(level, srv.max_deflate_level) if deflate else min(6, srv.max_deflate_level)
        reply = {
            "max_rdy_count": self.broker.max_rdy_count, "version": NSQ_VERSION,
            "max_msg_timeout": int(self.broker.max_msg_timeout * 1000),
            "msg_timeout": int((self.msg_timeout or self.broker.msg_timeout) * 1000),
            "tls_v1": tls, "deflate": deflate, "deflate_level": level,
            "max_deflate_level": srv.max_deflate_level, "snappy": snappy,
            "sample_rate": self.sample_rate, "auth_required": srv.authorizer is not None,
            "output_buffer_size": self.output_buffer_size,
            "output_buffer_timeout": int(self.output_buffer_timeout * 1000),
            "topology_region": "", "topology_zone": "",
        }
        # The reply goes out in plain text; each upgrade then answers OK inside it.
        self._respond(_frame(FRAME_TYPE_RESPONSE, json.dumps(reply).encode()))
        if tls or deflate or snappy:
            self.conn.flush()
        compression = ("snappy", 0) if snappy else ("deflate", level) if deflate else None
        if tls:
            self._then_compress = compression
            self.conn.start_tls(srv.tls_context)  # type: ignore[arg-type]
        elif compression:
            self._start_compression(*compression)
        return None

    def _start_compression(self, kind: str, level: int) -> None:
        self.conn.start_compression(kind, level)
        if kind == "snappy":
            self.snappy = True
        else:
            self.deflate = True
        self._then_compress = None
        self._respond(_OK_FRAME)

    def _apply_identify(self, data: Dict[str, Any]) -> None:
        hb_s, size, obt_s, rate, mt = _identify_settings(data, self.server)
        for key in ("client_id", "hostname", "user_agent"):
            if key in data:
                setattr(self, key, str(data[key]))
        self.output_buffer_size = size
        self.output_buffer_timeout = obt_s
        self.sample_rate = rate
        if mt:
            self.msg_timeout = mt
        self.identified = True
        now = self._now()
        self.heartbeat_interval = hb_s
        self.conn.write_timeout = hb_s or DEFAULT_MAX_HEARTBEAT_INTERVAL
        self._next_beat = now + hb_s
        self._read_deadline = now + 2 * hb_s
        self._arm()

    def _auth(self, params: List[bytes]) -> object:
        srv = self.server
        if srv.authorizer is None:
            raise _ClientError("E_AUTH_DISABLED", "AUTH disabled")
        if self.state != STATE_INIT:
            raise _ClientError("E_INVALID", "cannot AUTH in current state")
        if len(params) != 1:
            raise _ClientError("E_INVALID", "AUTH invalid number of parameters")
        return self._expect_body(_NSQProtocol._auth_body, params, self.broker.max_body_size,
                                 "E_BAD_BODY")

    def _auth_body(self, params: List[bytes], secret: bytes) -> object:
        if self.auth is not None:
            raise _ClientError("E_INVALID", "AUTH already set")
        if self.server.authorizer.urls:  # type: ignore[union-attr]
            return self._later(self._do_auth, secret)
        return self._do_auth(secret)

    def _do_auth(self, secret: bytes) -> bytes:
        state = self._session.login(secret.decode(errors="replace"), self._tls())
        if not state.rules:
            raise _ClientError("E_UNAUTHORIZED", "AUTH no authorizations found")
        return json.dumps({"identity": state.identity, "identity_url": state.identity_url,
                           "permission_count": len(state.rules)}).encode()

    @property
    def auth(self) -> Optional[_AuthState]:
        """What AUTH granted (None: no AUTH yet)."""
        return self._session.state

    def _tls(self) -> bool:
        return self.conn.layers is not None and self.conn.layers.tls is not None

    def _auth_expired(self) -> bool:
        return self._session.expired

    def _check_auth(self, cmd: str, permission: str, topic: str, channel: str) -> None:
        self._session.check(cmd, permission, topic, channel, self._tls())

    def _sub(self, params: List[bytes]) -> object:
        if self.state != STATE_INIT:
            raise _ClientError("E_INVALID", "cannot SUB in current state")
        if self.heartbeat_interval <= 0:
            raise _ClientError("E_INVALID", "cannot SUB with heartbeats disabled")
        if len(params) < 3:
            raise _ClientError("E_INVALID", "SUB insufficient number of parameters")
        topic = self._name(params[1], "E_BAD_TOPIC", "SUB topic")
        channel = self._name(params[2], "E_BAD_CHANNEL", "SUB channel")
        if self._auth_expired() or not self._has_channel(topic, channel):
            return self._later(self._do_sub, topic, channel)   # creating one writes to disk
        return self._do_sub(topic, channel)

    def _has_channel(self, topic: str, channel: str) -> bool:
        try:
            self.broker.get_topic(topic).get_channel(channel)
        except (TopicNotFound, ChannelNotFound):
            return False
        return True

    def _do_sub(self, topic: str, channel: str) -> bytes:
        self._check_auth("SUB", "subscribe", topic, channel)
        try:
            ch = self.broker.topic(topic).channel(channel)
            limit = self.server.max_channel_consumers
            if limit and ch.client_count >= limit:
                raise _ClientError("E_TOO_MANY_CHANNEL_CONSUMERS",
                                   f"channel consumers for {topic}:{channel} exceeds limit "
                                   f"of {limit}")
            ch.add_consumer(self)
        except BrokerClosed as e:
            raise _ClientError("E_SUB_FAILED", f"SUB failed {e}") from e
        except OSError as e:         # a new topic or channel could not be stored
            log.error("client %s: SUB %s %s failed: %s", self.remote_address, topic, channel, e)
            raise _ClientError("E_SUB_FAILED", f"SUB failed {e.strerror or e}") from None
        self.state = STATE_SUBSCRIBED
        return b"OK"

    def _topic_name(self, raw: bytes, what: str) -> str:
        """A topic name of a publish, checked once per connection."""
        name = self._topics_seen.get(raw)
        if name is None:
            name = self._name(raw, "E_BAD_TOPIC", what)
            if len(self._topics_seen) < 64:
                self._topics_seen[raw] = name
        return name

    @staticmethod
    def _name(raw: bytes, code: str, what: str) -> str:
        name = raw.decode(errors="replace")
        try:
            return validate_name(name, what)
        except InvalidName:
            raise _ClientError(code, f'{what} name "{name}" is not valid') from None

    def _rdy(self, params: List[bytes]) -> None:
        if self.state == STATE_CLOSING:
            return None
        if self.state != STATE_SUBSCRIBED:
            raise _ClientError("E_INVALID", "cannot RDY in current state")
        count = 1
        if len(params) > 1:
            count = _parse_uint(params[1], "RDY could not parse count")
        if count > self.broker.max_rdy_count:
            raise _ClientError("E_INVALID",
                               f"RDY count {count} out of range 0-{self.broker.max_rdy_count}")
        self.channel.set_ready(self, count)  # type: ignore[union-attr]
        return None

    def _settle_params(self, cmd: str, params: List[bytes], n: int) -> bytes:
        if self.state not in (STATE_SUBSCRIBED, STATE_CLOSING):
            raise _ClientError("E_INVALID", f"cannot {cmd} in current state")
        if len(params) < n:
            raise _ClientError("E_INVALID", f"{cmd} insufficient number of params")
        if len(params[1]) != 16:
            raise _ClientError("E_INVALID", "invalid message ID")
        return params[1]

    def _fin(self, params: List[bytes]) -> None:
        self._fin_ids([self._settle_params("FIN", params, 2)])
        return None

    def _fin_ids(self, ids: List[bytes]) -> None:
        for msg_id in self.channel.finish_many(self, ids):  # type: ignore[union-attr]
            self._error(_ClientError("E_FIN_FAILED",
                                     f"FIN {msg_id.decode(errors='replace')} failed ID not in flight"))

    def _req(self, params: List[bytes]) -> None:
        msg_id = self._settle_params("REQ", params, 3)
        ms = _parse_uint(params[2], "REQ could not parse timeout")
        limit = int(self.broker.max_req_timeout * 1000)
        if ms > limit:
            log.info("client %s: REQ timeout %d out of range 0-%d, clamped",
                     self.remote_address, ms, limit)
            ms = limit
        try:
            self.channel.requeue(self, msg_id, ms / 1000)  # type: ignore[union-attr]
        except NotInFlight:
            raise _ClientError("E_REQ_FAILED",
                               f"REQ {msg_id.decode(errors='replace')} failed ID not in flight") from None
        return None

    def _touch(self, params: List[bytes]) -> None:
        msg_id = self._settle_params("TOUCH", params, 2)
        try:
            self.channel.touch(self, msg_id)  # type: ignore[union-attr]
        except NotInFlight:
            raise _ClientError("E_TOUCH_FAILED",
                               f"TOUCH {msg_id.decode(errors='replace')} failed ID not in flight") from None
        return None

    def _cls(self, params: List[bytes]) -> bytes:
        if self.state != STATE_SUBSCRIBED:
            raise _ClientError("E_INVALID", "cannot CLS in current state")
        self.channel.set_ready(self, 0)  # type: ignore[union-attr]
        self.state = STATE_CLOSING
        return b"CLOSE_WAIT"

    def _nop(self, params: List[bytes]) -> None:
        return None

    def _pub_cmd(self, params: List[bytes]) -> object:
        if len(params) < 2:
            raise _ClientError("E_INVALID", "PUB insufficient number of parameters")
        topic = self._topic_name(params[1], "PUB topic")
        return self._expect_body(_NSQProtocol._pub_body, [params[0], topic, params[1]],
                                 self.broker.max_msg_size, "E_BAD_MESSAGE", "message body")

    def _pub_body(self, params: List[Any], body: bytes) -> object:
        reply = self._publish("PUB", params[1], [body], 0.0)
        srv = self.server
        if (reply == b"OK" and srv.authorizer is None and not self.broker.fsync
                and not (srv.tls_required and self.conn.layers is None)
                and len(self._pub_topics) < 64):
            try:                          # later PUBs to it take the fast path
                self._pub_topics[params[2]] = self.broker.get_topic(params[1])
            except TopicNotFound:
                pass
        return reply

    def _dpub(self, params: List[bytes]) -> object:
        if len(params) < 3:
            raise _ClientError("E_INVALID", "DPUB insufficient number of parameters")
        topic = self._topic_name(params[1], "DPUB topic")
        ms = _parse_uint(params[2], "DPUB could not parse timeout")
        limit = int(self.broker.max_req_timeout * 1000)
        if ms > limit:
            raise _ClientError("E_INVALID", f"DPUB timeout {ms} out of range 0-{limit}")
        return self._expect_body(_NSQProtocol._dpub_body, [params[0], topic, ms],
                                 self.broker.max_msg_size, "E_BAD_MESSAGE", "message body")

    def _dpub_body(self, params: List[Any], body: bytes) -> object:
        return self._publish("DPUB", params[1], [body], params[2] / 1000)

    def _mpub(self, params: List[bytes]) -> object:
        if len(params) < 2:
            raise _ClientError("E_INVALID", "MPUB insufficient number of parameters")
        topic = self._topic_name(params[1], "E_BAD_TOPIC MPUB topic")
        if not self._auth_expired():
            self._check_auth("MPUB", "publish", topic, "")
        return self._expect_body(_NSQProtocol._mpub_body, [params[0], topic],
                                 self.broker.max_body_size, "E_BAD_BODY")

    def _mpub_body(self, params: List[Any], payload: bytes) -> object:
        try:
            bodies = _split_mpub(payload, self.broker.max_msg_size, self.broker.max_body_size)
        except _BadMPUB as e:
            raise _ClientError("E_" + e.code, str(e)) from None
        return self._publish("MPUB", params[1], bodies, 0.0)

    def _publish(self, cmd: str, topic: str, bodies: List[bytes], defer: float) -> object:
        if self.broker.fsync or self._auth_expired() or not self.broker.has_topic(topic):
            return self._later(self._do_publish, cmd, topic, bodies, defer)
        return self._do_publish(cmd, topic, bodies, defer)

    def _do_publish(self, cmd: str, topic: str, bodies: List[bytes], defer: float) -> bytes:
        self._check_auth(cmd, "publish", topic, "")
        try:
            if len(bodies) == 1 and bodies.__class__ is list:
                self.broker.publish(topic, bodies[0], defer)
            else:
                self.broker.publish_bodies(topic, bodies, defer)
        except MinqError as e:
            raise _publish_error(cmd, e) from e
        if topic not in self.pub_counts:
            self.broker.add_producer(self)
        self.pub_counts[topic] = self.pub_counts.get(topic, 0) + len(bodies)
        return b"OK"

    _COMMANDS: Dict[bytes, Callable[["_NSQProtocol", List[bytes]], Any]] = {
        b"IDENTIFY": _identify, b"AUTH": _auth, b"SUB": _sub, b"RDY": _rdy,
        b"FIN": _fin, b"REQ": _req, b"TOUCH": _touch, b"CLS": _cls, b"NOP": _nop,
        b"PUB": _pub_cmd, b"MPUB": _mpub, b"DPUB": _dpub,
    }

    def client_stats(self) -> Dict[str, Any]:
        stats = super().client_stats()
        stats.update({"client_id": self.client_id, "hostname": self.hostname,
                      "remote_address": self.remote_address, "state": self.state,
                      "sample_rate": self.sample_rate, "deflate": self.deflate,
                      "snappy": self.snappy, "user_agent": self.user_agent})
        stats.update(self.tls_stats())
        if self.auth is not None:
            stats.update({"authed": True, "auth_identity": self.auth.identity,
                          "auth_identity_url": self.auth.identity_url})
        if self.pub_counts:
            stats["pub_counts"] = [{"topic": t, "count": n} for t, n in self.pub_counts.items()]
        return stats

    def tls_stats(self) -> Dict[str, Any]:
        """nsqd's tls fields of a client object."""
        layers = self.conn.layers
        return (layers or _NO_LAYERS).tls_stats()


_NO_LAYERS = _Layers()


def _publish_error(cmd: str, e: MinqError) -> _ClientError:
    """nsqd's error for a publish the core refused."""
    if isinstance(e, InvalidMessage):
        return _ClientError("E_BAD_MESSAGE", f"{cmd} {e}")
    return _ClientError(f"E_{cmd}_FAILED", f"{cmd} failed {e}")


class TCPServer(_Face):
    """nsqd's TCP front end (protocol V2) for a Broker, on one I/O thread.

    ``start()`` serves from the loop's thread (the broker's clock drives the
    protocol's deadlines); ``close()`` stops accepting, closes every
    connection (requeueing what they held in flight) and joins every
    thread.  The broker stays open: its owner closes it.  Commands that may
    block run on up to *workers* threads while their connection waits
    (publishes in fsync mode, the first use of a topic or channel, AUTH
    against an auth server).  *loop*: an event loop to share (``serve``
    runs the HTTP face on the same one).
    """

    _name = "tcp"

    def __init__(self, broker: Broker, address: Any = DEFAULT_TCP_ADDRESS, *,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
                 max_heartbeat_interval: float = DEFAULT_MAX_HEARTBEAT_INTERVAL,
                 output_buffer_timeout: float = DEFAULT_OUTPUT_BUFFER_TIMEOUT,
                 max_output_buffer_size: int = DEFAULT_MAX_OUTPUT_BUFFER_SIZE,
                 max_output_buffer_timeout: float = DEFAULT_MAX_OUTPUT_BUFFER_TIMEOUT,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 tls_required: bool = False, deflate: bool = True, snappy: bool = True,
                 max_deflate_level: int = DEFAULT_MAX_DEFLATE_LEVEL,
                 authorizer: Optional[Authorizer] = None, workers: int = 16,
                 body_budget: Optional[MemoryBudget] = None,
                 min_output_buffer_timeout: float = DEFAULT_MIN_OUTPUT_BUFFER_TIMEOUT,
                 max_channel_consumers: int = 0, tls_root_ca_file: Optional[str] = None,
                 tls_client_auth_policy: str = "", tls_min_version: str = "",
                 loop: Optional[_EventLoop] = None) -> None:
        _check_range("max_deflate_level", max_deflate_level, 1, 9)
        _check_range("max_channel_consumers", max_channel_consumers, 0, None)
        _check_range("heartbeat_interval", heartbeat_interval, 0.001, max_heartbeat_interval)
        _check_range("workers", workers, 1, 1024)
        self.broker = broker
        self.heartbeat_interval = heartbeat_interval
        self.max_heartbeat_interval = max_heartbeat_interval
        self.output_buffer_timeout = output_buffer_timeout
        self.max_output_buffer_size = max_output_buffer_size
        self.max_output_buffer_timeout = max_output_buffer_timeout
        self.min_output_buffer_timeout = min_output_buffer_timeout
        #: most consumers a channel may have over TCP (0: no limit), as nsqd
        self.max_channel_consumers = max_channel_consumers
        self.deflate = deflate
        self.snappy = snappy
        self.max_deflate_level = max_deflate_level
        self.authorizer = authorizer
        #: shared with the HTTP face when ``serve`` runs both
        self.body_budget = body_budget or MemoryBudget(
            DEFAULT_BODY_MEMORY_FACTOR * broker.max_body_size)
        self.tls_context = _server_tls_context(tls_cert, tls_key, tls_root_ca_file,
                                               tls_client_auth_policy, tls_min_version)
        if tls_client_auth_policy and not tls_required:
            tls_required = True         # nsqd: a client certificate policy requires TLS
        if tls_required and self.tls_context is None:
            raise InvalidArgument("tls_required needs tls_cert and tls_key")
        self.tls_required = tls_required
        super().__init__(address, TCP_PORT, "TCP", broker.clock, loop, workers)
        self.batch = _PublishBatch(broker, self.loop)

    def _protocol(self, conn: _ServerConnection) -> _NSQProtocol:
        return _NSQProtocol(self, conn)

    def close(self) -> None:
        """Stop accepting, close every connection, join every thread."""
        with self._conns_lock:
            if self._closing and not self._started:
                return
            self._closing = True
        self.loop.call(self._unlisten)
        self.loop.call(self._close_connections)
        self._finish_close()


# -- HTTP/1.1: requests in, responses out -------------------------------------------

class _HTTPError(Exception):
    """An error reply: status code and nsqd's message code."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code


_HTTP_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 403: "Forbidden",
                 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
                 413: "Request Entity Too Large", 414: "Request-URI Too Long",
                 431: "Request Header Fields Too Large", 500: "Internal Server Error",
                 501: "Not Implemented", 503: "Service Unavailable",
                 505: "HTTP Version Not Supported"}
_HTTP_MAX_LINE = 65536           # a request line or header line (as http.server)
_HTTP_MAX_HEADERS = 100
_HTTP_MAX_HEAD = 256 * 1024      # the request line and all headers
_HTTP_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HTTP_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_HTTP_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BLANK = (b"\r", b"\n")


class _HTTPRequest:
    """One request as the HTTP protocol read it: method and path as str, the
    query string's parameters (``parse_qs``'s, blank values kept), headers
    by lower-case name (a repeated header's values joined by commas), the
    body, and the route its application found for it."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body",
                 "keep_alive", "route", "waiter")

    def __init__(self, method: str, target: bytes, version: bytes,
                 headers: Dict[bytes, bytes]) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition(b"?")
        if b"%" in path:
            path = urllib.parse.unquote_to_bytes(path)
        self.path = path.decode("utf-8", "replace")
        self.query = _parse_query(query) if query else {}
        self.version = version
        self.headers = headers
        self.body = b""
        conn = headers.get(b"connection")
        self.keep_alive = (version == b"HTTP/1.1") if conn is None else (
            b"close" not in conn.lower() if version == b"HTTP/1.1"
            else b"keep-alive" in conn.lower())
        self.route: Any = None
        # The protocol answering it on the loop's thread (None on a worker):
        # an application may answer later, through waiter.published().
        self.waiter: Any = None

    def again(self) -> "_HTTPRequest":
        """A new request with the same head (parsed heads are kept: clients
        send the same one again and again); query and headers are shared."""
        req = _HTTPRequest.__new__(_HTTPRequest)
        req.method, req.target, req.path = self.method, self.target, self.path
        req.query, req.version, req.headers = self.query, self.version, self.headers
        req.keep_alive = self.keep_alive
        req.body, req.route, req.waiter = b"", None, None
        return req

    def arg(self, name: str) -> Optional[str]:
        values = self.query.get(name)
        return values[0] if values else None

    def announces_body(self) -> bool:
        length = self.headers.get(b"content-length", b"0").strip()
        return b"transfer-encoding" in self.headers or length not in (b"", b"0")


def _parse_query(query: bytes) -> Dict[str, List[str]]:
    q: Dict[str, List[str]] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        key, _, value = part.partition(b"=")
        if b"%" in part or b"+" in part:
            k = urllib.parse.unquote_plus(key.decode("latin-1"), "utf-8", "replace")
            v = urllib.parse.unquote_plus(value.decode("latin-1"), "utf-8", "replace")
        else:
            k = key.decode("utf-8", "replace")
            v = value.decode("utf-8", "replace")
        values = q.get(k)
        if values is None:
            q[k] = [v]
        else:
            values.append(v)
    return q


# Header names as clients spell them, checked and lower-cased once; and
# whole request heads, parsed once (a client sends the same one again).
_HEADER_NAMES: Dict[bytes, bytes] = {}
_HEADS: Dict[bytes, "_HTTPRequest"] = {}


def _http_head(head: bytes) -> _HTTPRequest:
    """Parse a request line and headers (CRLF line ends; a lone LF is taken
    as one, a lone CR refused); _HTTPError for anything malformed."""
    n = head.count(b"\n")
    if head.count(b"\r") != n or head.count(b"\r\n") != n:
        if head.count(b"\r") != head.count(b"\r\n"):
            raise _HTTPError(400, "INVALID_REQUEST")       # a lone CR
        lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in head.split(b"\n")]
    else:
        lines = head.split(b"\r\n")
    line = lines[0]
    if len(line) > _HTTP_MAX_LINE:
        raise _HTTPError(414, "URI_TOO_LONG")
    words = line.split(b" ")
    if len(words) != 3:
        raise _HTTPError(400, "INVALID_REQUEST")
    method, target, version = words
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        m = _HTTP_VERSION.fullmatch(version)
        raise _HTTPError(505 if m and m.group(1) >= b"2" else 400,
                         "HTTP_VERSION_NOT_SUPPORTED" if m else "INVALID_REQUEST")
    if method not in _HTTP_METHODS and not _HTTP_TOKEN.fullmatch(method):
        raise _HTTPError(400, "INVALID_REQUEST")
    if not target.startswith(b"/"):
        raise _HTTPError(400, "INVALID_REQUEST")
    if len(lines) > _HTTP_MAX_HEADERS + 1:
        raise _HTTPError(431, "TOO_MANY_HEADERS")
    headers: Dict[bytes, bytes] = {}
    names = _HEADER_NAMES
    for line in lines[1:]:
        raw, sep, value = line.partition(b":")
        name = names.get(raw)
        if name is None:
            if not sep or not _HTTP_TOKEN.fullmatch(raw):   # also a folded line
                raise _HTTPError(400, "INVALID_REQUEST")
            name = raw.lower()
            if len(names) < 256:
                names[raw] = name
        if len(line) > _HTTP_MAX_LINE:
            raise _HTTPError(431, "HEADER_TOO_LARGE")
        value = value.strip(b" \t")
        if b"\0" in value:
            raise _HTTPError(400, "INVALID_REQUEST")
        old = headers.get(name)
        headers[name] = value if old is None else old + b"," + value
    return _HTTPRequest(method.decode("latin-1"), target, version, headers)


def _body_framing(req: _HTTPRequest, limit: int, too_big: str) -> int:
    """How the body comes: its Content-Length, or -1 for chunked.  Refuses
    request smuggling (both framings, differing lengths), other transfer
    codings (501) and a length over *limit* (413, before reading it)."""
    headers = req.headers
    coding = headers.get(b"transfer-encoding")
    length = headers.get(b"content-length")
    if coding is not None:
        if length is not None:             # both: the classic request smuggling
            raise _HTTPError(400, "INVALID_REQUEST")
        if [c.strip().lower() for c in coding.split(b",")] != [b"chunked"]:
            raise _HTTPError(501, "UNSUPPORTED_TRANSFER_ENCODING")
        return -1
    if length is None:
        return 0
    if b"," in length:                    # repeated: the same length, or refused
        values = {v.strip() for v in length.split(b",")}
        if len(values) != 1:
            raise _HTTPError(400, "INVALID_REQUEST")
        length = values.pop()
    text = length.strip()
    if not _DIGITS.fullmatch(text):
        raise _HTTPError(400, "INVALID_REQUEST")
    n = int(text)
    if n > limit:
        raise _HTTPError(413, too_big)
    return n


class _HTTPProtocol:
    """HTTP/1.1 over one ``_ServerConnection``, strictly, for an application
    (``HTTPServer``): ``app.head(request)`` says how big a body it takes (or
    answers at once), ``app.blocking(request)`` whether answering may block
    (then it runs on a worker while the loop serves everyone else), and
    ``app.respond(request)`` answers.

    Requests are read in order, keep-alive and pipelined: a request's
    response is queued before the next is read.  A body comes with a
    Content-Length or chunked, within the application's limit, and big
    ones only once the body memory budget has room.  Every fault gets its
    status code and the connection closes, so what follows a bad request
    is never taken for a request.  Time limits, on real time: the request
    line and headers (and a TLS handshake) within ``header_timeout``, a body
    within ``read_timeout``, a response read within ``read_timeout``, a
    keep-alive connection idle for ``idle_timeout``.
    """

    pass_hook = False

    def __init__(self, app: Any, conn: _ServerConnection) -> None:
        self.app = app
        self.conn = conn
        self.state = "head"          # head, body, wait (for body memory), busy, idle
        self.deadline = math.inf     # of the state, on time.monotonic()
        self._timer_at = math.inf
        self.req: Optional[_HTTPRequest] = None
        self._length = 0             # of the body being read; -1: chunked
        self._chunks: List[bytes] = []   # of a chunked body
        self._chunk_state = "size"   # at a chunk's size line, its data, or the trailers
        self._chunk_size = 0
        self._got = 0                # bytes of chunks so far
        self._wanted = 0             # body memory waited for
        self._limit = 0
        self._too_big = ""
        self._budget_held = 0
        self.requests = 0
        self.close_after = False     # the server is closing: this response is the last
        conn.write_timeout = app.read_timeout

    def __repr__(self) -> str:
        return f"<HTTP client {self.conn.remote_address} {self.state}>"

    # -- the connection's events ----------------------------------------------------
    def started(self) -> None:
        if self.app.tls_context is not None:
            self.conn.start_tls(self.app.tls_context)
        self._enter("head", self.app.header_timeout)

    def _enter(self, state: str, timeout: float) -> None:
        self.state = state
        self.deadline = deadline = self.conn.loop.now + timeout
        if deadline < self._timer_at:
            self.conn.loop.arm(self, deadline)

    def _on_timer(self, now: float) -> None:
        conn = self.conn
        if conn.gone or conn.closing or self.state == "busy":
            return
        if now < self.deadline:
            conn.loop.arm(self, self.deadline)
            return
        if self.state == "wait":
            self.conn.waiting = False
            self._error(_HTTPError(503, "BODY_MEMORY_FULL"))
            return
        log.info("http: closing the connection from %s: %s", conn.remote_ip,
                 {"head": "no complete request headers in time", "idle": "idle too long",
                  "body": "body not sent in time"}[self.state])
        conn.shutdown("timed out", graceful=False)

    def ended(self) -> None:
        """The peer ended its side: a request cut short gets no answer."""
        self.conn.shutdown("closed by the peer", graceful=self.state == "idle")

    def connection_lost(self) -> None:
        self._give_back_budget()

    def job_ended(self) -> None:
        pass

    def tls_ready(self) -> None:
        pass

    def tls_failed(self, why: str) -> None:
        log.info("http: TLS handshake with %s failed: %s", self.conn.remote_ip, why)
        self.conn.shutdown("TLS failed", graceful=False)

    def decode_failed(self, e: Exception) -> None:
        self.conn.shutdown(f"bad input: {e}", graceful=False)

    def failed(self, e: Exception) -> None:
        """Reading the input failed unexpectedly: answer 500 and close."""
        self._error(_HTTPError(500, "INTERNAL_ERROR"))

    def drained(self) -> None:
        """A response that waited for the client went out."""

    def after_pass(self) -> None:
        pass

    def buffered(self) -> None:
        self.conn.flush()

    def server_closing(self) -> None:
        """The server stops: end an idle or half-read connection now; a
        request being answered finishes first (its response closes it)."""
        if self.state == "busy" or self.conn._unsent:
            self.close_after = True
        else:
            self.conn.shutdown("the server is closing", graceful=False)

    # -- reading requests ------------------------------------------------------------------
    def received(self) -> None:
        conn = self.conn
        while not (conn.busy or conn.closing or conn.waiting) and conn.avail >= conn.need:
            if conn._unsent_bytes >= _MAX_UNSENT or conn._outq_full:
                return                      # the client reads nothing: wait for it
            if self.req is None:
                if self.state == "idle":
                    self._enter("head", self.app.header_timeout)
                if not self._read_head():
                    return
                if self.req is None:          # answered before its body
                    continue
            if not self._read_body():
                return
            self._answer()
            if self.req is not None:           # answered later (a worker, a batch)
                return

    def _read_head(self) -> bool:
        """The request line and headers, parsed (True), or wait for more input."""
        conn = self.conn
        buf, pos = conn.rbuf, conn.rpos
        while buf[pos:pos + 1] in _BLANK and (buf[pos] == 10 or buf.startswith(b"\r\n", pos)):
            conn.consume(1 if buf[pos] == 10 else 2)   # blank lines before a request
            buf, pos = conn.rbuf, conn.rpos
        end, skip = buf.find(b"\n\r\n", pos), 3     # the blank line: CRLF or a lone LF
        lf = buf.find(b"\n\n", pos, end if end >= 0 else len(buf))
        if lf >= 0:
            end, skip = lf, 2
        if end < 0:
            if len(buf) - pos > _HTTP_MAX_HEAD:
                self._error(_HTTPError(431, "HEADER_TOO_LARGE"))
            elif len(buf) - pos > _HTTP_MAX_LINE + 2 and \
                    buf.find(b"\n", pos, pos + _HTTP_MAX_LINE + 2) < 0:
                self._error(_HTTPError(414, "URI_TOO_LONG"))
            else:
                conn.need = len(buf) - pos + 1
            return False
        head = buf[pos:end - 1] if buf[end - 1] == 13 else buf[pos:end]
        conn.consume(end + skip - pos)
        conn.need = 1
        self.requests += 1
        known = _HEADS.get(head)
        if known is not None:
            req = known.again()
        else:
            try:
                req = _http_head(head)
            except _HTTPError as e:
                self._error(e)
                return False
            if len(head) <= 1024 and len(_HEADS) < 1024:
                _HEADS[head] = req.again()
        self.req = req
        try:
            ruling = self.app.head(req)
            if len(ruling) == 2:
                limit, too_big = ruling
                self._length = _body_framing(req, limit, too_big)
        except _HTTPError as e:
            self._error(e)
            return False
        if len(ruling) == 4:                  # answered before its body
            if req.announces_body():
                self._error(None, ruling)
                return False
            self.state = "busy"
            self._respond(ruling)
            return True
        self._limit, self._too_big = limit, too_big
        n = limit if self._length < 0 else self._length
        if n >= MemoryBudget.SMALL and not self._take_budget(n):
            return False
        if self._length:
            self._enter("body", self.app.read_timeout)
            if (req.version == b"HTTP/1.1" and conn.avail < max(self._length, 1)
                    and req.headers.get(b"expect", b"").lower() == b"100-continue"):
                conn.write(_CONTINUE)
        return True

    def _take_budget(self, n: int) -> bool:
        budget = self.app.body_budget
        if budget.try_take(n, self._budget_freed):
            self._budget_held = n
            return True
        self._wanted = n
        self.conn.waiting = True       # waiting is not the client's delay
        self.conn.update_events()
        self._enter("wait", self.app.read_timeout)
        return False

    def _budget_freed(self) -> None:
        self.conn.loop.post(self._retry_budget)

    def _retry_budget(self, _: Any = None) -> None:
        conn = self.conn
        if conn.gone or not conn.waiting or self.state != "wait":
            return
        if not self.app.body_budget.try_take(self._wanted, self._budget_freed):
            return
        self._budget_held = self._wanted
        conn.waiting = False
        self._enter("body", self.app.read_timeout)
        conn.resume()

    def _give_back_budget(self) -> None:
        if self._budget_held:
            self.app.body_budget.give_back(self._budget_held)
            self._budget_held = 0

    def _read_body(self) -> bool:
        """The body, whole (True), or wait for more input (False)."""
        conn, n = self.conn, self._length
        if n == 0:
            return True
        if n > 0:
            if conn.avail < n:
                conn.need = n
                return False
            self.req.body = conn.rbuf[conn.rpos:conn.rpos + n]  # type: ignore[union-attr]
            conn.consume(n)
            conn.need = 1
            return True
        while True:                       # chunked
            step = self._read_chunk()
            if step is None:
                return False
            if step:
                self.req.body = b"".join(self._chunks)  # type: ignore[union-attr]
                self._chunks, self._got = [], 0
                self._chunk_state = "size"
                conn.need = 1
                return True

    def _read_chunk(self) -> Optional[bool]:
        # One step of Transfer-Encoding: chunked, strictly: hex sizes, CRLF
        # after each chunk, trailers read and dropped; any fault is a 400
        # that closes.  None: wait (or failed); True: the body is whole.
        conn = self.conn
        buf, pos = conn.rbuf, conn.rpos
        if self._chunk_state == "data":
            size = self._chunk_size
            if conn.avail < size + 2:
                conn.need = size + 2
                return None
            if buf[pos + size:pos + size + 2] != b"\r\n":
                return self._bad_chunks()
            self._chunks.append(buf[pos:pos + size])
            conn.consume(size + 2)
            self._chunk_state = "size"
            return False
        longest = 1024 if self._chunk_state == "size" else 8192
        nl = buf.find(b"\n", pos, pos + longest)
        if nl < 0:
            if len(buf) - pos >= longest:
                return self._bad_chunks()
            conn.need = len(buf) - pos + 1
            return None
        line = buf[pos:nl + 1]
        conn.consume(nl + 1 - pos)
        if self._chunk_state == "trailer":          # up to the blank line
            return line in (b"\r\n", b"\n") or False
        size_text = line.split(b";", 1)[0].strip()
        if not line.endswith(b"\r\n") or not _HEX.fullmatch(size_text):
            return self._bad_chunks()
        size = int(size_text, 16)
        if size == 0:
            self._chunk_state = "trailer"
            return False
        self._got += size
        if self._got > self._limit:
            self._error(_HTTPError(413, self._too_big))
            return None
        self._chunk_state, self._chunk_size = "data", size
        return False

    def _bad_chunks(self) -> None:
        self._error(_HTTPError(400, "INVALID_CHUNKED_BODY"))
        return None

    # -- answering ------------------------------------------------------------------
    def _answer(self) -> None:
        req = self.req
        self.state = "busy"
        if self.app.blocking(req):
            self.conn.submit(self.app.respond, req)
            self.conn.update_events()
            return
        req.waiter = self  # type: ignore[union-attr]
        response = self.app.respond(req)
        if response is not None:               # else: published() answers
            self._respond(response)

    def published(self, topic: str, error: Optional[MinqError]) -> None:
        """The outcome of the request's publish in the server's publish batch."""
        conn = self.conn
        if conn.closing:
            return
        self._respond(self.app.published(error))
        if conn.avail:
            conn.resume()                      # requests pipelined behind it

    def job_done(self, response: Any, error: Optional[BaseException]) -> None:
        if error is not None:
            log.error("http %s %s failed: %r", self.req.method, self.req.target, error)  # type: ignore[union-attr]
            response = (500, b'{"message":"INTERNAL_ERROR"}', _JSON_TYPE, True)
        self._respond(response)

    def _respond(self, response: Tuple[int, bytes, str, bool]) -> None:
        req = self.req
        self.req = None
        self._give_back_budget()
        keep = req.keep_alive and not (self.close_after or self.conn.closing)  # type: ignore[union-attr]
        self._send(req, response, keep)  # type: ignore[arg-type]
        if not keep:
            self.conn.shutdown("response sent", graceful=True)
            return
        self._enter("idle", self.app.idle_timeout)

    def _send(self, req: Optional[_HTTPRequest], response: Tuple[int, bytes, str, bool],
              keep: bool) -> None:
        status, body, ctype, v1 = response
        if status == 200 and v1 and body == b"OK" and keep and req is not None and \
                req.method != "HEAD" and req.version == b"HTTP/1.1":
            self.conn.write(_http_ok_reply())          # the reply to most requests
            return
        head = [f"HTTP/1.1 {status} {_HTTP_REASONS.get(status, 'Unknown')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Date: {_http_date()}\r\n"]
        if v1:
            head.append(f"X-NSQ-Content-Type: {_NSQ_CONTENT_TYPE}\r\n")
        if not keep:
            head.append("Connection: close\r\n")
        elif req is not None and req.version == b"HTTP/1.0":
            head.append("Connection: keep-alive\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        if req is None or req.method != "HEAD":
            data += body
        self.conn.write(data)

    def _error(self, e: Optional[_HTTPError],
               response: Optional[Tuple[int, bytes, str, bool]] = None) -> None:
        """Answer *e* (or *response*) and close: what follows a bad request
        must never be taken for a request (it is drained while the reply
        goes out)."""
        if e is not None:
            log.info("http %s: %d %s", self.conn.remote_ip, e.status, e.code)
            response = _json_reply(e)
        self._give_back_budget()
        self._send(self.req, response, keep=False)  # type: ignore[arg-type]
        self.req = None
        self.state = "busy"
        self.conn.shutdown("bad request", graceful=True)


_JSON_TYPE = "application/json; charset=utf-8"
_TEXT_TYPE = "text/plain; charset=utf-8"


def _json_reply(e: _HTTPError, **extra: Any) -> Tuple[int, bytes, str, bool]:
    return e.status, json.dumps({"message": e.code, **extra}).encode(), _JSON_TYPE, True


_DATE_CACHE: List[Any] = [0, "", b""]     # [second, Date value, the 200 OK reply of that second]


def _http_date() -> str:
    now = int(time.time())
    if now != _DATE_CACHE[0]:
        _DATE_CACHE[0] = now
        _DATE_CACHE[1] = email.utils.formatdate(now, usegmt=True)
        _DATE_CACHE[2] = (f"HTTP/1.1 200 OK\r\nContent-Type: {_TEXT_TYPE}\r\nContent-Length: 2\r\n"
                          f"Date: {_DATE_CACHE[1]}\r\nX-NSQ-Content-Type: {_NSQ_CONTENT_TYPE}"
                          f"\r\n\r\nOK").encode()
    return _DATE_CACHE[1]


def _http_ok_reply() -> bytes:
    if int(time.time()) != _DATE_CACHE[0]:
        _http_date()
    return _DATE_CACHE[2]


# -- nsqlookupd: registering this server's topics and channels ----------------------

def _json_int(data: Dict[str, Any], key: str, default: int) -> int:
    """An integer IDENTIFY field; Go's decoder rejects floats, strings and bools."""
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ClientError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")
    return value


# -- nsqlookupd registration: nsqd's lookup loop over lookupd's TCP protocol V1

LOOKUPD_PING_INTERVAL = 15.0     # nsqd PINGs every lookupd this often
_NSQ_ACCEPT = "application/vnd.nsq; version=1.0"   # V1 answers without {"data": ...}
_MAGIC_V1 = b"  V1"


def broadcast_address(listen_host: str) -> str:
    """What to tell lookupd and ``/info`` when no --broadcast-address is given.

    nsqd uses the OS hostname.  minq listens on 127.0.0.1 by default, where the
    hostname would often point elsewhere, so it uses the hostname only when
    listening on every interface and the listening host otherwise.
    """
    if listen_host in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return listen_host


class LookupdRegistrar:
    """Tell nsqlookupd instances which topics and channels this broker has.

    One thread per lookupd address does what nsqd's lookup loop does: connect
    (magic ``"  V1"``), IDENTIFY with the broadcast address and ports, REGISTER
    every topic and channel, then REGISTER / UNREGISTER as they come and go,
    and PING every *ping_interval* seconds.  Any error closes the connection;
    it is re-made with backoff (at most *max_backoff* s) and everything is
    registered again, so a restarted lookupd learns the whole state.

    Like nsqd, a topic created while lookupds are connected first gets the
    channels they know of (``GET /channels`` on each lookupd's HTTP port, from
    its IDENTIFY reply; ephemeral ones skipped), before its first message, so
    consumers that found the topic elsewhere miss nothing here.
    """

    def __init__(self, broker: Broker, addresses: Iterable[str], *,
                 broadcast_address: str, tcp_port: int, http_port: int,
                 ping_interval: float = LOOKUPD_PING_INTERVAL, timeout: float = 1.0,
                 max_backoff: float = LOOKUPD_PING_INTERVAL) -> None:
        self.broker = broker
        self.identity = {
            "version": NSQ_VERSION, "tcp_port": tcp_port, "http_port": http_port,
            "hostname": socket.gethostname(), "broadcast_address": broadcast_address,
            "topology_zone": "", "topology_region": ""}
        self.ping_interval = ping_interval
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        for a in addresses:
            _split_address(a, LOOKUPD_TCP_PORT)          # a malformed address fails now, not forever later
        self.peers = [_LookupdPeer(self, a) for a in addresses]

    def start(self) -> "LookupdRegistrar":
        self.broker.watch(self._on_change)
        for p in self.peers:
            p.thread.start()
        return self

    def _on_change(self, action: str, topic: str, channel: Optional[str]) -> None:
        for p in self.peers:
            p.events.put((action, topic, channel))
        if action == "create" and channel is None:
            self._precreate_channels(topic)

    def _precreate_channels(self, topic: str) -> None:
        # Runs on the thread creating the topic, before its first message is
        # put (nsqd does this synchronously too); lookupd errors only log.
        names: set = set()
        query = urllib.parse.urlencode({"topic": topic})
        for p in self.peers:
            info = p.info if p.connected else {}
            if not info.get("broadcast_address") or not info.get("http_port"):
                continue
            url = f"http://{info['broadcast_address']}:{info['http_port']}/channels?{query}"
            request = urllib.request.Request(url, headers={"Accept": _NSQ_ACCEPT})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as r:
                    names.update(json.loads(r.read()).get("channels") or [])
            except (OSError, ValueError, AttributeError) as e:
                log.warning("lookupd %s: cannot list the channels of %s: %s", url, topic, e)
        try:
            t = self.broker.get_topic(topic)
            for name in sorted(names):
                if isinstance(name, str) and not is_ephemeral(name):
                    t.channel(name)
        except (TopicNotFound, BrokerClosed, InvalidName) as e:
            log.warning("cannot pre-create the channels of %s: %s", topic, e)

    def close(self) -> None:
        """Stop every peer thread; lookupd drops our registrations on disconnect."""
        self.broker.unwatch(self._on_change)
        self._stop.set()
        for p in self.peers:
            p.events.put(None)
        for p in self.peers:
            if p.thread.is_alive():
                p.thread.join()

    def __enter__(self) -> "LookupdRegistrar":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _LookupdPeer:
    """One lookupd: a connection, the events to send it, and its thread."""

    def __init__(self, registrar: LookupdRegistrar, address: str) -> None:
        self.registrar = registrar
        self.address = address
        self.events: "queue.SimpleQueue[Optional[Tuple[str, str, Optional[str]]]]" = \
            queue.SimpleQueue()
        self.info: Dict[str, Any] = {}     # lookupd's IDENTIFY reply
        self.connected = False
        self.sock: Optional[socket.socket] = None
        self.thread = threading.Thread(target=self._run, name=f"minq-lookupd-{address}")

    def _run(self) -> None:
        reg = self.registrar
        backoff = 0.0
        while not reg._stop.is_set():
            try:
                self._connect()
                backoff = 0.0
                self._serve()
            except (OSError, MinqError, ValueError) as e:
                if not reg._stop.is_set():
                    log.warning("lookupd %s: %s", self.address, e)
            finally:
                self._disconnect()
            backoff = min(max(1.0, 2 * backoff), reg.max_backoff)
            reg._stop.wait(backoff)

    def _connect(self) -> None:
        reg = self.registrar
        host, port = _split_address(self.address, LOOKUPD_TCP_PORT)
        self.sock = socket.create_connection((host, port), timeout=reg.timeout)
        self.sock.sendall(_MAGIC_V1)
        reply = self._command(b"IDENTIFY\n" + _body(json.dumps(reg.identity).encode()))
        self.info = json.loads(reply)
        # Events queued so far are covered by the snapshot taken next.
        while True:
            try:
                if self.events.get_nowait() is None:
                    return
            except queue.Empty:
                break
        self.connected = True
        log.info("lookupd %s: connected (lookupd %s)", self.address, self.info.get("version"))
        for name, topic in reg.broker.topics.items():
            channels = list(topic.channels)
            if not channels:
                self._command(b"REGISTER %s\n" % name.encode())
            for ch in channels:
                self._command(b"REGISTER %s %s\n" % (name.encode(), ch.encode()))

    def _serve(self) -> None:
        reg = self.registrar
        next_ping = time.monotonic() + reg.ping_interval
        while not reg._stop.is_set():
            try:
                event = _wait_get(self.events, next_ping)
            except queue.Empty:
                self._command(b"PING\n")
                next_ping = time.monotonic() + reg.ping_interval
                continue
            if event is None:
                return
            action, topic, channel = event
            verb = b"REGISTER" if action == "create" else b"UNREGISTER"
            line = b"%s %s" % (verb, topic.encode())
            if channel is not None:
                line += b" " + channel.encode()
            self._command(line + b"\n")

    def _command(self, data: bytes) -> bytes:
        """Send one command and read lookupd's reply: [4-byte size][data]."""
        sock = self.sock
        assert sock is not None
        sock.sendall(data)
        size = _LEN.unpack(self._read(4))[0]
        if not 0 <= size <= self.registrar.broker.max_body_size:
            raise ProtocolError("E_PROTOCOL", f"lookupd reply of {size} bytes")
        reply = self._read(size)
        if reply.startswith(b"E_"):
            code, _, text = reply.decode(errors="replace").partition(" ")
            verb = data.partition(b"\n")[0].partition(b" ")[0].decode()
            raise ProtocolError(code, f"{text} (lookupd's answer to {verb})")
        return reply

    def _read(self, n: int) -> bytes:
        sock = self.sock
        assert sock is not None
        chunks = []
        while n:
            data = sock.recv(n)
            if not data:
                raise ConnectionLost("lookupd closed the connection")
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def _disconnect(self) -> None:
        self.connected = False
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# =============================================================================
# HTTP API
#
# nsqd's HTTP endpoints, as the handlers of HTTPServer that _HTTPProtocol
# calls: publish, admin, /stats, /info, /ping, /config; nsqlookupd's read
# endpoints (/lookup, /topics, /channels, /nodes) naming this server;
# /metrics (Prometheus text); and the admin page at /.  Parameters come
# from the query string, errors are {"message": "CODE"} with nsqd's status
# codes, and every V1 response carries X-NSQ-Content-Type.  Like the TCP
# face, it calls only the core's API.
# =============================================================================

_NSQ_CONTENT_TYPE = "nsq; version=1.0"
# nsqd's keys, then minq's own (records lost to damaged segments)
_TOPIC_KEYS = ("topic_name", "channels", "depth", "backend_depth", "message_count",
               "message_bytes", "paused", "e2e_processing_latency", "corrupt_count")
_CHANNEL_KEYS = ("channel_name", "depth", "backend_depth", "in_flight_count", "deferred_count",
                 "message_count", "requeue_count", "timeout_count", "client_count", "clients",
                 "paused", "e2e_processing_latency", "corrupt_count")
_CLIENT_KEYS = ("client_id", "hostname", "version", "remote_address", "state", "ready_count",
                "in_flight_count", "message_count", "finish_count", "requeue_count",
                "connect_ts", "sample_rate", "deflate", "snappy", "user_agent", "authed",
                "auth_identity", "auth_identity_url", "topology_zone", "topology_region",
                "pub_counts", "tls", "tls_cipher_suite", "tls_version",
                "tls_negotiated_protocol", "tls_negotiated_protocol_is_mutual")


def _pick_keys(d: Dict[str, Any], keys: Tuple[str, ...]) -> Dict[str, Any]:
    """nsqd's keys of *d*, in nsqd's order (optional ones only when present)."""
    return {k: d[k] for k in keys if k in d}


def nsqd_stats(stats: Dict[str, Any], include_mem: bool = True) -> Dict[str, Any]:
    """Broker.stats() reduced to exactly nsqd's /stats?format=json keys and order."""
    def client(c: Dict[str, Any]) -> Dict[str, Any]:
        return _pick_keys(c, _CLIENT_KEYS)

    def channel(c: Dict[str, Any]) -> Dict[str, Any]:
        out = _pick_keys(c, _CHANNEL_KEYS)
        if out.get("clients") is not None:
            out["clients"] = [client(x) for x in out["clients"]]
        return out

    topics = stats["topics"]
    if topics is not None:
        topics = [dict(_pick_keys(t, _TOPIC_KEYS), channels=[channel(c) for c in t["channels"]])
                  for t in topics]
    out: Dict[str, Any] = {"version": stats["version"], "health": stats["health"],
                           "start_time": stats["start_time"], "topics": topics}
    if include_mem:
        out["memory"] = _memory_stats()
    producers = stats.get("producers")
    out["producers"] = [client(p) for p in producers] if producers else None
    return out


# -- history for the admin page: rings of samples per topic and channel --------
#
# The HTTP face samples Broker.stats() once a second (a deadline on its event
# loop; the sample itself runs on one of its workers) and keeps, per topic and
# channel, fixed-size rings of float32 rows.  Nothing here knows about HTTP.

# window name: (seconds per row, rows) of the full-resolution ring
_HISTORY_WINDOWS = {"10m": (1, 600), "24h": (60, 1440)}
_HISTORY_POINTS = 60                 # rows of the overview's small charts, per window
_SAMPLE_SHARE = 0.05                 # of a core, the most the history's sampling takes
_TOPIC_FIELDS = ("depth", "rate_in", "rate_out")
_CHANNEL_FIELDS = ("depth", "in_flight", "deferred", "rate_in", "rate_out")
_OVERVIEW_FIELDS = ("depth", "rate_in", "rate_out")
_NAN = float("nan")


def _shown(v: float) -> Optional[float]:
    # A sample as JSON gives it: None for none, 3 decimals at most.
    return None if v != v else (round(v, 3) if v % 1 else int(v))


class _Ring:
    """The last *size* rows of *width* float32 values, one row per integer
    stamp (a second, a minute, ...), at ``stamp % size``.  A row never
    written, or skipped by a gap in the stamps, is NaN (no sample).  Its
    memory is fixed: 4 x size x width bytes of values."""

    __slots__ = ("size", "width", "values", "last")

    def __init__(self, size: int, width: int) -> None:
        self.size, self.width = size, width
        self.values = array.array("f", [_NAN]) * (size * width)
        self.last: Optional[int] = None        # the newest stamp written

    def put(self, stamp: int, row: List[float], fill: bool = False) -> None:
        """Write *row* at *stamp*: the newest again overwrites it; an older
        one is ignored (the clock does not go back).  Stamps skipped since
        the newest get no sample (NaN), or *row* too with *fill* (the
        sampler skipped them on purpose: it samples less often when
        sampling is costly)."""
        last, size, width, values = self.last, self.size, self.width, self.values
        if last is not None and stamp != last:
            if stamp < last:
                return
            gap = array.array("f", row if fill else [_NAN] * width)
            for s in range(max(last + 1, stamp - size + 1), stamp):      # no samples
                i = (s % size) * width
                values[i:i + width] = gap
        i = (stamp % size) * width
        values[i:i + width] = array.array("f", row)
        self.last = stamp

    def columns(self, end: int) -> List[List[Optional[float]]]:
        """Each field's values at the *size* stamps up to *end*, oldest first;
        None where there is no sample.  Rounded to 3 significant decimals."""
        size, width, last = self.size, self.width, self.last
        cols: List[List[Optional[float]]] = []
        for j in range(width):
            col = self.values[j::width].tolist()
            k = (end + 1) % size
            col = col[k:] + col[:k]                       # oldest first, ending at *end*
            if last is None or end - last >= size:
                col = [None] * size
            else:
                col = [_shown(v) for v in col]
                if end > last:                            # not sampled since *last*
                    col[size - (end - last):] = [None] * (end - last)
            cols.append(col)
        return cols

    @property
    def nbytes(self) -> int:
        """Bytes its values take (the array's buffer)."""
        return self.values.buffer_info()[1] * self.values.itemsize


class _Summary(_Ring):
    """A ring *factor* times coarser than the rows it is fed: a row holds,
    over the finer rows of its stamp so far, the maximum of the first
    *gauges* fields (depth: the worst of the minute) and the mean of the
    others (rates)."""

    __slots__ = ("factor", "gauges", "_bucket", "_acc", "_n")

    def __init__(self, size: int, width: int, factor: int, gauges: int) -> None:
        super().__init__(size, width)
        self.factor, self.gauges = factor, gauges
        self._bucket: Optional[int] = None
        self._acc = [0.0] * width
        self._n = [0] * width

    def add(self, fine_stamp: int, row: List[float], fill: bool = False) -> None:
        """Take the finer *row* of *fine_stamp* (*fill*: as ``put``)."""
        bucket = fine_stamp // self.factor
        acc, n, gauges = self._acc, self._n, self.gauges
        if bucket != self._bucket:
            if self._bucket is not None and bucket < self._bucket:
                return
            self._bucket = bucket
            acc[:] = row
            n[:] = [0 if v != v else 1 for v in row]
            self.put(bucket, row, fill)
            return
        out = []
        for j, v in enumerate(row):
            if v == v:
                if not n[j]:
                    acc[j] = v
                elif j < gauges:
                    if v > acc[j]:
                        acc[j] = v
                else:
                    acc[j] += v
                n[j] += 1
            out.append(acc[j] if j < gauges or n[j] < 2 else acc[j] / n[j])
        self.put(bucket, out)


def _rings(width: int, gauges: int) -> Dict[str, _Ring]:
    """A row a second for 10 minutes, and a row a minute for 24 hours (its
    first *gauges* fields the minute's maximum, the others its mean)."""
    (_, s_size), (m_step, m_size) = _HISTORY_WINDOWS["10m"], _HISTORY_WINDOWS["24h"]
    return {"10m": _Ring(s_size, width), "24h": _Summary(m_size, width, m_step, gauges)}


class _Track:
    """One series of rows of *width* values (the first *gauges* of them
    gauges, the rest rates) at both windows' resolutions, and, with
    *overview* (the columns it shows), the overview's 60-row summaries.

    The rings are made only once the rows change: until then the series is
    one constant row and the stamp it began (a quiet or static topic, of
    thousands, costs a few bytes and no work), and the rings start filled
    with it.  A rate not known yet (NaN, the first sample) matches any."""

    __slots__ = ("width", "gauges", "show", "rings", "overview", "const", "since", "last")

    def __init__(self, width: int, gauges: int,
                 overview: Optional[Tuple[int, ...]] = None) -> None:
        self.width, self.gauges, self.show = width, gauges, overview
        self.rings: Optional[Dict[str, _Ring]] = None
        self.overview: Optional[Dict[str, _Summary]] = None
        self.const: Optional[List[float]] = None
        self.since = self.last = 0

    def add(self, second: int, row: List[float], fill: bool) -> None:
        if self.rings is None:
            const = self.const
            if const is None:
                self.const, self.since, self.last = row, second, second
                return
            if all(a == b or a != a for a, b in zip(const, row)):
                self.const = [b if a != a else a for a, b in zip(const, row)]
                self.last = second
                return
            self._unfold(second)
        self._put(second, row, fill)

    def _put(self, second: int, row: List[float], fill: bool) -> None:
        self.rings["10m"].put(second, row, fill)              # type: ignore[index]
        self.rings["24h"].add(second, row, fill)              # type: ignore[index, attr-defined]
        if self.overview is not None:
            small = [row[k] for k in self.show]               # type: ignore[union-attr]
            for ring in self.overview.values():
                ring.add(second, small, fill)

    def _unfold(self, second: int) -> None:
        # The rows changed: make the rings, holding the constant row from the
        # stamp it began (as far as each window reaches) up to *second*.
        self.rings = _rings(self.width, self.gauges)
        if self.show is not None:
            self.overview = {name: _Summary(_HISTORY_POINTS, len(self.show),
                                            step * size // _HISTORY_POINTS, 1)
                             for name, (step, size) in _HISTORY_WINDOWS.items()}
        const, first = self.const, max(self.since, second - _HISTORY_WINDOWS["10m"][1])
        self._put(first, const, False)                        # type: ignore[arg-type]
        if self.last > first:
            self._put(self.last, const, True)                 # type: ignore[arg-type]

    def columns(self, window: str, end: int) -> List[List[Optional[float]]]:
        """Each value's column over *window* up to its stamp *end* (as ``_Ring``)."""
        if self.rings is not None:
            return self.rings[window].columns(end)
        step, size = _HISTORY_WINDOWS[window]
        return self._const_columns(step, size, end)

    def overview_columns(self, window: str, end: int) -> List[List[Optional[float]]]:
        """The overview's columns over *window* up to its stamp *end*."""
        if self.overview is not None:
            return self.overview[window].columns(end)
        step, size = _HISTORY_WINDOWS[window]
        const = self._const_columns(step * size // _HISTORY_POINTS, _HISTORY_POINTS, end)
        return [const[k] for k in self.show]                  # type: ignore[union-attr]

    def _const_columns(self, step: int, size: int, end: int) -> List[List[Optional[float]]]:
        first, last = self.since // step, self.last // step
        stamps = range(end - size + 1, end + 1)
        if self.const is None:
            return [[None] * size for _ in range(self.width)]
        return [[_shown(v) if first <= st <= last else None for st in stamps]
                for v in self.const]

    @property
    def nbytes(self) -> int:
        rings = list((self.rings or {}).values()) + list((self.overview or {}).values())
        return sum(r.nbytes for r in rings)


class _Series:
    """One topic's or channel's history: its *fields* each second for 10
    minutes, each minute for 24 hours, 60-row summaries of both windows (the
    overview's small charts), and the e2e percentiles the same way once the
    stats carry them (``_Track``s: nothing but a row until the values change).
    Bounded: see ``nbytes``."""

    __slots__ = ("fields", "main", "quantiles", "e2e", "_counts", "_at")

    def __init__(self, fields: Tuple[str, ...]) -> None:
        self.fields = fields
        gauges = len(fields) - 2                      # then rate_in, rate_out
        self.main = _Track(len(fields), gauges, (0, gauges, gauges + 1))
        self.quantiles: Tuple[float, ...] = ()
        self.e2e: Optional[_Track] = None
        self._counts: Optional[Tuple[int, int]] = None     # (in, out) at the last sample
        self._at = 0.0                                     # ... and when (monotonic)

    def add(self, second: int, now: float, gauges: List[float], count_in: int,
            count_out: int, percentiles: Optional[List[Dict[str, float]]],
            fill: bool = False) -> None:
        """The sample of *second* (at *now*, monotonic): *gauges* as they are,
        the counters of messages in and out made rates (per second since the
        last sample; a counter that went down, emptied or deleted, counts 0).
        *fill*: the seconds since the last sample were skipped on purpose
        and take this sample's values."""
        prev, self._counts = self._counts, (count_in, count_out)
        rate_in = rate_out = _NAN
        if prev is not None and now > self._at:
            span = now - self._at
            rate_in = max(count_in - prev[0], 0) / span     # (a counter reset: emptied)
            rate_out = max(count_out - prev[1], 0) / span
        self._at = now
        self.main.add(second, gauges + [rate_in, rate_out], fill)
        if percentiles:
            quantiles = tuple(float(p["quantile"]) for p in percentiles)
            if quantiles != self.quantiles:       # first seen, or the flag changed
                self.quantiles = quantiles
                self.e2e = _Track(len(quantiles), len(quantiles))     # each minute's worst
            self.e2e.add(second, [p["value"] / 1e6 for p in percentiles], fill)  # ns -> ms

    @property
    def nbytes(self) -> int:
        """Bytes its rings' values take: none while its values stay the same,
        then fixed (more once e2e percentiles change)."""
        return self.main.nbytes + (self.e2e.nbytes if self.e2e is not None else 0)


class _StatsHistory:
    """What the admin page charts, fed ``Broker.stats()`` once a second.

    Per topic: depth, messages in (published) and out (handed to its
    channels) per second; per channel: depth, in flight, deferred, messages
    in and out (finished) per second; and the e2e percentiles when the
    stats carry them (``--e2e-processing-latency-percentile``).  A topic or
    channel gone from the stats is forgotten, so memory is a fixed amount
    per topic and channel (``_Series.nbytes``).  ``_lock`` guards
    ``_series`` and the rings: ``sample`` writes under it, the readers read
    under it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: Dict[Tuple[str, str], _Series] = {}   # (topic, channel or "")
        self._second: Optional[int] = None     # the last sample's stamp (monotonic second)
        self._wall_offset = 0.0                # wall time - monotonic time at that sample
        # Seconds between samples: more than 1 once a sample costs much (the
        # sampler keeps its share of a core small; thousands of topics).
        self.every = 1

    def sample(self, now: float, wall: float, stats: Dict[str, Any]) -> None:
        """Record *stats* (``Broker.stats(include_clients=False)``) as the
        sample of monotonic time *now*; *wall* is the same moment in Unix time."""
        second = int(now)
        with self._lock:
            if self._second is not None and second <= self._second:
                return                             # this second has its sample
            # Seconds skipped because sampling is spaced out take this sample.
            fill = self._second is not None and second - self._second <= self.every
            seen = set()
            series = self._series
            for t in stats.get("topics") or []:
                tname = t["topic_name"]
                out = 0
                for c in t["channels"]:
                    key = (tname, c["channel_name"])
                    seen.add(key)
                    s = series.get(key)
                    if s is None:
                        s = series[key] = _Series(_CHANNEL_FIELDS)
                    finished = (c.get("e2e_latency") or {}).get("count", 0)
                    s.add(second, now, [c["depth"], c["in_flight_count"], c["deferred_count"]],
                          c["message_count"], finished,
                          (c.get("e2e_processing_latency") or {}).get("percentiles"), fill)
                    out = max(out, c["message_count"])
                key = (tname, "")
                seen.add(key)
                s = series.get(key)
                if s is None:
                    s = series[key] = _Series(_TOPIC_FIELDS)
                s.add(second, now, [t["depth"]], t["message_count"], out,
                      (t.get("e2e_processing_latency") or {}).get("percentiles"), fill)
            for key in [k for k in series if k not in seen]:
                del series[key]
            self._second = second
            self._wall_offset = wall - now

    def _end(self, window: str) -> Tuple[int, float, int]:
        # the newest stamp of *window*'s ring, its seconds per stamp, and the
        # Unix time that stamp began
        step = _HISTORY_WINDOWS[window][0]
        second = self._second if self._second is not None else 0
        return second // step, step, (second // step) * step + self._wall_offset

    def has(self, topic: str, channel: Optional[str] = None) -> bool:
        """Whether the topic (or channel) was in the last sample."""
        with self._lock:
            return (topic, channel or "") in self._series

    def series(self, topic: str, channel: Optional[str], window: str) -> Dict[str, Any]:
        """A topic's or channel's history over *window* ("10m": a row a
        second; "24h": a row a minute, gauges their maximum, rates their
        mean), oldest first; None where there was no sample.  Every field
        present even if the topic or channel was never sampled."""
        fields = _CHANNEL_FIELDS if channel else _TOPIC_FIELDS
        with self._lock:
            end, step, end_time = self._end(window)
            s = self._series.get((topic, channel or ""))
            size = _HISTORY_WINDOWS[window][1]
            if s is None:
                cols: List[List[Optional[float]]] = [[None] * size for _ in fields]
                e2e = None
            else:
                cols = s.main.columns(window, end)
                e2e = None
                if s.e2e is not None:
                    e2e = [{"quantile": q, "ms": col} for q, col in
                           zip(s.quantiles, s.e2e.columns(window, end))]
        return {"topic": topic, "channel": channel, "window": window, "step": step,
                "end": round(end_time, 3), "fields": dict(zip(fields, cols)),
                "e2e_percentiles": e2e}

    def overview(self, window: str) -> Dict[str, Any]:
        """Every topic and channel at the overview's resolution: 60 rows over
        *window* (10 s or 24 min each; depth their maximum, rates their
        mean), in /stats' layout."""
        size, step_fine = _HISTORY_WINDOWS[window][1], _HISTORY_WINDOWS[window][0]
        step = step_fine * size // _HISTORY_POINTS
        with self._lock:
            second = self._second if self._second is not None else 0
            end = second // step
            topics: Dict[str, Dict[str, Any]] = {}
            for (tname, cname), s in sorted(self._series.items()):
                cols = dict(zip(_OVERVIEW_FIELDS, s.main.overview_columns(window, end)))
                if not cname:
                    topics[tname] = {"topic_name": tname, "fields": cols, "channels": []}
                else:
                    topics.setdefault(tname, {"topic_name": tname, "fields": None,
                                              "channels": []})
                    topics[tname]["channels"].append({"channel_name": cname, "fields": cols})
            end_time = end * step + self._wall_offset
        return {"window": window, "step": step, "end": round(end_time, 3),
                "topics": list(topics.values())}


# -- the admin page at / : HTML and a little JavaScript, no external assets ----

_ADMIN_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>minq</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
 a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
 header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .4em 1.2em; }
 h1 { font-size: 1.3em; margin: 0; } h1 small { color: #777; font-weight: normal; }
 h2 { font-size: 1.15em; margin: .2em 0 .4em; overflow-wrap: anywhere; }
 h3 { font-size: 1em; margin: 1.2em 0 .4em; }
 #crumbs { flex: 1 1 auto; overflow-wrap: anywhere; }
 #windows button[aria-pressed=true] { font-weight: 600; background: #dde7f7; }
 #status { color: #666; margin: .4em 0 1em; } #status.error { color: #b00; }
 .wrap { overflow-x: auto; }
 table.grid { border-collapse: collapse; table-layout: fixed; }
 #stats { width: 95em; }
 col.name { width: 14em; } col.num { width: 5.2em; } col.chart { width: 8em; }
 col.state { width: 4.8em; } col.actions { width: 13.6em; }
 td { overflow: hidden; white-space: nowrap; font-variant-numeric: tabular-nums; }
 th, td { padding: .3em .6em; border-bottom: 1px solid #ddd; text-align: right; }
 th { background: #f4f4f4; font-weight: 600; vertical-align: bottom; font-size: .9em; }
 td.name, th.name { text-align: left; text-overflow: ellipsis; }
 tr.topic td { background: #fafafa; font-weight: 600; border-top: 2px solid #ccc; }
 tr.channel td.name { padding-left: 2em; }
 td.chart { padding: .15em .4em; }
 svg.spark { display: block; width: 100%; height: 22px; overflow: visible; }
 .paused { color: #b60; font-weight: 600; } button { font-size: .85em; margin-left: .2em; }
 button.danger { color: #a00; } button[data-action=pause], button[data-action=unpause] { min-width: 5.5em; }
 #empty { color: #777; padding: 1em 0; }
 #detail-actions { margin: .2em 0 .8em; } #detail-actions button { margin: 0 .4em 0 0; }
 #numbers { display: flex; flex-wrap: wrap; gap: .2em 1.4em; margin-bottom: .8em; }
 #numbers b { font-variant-numeric: tabular-nums; }
 .charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(26em, 1fr)); gap: 1em; }
 figure.chart { margin: 0; border: 1px solid #ddd; border-radius: 4px; padding: .5em .6em; min-width: 0; }
 figure.chart figcaption { font-weight: 600; }
 figure.chart svg { display: block; width: 100%; height: 190px; }
 .legend { display: flex; flex-wrap: wrap; gap: .1em 1.1em; font-size: .9em;
   font-variant-numeric: tabular-nums; } .legend .when { color: #777; }
 .sw { display: inline-block; width: .75em; height: .75em; border-radius: 2px; margin-right: .3em; }
 svg text { font: 11px system-ui, sans-serif; fill: #666; }
 #clients { width: 100%; table-layout: auto; } #clients td, #clients th { text-align: left; }
 #clients td.n, #clients th.n { text-align: right; }
 .muted { color: #777; }
 @media (max-width: 760px) {
  body { margin: .6em; }
  table.cards, table.cards tbody, table.cards tr { display: block; width: auto !important; }
  table.cards colgroup, table.cards thead { display: none; }
  table.cards tr { border-bottom: 1px solid #ccc; padding: .35em 0; }
  table.cards tr.topic { background: #f4f4f4; border-top: 2px solid #ccc; }
  table.cards td { display: inline-block; border: 0; padding: .1em .9em .1em 0;
    text-align: left; background: none !important; }
  table.cards td::before { content: attr(data-label) " "; color: #777; font-weight: normal;
    font-size: .85em; }
  table.cards td.name { display: block; padding-left: 0 !important; }
  table.cards td.name::before, table.cards td.chart::before { content: none; }
  table.cards td.chart { width: 45%; padding: .3em 5% .3em 0; }
  table.cards td[data-field=actions] { display: block; }
  table.cards td[data-field=actions]::before { content: none; }
  .charts { grid-template-columns: 1fr; }
 }
</style></head>
<body>
<header><h1><a href="#/" style="color:inherit">minq</a> <small id="version"></small></h1>
 <nav id="crumbs"></nav>
 <span id="windows">history: <button data-window="10m" aria-pressed="true">10 min</button><button
   data-window="24h" aria-pressed="false">24 h</button></span></header>
<div id="status">loading&hellip;</div>
<section id="detail" hidden>
 <h2 id="title"></h2>
 <div id="detail-actions"></div>
 <div id="numbers"></div>
 <div class="charts" id="charts"></div>
 <div id="clients-part" hidden>
  <h3>Clients <span class="muted" id="clients-count"></span></h3>
  <div class="wrap"><table id="clients" class="grid cards"><thead><tr>
   <th>client id</th><th>address</th><th>user agent</th><th>TLS</th><th>deflate</th>
   <th>snappy</th><th>auth</th><th class="n">RDY</th><th class="n">in flight</th>
   <th class="n">finished</th><th class="n">requeued</th><th class="n">messages</th>
   <th class="n">connected</th></tr></thead><tbody></tbody></table></div>
  <div id="no-clients" class="muted" hidden>No consumers on this channel.</div>
 </div>
</section>
<section id="list">
 <h3 id="list-title" hidden>Channels</h3>
 <div class="wrap"><table id="stats" class="grid cards"><colgroup><col class="name">
  <col class="num" span="9"><col class="chart" span="2"><col class="state"><col class="actions">
  </colgroup><thead><tr>
  <th class="name">topic / channel</th><th>depth</th><th>on disk</th><th>in flight</th>
  <th>deferred</th><th>requeued</th><th>timed out</th><th>messages</th><th>msg/s</th>
  <th>clients</th><th class="chart-head">depth (10 min)</th><th class="chart-head">in / out per s</th>
  <th>state</th><th>actions</th>
 </tr></thead><tbody></tbody></table></div>
 <div id="empty" hidden>No topics yet. Publish one:
  <code>curl -d hello 'http://HOST/pub?topic=test'</code></div>
</section>
<script>
"use strict";
const REFRESH_MS = 2000;                         // /stats, and a view's own history
const OVERVIEW_MS = {"10m": 10000, "24h": 60000};  // the small charts' history (their step)
const DETAIL_MS = {"10m": 2000, "24h": 30000};
const COLORS = {depth: "#1f6fd1", in_flight: "#e08a00", deferred: "#8a5cc7",
                rate_in: "#1f6fd1", rate_out: "#2a9d4b"};
const E2E_COLORS = ["#c0392b", "#e08a00", "#8a5cc7", "#1f6fd1", "#2a9d4b"];
const LABELS = {depth: "depth", in_flight: "in flight", deferred: "deferred",
                rate_in: "in", rate_out: "out"};
// the overview's columns: [field, label shown on a phone]
const COLUMNS = [["name", ""], ["depth", "depth"], ["backend_depth", "on disk"],
  ["in_flight_count", "in flight"], ["deferred_count", "deferred"], ["requeue_count", "requeued"],
  ["timeout_count", "timed out"], ["message_count", "messages"], ["rate", "msg/s"],
  ["clients", "clients"], ["depth_chart", ""], ["rate_chart", ""], ["state", ""],
  ["actions", ""]];
const SVG = "http://www.w3.org/2000/svg";

let view = {kind: "overview"};   // or {kind: "topic", topic} / {kind: "channel", topic, channel}
let win = "10m";
let last = {};                   // name -> [time, message_count], for the msg/s column
const rows = new Map();          // row key -> {tr, td, paused}
let order = "";                  // the keys of the rows shown, in order
let overview = new Map();        // row key -> {depth, rate_in, rate_out} small-chart history
let overviewAt = 0, overviewFirst = 0;
let detail = null, detailAt = 0; // the view's own history (/history?topic=...)
let timer = null;

const $ = (sel) => document.querySelector(sel);
const keyOf = (topic, channel) => channel === null ? topic : topic + "/" + channel;

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "topic" && parts.length === 2 && parts[1])
    return {kind: "topic", topic: parts[1]};
  if (parts[0] === "channel" && parts.length === 3 && parts[1] && parts[2])
    return {kind: "channel", topic: parts[1], channel: parts[2]};
  return {kind: "overview"};
}

function hrefOf(topic, channel) {
  return channel === null || channel === undefined
    ? "#/topic/" + encodeURIComponent(topic)
    : "#/channel/" + encodeURIComponent(topic) + "/" + encodeURIComponent(channel);
}

function fmt(v) {
  if (v === null || v === undefined) return "-";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + "k";
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(a >= 100 ? 0 : a >= 10 ? 1 : 2);
}

function setText(el, text) {
  text = String(text);
  if (el.textContent !== text) el.textContent = text;
}

// -- the small charts: a path of a series' points, broken where there is no sample --
function pathOf(values, x, y) {
  // (a sample alone between gaps becomes a short dash, so it shows)
  let d = "", pen = false;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null) { pen = false; continue; }
    const alone = !pen && (i + 1 >= values.length || values[i + 1] === null);
    const xi = x(i), step = values.length > 1 ? Math.abs(x(1) - x(0)) / 2 : 1;
    d += (pen ? "L" : "M") + (alone ? xi - step : xi).toFixed(1) + " " + y(v).toFixed(1);
    if (alone) d += "L" + xi.toFixed(1) + " " + y(v).toFixed(1);
    pen = true;
  }
  return d;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function seriesMax(list) {
  let m = 0;
  for (const vs of list) for (const v of vs) if (v !== null && v > m) m = v;
  return m;
}

function spark(svg, fields, list) {
  // One small chart: the series of *fields* (their values in *list*), over the
  // window.  data-ymax/top/bottom let a reader turn the path back into values.
  const W = 100, TOP = 2, BOTTOM = 22;
  const ymax = niceMax(seriesMax(list));
  const n = list.length ? list[0].length : 0;
  const x = (i) => n > 1 ? i * W / (n - 1) : 0;
  const y = (v) => BOTTOM - v / ymax * (BOTTOM - TOP);
  svg.dataset.ymax = ymax;
  svg.dataset.top = TOP;
  svg.dataset.bottom = BOTTOM;
  let html = "";
  fields.forEach((f, k) => {
    if (f === "depth") {                         // a light area under it
      const d = pathOf(list[k], x, y).replace(/M([0-9.]+) ([0-9.]+)/g, "M$1 " + BOTTOM + "L$1 $2")
        .replace(/L([0-9.]+) ([0-9.]+)(?=M|$)/g, "L$1 $2L$1 " + BOTTOM);
      html += '<path d="' + d + '" fill="' + COLORS[f] + '" fill-opacity=".15" stroke="none"/>';
    }
    html += '<path data-series="' + f + '" d="' + pathOf(list[k], x, y) +
      '" fill="none" stroke="' + COLORS[f] + '" stroke-width="1.5" ' +
      'vector-effect="non-scaling-stroke"/>';
  });
  const latest = fields.map((f, k) => {
    const vs = list[k].filter((v) => v !== null);
    return LABELS[f] + " " + fmt(vs.length ? vs[vs.length - 1] : null);
  });
  svg.innerHTML = "<title>" + latest.join(", ") + " (top of the chart: " + fmt(ymax) +
    ")</title>" + html;
}

function newSpark() {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 100 24");
  svg.setAttribute("preserveAspectRatio", "none");
  return svg;
}

// -- the large charts of a topic's or channel's view ----------------------------------
function timeLabel(t) {
  const d = new Date(t * 1000);
  const two = (n) => String(n).padStart(2, "0");
  return two(d.getHours()) + ":" + two(d.getMinutes()) +
    (win === "10m" ? ":" + two(d.getSeconds()) : "");
}

function bigChart(fig, spec) {
  // spec: {name, title, unit, step, end, series: [{key, label, color, values}]}
  const svg = fig.querySelector("svg");
  const W = Math.max(240, Math.round(svg.getBoundingClientRect().width) || 600), H = 190;
  const L = 46, R = 8, TOP = 8, BOTTOM = H - 22;
  const n = spec.series.length ? spec.series[0].values.length : 0;
  const ymax = niceMax(seriesMax(spec.series.map((s) => s.values)));
  const x = (i) => L + (n > 1 ? i * (W - L - R) / (n - 1) : 0);
  const y = (v) => BOTTOM - v / ymax * (BOTTOM - TOP);
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.dataset.ymax = ymax;
  svg.dataset.top = TOP;
  svg.dataset.bottom = BOTTOM;
  let html = "";
  for (let k = 0; k <= 4; k++) {
    const v = ymax * k / 4, yy = y(v).toFixed(1);
    html += '<line x1="' + L + '" x2="' + (W - R) + '" y1="' + yy + '" y2="' + yy +
      '" stroke="' + (k ? "#eee" : "#bbb") + '"/><text x="' + (L - 4) + '" y="' + yy +
      '" dy="4" text-anchor="end">' + fmt(v) + '</text>';
  }
  const ticks = Math.max(1, Math.min(4, Math.floor((W - L) / 110)));
  for (let k = 0; k <= ticks; k++) {
    const i = Math.round(k * (n - 1) / ticks);
    const t = spec.end - (n - 1 - i) * spec.step;
    html += '<text x="' + x(i).toFixed(1) + '" y="' + (H - 6) + '" text-anchor="' +
      (k === 0 ? "start" : k === ticks ? "end" : "middle") + '">' + timeLabel(t) + '</text>';
  }
  for (const s of spec.series)
    html += '<path data-series="' + s.key + '" d="' + pathOf(s.values, x, y) +
      '" fill="none" stroke="' + s.color + '" stroke-width="1.8" stroke-linejoin="round"/>';
  html += '<line class="cursor" y1="' + TOP + '" y2="' + BOTTOM + '" stroke="#999" ' +
    'stroke-dasharray="3 3" visibility="hidden"/>';
  svg.innerHTML = html;
  fig.spec = spec;
  fig.geometry = {x, n, L, W, R};
  legend(fig, null);
}

function legend(fig, index) {
  // the values at *index* (the pointer's), else the latest of each series
  const spec = fig.spec, box = fig.querySelector(".legend");
  const n = fig.geometry.n;
  let html = "";
  if (index !== null) {
    html += '<span class="when">' + timeLabel(spec.end - (n - 1 - index) * spec.step) +
      '</span>';
  }
  for (const s of spec.series) {
    let v = null;
    if (index !== null) v = s.values[index];
    else for (let i = s.values.length - 1; i >= 0 && v === null; i--) v = s.values[i];
    html += '<span data-series="' + s.key + '"><span class="sw" style="background:' +
      s.color + '"></span>' + s.label + ": <b>" + fmt(v) + "</b>" +
      (spec.unit ? " " + spec.unit : "") + "</span>";
  }
  box.innerHTML = html;
}

function pointer(fig, ev) {
  const g = fig.geometry, svg = fig.querySelector("svg"), cur = svg.querySelector(".cursor");
  if (!g || !cur) return;
  const r = svg.getBoundingClientRect();
  const px = (ev.clientX - r.left) * g.W / r.width;
  const i = Math.round((px - g.L) / (g.W - g.L - g.R) * (g.n - 1));
  if (ev.type === "mouseleave" || i < 0 || i >= g.n) {
    cur.setAttribute("visibility", "hidden");
    legend(fig, null);
    return;
  }
  cur.setAttribute("x1", g.x(i));
  cur.setAttribute("x2", g.x(i));
  cur.setAttribute("visibility", "visible");
  legend(fig, i);
}

function figure(name, title) {
  let fig = document.querySelector('figure[data-chart="' + name + '"]');
  if (fig) return fig;
  fig = document.createElement("figure");
  fig.className = "chart";
  fig.dataset.chart = name;
  fig.innerHTML = "<figcaption></figcaption><svg></svg><div class='legend'></div>";
  fig.querySelector("figcaption").textContent = title;
  fig.addEventListener("mousemove", (ev) => pointer(fig, ev));
  fig.addEventListener("mouseleave", (ev) => pointer(fig, ev));
  $("#charts").appendChild(fig);
  return fig;
}

function drawDetail() {
  if (!detail || view.kind === "overview") return;
  const f = detail.fields, isChannel = view.kind === "channel";
  const base = {step: detail.step, end: detail.end};
  const specs = [];
  specs.push(Object.assign({name: "depth", title: isChannel
      ? "queue: depth, in flight, deferred" : "depth (messages at the topic)", unit: "",
    series: (isChannel ? ["depth", "in_flight", "deferred"] : ["depth"]).map((k) => (
      {key: k, label: LABELS[k], color: COLORS[k], values: f[k]}))}, base));
  specs.push(Object.assign({name: "rates", title: isChannel
      ? "messages per second: in, out (finished)" : "messages per second: published, to channels",
    unit: "/s", series: [
      {key: "rate_in", label: isChannel ? "in" : "published", color: COLORS.rate_in,
       values: f.rate_in},
      {key: "rate_out", label: isChannel ? "finished" : "to channels", color: COLORS.rate_out,
       values: f.rate_out}]}, base));
  if (detail.e2e_percentiles) {
    specs.push(Object.assign({name: "e2e", title: "end-to-end latency, publish to FIN",
      unit: "ms", series: detail.e2e_percentiles.map((p, k) => (
        {key: "p" + +(p.quantile * 100).toFixed(2), label: "p" + +(p.quantile * 100).toFixed(2),
         color: E2E_COLORS[k % E2E_COLORS.length], values: p.ms}))}, base));
  }
  const wanted = new Set(specs.map((s) => s.name));
  for (const fig of document.querySelectorAll("#charts figure"))
    if (!wanted.has(fig.dataset.chart)) fig.remove();
  // from the first sample (at least a minute or an hour shown), as the small charts
  const first = firstSample([].concat(...specs.map((s) => s.series.map((x) => x.values))), 60);
  for (const s of specs) for (const x of s.series) x.values = x.values.slice(first);
  const figs = specs.map((s) => figure(s.name, s.title));    // laid out before measured
  specs.forEach((s, k) => bigChart(figs[k], s));
}

// -- the overview's table, updated in place -------------------------------------------
function cell(tr, field, label) {
  const td = document.createElement("td");
  td.dataset.field = field;
  if (label) td.dataset.label = label;
  tr.appendChild(td);
  return td;
}

function makeRow(kind, topic, channel) {
  const tr = document.createElement("tr");
  tr.className = kind;
  tr.dataset.topic = topic;
  if (channel !== null) tr.dataset.channel = channel;
  const r = {tr, kind, topic, channel, td: {}, paused: null};
  for (const [field, label] of COLUMNS) r.td[field] = cell(tr, field, label);
  r.td.name.className = "name";
  const a = document.createElement("a");
  a.href = hrefOf(topic, channel);
  a.textContent = channel === null ? topic : channel;
  a.title = keyOf(topic, channel);
  r.td.name.appendChild(a);
  for (const f of ["depth_chart", "rate_chart"]) {
    r.td[f].className = "chart";
    r.td[f].appendChild(newSpark());
  }
  drawSparks(r);
  return r;
}

function button(box, label, kind, action, topic, channel, danger) {
  const b = document.createElement("button");
  b.textContent = label;
  b.dataset.action = action;
  if (danger) b.className = "danger";
  b.onclick = () => act(kind, action, topic, channel);
  box.appendChild(b);
}

function actions(box, kind, topic, channel, paused) {
  box.replaceChildren();
  if (paused) button(box, "unpause", kind, "unpause", topic, channel);
  else button(box, "pause", kind, "pause", topic, channel);
  button(box, "empty", kind, "empty", topic, channel, true);
  button(box, "delete", kind, "delete", topic, channel, true);
}

function updateRow(r, s, now) {
  const td = r.td, isChannel = r.kind === "channel";
  setText(td.depth, s.depth);
  setText(td.backend_depth, s.backend_depth);
  setText(td.in_flight_count, isChannel ? s.in_flight_count : "");
  setText(td.deferred_count, isChannel ? s.deferred_count : "");
  setText(td.requeue_count, isChannel ? s.requeue_count : "");
  setText(td.timeout_count, isChannel ? s.timeout_count : "");
  setText(td.message_count, s.message_count);
  const name = keyOf(r.topic, r.channel), prev = last[name];
  const rate = prev && now > prev[0] ? (s.message_count - prev[1]) / ((now - prev[0]) / 1000)
                                     : null;
  if (!prev || now > prev[0]) last[name] = [now, s.message_count];
  if (rate !== null || !prev) setText(td.rate, rate === null ? "-" : rate.toFixed(1));
  setText(td.clients, isChannel ? s.client_count
                                : s.channels.reduce((n, c) => n + c.client_count, 0));
  setText(td.state, s.paused ? "paused" : "active");
  td.state.className = s.paused ? "paused" : "";
  if (r.paused !== s.paused) {
    r.paused = s.paused;
    actions(td.actions, r.kind, r.topic, r.channel, s.paused);
  }
}

function drawSparks(r) {
  // from the first sample of any row (a server started a minute ago charts
  // that minute, not 9 blank ones), so every row shares one time axis
  const h = overview.get(keyOf(r.topic, r.channel));
  const blank = new Array(60).fill(null);
  const f = h || {depth: blank, rate_in: blank, rate_out: blank};
  const cut = (vs) => vs.slice(overviewFirst);
  spark(r.td.depth_chart.firstChild, ["depth"], [cut(f.depth)]);
  spark(r.td.rate_chart.firstChild, ["rate_in", "rate_out"], [cut(f.rate_in), cut(f.rate_out)]);
}

function firstSample(lists, keep) {
  // the first index where any of *lists* has a value, at most len - keep
  let first = lists.length ? lists[0].length : 0;
  for (const vs of lists) {
    const i = vs.findIndex((v) => v !== null);
    if (i >= 0 && i < first) first = i;
  }
  return Math.max(0, Math.min(first, (lists.length ? lists[0].length : 0) - keep));
}

function renderList(topics, now) {
  const tbody = $("#stats tbody"), keys = [], seen = new Set();
  const want = (kind, topic, channel, s) => {
    const key = kind + " " + keyOf(topic, channel);
    let r = rows.get(key);
    if (!r) { r = makeRow(kind, topic, channel); rows.set(key, r); }
    updateRow(r, s, now);
    keys.push(key);
    seen.add(key);
  };
  for (const t of topics) {
    want("topic", t.topic_name, null, t);
    for (const c of t.channels) want("channel", t.topic_name, c.channel_name, c);
  }
  for (const [key, r] of rows) if (!seen.has(key)) { r.tr.remove(); rows.delete(key); }
  const joined = keys.join("\n");
  if (joined !== order) {                        // only then move rows: 1,000s stay put
    order = joined;
    tbody.replaceChildren(...keys.map((k) => rows.get(k).tr));
  }
}

// -- a topic's or channel's own view ----------------------------------------------------
function renderDetail(t, c, now) {
  const s = c || t, isChannel = !!c;
  setText($("#title"), isChannel ? "channel " + t.topic_name + " / " + c.channel_name
                                 : "topic " + t.topic_name);
  const box = $("#detail-actions");
  if (box.dataset.paused !== String(s.paused) || box.dataset.name !== keyOf(view.topic,
      view.channel || null)) {
    box.dataset.paused = String(s.paused);
    box.dataset.name = keyOf(view.topic, view.channel || null);
    actions(box, isChannel ? "channel" : "topic", view.topic, isChannel ? view.channel : null,
            s.paused);
  }
  const nums = isChannel
    ? [["depth", s.depth], ["on disk", s.backend_depth], ["in flight", s.in_flight_count],
       ["deferred", s.deferred_count], ["requeued", s.requeue_count],
       ["timed out", s.timeout_count], ["messages", s.message_count],
       ["clients", s.client_count], ["state", s.paused ? "paused" : "active"]]
    : [["depth", s.depth], ["on disk", s.backend_depth], ["messages", s.message_count],
       ["channels", s.channels.length], ["state", s.paused ? "paused" : "active"]];
  $("#numbers").innerHTML = nums.map(([k, v]) =>
    '<span data-field="' + k + '">' + k + " <b>" + v + "</b></span>").join("");
  $("#clients-part").hidden = !isChannel;
  if (isChannel) renderClients(c.clients || [], now);
}

function yesNo(v) { return v ? "yes" : "-"; }

function since(ts, now) {
  let s = Math.max(0, Math.round(now / 1000 - ts));
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60);
  s = s % 60;
  return h ? h + "h" + String(m).padStart(2, "0") + "m" : m ? m + "m" + String(s).padStart(2, "0") + "s" : s + "s";
}

function renderClients(clients, now) {
  const tbody = $("#clients tbody");
  setText($("#clients-count"), "(" + clients.length + ")");
  $("#no-clients").hidden = clients.length > 0;
  tbody.replaceChildren();
  for (const c of clients) {
    const tr = document.createElement("tr");
    tr.dataset.clientId = c.client_id;
    const add = (field, label, value, cls) => {
      const td = cell(tr, field, label);
      if (cls) td.className = cls;
      td.textContent = value;
      td.title = value;
    };
    add("client_id", "", c.client_id, "name");
    add("remote_address", "address", c.remote_address === "inproc" ? "in-process"
                                                                     : c.remote_address);
    add("user_agent", "agent", c.user_agent || "-");
    add("tls", "TLS", c.tls ? (c.tls_version || "yes") : "-");
    add("deflate", "deflate", yesNo(c.deflate));
    add("snappy", "snappy", yesNo(c.snappy));
    add("authed", "auth", c.authed ? (c.auth_identity || "yes") : "-");
    add("ready_count", "RDY", c.ready_count, "n");
    add("in_flight_count", "in flight", c.in_flight_count, "n");
    add("finish_count", "finished", c.finish_count, "n");
    add("requeue_count", "requeued", c.requeue_count, "n");
    add("message_count", "messages", c.message_count, "n");
    add("connected", "connected", since(c.connect_ts, now), "n");
    tbody.appendChild(tr);
  }
}

// -- fetching -------------------------------------------------------------------------------
async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) {
    let code = "HTTP " + r.status;
    try { code += " " + (await r.json()).message; } catch (e) {}
    const err = new Error(code);
    err.status = r.status;
    throw err;
  }
  return r.json();
}

async function loadOverview(now) {
  const h = await getJSON("/history?window=" + win);
  const m = new Map();
  for (const t of h.topics) {
    if (t.fields) m.set(t.topic_name, t.fields);
    for (const c of t.channels) m.set(keyOf(t.topic_name, c.channel_name), c.fields);
  }
  overview = m;
  overviewAt = now;
  const lists = [];
  for (const f of m.values()) lists.push(f.depth, f.rate_in);
  overviewFirst = firstSample(lists, 6);
  for (const r of rows.values()) drawSparks(r);
}

async function loadDetail(now) {
  let url = "/history?window=" + win + "&topic=" + encodeURIComponent(view.topic);
  if (view.kind === "channel") url += "&channel=" + encodeURIComponent(view.channel);
  detail = await getJSON(url);
  detailAt = now;
  drawDetail();
}

async function refresh() {
  const status = $("#status");
  const v = view;
  try {
    let url = "/stats?format=json&include_mem=false";
    if (v.kind !== "overview") url += "&topic=" + encodeURIComponent(v.topic);
    url += v.kind === "channel"
      ? "&channel=" + encodeURIComponent(v.channel) + "&include_clients=true"
      : "&include_clients=false";
    const data = await getJSON(url);
    if (v !== view) return;                      // the view changed meanwhile
    const now = Date.now();
    setText($("#version"), "nsqd " + data.version + " protocol, health: " + data.health);
    const topics = data.topics || [];
    if (v.kind !== "overview") {
      const t = topics[0];
      const c = t && v.kind === "channel" ? t.channels[0] : null;
      if (!t || (v.kind === "channel" && !c)) {
        throw new Error(v.kind + " " + keyOf(v.topic, v.channel || null) + " not found");
      }
      renderDetail(t, c, now);
      if (now - detailAt >= DETAIL_MS[win] - 100) await loadDetail(now);
    }
    if (v.kind !== "channel") {
      renderList(topics, now);
      if (now - overviewAt >= OVERVIEW_MS[win] - 100) await loadOverview(now);
    }
    $("#empty").hidden = v.kind !== "overview" || topics.length > 0;
    status.className = "";
    status.textContent = "updated " + new Date(now).toLocaleTimeString() +
      " \u00b7 refreshes every " + REFRESH_MS / 1000 + " s";
  } catch (e) {
    status.className = "error";
    status.textContent = "cannot read the stats: " + e.message;
  }
}

async function act(kind, action, topic, channel) {
  const name = keyOf(topic, channel);
  if ((action === "empty" || action === "delete") &&
      !confirm(action === "delete"
        ? "Delete " + kind + " " + name + " and every message in it?"
        : "Empty " + kind + " " + name + "? Its queued messages are lost.")) return;
  let url = "/" + kind + "/" + action + "?topic=" + encodeURIComponent(topic);
  if (channel !== null) url += "&channel=" + encodeURIComponent(channel);
  const r = await fetch(url, {method: "POST"});
  if (!r.ok) {
    const status = $("#status");
    status.className = "error";
    status.textContent = action + " " + name + " failed: HTTP " + r.status + " " +
      (await r.text());
    return;
  }
  if (action === "delete" && view.kind !== "overview" &&
      view.topic === topic && (channel === null || view.channel === channel)) {
    location.hash = channel === null ? "#/" : hrefOf(topic, null);   // gone: up a level
    return;
  }
  overviewAt = detailAt = 0;                    // show its effect on the charts at once
  await refresh();
}

function route() {
  view = parseHash();
  detail = null;
  detailAt = 0;
  $("#charts").replaceChildren();
  $("#numbers").replaceChildren();
  $("#detail-actions").replaceChildren();
  delete $("#detail-actions").dataset.paused;
  $("#detail").hidden = view.kind === "overview";
  $("#list").hidden = view.kind === "channel";
  $("#list-title").hidden = view.kind !== "topic";
  const crumbs = $("#crumbs");
  crumbs.replaceChildren();
  if (view.kind !== "overview") {
    const add = (text, href) => {
      if (crumbs.childNodes.length) crumbs.append(" / ");
      const a = document.createElement("a");
      a.textContent = text;
      a.href = href;
      crumbs.appendChild(a);
    };
    add("all topics", "#/");
    add(view.topic, hrefOf(view.topic, null));
    if (view.kind === "channel") add(view.channel, hrefOf(view.topic, view.channel));
  }
  document.title = view.kind === "overview" ? "minq" : "minq: " + keyOf(view.topic,
    view.channel || null);
  for (const r of rows.values()) r.tr.remove();
  rows.clear();
  order = "";
  start();
}

function start() {
  // a second look soon after the first, so rates show at once
  if (timer !== null) clearInterval(timer);
  refresh().then(() => setTimeout(refresh, 500));
  timer = setInterval(refresh, REFRESH_MS);
}

for (const b of document.querySelectorAll("#windows button")) {
  b.onclick = () => {
    win = b.dataset.window;
    for (const o of document.querySelectorAll("#windows button"))
      o.setAttribute("aria-pressed", String(o === b));
    for (const th of document.querySelectorAll("th.chart-head"))
      th.textContent = th.textContent.replace(/10 min|24 h/, win === "10m" ? "10 min" : "24 h");
    overviewAt = detailAt = 0;
    refresh();
  };
}
let resizing = null;
window.addEventListener("resize", () => {
  clearTimeout(resizing);
  resizing = setTimeout(drawDetail, 150);
});
window.addEventListener("hashchange", route);
document.querySelector("#empty code").textContent =
  "curl -d hello 'http://" + location.host + "/pub?topic=test'";
route();
</script>
</body></html>
"""


# -- /metrics: Prometheus text exposition (format 0.0.4) -----------------------

# (metric, type, help, stats key): one sample per topic, then per channel.
_TOPIC_METRICS = (
    ("minq_topic_depth", "gauge", "Messages queued at the topic (memory + disk).", "depth"),
    ("minq_topic_backend_depth", "gauge", "Messages of the topic's queue on disk.",
     "backend_depth"),
    ("minq_topic_messages_total", "counter", "Messages published to the topic.",
     "message_count"),
    ("minq_topic_message_bytes_total", "counter", "Bytes published to the topic.",
     "message_bytes"),
    ("minq_topic_dropped_total", "counter",
     "Messages an ephemeral topic dropped beyond its memory queue.", "drop_count"),
    ("minq_topic_paused", "gauge", "1 when the topic is paused.", "paused"),
)
_CHANNEL_METRICS = (
    ("minq_channel_depth", "gauge", "Messages queued in the channel (memory + disk).", "depth"),
    ("minq_channel_backend_depth", "gauge", "Messages of the channel's queue on disk.",
     "backend_depth"),
    ("minq_channel_in_flight", "gauge", "Messages delivered and not yet finished.",
     "in_flight_count"),
    ("minq_channel_deferred", "gauge", "Messages waiting for their deferral or requeue delay.",
     "deferred_count"),
    ("minq_channel_clients", "gauge", "Consumers connected to the channel.", "client_count"),
    ("minq_channel_paused", "gauge", "1 when the channel is paused.", "paused"),
    ("minq_channel_messages_total", "counter", "Messages the channel received.",
     "message_count"),
    ("minq_channel_requeued_total", "counter", "Messages requeued by consumers.",
     "requeue_count"),
    ("minq_channel_timed_out_total", "counter", "Messages whose in-flight deadline passed.",
     "timeout_count"),
    ("minq_channel_dead_letters_total", "counter",
     "Messages moved to the dead-letter topic after max_attempts.", "dead_count"),
    ("minq_channel_dropped_total", "counter",
     "Messages an ephemeral channel dropped beyond its memory queue.", "drop_count"),
    ("minq_channel_corrupt_total", "counter", "Records lost to corruption in the channel's log.",
     "corrupt_count"),
)
_STORAGE_METRICS = (
    ("minq_storage_bytes_written_total", "counter", "Bytes written to segment logs.",
     "bytes_written"),
    ("minq_storage_fsyncs_total", "counter", "fsync calls on segment logs.", "fsync_count"),
    ("minq_storage_corrupt_records_total", "counter",
     "Damaged records skipped when reading segment logs.", "corrupt_count"),
    ("minq_storage_logs", "gauge", "Open segment logs.", "logs"),
)


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def prometheus_metrics(stats: Dict[str, Any]) -> str:
    """``Broker.stats()`` as Prometheus text: gauges, counters, latency histograms."""
    out: List[str] = []

    def family(name: str, kind: str, text: str, samples: Iterable[Tuple[str, Any]]) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        for suffix_labels, value in samples:
            out.append(f"{name}{suffix_labels} {value!r}" if isinstance(value, float)
                       else f"{name}{suffix_labels} {int(value)}")

    topics = stats.get("topics") or []
    family("minq_up", "gauge", "1 while the broker is healthy (storage writes succeed).",
           [("", 1 if stats.get("health") == "OK" else 0)])
    family("minq_start_time_seconds", "gauge", "When the broker started (Unix time).",
           [("", stats["start_time"])])
    family("minq_producers", "gauge", "TCP clients that have published.",
           [("", len(stats.get("producers") or []))])
    for name, kind, text, key in _TOPIC_METRICS:
        family(name, kind, text, [(_labels(topic=t["topic_name"]), t[key]) for t in topics])
    channels = [(t["topic_name"], c) for t in topics for c in t["channels"]]
    for name, kind, text, key in _CHANNEL_METRICS:
        family(name, kind, text, [(_labels(topic=t, channel=c["channel_name"]), c[key])
                                  for t, c in channels])
    name = "minq_channel_e2e_latency_seconds"
    out.append(f"# HELP {name} Time from publish to FIN.")
    out.append(f"# TYPE {name} histogram")
    for t, c in channels:
        e2e = c["e2e_latency"]
        total = 0
        for bound, count in e2e["buckets"].items():
            total += count
            out.append(f"{name}_bucket{_labels(topic=t, channel=c['channel_name'], le=f'{bound:g}')}"
                       f" {total}")
        out.append(f"{name}_bucket{_labels(topic=t, channel=c['channel_name'], le='+Inf')}"
                   f" {e2e['count']}")
        lbl = _labels(topic=t, channel=c["channel_name"])
        out.append(f"{name}_sum{lbl} {e2e['sum']!r}")     # repr: every digit kept
        out.append(f"{name}_count{lbl} {e2e['count']}")
    for name, who, labels in (
            ("minq_topic_e2e_processing_latency_seconds", "its channels'",
             [(t, {"topic": t["topic_name"]}) for t in topics]),
            ("minq_channel_e2e_processing_latency_seconds", "the channel's",
             [(c, {"topic": t, "channel": c["channel_name"]}) for t, c in channels])):
        tracked = [(x, lbl) for x, lbl in labels
                   if x["e2e_processing_latency"]["percentiles"] is not None]
        if not tracked:
            continue
        out.append(f"# HELP {name} Publish-to-FIN time percentiles of {who} finishes "
                   f"in the last --e2e-processing-latency-window-time (nsqd's).")
        out.append(f"# TYPE {name} summary")
        for x, lbl in tracked:
            e2e = x["e2e_processing_latency"]
            for item in e2e["percentiles"]:
                q = f"{item['quantile']:g}"
                out.append(f"{name}{_labels(**lbl, quantile=q)} {item['value'] / 1e9!r}")
            out.append(f"{name}_count{_labels(**lbl)} {e2e['count']}")
    storage = stats.get("storage")
    if storage:
        for name, kind, text, key in _STORAGE_METRICS:
            family(name, kind, text, [("", storage[key])])
    return "\n".join(out) + "\n"


def _memory_stats() -> Dict[str, int]:
    # Go runtime figures in nsqd; here the closest Python ones.
    import gc
    counts = gc.get_stats()
    return {"heap_objects": len(gc.get_objects()), "heap_idle_bytes": 0,
            "heap_in_use_bytes": _rss_bytes(), "heap_released_bytes": 0,
            "gc_pause_usec_100": 0, "gc_pause_usec_99": 0, "gc_pause_usec_95": 0,
            "next_gc_bytes": 0, "gc_total_runs": sum(g["collections"] for g in counts)}


def statsd_prefix(prefix: str, host: str, http_port: int) -> str:
    """nsqd's expansion of ``--statsd-prefix``: ``%s`` becomes this node's
    broadcast address and HTTP port with dots and colons as underscores,
    and a dot ends the prefix."""
    if not prefix:
        return ""
    node = f"[{host}]:{http_port}" if ":" in host else f"{host}:{http_port}"
    prefix = prefix.replace("%s", node.replace(".", "_").replace(":", "_"))
    return prefix if prefix.endswith(".") else prefix + "."


class StatsdPusher:
    """nsqd's statsd reporting (``--statsd-address``): every *interval*
    seconds, the broker's topics and channels (and memory, *mem_stats*)
    under nsqd's names and types, over UDP to *address*, in packets of at
    most *packet_size* bytes holding whole lines.  Counters (``|c``) carry
    the change since the last push, gauges (``|g``) the value now; e2e
    percentiles are gauges in ns named ``e2e_processing_latency_<99>``.
    ``start()`` runs a thread pushing until ``close()``; ``push()`` pushes
    once.  A statsd that cannot be reached costs a log line per push."""

    def __init__(self, broker: "Broker", address: str, prefix: str = "", *,
                 interval: float = DEFAULT_STATSD_INTERVAL, mem_stats: bool = True,
                 packet_size: int = DEFAULT_STATSD_PACKET_SIZE,
                 exclude_ephemeral: bool = False) -> None:
        _check_range("statsd interval", interval, 0.001, None)
        _check_range("statsd packet size", packet_size, 64, 65507)
        self.broker = broker
        self.address = _split_address(address, 8125)
        self.prefix = prefix
        self.interval = interval
        self.mem_stats = mem_stats
        self.packet_size = packet_size
        self.exclude_ephemeral = exclude_ephemeral
        self._last: Dict[str, int] = {}      # counters' values at the last push
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "StatsdPusher":
        self._thread = threading.Thread(target=self._loop, name="minq-statsd")
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.push()
            except Exception:                     # never let reporting die
                log.exception("STATSD: push failed")

    def lines(self) -> List[str]:
        """What one push sends, a line per metric (counters as changes)."""
        last, now = self._last, {}
        out: List[str] = []
        p = self.prefix

        def incr(stat: str, value: int) -> None:
            now[stat] = value
            out.append(f"{p}{stat}:{value - last.get(stat, 0)}|c")

        def gauge(stat: str, value: float) -> None:
            out.append(f"{p}{stat}:{int(value)}|g")

        def e2e(stat: str, result: Dict[str, Any]) -> None:
            for item in result.get("percentiles") or ():
                gauge(f"{stat}.e2e_processing_latency_{item['quantile'] * 100:.0f}",
                      item["value"])
        skip = self.exclude_ephemeral
        for t in self.broker.stats(include_clients=False)["topics"] or ():
            if skip and t["topic_name"].endswith("#ephemeral"):
                continue
            ts = f"topic.{t['topic_name']}"
            incr(f"{ts}.message_count", t["message_count"])
            incr(f"{ts}.message_bytes", t["message_bytes"])
            gauge(f"{ts}.depth", t["depth"])
            gauge(f"{ts}.backend_depth", t["backend_depth"])
            e2e(ts, t["e2e_processing_latency"])
            for c in t["channels"]:
                if skip and c["channel_name"].endswith("#ephemeral"):
                    continue
                cs = f"{ts}.channel.{c['channel_name']}"
                incr(f"{cs}.message_count", c["message_count"])
                gauge(f"{cs}.depth", c["depth"])
                gauge(f"{cs}.backend_depth", c["backend_depth"])
                gauge(f"{cs}.in_flight_count", c["in_flight_count"])
                gauge(f"{cs}.deferred_count", c["deferred_count"])
                incr(f"{cs}.requeue_count", c["requeue_count"])
                incr(f"{cs}.timeout_count", c["timeout_count"])
                gauge(f"{cs}.clients", c["client_count"])
                e2e(cs, c["e2e_processing_latency"])
        if self.mem_stats:
            ms = _memory_stats()
            for key in ("heap_objects", "heap_idle_bytes", "heap_in_use_bytes",
                        "heap_released_bytes", "gc_pause_usec_100", "gc_pause_usec_99",
                        "gc_pause_usec_95", "next_gc_bytes"):
                gauge(f"mem.{key}", ms[key])
            incr("mem.gc_runs", ms["gc_total_runs"])
        self._last = now
        return out

    def packets(self, lines: List[str]) -> List[bytes]:
        """*lines* (each ended by a newline) in packets of whole lines, each
        within the packet size unless one line alone is longer."""
        out: List[bytes] = []
        buf = b""
        for line in lines:
            data = line.encode() + b"\n"
            if buf and len(buf) + len(data) > self.packet_size:
                out.append(buf)
                buf = b""
            buf += data
        if buf:
            out.append(buf)
        return out

    def push(self) -> int:
        """Send the stats once; returns how many packets went out."""
        host, port = self.address
        packets = self.packets(self.lines())
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, 0,
                                                              socket.SOCK_DGRAM)[0]
            with socket.socket(family, kind, proto) as sock:
                for packet in packets:
                    sock.sendto(packet, addr)
        except OSError as e:
            log.error("STATSD: failed to push stats to %s:%d: %s", host, port, e)
            return 0
        log.debug("STATSD: pushed %d packet(s) to %s:%d", len(packets), host, port)
        return len(packets)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HTTPServer(_Face):
    """nsqd's HTTP API for a Broker (``start()`` / ``close()`` like TCPServer),
    served by an event loop: no thread per connection.

    *tcp_address* is what ``/info`` reports as the TCP port clients use.
    With *tls_context* it serves HTTPS (nsqd's ``--https-address``).  No
    connection can hold the server for long: the request line and headers
    must arrive within ``http_header_timeout``, a body within
    ``http_read_timeout``, and a keep-alive connection idle for
    ``http_idle_timeout`` is closed (each an *options* key, seconds).
    Requests that may block (publishes in fsync mode or to a new topic,
    admin actions that write ``minq.dat`` or ask lookupd) are answered on
    worker threads while the loop serves everyone else.  *loop*: an event
    loop to share (``serve`` runs the TCP face on the same one).  It samples
    the broker's stats once a second into *history* (a ``_StatsHistory`` it
    makes unless given one to share), which ``/history`` and the admin
    page's charts read.
    """

    _name = "http"
    request_queue_size = _LISTEN_BACKLOG

    # (path) -> (allowed methods, handler name), as nsqd's router has them
    _ROUTES: Dict[str, Tuple[Tuple[str, ...], str]] = {
        "/ping": (("GET",), "ping"), "/info": (("GET",), "info"),
        "/pub": (("POST",), "pub"), "/mpub": (("POST",), "mpub"),
        "/stats": (("GET",), "stats"),
        "/topic/create": (("POST",), "topic_create"), "/topic/delete": (("POST",), "topic_delete"),
        "/topic/empty": (("POST",), "topic_empty"), "/topic/pause": (("POST",), "topic_pause"),
        "/topic/unpause": (("POST",), "topic_unpause"),
        "/channel/create": (("POST",), "channel_create"),
        "/channel/delete": (("POST",), "channel_delete"),
        "/channel/empty": (("POST",), "channel_empty"),
        "/channel/pause": (("POST",), "channel_pause"),
        "/channel/unpause": (("POST",), "channel_unpause"),
        # nsqlookupd's read endpoints, with this server as the only producer
        "/lookup": (("GET",), "lookup"), "/topics": (("GET",), "topics"),
        "/channels": (("GET",), "channels"), "/nodes": (("GET",), "nodes"),
        "/metrics": (("GET",), "metrics"),
        "/": (("GET", "HEAD"), "admin_page"),
        "/history": (("GET",), "history"),             # minq's: the admin page's charts
    }
    _CONFIG_ROUTE = (("GET",), "config")
    # the body each route reads: (limit option, error code when over it)
    _BODY_LIMITS = {"pub": ("max_msg_size", "MSG_TOO_BIG"),
                    "mpub": ("max_body_size", "BODY_TOO_BIG")}
    _OTHER_BODY_LIMIT = 64 * 1024      # read and ignored by the other endpoints
    # answered on a worker: they write minq.dat, delete files or ask lookupd;
    # /history waits for the history's lock and encodes up to ~1 MB of JSON
    _BLOCKING = frozenset({"topic_create", "topic_delete", "topic_empty", "topic_pause",
                           "topic_unpause", "channel_create", "channel_delete",
                           "channel_empty", "channel_pause", "channel_unpause", "history"})

    def __init__(self, broker: Broker, address: Any = DEFAULT_HTTP_ADDRESS, *,
                 tcp_address: Optional[str] = None,
                 options: Optional[Dict[str, Any]] = None,
                 tls_context: Optional[ssl.SSLContext] = None,
                 body_budget: Optional[MemoryBudget] = None,
                 loop: Optional[_EventLoop] = None, workers: int = 16,
                 history: Optional[_StatsHistory] = None) -> None:
        self.broker = broker
        #: what /history serves; sampled by this server unless it was given one
        self.history = history if history is not None else _StatsHistory()
        self._samples = history is None
        self._deadline_at = math.inf     # when the next sample is due (broker's clock)
        # _sample_lock guards _sampling (a worker is taking samples) and
        # _sample_due (the latest moment to sample, for it to take next)
        self._sample_lock = threading.Lock()
        self._sampling = False
        self._sample_due: Optional[Tuple[float, float]] = None
        self.tcp_address = tcp_address
        self.options = opts = dict(options or {})
        self.tls_context = tls_context
        #: nsqd's --tls-required=true: plain HTTP answers 403 TLS_REQUIRED
        self.tls_required = tls_context is None and opts.get("tls_required") is True
        self.header_timeout = float(opts.get("http_header_timeout", DEFAULT_HTTP_HEADER_TIMEOUT))
        self.read_timeout = float(opts.get("http_read_timeout", DEFAULT_HTTP_READ_TIMEOUT))
        self.idle_timeout = float(opts.get("http_idle_timeout", DEFAULT_HTTP_IDLE_TIMEOUT))
        self.body_budget = body_budget or MemoryBudget(
            DEFAULT_BODY_MEMORY_FACTOR * broker.max_body_size)
        self.closing = False
        self._topics_seen: Dict[str, str] = {}     # valid topic names published to
        super().__init__(address, HTTP_PORT, "HTTPS" if tls_context else "HTTP", broker.clock,
                         loop, workers)
        self.batch = _PublishBatch(broker, self.loop)
        listen = _split_address(tcp_address, TCP_PORT)[0] if tcp_address else self.server_address[0]
        #: what /info and the lookupd endpoints tell clients to connect to
        self.broadcast_address: str = (self.options.get("broadcast_address")
                                       or broadcast_address(listen))
        self.tcp_port = (self.options.get("broadcast_tcp_port")
                         or (_split_address(tcp_address, TCP_PORT)[1] if tcp_address else -1))
        self.http_port = self.options.get("broadcast_http_port") or self.server_address[1]

    def producer(self) -> Dict[str, Any]:
        """This server as nsqlookupd describes a producer (``/lookup``, ``/nodes``)."""
        return {"remote_address": f"{self.broadcast_address}:{self.tcp_port}",
                "hostname": socket.gethostname(), "broadcast_address": self.broadcast_address,
                "tcp_port": self.tcp_port, "http_port": self.http_port, "version": NSQ_VERSION,
                "topology_zone": "", "topology_region": ""}

    def _protocol(self, conn: _ServerConnection) -> _HTTPProtocol:
        return _HTTPProtocol(self, conn)

    # -- the history's samples: a deadline on the loop, the work on a worker -----
    def start(self) -> "HTTPServer":
        """Serve connections from the loop's thread; sample the history once
        a second (on the broker's clock) if this server owns it."""
        super().start()
        if self._samples:
            self.loop.call(self._sample_soon)
        return self

    def _sample_soon(self, _: Any = None) -> None:
        self.loop.arm_deadline(self, self.broker.clock.monotonic())

    def _on_deadline(self, now: float) -> None:
        if self.closing:
            return
        self.loop.arm_deadline(self, math.floor(now) + self.history.every)
        with self._sample_lock:
            self._sample_due = (now, self.broker.clock.time_ns() / 1e9)
            if self._sampling:           # the worker takes it when done with the last
                return
            self._sampling = True
        try:
            self._workers.submit(self._sample)
        except RuntimeError:             # the pool is shut down: the server is closing
            with self._sample_lock:
                self._sampling = False

    def _sample(self) -> None:
        # On a worker, until no sample is due: at most one worker samples, and
        # seconds that came while it did become one sample, at the latest.
        while True:
            with self._sample_lock:
                due, self._sample_due = self._sample_due, None
                if due is None:
                    self._sampling = False
                    return
            started = time.perf_counter()
            try:
                self.history.sample(due[0], due[1], self.broker.stats(include_clients=False))
            except Exception:
                log.exception("http: sampling the stats for /history failed")
            # At most _SAMPLE_SHARE of a core: with thousands of topics a
            # sample takes a while, and then comes every few seconds.
            took = time.perf_counter() - started
            self.history.every = max(1, math.ceil(took / _SAMPLE_SHARE))

    # -- life cycle ------------------------------------------------------------------
    def close(self, grace: float = 0.0, hurry: Optional[threading.Event] = None) -> None:
        """Stop accepting; close idle and half-read connections at once; give
        requests being handled up to *grace* seconds (less if *hurry* is
        set meanwhile), then close them too; join every thread."""
        with self._conns_lock:
            if self.closing and not self._started and self._listener.fileno() < 0:
                return
        self.closing = True
        self.stop_accepting()
        self.loop.call(self._begin_close)
        deadline = time.monotonic() + grace

        def busy() -> List[_ServerConnection]:       # (not those only lingering)
            return [c for c in self.connections() if not c.closing or c.unsent]
        while busy() and time.monotonic() < deadline and not (
                hurry is not None and hurry.is_set()):
            time.sleep(0.01)
        for conn in busy():
            log.warning("http: a request from %s outlived the shutdown grace; cut",
                        conn.remote_ip)
        self.loop.call(self._close_connections)
        self._finish_close()

    server_close = close

    def _begin_close(self, _: Any = None) -> None:
        for conn in self.connections():
            conn.proto.server_closing()

    # -- what the HTTP protocol asks -------------------------------------------------------
    def head(self, req: _HTTPRequest) -> Tuple[Any, ...]:
        """Before the body is read: (its limit, the code when over it), or a
        response at once."""
        if self.tls_required:
            return _json_reply(_HTTPError(403, "TLS_REQUIRED"),
                               https_port=self.options.get("https_port", 0))
        route = req.route = self._ROUTES.get(req.path)
        if route is None and req.path.startswith("/config/"):
            route = req.route = self._CONFIG_ROUTE
        limits = self._BODY_LIMITS.get(route[1]) if route is not None else None
        if limits is None:
            return self._OTHER_BODY_LIMIT, "BODY_TOO_BIG"
        return getattr(self.broker, limits[0]), limits[1]

    def blocking(self, req: _HTTPRequest) -> bool:
        """Whether answering may block (then it runs on a worker)."""
        route = req.route
        if route is None or req.method not in route[0]:
            return False
        name = route[1]
        if name == "pub" or name == "mpub":
            topic = req.arg("topic")
            return self.broker.fsync or topic is None or not self.broker.has_topic(topic)
        return name in self._BLOCKING

    def respond(self, req: _HTTPRequest) -> Optional[Tuple[int, bytes, str, bool]]:
        """Answer *req*: (status, body, content type, whether nsqd's V1 header
        goes with it), or None: ``req.waiter.published`` answers it later."""
        route = req.route
        try:
            if route is None:
                raise _HTTPError(404, "NOT_FOUND")
            if req.method not in route[0]:
                raise _HTTPError(405, "METHOD_NOT_ALLOWED")
            result = getattr(self, "_ep_" + route[1])(req)
            if result is _LATER:
                return None
        except _HTTPError as e:
            log.info("http %s %s: %d %s", req.method, req.target.decode("latin-1"), e.status,
                     e.code)
            return _json_reply(e)
        except Exception as e:
            log.error("http %s %s failed: %s: %s", req.method, req.target.decode("latin-1"),
                      type(e).__name__, e)
            return 500, b'{"message":"INTERNAL_ERROR"}', _JSON_TYPE, True
        if result is None:
            return 200, b"", _TEXT_TYPE, True
        if isinstance(result, tuple):                 # (body, content type)
            return 200, result[0], result[1], False
        if isinstance(result, bytes):
            return 200, result, _TEXT_TYPE, True
        return 200, json.dumps(result).encode(), _JSON_TYPE, True

    def published(self, error: Optional[MinqError]) -> Tuple[int, bytes, str, bool]:
        """The response to a /pub whose message went into the publish batch."""
        if error is None:
            return _PUB_OK
        return _json_reply(_publish_refused(error))

    # -- parameters ----------------------------------------------------------------
    @staticmethod
    def _required(req: _HTTPRequest, name: str, missing: str) -> str:
        value = req.arg(name)
        if value is None:
            raise _HTTPError(400, missing)
        return value

    def _topic_arg(self, req: _HTTPRequest, missing: str = "MISSING_ARG_TOPIC",
                   invalid: str = "INVALID_TOPIC") -> str:
        name = self._required(req, "topic", missing)
        if name in self._topics_seen:
            return name
        try:
            validate_name(name)
        except InvalidName:
            raise _HTTPError(400, invalid) from None
        if len(self._topics_seen) < 1024:
            self._topics_seen[name] = name
        return name

    def _channel_arg(self, req: _HTTPRequest) -> Tuple[str, str]:
        topic = self._topic_arg(req, invalid="INVALID_ARG_TOPIC")
        name = self._required(req, "channel", "MISSING_ARG_CHANNEL")
        try:
            return topic, validate_name(name, "channel")
        except InvalidName:
            raise _HTTPError(400, "INVALID_ARG_CHANNEL") from None

    # -- endpoints ---------------------------------------------------------------
    def _ep_ping(self, req: _HTTPRequest) -> Any:
        health = self.broker.health
        if health != "OK":
            raise _HTTPError(500, health)
        return b"OK"

    def _ep_info(self, req: _HTTPRequest) -> Any:
        b, opts = self.broker, self.options
        return {"version": NSQ_VERSION, "broadcast_address": self.broadcast_address,
                "hostname": socket.gethostname(), "http_port": self.http_port,
                "tcp_port": self.tcp_port, "start_time": b.start_time,
                "max_heartbeat_interval": int(opts.get(
                    "max_heartbeat_interval", DEFAULT_MAX_HEARTBEAT_INTERVAL) * 1e9),
                "max_output_buffer_size": opts.get(
                    "max_output_buffer_size", DEFAULT_MAX_OUTPUT_BUFFER_SIZE),
                "max_output_buffer_timeout": int(opts.get(
                    "max_output_buffer_timeout", DEFAULT_MAX_OUTPUT_BUFFER_TIMEOUT) * 1e9),
                "max_deflate_level": opts.get("max_deflate_level", DEFAULT_MAX_DEFLATE_LEVEL),
                "topology_zone": "", "topology_region": ""}

    def _ep_pub(self, req: _HTTPRequest) -> Any:
        b = self.broker
        topic = self._topic_arg(req)
        defer = 0.0
        raw = req.arg("defer")
        if raw is not None:
            if not _DIGITS.fullmatch(raw.encode()) or int(raw) > b.max_req_timeout * 1000:
                raise _HTTPError(400, "INVALID_DEFER")
            defer = int(raw) / 1000
        if not req.body:
            raise _HTTPError(400, "MSG_EMPTY")
        if req.waiter is not None and not defer and len(req.body) <= b.max_msg_size:
            self.batch.add(topic, req.body, req.waiter)    # answered at the end of the pass
            return _LATER
        try:
            b.publish(topic, req.body, defer)
        except MinqError as e:
            raise _publish_refused(e) from None
        return b"OK"

    def _ep_mpub(self, req: _HTTPRequest) -> Any:
        b = self.broker
        body = req.body
        topic = self._topic_arg(req)
        binary = req.arg("binary")
        try:
            if binary is not None and binary not in ("false", "0"):
                bodies = _split_mpub(body, b.max_msg_size, b.max_body_size)
            else:
                bodies = _split_lines(body, b.max_msg_size)
        except _BadMPUB as e:
            raise _HTTPError(413, e.code) from None
        except InvalidMessage:
            raise _HTTPError(413, "MSG_TOO_BIG") from None
        if bodies:
            try:
                b.publish_bodies(topic, bodies)
            except MinqError as e:
                raise _publish_refused(e, "BODY_TOO_BIG") from None
        return b"OK"

    def _ep_stats(self, req: _HTTPRequest) -> Any:
        topic, channel = req.arg("topic"), req.arg("channel")
        include_clients = _http_bool(req.arg("include_clients"), True)
        include_mem = _http_bool(req.arg("include_mem"), True)
        stats = nsqd_stats(self.broker.stats(topic, channel, include_clients), include_mem)
        if req.arg("format") == "json":
            return stats
        return _stats_text(stats).encode()

    def _ep_admin_page(self, req: _HTTPRequest) -> Any:
        return _ADMIN_PAGE.encode(), "text/html; charset=utf-8"

    def _ep_history(self, req: _HTTPRequest) -> Any:
        """minq's: the admin page's charts.  With ``topic`` (and ``channel``):
        its history over ``window`` (``10m`` or ``24h``); without: every
        topic and channel, 60 points over the window."""
        window = req.arg("window") or "10m"
        if window not in _HISTORY_WINDOWS:
            raise _HTTPError(400, "INVALID_WINDOW")
        if req.arg("topic") is None:
            if req.arg("channel") is not None:
                raise _HTTPError(400, "MISSING_ARG_TOPIC")
            return self.history.overview(window)
        if req.arg("channel") is None:
            t = self._existing_topic(req)
            return self.history.series(t.name, None, window)
        c = self._existing_channel(req)
        return self.history.series(c.topic.name, c.name, window)

    def _ep_metrics(self, req: _HTTPRequest) -> Any:
        text = prometheus_metrics(self.broker.stats(include_clients=False))
        return text.encode(), "text/plain; version=0.0.4; charset=utf-8"

    # -- nsqlookupd's read endpoints (which, like lookupd, do not validate names) ----
    def _ep_lookup(self, req: _HTTPRequest) -> Any:
        t = self.broker.topics.get(self._required(req, "topic", "MISSING_ARG_TOPIC"))
        if t is None:
            raise _HTTPError(404, "TOPIC_NOT_FOUND")
        return {"channels": sorted(t.channels), "producers": [self.producer()]}

    def _ep_topics(self, req: _HTTPRequest) -> Any:
        return {"topics": sorted(self.broker.topics)}

    def _ep_channels(self, req: _HTTPRequest) -> Any:
        t = self.broker.topics.get(self._required(req, "topic", "MISSING_ARG_TOPIC"))
        return {"channels": sorted(t.channels) if t is not None else []}

    def _ep_nodes(self, req: _HTTPRequest) -> Any:
        topics = sorted(self.broker.topics)
        return {"producers": [dict(self.producer(), tombstones=[False] * len(topics),
                                   topics=topics)]}

    def _existing_topic(self, req: _HTTPRequest) -> Topic:
        try:
            return self.broker.get_topic(self._topic_arg(req))
        except TopicNotFound:
            raise _HTTPError(404, "TOPIC_NOT_FOUND") from None

    def _existing_channel(self, req: _HTTPRequest) -> Channel:
        topic, channel = self._channel_arg(req)
        try:
            t = self.broker.get_topic(topic)
        except TopicNotFound:
            raise _HTTPError(404, "TOPIC_NOT_FOUND") from None
        try:
            return t.get_channel(channel)
        except ChannelNotFound:
            raise _HTTPError(404, "CHANNEL_NOT_FOUND") from None

    def _ep_topic_create(self, req: _HTTPRequest) -> Any:
        self.broker.topic(self._topic_arg(req))

    def _ep_topic_delete(self, req: _HTTPRequest) -> Any:
        t = self._existing_topic(req)
        self.broker.delete_topic(t.name)

    def _ep_topic_empty(self, req: _HTTPRequest) -> Any:
        self._existing_topic(req).empty()

    def _ep_topic_pause(self, req: _HTTPRequest) -> Any:
        self._existing_topic(req).pause()

    def _ep_topic_unpause(self, req: _HTTPRequest) -> Any:
        self._existing_topic(req).unpause()

    def _ep_channel_create(self, req: _HTTPRequest) -> Any:
        topic, channel = self._channel_arg(req)
        try:
            self.broker.get_topic(topic).channel(channel)
        except TopicNotFound:
            raise _HTTPError(404, "TOPIC_NOT_FOUND") from None

    def _ep_channel_delete(self, req: _HTTPRequest) -> Any:
        c = self._existing_channel(req)
        c.topic.delete_channel(c.name)

    def _ep_channel_empty(self, req: _HTTPRequest) -> Any:
        self._existing_channel(req).empty()

    def _ep_channel_pause(self, req: _HTTPRequest) -> Any:
        self._existing_channel(req).pause()

    def _ep_channel_unpause(self, req: _HTTPRequest) -> Any:
        self._existing_channel(req).unpause()

    def _ep_config(self, req: _HTTPRequest) -> Any:
        name = req.path[len("/config/"):]
        opts = self.options
        if name not in opts:
            raise _HTTPError(400, "INVALID_OPTION")
        value = opts[name]
        if name in _DURATION_OPTIONS:
            return int(value * 1e9)      # Go durations are nanoseconds in JSON
        return value


_PUB_OK = (200, b"OK", _TEXT_TYPE, True)
_LATER = object()                # an endpoint's answer comes later


def _publish_refused(e: MinqError, too_big: str = "MSG_TOO_BIG") -> _HTTPError:
    """nsqd's answer to a publish the core refused: 413 for a message too
    big, else 503 EXITING (storage failed, or the broker is closing)."""
    if isinstance(e, InvalidMessage):
        return _HTTPError(413, too_big)
    return _HTTPError(503, "EXITING")


_DURATION_OPTIONS = frozenset({"msg_timeout", "max_msg_timeout", "max_req_timeout",
                               "sync_timeout", "max_heartbeat_interval",
                               "output_buffer_timeout", "max_output_buffer_timeout"})


def _http_bool(value: Optional[str], default: bool) -> bool:
    if value is None:
        return default
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise _HTTPError(400, "INVALID_REQUEST")


def _nanoseconds_text(ns: float) -> str:
    """nsqd's short form of a duration in ns: 1.5ms, 230.0us, 2.1s."""
    for size, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "us")):
        if ns > size:
            return f"{ns / size:.1f}{unit}"
    return f"{ns:.1f}ns"


def _e2e_text(stats: Dict[str, Any]) -> str:
    # nsqd's "e2e%: <each percentile's value>", when percentiles are tracked.
    items = stats["e2e_processing_latency"]["percentiles"]
    if not items:
        return ""
    return " e2e%: " + ", ".join(_nanoseconds_text(i["value"]) for i in items)


def _stats_text(stats: Dict[str, Any]) -> str:
    """nsqd's human-readable /stats (no tool parses it)."""
    lines = [f"nsqd v{stats['version']} (minq {VERSION})",
             f"start_time {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(stats['start_time']))}",
             f"uptime {int(time.time() - stats['start_time'])}s", "", f"Health: {stats['health']}",
             ""]
    topics = stats["topics"] or []
    lines.append("Topics:" if topics else "   NO_TOPICS")
    for t in topics:
        lines.append(f"   [{t['topic_name']:<25}] depth: {t['depth']:<5} be-depth: "
                     f"{t['backend_depth']:<5} msgs: {t['message_count']:<8}"
                     + _e2e_text(t) + (" *P" if t["paused"] else ""))
        for c in t["channels"]:
            lines.append(f"      [{c['channel_name']:<25}] depth: {c['depth']:<5} be-depth: "
                         f"{c['backend_depth']:<5} inflt: {c['in_flight_count']:<4} def: "
                         f"{c['deferred_count']:<4} re-q: {c['requeue_count']:<5} timeout: "
                         f"{c['timeout_count']:<5} msgs: {c['message_count']:<8}"
                         + _e2e_text(c) + (" *P" if c["paused"] else ""))
            for cl in c.get("clients") or []:
                lines.append(f"        [{cl['user_agent']} {cl['client_id']}] state: "
                             f"{cl['state']} inflt: {cl['in_flight_count']:<4} rdy: "
                             f"{cl['ready_count']:<4} fin: {cl['finish_count']:<8} re-q: "
                             f"{cl['requeue_count']:<8} msgs: {cl['message_count']:<8} "
                             f"connected: {int(time.time()) - cl['connect_ts']}s")
    return "\n".join(lines) + "\n"


# =============================================================================
# CLI
#
# ``python minq.py serve`` runs a broker with nsqd's flags (a TOML --config
# file, keys named like the flags with underscores, gives defaults that the
# command line overrides); ``pub``, ``tail`` and ``stats`` are the small tools
# NSQ ships as to_nsq, nsq_tail and nsq_stat.  The library never configures
# logging; main does.
# =============================================================================

_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from nsqd's duration forms (``"60s"``, ``"15m"``, ``"1h30m"``, ``"250ms"``).

    A bare number is taken as seconds.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise InvalidArgument(f"invalid duration {value!r}: use forms like 60s, 15m, 250ms, 1h30m")
    return total


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InvalidArgument(f"invalid boolean {value!r}: use true or false")


def _parse_tls_required(value: Any) -> Union[bool, str]:
    """nsqd's values: true (TCP and HTTP), tcp-https (TCP only; HTTP stays
    open beside HTTPS), false."""
    return "tcp-https" if str(value).strip().lower() == "tcp-https" else _parse_bool(value)


# (flag, parser, default, help) for ``serve``; cfg keys are flags with "_".
_SERVE_OPTIONS: List[Tuple[str, Callable[[Any], Any], Any, str]] = [
    ("tcp-address", str, DEFAULT_TCP_ADDRESS, "<addr>:<port> to listen on for TCP clients"),
    ("http-address", str, DEFAULT_HTTP_ADDRESS,
     "<addr>:<port> to listen on for HTTP clients ('' = no HTTP)"),
    ("data-path", str, DEFAULT_DATA_PATH,
     "folder for the segment logs and minq.dat ('' = memory only, nothing kept)"),
    ("mem-queue-size", int, DEFAULT_MEM_QUEUE_SIZE,
     "messages kept in memory per topic and channel before they overflow to disk"),
    ("durable", _parse_bool, False,
     "write every message to disk before PUB is answered; survive kill -9"),
    ("fsync", _parse_bool, False, "with --durable: fsync before PUB is answered (group commit)"),
    ("max-bytes-per-file", int, DEFAULT_MAX_BYTES_PER_FILE, "segment file size before rolling"),
    ("sync-every", int, DEFAULT_SYNC_EVERY, "disk operations between fsyncs"),
    ("sync-timeout", parse_duration, DEFAULT_SYNC_TIMEOUT, "longest time between fsyncs"),
    ("max-open-files", int, 0,
     "descriptors the segment logs may hold at once (0 = half the open-file limit)"),
    ("e2e-processing-latency-percentile", None, None,
     "message processing time percentiles to track, in (0, 1]; repeat the flag or separate "
     "with commas (default none)"),
    ("e2e-processing-latency-window-time", parse_duration, DEFAULT_E2E_WINDOW,
     "the time end-to-end latency quantiles are computed over"),
    ("statsd-address", str, "", "UDP <addr>:<port> of a statsd daemon to push stats to"),
    ("statsd-prefix", str, DEFAULT_STATSD_PREFIX,
     "prefix of the keys sent to statsd (%%s: this host's address and HTTP port)"),
    ("statsd-interval", parse_duration, DEFAULT_STATSD_INTERVAL, "time between pushes to statsd"),
    ("statsd-mem-stats", _parse_bool, True, "send memory and GC stats to statsd"),
    ("statsd-udp-packet-size", int, DEFAULT_STATSD_PACKET_SIZE,
     "largest statsd UDP packet in bytes"),
    ("statsd-exclude-ephemeral", _parse_bool, False,
     "leave ephemeral topics and channels out of what goes to statsd"),
    ("msg-timeout", parse_duration, DEFAULT_MSG_TIMEOUT, "default in-flight timeout"),
    ("max-msg-timeout", parse_duration, DEFAULT_MAX_MSG_TIMEOUT,
     "largest msg_timeout a client may ask for"),
    ("max-msg-size", int, DEFAULT_MAX_MSG_SIZE, "largest message body in bytes"),
    ("max-body-size", int, DEFAULT_MAX_BODY_SIZE, "largest MPUB/IDENTIFY body in bytes"),
    ("max-req-timeout", parse_duration, DEFAULT_MAX_REQ_TIMEOUT,
     "longest REQ delay and DPUB deferral"),
    ("max-rdy-count", int, DEFAULT_MAX_RDY_COUNT, "largest RDY a client may send"),
    ("max-attempts", int, 0, "deliveries before a message goes to the dead-letter topic (0 = never)"),
    ("max-heartbeat-interval", parse_duration, DEFAULT_MAX_HEARTBEAT_INTERVAL,
     "largest heartbeat interval a client may ask for"),
    ("output-buffer-timeout", parse_duration, DEFAULT_OUTPUT_BUFFER_TIMEOUT,
     "default time message frames are buffered before a flush"),
    ("max-output-buffer-size", int, DEFAULT_MAX_OUTPUT_BUFFER_SIZE,
     "largest output buffer a client may ask for"),
    ("max-output-buffer-timeout", parse_duration, DEFAULT_MAX_OUTPUT_BUFFER_TIMEOUT,
     "largest output buffer timeout a client may ask for"),
    ("tls-cert", str, "", "certificate file (PEM) for TLS"),
    ("tls-key", str, "", "private key file (PEM) for TLS"),
    ("tls-required", _parse_tls_required, False,
     "true: TCP clients must upgrade to TLS, plain HTTP answers 403 TLS_REQUIRED; "
     "tcp-https: TCP only"),
    ("https-address", str, DEFAULT_HTTPS_ADDRESS,
     "<addr>:<port> to listen on for HTTPS clients (with --tls-cert and --tls-key; '' = none)"),
    ("deflate", _parse_bool, True, "let clients negotiate deflate compression"),
    ("snappy", _parse_bool, True, "let clients negotiate snappy compression"),
    ("max-deflate-level", int, DEFAULT_MAX_DEFLATE_LEVEL, "highest deflate level (1-9)"),
    ("auth-http-address", str, None,
     "nsqd auth server <addr>:<port> or URL (repeatable); clients must AUTH"),
    ("auth-secrets", str, "", "JSON file mapping AUTH secrets to authorizations"),
    ("lookupd-tcp-address", str, None,
     "nsqlookupd <addr>:<port> to register topics and channels with (repeatable)"),
    ("broadcast-address", str, "",
     "address given to lookupd and clients (default: the OS hostname when listening on "
     "0.0.0.0, else the listening host)"),
    ("broadcast-tcp-port", int, 0, "TCP port given to lookupd (default: the listening port)"),
    ("broadcast-http-port", int, 0, "HTTP port given to lookupd (default: the listening port)"),
    ("http-header-timeout", parse_duration, DEFAULT_HTTP_HEADER_TIMEOUT,
     "time an HTTP client has to send a request line and headers"),
    ("http-read-timeout", parse_duration, DEFAULT_HTTP_READ_TIMEOUT,
     "time an HTTP client has to send a body, and to read a response"),
    ("http-idle-timeout", parse_duration, DEFAULT_HTTP_IDLE_TIMEOUT,
     "time a keep-alive HTTP connection may wait for its next request"),
    ("max-body-memory", int, 0,
     "bytes of PUB/MPUB bodies held at once over TCP and HTTP; more wait "
     "(default: 8 x --max-body-size)"),
    ("shutdown-timeout", parse_duration, DEFAULT_SHUTDOWN_TIMEOUT,
     "on SIGTERM/SIGINT, time HTTP requests in progress have to finish "
     "(a second signal cuts it short)"),
    ("min-output-buffer-timeout", parse_duration, DEFAULT_MIN_OUTPUT_BUFFER_TIMEOUT,
     "smallest output buffer timeout a client may ask for"),
    ("max-channel-consumers", int, 0, "most consumers per channel over TCP (0 = no limit)"),
    ("tls-root-ca-file", str, "", "CA certificates (PEM) that client certificates must be "
                                  "signed by"),
    ("tls-client-auth-policy", str, "",
     "require or require-verify: TCP clients must present a certificate, verified against "
     "--tls-root-ca-file (implies --tls-required)"),
    ("tls-min-version", str, "",
     "oldest TLS version accepted: ssl3.0, tls1.0, tls1.1, tls1.2 or tls1.3 "
     "(default: Python's, TLS 1.2)"),
    ("http-client-connect-timeout", parse_duration, 2.0,
     "time to connect to an auth server"),
    ("http-client-request-timeout", parse_duration, 5.0,
     "time an auth server has to answer"),
    ("log-level", str, "info", "debug, info, warn, error or fatal"),
]
# nsqd 1.3.0's flags that only change what is reported (statsd, latency
# percentiles, log prefix) or tune nsqd's internals: accepted, ignored with
# a warning, so an nsqd command line starts minq unchanged.
_IGNORED_FLAGS = ("log-prefix", "node-id", "worker-id", "verbose",
                  "queue-scan-selection-count", "queue-scan-worker-pool-max")
_BOOL_FLAGS = {"durable", "fsync", "deflate", "snappy", "tls-required", "statsd-mem-stats",
               "statsd-exclude-ephemeral"}
_LIST_FLAGS = {"auth-http-address", "lookupd-tcp-address", "e2e-processing-latency-percentile"}
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
               "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL}


def format_duration(seconds: float) -> str:
    """nsqd's short duration form: ``60s``, ``15m``, ``1h``, ``250ms``."""
    if seconds and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 600 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    if seconds == int(seconds):
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


# What nsqd --version prints, with minq's version where nsqd names its Go.
_NSQD_VERSION_LINE = f"nsqd v{NSQ_VERSION} (built w/minq-{VERSION})"


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run the broker: NSQ's TCP protocol on --tcp-address",
        description="Run minq as a server speaking nsqd's TCP protocol, so any NSQ client "
                    "can publish and consume. Flags are nsqd's: --flag=value, --flag value, "
                    "-flag=value and -flag value all work. Durations take nsqd's forms: "
                    "60s, 15m, 250ms.")
    p.add_argument("--version", action="version", version=_NSQD_VERSION_LINE)
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of options (keys like flags, with _); flags win")
    for flag in _IGNORED_FLAGS:
        p.add_argument(f"--{flag}", nargs="?", const="true", action="append",
                       default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag, parse, default, text in _SERVE_OPTIONS:
        if default in (None, "", 0) or "(default" in text:
            shown = ""
        elif parse is parse_duration:
            shown = f" (default {format_duration(default)})"
        else:
            shown = f" (default {str(default).lower() if isinstance(default, bool) else default})"
            shown = shown.replace("%", "%%")          # argparse formats help with %
        if flag in _BOOL_FLAGS:
            p.add_argument(f"--{flag}", nargs="?", const="true", default=argparse.SUPPRESS,
                           metavar="BOOL", help=text + shown)
        elif flag in _LIST_FLAGS:
            p.add_argument(f"--{flag}", action="append", default=argparse.SUPPRESS,
                           metavar="ADDR" if "address" in flag else "VALUE", help=text)
        else:
            p.add_argument(f"--{flag}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=text + shown)


_TOML_LINE = re.compile(r"""\s*([A-Za-z0-9_-]+)\s*=\s*(.*?)\s*(?:\#[^"']*)?$""")


def _read_config(path: str) -> Dict[str, Any]:
    """The --config file: TOML through tomllib (Python 3.11+); before 3.11 the
    flat form a config of flags needs (``key = value``: strings, numbers,
    booleans, one-line arrays), read here."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidArgument(f"--config: cannot read {path}: {e.strerror}") from None
    try:
        import tomllib
    except ImportError:
        return _read_flat_toml(path, data.decode("utf-8", errors="replace"))
    try:
        return tomllib.loads(data.decode("utf-8", errors="replace"))
    except ValueError as e:
        raise InvalidArgument(f"--config {path}: {e}") from None


def _read_flat_toml(path: str, text: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _TOML_LINE.fullmatch(line)
        try:
            if m is None:
                raise ValueError("expected key = value")
            value = m.group(2)
            if value.startswith("[") and value.endswith("]"):
                items = [v.strip() for v in value[1:-1].split(",") if v.strip()]
                out[m.group(1)] = [_toml_scalar(v) for v in items]
            else:
                out[m.group(1)] = _toml_scalar(value)
        except ValueError as e:
            raise InvalidArgument(f"--config {path} line {n}: {e} (Python before 3.11 reads "
                                  f"only flat key = value lines)") from None
    return out


def _toml_scalar(value: str) -> Any:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return json.loads(value) if value[0] == '"' else value[1:-1]
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value.replace("_", ""))
    except ValueError:
        return float(value.replace("_", ""))


def _serve_options(args: argparse.Namespace) -> Dict[str, Any]:
    """Defaults, then the --config file, then the command line; each value parsed."""
    given: Dict[str, Any] = {}
    ignored = [flag for flag in _IGNORED_FLAGS if hasattr(args, flag.replace("-", "_"))]
    if getattr(args, "config", None):
        cfg = _read_config(args.config)
        known = {flag.replace("-", "_") for flag, *_ in _SERVE_OPTIONS}
        skip = {flag.replace("-", "_") for flag in _IGNORED_FLAGS}
        unknown = sorted(set(cfg) - known - skip)
        if unknown:
            raise InvalidArgument(f"{args.config}: unknown option(s) {', '.join(unknown)}")
        ignored += [k.replace("_", "-") for k in cfg if k in skip]
        given.update((k, v) for k, v in cfg.items() if k not in skip)

    for flag, *_ in _SERVE_OPTIONS:
        key = flag.replace("-", "_")
        if hasattr(args, key):
            given[key] = getattr(args, key)
    opts: Dict[str, Any] = {}
    for flag, parse, default, _ in _SERVE_OPTIONS:
        key = flag.replace("-", "_")
        if key not in given:
            opts[key] = default
        elif flag in _LIST_FLAGS:
            value = given[key]
            opts[key] = [value] if isinstance(value, (str, int, float)) else list(value)
        else:
            try:
                opts[key] = parse(given[key])
            except (ValueError, MinqError) as e:
                raise InvalidArgument(f"--{flag}: {e}") from None
    opts["ignored_flags"] = sorted(set(ignored))
    opts["e2e_processing_latency_percentile"] = _parse_percentiles(
        opts["e2e_processing_latency_percentile"] or ())
    return opts


def _parse_percentiles(values: Iterable[Any]) -> List[float]:
    """nsqd's --e2e-processing-latency-percentile values (each may hold several,
    comma-separated): floats in (0, 1], highest first."""
    out = []
    for value in values:
        for part in str(value).split(","):
            try:
                q = float(part)
            except ValueError:
                raise InvalidArgument(f"--e2e-processing-latency-percentile: could not parse "
                                      f"{part!r}") from None
            if not 0 < q <= 1:
                raise InvalidArgument(f"--e2e-processing-latency-percentile: invalid E2E "
                                      f"processing latency percentile: {part}")
            out.append(q)
    return sorted(out, reverse=True)


def _tune_gc() -> None:
    """Collect the young generation rarely, in a process that runs a broker.

    A broker keeps many long-lived objects (queued messages) and its hot
    paths allocate objects that live for one pass of the I/O loop; CPython's
    default thresholds would run a collection every 700 net allocations and
    a full one over every queued message each time they grow by a quarter.
    Objects made at start-up (modules, classes) are frozen out of every
    collection.  Measured under nsqd's read load: 13 % of the time saved.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one, as Go programs (nsqd)
    do at start: room for connections and logs.  The logs' own bound
    (``max_open_files``) holds without it."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError) as e:
        log.debug("open-file limit left as it is: %s", e)


def _abandon(broker: Broker, fresh: bool, existed: bool) -> None:
    """Close a broker whose server could not start; a data folder it made
    (or found empty) is left as it was found."""
    broker.close()
    if fresh and broker.data_path:
        if not existed:
            shutil.rmtree(broker.data_path, ignore_errors=True)
            return
        for name in os.listdir(broker.data_path):
            path = os.path.join(broker.data_path, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def serve(opts: Dict[str, Any], ready: Optional[Callable[[TCPServer], None]] = None,
          stop: Optional[threading.Event] = None, hurry: Optional[threading.Event] = None) -> int:
    """Run broker + servers until *stop* is set (SIGINT/SIGTERM in main); 0 on a clean stop.

    Stopping: every face stops accepting, TCP connections and idle or
    half-read HTTP ones close at once, HTTP requests in progress get
    ``shutdown_timeout`` (cut short when *hurry* is set: a second signal),
    then the broker is persisted.
    """
    stop = stop or threading.Event()
    _tune_gc()
    _raise_open_file_limit()
    data_path = opts["data_path"] or None
    existed = bool(data_path) and os.path.isdir(data_path)    # type: ignore[arg-type]
    fresh = bool(data_path) and not (existed and os.listdir(data_path))  # type: ignore[arg-type]
    broker = Broker(
        data_path=data_path, mem_queue_size=opts["mem_queue_size"],
        durable=opts["durable"] or opts["fsync"], fsync=opts["fsync"],
        max_bytes_per_file=opts["max_bytes_per_file"], sync_every=opts["sync_every"],
        sync_timeout=opts["sync_timeout"], msg_timeout=opts["msg_timeout"],
        max_msg_timeout=opts["max_msg_timeout"], max_msg_size=opts["max_msg_size"],
        max_body_size=opts["max_body_size"], max_req_timeout=opts["max_req_timeout"],
        max_rdy_count=opts["max_rdy_count"], max_attempts=opts["max_attempts"],
        max_open_files=opts["max_open_files"] or None,
        e2e_percentiles=opts["e2e_processing_latency_percentile"],
        e2e_window=opts["e2e_processing_latency_window_time"])
    loop = _EventLoop(broker.clock)        # one I/O thread for both faces
    try:
        budget = MemoryBudget(opts["max_body_memory"] or
                              DEFAULT_BODY_MEMORY_FACTOR * broker.max_body_size)
        authorizer = None
        if opts["auth_http_address"] or opts["auth_secrets"]:
            authorizer = Authorizer(opts["auth_http_address"] or (), opts["auth_secrets"] or None,
                                    timeout=opts["http_client_request_timeout"])
        server = TCPServer(
            broker, opts["tcp_address"], loop=loop,
            max_heartbeat_interval=opts["max_heartbeat_interval"],
            heartbeat_interval=min(DEFAULT_HEARTBEAT_INTERVAL, opts["max_heartbeat_interval"]),
            output_buffer_timeout=opts["output_buffer_timeout"],
            max_output_buffer_size=opts["max_output_buffer_size"],
            max_output_buffer_timeout=opts["max_output_buffer_timeout"],
            tls_cert=opts["tls_cert"] or None, tls_key=opts["tls_key"] or None,
            tls_required=opts["tls_required"], deflate=opts["deflate"], snappy=opts["snappy"],
            max_deflate_level=opts["max_deflate_level"], authorizer=authorizer,
            body_budget=budget, min_output_buffer_timeout=opts["min_output_buffer_timeout"],
            max_channel_consumers=opts["max_channel_consumers"],
            tls_root_ca_file=opts["tls_root_ca_file"] or None,
            tls_client_auth_policy=opts["tls_client_auth_policy"],
            tls_min_version=opts["tls_min_version"])
    except BaseException:
        loop.close()
        _abandon(broker, fresh, existed)
        raise
    http_server = https_server = registrar = statsd = None
    try:
        if opts["https_address"] and server.tls_context is not None:
            https_server = HTTPServer(broker, opts["https_address"], tcp_address=server.address,
                                      options=opts, tls_context=server.tls_context,
                                      body_budget=budget, loop=loop)
            opts["https_port"] = https_server.server_address[1]
        if opts["http_address"]:
            http_server = HTTPServer(broker, opts["http_address"], tcp_address=server.address,
                                     options=opts, body_budget=budget, loop=loop,
                                     history=https_server.history if https_server else None)
        if opts["lookupd_tcp_address"]:
            tcp_host, tcp_port = _split_address(server.address, TCP_PORT)
            registrar = LookupdRegistrar(
                broker, opts["lookupd_tcp_address"],
                broadcast_address=(http_server.broadcast_address if http_server else
                                   opts["broadcast_address"] or broadcast_address(tcp_host)),
                tcp_port=opts["broadcast_tcp_port"] or tcp_port,
                http_port=(opts["broadcast_http_port"] or
                           (http_server.server_address[1] if http_server else 0)))
        if opts["statsd_address"]:
            statsd = StatsdPusher(
                broker, opts["statsd_address"],
                statsd_prefix(opts["statsd_prefix"],
                              http_server.broadcast_address if http_server else
                              opts["broadcast_address"] or socket.gethostname(),
                              opts["broadcast_http_port"] or
                              (http_server.server_address[1] if http_server else 0)),
                interval=opts["statsd_interval"], mem_stats=opts["statsd_mem_stats"],
                packet_size=opts["statsd_udp_packet_size"],
                exclude_ephemeral=opts["statsd_exclude_ephemeral"])
    except BaseException:
        for s in (http_server, https_server):
            if s is not None:
                s.server_close()
        server.close()
        loop.close()
        _abandon(broker, fresh, existed)
        raise
    mode = ("memory only" if not broker.data_path else
            f"data in {broker.data_path}" + (" (durable, fsync)" if broker.fsync else
                                             " (durable)" if broker.durable else ""))
    http_text = f", http://{http_server.address}" if http_server else ""
    http_text += f", https://{https_server.address}" if https_server else ""
    print(f"minq {VERSION} (nsqd {NSQ_VERSION} protocol) listening on "
          f"tcp://{server.address}{http_text}; {mode}", flush=True)
    # nsqd's start-up lines, for harnesses and supervisors that read them
    log.info(_NSQD_VERSION_LINE)
    for face, srv in (("TCP", server), ("HTTP", http_server), ("HTTPS", https_server)):
        if srv is not None:
            log.info("%s: listening on %s", face, srv.address)
    webs = [s for s in (http_server, https_server) if s is not None]
    server.start()
    for web in webs:
        web.start()
    if registrar is not None:
        registrar.start()
    if statsd is not None:
        statsd.start()
        log.info("STATSD: pushing stats to %s every %s", opts["statsd_address"],
                 format_duration(opts["statsd_interval"]))
    if ready is not None:
        ready(server)
    try:
        stop.wait()
    finally:
        started = time.monotonic()
        log.info("stopping: closing connections, persisting")
        try:
            for web in webs:
                web.stop_accepting()
            if registrar is not None:
                registrar.close()
            if statsd is not None:
                statsd.close()
            server.close()
            grace = opts.get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT)
            for web in webs:
                web.close(max(0.0, grace - (time.monotonic() - started)), hurry)
        finally:
            broker.close()
        log.info("stopped in %.2fs", time.monotonic() - started)
    return 0


# -- the tools: pub (like to_nsq), tail (like nsq_tail), stats (like nsq_stat) --
# They speak only NSQ's wire protocols, so they work against nsqd as well.

# go-nsq's options (--producer-opt, --consumer-opt) that a Client takes
_CLIENT_OPTS: Dict[str, Callable[[str], Any]] = {
    "msg_timeout": parse_duration, "heartbeat_interval": parse_duration,
    "output_buffer_size": int, "output_buffer_timeout": parse_duration,
    "deflate": _parse_bool, "deflate_level": int, "snappy": _parse_bool,
    "tls_v1": _parse_bool, "auth_secret": str, "client_id": str, "user_agent": str,
}


def _go_nsq_opts(given: List[str], known: Dict[str, Callable[[str], Any]],
                 flag: str) -> Dict[str, Any]:
    """``KEY,VALUE`` options as go-nsq's ConfigFlag takes them (a bare KEY is
    true); InvalidArgument for one this tool does not implement."""
    out: Dict[str, Any] = {}
    for opt in given:
        key, sep, value = opt.partition(",")
        key = key.strip()
        if key not in known:
            raise InvalidArgument(f"{flag} {key!r} is not implemented; these are: "
                                  f"{', '.join(sorted(known))}")
        try:
            out[key] = known[key](value.strip() if sep else "true")
        except (ValueError, MinqError) as e:
            raise InvalidArgument(f"{flag} {key}: {e}") from None
    return out


def _client_kwargs(opts: Dict[str, Any], user_agent: str) -> Dict[str, Any]:
    """Client's keyword arguments for go-nsq options."""
    kw = {k: opts[k] for k in ("msg_timeout", "heartbeat_interval", "output_buffer_size",
                               "output_buffer_timeout", "deflate", "deflate_level",
                               "snappy", "auth_secret", "client_id") if k in opts}
    kw["user_agent"] = opts.get("user_agent", user_agent)
    if opts.get("tls_v1"):
        kw["tls"] = ssl.create_default_context()
    return kw


def _tool_parsers(sub: Any, cmd: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "pub", help="publish a message, or each line of stdin, to a topic",
        formatter_class=fmt,
        description="Publish to TOPIC on minq or nsqd over TCP (like NSQ's to_nsq, whose "
                    "flags it takes too: --topic, --delimiter, --rate, --producer-opt, and "
                    "--nsqd-tcp-address given several times publishes to each).",
        epilog="examples:\n"
               f"  {cmd} pub orders '{{\"id\": 1}}'      one message\n"
               f"  cat events.txt | {cmd} pub events   one message per line\n"
               f"  {cmd} pub later hi --defer 30s      delivered in 30 seconds\n"
               f"  cat events.txt | {cmd} pub --topic=events --rate=100   as to_nsq")
    p.add_argument("topic", metavar="TOPIC", nargs="?")
    p.add_argument("message", metavar="MSG", nargs="?", default="-",
                   help="the message body; '-' or nothing reads stdin, one message per line")
    p.add_argument("--topic", dest="topic_flag", default=None, metavar="TOPIC",
                   help="the topic (to_nsq's flag; or give it first, as TOPIC)")
    p.add_argument("--nsqd-tcp-address", action="append", default=[], metavar="ADDR",
                   help=f"server to publish to (default {DEFAULT_TCP_ADDRESS}; may be given "
                        f"multiple times: every message goes to each)")
    p.add_argument("--delimiter", default="\n", metavar="CHAR",
                   help="the byte that ends a message read from stdin (default newline)")
    p.add_argument("--rate", type=int, default=0, metavar="N",
                   help="at most N messages per second (default 0: no limit)")
    p.add_argument("--producer-opt", action="append", default=[], metavar="KEY,VALUE",
                   help="go-nsq producer option (may be given multiple times): "
                        + ", ".join(sorted(_CLIENT_OPTS)))
    p.add_argument("--defer", default="0", metavar="DURATION",
                   help="deliver after this long (DPUB), e.g. 500ms, 30s, 5m")
    p.add_argument("--version", action="version",
                   version=f"to_nsq v{NSQ_VERSION} (minq {VERSION} pub)")
    p.add_argument("--batch", type=int, default=100, metavar="N",
                   help="stdin lines sent per MPUB (default 100; 1 = one PUB each)")
    p.add_argument("--connect-timeout", default="5s", metavar="DURATION",
                   help="give up (exit 1) when the server cannot be reached within this "
                        "long (default 5s)")

    t = sub.add_parser(
        "tail", help="print the messages of a topic as they arrive",
        formatter_class=fmt,
        description="Subscribe to TOPIC and print each message body on its own line "
                    "(like NSQ's nsq_tail). By default it uses a new ephemeral channel, so "
                    "it sees only new messages, takes none from other consumers, and "
                    "leaves nothing behind when it exits.",
        epilog="examples:\n"
               f"  {cmd} tail orders            follow until Ctrl-C\n"
               f"  {cmd} tail orders -n 10      stop after 10 messages\n"
               f"  {cmd} tail orders --channel billing   take from a real channel\n"
               f"  {cmd} tail --topic=orders --lookupd-http-address=127.0.0.1:4161   as "
               "nsq_tail")
    t.add_argument("topic", metavar="TOPIC", nargs="?")
    t.add_argument("--topic", dest="topics", action="append", default=[], metavar="TOPIC",
                   help="a topic (nsq_tail's flag; may be given multiple times)")
    t.add_argument("--channel", default=None, metavar="NAME",
                   help="channel to read (default: tail<random>#ephemeral)")
    t.add_argument("-n", "--n", type=int, default=0, dest="n", metavar="N",
                   help="exit after N messages (default 0: run until Ctrl-C)")
    t.add_argument("--nsqd-tcp-address", action="append", default=[], metavar="ADDR",
                   help=f"server to read from (default {DEFAULT_TCP_ADDRESS}; may be given "
                        f"multiple times)")
    t.add_argument("--lookupd-http-address", action="append", default=[], metavar="ADDR",
                   help="nsqlookupd to find the servers of the topic (may be given "
                        "multiple times)")
    t.add_argument("--consumer-opt", action="append", default=[], metavar="KEY,VALUE",
                   help="go-nsq consumer option (may be given multiple times): "
                        + ", ".join(sorted(_CLIENT_OPTS)))
    t.add_argument("--version", action="version",
                   version=f"nsq_tail v{NSQ_VERSION} (minq {VERSION} tail)")
    t.add_argument("--max-in-flight", type=int, default=200, metavar="N",
                   help="messages the server may send before they are finished (default 200)")
    t.add_argument("--print-topic", action="store_true", help="prefix each line with the topic")
    t.add_argument("--connect-timeout", default="5s", metavar="DURATION",
                   help="give up (exit 1) when the server cannot be reached within this "
                        "long at the start (default 5s)")

    s = sub.add_parser(
        "stats", help="show a live table of depths and rates",
        formatter_class=fmt,
        description="Poll /stats on minq or nsqd and print one row per topic and channel "
                    "each interval (like NSQ's nsq_stat): queue depth (in memory and on "
                    "disk), in flight, deferred, requeued, timed out, messages and "
                    "messages per second since the last row.  It takes nsq_stat's flags.",
        epilog="examples:\n"
               f"  {cmd} stats                    every topic, every 2 s\n"
               f"  {cmd} stats --topic orders --interval 1s --count 5")
    s.add_argument("--topic", default=None, metavar="T", help="only this topic")
    s.add_argument("--channel", default=None, metavar="C", help="only this channel")
    s.add_argument("--nsqd-http-address", action="append", default=[], metavar="ADDR",
                   help=f"server's HTTP address (default {DEFAULT_HTTP_ADDRESS}; may be "
                        f"given multiple times: their figures are summed)")
    s.add_argument("--lookupd-http-address", action="append", default=[], metavar="ADDR",
                   help="nsqlookupd that lists the servers (may be given multiple times)")
    _http_client_flags(s, "5s")
    s.add_argument("--version", action="version",
                   version=f"nsq_stat v{NSQ_VERSION} (minq {VERSION} stats)")
    s.add_argument("--interval", default="2s", metavar="DURATION",
                   help="time between rows (default 2s)")
    s.add_argument("--status-every", default=None, metavar="DURATION",
                   help="the same as --interval (older nsq_stat's name for it)")
    s.add_argument("--count", type=int, default=0, metavar="N",
                   help="stop after N reports (default 0: run until Ctrl-C)")


def _http_client_flags(p: argparse.ArgumentParser, request_timeout: str) -> None:
    """The NSQ tools' two HTTP client timeouts, with the tool's defaults."""
    p.add_argument("--http-client-connect-timeout", default="2s", metavar="DURATION",
                   help="timeout for HTTP connect (default 2s)")
    p.add_argument("--http-client-request-timeout", default=request_timeout,
                   metavar="DURATION", help=f"timeout for HTTP request (default "
                                            f"{request_timeout})")


def _to_http_parser(sub: Any, cmd: str) -> None:
    p = sub.add_parser(
        "to-http", help="deliver a channel's messages to HTTP services (like nsq_to_http)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Consume TOPIC/CHANNEL from minq or nsqd and POST (or GET) every message "
                    "to HTTP endpoints, as NSQ's nsq_to_http 1.3.0 does, with its flags and "
                    "defaults. A 2xx finishes a message; anything else, a timeout or a "
                    "refused connection takes that backend out of rotation for a while and "
                    "tries the others; when none answers the message is requeued with "
                    "backoff, and after --consumer-opt max_attempts it goes to the "
                    "dead-letter topic <topic>.<channel>.dead.",
        epilog="examples:\n"
               f"  {cmd} to-http --topic orders --post http://127.0.0.1:8080/orders\n"
               f"  {cmd} to-http --topic orders --get 'http://svc/hook?body=%s' --n 10\n"
               f"  {cmd} to-http --topic events --post http://a/e --post http://b/e \\\n"
               "        --mode hash --hash-key json:user_id")
    p.add_argument("--version", action="version",
                   version=f"minq to-http {VERSION} (nsq_to_http v{NSQ_VERSION})")
    p.add_argument("--topic", default="", help="nsq topic")
    p.add_argument("--channel", default="nsq_to_http", help="nsq channel (default nsq_to_http)")
    p.add_argument("--nsqd-tcp-address", action="append", default=[], metavar="ADDR",
                   help="nsqd TCP address (may be given multiple times)")
    p.add_argument("--lookupd-http-address", action="append", default=[], metavar="ADDR",
                   help="lookupd HTTP address (may be given multiple times)")
    p.add_argument("--post", action="append", default=[], metavar="URL",
                   help="HTTP address to make a POST request to; data will be in the body "
                        "(may be given multiple times)")
    p.add_argument("--get", action="append", default=[], metavar="URL",
                   help="HTTP address to make a GET request to; '%%s' will be replaced with "
                        "the data (may be given multiple times)")
    p.add_argument("--content-type", default=None,
                   help="the Content-Type used for POST requests (default "
                        "application/octet-stream)")
    p.add_argument("--header", action="append", default=[], metavar="'KEY: VALUE'",
                   help="custom header for HTTP requests (may be given multiple times)")
    _http_client_flags(p, "20s")
    p.add_argument("-n", "--n", type=int, default=100, dest="n",
                   help="number of concurrent publishers (default 100)")
    p.add_argument("--max-in-flight", type=int, default=200,
                   help="max number of messages to allow in flight (default 200)")
    p.add_argument("--mode", default="hostpool",
                   help="how a backend is picked: hostpool (default), round-robin, "
                        "epsilon-greedy, and minq's random, weighted, hash")
    p.add_argument("--sample", type=float, default=1.0,
                   help="fraction of messages to publish, 0.0 - 1.0 (default 1.0)")
    p.add_argument("--status-every", type=int, default=250,
                   help="requests between status lines, 0 disables (default 250)")
    p.add_argument("--consumer-opt", action="append", default=[], metavar="KEY,VALUE",
                   help="go-nsq consumer option (may be given multiple times): max_attempts "
                        "(5), default_requeue_delay (90s), max_requeue_delay (15m), "
                        "backoff_multiplier (1s), max_backoff_duration (2m), max_in_flight, "
                        "msg_timeout, heartbeat_interval, output_buffer_size, "
                        "output_buffer_timeout, deflate, deflate_level, snappy, tls_v1, "
                        "auth_secret, "
                        "client_id, user_agent, lookupd_poll_interval (60s)")
    p.add_argument("--weights", default=None, metavar="W,W,...",
                   help="minq: --mode weighted: a weight per URL, in order")
    p.add_argument("--hash-key", default=None, metavar="json:FIELD|header:NAME",
                   help="minq: --mode hash: where a message's key is")
    p.add_argument("--retry-delay", default="30s", metavar="DURATION",
                   help="minq: how long a failed backend first sits out (doubling, at most "
                        "15m; default 30s)")


# go-nsq's consumer options: name -> (parser, where it goes)
_CONSUMER_OPTS: Dict[str, Callable[[str], Any]] = {
    "max_attempts": int, "default_requeue_delay": parse_duration,
    "max_requeue_delay": parse_duration, "backoff_multiplier": parse_duration,
    "max_backoff_duration": parse_duration, "max_in_flight": int,
    **_CLIENT_OPTS, "lookupd_poll_interval": parse_duration,
}


def _consumer_opts(given: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"max_attempts": 5, "default_requeue_delay": 90.0,
                           "max_requeue_delay": 900.0, "backoff_multiplier": 1.0,
                           "max_backoff_duration": 120.0, "lookupd_poll_interval": 60.0}
    out.update(_go_nsq_opts(given, _CONSUMER_OPTS, "--consumer-opt"))
    return out


def _to_http_command(args: argparse.Namespace, stop: threading.Event) -> int:
    def fatal(text: str) -> int:
        print(f"minq to-http: {text}", file=sys.stderr)
        return 1
    headers: Dict[str, str] = {}
    for h in args.header:
        key, sep, value = h.partition(":")
        if not sep or not key.strip() or not value.strip():
            return fatal(f"--header {h!r}: the format is 'key: value'")
        headers[key.strip()] = value.strip()
    if not args.topic or not args.channel:
        return fatal("--topic and --channel are required")
    if args.content_type is not None and not args.post:
        return fatal("--content-type only used with --post")
    if not args.nsqd_tcp_address and not args.lookupd_http_address:
        return fatal("--nsqd-tcp-address or --lookupd-http-address required")
    if args.nsqd_tcp_address and args.lookupd_http_address:
        return fatal("use --nsqd-tcp-address or --lookupd-http-address not both")
    if not args.get and not args.post:
        return fatal("--get or --post required")
    if args.get and args.post:
        return fatal("use --get or --post not both")
    if not 0.0 <= args.sample <= 1.0:
        return fatal("--sample must be between 0.0 and 1.0")
    opts = _consumer_opts(args.consumer_opt)
    weights = [int(w) for w in args.weights.split(",")] if args.weights else None
    client_kw = _client_kwargs(opts, f"nsq_to_http/{NSQ_VERSION} minq/{VERSION}")
    clients: Dict[str, Client] = {}

    def connect(address: str) -> Client:
        clients[address] = Client(address, **client_kw)
        return clients[address]
    forwarder = HTTPForwarder(
        [connect(a) for a in args.nsqd_tcp_address], args.topic, args.channel,
        args.post or args.get, method="POST" if args.post else "GET", mode=args.mode,
        weights=weights, key=message_key(args.hash_key) if args.hash_key else None,
        content_type=args.content_type or "application/octet-stream", headers=headers,
        connect_timeout=parse_duration(args.http_client_connect_timeout),
        request_timeout=parse_duration(args.http_client_request_timeout),
        workers=args.n, max_in_flight=args.max_in_flight, sample=args.sample,
        status_every=args.status_every, max_attempts=opts["max_attempts"],
        requeue_delay=opts["default_requeue_delay"],
        max_requeue_delay=opts["max_requeue_delay"], backoff=opts["backoff_multiplier"],
        max_backoff=opts["max_backoff_duration"], retry_delay=parse_duration(args.retry_delay))
    try:
        while not stop.is_set():
            for lookupd in args.lookupd_http_address:       # new producers join
                for address in _lookup_producers(lookupd, args.topic):
                    if address not in clients:
                        log.info("to-http: consuming from %s (found by %s)", address, lookupd)
                        forwarder.add_source(connect(address), args.max_in_flight, args.n)
            stop.wait(opts["lookupd_poll_interval"] if args.lookupd_http_address else 3600)
    finally:
        forwarder.close()
        for c in clients.values():
            c.close()
    return 0


def _lookup_producers(lookupd: str, topic: Optional[str], port: str = "tcp_port",
                      timeouts: Tuple[float, float] = (2.0, 10.0)) -> List[str]:
    """The addresses (``broadcast_address:<port>``) nsqlookupd gives for *topic*,
    or for every node when *topic* is None; none if it cannot be asked."""
    base = lookupd if "://" in lookupd else f"http://{lookupd}"
    url = (f"{base}/lookup?{urllib.parse.urlencode({'topic': topic})}" if topic
           else f"{base}/nodes")
    try:
        data = _http_json(url, timeouts)
        return [f"{p['broadcast_address']}:{p[port]}" for p in data.get("producers") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("lookupd %s: %s", lookupd, e)
        return []


def _pub_command(args: argparse.Namespace) -> int:
    topic, message = args.topic, args.message
    if args.topic_flag is not None:          # to_nsq's --topic: a positional is the message
        if message != "-":
            raise InvalidArgument("give the topic once: --topic or TOPIC")
        topic, message = args.topic_flag, args.topic if args.topic is not None else "-"
    if not topic:
        raise InvalidArgument("--topic required")
    delim = args.delimiter.encode()
    if len(delim) != 1:
        raise InvalidArgument("--delimiter must be a single byte")
    defer = parse_duration(args.defer)
    _check_range("--batch", args.batch, 1, None)
    _check_range("--rate", args.rate, 0, None)
    wait = parse_duration(args.connect_timeout)
    kw = _client_kwargs(_go_nsq_opts(args.producer_opt, _CLIENT_OPTS, "--producer-opt"),
                        f"to_nsq/{NSQ_VERSION} minq/{VERSION}")
    clients = [Client(a, timeout=max(wait, 0.001), **kw)
               for a in args.nsqd_tcp_address or [DEFAULT_TCP_ADDRESS]]
    sent = 0
    one_by_one = bool(defer or args.batch == 1 or args.rate)
    next_at = time.monotonic()
    try:
        bodies = iter([message.encode()]) if message != "-" else _stdin_messages(delim)
        batch: List[bytes] = []
        for body in bodies:
            if args.rate:                  # at most --rate per second
                next_at = max(next_at + 1 / args.rate, time.monotonic())
                time.sleep(max(next_at - 1 / args.rate - time.monotonic(), 0))
            batch.append(body)
            if one_by_one or len(batch) >= args.batch:
                _publish_to_each(clients, topic, batch, defer)
                sent, batch = sent + len(batch), []
        if batch:
            _publish_to_each(clients, topic, batch, defer)
            sent += len(batch)
    finally:
        for c in clients:
            c.close()
    print(f"published {sent} message(s) to {topic}", file=sys.stderr)
    return 0


def _stdin_messages(delim: bytes) -> Iterator[bytes]:
    """stdin's messages, split at *delim* (with a newline, a CR before it goes
    too); empty ones are skipped."""
    rest = b""
    while True:
        chunk = sys.stdin.buffer.read1(65536) if hasattr(sys.stdin.buffer, "read1") else \
            sys.stdin.buffer.read(65536)
        parts = (rest + chunk).split(delim)
        rest = parts.pop() if chunk else b""
        for p in parts:
            if delim == b"\n" and p.endswith(b"\r"):
                p = p[:-1]
            if p:
                yield p
        if not chunk:
            return


def _publish_to_each(clients: List[Client], topic: str, bodies: List[bytes],
                     defer: float) -> None:
    for c in clients:
        if len(bodies) == 1:
            c.publish(topic, bodies[0], defer)
        else:
            c.publish_many(topic, bodies)


def _tail_command(args: argparse.Namespace, stop: threading.Event) -> int:
    topics = args.topics + ([args.topic] if args.topic else [])
    if not topics:
        raise InvalidArgument("--topic required")
    if args.nsqd_tcp_address and args.lookupd_http_address:
        raise InvalidArgument("use --nsqd-tcp-address or --lookupd-http-address not both")
    for t in topics:
        validate_name(t)
    channel = args.channel or f"tail{random.randrange(1000000):06d}{EPHEMERAL_SUFFIX}"
    _check_range("-n", args.n, 0, None)
    opts = _go_nsq_opts(args.consumer_opt, {**_CLIENT_OPTS, "max_in_flight": int},
                        "--consumer-opt")
    max_in_flight = max(1, opts.get("max_in_flight", args.max_in_flight))
    if args.n:
        max_in_flight = min(max_in_flight, args.n)    # as nsq_tail: no more than wanted
    kw = _client_kwargs(opts, f"nsq_tail/{NSQ_VERSION} minq/{VERSION}")
    wait = parse_duration(args.connect_timeout)
    out, lock, seen = sys.stdout.buffer, threading.Lock(), [0]

    def show(topic: str) -> Callable[[Message], None]:
        prefix = topic.encode() + b" | " if args.print_topic else b""

        def handler(msg: Message) -> None:
            with lock:
                if args.n and seen[0] >= args.n:
                    raise _Enough()        # requeued for the channel's other readers
                out.write(prefix + msg.body + b"\n")
                out.flush()
                seen[0] += 1
                if args.n and seen[0] >= args.n:
                    stop.set()
        return handler
    clients: Dict[str, Client] = {}
    subs: List[RemoteSubscription] = []

    def follow(address: str, topic: str) -> None:
        client = clients.get(address)
        if client is None:
            client = clients[address] = Client(address, timeout=max(wait, 0.001), **kw)
            _retry(lambda: _Connection(client), wait, client.max_backoff, stop).close()
        subs.append(client.subscribe(topic, channel, show(topic), max_in_flight, workers=1,
                                     backoff=0))
    followed: set = set()
    try:
        for address in args.nsqd_tcp_address or (
                [] if args.lookupd_http_address else [DEFAULT_TCP_ADDRESS]):
            for topic in topics:
                follow(address, topic)
        while not stop.is_set():
            for lookupd in args.lookupd_http_address:      # servers of the topics join
                for topic in topics:
                    for address in _lookup_producers(lookupd, topic):
                        if (address, topic) not in followed:
                            followed.add((address, topic))
                            follow(address, topic)
            stop.wait(15 if args.lookupd_http_address else 3600)
    finally:
        for sub_ in subs:
            sub_.close()
        for c in clients.values():
            c.close()
    return 0


class _Enough(Exception):
    """tail has shown the -n messages it was asked for."""


_STATS_HEADER = (f"{'topic/channel':<32} {'depth':>8} {'mem':>8} {'disk':>8} {'inflt':>6} "
                 f"{'def':>6} {'req':>8} {'t-o':>6} {'msgs':>10} {'msg/s':>9} {'clients':>7} "
                 f"state")


def _stats_command(args: argparse.Namespace, stop: threading.Event) -> int:
    interval = parse_duration(args.status_every or args.interval)
    _check_range("--interval", interval, 0.01, None)
    timeouts = (parse_duration(args.http_client_connect_timeout),
                parse_duration(args.http_client_request_timeout))
    _check_range("--http-client-connect-timeout", timeouts[0], 0.001, None)
    _check_range("--http-client-request-timeout", timeouts[1], 0.001, None)
    _check_range("--count", args.count, 0, None)
    if args.nsqd_http_address and args.lookupd_http_address:
        raise InvalidArgument("use --nsqd-http-address or --lookupd-http-address not both")
    for address in args.nsqd_http_address + args.lookupd_http_address:
        if address.startswith("http"):
            raise InvalidArgument(f"{address}: the address should not contain a scheme")
    query = {"format": "json", "include_clients": "false", "include_mem": "false"}
    if args.topic:
        query["topic"] = args.topic
    if args.channel:
        query["channel"] = args.channel
    last: Dict[str, Tuple[float, int]] = {}
    reports = 0
    while not stop.is_set():
        rows = _summed_stats(_stats_servers(args, timeouts), query, timeouts)
        now = time.monotonic()
        if reports % 20 == 0:
            print(_STATS_HEADER)
        if not rows:
            print("(no topics)")
        for name, d in rows.items():
            before = last.get(name)
            rate = (f"{(d['message_count'] - before[1]) / (now - before[0]):9.1f}"
                    if before else f"{'-':>9}")
            last[name] = (now, d["message_count"])
            print(f"{name:<32} {d['depth']:>8} {d['depth'] - d['backend_depth']:>8} "
                  f"{d['backend_depth']:>8} {d.get('in_flight_count', ''):>6} "
                  f"{d.get('deferred_count', ''):>6} {d.get('requeue_count', ''):>8} "
                  f"{d.get('timeout_count', ''):>6} {d['message_count']:>10} {rate} "
                  f"{d['clients']:>7} {'paused' if d['paused'] else 'active'}")
        sys.stdout.flush()
        reports += 1
        if args.count and reports >= args.count:
            break
        stop.wait(interval)
    return 0


def _stats_servers(args: argparse.Namespace, timeouts: Tuple[float, float]) -> List[str]:
    """The HTTP addresses to poll: those given, or those the lookupds list
    (for --topic, its producers; otherwise every node)."""
    if not args.lookupd_http_address:
        return args.nsqd_http_address or [DEFAULT_HTTP_ADDRESS]
    found: List[str] = []
    for lookupd in args.lookupd_http_address:
        for address in _lookup_producers(lookupd, args.topic, "http_port", timeouts):
            if address not in found:
                found.append(address)
    return found


_SUMMED_STATS = ("depth", "backend_depth", "in_flight_count", "deferred_count",
                 "requeue_count", "timeout_count", "message_count")


def _summed_stats(servers: List[str], query: Dict[str, str],
                  timeouts: Tuple[float, float]) -> Dict[str, Dict[str, Any]]:
    """One row per topic and per topic/channel, each figure summed over *servers*
    (as nsq_stat and nsqadmin add up a topic's producers)."""
    rows: Dict[str, Dict[str, Any]] = {}

    def add(name: str, d: Dict[str, Any], clients: int) -> None:
        row = rows.setdefault(name, {"clients": 0, "paused": False})
        for key in _SUMMED_STATS:
            if key in d:
                row[key] = row.get(key, 0) + d[key]
        row["clients"] += clients
        row["paused"] = row["paused"] or bool(d.get("paused"))
    for address in servers:
        url = f"http://{address}/stats?{urllib.parse.urlencode(query)}"
        try:
            data = _http_json(url, timeouts)
        except (OSError, ValueError) as e:
            raise ConnectionLost(f"cannot get stats from http://{address}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
        for t in data.get("topics") or []:
            add(t["topic_name"], t, sum(c["client_count"] for c in t["channels"]))
            for c in t["channels"]:
                add(f"{t['topic_name']}/{c['channel_name']}", c, c["client_count"])
    return rows


def _http_json(url: str, timeouts: Tuple[float, float] = (2.0, 10.0)) -> Any:
    """GET *url*'s JSON, with nsq's two HTTP client timeouts (connect, then the
    request); OSError or ValueError if it cannot."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                      timeout=timeouts[0])
    try:
        conn.connect()
        conn.sock.settimeout(timeouts[1])
        conn.request("GET", f"{parts.path or '/'}?{parts.query}",
                     headers={"Accept": _NSQ_ACCEPT})
        reply = conn.getresponse()
        body = reply.read(DEFAULT_MAX_BODY_SIZE)
        if reply.status != 200:
            raise OSError(f"HTTP {reply.status}: {body[:200].decode(errors='replace')}")
        data = json.loads(body)
        return data.get("data", data) if isinstance(data, dict) else data
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP reply: {e!r}") from None
    finally:
        conn.close()


_GO_FLAG = re.compile(r"-[a-z][a-z0-9]*(-[a-z0-9]+)+(=.*)?|-[a-z]{2,}(=.*)?", re.S)


def _go_style_flags(argv: List[str]) -> List[str]:
    """nsqd's and the NSQ tools' single-dash long flags (Go's flag package) as
    argparse's double-dash ones."""
    if not argv or argv[0] not in ("serve", "pub", "tail", "stats", "to-http"):
        return argv
    return [("-" + a if _GO_FLAG.fullmatch(a) else a) for a in argv]


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: ``python minq.py serve|pub|tail|stats``; see ``--help``."""
    installed = os.path.basename(sys.argv[0]) in ("minq", "minq.exe")
    prog, cmd = ("minq", "minq") if installed else ("minq.py", "python minq.py")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"minq: an NSQ-compatible message broker in one file. "
                    f"Start a server with '{cmd} serve'; then publish with "
                    f"'{cmd} pub', read with '{cmd} tail', watch with "
                    f"'{cmd} stats', or use any NSQ client.")
    parser.add_argument("--version", action="version",
                        version=f"minq {VERSION} (nsqd {NSQ_VERSION} protocol)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _tool_parsers(sub, cmd)
    _to_http_parser(sub, cmd)
    args = parser.parse_args(_go_style_flags(list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help()
        return 2
    stop = threading.Event()
    if args.command != "serve":
        logging.basicConfig(level=logging.INFO if args.command == "to-http" else logging.WARNING,
                            format="[minq] %(levelname)s %(message)s")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())    # tail, stats: end cleanly
        try:
            if args.command == "pub":
                return _pub_command(args)
            if args.command == "to-http":
                signal.signal(signal.SIGINT, lambda *_: stop.set())
                return _to_http_command(args, stop)
            return (_tail_command if args.command == "tail" else _stats_command)(args, stop)
        except KeyboardInterrupt:
            return 0
        except (MinqError, OSError, ValueError) as e:
            print(f"minq {args.command}: {e}", file=sys.stderr)
            return 1
    try:
        opts = _serve_options(args)
    except (MinqError, OSError) as e:
        parser.error(str(e))
    level = _LOG_LEVELS.get(str(opts["log_level"]).lower())
    if level is None:
        parser.error(f"--log-level {opts['log_level']!r}: use debug, info, warn, error or fatal")
    logging.basicConfig(level=level, format="[minq] %(asctime)s %(levelname)s %(message)s")
    ignored = opts.pop("ignored_flags", [])
    if ignored:
        log.warning("ignoring nsqd option(s) that change only what nsqd reports or tune its "
                    "internals: %s", ", ".join(ignored))
    hurry = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():          # a second signal: cut the grace short
            log.warning("second signal: persisting and exiting now")
            hurry.set()
        stop.set()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        return serve(opts, stop=stop, hurry=hurry)
    except (MinqError, OSError, ssl.SSLError) as e:
        log.critical("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
