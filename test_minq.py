"""Tests for minq, in sections that mirror minq.py.

Time-dependent behaviour is driven by ``minq.FakeClock``: ``clock.advance(s)``
fires what fell due before it returns, so no test sleeps for a deadline.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from pathlib import Path

import pytest

import minq

HERE = Path(__file__).resolve().parent


# =============================================================================
# Helpers and fixtures
# =============================================================================

@pytest.fixture(autouse=True)
def no_thread_leaks():
    """Every test must join every thread it started (brokers, subscriptions, servers)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.01)
    pytest.fail(f"threads left running: {extra}")


@pytest.fixture
def clock():
    return minq.FakeClock()


@pytest.fixture
def broker(clock):
    b = minq.Broker(clock=clock)
    yield b
    b.close()


def make_broker(clock=None, **options):
    return minq.Broker(clock=clock or minq.FakeClock(), **options)


def drain(consumer, n=None, timeout=0.2):
    """Get messages until *n* (or until none arrives within *timeout*)."""
    out = []
    while n is None or len(out) < n:
        m = consumer.get(timeout=timeout)
        if m is None:
            break
        out.append(m)
    return out


def channel_stats(broker, topic, channel):
    (t,) = broker.stats(topic=topic)["topics"]
    (c,) = [c for c in t["channels"] if c["channel_name"] == channel]
    return c


# =============================================================================
# Errors, names and message validation
# =============================================================================

@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "t/1", "bad#eph", "é", "a\n",
                                  "x" * 56 + "#ephemeral" + "x"])
def test_invalid_topic_names_rejected(broker, name):
    with pytest.raises(minq.InvalidName):
        broker.publish(name, b"x")
    assert broker.stats()["topics"] == []


@pytest.mark.parametrize("name", ["a", "A.b_c-1", "x" * 64, "t#ephemeral",
                                  "x" * 54 + "#ephemeral"])
def test_valid_topic_names_accepted(broker, name):
    broker.publish(name, b"x")
    assert name in broker.topics


def test_invalid_channel_name_rejected(broker):
    with pytest.raises(minq.InvalidName):
        broker.consumer("t", "no way")
    assert broker.topic("t").channels == {}


def test_empty_and_oversize_bodies_rejected_nothing_accepted(clock):
    with make_broker(clock, max_msg_size=10) as b:
        with pytest.raises(minq.InvalidMessage):
            b.publish("t", b"")
        with pytest.raises(minq.InvalidMessage):
            b.publish("t", b"x" * 11)
        with pytest.raises(minq.InvalidMessage):
            b.publish("t", 12345)
        b.publish("t", b"x" * 10)
        with pytest.raises(minq.InvalidMessage):
            b.publish_many("t", [b"ok", b"", b"ok"])
        with pytest.raises(minq.InvalidMessage):
            b.publish_many("t", [b"ok", b"x" * 11])
        assert b.stats()["topics"][0]["message_count"] == 1
        assert b.topic("t").depth == 1


def test_publish_many_over_max_body_size_rejected(clock):
    with make_broker(clock, max_body_size=20) as b:
        with pytest.raises(minq.InvalidMessage):
            b.publish_many("t", [b"x" * 10, b"y" * 11])
        assert b.topic("t").depth == 0


def test_defer_out_of_range_rejected(broker):
    with pytest.raises(minq.InvalidArgument):
        broker.publish("t", b"x", defer=-1)
    with pytest.raises(minq.InvalidArgument):
        broker.publish("t", b"x", defer=3601)


def test_str_body_is_utf8_encoded(broker):
    broker.publish("t", "héllo")
    with broker.consumer("t", "c") as c:
        assert c.get(timeout=1).body == "héllo".encode()


def test_closed_broker_refuses_publish(clock):
    b = make_broker(clock)
    b.close()
    with pytest.raises(minq.BrokerClosed):
        b.publish("t", b"x")


def test_bad_broker_options_rejected():
    with pytest.raises(minq.InvalidArgument):
        minq.Broker(msg_timeout=0)
    with pytest.raises(minq.InvalidArgument):
        minq.Broker(max_attempts=-1)


# =============================================================================
# Message
# =============================================================================

def test_message_ids_are_16_hex_and_unique(broker):
    msgs = broker.publish_many("t", [b"a"] * 1000)
    ids = [m.id for m in msgs]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(rb"[0-9a-f]{16}", i) for i in ids)


def test_timestamp_is_publish_time_in_ns(broker, clock):
    m = broker.publish("t", b"x")
    assert m.timestamp == clock.time_ns()
    clock.advance(5)
    with broker.consumer("t", "c") as c:
        got = c.get(timeout=1)
    assert got.timestamp == m.timestamp


def test_message_encode_decode_roundtrip_matches_nsqd_layout():
    m = minq.Message(b"0123456789abcdef", b"body", 1_700_000_000_000_000_000, 3)
    data = m.encode()
    assert data[:8] == (1_700_000_000_000_000_000).to_bytes(8, "big")
    assert data[8:10] == (3).to_bytes(2, "big")
    assert data[10:26] == b"0123456789abcdef" and data[26:] == b"body"
    back = minq.Message.decode(data)
    assert (back.id, back.body, back.timestamp, back.attempts) == (m.id, m.body, m.timestamp, 3)
    with pytest.raises(minq.InvalidMessage):
        minq.Message.decode(b"short")


# =============================================================================
# Channel: delivery, in-flight, deadlines, requeue, dispatch
# =============================================================================

def test_attempts_start_at_one_and_grow_on_redelivery(broker):
    broker.publish("t", b"x")
    with broker.consumer("t", "c") as c:
        m = c.get(timeout=1)
        assert m.attempts == 1
        m.requeue()
        m2 = c.get(timeout=1)
        assert m2.id == m.id and m2.attempts == 2


def test_load_balance_two_consumers_split_without_loss_or_duplicates(broker):
    c1 = broker.consumer("t", "c", max_in_flight=5)
    c2 = broker.consumer("t", "c", max_in_flight=5)
    try:
        sent = {m.id for m in broker.publish_many("t", [b"%d" % i for i in range(100)])}
        got = collections.Counter()
        per = {1: 0, 2: 0}
        done = False
        while not done:
            done = True
            for k, c in ((1, c1), (2, c2)):
                m = c.get(timeout=0.05)
                if m is not None:
                    done = False
                    got[m.id] += 1
                    per[k] += 1
                    m.finish()
        assert set(got) == sent and max(got.values()) == 1
        assert per[1] >= 30 and per[2] >= 30, per
    finally:
        c1.close()
        c2.close()


def test_fan_out_each_channel_gets_own_copy(broker):
    a = broker.consumer("t", "a")
    b = broker.consumer("t", "b")
    try:
        broker.publish("t", b"hello")
        ma, mb = a.get(timeout=1), b.get(timeout=1)
        assert ma.body == mb.body == b"hello" and ma.id == mb.id
        ma.requeue()
        assert a.get(timeout=1).attempts == 2
        mb.finish()   # b's copy has its own state
        assert channel_stats(broker, "t", "b")["in_flight_count"] == 0
        assert channel_stats(broker, "t", "a")["in_flight_count"] == 1
    finally:
        a.close()
        b.close()


def test_topic_without_channels_keeps_messages_for_first_channel(broker):
    broker.publish_many("t", [b"1", b"2", b"3"])
    assert broker.stats()["topics"][0]["depth"] == 3
    with broker.consumer("t", "late", max_in_flight=10) as c:
        assert [m.body for m in drain(c, 3)] == [b"1", b"2", b"3"]
    assert broker.topic("t").depth == 0


def test_rdy_window_limits_in_flight(broker):
    broker.publish_many("t", [b"x"] * 10)
    with broker.consumer("t", "c", max_in_flight=3) as c:
        got = drain(c, timeout=0.05)
        assert len(got) == 3
        st = channel_stats(broker, "t", "c")
        assert st["in_flight_count"] == 3 and st["depth"] == 7
        got[0].finish()
        more = drain(c, timeout=0.05)
        assert len(more) == 1   # one slot freed, one more delivered
        c.set_max_in_flight(0)
        for m in got[1:] + more:
            m.finish()
        assert drain(c, timeout=0.05) == []      # RDY 0 pauses delivery
        c.set_max_in_flight(10)
        assert len(drain(c, timeout=0.05)) == 6


def test_timeout_requeues_and_counts_attempt(broker, clock):
    broker.publish("t", b"x")
    with broker.consumer("t", "c") as c:
        m = c.get(timeout=1)
        clock.advance(59.9)
        assert c.get(timeout=0.05) is None
        clock.advance(0.2)
        m2 = c.get(timeout=1)
        assert m2.id == m.id and m2.attempts == 2
        assert channel_stats(broker, "t", "c")["timeout_count"] == 1
        with pytest.raises(minq.NotInFlight):
            m.finish()   # the stale handle cannot settle the redelivery
        m2.finish()


def test_per_consumer_msg_timeout(broker, clock):
    broker.publish("t", b"x")
    with broker.consumer("t", "c", msg_timeout=5) as c:
        c.get(timeout=1)
        clock.advance(5.1)
        assert c.get(timeout=1).attempts == 2


def test_touch_extends_deadline_but_not_past_max_msg_timeout(clock):
    with make_broker(clock, msg_timeout=10, max_msg_timeout=25) as b:
        b.publish("t", b"x")
        with b.consumer("t", "c") as c:
            m = c.get(timeout=1)
            clock.advance(8)
            m.touch()               # deadline now 18
            clock.advance(8)        # t=16: would have expired at 10
            assert c.get(timeout=0.05) is None
            m.touch()               # now+10 = 26, capped at delivery + 25
            clock.advance(8.9)      # t=24.9
            assert c.get(timeout=0.05) is None
            clock.advance(0.2)      # t=25.1
            assert c.get(timeout=1).attempts == 2


def test_requeue_with_delay_goes_deferred(broker, clock):
    broker.publish("t", b"x")
    with broker.consumer("t", "c") as c:
        c.get(timeout=1).requeue(delay=30)
        st = channel_stats(broker, "t", "c")
        assert st["deferred_count"] == 1 and st["requeue_count"] == 1 and st["depth"] == 0
        clock.advance(29.9)
        assert c.get(timeout=0.05) is None
        clock.advance(0.2)
        assert c.get(timeout=1).attempts == 2


def test_requeue_delay_clamped_to_max_req_timeout(clock):
    with make_broker(clock, max_req_timeout=10) as b:
        b.publish("t", b"x")
        with b.consumer("t", "c") as c:
            c.get(timeout=1).requeue(delay=99999)
            clock.advance(10.01)
            assert c.get(timeout=1) is not None


def test_deferred_publish_waits_per_channel(broker, clock):
    a = broker.consumer("t", "a")
    b = broker.consumer("t", "b")
    try:
        broker.publish("t", b"later", defer=2.5)
        assert a.get(timeout=0.05) is None and b.get(timeout=0.05) is None
        assert channel_stats(broker, "t", "a")["deferred_count"] == 1
        assert channel_stats(broker, "t", "b")["deferred_count"] == 1
        clock.advance(2.4)
        assert a.get(timeout=0.05) is None
        clock.advance(0.2)
        assert a.get(timeout=1).body == b"later"
        assert b.get(timeout=1).body == b"later"
    finally:
        a.close()
        b.close()


def test_deferred_publish_to_topic_without_channel_starts_at_handoff(broker, clock):
    broker.publish("t", b"later", defer=5)
    clock.advance(10)
    with broker.consumer("t", "c") as c:
        assert c.get(timeout=0.05) is None
        clock.advance(5.1)
        assert c.get(timeout=1).body == b"later"


def test_real_clock_deadline_fires_within_100ms():
    with minq.Broker(msg_timeout=0.05) as b:
        b.publish("t", b"x")
        with b.consumer("t", "c") as c:
            c.get(timeout=1)
            t0 = time.monotonic()
            m = c.get(timeout=2)
            assert m is not None and m.attempts == 2
            assert time.monotonic() - t0 < 0.05 + 0.1


def test_not_in_flight_errors_change_nothing(broker):
    broker.publish("t", b"x")
    with broker.consumer("t", "c") as c:
        m = c.get(timeout=1)
        m.finish()
        for op in (m.finish, m.touch, m.requeue):
            with pytest.raises(minq.NotInFlight):
                op()
        st = channel_stats(broker, "t", "c")
        assert st["requeue_count"] == 0 and st["depth"] == 0
        with pytest.raises(minq.NotInFlight):
            minq.Message(b"0" * 16, b"x", 0).finish()


def test_finish_by_id_checks_owner(broker):
    broker.publish("t", b"x")
    c1 = broker.consumer("t", "c")
    c2 = broker.consumer("t", "c")
    try:
        m = c1.get(timeout=0.2) or c2.get(timeout=0.2)
        owner, other = (c1, c2) if m.consumer is c1 else (c2, c1)
        ch = broker.topic("t").get_channel("c")
        with pytest.raises(minq.NotInFlight):
            ch.finish(other, m.id)
        with pytest.raises(minq.NotInFlight):
            ch.touch(owner, b"ffffffffffffffff")
        ch.finish(owner, m.id)
        assert ch.in_flight_count == 0
    finally:
        c1.close()
        c2.close()


def test_consumer_close_requeues_in_flight_at_once(broker):
    broker.publish_many("t", [b"1", b"2"])
    c1 = broker.consumer("t", "c", max_in_flight=2)
    got = drain(c1, 2)
    assert len(got) == 2
    c1.close()
    assert channel_stats(broker, "t", "c")["in_flight_count"] == 0
    with broker.consumer("t", "c", max_in_flight=2) as c2:
        again = drain(c2, 2)
        assert sorted(m.body for m in again) == [b"1", b"2"]
        assert all(m.attempts == 2 for m in again)


def test_channel_pause_holds_delivery_but_accepts(broker):
    with broker.consumer("t", "c") as c:
        ch = broker.topic("t").get_channel("c")
        ch.pause()
        broker.publish("t", b"x")
        assert c.get(timeout=0.05) is None
        st = channel_stats(broker, "t", "c")
        assert st["depth"] == 1 and st["paused"] is True
        ch.unpause()
        assert c.get(timeout=1).body == b"x"


def test_channel_empty_drops_queued_in_flight_and_deferred(broker):
    with broker.consumer("t", "c") as c:
        broker.publish_many("t", [b"1", b"2"])
        broker.publish("t", b"3", defer=10)
        m = c.get(timeout=1)
        ch = broker.topic("t").get_channel("c")
        ch.empty()
        st = channel_stats(broker, "t", "c")
        assert (st["depth"], st["in_flight_count"], st["deferred_count"]) == (0, 0, 0)
        assert st["clients"][0]["in_flight_count"] == 0
        with pytest.raises(minq.NotInFlight):
            m.finish()
        broker.publish("t", b"after")
        assert c.get(timeout=1).body == b"after"


def test_channel_delete_closes_consumers(broker):
    c = broker.consumer("t", "c")
    broker.publish("t", b"x")
    broker.topic("t").delete_channel("c")
    assert c.closed and c.get(timeout=0.05) is None
    assert broker.topic("t").channels == {}
    with pytest.raises(minq.ChannelNotFound):
        broker.topic("t").delete_channel("c")
    c.close()


def test_ephemeral_channel_vanishes_with_last_consumer(broker):
    c1 = broker.consumer("t", "tmp#ephemeral")
    c2 = broker.consumer("t", "tmp#ephemeral")
    c1.close()
    assert "tmp#ephemeral" in broker.topic("t").channels
    c2.close()
    assert "tmp#ephemeral" not in broker.topic("t").channels


def test_ephemeral_topic_vanishes_with_last_channel(broker):
    c = broker.consumer("e#ephemeral", "tmp#ephemeral")
    assert "e#ephemeral" in broker.topics
    c.close()
    assert "e#ephemeral" not in broker.topics


def test_ephemeral_channel_drops_beyond_mem_queue_size_and_counts(clock):
    with make_broker(clock, mem_queue_size=3) as b:
        with b.consumer("t", "c#ephemeral", max_in_flight=0):
            b.publish_many("t", [b"x"] * 5)
            st = channel_stats(b, "t", "c#ephemeral")
            assert st["depth"] == 3 and st["drop_count"] == 2


def test_memory_only_durable_channel_never_drops(clock):
    with make_broker(clock, mem_queue_size=3) as b:
        b.topic("t").channel("c")
        b.publish_many("t", [b"x"] * 10)
        assert channel_stats(b, "t", "c")["depth"] == 10


def test_dead_letter_after_max_attempts(clock):
    with make_broker(clock, max_attempts=2) as b:
        b.publish("orders", b"poison")
        with b.consumer("orders", "billing") as c:
            c.get(timeout=1).requeue()
            m = c.get(timeout=1)
            assert m.attempts == 2
            m.requeue()                          # third delivery would exceed 2
            assert c.get(timeout=0.05) is None
        st = channel_stats(b, "orders", "billing")
        assert st["dead_count"] == 1 and st["depth"] == 0
        with b.consumer("orders.billing.dead", "ops") as dl:
            assert dl.get(timeout=1).body == b"poison"


def test_dead_letter_on_timeout_and_per_channel_override(clock):
    with make_broker(clock) as b:   # broker unlimited, channel limited to 1
        b.topic("t").channel("c", max_attempts=1, dead_letter_topic="graveyard")
        b.publish("t", b"x")
        with b.consumer("t", "c") as c:
            c.get(timeout=1)
            clock.advance(61)
            assert c.get(timeout=0.05) is None
        assert channel_stats(b, "t", "c")["dead_count"] == 1
        assert b.topic("graveyard").depth == 1


def test_dead_letter_name_truncated_to_64():
    name = minq.dead_letter_name("t" * 60, "c" * 60)
    assert len(name) <= 64 and name.endswith(".dead")
    assert minq.validate_name(name)
    assert name != minq.dead_letter_name("t" * 60, "c" * 59)
    assert minq.dead_letter_name("a#ephemeral", "b#ephemeral") == "a.b.dead"


def test_round_robin_is_fair(broker):
    cs = [broker.consumer("t", "c", max_in_flight=100) for _ in range(3)]
    try:
        broker.publish_many("t", [b"x"] * 30)
        counts = [len(drain(c, timeout=0.05)) for c in cs]
        assert counts == [10, 10, 10]
    finally:
        for c in cs:
            c.close()


def test_weighted_dispatch_follows_weights(broker):
    broker.topic("t").channel("c", dispatch="weighted")
    heavy = broker.consumer("t", "c", max_in_flight=1000, weight=3)
    light = broker.consumer("t", "c", max_in_flight=1000, weight=1)
    try:
        broker.publish_many("t", [b"x"] * 400)
        assert len(drain(heavy, timeout=0.05)) == 300
        assert len(drain(light, timeout=0.05)) == 100
    finally:
        heavy.close()
        light.close()


def test_hash_dispatch_keeps_key_on_same_consumer(broker):
    broker.topic("t").channel("c", dispatch="hash", key=lambda m: m.body.split(b":")[0])
    cs = [broker.consumer("t", "c", max_in_flight=1000) for _ in range(3)]
    try:
        keys = [b"user%d" % i for i in range(30)]
        broker.publish_many("t", [k + b":%d" % j for j in range(5) for k in keys])
        owner = {}
        for i, c in enumerate(cs):
            for m in drain(c, timeout=0.05):
                k = m.body.split(b":")[0]
                assert owner.setdefault(k, i) == i
                m.finish()
        assert len(owner) == 30 and len(set(owner.values())) == 3
        # One consumer leaves: keys of the others keep their consumer.
        cs[0].close()
        broker.publish_many("t", [k + b":x" for k in keys])
        for i, c in enumerate(cs[1:], start=1):
            for m in drain(c, timeout=0.05):
                k = m.body.split(b":")[0]
                if owner[k] != 0:
                    assert owner[k] == i
    finally:
        for c in cs:
            c.close()


def test_hash_dispatch_full_consumer_does_not_block_others(broker):
    broker.topic("t").channel("c", dispatch="hash", key=lambda m: m.body)
    cs = [broker.consumer("t", "c", max_in_flight=1) for _ in range(2)]
    try:
        ring = minq._HashRing(cs)
        k0 = next(b"k%d" % i for i in range(100) if ring.lookup(b"k%d" % i) is cs[0])
        k1 = next(b"k%d" % i for i in range(100) if ring.lookup(b"k%d" % i) is cs[1])
        broker.publish_many("t", [k0, k0, k1])
        assert cs[0].get(timeout=1).body == k0
        assert cs[1].get(timeout=1).body == k1     # passed the blocked k0
    finally:
        for c in cs:
            c.close()


def test_hash_dispatch_needs_key(broker):
    with pytest.raises(minq.InvalidArgument):
        broker.topic("t").channel("c", dispatch="hash")
    with pytest.raises(minq.InvalidArgument):
        broker.topic("t").channel("c", dispatch="random")


# =============================================================================
# Topic: pause, empty, delete
# =============================================================================

def test_topic_pause_keeps_messages_at_topic(broker):
    with broker.consumer("t", "c") as c:
        t = broker.topic("t")
        t.pause()
        broker.publish("t", b"x")
        assert c.get(timeout=0.05) is None
        ts = broker.stats()["topics"][0]
        assert ts["depth"] == 1 and ts["paused"] and ts["channels"][0]["depth"] == 0
        t.unpause()
        assert c.get(timeout=1).body == b"x"


def test_topic_empty_drops_only_topic_queue(broker):
    t = broker.topic("t")
    t.channel("c")
    t.pause()
    broker.publish("t", b"held")
    t.unpause()
    t.pause()
    broker.publish("t", b"held2")
    t.empty()
    assert t.depth == 0
    assert channel_stats(broker, "t", "c")["depth"] == 1


def test_topic_delete_removes_channels_and_closes_consumers(broker):
    c = broker.consumer("t", "c")
    broker.publish("t", b"x")
    broker.delete_topic("t")
    assert "t" not in broker.topics and c.closed
    with pytest.raises(minq.TopicNotFound):
        broker.delete_topic("t")
    broker.publish("t", b"new")          # a fresh topic
    assert broker.topic("t").depth == 1
    c.close()


# =============================================================================
# Broker: stats, stress, close
# =============================================================================

def test_stats_use_nsqd_field_names(broker):
    with broker.consumer("t", "c"):
        broker.publish("t", b"x")
        s = broker.stats()
    assert list(s)[:5] == ["version", "health", "start_time", "topics", "producers"]
    t = s["topics"][0]
    assert list(t)[:8] == ["topic_name", "channels", "depth", "backend_depth", "message_count",
                           "message_bytes", "paused", "e2e_processing_latency"]
    c = t["channels"][0]
    assert list(c)[:12] == ["channel_name", "depth", "backend_depth", "in_flight_count",
                            "deferred_count", "message_count", "requeue_count",
                            "timeout_count", "client_count", "clients", "paused",
                            "e2e_processing_latency"]
    client = c["clients"][0]
    for key in ("client_id", "hostname", "version", "remote_address", "state", "ready_count",
                "in_flight_count", "message_count", "finish_count", "requeue_count",
                "connect_ts", "user_agent"):
        assert key in client
    assert broker.stats(topic="nope")["topics"] is None
    assert broker.stats(include_clients=False)["topics"][0]["channels"][0]["clients"] is None


def test_stress_many_publishers_two_channels_exactly_once(clock):
    n_pub, per_pub = 8, 10_000
    with make_broker(clock) as b:
        seen = {"a": collections.Counter(), "b": collections.Counter()}
        lock = threading.Lock()
        subs = []
        for ch in ("a", "b"):
            for _ in range(3):
                def handler(m, ch=ch):
                    with lock:
                        seen[ch][m.body] += 1
                subs.append(b.subscribe("t", ch, handler, max_in_flight=50, workers=2))

        def publish(k):
            for i in range(per_pub):
                b.publish("t", b"%d-%d" % (k, i))
        pubs = [threading.Thread(target=publish, args=(k,)) for k in range(n_pub)]
        for p in pubs:
            p.start()
        for p in pubs:
            p.join()
        total = n_pub * per_pub
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if sum(seen["a"].values()) >= total and sum(seen["b"].values()) >= total:
                    break
            time.sleep(0.01)
        for s in subs:
            s.close()
        for ch in ("a", "b"):
            assert len(seen[ch]) == total and set(seen[ch].values()) == {1}
        ts = b.stats()["topics"][0]
        assert ts["message_count"] == total
        for cs in ts["channels"]:
            assert cs["message_count"] == total
            assert (cs["depth"], cs["in_flight_count"], cs["requeue_count"],
                    cs["timeout_count"]) == (0, 0, 0, 0)


def test_close_stops_consumers_and_joins_threads(clock):
    b = make_broker(clock)
    c = b.consumer("t", "c")
    s = b.subscribe("t", "d", lambda m: None)
    b.close()
    assert c.closed and s.closed
    assert c.get(timeout=0.01) is None
    b.close()  # idempotent


# =============================================================================
# In-process clients: PullConsumer, Subscription
# =============================================================================

def test_consumer_iteration_ends_when_closed(broker):
    broker.publish_many("t", [b"1", b"2"])
    c = broker.consumer("t", "c", max_in_flight=5)
    got = []
    for m in c:
        got.append(m.body)
        m.finish()
        if len(got) == 2:
            c.close()
    assert got == [b"1", b"2"]


def test_consumer_options_validated(broker):
    with pytest.raises(minq.InvalidArgument):
        broker.consumer("t", "c", max_in_flight=2501)
    with pytest.raises(minq.InvalidArgument):
        broker.consumer("t", "c", msg_timeout=901)


def test_subscribe_handler_success_finishes(broker):
    done = threading.Event()
    bodies = []

    def handler(m):
        bodies.append(m.body)
        if len(bodies) == 3:
            done.set()
    sub = broker.subscribe("t", "c", handler, workers=2)
    broker.publish_many("t", [b"1", b"2", b"3"])
    assert done.wait(5)
    sub.close()
    st = channel_stats(broker, "t", "c")
    assert sorted(bodies) == [b"1", b"2", b"3"] and st["in_flight_count"] == 0
    assert st["requeue_count"] == 0


def test_subscribe_handler_error_requeues_with_backoff(broker, clock, caplog):
    attempts = []
    ok = threading.Event()

    def handler(m):
        attempts.append(m.attempts)
        if m.attempts < 3:
            raise RuntimeError("boom")
        ok.set()
    sub = broker.subscribe("t", "c", handler, workers=1, backoff=2.0)
    with caplog.at_level(logging.ERROR, logger="minq"):
        broker.publish("t", b"x")
        deadline = time.monotonic() + 5
        while len(attempts) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        while channel_stats(broker, "t", "c")["deferred_count"] != 1:
            time.sleep(0.005)
        clock.advance(1.9)
        time.sleep(0.05)
        assert attempts == [1]        # backoff 2 s not yet over
        clock.advance(0.2)             # second attempt after 2 s
        while channel_stats(broker, "t", "c")["deferred_count"] != 1 or len(attempts) < 2:
            time.sleep(0.005)
        clock.advance(4.1)             # third after 4 s
        assert ok.wait(5)
    sub.close()
    assert attempts == [1, 2, 3]
    assert "boom" in caplog.text
    assert channel_stats(broker, "t", "c")["requeue_count"] == 2


def test_subscription_close_requeues_unhandled(broker):
    started = threading.Event()
    release = threading.Event()

    def handler(m):
        started.set()
        release.wait(5)
    sub = broker.subscribe("t", "c", handler, max_in_flight=5, workers=1)
    broker.publish_many("t", [b"x"] * 5)
    assert started.wait(5)
    closer = threading.Thread(target=sub.close)
    closer.start()
    release.set()
    closer.join(5)
    st = channel_stats(broker, "t", "c")
    assert st["in_flight_count"] == 0 and st["depth"] == 4 and st["client_count"] == 0


# =============================================================================
# Docs: every code example in README.md runs
# =============================================================================

def readme_python_blocks():
    text = (HERE / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = readme_python_blocks()[index]
    exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
