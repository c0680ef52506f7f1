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
import heapq
import itertools
import logging
import math
import os
import platform
import queue
import re
import struct
import threading
import time
import zlib
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = [
    # errors
    "MinqError", "InvalidName", "InvalidMessage", "InvalidArgument", "NotInFlight",
    "PublishFailed", "TopicNotFound", "ChannelNotFound", "BrokerClosed",
    # core
    "Message", "Channel", "Topic", "Broker", "Consumer",
    "SystemClock", "FakeClock",
    # in-process clients
    "PullConsumer", "Subscription",
    # constants
    "VERSION", "NSQ_VERSION", "DISPATCH_POLICIES",
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

    __slots__ = ("id", "body", "timestamp", "attempts")

    def __init__(self, id: bytes, body: bytes, timestamp: int, attempts: int = 0) -> None:
        self.id = id
        self.body = body
        self.timestamp = timestamp
        self.attempts = attempts

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
# Channel
#
# Owns message state for one consumer group: the ready queue, the in-flight
# table with its deadline heap, the deferred heap, the consumers and how a
# message picks one of them.  One lock per channel guards all of it; user
# code and consumer delivery callbacks always run after it is released.
# =============================================================================

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
        self._queue: Deque[Message] = collections.deque()
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
        self.drop_count = 0
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

    # -- putting messages in (called by the topic, under the topic's lock) -----
    def _put(self, msgs: List[Message], defer: float, out: Deliveries) -> None:
        """Accept messages from the topic; deliveries to make are appended to *out*."""
        with self._lock:
            if self.deleted:
                return
            self.message_count += len(msgs)
            if defer > 0:
                due = self.broker.clock.monotonic() + defer
                for m in msgs:
                    self._defer_locked(m, due)
                return
            if self.ephemeral:
                self._enqueue_locked(msgs)
            else:
                self._queue.extend(msgs)
            if self._consumers and not self.paused:
                self._dispatch_locked(out)

    def _enqueue_locked(self, msgs: List[Message]) -> None:
        q = self._queue
        if self.ephemeral:
            room = self.broker.mem_queue_size - len(q)
            if room < len(msgs):
                dropped = len(msgs) - max(room, 0)
                self.drop_count += dropped
                log.warning("ephemeral channel %s/%s is full: dropped %d message(s)",
                            self.topic.name, self.name, dropped)
                msgs = msgs[:max(room, 0)]
        q.extend(msgs)

    def _defer_locked(self, msg: Message, due: float) -> None:
        self._deferred[msg.id] = msg
        heapq.heappush(self._deferred_heap, (due, msg.id))
        self.broker._schedule(due)

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
            if not self._queue:
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
        if delay > 0:
            self._defer_locked(stored, self.broker.clock.monotonic() + delay)
        else:
            self._enqueue_locked([stored])

    def _timeout_for(self, consumer: Consumer) -> float:
        return consumer.msg_timeout or self.broker.msg_timeout

    # -- dispatch --------------------------------------------------------------
    def _dispatch_locked(self, out: Deliveries) -> Deliveries:
        """Move queued messages into flight for ready consumers (lock held)."""
        if self.paused or not self._consumers or not self._queue:
            return out
        q = self._queue
        now = self._monotonic()
        if self.dispatch == "hash":
            self._dispatch_hash_locked(now, out)
            return out
        pick = self._pick_weighted if self.dispatch == "weighted" else self._pick_round_robin
        start = self._start_flight_locked
        while q:
            c = pick()
            if c is None:
                break
            out.append((c, start(q.popleft(), c, now)))
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

    def _dispatch_hash_locked(self, now: float, out: Deliveries) -> None:
        # A key always maps to the same live consumer.  If that consumer is
        # full, its messages wait; others' messages behind them may pass
        # (within HASH_LOOKAHEAD), so per-key order is kept.
        if self._ring is None:
            self._ring = _HashRing([c for c in self._consumers if not c.closed])
        q = self._queue
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
        for c, h in deliveries:
            try:
                c._deliver(h)
            except Exception:
                log.exception("consumer %s failed to take message %s", c.client_id,
                              h.id.decode())
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
                self._enqueue_locked(due)
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
        self._queue.clear()
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
            self._empty_locked()
            consumers, self._consumers = self._consumers, []
            for c in consumers:
                c.closed = True
        return consumers

    def stats(self, include_clients: bool = True) -> Dict[str, Any]:
        """nsqd's channel object for /stats (plus minq's dead_count/drop_count)."""
        with self._lock:
            clients = [c.client_stats() for c in self._consumers] if include_clients else None
            return {
                "channel_name": self.name,
                "depth": len(self._queue),
                "backend_depth": 0,
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
                "drop_count": self.drop_count,
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

    def __init__(self, broker: "Broker", name: str) -> None:
        self.broker = broker
        self.name = name
        self.ephemeral = is_ephemeral(name)
        # _lock guards the fields below.  Order: a topic's lock may be held
        # while taking one of its channels' locks, never the reverse.
        self._lock = threading.Lock()
        self._channels: Dict[str, Channel] = {}
        self._held: Deque[Message] = collections.deque()          # waiting for a channel
        self._held_deferred: List[Tuple[float, Message]] = []     # (defer seconds, message)
        self.paused = False
        self.deleted = False
        self.message_count = 0
        self.message_bytes = 0
        self.drop_count = 0

    def __repr__(self) -> str:
        return f"<Topic {self.name} channels={list(self._channels)}>"

    @property
    def depth(self) -> int:
        return len(self._held) + len(self._held_deferred)

    @property
    def channels(self) -> Dict[str, Channel]:
        """A snapshot of the topic's channels by name."""
        with self._lock:
            return dict(self._channels)

    # -- publishing ------------------------------------------------------------
    def _put(self, msgs: List[Message], defer: float) -> bool:
        """Accept messages (all or none); False if the topic was deleted meanwhile."""
        deliveries: Deliveries = []
        with self._lock:
            if self.deleted:
                return False
            self.message_count += len(msgs)
            self.message_bytes += sum(len(m.body) for m in msgs)
            if self.paused or not self._channels:
                self._hold_locked(msgs, defer)
            else:
                self._fan_out_locked(msgs, defer, deliveries)
        if deliveries:
            _hand_over_all(deliveries)
        return True

    def _hold_locked(self, msgs: List[Message], defer: float) -> None:
        if defer > 0:
            self._held_deferred.extend((defer, m) for m in msgs)
            return
        if self.ephemeral:
            room = max(self.broker.mem_queue_size - len(self._held), 0)
            if room < len(msgs):
                self.drop_count += len(msgs) - room
                log.warning("ephemeral topic %s is full: dropped %d message(s)",
                            self.name, len(msgs) - room)
                msgs = msgs[:room]
        self._held.extend(msgs)

    def _fan_out_locked(self, msgs: List[Message], defer: float, out: Deliveries) -> None:
        first = True
        for ch in self._channels.values():
            if first:
                ch._put(msgs, defer, out)
                first = False
            else:
                ch._put([Message(m.id, m.body, m.timestamp) for m in msgs], defer, out)

    def _release_held_locked(self, out: Deliveries) -> None:
        """Hand held messages to the channels (when the first appears or on unpause)."""
        if self.paused or not self._channels:
            return
        held, self._held = list(self._held), collections.deque()
        if held:
            self._fan_out_locked(held, 0.0, out)
        deferred, self._held_deferred = self._held_deferred, []
        for defer, m in deferred:
            self._fan_out_locked([m], defer, out)

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
            self._held.clear()
            self._held_deferred.clear()

    def delete(self) -> None:
        """Delete the topic, all its channels and their messages."""
        self.broker.delete_topic(self.name)

    def _close(self) -> List[Channel]:
        with self._lock:
            self.deleted = True
            chans = list(self._channels.values())
            self._channels.clear()
            self._held.clear()
            self._held_deferred.clear()
        for ch in chans:
            for c in ch._close():
                c._on_channel_closed()
        return chans

    def stats(self, channel: Optional[str] = None,
              include_clients: bool = True) -> Dict[str, Any]:
        """nsqd's topic object for /stats."""
        chans = self.channels
        if channel is not None:
            chans = {k: v for k, v in chans.items() if k == channel}
        with self._lock:
            depth = len(self._held) + len(self._held_deferred)
            top = {
                "topic_name": self.name,
                "channels": [],
                "depth": depth,
                "backend_depth": 0,
                "message_count": self.message_count,
                "message_bytes": self.message_bytes,
                "paused": self.paused,
                "e2e_processing_latency": {"count": 0, "percentiles": None},
                "drop_count": self.drop_count,
            }
        top["channels"] = [chans[k].stats(include_clients) for k in sorted(chans)]
        return top


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
    ``max_req_timeout``, ``max_rdy_count``; plus ``max_attempts`` (0 =
    unlimited; beyond it messages go to a dead-letter topic) and ``clock``.
    """

    def __init__(self, *, mem_queue_size: int = DEFAULT_MEM_QUEUE_SIZE,
                 msg_timeout: float = DEFAULT_MSG_TIMEOUT,
                 max_msg_timeout: float = DEFAULT_MAX_MSG_TIMEOUT,
                 max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
                 max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                 max_req_timeout: float = DEFAULT_MAX_REQ_TIMEOUT,
                 max_rdy_count: int = DEFAULT_MAX_RDY_COUNT,
                 max_attempts: int = 0,
                 clock: Any = None) -> None:
        _check_range("mem_queue_size", mem_queue_size, 0, None)
        _check_range("msg_timeout", msg_timeout, 0.001, None)
        _check_range("max_msg_timeout", max_msg_timeout, msg_timeout, None)
        _check_range("max_msg_size", max_msg_size, 1, None)
        _check_range("max_body_size", max_body_size, 1, None)
        _check_range("max_req_timeout", max_req_timeout, 0, None)
        _check_range("max_rdy_count", max_rdy_count, 1, None)
        _check_range("max_attempts", max_attempts, 0, 65535)
        self.mem_queue_size = mem_queue_size
        self.msg_timeout = float(msg_timeout)
        self.max_msg_timeout = float(max_msg_timeout)
        self.max_msg_size = max_msg_size
        self.max_body_size = max_body_size
        self.max_req_timeout = float(max_req_timeout)
        self.max_rdy_count = max_rdy_count
        self.max_attempts = max_attempts
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
        # _timer_cond guards _next_due.  Channels call _schedule while holding
        # their own lock (channel lock -> timer lock); the timer thread never
        # takes a channel lock while holding it.
        self._timer_cond = threading.Condition(threading.Lock())
        self._next_due = math.inf
        if hasattr(self.clock, "add_listener"):
            self.clock.add_listener(self._on_clock_advance)
        self._timer = threading.Thread(target=self._timer_loop, name="minq-timer")
        self._timer.start()

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
        t = self._topics.get(topic)
        if self._closed or t is None or not t._put([msg], defer):
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
            self._check_open()
            if self.topic(topic)._put(msgs, defer):
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

    # -- persistence hook (the disk issue fills this in) -----------------------
    def _metadata_changed(self) -> None:
        pass

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
            "health": "OK",
            "start_time": self.start_time,
            "topics": tstats if (topic is None or tstats) else None,
            "producers": None,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosed("the broker is closed")

    def close(self) -> None:
        """Stop consumers and subscriptions, stop the timer thread and join it."""
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
        if hasattr(self.clock, "remove_listener"):
            self.clock.remove_listener(self._on_clock_advance)


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
