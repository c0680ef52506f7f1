"""Tests for minq, in sections that mirror minq.py.

Time-dependent behaviour is driven by ``minq.FakeClock``: ``clock.advance(s)``
fires what fell due before it returns, so no test sleeps for a deadline.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
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
# Segment log
# =============================================================================

def test_segment_log_rolls_segments_and_deletes_consumed_ones(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", max_bytes_per_file=1000)
    payloads = [b"record-%03d" % i + b"x" * 80 for i in range(50)]
    for p in payloads:
        lg.append([p])
    segs = sorted(tmp_path.glob("q.*.seg"))
    assert len(segs) >= 5 and lg.depth == 50
    got = [lg.read()[1] for _ in range(25)]
    assert got == payloads[:25]
    assert len(sorted(tmp_path.glob("q.*.seg"))) < len(segs)     # consumed ones deleted
    lg.close()
    lg = minq.SegmentLog(str(tmp_path), "q", max_bytes_per_file=1000)
    assert lg.depth == 25
    rest = []
    while (rec := lg.read()) is not None:
        rest.append(rec[1])
    assert rest == payloads[25:]
    lg.close()


def test_segment_log_salvages_records_written_after_last_sync(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q")
    lg.append([b"a", b"b"])
    lg.sync()
    lg.append([b"c"])
    # Simulate a crash: no close, no sync; reopen from what is on disk.
    lg2 = minq.SegmentLog(str(tmp_path), "q")
    assert [lg2.read()[1] for _ in range(3)] == [b"a", b"b", b"c"]
    assert lg2.read() is None
    lg2.close()
    os.close(lg._write_fd)


def test_torn_tail_is_cut_silently(tmp_path, caplog):
    lg = minq.SegmentLog(str(tmp_path), "q")
    lg.append([b"one", b"two"])
    lg.close()
    seg = next(tmp_path.glob("q.*.seg"))
    with open(seg, "ab") as f:
        f.write(struct.pack(">II", 100, 12345) + b"partial")   # a crash mid-write
    lg = minq.SegmentLog(str(tmp_path), "q")
    assert [lg.read()[1] for _ in range(2)] == [b"one", b"two"]
    assert lg.read() is None and lg.corrupt_count == 0
    lg.append([b"three"])
    assert lg.read()[1] == b"three"
    lg.close()


def test_crc_mismatch_mid_segment_skips_record_and_keeps_copy(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q")
    positions = lg.append([b"rec%d" % i for i in range(10)])
    lg.close()
    seg = next(tmp_path.glob("q.*.seg"))
    data = bytearray(seg.read_bytes())
    off = (positions[4] & ((1 << 40) - 1)) + 8   # first payload byte of record 4
    data[off] ^= 0xFF
    seg.write_bytes(bytes(data))
    lg = minq.SegmentLog(str(tmp_path), "q")
    got = []
    while (rec := lg.read()) is not None:
        got.append(rec[1])
    assert got == [b"rec%d" % i for i in range(10) if i != 4]
    assert lg.corrupt_count == 1
    assert list(tmp_path.glob("q.*.seg.bad"))
    lg.close()


def test_ack_mode_rereads_unacked_after_reopen(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    n = 2 * minq.ACK_BUFFER + 1
    pos = lg.append([b"r%d" % i for i in range(n)])
    assert [lg.read()[1] for _ in range(n)] == [b"r%d" % i for i in range(n)]
    for i in range(n):
        if i != 1:
            lg.ack(pos[i])       # out of order; two full batches reach the file
    lg2 = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)   # crash: no sync
    assert lg2.depth == 1
    assert lg2.read()[1] == b"r1" and lg2.read() is None
    lg2.close()
    os.close(lg._write_fd)


def test_ack_mode_sync_writes_buffered_acks(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    pos = lg.append([b"a", b"b"])
    lg.read()
    lg.read()
    lg.ack(pos[1])
    lg.sync()                    # a sync writes acks still in the buffer
    lg2 = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    assert lg2.read()[1] == b"a" and lg2.read() is None
    lg2.close()
    os.close(lg._write_fd)


def test_power_loss_short_segment_never_reuses_acked_positions(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    pos = lg.append([b"a", b"b", b"c"])
    for _ in range(3):
        lg.read()
    lg.ack(pos[1])
    lg.ack(pos[2])
    lg.close()                                   # metadata says all three are written
    seg = next(tmp_path.glob("q.*.seg"))
    with open(seg, "r+b") as f:                  # ...but only "a" reached the disk
        f.truncate(pos[1] & ((1 << 40) - 1))
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    lg.append([b"d", b"e"])
    got = []
    while (rec := lg.read()) is not None:
        got.append(rec[1])
    assert got == [b"a", b"d", b"e"]             # the old acks hide nothing new
    lg.close()


# =============================================================================
# Storage: overflow, restart, durable mode, faults
# =============================================================================

def disk_broker(path, clock=None, **options):
    return minq.Broker(data_path=str(path), clock=clock or minq.FakeClock(), **options)


def test_overflow_keeps_fifo_order_and_counts(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=5) as b:
        b.topic("t").channel("c")
        for i in range(20):
            b.publish("t", b"%d" % i)
        st = channel_stats(b, "t", "c")
        assert (st["depth"], st["backend_depth"]) == (20, 15)
        with b.consumer("t", "c", max_in_flight=100) as c:
            got = drain(c, 20)
            for m in got:
                m.finish()
        assert [m.body for m in got] == [b"%d" % i for i in range(20)]
        st = channel_stats(b, "t", "c")
        assert (st["depth"], st["backend_depth"]) == (0, 0)


def test_mem_queue_size_zero_sends_everything_through_disk(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        b.topic("t").channel("c")
        b.publish_many("t", [b"a", b"b"])
        st = channel_stats(b, "t", "c")
        assert st["depth"] == st["backend_depth"] == 2
        assert b.stats()["storage"]["bytes_written"] > 0


def test_topic_without_channel_overflows_to_disk(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=2) as b:
        b.publish_many("t", [b"a", b"b", b"c"])
        ts = b.stats()["topics"][0]
        assert ts["depth"] == 3 and ts["backend_depth"] == 3
        with b.consumer("t", "c", max_in_flight=10) as c:
            assert [m.body for m in drain(c, 3)] == [b"a", b"b", b"c"]


@pytest.mark.parametrize("durable", [False, True])
def test_clean_restart_restores_queued_in_flight_and_deferred(tmp_path, durable):
    clock = minq.FakeClock()
    b = disk_broker(tmp_path, clock, mem_queue_size=3, durable=durable)
    b.topic("t").channel("c")
    b.publish_many("t", [b"q%d" % i for i in range(6)])
    b.publish("t", b"later", defer=60)
    c = b.consumer("t", "c", max_in_flight=1)
    m = c.get(timeout=1)
    assert m.body == b"q0" and m.attempts == 1
    c.get(timeout=0.01)
    clock.advance(20)                        # 40 s of deferral left
    b.close()
    clock2 = minq.FakeClock(wall_ns=clock.time_ns())
    b = disk_broker(tmp_path, clock2, mem_queue_size=3, durable=durable)
    try:
        with b.consumer("t", "c", max_in_flight=100) as c:
            got = {m.body: m.attempts for m in drain(c, timeout=0.1)}
            assert got == {b"q0": 2, **{b"q%d" % i: 1 for i in range(1, 6)}}
            assert channel_stats(b, "t", "c")["deferred_count"] == 1
            clock2.advance(39.9)
            assert c.get(timeout=0.05) is None
            clock2.advance(0.2)
            assert c.get(timeout=1).body == b"later"
    finally:
        b.close()


def test_restart_keeps_topics_channels_and_paused_flags(tmp_path):
    with disk_broker(tmp_path) as b:
        b.topic("t").channel("c").pause()
        b.topic("u").pause()
        b.topic("e#ephemeral").channel("x")
    meta = json.loads((tmp_path / "minq.dat").read_text())
    assert [t["name"] for t in meta["topics"]] == ["t", "u"]
    with disk_broker(tmp_path) as b:
        assert set(b.topics) == {"t", "u"}
        assert b.topic("t").get_channel("c").paused and b.topic("u").paused


def test_ephemeral_topics_and_channels_never_touch_disk(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=2) as b:
        b.topic("t").channel("c#ephemeral")
        b.publish_many("t", [b"x"] * 5)
        b.publish_many("e#ephemeral", [b"x"] * 5)
        files = [p.name for p in tmp_path.iterdir()]
        assert not any("ephemeral" in f for f in files), files
        assert channel_stats(b, "t", "c#ephemeral")["drop_count"] == 3


def test_second_broker_on_same_data_path_fails_at_once(tmp_path):
    b = disk_broker(tmp_path)
    try:
        with pytest.raises(minq.DataPathInUse, match="in use"):
            disk_broker(tmp_path)
    finally:
        b.close()
    disk_broker(tmp_path).close()     # free again once the first is closed


def test_deleted_channel_and_topic_remove_their_files(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        b.topic("t").channel("c")
        b.publish("t", b"x")
        b.topic("t").delete_channel("c")
        assert not list(tmp_path.glob("t:c.*"))
        b.delete_topic("t")
        assert not list(tmp_path.glob("t.*"))


def _failing_pwrite(monkeypatch, fail_when):
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fail_when():
            real(fd, bytes(data)[:len(data) // 2], offset)    # a partial write first
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)


def test_write_error_fails_publish_whole_and_recovers(tmp_path, monkeypatch, caplog):
    failing = [False]
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        b.topic("t").channel("a")
        b.topic("t").channel("b")
        b.publish("t", b"before")
        _failing_pwrite(monkeypatch, lambda: failing[0])
        failing[0] = True
        with pytest.raises(minq.PublishFailed, match="No space"):
            b.publish_many("t", [b"lost1", b"lost2"])
        assert b.stats()["health"].startswith("NOK")
        for ch in ("a", "b"):
            assert channel_stats(b, "t", ch)["depth"] == 1
        failing[0] = False
        b.publish("t", b"after")
        assert b.stats()["health"] == "OK"
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        for ch in ("a", "b"):
            with b.consumer("t", ch, max_in_flight=10) as c:
                assert [m.body for m in drain(c)] == [b"before", b"after"]


def test_failure_on_second_channel_undoes_first(tmp_path, monkeypatch):
    calls = [0]
    with disk_broker(tmp_path, mem_queue_size=0, durable=True) as b:
        b.topic("t").channel("a")
        b.topic("t").channel("b")

        def second_call():
            calls[0] += 1
            return calls[0] == 2
        _failing_pwrite(monkeypatch, second_call)
        with pytest.raises(minq.PublishFailed):
            b.publish("t", b"x")
        monkeypatch.undo()
        assert channel_stats(b, "t", "a")["depth"] == 0
        assert channel_stats(b, "t", "b")["depth"] == 0
        b.publish("t", b"y")
    with disk_broker(tmp_path, durable=True) as b:
        with b.consumer("t", "a", max_in_flight=10) as c:
            assert [m.body for m in drain(c)] == [b"y"]


def test_fsync_mode_concurrent_publishers_share_fsyncs(tmp_path):
    n_threads, per = 8, 50
    with disk_broker(tmp_path, durable=True, fsync=True) as b:
        b.topic("t").channel("c")
        start = threading.Barrier(n_threads)

        def publish():
            start.wait()
            for _ in range(per):
                b.publish("t", b"x")
        ts = [threading.Thread(target=publish) for _ in range(n_threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        fsyncs = b.stats()["storage"]["fsync_count"]
        assert channel_stats(b, "t", "c")["depth"] == n_threads * per
    # Every publish returned after an fsync covering it; group commit shares them.
    assert 0 < fsyncs < n_threads * per


# -- subprocess tests: real crashes, a real file size limit, measured RSS -----

def run_child(code, timeout=60, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(HERE)}, **kw)


def test_file_size_limit_fails_publish_and_keeps_accepted(tmp_path):
    code = f"""
        import resource, signal, minq
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        b = minq.Broker(data_path={str(tmp_path)!r}, mem_queue_size=0, durable=True)
        b.topic("t").channel("c")
        n = 0
        try:
            for i in range(100000):
                b.publish("t", b"%06d" % i + b"x" * 200)
                n += 1
        except minq.PublishFailed as e:
            print("FAILED", n, e)
        b.publish  # still alive
        b.close()
    """
    r = run_child(code)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[0] == "FAILED"
    accepted = int(words[1])
    assert 100 < accepted < 1000
    with disk_broker(tmp_path, durable=True) as b:
        with b.consumer("t", "c", max_in_flight=2000) as c:
            got = [m.body[:6] for m in drain(c, timeout=0.2)]
    assert got == [b"%06d" % i for i in range(accepted)]


CRASH_CHILD = r"""
    import sys, threading, minq
    b = minq.Broker(data_path=sys.argv[1], durable=True, fsync=sys.argv[2] == "1",
                    mem_queue_size=50)
    cycle = sys.argv[3]
    out = sys.stdout
    lock = threading.Lock()

    def consume():
        c = b.consumer("t", "c", max_in_flight=20)
        while True:
            m = c.get()
            if m is None:
                return
            with lock:
                out.write("P " + m.body.decode() + "\n"); out.flush()
            m.finish()
            with lock:
                out.write("F " + m.body.decode() + "\n"); out.flush()
    with lock:
        out.write("READY\n"); out.flush()
    threading.Thread(target=consume).start()
    i = 0
    while True:
        body = "%s-%d" % (cycle, i)
        b.publish("t", body.encode())
        with lock:
            out.write("A " + body + "\n"); out.flush()
        i += 1
"""


def crash_cycles(tmp_path, fsync, cycles):
    """Run and SIGKILL a durable publisher+consumer *cycles* times; return its events.

    Events, in order: ("A", n) publish of n returned; ("P", n) n delivered and
    about to be finished; ("F", n) its finish returned; then ("R", n) for what
    a final broker on the same folder still delivers.
    """
    rng = random.Random(1234 + fsync)
    events = []
    for cycle in range(cycles):
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CRASH_CHILD),
                              str(tmp_path), "1" if fsync else "0", str(cycle)],
                             cwd=HERE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(HERE)})
        assert p.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0.05, 0.3))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        for line in out.splitlines():
            kind, _, val = line.partition(" ")
            if kind in ("A", "P", "F") and re.fullmatch(r"\d+-\d+", val):  # skip a torn line
                events.append((kind, val))
    with disk_broker(tmp_path, durable=True) as b:
        with b.consumer("t", "c", max_in_flight=1000) as c:
            while (m := c.get(timeout=0.5)) is not None:
                events.append(("R", m.body.decode()))
                m.finish()
    return events


@pytest.mark.parametrize("fsync", [False, True], ids=["durable", "fsync"])
def test_kill9_loses_no_acknowledged_message(tmp_path, fsync):
    cycles = int(os.environ.get("MINQ_CRASH_CYCLES", "10"))
    events = crash_cycles(tmp_path, fsync, cycles)
    acked = {n for k, n in events if k == "A"}
    delivered = {n for k, n in events if k in ("P", "R")}
    assert len(acked) > 100
    assert acked <= delivered, f"lost: {sorted(acked - delivered)[:10]}"
    # A finish that returned is recorded, in batches: a crash may lose at most
    # ACK_BUFFER of them per channel, and only those cause redelivery.
    confirmed, duplicates = set(), []
    for kind, n in events:
        if kind == "F":
            confirmed.add(n)
        elif kind in ("P", "R") and n in confirmed:
            duplicates.append(n)
    assert len(duplicates) <= minq.ACK_BUFFER * cycles


def test_memory_stays_bounded_while_overflowing(tmp_path):
    code = f"""
        import minq, resource
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        b = minq.Broker(data_path={str(tmp_path)!r}, mem_queue_size=1000)
        b.topic("t").channel("c")
        batch = [b"x" * 100] * 1000
        b.publish_many("t", batch)
        start = rss()
        for _ in range(400):
            b.publish_many("t", batch)
        grown = rss() - start
        print(grown, b.stats()["topics"][0]["channels"][0]["depth"])
        b.close()
    """
    r = run_child(code, timeout=120)
    assert r.returncode == 0, r.stderr
    grown, depth = map(int, r.stdout.split())
    assert depth == 401_000
    assert grown < 20 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB"


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


def test_deferred_publish_to_topic_without_channel_counts_from_publish(broker, clock):
    # Unlike nsqd (whose timer starts at hand-off), a deferral counts from publish,
    # so a due time means the same before and after a channel appears or a restart.
    broker.publish("t", b"later", defer=5)
    clock.advance(3)
    with broker.consumer("t", "c") as c:
        assert c.get(timeout=0.05) is None
        assert channel_stats(broker, "t", "c")["deferred_count"] == 1
        clock.advance(2.1)
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
