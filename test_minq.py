"""Tests for minq, in sections that mirror minq.py.

Time-dependent behaviour is driven by ``minq.FakeClock``: ``clock.advance(s)``
fires what fell due before it returns, so no test sleeps for a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
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


def drain_finishing(consumer, n, timeout=2.0):
    """The bodies of up to *n* messages, each finished as it arrives."""
    out = []
    while len(out) < n:
        m = consumer.get(timeout=timeout)
        if m is None:
            break
        out.append(m.body)
        m.finish()
    return out


def wait_until(predicate, timeout=10.0, what="the condition"):
    """Poll *predicate* until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


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
    with pytest.raises(minq.InvalidArgument, match="max_msg_size"):
        minq.Broker(max_msg_size=2**31)        # more than a log record can frame


def test_not_found_errors_print_without_quotes(broker):
    with pytest.raises(minq.TopicNotFound) as e:
        broker.get_topic("missing")
    assert str(e.value) == "topic 'missing' does not exist"
    assert isinstance(e.value, KeyError)


# =============================================================================
# Message
# =============================================================================

def test_message_ids_are_16_hex_and_unique(broker):
    msgs = broker.publish_many("t", [b"a"] * 1000)
    ids = [m.id for m in msgs]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(rb"[0-9a-f]{16}", i) for i in ids)


def test_ids_stay_unique_across_single_and_batch_publishes_from_threads(broker):
    ids, lock = [], threading.Lock()

    def publish(k):
        mine = []
        for i in range(300):
            if i % 3:
                mine.append(broker.publish("t", b"x").id)
            else:
                mine += [m.id for m in broker.publish_many("t", [b"y"] * 7)]
        with lock:
            ids.extend(mine)
    threads = [threading.Thread(target=publish, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 4 * (200 + 100 * 7) == len(set(ids))
    assert all(re.fullmatch(rb"[0-9a-f]{16}", i) for i in ids)


def test_publish_bodies_counts_and_delivers_like_publish_many(broker):
    assert broker.publish_bodies("t", [b"a", b"bb", "c"]) == 3     # a str is UTF-8
    with pytest.raises(minq.InvalidMessage):
        broker.publish_bodies("t", [b"ok", b""])                  # all or nothing
    with broker.consumer("t", "c", max_in_flight=10) as c:
        got = drain(c, 10, timeout=0.05)
    assert [(m.body, m.attempts) for m in got] == [(b"a", 1), (b"bb", 1), (b"c", 1)]
    assert len({m.id for m in got}) == 3


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


@pytest.mark.parametrize("seed", range(6))
def test_text_mpub_lines_split_like_nsqd(seed):
    rnd = random.Random(seed)
    size = rnd.choice([1, 3, 40])
    lines = [bytes([97 + rnd.randrange(26)]) * (size if seed % 2 else rnd.randrange(0, 50))
             for _ in range(rnd.randrange(1000, 4000))]
    body = b"\n".join(lines) + (b"\n" if rnd.random() < 0.5 else b"")
    got = minq._split_lines(body, 1 << 20)
    assert list(got) == [line for line in lines if line]
    assert minq._nbytes(got) == sum(map(len, lines))
    if len(body) >= 4096:           # big bodies cost no bytes object per line
        assert isinstance(got, (minq._BodyRun, minq._BodySpans))
    with pytest.raises(minq.InvalidMessage):
        minq._split_lines(body + b"\n" + b"x" * 60, 59)


@pytest.mark.parametrize("seed", range(6))
def test_binary_mpub_split_checks_every_size(seed):
    rnd = random.Random(seed)
    bodies = [rnd.randbytes(rnd.choice([7, rnd.randrange(1, 300)])) for _ in range(500)]
    if seed % 2:
        bodies = [b"s" * 9] * 500                      # one size: a _BodyRun
    payload = struct.pack(">l", len(bodies)) + b"".join(
        struct.pack(">l", len(b)) + b for b in bodies)
    got = minq._split_mpub(payload, 1 << 20, 5 << 20)
    assert list(got) == bodies
    assert list(minq._body_slice(got, 10, 20)) == bodies[10:20]
    for bad, code in [(payload[:3], "BAD_BODY"), (struct.pack(">l", 0), "BAD_BODY"),
                      (struct.pack(">l", 10**8), "BAD_BODY"), (payload[:-1], "BAD_MESSAGE"),
                      (struct.pack(">ll", 1, 0), "BAD_MESSAGE"),
                      (struct.pack(">ll", 1, -5) + b"x", "BAD_MESSAGE"),
                      (struct.pack(">ll", 1, 2 << 20) + b"x", "BAD_MESSAGE")]:
        with pytest.raises(minq._BadMPUB) as e:
            minq._split_mpub(bad, 1 << 20, 5 << 20)
        assert e.value.code == code


def test_a_big_batch_taken_in_parts_keeps_ids_and_order(broker):
    bodies = minq._split_lines(b"abc\n" * 5000, 100)
    broker.publish_bodies("t", bodies)
    got = []
    with broker.consumer("t", "c", max_in_flight=1000) as c:   # taken 1000 at a time
        while len(got) < 5000 and (m := c.get(timeout=2)) is not None:
            got.append((m.body, int(m.id, 16)))
            m.finish()
    assert [body for body, _ in got] == [b"abc"] * 5000
    assert [i for _, i in got] == list(range(got[0][1], got[0][1] + 5000))


# =============================================================================
# Segment log
# =============================================================================

def file_bytes(path):
    """A file's bytes; b"" if it was never made (logs make files when needed)."""
    return path.read_bytes() if path.exists() else b""


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


@pytest.mark.parametrize("window", [0, 4096, 256 * 1024], ids=["pwrite", "small-window", "window"])
def test_single_record_appends_interleave_with_batches_across_windows_and_segments(
        tmp_path, window, monkeypatch):
    # append_record (a publish's lean path) and the general appends share one
    # write position, through window changes and segment rolls.
    monkeypatch.setattr(minq, "_MAP_FROM", 0)          # windows from the first byte
    lg = minq.SegmentLog(str(tmp_path), "q", max_bytes_per_file=8000)
    lg.map_window = window
    want, positions = [], []
    for i in range(600):
        if i % 7 == 0:
            batch = [b"batch-%04d-%d" % (i, k) * 3 for k in range(3)]
            positions += lg.append(batch)
            want += batch
        else:
            p = b"single-%04d" % i * (1 + i % 13)
            start, end = lg.append_record(p)
            assert end - start == len(p) + 8          # one record: 8 bytes of framing
            positions.append(start)
            want.append(p)
    assert len(sorted(tmp_path.glob("q.*.seg"))) > 5 and lg.depth == len(want)
    got = []
    while (rec := lg.read()) is not None:
        got.append(rec)
    assert [p for _, p in got] == want and [pos for pos, _ in got] == positions
    lg.close()


def test_single_records_and_big_batches_from_two_threads_never_overlap(tmp_path):
    # A big batch is written without the log's state lock (pwrite), and rolls
    # fsync with it released: single records meanwhile must wait their turn.
    lg = minq.SegmentLog(str(tmp_path), "q", max_bytes_per_file=256 * 1024)
    big = [b"B" * 3000] * 8                       # 24 KB a batch: past the mapped path
    start = threading.Barrier(2)

    def batches():
        start.wait()
        for _ in range(30):
            lg.append(big)
    t = threading.Thread(target=batches)
    t.start()
    start.wait()
    singles = 0
    while t.is_alive() or singles < 2000:
        lg.append_record(b"s%06d" % singles)
        singles += 1
    t.join()
    got = collections.Counter()
    while (rec := lg.read()) is not None:
        got[rec[1][:1]] += 1
        assert rec[1] == b"B" * 3000 or rec[1] == b"s%06d" % int(rec[1][1:])
    assert got == {b"B": 240, b"s": singles} and lg.corrupt_count == 0
    lg.close()


def test_single_records_appended_as_consumed_are_read_again_only_unacked(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    lg.append([b"unread"])                       # the cursor is behind it
    held = [lg.append_record(b"held-%d" % i, consume=True)[0] for i in range(3)]
    assert lg.read()[1] == b"unread" and lg.read() is None   # the consumed ones: skipped
    lg.ack(held[1])
    lg.sync()
    lg.close()
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)  # after a restart: the unacked
    got = []
    while (rec := lg.read()) is not None:
        got.append(rec[1])
    assert got == [b"unread", b"held-0", b"held-2"]
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
    lg._writer.release()


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


def test_a_quiet_log_writes_without_reserving_or_mapping(tmp_path):
    # Thousands of quiet topics: their few records go through pwrite, no
    # space is reserved and no mapping (nor its descriptor) is held.
    lg = minq.SegmentLog(str(tmp_path), "q")
    lg.append_record(b"one")
    lg.append([b"two", b"three"])
    seg = next(tmp_path.glob("q.*.seg"))
    assert seg.stat().st_size == 3 * 8 + 11 and lg._writer.map is None
    lg.append([b"x" * 1000] * 70)                # past the first 64 KiB (one pwrite) ...
    lg.append_record(b"small")                   # ... small records go through a window
    assert lg._writer.map is not None or not minq._MAP_OK
    lg.close()


def test_mapped_window_reserves_space_and_is_trimmed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(minq.SegmentLog, "map_window", 8192)
    monkeypatch.setattr(minq, "_MAP_FROM", 0)
    lg = minq.SegmentLog(str(tmp_path), "q")
    # Small records cross many windows; ones over half a window take pwrite.
    payloads = [b"%04d" % i + b"s" * (50 + 37 * (i % 40)) for i in range(300)]
    payloads[7] = payloads[150] = b"B" * 6000
    got = []
    for i, p in enumerate(payloads):
        lg.append([p])
        if i % 3 == 0:                      # the reader keeps pace: what it reads
            got.append(lg.read()[1])        # ahead must not be the reserved zeros
    seg = next(tmp_path.glob("q.*.seg"))
    written = sum(len(p) + 8 for p in payloads)
    assert seg.stat().st_size > written     # space reserved past the records
    # A crash (no close): the reserved zeros are not a torn tail.
    caplog.set_level(logging.WARNING)
    lg2 = minq.SegmentLog(str(tmp_path), "q")
    rest = []
    while (rec := lg2.read()) is not None:
        rest.append(rec[1])
    assert got + rest[-(300 - len(got)):] == payloads
    assert lg2.corrupt_count == 0 and "torn" not in caplog.text
    lg2.append([b"tail"])                   # reserves a new window
    assert seg.stat().st_size > written + 12
    lg2.close()
    assert seg.stat().st_size == written + 12    # a clean close trims the reserve
    lg._writer.release()


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
    lg._writer.release()


@pytest.mark.parametrize("save_meta", [True, False], ids=["full", "data-only"])
def test_ack_mode_sync_writes_buffered_acks(tmp_path, save_meta):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    pos = lg.append([b"a", b"b"])
    lg.read()
    lg.read()
    lg.ack(pos[1])
    lg.sync(save_meta)           # a sync writes acks still in the buffer
    lg2 = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    assert lg2.read()[1] == b"a" and lg2.read() is None
    lg2.close()
    lg._writer.release()


def test_depth_after_crash_ignores_segments_consumed_since_the_last_sync(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True, max_bytes_per_file=1000)
    pos = [lg.append([b"r%03d" % i + b"x" * 96])[0] for i in range(200)]
    for _ in range(200):
        lg.read()
    for p in pos[:192]:                # three full batches of acks reach the file
        lg.ack(p)
    assert len(list(tmp_path.glob("q.*.seg"))) < 5     # consumed segments deleted
    lg2 = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)     # a crash: no sync
    assert lg2.depth == 8
    got = []
    while (rec := lg2.read()) is not None:
        got.append(rec[1][:4])
    assert got == [b"r%03d" % i for i in range(192, 200)] and lg2.depth == 0
    lg2.close()
    lg._writer.release()


def test_ack_file_is_appended_and_compacted_only_when_mostly_dead(tmp_path, monkeypatch):
    monkeypatch.setattr(minq, "_ACKS_SLACK", 100)
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    acks = tmp_path / "q.acks"
    stuck = lg.append([b"stuck"])[0]           # never acked: holds the commit point
    lg.read()
    assert not acks.exists()                   # made by the first ack written
    inode, sizes = None, []
    for round_ in range(3):
        pos = lg.append([b"r%d-%d" % (round_, i) for i in range(40)])
        for _ in pos:
            lg.read()
        for p in pos:
            lg.ack(p)
        lg.sync()                              # appends the acks: no rewrite
        inode = inode or acks.stat().st_ino
        sizes.append(acks.stat().st_size)
    assert acks.stat().st_ino == inode and sizes == [40 * 8, 80 * 8, 120 * 8]
    lg2 = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)     # a crash
    assert lg2.depth == 1
    assert lg2.read() == (stuck, b"stuck") and lg2.read() is None
    lg2.close()
    lg.ack(stuck)                              # now every entry is dead
    lg.sync()
    assert acks.stat().st_ino != inode and acks.stat().st_size == 0
    lg.close()


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


def test_power_loss_gap_in_reserved_space_never_hides_new_records(tmp_path, caplog):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    lg.append([b"a", b"b"])
    lg.sync()
    meta = json.loads((tmp_path / "q.meta").read_text())
    pos = lg.append([b"c", b"d"])
    lg._writer.release()
    # Power loss after a metadata save that counted c and d, before any fsync
    # covered them: the reserved space reads as zeros where they were.
    meta.update(write=pos[1] + 9, depth=4)
    (tmp_path / "q.meta").write_text(json.dumps(meta))
    seg = next(tmp_path.glob("q.*.seg"))
    data = bytearray(seg.read_bytes())
    start = pos[0] & ((1 << 40) - 1)
    data[start:start + 18] = bytes(18)
    seg.write_bytes(bytes(data))
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    lg.append([b"e"])                        # accepted after the restart
    got = []
    while (rec := lg.read()) is not None:
        got.append(rec[1])
    assert got == [b"a", b"b", b"e"] and lg.corrupt_count == 0
    assert "shorter" in caplog.text          # the loss is logged
    lg.close()


def _superseded_log(path, **options):
    """A log holding a, b, c (read, unacknowledged), then b2 and c2 written to
    replace b and c: (the log, where the supersede's bytes start and end)."""
    path.mkdir(exist_ok=True)
    lg = minq.SegmentLog(str(path), "q", ack_mode=True, **options)
    pos = lg.append([b"a", b"b", b"c"])
    assert lg.read_many(3)[0] == [b"a", b"b", b"c"]
    lg.sync()
    start = lg.write_pos
    assert len(lg.supersede([b"b2", b"c2"], pos[1:], consume=True)) == 2
    return lg, start & ((1 << 40) - 1), lg.write_pos & ((1 << 40) - 1)


def _all_records(lg):
    got = []
    while (rec := lg.read()) is not None:
        got.append(rec[1])
    return got


@pytest.mark.parametrize("max_record_size", [1 << 20, 8], ids=["one-write", "a-write-each"])
def test_supersede_torn_anywhere_leaves_one_copy_of_each_record(tmp_path, max_record_size):
    # A crash at any byte of the write (marker, then the new records) finds
    # either the old record or its replacement, never both, never neither.
    lg, start, end = _superseded_log(tmp_path / "live", max_record_size=max_record_size)
    lg._writer.release()                        # a crash: no sync, no close
    seg = next((tmp_path / "live").glob("q.*.seg"))
    for cut in range(start, end + 1):
        d = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "live", d)
        with open(d / seg.name, "r+b") as f:
            f.truncate(cut)
        lg2 = minq.SegmentLog(str(d), "q", ack_mode=True, max_record_size=max_record_size)
        got = _all_records(lg2)
        assert sorted(got) in ([b"a", b"b", b"c"], [b"a", b"b2", b"c"],
                               [b"a", b"b2", b"c2"]), (cut, got)
        assert lg2.depth == 0 and (cut < end or got == [b"a", b"b2", b"c2"])
        lg2.close()


def test_superseded_records_are_acknowledged_only_once_an_fsync_covers_the_new(tmp_path):
    lg, _, _ = _superseded_log(tmp_path)
    acks = tmp_path / "q.acks"
    lg.acks.flush()
    assert file_bytes(acks) == b""             # power loss now keeps b and c
    assert lg.superseding and lg.read() is None   # the marker is no record
    lg.sync(save_meta=False)
    assert len(file_bytes(acks)) == 16 and not lg.superseding
    lg2 = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)      # a crash
    assert sorted(_all_records(lg2)) == [b"a", b"b2", b"c2"] and lg2.depth == 0
    lg2.close()
    lg._writer.release()


def test_a_supersede_written_during_a_sync_waits_for_the_next_one(tmp_path, monkeypatch):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    pos = lg.append([b"a"])
    lg.read()
    real = os.fsync

    def fsync(fd):                  # the sync's fsync runs; a rewrite comes meanwhile
        monkeypatch.setattr(os, "fsync", real)
        lg.supersede([b"a2"], pos, consume=True)
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    lg.sync(save_meta=False)
    assert file_bytes(tmp_path / "q.acks") == b"" and lg.superseding
    lg.sync(save_meta=False)
    assert file_bytes(tmp_path / "q.acks") == struct.pack(">Q", pos[0])
    lg.close()


def test_supersede_of_unread_records_counts_and_reads_each_once(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    pos = lg.append([b"a", b"b"])
    assert lg.read_many(2)[0] == [b"a", b"b"]
    lg.supersede([b"a2", b"new"], [pos[0], minq._NO_POS], consume=False)
    assert lg.depth == 2
    assert _all_records(lg) == [b"a2", b"new"]
    lg.close()
    lg = minq.SegmentLog(str(tmp_path), "q", ack_mode=True)
    assert lg.depth == 3 and sorted(_all_records(lg)) == [b"a2", b"b", b"new"]
    lg.close()


def _records_of(lg, limit=10**9):
    payloads, _ = lg.read_many(limit)
    return payloads


def test_read_many_stops_a_run_at_a_bad_crc_and_goes_on_after_it(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q")
    payloads = [b"%05d" % i + b"x" * 95 for i in range(300)]     # one length: read as runs
    positions = lg.append(payloads)
    lg.close()
    seg = next(tmp_path.glob("q.*.seg"))
    data = bytearray(seg.read_bytes())
    data[(positions[150] & ((1 << 40) - 1)) + 20] ^= 0xFF        # a payload byte of record 150
    seg.write_bytes(bytes(data))
    lg = minq.SegmentLog(str(tmp_path), "q")
    assert _records_of(lg) == payloads[:150] + payloads[151:]
    assert lg.corrupt_count == 1 and lg.depth == 0
    lg.close()


def test_read_many_hands_a_bad_length_mid_run_to_the_damage_path(tmp_path):
    lg = minq.SegmentLog(str(tmp_path), "q", max_bytes_per_file=40 * 1024)
    payloads = [b"%05d" % i + b"y" * 95 for i in range(600)]
    positions = lg.append(payloads[:300])                         # segment 0
    lg.append(payloads[300:])                                      # a batch never spans: segment 1
    lg.close()
    first = sorted(tmp_path.glob("q.*.seg"))[0]
    data = bytearray(first.read_bytes())
    off = positions[100] & ((1 << 40) - 1)
    data[off:off + 4] = struct.pack(">I", 7)                       # a length that lies
    first.write_bytes(bytes(data))
    lg = minq.SegmentLog(str(tmp_path), "q", max_bytes_per_file=40 * 1024)
    got = _records_of(lg)
    assert got[:100] == payloads[:100]                             # the run up to it
    assert got[-300:] == payloads[300:]                            # the next segment whole
    assert lg.corrupt_count >= 1
    lg.close()


def test_read_many_returns_records_of_any_lengths_in_order(tmp_path):
    rnd = random.Random(7)
    lg = minq.SegmentLog(str(tmp_path), "q")
    payloads = []
    for _ in range(40):                     # runs of one length, and mixed lengths
        size = rnd.choice([1, 37, 100, 4000])
        batch = [bytes([65 + len(payloads) % 26]) * size
                 for _ in range(rnd.choice([1, 3, 16, 50]))]
        if rnd.random() < 0.3:
            batch = [b"z" * rnd.randrange(1, 300) for _ in range(20)]
        payloads += batch
        lg.append(batch)
    got = []
    while True:
        chunk = _records_of(lg, rnd.randrange(1, 200))
        if not chunk:
            break
        got += chunk
    assert got == payloads and lg.depth == 0
    lg.close()


@pytest.mark.parametrize("ack_mode", [False, True])
def test_framed_records_move_between_logs_unchanged(tmp_path, ack_mode):
    src = minq.SegmentLog(str(tmp_path), "src", ack_mode=ack_mode)
    dst = minq.SegmentLog(str(tmp_path), "dst", ack_mode=ack_mode)
    payloads = [b"m%04d" % i + b"q" * 120 for i in range(2000)]
    src.append(payloads)
    moved = 0
    while (framed := src.peek_framed(16 * 1024)) is not None:
        data, positions, end = framed
        assert src.depth == 2000 - moved            # a peek moves nothing
        dst.append_framed(data, len(positions))
        src.consume_framed(positions, end)
        moved += len(positions)
        assert src.depth + dst.depth == 2000
    assert moved == 2000 and src.read() is None
    assert _records_of(dst) == payloads
    src.close()
    dst.close()


def test_framed_moves_in_ack_mode_survive_a_crash(tmp_path):
    src = minq.SegmentLog(str(tmp_path), "src", ack_mode=True)
    src.append([b"r%04d" % i for i in range(1000)])
    src.sync()
    data, positions, end = src.peek_framed(4096)
    src.consume_framed(positions, end)              # moved elsewhere: acknowledged
    # A crash (no close): what was moved is not read again, the rest is.
    again = minq.SegmentLog(str(tmp_path), "src", ack_mode=True)
    rest = _records_of(again)
    assert rest == [b"r%04d" % i for i in range(len(positions), 1000)]
    again.close()
    src._writer.release()


@pytest.mark.parametrize("damage, lost", [("huge length", 1), ("small length", 1),
                                          ("three records zeroed", 3)])
def test_damaged_length_resyncs_at_the_next_good_record(tmp_path, damage, lost, caplog):
    lg = minq.SegmentLog(str(tmp_path), "q")
    positions = lg.append([b"rec%03d" % i + b"x" * 30 for i in range(200)])
    lg.close()
    seg = next(tmp_path.glob("q.*.seg"))
    data = bytearray(seg.read_bytes())
    off = positions[50] & ((1 << 40) - 1)
    if damage == "huge length":
        data[off:off + 4] = struct.pack(">I", 0x7FFFFFFF)
    elif damage == "small length":                  # plausible, wrong: the CRC fails
        data[off:off + 4] = struct.pack(">I", 5)
    else:
        end = positions[53] & ((1 << 40) - 1)
        data[off:end] = bytes(end - off)
    seg.write_bytes(bytes(data))
    lg = minq.SegmentLog(str(tmp_path), "q")
    got = []
    while (rec := lg.read()) is not None:
        got.append(rec[1][:6])
    assert got == [b"rec%03d" % i for i in range(200) if not 50 <= i < 50 + lost]
    assert lg.corrupt_count == lost                  # counted exactly
    assert lg.depth == 0                             # a drain ends
    assert "skipped to the next good record" in caplog.text
    lg.close()


# =============================================================================
# Storage: overflow, restart, durable mode, faults
# =============================================================================

def disk_broker(path, clock=None, **options):
    return minq.Broker(data_path=str(path), clock=clock or minq.FakeClock(), **options)


def test_logs_sync_every_sync_timeout_of_the_broker_clock(tmp_path):
    clock = minq.FakeClock()
    with disk_broker(tmp_path, clock, mem_queue_size=0, sync_timeout=60) as b:
        b.topic("t").channel("c")
        b.publish("t", b"on disk")
        meta = tmp_path / "t:c.meta"

        def saved_depth():           # no file yet: nothing saved
            return json.loads(meta.read_text())["depth"] if meta.exists() else 0
        fsyncs = b.stats()["storage"]["fsync_count"]
        clock.advance(59)
        time.sleep(0.05)                   # a sync would have started by now
        assert b.stats()["storage"]["fsync_count"] == fsyncs and saved_depth() == 0
        clock.advance(1)                   # a minute on the clock, none in real time
        wait_until(lambda: saved_depth() == 1, timeout=5, what="the periodic sync")
        assert b.stats()["storage"]["fsync_count"] > fsyncs


def test_logs_sync_after_sync_every_operations(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=0, sync_every=10, sync_timeout=3600) as b:
        b.topic("t").channel("c")
        fsyncs = b.stats()["storage"]["fsync_count"]
        b.publish_many("t", [b"%d" % i for i in range(9)])
        time.sleep(0.05)
        assert b.stats()["storage"]["fsync_count"] == fsyncs
        b.publish("t", b"tenth")           # the clock never moves: the count alone
        wait_until(lambda: b.stats()["storage"]["fsync_count"] > fsyncs, timeout=5,
                   what="a sync after sync_every operations")


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


def _failing_disk(monkeypatch, fail_when):
    """A full disk while fail_when(): reserving space (posix_fallocate) fails,
    and a pwrite writes half its data, then fails."""
    real_pwrite, real_fallocate = os.pwrite, os.posix_fallocate

    def pwrite(fd, data, offset):
        if fail_when():
            real_pwrite(fd, bytes(data)[:len(data) // 2], offset)    # a partial write first
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    def fallocate(fd, offset, length):
        if fail_when():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fallocate(fd, offset, length)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)


def test_write_error_fails_publish_whole_and_recovers(tmp_path, monkeypatch, caplog):
    # Records go through pwrite here (no mapped window); a full disk met while
    # reserving a window has its own test below.
    monkeypatch.setattr(minq.SegmentLog, "map_window", 0)
    failing = [False]
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        b.topic("t").channel("a")
        b.topic("t").channel("b")
        b.publish("t", b"before")
        _failing_disk(monkeypatch, lambda: failing[0])
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


def test_full_disk_while_reserving_a_window_fails_publish_and_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr(minq.SegmentLog, "map_window", 8192)
    monkeypatch.setattr(minq, "_MAP_FROM", 0)
    full = [False]
    accepted = []
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        b.topic("t").channel("a")
        b.topic("t").channel("b")
        for i in range(20):
            accepted.append(b.publish("t", b"%03d" % i + b"x" * 997).body)
        _failing_disk(monkeypatch, lambda: full[0])
        full[0] = True
        # Space already reserved still takes records; the next window fails.
        with pytest.raises(minq.PublishFailed, match="No space"):
            for i in range(20, 40):
                accepted.append(b.publish("t", b"%03d" % i + b"x" * 997).body)
        assert len(accepted) < 20 + 8
        with pytest.raises(minq.PublishFailed):
            b.publish_many("t", [b"lost1", b"lost2"])
        full[0] = False
        accepted.append(b.publish("t", b"after").body)
        for ch in ("a", "b"):
            assert channel_stats(b, "t", ch)["depth"] == len(accepted)
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        for ch in ("a", "b"):
            with b.consumer("t", ch, max_in_flight=100) as c:
                assert [m.body for m in drain(c)] == accepted


def test_failed_big_write_beside_a_mapped_window_is_cut_safely(tmp_path):
    # A big record takes pwrite while the window stays mapped; when that
    # pwrite fails half-way, the cut must not leave mapped pages past the end
    # of the file (the next small record would die of SIGBUS): a subprocess.
    code = f"""
        import errno, os, minq
        minq._MAP_FROM = 0                  # small records mapped from the first byte
        real = os.pwrite
        def failing(fd, data, offset):
            real(fd, bytes(data)[:len(data) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        b = minq.Broker(data_path={str(tmp_path)!r}, mem_queue_size=0)
        b.topic("t").channel("c")
        b.publish("t", b"small-1")
        os.pwrite = failing
        try:
            b.publish("t", b"B" * 20000)
        except minq.PublishFailed:
            print("FAILED")
        os.pwrite = real
        b.publish("t", b"small-2")
        b.close()
    """
    r = run_child(code)
    assert r.returncode == 0 and r.stdout.split() == ["FAILED"], (r.returncode, r.stderr)
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        with b.consumer("t", "c", max_in_flight=10) as c:
            assert [m.body for m in drain(c)] == [b"small-1", b"small-2"]


def test_failure_on_second_channel_undoes_first(tmp_path, monkeypatch):
    calls = [0]
    with disk_broker(tmp_path, mem_queue_size=0, durable=True) as b:
        b.topic("t").channel("a")
        b.topic("t").channel("b")

        def from_second_call():          # channel a's write succeeds, b's fails
            calls[0] += 1
            return calls[0] >= 2
        _failing_disk(monkeypatch, from_second_call)
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


def test_fsync_failure_fails_every_waiting_publisher_and_recovers(tmp_path, monkeypatch):
    n_threads = 8
    with disk_broker(tmp_path, durable=True, fsync=True) as b:
        b.topic("t").channel("c")
        real_fsync, started = os.fsync, threading.Event()

        def failing_fsync(fd):
            started.set()
            time.sleep(0.005)        # long enough for followers to queue behind it
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(os, "fsync", failing_fsync)
        outcomes = []

        def publish():
            try:
                b.publish("t", b"x")
                outcomes.append("ok")
            except minq.PublishFailed as e:
                outcomes.append(str(e))
        ts = [threading.Thread(target=publish) for _ in range(n_threads)]
        for th in ts:
            th.start()
        for th in ts:
            th.join(timeout=10)
        assert not any(th.is_alive() for th in ts)       # no follower left waiting
        assert len(outcomes) == n_threads
        assert all("Input/output error" in o for o in outcomes), outcomes
        monkeypatch.setattr(os, "fsync", real_fsync)
        b.publish("t", b"y")                               # recovers by itself
        assert b.stats()["health"] == "OK"


# -- subprocess tests: real crashes, a real file size limit, measured RSS -----

def run_child(code, *args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          cwd=HERE, capture_output=True, text=True, timeout=timeout,
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


def test_long_deferred_message_does_not_hold_back_finished_ones(tmp_path):
    # One message deferred for an hour; thousands published and finished
    # after it.  Its record is rewritten at the tail, so theirs are released.
    code = f"""
        import os, minq
        minq._UNPIN_ACKS = 500
        b = minq.Broker(data_path={str(tmp_path)!r}, durable=True,
                        max_bytes_per_file=64 * 1024)
        b.topic("t").channel("c")
        b.publish("t", b"later", defer=3600)
        c = b.consumer("t", "c", max_in_flight=100)
        for i in range(50):
            b.publish_many("t", [b"%04d" % (i * 100 + j) for j in range(100)])
            for _ in range(100):
                c.get(timeout=5).finish()
        log = b.topic("t").get_channel("c")._queue.log
        log.sync()         # the last rewrite's old records are released by a sync
        segs = len([f for f in os.listdir({str(tmp_path)!r}) if f.startswith("t:c.")
                    and f.endswith(".seg")])
        print(segs, log.acks.behind, flush=True)
        os._exit(0)        # a crash: no close, nothing persisted on the way out
    """
    r = run_child(code)
    assert r.returncode == 0, r.stderr
    segs, behind = map(int, r.stdout.split())
    # 5000 records fill 11 segments.  Finishes since the last rewrite stay
    # behind its copy: up to 500, and those made while its release waited
    # for the sync that fsyncs it.
    assert segs <= 3 and behind < 2500
    clock = minq.FakeClock(wall_ns=time.time_ns())
    with disk_broker(tmp_path, clock, durable=True) as b:
        with b.consumer("t", "c", max_in_flight=100) as c:
            again = drain(c, timeout=0.2)
            assert len(again) <= minq.ACK_BUFFER       # finishes not yet written
            for m in again:
                m.finish()
            assert channel_stats(b, "t", "c")["deferred_count"] == 1
            clock.advance(3599)
            assert c.get(timeout=0.05) is None
            clock.advance(2)
            assert c.get(timeout=1).body == b"later"


def test_held_records_are_rewritten_only_once_twice_as_many_acks_wait(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(minq, "_UNPIN_ACKS", 64)
    caplog.set_level(logging.INFO, logger="minq")
    with disk_broker(tmp_path, durable=True) as b:
        b.topic("t").channel("c")
        b.publish_many("t", [b"later"] * 300, defer=3600)
        with b.consumer("t", "c", max_in_flight=10) as c:
            def finish(n):
                b.publish_many("t", [b"x"] * n)
                for _ in range(n):
                    c.get(timeout=1).finish()
            finish(64 * 9)              # 576 acks wait: fewer than 2 x 300 held
            assert "rewrote" not in caplog.text
            finish(64)                  # 640: now it is worth it
            assert "rewrote 300 " in caplog.text
        assert channel_stats(b, "t", "c")["deferred_count"] == 300


CRASH_CHILD = r"""
    import random, sys, threading, minq
    minq._UNPIN_ACKS = 64        # held records are rewritten many times per life
    path, fsync, life, close_at = sys.argv[1], sys.argv[2] == "1", sys.argv[3], float(sys.argv[4])
    b = minq.Broker(data_path=path, durable=True, fsync=fsync, mem_queue_size=50,
                    max_bytes_per_file=64 * 1024, msg_timeout=120)
    b.topic("t").channel("c")
    b.topic("t").channel("d")             # read only by the final drain
    lock, closing = threading.Lock(), threading.Event()

    def say(*words):
        with lock:
            sys.stdout.write(" ".join(words) + "\n")
            sys.stdout.flush()

    def publish(kind):
        rng, i = random.Random(kind), 0
        try:
            while True:
                if kind == "m":
                    bodies = ["%s-m%d" % (life, i + k) for k in range(5)]
                    b.publish_many("t", [s.encode() for s in bodies])
                else:
                    bodies = ["%s-%s%d" % (life, kind, i)]
                    b.publish("t", bodies[0].encode(),
                              defer=rng.uniform(0.2, 2.0) if kind == "d" else 0)
                i += len(bodies)
                say("A", *bodies)
                if kind == "d":
                    threading.Event().wait(0.01)
        except minq.BrokerClosed:
            pass

    def consume():
        rng, held = random.Random(life), []
        c = b.consumer("t", "c", max_in_flight=20)
        for m in c:
            body = m.body.decode()
            say("P", body)
            r = rng.random()
            try:
                if r < 0.03:
                    m.requeue(rng.uniform(0.1, 1.5))
                    say("Q", body)
                elif r < 0.05 and len(held) < 10:
                    held.append(m)        # in flight until the crash
                else:
                    m.finish()            # NotInFlight here fails the test
                    say("F", body)
            except minq.MinqError:
                if not closing.is_set():
                    raise

    threads = [threading.Thread(target=publish, args=(k,)) for k in "pmd"]
    threads.append(threading.Thread(target=consume))
    for t in threads:
        t.start()
    if close_at:                          # a clean stop, killed on its way
        threading.Event().wait(close_at)
        closing.set()
        b.close()
        say("CLOSED")
"""


def crash_lives(path, fsync, lives, seed):
    """Lives of a durable broker (publishers, DPUB, a consumer that finishes,
    requeues and holds) on one folder, each SIGKILLed at a random moment: a
    quarter while it starts, some while close() persists.  Returns events
    (life, kind, body): A publish returned, P delivered, Q requeued, F finish
    returned; then R (channel c) and D (channel d) from a final drain."""
    rng = random.Random(seed)
    events = []
    for life in range(lives):
        close_at = rng.uniform(0.3, 1.0) if rng.random() < 0.25 else 0.0
        kill_at = (close_at + rng.uniform(0, 0.05) if close_at
                   else rng.uniform(0, 0.3) if rng.random() < 0.25 else rng.uniform(0.3, 1.5))
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CRASH_CHILD), str(path),
                              "1" if fsync else "0", str(life), str(close_at)],
                             cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
        time.sleep(kill_at)
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        assert "Traceback" not in err, err
        for line in out.splitlines():
            kind, *words = line.split(" ")
            if kind in ("A", "P", "Q", "F") and words and all(
                    re.fullmatch(r"\d+-[pmd]\d+", w) for w in words):   # not a torn line
                events += [(life, kind, w) for w in words]
    with disk_broker(path, minq.FakeClock(wall_ns=time.time_ns() + 10**10), durable=True) as b:
        for channel, kind in (("c", "R"), ("d", "D")):
            with b.consumer("t", channel, max_in_flight=1000) as c:
                while (m := c.get(timeout=0.3)) is not None:
                    events.append((lives, kind, m.body.decode()))
                    m.finish()
    return events


def unexplained_repeats(events, window=minq.ACK_BUFFER):
    """Deliveries of channel c the durable guarantee does not allow: a second
    delivery in one life with no requeue between, or one after a restart of a
    message whose finish returned before the crash, unless that finish was
    among the last *window* of its life (acks are written in batches)."""
    finished = {}                      # body -> (life, its finishes after that one)
    fins = collections.Counter(life for life, kind, _ in events if kind == "F")
    out = []
    live, life_of = collections.Counter(), None
    for life, kind, body in events:
        if life != life_of:
            live, life_of = collections.Counter(), life
        if kind == "Q":
            live[body] -= 1
        elif kind == "F":
            fins[life] -= 1
            finished[body] = (life, fins[life])
        elif kind in ("P", "R"):
            live[body] += 1
            if live[body] > 1:
                out.append((life, body, "delivered again in the same life"))
            elif body in finished:
                when, later = finished.pop(body)
                if later >= window:
                    out.append((life, body, f"finished in life {when}, {later} finishes "
                                            f"before its crash"))
    return out


@pytest.mark.parametrize("fsync", [False, True], ids=["durable", "fsync"])
def test_kill9_loses_nothing_and_repeats_only_what_the_guarantee_allows(tmp_path, fsync):
    lives = int(os.environ.get("MINQ_CRASH_CYCLES", "8"))
    events = crash_lives(tmp_path, fsync, lives, seed=fsync)
    acked = {body for _, kind, body in events if kind == "A"}
    assert len(acked) > 1000
    lost = acked - {body for _, kind, body in events if kind in ("P", "R")}
    assert not lost, f"lost on channel c: {sorted(lost)[:10]}"
    assert not unexplained_repeats(events)[:10]
    on_d = collections.Counter(body for _, kind, body in events if kind == "D")
    assert acked <= set(on_d), f"lost on channel d: {sorted(acked - set(on_d))[:10]}"
    assert [b for b, n in on_d.items() if n > 1][:10] == []


HAND_OVER_CRASH_CHILD = r"""
    import os, signal, sys, threading, minq
    chunks = [0]
    real = minq.Topic._pump

    def pump(topic):          # a SIGKILL after a few chunks moved in the background
        chunks[0] += bool(topic._channels)
        if chunks[0] == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(topic)
    minq.Topic._pump = pump
    minq.Topic.PUMP_BYTES = 16 * 1024      # many small chunks
    b = minq.Broker(data_path=sys.argv[1], durable=True, mem_queue_size=100)
    b.topic("t").channel("c")
    threading.Event().wait(30)   # the pump kills the process meanwhile
    os._exit(3)
"""


@pytest.mark.parametrize("chunks", [1, 4, 9])
def test_kill9_mid_hand_over_loses_nothing_and_repeats_at_most_a_chunk(tmp_path, chunks):
    with disk_broker(tmp_path, durable=True, mem_queue_size=100) as b:
        publish_backlog(b, "t", 20_000)          # held by the topic: no channel yet
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(HAND_OVER_CRASH_CHILD),
                        str(tmp_path), str(chunks)], cwd=HERE, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert p.returncode == -signal.SIGKILL, p.stderr
    with disk_broker(tmp_path, durable=True, mem_queue_size=100) as b:
        assert b.topic("t").channels                # it was on record before it took any
        wait_until(lambda: b.topic("t").depth == 0, what="the rest of the hand-over")
        with b.consumer("t", "c", max_in_flight=2500) as c:
            got = collections.Counter(body[:8] for body in drain_finishing(c, 10**6, 1.0))
    assert set(got) == {b"%08d" % i for i in range(20_000)}          # nothing lost
    repeated = sum(n - 1 for n in got.values())
    per_chunk = 16 * 1024 // (8 + 34 + 20)      # records in one of the child's chunks
    assert repeated <= per_chunk + minq.ACK_BUFFER, repeated


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


def test_damaged_record_in_a_channel_backlog_is_counted_and_depth_reaches_zero(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        b.topic("t").channel("c")
        b.publish_many("t", [b"m%03d" % i for i in range(100)])
    seg = next(tmp_path.glob("t:c.*.seg"))  # the channel's log
    data = bytearray(seg.read_bytes())
    off = 0
    for _ in range(30):                          # the length field of record 30
        off += 8 + struct.unpack_from(">I", data, off)[0]
    data[off:off + 4] = struct.pack(">I", 0x7FFFFFFF)
    seg.write_bytes(bytes(data))
    with disk_broker(tmp_path, mem_queue_size=0) as b:
        with b.consumer("t", "c", max_in_flight=100) as c:
            got = drain_finishing(c, 99)
        assert got == [b"m%03d" % i for i in range(100) if i != 30]
        stats = minq.nsqd_stats(b.stats())["topics"][0]["channels"][0]
        assert (stats["depth"], stats["corrupt_count"]) == (0, 1)


def _full_disk_for_new_files(monkeypatch, path):
    real_open = os.open

    def full_open(name, flags, *args, **kw):
        if flags & os.O_CREAT and str(name).startswith(str(path)):
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return real_open(name, flags, *args, **kw)
    monkeypatch.setattr(os, "open", full_open)


def test_publish_to_a_new_topic_on_a_full_disk_fails_cleanly_and_recovers(tmp_path, monkeypatch):
    # A topic's first segment file is made by its first write: in durable
    # mode, the publish that needs it.
    with disk_broker(tmp_path, durable=True) as b:
        b.publish("old", b"kept")
        _full_disk_for_new_files(monkeypatch, tmp_path)
        with pytest.raises(minq.PublishFailed):
            b.publish("new", b"x")
        b.publish("old", b"still fine")
        assert b.get_topic("new").depth == 0
        monkeypatch.undo()
        b.publish("new", b"now")
        assert b.get_topic("new").depth == 1 and b.get_topic("old").depth == 2


def run_child_json(code, *args, timeout=120):
    """Run *code* in a fresh Python (minq importable); its stdout's last line as JSON."""
    p = run_child(code, *args, timeout=timeout)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def many_topics(path, topics, channels=2):
    """A data folder with *topics* topics of *channels* channels, one message each."""
    with disk_broker(path) as b:
        for i in range(topics):
            t = b.topic(f"t{i}")
            for c in range(channels):
                t.channel(f"c{c}")
            b.publish(f"t{i}", b"m%d" % i)


LOW_NOFILE_CHILD = r"""
    import json, os, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    import minq
    fds = lambda: len(os.listdir("/proc/self/fd"))
    b = minq.Broker(data_path=sys.argv[1])
    st = b.stats()
    depth = sum(c["depth"] for t in st["topics"] for c in t["channels"])
    got, most = 0, fds()
    for name, t in sorted(b.topics.items()):
        for cn in t.channels:
            with b.consumer(name, cn) as c:
                m = c.get(timeout=5)
                got += m is not None and m.body == b"m" + name[1:].encode()
                m.finish()
            most = max(most, fds())
    b.close()
    print(json.dumps({"topics": len(st["topics"]), "depth": depth, "got": got, "most": most}))
"""


def test_thousands_of_logs_start_and_serve_under_a_low_descriptor_limit(tmp_path):
    many_topics(tmp_path, 1000)                  # 3,000 logs, 2,000 of them with a segment
    out = run_child_json(LOW_NOFILE_CHILD, tmp_path)
    assert out["topics"] == 1000 and out["depth"] == out["got"] == 2000
    assert out["most"] <= 64 + 16                # the logs' share (half) and the rest


def test_open_descriptors_stay_within_max_open_files(tmp_path):
    with disk_broker(tmp_path, mem_queue_size=0, max_open_files=16) as b:
        for i in range(60):                      # every message through a log
            b.topic(f"t{i}").channel("c")
            b.publish_many(f"t{i}", [b"%d-%d" % (i, k) for k in range(3)])
        assert len(b._files) <= 4 and b._files.released > 0
        for i in range(60):
            with b.consumer(f"t{i}", "c", max_in_flight=10) as c:
                got = drain(c, 3)
                assert sorted(m.body for m in got) == [b"%d-%d" % (i, k) for k in range(3)]
                for m in got:
                    m.finish()
            assert len(b._files) <= 4


OUT_OF_FILES_CHILD = r"""
    import json, os, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    import minq
    b = minq.Broker(data_path=sys.argv[1], durable=True)
    b.publish("a", b"a1")
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    out = {}
    try:
        b.publish("b", b"b1")                 # a new log needs a descriptor: none left
        out["new"] = "accepted"
    except minq.PublishFailed as e:
        out["new"] = str(e)
    for fd in hog:
        os.close(fd)
    b.publish("b", b"b2")                     # descriptors are back: so is publishing
    b.publish("a", b"a2")
    b.close()
    with minq.Broker(data_path=sys.argv[1]) as b:
        out["depths"] = {n: t.depth for n, t in b.topics.items()}
    print(json.dumps(out))
"""


def test_publish_without_descriptors_left_fails_loses_nothing_and_recovers(tmp_path):
    out = run_child_json(OUT_OF_FILES_CHILD, tmp_path)
    assert "Too many open files" in out["new"]
    assert out["depths"] == {"a": 2, "b": 1}


CREATE_KILL_CHILD = r"""
    import sys, threading, minq
    b = minq.Broker(data_path=sys.argv[1])
    for i in range(300):
        t = b.topic(f"t{i}")
        t.channel("c")
        if i % 3 == 0:
            t.channel("d").pause()
    b.delete_topic("t7")
    b.get_topic("t8").delete_channel("c")
    b.get_topic("t9").pause()
    print("CREATED", flush=True)
    threading.Event().wait(30)
"""


def test_kill9_right_after_creating_topics_keeps_every_one(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CREATE_KILL_CHILD),
                          str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(HERE)})
    try:
        assert p.stdout.readline() == "CREATED\n"
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    assert (tmp_path / "minq.journal").exists() and not (tmp_path / "minq.dat").exists()
    with disk_broker(tmp_path) as b:
        topics = b.topics
        assert set(topics) == {f"t{i}" for i in range(300)} - {"t7"}
        for i in range(300):
            if i == 7:
                continue
            chans = topics[f"t{i}"].channels
            want = ({"d"} if i % 3 == 0 else set()) | ({"c"} if i != 8 else set())
            assert set(chans) == want
            assert all(ch.paused == (n == "d") for n, ch in chans.items())
            assert topics[f"t{i}"].paused == (i == 9)
    assert not (tmp_path / "minq.journal").exists()      # folded into minq.dat at close
    with disk_broker(tmp_path) as b:
        assert len(b.topics) == 299 and b.get_topic("t9").paused


def test_a_torn_journal_line_is_ignored(tmp_path, caplog):
    with disk_broker(tmp_path) as b:
        b.topic("kept").channel("c")
    (tmp_path / "minq.journal").write_bytes(
        b'{"topic": "new", "exists": true}\n{"topic": "half", "exi')
    with disk_broker(tmp_path) as b:
        assert set(b.topics) == {"kept", "new"} and set(b.get_topic("kept").channels) == {"c"}


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


def test_finishes_settled_in_a_batch_are_final_at_once(broker, clock):
    # A consumer with a wide window has its finishes settled a batch at a
    # time; none of what a user sees may differ from settling each at once.
    broker.publish_many("t", [b"%d" % i for i in range(3)])
    c = broker.consumer("t", "c", max_in_flight=100)
    a, b, rest = c.get(timeout=1), c.get(timeout=1), c.get(timeout=1)
    a.finish()
    b.finish()
    for op in (a.finish, a.touch, a.requeue):
        with pytest.raises(minq.NotInFlight):
            op()
    clock.advance(61)                        # past msg_timeout: only `rest` comes back
    again = c.get(timeout=1)
    assert again.body == rest.body and again.attempts == 2 and c.get(timeout=0.05) is None
    st = channel_stats(broker, "t", "c")
    assert (st["in_flight_count"], st["timeout_count"], st["clients"][0]["finish_count"]) == \
        (1, 1, 2)
    again.finish()
    c.close()                                # nothing finished is requeued by a close
    assert channel_stats(broker, "t", "c")["depth"] == 0


def test_a_finish_waiting_for_its_batch_is_not_persisted_at_close(tmp_path):
    with disk_broker(tmp_path) as b:
        b.publish_many("t", [b"done", b"open"])
        c = b.consumer("t", "c", max_in_flight=100)
        c.get(timeout=1).finish()
        c.get(timeout=1)                     # in flight at close: persisted
    with disk_broker(tmp_path) as b, b.consumer("t", "c", max_in_flight=100) as c:
        assert [m.body for m in drain(c)] == [b"open"]


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


@pytest.mark.parametrize("dispatch, first, second, n, shares", [
    ("weighted", {"max_in_flight": 1000, "weight": 3}, {"max_in_flight": 1000, "weight": 1},
     400, (300, 100)),                          # weighted follows the weights
    ("random", {"max_in_flight": 2}, {"max_in_flight": 100}, 50, (2, 48)),   # random: the room
])
def test_two_consumers_share_as_the_policy_says(broker, dispatch, first, second, n, shares):
    broker.topic("t").channel("c", dispatch=dispatch)
    a = broker.consumer("t", "c", **first)
    b = broker.consumer("t", "c", **second)
    try:
        broker.publish_many("t", [b"x"] * n)
        assert (len(drain(a, timeout=0.05)), len(drain(b, timeout=0.05))) == shares
    finally:
        a.close()
        b.close()


def test_random_dispatch_spreads_without_a_fixed_order(broker, monkeypatch):
    monkeypatch.setattr(minq, "_random", random.Random(7))
    broker.topic("t").channel("c", dispatch="random")
    cs = [broker.consumer("t", "c", max_in_flight=2500) for _ in range(3)]
    try:
        broker.publish_many("t", [b"%d" % i for i in range(3000)])
        got = [[int(m.body) for m in drain(c, timeout=0.05)] for c in cs]
        assert sorted(sum(got, [])) == list(range(3000))           # each exactly once
        assert all(850 < len(g) < 1150 for g in got), [len(g) for g in got]
        assert got[0][:10] != list(range(0, 30, 3))                # not round-robin
    finally:
        for c in cs:
            c.close()


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


# -- messages the broker keeps to itself (publish_bodies): one queue entry per batch

def test_a_batch_in_memory_is_delivered_a_window_at_a_time(broker):
    broker.topic("t").channel("c")
    broker.publish_bodies("t", [b"%d" % i for i in range(10)])
    assert channel_stats(broker, "t", "c")["depth"] == 10
    got = []
    with broker.consumer("t", "c", max_in_flight=3) as c:
        while len(got) < 10:
            window = drain(c, 3, timeout=0.2)
            assert 0 < len(window) <= 3
            for m in window:
                got.append(m.body)
                m.finish()
    assert got == [b"%d" % i for i in range(10)]
    assert channel_stats(broker, "t", "c")["depth"] == 0


def test_a_batch_to_several_channels_gives_each_its_own_messages(broker):
    broker.topic("t").channel("a")
    broker.topic("t").channel("b")
    broker.publish_bodies("t", [b"x", b"y"])
    with broker.consumer("t", "a", max_in_flight=5) as a, \
            broker.consumer("t", "b", max_in_flight=5) as b:
        ma, mb = drain(a, 2), drain(b, 2)
        assert [m.id for m in ma] == [m.id for m in mb]      # the same messages
        ma[0].requeue()                                       # ... settled apart
        mb[0].finish()
        assert a.get(timeout=1).attempts == 2
        assert b.get(timeout=0.05) is None


def test_batches_in_memory_survive_a_clean_restart(tmp_path):
    with disk_broker(tmp_path) as b:
        b.topic("t").channel("c")
        b.publish_bodies("t", [b"one", b"two", b"three"])
        assert channel_stats(b, "t", "c")["backend_depth"] == 0    # in memory
    with disk_broker(tmp_path) as b:
        with b.consumer("t", "c", max_in_flight=5) as c:
            assert [m.body for m in drain(c, 3)] == [b"one", b"two", b"three"]


def test_an_ephemeral_channel_drops_what_does_not_fit_of_a_batch(clock):
    with make_broker(clock, mem_queue_size=5) as b:
        with b.consumer("t", "c#ephemeral", max_in_flight=0) as c:
            b.publish_bodies("t", [b"%d" % i for i in range(8)])
            st = channel_stats(b, "t", "c#ephemeral")
            assert (st["depth"], st["drop_count"]) == (5, 3)
            c.set_max_in_flight(10)
            assert [m.body for m in drain(c, 10)] == [b"%d" % i for i in range(5)]


def test_hash_dispatch_reaches_into_batches(broker):
    broker.topic("t").channel("c", dispatch="hash", key=lambda m: m.body[:1])
    cs = [broker.consumer("t", "c", max_in_flight=100) for _ in range(3)]
    try:
        broker.publish_bodies("t", [b"%c%d" % (k, j) for j in range(20) for k in b"abcdef"])
        owner = {}
        for i, c in enumerate(cs):
            for m in drain(c, timeout=0.05):
                assert owner.setdefault(m.body[:1], i) == i
        assert len(owner) == 6
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


def test_finished_messages_leave_no_memory_behind_until_their_timeout(broker):
    # The clock stands still, so no deadline comes due: what a finished
    # message leaves behind would pile up (about 150 bytes each).
    with broker.consumer("t", "c", max_in_flight=100) as c:
        def cycle(n):
            for _ in range(n // 100):
                broker.publish_many("t", [b"x"] * 100)
                for _ in range(100):
                    c.get(timeout=1).finish()
        cycle(3000)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            cycle(30000)
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
    assert grown < 1_000_000, grown


def test_a_touched_message_times_out_right_while_thousands_finish(broker, clock):
    broker.publish_many("t", [b"%d" % i for i in range(3000)])
    with broker.consumer("t", "c", max_in_flight=2) as c:
        kept = c.get(timeout=1)                  # held while the others come and go
        kept.touch()
        for _ in range(2998):
            c.get(timeout=1).finish()            # 2998 finished around it
        clock.advance(broker.msg_timeout + 1)
        again = c.get(timeout=1)
        assert (again.body, again.attempts) == (kept.body, 2)
        assert c.get(timeout=1).body == b"2999"


def test_hash_dispatch_needs_key(broker):
    with pytest.raises(minq.InvalidArgument):
        broker.topic("t").channel("c", dispatch="hash")
    with pytest.raises(minq.InvalidArgument):
        broker.topic("t").channel("c", dispatch="bogus")


# -- many consumers: a dispatch finds those with room, however many there are

class Recorder(minq.Consumer):
    """An in-process consumer that keeps what it is handed, and counts the
    hand-overs that found it without room (more held than its RDY)."""

    def __init__(self, rdy, weight=1):
        super().__init__(ready_count=rdy, weight=weight)
        self.got = []          # every delivery, in order
        self.held = {}         # id -> delivery, not settled yet
        self.over = 0

    def _deliver(self, msg):
        self._deliver_many([msg])

    def _deliver_many(self, msgs):
        for m in msgs:
            self.got.append(m)
            self.held[m.id] = m
        if len(self.held) > self.ready_count:
            self.over += 1

    def bodies(self):
        return [m.body for m in self.got]

    def finish_all(self, ch):
        ids = list(self.held)
        self.held.clear()
        assert ch.finish_many(self, ids) == []


DISPATCHES = [("round_robin", {}), ("weighted", {}), ("random", {}),
              ("hash", {"key": lambda m: m.body.split(b":")[0]})]


def many_consumers(broker, n, rdy, dispatch="round_robin", **options):
    ch = broker.topic("t").channel("c", dispatch=dispatch, **options)
    cs = [Recorder(rdy) for _ in range(n)]
    for c in cs:
        ch.add_consumer(c)
    return ch, cs


def assert_none_idle_while_messages_wait(ch, cs):
    if ch.depth:
        idle = [i for i, c in enumerate(cs)
                if not c.closed and len(c.held) < c.ready_count]
        assert not idle, f"{len(idle)} consumers have room while {ch.depth} wait"


@pytest.mark.parametrize("dispatch, options", DISPATCHES)
def test_a_thousand_consumers_get_every_message_once_within_their_rdy(
        broker, dispatch, options):
    ch, cs = many_consumers(broker, 1000, 2, dispatch, **options)
    n = 5000
    broker.publish_many("t", [b"k%d:%d" % (i % 300, i) for i in range(n)])
    if dispatch != "hash":     # the hash policy keeps a key's messages for its consumer
        assert [len(c.held) for c in cs] == [2] * 1000
        assert_none_idle_while_messages_wait(ch, cs)
    for _ in range(200):
        if sum(len(c.got) for c in cs) == n:
            break
        for c in cs:
            c.finish_all(ch)
        if dispatch != "hash":
            assert_none_idle_while_messages_wait(ch, cs)
    got = [b for c in cs for b in c.bodies()]
    assert len(got) == n and len(set(got)) == n          # each exactly once
    assert [c.over for c in cs] == [0] * 1000             # none beyond its RDY
    assert ch.depth == 0
    if dispatch == "hash":     # one consumer per key, the key's order kept
        owner, seen = {}, {}
        for i, c in enumerate(cs):
            for b in c.bodies():
                key, seq = b.split(b":")
                assert owner.setdefault(key, i) == i
                assert int(seq) > seen.get(key, -1)
                seen[key] = int(seq)
        assert len(set(owner.values())) > 150             # spread over the ring


@pytest.mark.parametrize("dispatch", ["round_robin", "weighted"])   # equal weights: in turn
def test_a_thousand_consumers_take_one_message_each_in_turn(broker, dispatch):
    ch, cs = many_consumers(broker, 1000, 8, dispatch)
    broker.publish_many("t", [b"%d" % i for i in range(2500)])
    for k, c in enumerate(cs):
        want = [k, k + 1000, k + 2000] if k < 500 else [k, k + 1000]
        assert c.bodies() == [b"%d" % i for i in want]
    broker.publish_many("t", [b"%d" % i for i in range(2500, 3000)])   # the turn goes on
    for k, c in enumerate(cs):
        assert c.bodies() == [b"%d" % i for i in (k, k + 1000, k + 2000)]


@pytest.mark.parametrize("dispatch, options", DISPATCHES)
def test_consumers_with_rdy_0_or_closed_get_nothing_more(broker, dispatch, options):
    ch, cs = many_consumers(broker, 999, 4, dispatch, **options)
    paused, removed, dropping = cs[0::3], cs[1::3], cs[2::3][:100]
    for c in paused:
        ch.set_ready(c, 0)
    for c in removed:
        ch.remove_consumer(c)
    for c in dropping:         # as a front end whose connection ends: the flag
        c.closed = True        # first, remove_consumer later
    live = cs[2::3][100:]
    n = 3000
    broker.publish_many("t", [b"k%d:%d" % (i, i) for i in range(n)])
    assert not any(c.got for c in paused + removed + dropping)
    held = sum(len(c.got) for c in live)
    assert held + ch.depth == n                            # nothing lost
    if dispatch != "hash":
        assert held == 4 * len(live)
    for c in dropping:
        ch.remove_consumer(c)
    for c in paused:
        ch.set_ready(c, 4)
    for c in live:
        c.finish_all(ch)
    assert not any(c.got for c in removed + dropping)
    assert all(c.over == 0 for c in cs)
    assert sum(1 for c in paused if c.got) > (300 if dispatch != "hash" else 0)


@pytest.mark.parametrize("dispatch", ["round_robin", "weighted", "random"])
def test_a_full_consumer_gets_room_back_on_fin_req_and_timeout(broker, clock, dispatch):
    ch, cs = many_consumers(broker, 1000, 1, dispatch)
    broker.publish_many("t", [b"%d" % i for i in range(5000)])
    assert [len(c.got) for c in cs] == [1] * 1000
    cs[7].finish_all(ch)                                  # FIN: room for one, its own
    assert [len(c.got) for c in cs] == [1] * 7 + [2] + [1] * 992
    h = cs[8].got[-1]
    del cs[8].held[h.id]
    ch.requeue(cs[8], h.id)                               # REQ: the same
    assert [len(c.got) for c in cs] == [1] * 7 + [2, 2] + [1] * 991
    ch.set_ready(cs[9], 3)                                # RDY up: two more
    assert len(cs[9].got) == 3 and sum(len(c.got) for c in cs) == 1004
    for c in cs:
        c.held.clear()
    clock.advance(broker.msg_timeout + 1)                  # all time out: all refill
    assert [len(c.got) for c in cs[:7]] == [2] * 7
    assert len(cs[9].got) == 6 and sum(len(c.got) for c in cs) == 1004 + 1002
    assert all(c.over == 0 for c in cs)


def _swrr_reference(weights, rdys, script):
    """nginx's smooth weighted round robin over the consumers with room, the
    plain O(n) way: which consumer each message goes to, as the script of
    steps ("pub", k) / ("fin", i) / ("rdy", i, n) unfolds."""
    cw = [0] * len(weights)
    held = [0] * len(weights)
    rdy = list(rdys)
    queue, seq, out = collections.deque(), 0, [[] for _ in weights]

    def pump():
        while queue:
            ready = [i for i in range(len(weights)) if held[i] < rdy[i]]
            if not ready:
                return
            best = ready[0]
            for i in ready:
                cw[i] += weights[i]
                if cw[i] > cw[best]:
                    best = i
            cw[best] -= sum(weights[i] for i in ready)
            held[best] += 1
            out[best].append(queue.popleft())

    for step in script:
        if step[0] == "pub":
            queue.extend(range(seq, seq + step[1]))
            seq += step[1]
        elif step[0] == "fin":
            held[step[1]] = 0
        else:
            rdy[step[1]] = step[2]
        pump()
    return out


def test_weighted_dispatch_is_smooth_weighted_round_robin_among_those_with_room(broker):
    rnd = random.Random(3)
    n = 60
    weights = [rnd.choice([1, 1, 2, 3, 5]) for _ in range(n)]
    rdys = [rnd.randint(1, 6) for _ in range(n)]
    script = [("pub", 150)]
    for _ in range(40):
        r = rnd.random()
        if r < 0.6:
            script.append(("fin", rnd.randrange(n)))
        elif r < 0.8:
            script.append(("rdy", rnd.randrange(n), rnd.choice([0, 1, 3, 8])))
        else:
            script.append(("pub", rnd.randint(1, 30)))
    ch = broker.topic("t").channel("c", dispatch="weighted")
    cs = [Recorder(r, weight=w) for w, r in zip(weights, rdys)]
    for c in cs:
        ch.add_consumer(c)
    seq = 0
    for step in script:
        if step[0] == "pub":
            broker.publish_many("t", [b"%d" % i for i in range(seq, seq + step[1])])
            seq += step[1]
        elif step[0] == "fin":
            cs[step[1]].finish_all(ch)
        else:
            ch.set_ready(cs[step[1]], step[2])
    want = _swrr_reference(weights, rdys, script)
    assert [[int(b) for b in c.bodies()] for c in cs] == want
    assert sum(map(len, want)) > 200


def test_weighted_dispatch_follows_the_weights_of_many_consumers(broker):
    ch = broker.topic("t").channel("c", dispatch="weighted")
    cs = [Recorder(1000, weight=1 + i % 3) for i in range(300)]
    for c in cs:
        ch.add_consumer(c)
    broker.publish_many("t", [b"x"] * 6000)             # 10 rounds of the weights' sum
    assert [len(c.got) for c in cs] == [10 * c.weight for c in cs]


def test_random_dispatch_draws_uniformly_among_many_with_room(broker, monkeypatch):
    monkeypatch.setattr(minq, "_random", random.Random(11))
    ch, cs = many_consumers(broker, 1000, 100, "random")
    for c in cs[::2]:
        ch.set_ready(c, 0)
    broker.publish_many("t", [b"%d" % i for i in range(20000)])
    assert not any(c.got for c in cs[::2])
    counts = [len(c.got) for c in cs[1::2]]                # 40 each on average
    assert sum(counts) == 20000 and 10 < min(counts) and max(counts) < 80
    firsts = sorted(cs.index(c) for c in cs if c.got and c.got[0].body in
                    {b"%d" % i for i in range(10)})
    assert firsts != list(range(1, 20, 2))                # not in turn


def test_changing_the_policy_keeps_the_consumers_with_room(broker):
    ch, cs = many_consumers(broker, 300, 2)
    seq = 0
    for dispatch in ["random", "weighted", "round_robin", "weighted", "random"]:
        broker.publish_many("t", [b"%d" % i for i in range(seq, seq + 400)])
        seq += 400
        ch.configure(dispatch=dispatch)
        for c in cs[::2]:
            c.finish_all(ch)
        assert_none_idle_while_messages_wait(ch, cs)
    for _ in range(20):
        for c in cs:
            c.finish_all(ch)
    got = sorted(int(b) for c in cs for b in c.bodies())
    assert got == list(range(seq)) and all(c.over == 0 for c in cs)


def test_a_thousand_pull_consumers_read_everything_once(broker):
    cs = [broker.consumer("t", "c", max_in_flight=2) for _ in range(1000)]
    try:
        n = 6000
        broker.publish_many("t", [b"%d" % i for i in range(n)])
        got = []
        for _ in range(20):
            for c in cs:
                while True:
                    m = c.get(timeout=0)
                    if m is None:
                        break
                    got.append(m.body)
                    m.finish()
            if len(got) == n:
                break
        assert sorted(got, key=int) == [b"%d" % i for i in range(n)]
        st = channel_stats(broker, "t", "c")
        assert (st["depth"], st["in_flight_count"]) == (0, 0)
    finally:
        for c in cs:
            c.close()


def finish_after(b, clock, cons, seconds):
    """Take a message and finish it *seconds* (on the clock) after it was published."""
    m = cons.get(timeout=5)
    clock.advance(seconds)
    m.finish()
    b.stats()                                  # finishes are settled now, at this time


def test_a_timer_pass_visits_only_channels_with_something_due(clock, monkeypatch):
    with minq.Broker(clock=clock, msg_timeout=1) as b:
        for i in range(500):                     # idle channels cost a timer pass nothing
            b.topic(f"idle{i}").channel("c")
        visits = collections.Counter()
        real = minq.Channel._process_due

        def counted(ch, now):
            visits[ch.topic.name] += 1
            return real(ch, now)
        monkeypatch.setattr(minq.Channel, "_process_due", counted)
        b.publish("busy", b"x", defer=0)
        with b.consumer("busy", "c") as cons:
            m = cons.get(timeout=5)
            clock.advance(1.5)                   # its deadline passes: redelivered
            again = cons.get(timeout=5)
            assert again.id == m.id and again.attempts == 2
    assert visits["busy"] >= 1 and sum(visits.values()) == visits["busy"]


def test_e2e_percentiles_as_nsqd_within_one_percent(clock):
    with minq.Broker(clock=clock, e2e_percentiles=[0.5, 1.0, 0.99], e2e_window=60) as b:
        with b.consumer("t", "c", max_in_flight=1) as cons:
            for i in range(1, 101):             # latencies of 1, 2, ... 100 ms
                b.publish("t", b"x")
                finish_after(b, clock, cons, i / 1000)
        e2e = b.stats()["topics"][0]["channels"][0]["e2e_processing_latency"]
    assert e2e["count"] == 100
    assert [p["quantile"] for p in e2e["percentiles"]] == [1.0, 0.99, 0.5]   # nsqd's order
    for p, exact in zip(e2e["percentiles"], (100e6, 99e6, 50e6)):
        assert isinstance(p["value"], int) and abs(p["value"] - exact) <= 0.01 * exact, p


def test_e2e_percentiles_keep_one_window_in_two_halves(clock):
    with minq.Broker(clock=clock, e2e_percentiles=[0.5], e2e_window=60) as b:
        with b.consumer("t", "c") as cons:
            b.publish("t", b"old")
            finish_after(b, clock, cons, 0.5)
            clock.advance(31)                   # a half window: the older half now
            b.publish("t", b"new")
            finish_after(b, clock, cons, 0.01)

            def e2e():
                return b.stats()["topics"][0]["channels"][0]["e2e_processing_latency"]
            assert e2e()["count"] == 2
            clock.advance(30)                   # the half holding "old" is dropped
            assert e2e()["count"] == 1 and abs(e2e()["percentiles"][0]["value"] - 1e7) < 1e5
            clock.advance(60)                   # nothing in the window
            assert e2e() == {"count": 0, "percentiles": [{"quantile": 0.5, "value": 0}]}


def test_a_topics_e2e_percentiles_merge_its_channels(clock):
    with minq.Broker(clock=clock, e2e_percentiles=[0.99, 0.25]) as b:
        with b.consumer("t", "fast") as fast, b.consumer("t", "slow") as slow:
            for _ in range(4):
                b.publish("t", b"x")
                finish_after(b, clock, fast, 0.01)
                finish_after(b, clock, slow, 1.0)
        t = b.stats()["topics"][0]
    assert t["e2e_processing_latency"]["count"] == 8
    p99, p25 = (p["value"] for p in t["e2e_processing_latency"]["percentiles"])
    assert abs(p99 - 1.01e9) < 0.02e9 and abs(p25 - 1e7) < 0.02e7
    assert all(c["e2e_processing_latency"]["count"] == 4 for c in t["channels"])


def test_e2e_percentiles_off_or_invalid(broker):
    broker.publish("t", b"x")
    with broker.consumer("t", "c") as cons:
        cons.get(timeout=5).finish()
    t = broker.stats()["topics"][0]
    assert t["e2e_processing_latency"] == {"count": 0, "percentiles": None}
    assert t["channels"][0]["e2e_processing_latency"] == {"count": 0, "percentiles": None}
    for bad in ([0], [1.5], [-0.5], ["0.5"]):
        with pytest.raises(minq.InvalidArgument, match="percentile"):
            minq.Broker(e2e_percentiles=bad)


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


@pytest.fixture
def held_pump(monkeypatch):
    """The broker's pump thread waits until ``release.set()`` before moving any chunk
    (a new channel still moves its first chunks itself, as SUB does)."""
    release = threading.Event()
    real = minq.Topic._pump

    def pump(topic):
        release.wait(10)
        return real(topic)
    monkeypatch.setattr(minq.Topic, "_pump", pump)
    yield release
    release.set()


def publish_backlog(broker, topic, n, size=20):
    for start in range(0, n, 1000):
        broker.publish_many(topic, [b"%08d" % i + b"p" * (size - 8)
                                    for i in range(start, min(n, start + 1000))])


def test_new_channel_returns_at_once_and_the_backlog_follows_in_order(tmp_path, held_pump):
    with disk_broker(tmp_path, mem_queue_size=500) as b:
        publish_backlog(b, "t", 60_000)
        ch = b.topic("t").channel("c")                 # returns with most still at the topic
        moved = ch.depth
        assert 0 < moved < 60_000 and b.topic("t").depth == 60_000 - moved
        held_pump.set()
        wait_until(lambda: b.topic("t").depth == 0, what="the pump to move the backlog")
        with b.consumer("t", "c", max_in_flight=2500) as c:
            got = [body[:8] for body in drain_finishing(c, 60_000)]
        assert got == [b"%08d" % i for i in range(60_000)]


def test_publishes_during_a_hand_over_queue_behind_the_backlog(tmp_path, held_pump):
    with disk_broker(tmp_path, mem_queue_size=500) as b:
        publish_backlog(b, "t", 30_000)
        b.topic("t").channel("c")
        b.publish_many("t", [b"late-%d" % i for i in range(100)])
        with b.consumer("t", "c", max_in_flight=2500) as c:
            held_pump.set()
            got = drain_finishing(c, 30_100, timeout=5)
        assert got[:30_000] == [b"%08d" % i + b"p" * 12 for i in range(30_000)]
        assert got[30_000:] == [b"late-%d" % i for i in range(100)]


def test_depth_counts_each_message_once_while_a_backlog_moves(tmp_path, monkeypatch):
    real = minq.Topic._pump

    def pump(topic):          # a pause between chunks, so stats land mid-move
        time.sleep(0.001)
        return real(topic)
    monkeypatch.setattr(minq.Topic, "_pump", pump)
    with disk_broker(tmp_path, mem_queue_size=1000) as b:
        publish_backlog(b, "t", 100_000)
        seen = []

        def watch():
            while not seen or seen[-1][1] < 100_000:
                (t,) = b.stats(topic="t")["topics"]
                seen.append((t["depth"], sum(c["depth"] for c in t["channels"])))
        watcher = threading.Thread(target=watch)
        watcher.start()
        b.topic("t").channel("c")
        watcher.join(30)
        assert not watcher.is_alive()
        assert all(topic + channel == 100_000 for topic, channel in seen)
        assert any(0 < topic < 100_000 for topic, _ in seen)   # seen mid-move


def test_hand_over_retries_after_a_write_error_and_loses_nothing(tmp_path, monkeypatch):
    with disk_broker(tmp_path, mem_queue_size=100) as b:
        publish_backlog(b, "t", 20_000)
        monkeypatch.setattr(minq, "_PUMP_RETRY", 0.05)
        failing = [True]
        _failing_disk(monkeypatch, lambda: failing[0])
        ch = b.topic("t").channel("c")                 # first chunks fail: nothing moves
        assert ch.depth == 0 and b.topic("t").depth == 20_000
        failing[0] = False
        wait_until(lambda: ch.depth == 20_000, what="the retried hand-over")
        assert b.topic("t").depth == 0
        with b.consumer("t", "c", max_in_flight=2500) as c:
            got = [body[:8] for body in drain_finishing(c, 20_000)]
        assert got == [b"%08d" % i for i in range(20_000)]


def test_batches_held_in_memory_move_whole_and_a_write_error_keeps_them(tmp_path, monkeypatch):
    # MPUBs (publish_bodies, as TCP and HTTP publish them) held by a paused
    # topic move to the channel as whole batches, in order; a failed store
    # puts the batch back at the topic's head, and the retry loses nothing.
    monkeypatch.setattr(minq, "_PUMP_RETRY", 0.05)

    def mpub(first, n=1000):
        b.publish_bodies("t", [b"%05d" % i for i in range(first, first + n)])
    with disk_broker(tmp_path, mem_queue_size=3000) as b:
        ch = b.topic("t").channel("c")
        mpub(0, 2000)                             # in the channel's memory
        b.topic("t").pause()
        for first in (2000, 3000, 4000):          # in the topic's memory
            mpub(first)
        assert (b.topic("t").depth, b.stats(topic="t")["topics"][0]["backend_depth"]) == (3000, 0)
        failing = [True]
        _failing_disk(monkeypatch, lambda: failing[0])
        b.topic("t").unpause()       # one batch fits the channel's memory, then a write fails
        assert (ch.depth, b.topic("t").depth) == (3000, 2000)
        failing[0] = False
        wait_until(lambda: ch.depth == 5000, what="the retried hand-over")
        with b.consumer("t", "c", max_in_flight=2500) as c:
            got = drain_finishing(c, 6000, timeout=1)
        assert got == [b"%05d" % i for i in range(5000)]


def test_backlog_moves_to_every_channel_including_memory_ones(tmp_path, held_pump):
    with disk_broker(tmp_path, mem_queue_size=50_000) as b:
        b.topic("t").pause()
        publish_backlog(b, "t", 20_000)
        b.topic("t").channel("disk")
        b.topic("t").channel("mem#ephemeral")          # no log: decoded from the records
        b.topic("t").unpause()
        held_pump.set()
        wait_until(lambda: b.topic("t").depth == 0, what="the pump")
        for name in ("disk", "mem#ephemeral"):
            with b.consumer("t", name, max_in_flight=2500) as c:
                got = [body[:8] for body in drain_finishing(c, 20_000)]
            assert got == [b"%08d" % i for i in range(20_000)], name


# =============================================================================
# Broker: stats, stress, close
# =============================================================================

def test_broker_watch_reports_creates_and_deletes(broker):
    seen = []

    def watcher(*event):
        seen.append(event)
    broker.watch(watcher)
    broker.publish("t", b"x")
    broker.topic("t").channel("c")
    with broker.consumer("t", "tmp#ephemeral"):
        pass                                    # vanishes with its last consumer
    broker.get_topic("t").delete_channel("c")
    broker.delete_topic("t")
    assert seen == [("create", "t", None), ("create", "t", "c"),
                    ("create", "t", "tmp#ephemeral"), ("delete", "t", "tmp#ephemeral"),
                    ("delete", "t", "c"), ("delete", "t", None)]
    broker.unwatch(watcher)
    broker.watch(lambda *e: 1 / 0)              # a failing watcher is logged, not raised
    broker.topic("u")
    assert len(seen) == 6                       # unwatched: told nothing more


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
        def all_seen():
            with lock:
                return min(sum(seen[ch].values()) for ch in ("a", "b")) >= total
        wait_until(all_seen, 60, "every message on both channels")
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
        wait_until(lambda: attempts and channel_stats(broker, "t", "c")["deferred_count"] == 1,
                   5, "the first attempt to be requeued")
        clock.advance(1.9)
        assert channel_stats(broker, "t", "c")["deferred_count"] == 1
        assert attempts == [1]        # backoff 2 s not yet over
        clock.advance(0.2)             # second attempt after 2 s
        wait_until(lambda: len(attempts) == 2
                   and channel_stats(broker, "t", "c")["deferred_count"] == 1, 5)
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


def test_middleware_runs_in_onion_order_and_may_settle_or_raise(broker, clock):
    trace = []

    def layer(name):
        def run(msg, nxt):
            trace.append(f"{name} in")
            try:
                return nxt(msg)
            finally:
                trace.append(f"{name} out")
        return run

    def gate(msg, nxt):                     # settles some messages itself
        if msg.body == b"skip":
            msg.finish()
            return None
        if msg.body == b"later":
            msg.requeue(30)
            return None
        return nxt(msg)
    handled = []
    sub = broker.subscribe("t", "c", lambda m: (handled.append(m.body), trace.append("handler")),
                           workers=1, middleware=[layer("outer"), layer("inner"), gate])
    try:
        broker.publish("t", b"run")
        wait_until(lambda: handled == [b"run"] and len(trace) == 5)
        assert trace == ["outer in", "inner in", "handler", "inner out", "outer out"]
        broker.publish_many("t", [b"skip", b"later"])
        wait_until(lambda: channel_stats(broker, "t", "c")["deferred_count"] == 1)
        st = channel_stats(broker, "t", "c")
        assert handled == [b"run"] and st["in_flight_count"] == 0 and st["requeue_count"] == 1
    finally:
        sub.close()


def test_log_timing_layer_logs_each_message_and_failures(broker, caplog):
    calls = []

    def handler(m):
        calls.append(m.body)
        if m.body == b"bad":
            raise ValueError("broken input")
    with caplog.at_level(logging.INFO, logger="minq"):
        sub = broker.subscribe("t", "c", handler, workers=1, middleware=[minq.log_timing()])
        broker.publish_many("t", [b"good", b"bad"])
        wait_until(lambda: len(calls) == 2)
        sub.close()
    assert re.search(r"message [0-9a-f]{16} handled in [0-9.]+ ms", caplog.text)
    assert re.search(r"message [0-9a-f]{16} failed after [0-9.]+ ms \(attempt 1\): broken input",
                     caplog.text)


def test_dedup_layer_handles_each_key_once_within_its_window(broker):
    handled = []
    sub = broker.subscribe("t", "c", lambda m: handled.append(m.body), workers=1,
                           middleware=[minq.dedup(window=2, key=lambda m: m.body)])
    try:
        broker.publish_many("t", [b"a", b"a", b"b", b"a", b"c", b"d", b"a"])
        wait_until(lambda: channel_stats(broker, "t", "c")["message_count"] == 7
                   and channel_stats(broker, "t", "c")["in_flight_count"] == 0
                   and channel_stats(broker, "t", "c")["depth"] == 0)
        # a, (a dup), b, (a dup: still in the window of 2), c, d, a (forgotten: handled again)
        assert handled == [b"a", b"b", b"c", b"d", b"a"]
    finally:
        sub.close()


def test_keep_touching_layer_keeps_a_long_job_from_timing_out():
    with minq.Broker(msg_timeout=0.3) as b:
        done = []
        sub = b.subscribe("t", "c", lambda m: (time.sleep(0.9), done.append(m.attempts)),
                          workers=1, middleware=[minq.keep_touching(0.1)])
        b.publish("t", b"slow")
        wait_until(lambda: done)
        sub.close()
        st = channel_stats(b, "t", "c")
        assert done == [1] and st["timeout_count"] == 0 and st["depth"] == 0


def test_requeue_on_layer_turns_an_error_into_a_chosen_delay(broker, caplog):
    tries = []

    def handler(m):
        tries.append(m.attempts)
        raise ConnectionRefusedError("backend down")
    with caplog.at_level(logging.INFO, logger="minq"):
        sub = broker.subscribe("t", "c", handler, workers=1,
                               middleware=[minq.requeue_on(ConnectionRefusedError, delay=42)])
        broker.publish("t", b"x")
        wait_until(lambda: channel_stats(broker, "t", "c")["deferred_count"] == 1)
        sub.close()
    assert tries == [1]
    assert "requeued in 42s" in caplog.text and "Traceback" not in caplog.text


# =============================================================================
# TCP client: the snappy codec and to-http's HTTPForwarder (Client itself is
# tested after the TCP protocol, against the server)
# =============================================================================

# -- to-http: forwarding to HTTP services


class Backend:
    """A local HTTP service for to-http: records what it got, answers as told."""

    def __init__(self, behaviour="ok", hang=2.0):
        import http.server
        self.behaviour, self.hang = behaviour, hang
        self.got, self.accepted, self.lock = [], [], threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, body):
                with outer.lock:
                    outer.got.append((body, dict(self.headers)))
                    n = len(outer.got)
                    mode = outer.behaviour
                if mode == "hang":
                    time.sleep(outer.hang)
                status = 500 if mode == "fail" or mode == "flaky" and n % 2 == 0 else 200
                if status == 200:
                    with outer.lock:
                        outer.accepted.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                self._answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def do_GET(self):
                self._answer(self.path.encode())

            def log_message(self, *a):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False      # close() joins them
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/in"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def backends():
    made = []

    def make(behaviour="ok", **kw):
        made.append(Backend(behaviour, **kw))
        return made[-1]
    yield make
    for b in made:
        b.close()


def down_url():
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"http://127.0.0.1:{s.getsockname()[1]}/in"      # closed: refused


def fast(**kw):
    """Forwarder options that keep tests short."""
    return {"workers": 4, "requeue_delay": 0.05, "backoff": 0.01, "max_backoff": 0.05,
            "retry_delay": 60.0, **kw}


def settled(broker, topic="t", channel="c"):
    st = channel_stats(broker, topic, channel)
    return st["depth"] == 0 and st["in_flight_count"] == 0 and st["deferred_count"] == 0


def test_forwarder_posts_each_message_once_with_nsq_to_https_headers(backends):
    ok = backends()
    with minq.Broker() as b, minq.HTTPForwarder(
            b, "t", "c", [ok.url], headers={"X-Team": "billing"}, **fast()) as fwd:
        b.publish_many("t", [b"m%d" % i for i in range(50)])
        wait_until(lambda: settled(b) and len(ok.accepted) == 50)
        assert sorted(ok.accepted) == sorted(b"m%d" % i for i in range(50))
        headers = ok.got[0][1]
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["User-Agent"].startswith("nsq_to_http v1.3.0")
        assert headers["X-Team"] == "billing"
        client = channel_stats(b, "t", "c")["clients"][0]
        assert client["user_agent"].startswith("nsq_to_http") and client["finish_count"] == 50
        assert fwd.sent == 50 and fwd.failed == 0


def test_forwarder_get_puts_the_quoted_body_in_the_url(backends):
    ok = backends()
    with minq.Broker() as b, minq.HTTPForwarder(b, "t", "c", [ok.url + "?data=%s"],
                                                method="GET", **fast()):
        b.publish("t", b"a b&c")
        wait_until(lambda: settled(b) and ok.accepted)
    assert ok.accepted == [b"/in?data=a+b%26c"]


def test_forwarder_failing_hanging_and_down_backends_lose_nothing_finish_nothing_early(backends):
    flaky, hanging, good = backends("flaky"), backends("hang", hang=1.0), backends()
    bodies = [b"m%d" % i for i in range(40)]
    with minq.Broker() as b, minq.HTTPForwarder(
            b, "t", "c", [flaky.url, hanging.url, down_url(), good.url], mode="round-robin",
            request_timeout=0.3, **fast()) as fwd:
        b.publish_many("t", bodies)
        wait_until(lambda: settled(b), 30)
        accepted = flaky.accepted + hanging.accepted + good.accepted
        # every message was taken by a backend that answered 200, once
        assert sorted(accepted) == sorted(bodies)
        assert channel_stats(b, "t", "c")["clients"][0]["finish_count"] == 40
        # the hanging one sat out after its timeouts (retry_delay 60 s), while
        # the flaky one, revived by each success, kept taking its share
        assert len(hanging.got) <= 4 and flaky.accepted and len(flaky.got) > len(flaky.accepted)
        assert fwd.pool.backends[2].failed >= 1 and fwd.pool.backends[3].ok >= 30


def test_forwarder_closing_mid_message_gives_it_back_at_once(backends):
    good, hanging = backends(), backends("hang", hang=1.0)
    with minq.Broker() as b:
        fwd = minq.HTTPForwarder(b, "t", "c", [good.url, hanging.url], mode="round-robin",
                                 request_timeout=0.5, workers=1, requeue_delay=90)
        b.publish("t", b"caught in the middle")       # round-robin: the hanging one first
        wait_until(lambda: hanging.got, 5, "the request to the hanging backend")
        fwd.close()                                   # before it would try the good one
        st = channel_stats(b, "t", "c")
        assert (st["depth"], st["deferred_count"]) == (1, 0)   # back now, not in 90 s
        assert not good.got and fwd.failed == 0


def test_forwarder_requeues_when_no_backend_answers_then_dead_letters(backends):
    bad = backends("fail")
    with minq.Broker() as b, minq.HTTPForwarder(b, "t", "c", [bad.url], max_attempts=2,
                                                **fast(retry_delay=0.01)) as fwd:
        b.topic("t.c.dead").channel("inspect")
        b.publish("t", b"poison")
        wait_until(lambda: settled(b) and fwd.dead_lettered == 1)
        assert len(bad.got) == 2                      # two deliveries, two refusals
        assert channel_stats(b, "t", "c")["requeue_count"] == 2
        with b.consumer("t.c.dead", "inspect") as dead:
            assert dead.get(timeout=2).body == b"poison"


def test_forwarder_hash_mode_keeps_keys_on_one_backend_and_moves_them_when_it_dies(backends):
    bs = [backends() for _ in range(3)]
    key = minq.message_key("json:user")
    with minq.Broker() as b, minq.HTTPForwarder(b, "t", "c", [x.url for x in bs], mode="hash",
                                                key=key, **fast()) as fwd:
        b.publish_many("t", [json.dumps({"user": u, "n": n}).encode()
                             for n in range(5) for u in range(20)])
        wait_until(lambda: settled(b) and sum(len(x.accepted) for x in bs) == 100)

        def owners():
            where = collections.defaultdict(set)
            for i, x in enumerate(bs):
                for body in x.accepted:
                    where[json.loads(body)["user"]].add(i)
            return where
        before = owners()
        assert all(len(v) == 1 for v in before.values()) and len(before) == 20
        assert len({next(iter(v)) for v in before.values()}) == 3      # all three used
        victim = next(iter(before[0]))
        bs[victim].behaviour = "fail"
        for x in bs:
            x.accepted.clear()
        b.publish_many("t", [json.dumps({"user": u, "n": 9}).encode() for u in range(20)])
        wait_until(lambda: settled(b) and sum(len(x.accepted) for x in bs) == 20)
        after = owners()
        for user, was in before.items():
            now = after[user]
            assert len(now) == 1
            if was != {victim}:
                assert now == was                  # untouched keys stay put
            else:
                assert victim not in now           # moved to the next on the ring
        assert fwd.pool.backends[victim].failed >= 1


def test_forwarder_weighted_mode_follows_the_weights(backends):
    heavy, light = backends(), backends()
    with minq.Broker() as b, minq.HTTPForwarder(b, "t", "c", [heavy.url, light.url],
                                                mode="weighted", weights=[3, 1], **fast()):
        b.publish_many("t", [b"x"] * 400)
        wait_until(lambda: settled(b) and len(heavy.accepted) + len(light.accepted) == 400)
    assert (len(heavy.accepted), len(light.accepted)) == (300, 100)


@pytest.mark.parametrize("mode", ["hostpool", "round-robin", "epsilon-greedy", "random"])
def test_forwarder_other_modes_deliver_everything_across_backends(backends, mode):
    bs = [backends() for _ in range(3)]
    with minq.Broker() as b, minq.HTTPForwarder(b, "t", "c", [x.url for x in bs], mode=mode,
                                                **fast()):
        b.publish_many("t", [b"%d" % i for i in range(90)])
        wait_until(lambda: settled(b) and sum(len(x.accepted) for x in bs) == 90)
    assert sorted(sum((x.accepted for x in bs), [])) == sorted(b"%d" % i for i in range(90))
    if mode != "epsilon-greedy":                   # that one prefers the fastest
        assert all(x.accepted for x in bs)


def test_forwarder_refuses_bad_settings():
    with minq.Broker() as b:
        for kw, text in [({"mode": "all"}, "mode must be one of"),
                         ({"mode": "hash"}, "needs a key"),
                         ({"mode": "weighted", "weights": [1]}, "one whole number"),
                         ({"method": "GET"}, "printf string")]:
            with pytest.raises(minq.InvalidArgument, match=text):
                minq.HTTPForwarder(b, "t", "c", ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"],
                                   **kw)
    with pytest.raises(minq.InvalidArgument):
        minq.message_key("xml:a")
    header = minq.message_key("header:Tenant")
    assert header(minq.Message(b"0" * 16, b"Tenant: acme\r\nX: y\r\n\r\nbody", 0)) == b"acme"


# -- snappy codec


SNAPPY_SAMPLES = [b"", b"x", os.urandom(65537), b"na" * 100_000,
                  json.dumps([{"id": i, "user": f"u{i % 7}"} for i in range(3000)]).encode()]


@pytest.mark.parametrize("data", SNAPPY_SAMPLES, ids=["empty", "1 byte", "64 KiB + 1 random",
                                                       "repetitive", "json"])
def test_snappy_framing_round_trips_and_matches_an_independent_codec(data):
    packed = minq.SnappyCompressor().compress(data)
    assert packed.startswith(b"\xff\x06\x00\x00sNaPpY")
    d = minq.SnappyDecompressor()
    assert b"".join(d.decompress(packed[i:i + 1000]) for i in range(0, len(packed), 1000)) == data
    if len(data) > 1000 and data[:2] == b"na":
        assert len(packed) < len(data) / 10            # it does compress
    if len(data) == 65537:
        assert len(packed) <= len(data) + 2 * 8 + 10   # stored, not grown
    cramjam = pytest.importorskip("cramjam")           # test-only: another implementation
    assert bytes(cramjam.snappy.decompress(packed)) == data
    assert minq.SnappyDecompressor().decompress(bytes(cramjam.snappy.compress(data))) == data


def test_snappy_decompressor_bounds_its_output_per_call():
    packed = minq.SnappyCompressor().compress(b"z" * 300_000)
    d = minq.SnappyDecompressor()
    first = d.decompress(packed, 65536)
    assert len(first) == 65536 and d.unconsumed_tail
    rest = d.decompress(d.unconsumed_tail)      # passed back, as zlib's
    assert first + rest == b"z" * 300_000 and not d.unconsumed_tail


def test_snappy_decompressor_gives_what_came_before_a_bad_chunk_first():
    good = minq.SnappyCompressor().compress(b"PUB t\n")
    bad = bytearray(minq.SnappyCompressor().compress(b"NOP\n"))[10:]
    bad[-1] ^= 0xFF
    d = minq.SnappyDecompressor()
    assert d.decompress(good + bytes(bad), 65536) == b"PUB t\n"    # a command nsqd answers
    with pytest.raises(minq.SnappyError, match="checksum"):
        d.decompress(d.unconsumed_tail, 65536)


@pytest.mark.parametrize("damage", ["checksum", "stream id", "chunk type", "copy offset",
                                    "no stream id"])
def test_snappy_rejects_corrupt_frames(damage):
    good = bytearray(minq.SnappyCompressor().compress(b"hello hello hello hello"))
    if damage == "checksum":
        good[14] ^= 1
    elif damage == "stream id":
        good[4] = ord("X")
    elif damage == "chunk type":
        good[10] = 0x05
    elif damage == "copy offset":
        block = bytes([11, 0x02 << 2 | 2, 0xFF, 0x00])        # a copy before any output
        good = bytearray(good[:10]) + bytes([0, len(block) + 4, 0, 0]) + bytes(4) + block
    else:
        good = good[10:]
    with pytest.raises(minq.SnappyError):
        minq.SnappyDecompressor().decompress(bytes(good))


# =============================================================================
# TCP protocol V2: raw-socket tests of every command, reply and error code
# =============================================================================

@contextlib.contextmanager
def tcp_server(address="127.0.0.1:0", **options):
    """A real-clock broker behind a TCPServer with *options*, closed after."""
    with minq.Broker() as b, minq.TCPServer(b, address, **options).start() as srv:
        yield srv


@pytest.fixture
def server():
    """A real-clock broker behind a TCPServer on an ephemeral loopback port."""
    with tcp_server() as srv:
        yield srv


class Raw:
    """A raw protocol V2 connection for tests: send bytes, read frames."""

    def __init__(self, srv, magic=True, timeout=5.0):
        import socket
        if isinstance(srv, str):
            host, port = srv.rsplit(":", 1)
        else:
            host, port = srv.server_address[:2]
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        if magic:
            self.send(b"  V2")

    def send(self, data):
        self.sock.sendall(data)

    def cmd(self, line, body=None):
        data = line.encode() + b"\n" if isinstance(line, str) else line + b"\n"
        if body is not None:
            data += struct.pack(">l", len(body)) + body
        self.send(data)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def frame(self, skip_heartbeats=True):
        while True:
            size, ftype = struct.unpack(">lL", self._read(8))
            data = self._read(size - 4)
            if skip_heartbeats and ftype == 0 and data == b"_heartbeat_":
                continue
            return ftype, data

    def response(self):
        ftype, data = self.frame()
        assert ftype == 0, data
        return data

    def error(self):
        ftype, data = self.frame()
        assert ftype == 1, data
        return data.decode()

    def message(self):
        ftype, data = self.frame()
        assert ftype == 2, data
        ts, attempts, msg_id = struct.unpack(">qH16s", data[:26])
        return msg_id, attempts, data[26:], ts

    def reply_and_message(self):
        """A publisher that is also subscribed gets its OK and the message in either order."""
        frames = sorted((self.frame() for _ in range(2)), key=lambda f: f[0])
        assert frames[0] == (0, b"OK") and frames[1][0] == 2, frames
        self.buf = struct.pack(">lL", len(frames[1][1]) + 4, 2) + frames[1][1] + self.buf
        return self.message()

    def closed(self, timeout=3.0):
        """True once the server closed the connection (EOF), having sent nothing more."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b"" and not self.buf
        except OSError:
            return True

    def nothing_within(self, seconds):
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):   # one class from Python 3.10
            return True
        finally:
            self.sock.settimeout(5.0)
        self.buf += data
        return False

    def close(self):
        self.sock.close()


def subscribed(srv, topic="t", channel="c", rdy=None, **identify):
    r = Raw(srv)
    if identify:
        r.cmd("IDENTIFY", json.dumps(identify).encode())
        r.response()
    r.cmd(f"SUB {topic} {channel}")
    assert r.response() == b"OK"
    if rdy is not None:
        r.cmd(f"RDY {rdy}")
    return r


def test_wrong_magic_gets_e_bad_protocol_and_close(server):
    r = Raw(server, magic=False)
    r.send(b"  V1")
    assert r.error() == "E_BAD_PROTOCOL"
    assert r.closed()


def test_identify_plain_ok_without_feature_negotiation(server):
    r = Raw(server)
    r.cmd("IDENTIFY", json.dumps({"client_id": "x"}).encode())
    assert r.response() == b"OK"


def test_identify_feature_negotiation_reply_matches_nsqd(server):
    r = Raw(server)
    r.cmd("IDENTIFY", json.dumps({"feature_negotiation": True, "snappy": False,
                                  "short_id": "legacy"}).encode())
    reply = r.response()
    assert reply.startswith(b'{"max_rdy_count":') or reply.startswith(b'{"max_rdy_count": ')
    data = json.loads(reply)
    assert list(data) == ["max_rdy_count", "version", "max_msg_timeout", "msg_timeout", "tls_v1",
                          "deflate", "deflate_level", "max_deflate_level", "snappy",
                          "sample_rate", "auth_required", "output_buffer_size",
                          "output_buffer_timeout", "topology_region", "topology_zone"]
    assert data == {"max_rdy_count": 2500, "version": "1.3.0", "max_msg_timeout": 900000,
                    "msg_timeout": 60000, "tls_v1": False, "deflate": False,
                    "deflate_level": 6, "max_deflate_level": 6, "snappy": False,
                    "sample_rate": 0, "auth_required": False, "output_buffer_size": 16384,
                    "output_buffer_timeout": 250, "topology_region": "", "topology_zone": ""}


@pytest.mark.parametrize("body, text", [
    (b"{not json", "E_BAD_BODY IDENTIFY failed to decode JSON body"),
    (b"[1]", "E_BAD_BODY IDENTIFY failed to decode JSON body"),
    (b'{"heartbeat_interval": 5}', "E_BAD_BODY IDENTIFY heartbeat interval (5) is invalid"),
    (b'{"heartbeat_interval": 30000.0}', "E_BAD_BODY IDENTIFY failed to decode JSON body"),
    (b'{"output_buffer_size": 10}', "E_BAD_BODY IDENTIFY output buffer size (10) is invalid"),
    (b'{"output_buffer_timeout": 5}', "E_BAD_BODY IDENTIFY output buffer timeout (5) is invalid"),
    (b'{"sample_rate": 100}', "E_BAD_BODY IDENTIFY sample rate (100) is invalid"),
    (b'{"msg_timeout": 999}', "E_BAD_BODY IDENTIFY msg timeout (999) is invalid"),
])
def test_identify_invalid_fields_are_fatal_e_bad_body(server, body, text):
    r = Raw(server)
    r.cmd("IDENTIFY", body)
    assert r.error() == text
    assert r.closed()


def test_oversize_and_empty_bodies_rejected_before_reading(server):
    r = Raw(server)
    r.send(b"PUB t\n" + struct.pack(">l", 2**31 - 1))   # no body follows
    assert r.error() == "E_BAD_MESSAGE PUB message too big 2147483647 > 1048576"
    assert r.closed()
    r = Raw(server)
    r.cmd("PUB t", b"")
    assert r.error() == "E_BAD_MESSAGE PUB invalid message body size 0"
    r = Raw(server)
    r.send(b"IDENTIFY\n" + struct.pack(">l", 2**31 - 1))
    assert r.error() == "E_BAD_BODY IDENTIFY body too big 2147483647 > 5242880"
    assert server.broker.stats()["topics"] == []


def test_pub_sub_rdy_fin_and_message_frame_layout(server):
    b = server.broker
    p = Raw(server)
    before = time.time_ns()
    p.cmd("PUB orders", b"order-1")
    assert p.response() == b"OK"
    c = subscribed(server, "orders", "billing", rdy=1)
    msg_id, attempts, body, ts = c.message()
    assert (attempts, body) == (1, b"order-1")
    assert re.fullmatch(rb"[0-9a-f]{16}", msg_id)
    assert before <= ts <= time.time_ns()
    c.cmd(b"FIN " + msg_id)
    p.cmd("PUB orders", b"order-2")          # FIN has no reply: the next frame is the message
    assert p.response() == b"OK"
    assert c.message()[2] == b"order-2"
    stats = channel_stats(b, "orders", "billing")
    assert stats["clients"][0]["finish_count"] == 1
    assert stats["clients"][0]["remote_address"].startswith("127.0.0.1:")


def test_rdy_is_a_window_not_a_countdown(server):
    p = Raw(server)
    for i in range(5):
        p.cmd("PUB t", b"m%d" % i)
        p.response()
    c = subscribed(server, rdy=2)
    first = [c.message()[0] for _ in range(2)]
    assert c.nothing_within(0.2)
    c.cmd(b"FIN " + first[0])
    assert c.message()[2] == b"m2"            # one slot freed, one more sent, no new RDY
    c.cmd("RDY 0")
    c.cmd(b"FIN " + first[1])
    assert c.nothing_within(0.2)


def test_req_redelivers_with_attempts_and_touch_is_silent(server):
    p = Raw(server)
    p.cmd("PUB t", b"x")
    p.response()
    c = subscribed(server, rdy=1)
    msg_id, attempts, *_ = c.message()
    c.cmd(b"TOUCH " + msg_id)
    c.cmd(b"REQ " + msg_id + b" 0")
    again, attempts2, *_ = c.message()
    assert (again, attempts2) == (msg_id, 2)
    c.cmd(b"REQ " + msg_id + b" 60000")
    assert c.nothing_within(0.2)
    assert channel_stats(server.broker, "t", "c")["deferred_count"] == 1


def test_fin_req_touch_failures_are_not_fatal(server):
    c = subscribed(server, rdy=1)
    for cmd, code in (("FIN", "E_FIN_FAILED"), ("REQ", "E_REQ_FAILED"), ("TOUCH", "E_TOUCH_FAILED")):
        c.cmd(f"{cmd} 0123456789abcdef" + (" 0" if cmd == "REQ" else ""))
        assert c.error() == f"{code} {cmd} 0123456789abcdef failed ID not in flight"
    c.cmd("PUB t", b"still open")
    assert c.reply_and_message()[2] == b"still open"


@pytest.mark.parametrize("line, text", [
    ("ASDF", "E_INVALID invalid command ASDF"),
    ("FIN 0123456789abcdef", "E_INVALID cannot FIN in current state"),
    ("RDY 1", "E_INVALID cannot RDY in current state"),
    ("CLS", "E_INVALID cannot CLS in current state"),
    ("SUB t", "E_INVALID SUB insufficient number of parameters"),
    ("SUB bad!topic c", 'E_BAD_TOPIC SUB topic name "bad!topic" is not valid'),
    ("SUB t bad!chan", 'E_BAD_CHANNEL SUB channel name "bad!chan" is not valid'),
    ("PUB", "E_INVALID PUB insufficient number of parameters"),
    ("PUB a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f g h i j k l m n o p q r s t u v w x y z ab",
     "E_INVALID PUB insufficient number of parameters"),
    ("DPUB t abc", "E_INVALID DPUB could not parse timeout abc"),
    ("DPUB t 3600001", "E_INVALID DPUB timeout 3600001 out of range 0-3600000"),
    ("AUTH", "E_AUTH_DISABLED AUTH disabled"),
])
def test_fatal_errors_close_the_connection(server, line, text):
    if line.startswith("PUB a b"):
        line, text = "PUB " + "x" * 65, 'E_BAD_TOPIC PUB topic name "' + "x" * 65 + '" is not valid'
    r = Raw(server)
    r.cmd(line)
    assert r.error() == text
    assert r.closed()


@pytest.mark.parametrize("line, text", [
    ("RDY 2501", "E_INVALID RDY count 2501 out of range 0-2500"),
    ("RDY -1", "E_INVALID RDY could not parse count -1"),
    ("FIN short", "E_INVALID invalid message ID"),
    ("REQ 0123456789abcdef x", "E_INVALID REQ could not parse timeout x"),
    ("SUB t c", "E_INVALID cannot SUB in current state"),
    ("IDENTIFY", "E_INVALID cannot IDENTIFY in current state"),
])
def test_subscribed_state_errors_are_fatal(server, line, text):
    r = subscribed(server)
    r.cmd(line)
    assert r.error() == text
    assert r.closed()


def test_sub_needs_heartbeats(server):
    r = Raw(server)
    r.cmd("IDENTIFY", b'{"heartbeat_interval": -1}')
    assert r.response() == b"OK"
    r.cmd("PUB t", b"publishing is fine")
    assert r.response() == b"OK"
    r.cmd("SUB t c")
    assert r.error() == "E_INVALID cannot SUB with heartbeats disabled"


def test_mpub_atomic_and_every_size_checked_first(server):
    b = server.broker

    def mpub(bodies, count=None, total=None):
        payload = struct.pack(">l", len(bodies) if count is None else count)
        payload += b"".join(struct.pack(">l", len(x)) + x for x in bodies)
        r = Raw(server)
        r.send(b"MPUB t\n" + struct.pack(">l", len(payload) if total is None else total) + payload)
        return r

    r = mpub([b"a", b"bb", b"ccc"])
    assert r.response() == b"OK"
    assert b.stats()["topics"][0]["message_count"] == 3
    assert mpub([b"a"], count=10**9).error() == "E_BAD_BODY MPUB invalid message count 1000000000"
    assert mpub([b"a", b""]).error() == "E_BAD_MESSAGE MPUB invalid message(1) body size 0"
    assert mpub([b"a", b"x" * (1024 * 1024 + 1)], total=100).error() == \
        "E_BAD_MESSAGE MPUB message too big 1048577 > 1048576"
    assert mpub([b"a", b"bb"], total=10).error() == \
        "E_BAD_MESSAGE MPUB failed to read message(1) body size"
    r = Raw(server)
    r.send(b"MPUB t\n" + struct.pack(">l", 2**31 - 1))
    assert r.error() == "E_BAD_BODY MPUB body too big 2147483647 > 5242880"
    assert b.stats()["topics"][0]["message_count"] == 3      # nothing of the bad ones


def test_dpub_defers_and_cls_stops_delivery(server):
    c = subscribed(server, rdy=5)
    c.cmd("DPUB t 60000", b"later")
    assert c.response() == b"OK"
    assert channel_stats(server.broker, "t", "c")["deferred_count"] == 1
    c.cmd("PUB t", b"now")
    msg_id = c.reply_and_message()[0]
    c.cmd("CLS")
    assert c.response() == b"CLOSE_WAIT"
    c.cmd("PUB t", b"after cls")
    assert c.response() == b"OK"
    c.cmd(b"FIN " + msg_id)                  # still allowed while closing
    c.cmd("NOP")                             # never answered
    assert c.nothing_within(0.2)


def test_long_line_closes_without_error_frame(server):
    r = Raw(server)
    r.send(b"PUB " + b"x" * (17 * 1024))
    assert r.closed()


def test_truncated_frame_then_disconnect_leaves_server_serving(server):
    r = Raw(server)
    r.send(b"PUB t\n" + struct.pack(">l", 100) + b"only part")
    r.close()
    p = Raw(server)
    p.cmd("PUB t", b"fine")
    assert p.response() == b"OK"
    assert server.broker.stats()["topics"][0]["message_count"] == 1


@pytest.fixture
def clocked():
    """A FakeClock broker behind a TCPServer: the protocol's deadlines
    (heartbeats, output buffering, write and message timeouts) move only
    when the test advances the clock.  Waits of a minute take milliseconds."""
    clock = minq.FakeClock()
    b = minq.Broker(clock=clock)
    srv = minq.TCPServer(b, "127.0.0.1:0").start()
    yield srv, clock
    srv.close()
    b.close()


def test_heartbeats_sent_and_silent_client_closed_after_two(clocked):
    srv, clock = clocked
    r = Raw(srv, timeout=2.0)       # a minute of the fake clock must take no real time
    r.cmd("IDENTIFY", b'{"heartbeat_interval": 60000}')
    assert r.response() == b"OK"
    assert r.nothing_within(0.05)
    clock.advance(60)
    assert r.frame(skip_heartbeats=False) == (0, b"_heartbeat_")
    clock.advance(59.9)
    assert r.nothing_within(0.05)       # the second interval has not ended
    clock.advance(0.1)                  # two intervals without a command: nsqd closes
    with pytest.raises(EOFError):
        while True:
            assert r.frame(skip_heartbeats=False) == (0, b"_heartbeat_")


def test_answered_heartbeats_keep_connection(clocked):
    srv, clock = clocked
    r = Raw(srv, timeout=2.0)
    r.cmd("IDENTIFY", b'{"heartbeat_interval": 60000}')
    r.response()
    for _ in range(4):              # 4 minutes: twice the read deadline
        clock.advance(60)
        assert r.frame(skip_heartbeats=False) == (0, b"_heartbeat_")
        r.cmd("NOP")
        r.cmd("PUB t", b"alive")    # its OK: the NOP before it was read
        assert r.response() == b"OK"


def test_output_buffer_flushes_on_timeout(clocked):
    srv, clock = clocked
    c = subscribed(srv, rdy=5, output_buffer_timeout=10000)
    c.sock.settimeout(2.0)          # a 10 s wait in real time would fail
    p = Raw(srv)
    p.cmd("PUB t", b"buffered")
    p.response()
    clock.advance(9.9)
    assert c.nothing_within(0.05)            # buffered: the client could take more
    clock.advance(10)
    assert c.message()[2] == b"buffered"     # flushed by the 10 s timeout


def test_not_ready_client_gets_frame_at_once(server):
    c = subscribed(server, rdy=1, output_buffer_timeout=30000)
    p = Raw(server)
    p.cmd("PUB t", b"now")
    p.response()
    assert c.message()[2] == b"now"          # not 30 s later: RDY 1 is full, so flush


def test_per_client_msg_timeout_requeues(clocked):
    srv, clock = clocked
    c = subscribed(srv, rdy=1, msg_timeout=90000, heartbeat_interval=60000)
    c.sock.settimeout(2.0)
    c.cmd("PUB t", b"slow")
    first = c.reply_and_message()
    clock.advance(89)               # the channel's default (60 s) is past: the client's counts
    assert c.frame(skip_heartbeats=False) == (0, b"_heartbeat_")
    assert c.nothing_within(0.05)
    clock.advance(1)
    again = c.message()                      # not finished within 90 s: timed out, redelivered
    assert again[0] == first[0] and again[1] == 2
    assert channel_stats(srv.broker, "t", "c")["timeout_count"] == 1


def test_sample_rate_drops_most_messages_for_that_client(server):
    c = subscribed(server, rdy=200, sample_rate=1, output_buffer_size=-1)
    p = Raw(server)
    p.cmd("MPUB t", struct.pack(">l", 200) + b"".join(struct.pack(">l", 1) + b"x" for _ in range(200)))
    assert p.response() == b"OK"
    received = 0
    while received < 200 and not c.nothing_within(0.3):
        while c.buf:
            c.message()
            received += 1
    assert received < 50                     # ~2 % kept (nsqd: rand(100) <= 1)
    # The dropped ones count as finished for this channel; the kept ones are in flight.
    wait_until(lambda: channel_stats(server.broker, "t", "c")["clients"][0]["finish_count"]
               >= 200 - received, 5)
    assert channel_stats(server.broker, "t", "c")["in_flight_count"] == received


def test_disconnect_requeues_in_flight_at_once(server):
    p = Raw(server)
    p.cmd("PUB t", b"x")
    p.response()
    c1 = subscribed(server, rdy=1)
    c1.message()
    c1.close()
    c2 = subscribed(server, rdy=1)
    msg_id, attempts, body, _ = c2.message()
    assert (attempts, body) == (2, b"x")


def test_channel_delete_closes_its_connections(server):
    c = subscribed(server, rdy=1)
    server.broker.get_topic("t").delete_channel("c")
    assert c.closed()


def test_stalled_pipelining_publisher_does_not_block_others(server):
    flood = Raw(server)
    flood.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    frame = b"PUB flood\n" + struct.pack(">l", 100) + b"x" * 100
    flood.sock.settimeout(0.05)
    blocked = False
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:       # never read a reply: the server must push back
            flood.sock.sendall(frame * 100)
    except (TimeoutError, socket.timeout):   # one class from Python 3.10
        blocked = True                           # the server stopped reading from us
    assert blocked, "the server kept reading without bound from a client that reads nothing"
    p = Raw(server)
    p.cmd("PUB t", b"unaffected")
    assert p.response() == b"OK"
    c = subscribed(server, rdy=1)
    assert c.message()[2] == b"unaffected"
    flood.close()


def test_hundreds_of_idle_connections(server):
    conns = []
    for _ in range(200):
        r = Raw(server)
        r.cmd("IDENTIFY", b'{"client_id": "idle"}')
        conns.append(r)
    for r in conns:
        assert r.response() == b"OK"
    p = Raw(server)
    p.cmd("PUB t", b"x")
    assert p.response() == b"OK"
    for r in conns:
        r.close()


def test_event_loop_never_loses_a_wake_up_posted_while_it_drains():
    # Another thread posts while the loop reads its wake-up bytes: the next
    # post must still wake the loop (a lost wake-up left deliveries made on
    # other threads waiting up to a second).
    import select
    loop = minq._EventLoop()
    real, calls = loop._wake_r, []

    class Racing:
        def recv(self, n):
            if not calls:
                calls.append(1)
                loop.post(lambda _: calls.append("during"))
            return real.recv(n)
    try:
        loop.post(lambda _: calls.append("first"))
        loop._wake_r = Racing()
        loop._drain_wake()
        loop._run_inbox()
        assert calls == [1, "first", "during"]
        assert not select.select([real], [], [], 0)[0]     # drained
        loop.post(lambda _: calls.append("after"))
        assert select.select([real], [], [], 0)[0], "the post after the drain woke nothing"
    finally:
        loop._wake_r = real
        loop.close()


def test_one_io_thread_serves_every_connection(server):
    server.broker.topic("t").channel("c")           # SUBs below need no worker
    warm = [subscribed(server, rdy=1) for _ in range(5)]
    before = threading.active_count()
    conns = [subscribed(server, rdy=1) for _ in range(300)]
    assert threading.active_count() == before       # no thread per connection
    p = Raw(server)
    p.cmd("MPUB t", struct.pack(">l", 305) + b"".join(struct.pack(">l", 1) + b"m"
                                                      for _ in range(305)))
    assert p.response() == b"OK"
    for r in warm + conns:                           # one message each, RDY 1
        assert r.message()[2] == b"m"
    for r in warm + conns + [p]:
        r.close()


def test_accept_failures_pause_accepting_then_it_goes_on(server, caplog):
    real = server._listener
    failures = [errno.EMFILE]

    class OutOfFiles:                      # the listener, until a descriptor is free
        def accept(self):
            if failures:
                raise OSError(failures.pop(), "Too many open files")
            return real.accept()

        def fileno(self):
            return real.fileno()

        def close(self):
            real.close()
    server._listener = OutOfFiles()
    caplog.set_level(logging.ERROR)
    r = Raw(server)                        # waits in the backlog through the pause
    r.cmd("PUB t", b"late but fine")
    assert r.response() == b"OK"
    assert "cannot accept a connection" in caplog.text and not failures


def test_server_listens_on_ipv6_loopback():
    import socket
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with tcp_server("[::1]:0") as srv:
        assert srv.address == f"[::1]:{srv.server_address[1]}"
        with minq.Client(srv.address) as c:
            c.publish("t", b"over ipv6")
        assert srv.broker.stats()["topics"][0]["message_count"] == 1


def test_pipelined_commands_in_one_write_are_answered_in_order(server):
    r = Raw(server)
    r.send(b"".join(b"PUB t\n" + struct.pack(">l", 2) + b"m%d" % i for i in range(3))
           + b"NOP\nBOGUS\nPUB t\n" + struct.pack(">l", 1) + b"x")
    assert [r.response() for _ in range(3)] == [b"OK"] * 3
    assert r.error() == "E_INVALID invalid command BOGUS"
    assert r.closed()                                # fatal: the PUB after it is not run
    assert server.broker.stats()["topics"][0]["message_count"] == 3


def test_a_burst_of_fins_in_one_write_settles_all_and_reports_the_bad_one(server):
    c = subscribed(server, rdy=200)
    p = Raw(server)
    p.cmd("MPUB t", struct.pack(">l", 200) + b"".join(struct.pack(">l", 3) + b"%03d" % i
                                                      for i in range(200)))
    assert p.response() == b"OK"
    ids = [c.message()[0] for _ in range(200)]
    kept = ids.pop(77)
    lines = [b"FIN " + i + b"\n" for i in ids]
    lines.insert(120, b"FIN 0123456789abcdef\n")    # not in flight: non-fatal
    c.send(b"".join(lines))
    assert c.error() == "E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight"
    wait_until(lambda: channel_stats(server.broker, "t", "c")["in_flight_count"] == 1,
               what="199 FINs settled")
    c.cmd(b"FIN " + kept)                            # the connection is still usable
    wait_until(lambda: channel_stats(server.broker, "t", "c")["in_flight_count"] == 0,
               what="the last FIN")
    assert channel_stats(server.broker, "t", "c")["clients"][0]["finish_count"] == 200


def test_deliveries_from_other_threads_reach_tcp_consumers(server):
    c = subscribed(server, rdy=2500, output_buffer_timeout=25)
    b = server.broker

    def publish(k):
        for i in range(250):
            b.publish("t", b"%d-%d" % (k, i))
    threads = [threading.Thread(target=publish, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {c.message()[2] for _ in range(1000)}
    assert got == {b"%d-%d" % (k, i) for k in range(4) for i in range(250)}


def test_consumer_that_reads_nothing_is_dropped_and_its_messages_requeued(clocked, caplog):
    import socket
    srv, clock = clocked
    c = Raw(srv)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.cmd("IDENTIFY", b'{"heartbeat_interval": 60000}')
    assert c.response() == b"OK"
    c.cmd("SUB t c")
    assert c.response() == b"OK"
    c.cmd("RDY 100")                                 # and never reads again
    big = b"b" * 200_000
    for _ in range(100):                             # 20 MB: more than any socket buffer
        srv.broker.publish("t", big)
    # Nothing is written for a heartbeat interval: nsqd's write deadline.  The
    # clock moves a second per poll, so the stall is met well before the
    # read deadline (two intervals after RDY).
    with caplog.at_level(logging.INFO, logger="minq"):
        wait_until(lambda: clock.advance(1) or
                   channel_stats(srv.broker, "t", "c")["client_count"] == 0,
                   timeout=30, what="the stalled consumer to be dropped")
    assert "write timed out" in caplog.text
    st = channel_stats(srv.broker, "t", "c")
    assert (st["in_flight_count"], st["depth"]) == (0, 100)
    c.close()


def test_close_waits_for_a_command_running_on_a_worker(tmp_path):
    with minq.Broker(data_path=str(tmp_path), durable=True, fsync=True) as b:
        srv = minq.TCPServer(b, "127.0.0.1:0").start()
        r = Raw(srv)
        r.cmd("PUB t", b"fsynced")                   # fsync mode: on a worker thread
        assert r.response() == b"OK"
        r.cmd("PUB t", b"again")
        srv.close()                                  # stops the loop, joins the workers
        r.close()
        assert b.stats()["topics"][0]["message_count"] in (1, 2)


def test_sub_on_a_topic_holding_a_backlog_is_answered_before_it_moves(tmp_path, held_pump):
    with minq.Broker(data_path=str(tmp_path), mem_queue_size=100) as b, \
            minq.TCPServer(b, "127.0.0.1:0").start() as srv:
        publish_backlog(b, "t", 50_000)
        c = subscribed(srv, rdy=10)
        assert b.topic("t").depth > 30_000            # OK came with most still at the topic
        got = [c.message()[2][:8] for _ in range(10)]
        assert got == [b"%08d" % i for i in range(10)]
        held_pump.set()
        c.close()


def test_fuzz_random_and_mutated_frames_get_only_valid_frames(server):
    rnd = random.Random(1234)
    good = [b"IDENTIFY\n" + struct.pack(">l", 2) + b"{}", b"SUB t c\n", b"RDY 3\n",
            b"PUB t\n" + struct.pack(">l", 3) + b"abc", b"NOP\n", b"CLS\n",
            b"MPUB t\n" + struct.pack(">l", 9) + struct.pack(">l", 1) + struct.pack(">l", 1) + b"z",
            b"DPUB t 10\n" + struct.pack(">l", 1) + b"d", b"FIN 0123456789abcdef\n",
            b"REQ 0123456789abcdef 5\n", b"TOUCH 0123456789abcdef\n"]
    import socket
    for i in range(150):
        seq = b"  V2" if rnd.random() < 0.9 else bytes(rnd.randrange(256) for _ in range(4))
        for _ in range(rnd.randrange(1, 6)):
            piece = bytearray(rnd.choice(good))
            roll = rnd.random()
            if roll < 0.3:
                for _ in range(rnd.randrange(1, 4)):
                    piece[rnd.randrange(len(piece))] = rnd.randrange(256)
            elif roll < 0.45:
                piece = piece[:rnd.randrange(len(piece))]
            elif roll < 0.55:
                piece = bytearray(rnd.randbytes(rnd.randrange(1, 64)))
            seq += bytes(piece)
        r = Raw(server, magic=False, timeout=2.0)
        try:
            r.send(seq)
            r.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            while True:     # every frame the server sends must be well formed
                ftype, data = r.frame(skip_heartbeats=False)
                assert ftype in (0, 1, 2)
                if ftype == 1:
                    assert re.match(rb"E_[A-Z_]+( |$)", data), data
                elif ftype == 0:
                    assert data in (b"OK", b"CLOSE_WAIT", b"_heartbeat_") or data.startswith(b"{")
                else:
                    assert len(data) >= 26
        except (EOFError, ConnectionResetError):
            pass
        except (TimeoutError, socket.timeout):   # one class from Python 3.10
            pytest.fail(f"server neither answered nor closed input {seq!r}")
        r.close()
    p = Raw(server)
    p.cmd("PUB survivor", b"ok")
    assert p.response() == b"OK"
    with minq.Client(server.address) as c:
        assert c.publish("survivor", b"ok too") is None


def make_cert(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def client_tls_context():
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tls_upgrade_and_tls_required(tmp_path):
    cert, key = make_cert(tmp_path)
    with tcp_server(tls_cert=cert, tls_key=key, tls_required=True) as srv:
        r = Raw(srv)
        r.cmd("PUB t", b"plain")
        assert r.error() == "E_INVALID cannot PUB in current state (TLS required)"
        with minq.Client(srv.address, tls=client_tls_context()) as c:
            c.publish("t", b"secret")
            with c.consumer("t", "c") as cons:
                m = cons.get(timeout=5)
                assert m.body == b"secret"
                client = channel_stats(srv.broker, "t", "c")["clients"][0]
                assert client["tls"] is True and client["tls_version"].startswith("TLS1.")
                m.finish()


def test_failed_tls_handshake_gets_e_identify_failed(tmp_path):
    cert, key = make_cert(tmp_path)
    with tcp_server(tls_cert=cert, tls_key=key) as srv:
        r = Raw(srv)
        r.cmd("IDENTIFY", b'{"feature_negotiation": true, "tls_v1": true}')
        assert json.loads(r.response())["tls_v1"] is True
        r.send(b"this is not a TLS client hello\n" * 4)
        assert r.error().startswith("E_IDENTIFY_FAILED IDENTIFY failed")
        assert r.closed()
        with minq.Client(srv.address, tls=client_tls_context()) as c:
            c.publish("t", b"others unaffected")


def test_stalled_tls_handshake_gets_e_identify_failed(tmp_path, monkeypatch):
    cert, key = make_cert(tmp_path)
    monkeypatch.setattr(minq, "_TLS_HANDSHAKE_TIMEOUT", 0.3)
    with tcp_server(tls_cert=cert, tls_key=key) as srv:
        r = Raw(srv)
        r.cmd("IDENTIFY", b'{"feature_negotiation": true, "tls_v1": true}')
        assert json.loads(r.response())["tls_v1"] is True
        # ... and never starts the handshake
        assert r.error() == "E_IDENTIFY_FAILED IDENTIFY failed timed out"
        assert r.closed()


def test_deflate_upgrade_round_trip(server):
    with minq.Client(server.address, deflate=True, deflate_level=9) as c:
        big = b"compressible " * 5000
        c.publish("t", big)
        with c.consumer("t", "c") as cons:
            m = cons.get(timeout=5)
            assert m.body == big
            assert channel_stats(server.broker, "t", "c")["clients"][0]["deflate"] is True
            m.finish()
    r = Raw(server)
    r.cmd("IDENTIFY", b'{"feature_negotiation": true, "deflate": true, "deflate_level": 9}')
    assert json.loads(r.response())["deflate_level"] == 6     # capped at max_deflate_level


def test_commands_sent_with_a_deflate_identify_are_inflated(server):
    import zlib
    comp, decomp = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
    ident = b'{"feature_negotiation": true, "deflate": true}'
    big = b"0" * (1 << 20)                            # inflates past one 1 MiB piece
    payload = struct.pack(">l", 3) + (struct.pack(">l", len(big)) + big) * 3
    compressed = comp.compress(b"MPUB t\n" + struct.pack(">l", len(payload)) + payload)
    compressed += comp.flush(zlib.Z_SYNC_FLUSH)
    r = Raw(server)
    r.send(b"IDENTIFY\n" + struct.pack(">l", len(ident)) + ident + compressed)  # not waiting
    assert json.loads(r.response())["deflate"] is True
    out, r.buf = decomp.decompress(r.buf), b""       # what came with the reply
    while out.count(b"OK") < 2:                       # deflate's OK, then MPUB's
        out += decomp.decompress(r.sock.recv(65536))
    assert out == struct.pack(">lL", 6, 0) + b"OK" + struct.pack(">lL", 6, 0) + b"OK"
    assert server.broker.stats()["topics"][0]["message_count"] == 3


def secrets_file(tmp_path):
    """AUTH secrets: "pub-only" may publish to orders, "reader" read orders/billing."""
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({
        "pub-only": {"identity": "ingest", "authorizations": [
            {"topic": "^orders$", "channels": [".*"], "permissions": ["publish"]}]},
        "reader": {"identity": "billing", "authorizations": [
            {"topic": "^orders$", "channels": ["^billing$"], "permissions": ["subscribe"]}]}}))
    return str(secrets)


def test_auth_with_secrets_file(tmp_path):
    with tcp_server(authorizer=minq.Authorizer(secrets_file=secrets_file(tmp_path))) as srv:
        r = Raw(srv)
        r.cmd("IDENTIFY", b'{"feature_negotiation": true}')
        assert json.loads(r.response())["auth_required"] is True
        r.cmd("PUB orders", b"x")
        assert r.error() == "E_AUTH_FIRST AUTH required before PUB"
        r = Raw(srv)
        r.cmd("AUTH", b"pub-only")
        assert json.loads(r.response()) == {"identity": "ingest", "identity_url": "",
                                            "permission_count": 1}
        r.cmd("PUB orders", b"x")
        assert r.response() == b"OK"
        r.cmd("SUB orders billing")
        assert r.error() == 'E_UNAUTHORIZED AUTH failed for SUB on "orders" "billing"'
        r = Raw(srv)
        r.cmd("AUTH", b"wrong")
        assert r.error() == "E_AUTH_FAILED AUTH failed"
        with pytest.raises(minq.ProtocolError) as e:
            minq.Client(srv.address).publish("orders", b"y")
        assert e.value.code == "E_AUTH_FIRST"
        with minq.Client(srv.address, auth_secret="reader") as c:
            with c.consumer("orders", "billing") as cons:
                assert cons.get(timeout=5).body == b"x"


@contextlib.contextmanager
def answering_http(answer):
    """A local HTTP server on a free port: ``answer(request)`` gives each GET's body
    (``request.path``, ``request.headers``); yields the server, with ``address``."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = answer(self)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = False                   # closing joins them
    httpd.address = f"127.0.0.1:{httpd.server_address[1]}"
    serving = threading.Thread(target=httpd.serve_forever, args=(0.05,))
    serving.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        serving.join()


def fake_auth_server(answer):
    """An nsqd auth server: ``answer(query)`` gives each reply's body."""
    import urllib.parse
    return answering_http(lambda req: answer(urllib.parse.parse_qs(req.path.split("?", 1)[1])))


def test_auth_with_http_auth_server(tmp_path):
    seen = []

    def answer(q):
        seen.append(q)
        ok = q["secret"] == ["good"]
        return json.dumps({"ttl": 3600, "identity": "svc", "identity_url": "http://x",
                           "authorizations": [{"topic": ".*", "channels": [".*"],
                                               "permissions": ["publish", "subscribe"]}]}
                          if ok else {"ttl": 1, "authorizations": []}).encode()
    with fake_auth_server(answer) as httpd:
        auth = minq.Authorizer([httpd.address])
        with tcp_server(authorizer=auth) as srv:
            with minq.Client(srv.address, auth_secret="good") as c:
                c.publish("t", b"authorized")
            assert seen[0]["remote_ip"] == ["127.0.0.1"] and seen[0]["tls"] == ["false"]
            r = Raw(srv)
            r.cmd("AUTH", b"bad")
            assert r.error() == "E_UNAUTHORIZED AUTH no authorizations found"


def test_a_pub_split_anywhere_is_read_whole(server):
    data = b"PUB split\n" + struct.pack(">l", 5) + b"hello"
    for cut in range(1, len(data)):
        r = Raw(server)
        r.send(data[:cut])
        time.sleep(0.002)
        r.send(data[cut:])
        assert r.response() == b"OK"
        r.close()
    assert server.broker.get_topic("split").depth == len(data) - 1


def test_single_pubs_published_together_each_get_their_answer(tmp_path, monkeypatch):
    # A connection's PUBs after its first go into the server's publish batch:
    # each gets its own OK, or E_PUB_FAILED when storing them failed.
    monkeypatch.setattr(minq.SegmentLog, "map_window", 0)     # every write a pwrite
    with minq.Broker(data_path=str(tmp_path), durable=True) as b, \
            minq.TCPServer(b, "127.0.0.1:0").start() as srv:
        conns = [Raw(srv) for _ in range(3)]
        for i, r in enumerate(conns):
            r.send(b"".join(b"PUB t\n" + struct.pack(">l", 4) + b"m%d-%d" % (i, k)
                            for k in range(5)))
        for r in conns:
            assert [r.response() for _ in range(5)] == [b"OK"] * 5
        _failing_disk(monkeypatch, lambda: True)
        for r in conns:
            r.cmd("PUB t", b"lost")
        for r in conns:
            assert r.error().startswith("E_PUB_FAILED PUB failed")
        monkeypatch.undo()
        with b.consumer("t", "c", max_in_flight=100) as c:
            got = sorted(m.body for m in drain(c))
        assert got == sorted(b"m%d-%d" % (i, k) for i in range(3) for k in range(5))


def test_pub_failed_when_storage_fails(tmp_path, monkeypatch):
    with minq.Broker(data_path=str(tmp_path), durable=True) as b, \
            minq.TCPServer(b, "127.0.0.1:0").start() as srv:
        _failing_disk(monkeypatch, lambda: True)
        r = Raw(srv)
        r.cmd("PUB t", b"x")
        assert r.error().startswith("E_PUB_FAILED PUB failed")
        monkeypatch.undo()
        r = Raw(srv)
        r.cmd("PUB t", b"x")
        assert r.response() == b"OK"


def test_pub_to_a_new_topic_on_a_full_disk_gets_an_error_and_sub_needs_no_disk(
        tmp_path, monkeypatch, caplog):
    with minq.Broker(data_path=str(tmp_path), durable=True) as b, \
            minq.TCPServer(b, "127.0.0.1:0").start() as srv:
        _full_disk_for_new_files(monkeypatch, tmp_path)
        r = Raw(srv)
        r.cmd("PUB fresh", b"x")
        assert r.error().startswith("E_PUB_FAILED PUB failed")
        assert r.closed()                          # fatal, as in nsqd
        r = Raw(srv)
        r.cmd("SUB other c")                       # files come with the first message
        assert r.response() == b"OK"
        assert "could not record other" in caplog.text and "Traceback" not in caplog.text
        monkeypatch.undo()
        r = Raw(srv)
        r.cmd("PUB fresh", b"x")
        assert r.response() == b"OK"
    with minq.Broker(data_path=str(tmp_path)) as b:     # the failed record was made up for
        assert set(b.topics) == {"fresh", "other"} and set(b.get_topic("other").channels) == {"c"}


def test_identify_with_deeply_nested_json_is_e_bad_body(server, caplog):
    r = Raw(server)
    r.cmd("IDENTIFY", b"[" * 50_000)
    assert r.error() == "E_BAD_BODY IDENTIFY failed to decode JSON body"
    assert "Traceback" not in caplog.text
    with minq.Client(server.address) as c:
        c.publish("t", b"others unaffected")


def test_a_big_body_waits_for_the_memory_budget(server):
    budget = server.body_budget
    assert budget.try_take(budget.limit)             # all of it held elsewhere
    payload = struct.pack(">l", 1) + struct.pack(">l", 100_000) + b"x" * 100_000
    r = Raw(server, timeout=0.3)
    r.cmd("MPUB t", payload)
    with pytest.raises((TimeoutError, socket.timeout)):
        r.frame()                                  # not read, not answered
    budget.give_back(budget.limit)
    r.sock.settimeout(5)
    assert r.response() == b"OK"
    assert budget.used == 0
    r.cmd("PUB t", b"small bodies never wait")
    assert r.response() == b"OK"


AUTH_REPLIES = [b"[" * 50_000, b"5", b'{"ttl": "60", "authorizations": []}',
                b'{"ttl": 60, "authorizations": 5}',
                b'{"ttl": 60, "authorizations": [{"channels": [".*"], "permissions": ["publish"]}]}',
                b'{"ttl": 60, "authorizations": [{"topic": "(", "channels": [], '
                b'"permissions": ["publish"]}]}',
                b'{"ttl": 60, "authorizations": [{"topic": "t", "channels": [3], '
                b'"permissions": ["publish"]}]}', b"not json"]


def test_malformed_auth_server_replies_are_e_auth_failed(caplog):
    replies = list(AUTH_REPLIES)
    with fake_auth_server(lambda q: replies.pop(0)) as httpd:
        auth = minq.Authorizer([httpd.address])
        with tcp_server(authorizer=auth) as srv:
            for _ in AUTH_REPLIES:
                r = Raw(srv)
                r.cmd("AUTH", b"secret")
                assert r.error() == "E_AUTH_FAILED AUTH failed"
            assert not replies
            assert "Traceback" not in caplog.text


def test_auth_server_that_never_answers_fails_after_the_request_timeout():
    silent = socket.create_server(("127.0.0.1", 0))      # accepts into its backlog, says nothing
    try:
        auth = minq.Authorizer([f"127.0.0.1:{silent.getsockname()[1]}"], timeout=0.3)
        with tcp_server(authorizer=auth) as srv:
            r = Raw(srv)
            started = time.monotonic()
            r.cmd("AUTH", b"secret")
            assert r.error() == "E_AUTH_FAILED AUTH failed"
            assert time.monotonic() - started < 3
    finally:
        silent.close()


def test_failed_auth_attempts_are_throttled_per_address(tmp_path, monkeypatch):
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"good": {"authorizations": [
        {"topic": ".*", "channels": [".*"], "permissions": ["publish"]}]}}))
    auth = minq.Authorizer(secrets_file=str(secrets))
    monkeypatch.setattr(auth, "max_failures", 3)
    monkeypatch.setattr(auth, "lockout", 0.5)
    with tcp_server(authorizer=auth) as srv:
        for _ in range(3):
            r = Raw(srv)
            r.cmd("AUTH", b"guess")
            assert r.error() == "E_AUTH_FAILED AUTH failed"
        r = Raw(srv)
        r.cmd("AUTH", b"good")                     # locked out: even a good secret fails
        assert r.error().startswith("E_AUTH_FAILED AUTH failed: too many failures; retry in")
        wait_until(lambda: not auth.locked_out("127.0.0.1"), 5, "the lockout to end")
        r = Raw(srv)
        r.cmd("AUTH", b"good")
        assert json.loads(r.response())["permission_count"] == 1


def test_max_channel_consumers_refuses_one_more():
    with tcp_server(max_channel_consumers=2) as srv:
        first, second, third = Raw(srv), Raw(srv), Raw(srv)
        for r in (first, second):
            r.cmd("SUB t c")
            assert r.response() == b"OK"
        third.cmd("SUB t c")
        assert third.error() == "E_TOO_MANY_CHANNEL_CONSUMERS channel consumers for t:c " \
                                "exceeds limit of 2"
        assert third.closed()
        other = Raw(srv)
        other.cmd("SUB t other")                    # per channel
        assert other.response() == b"OK"


def make_ca_and_client_cert(tmp_path):
    make_cert(tmp_path)                              # skips without openssl
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)
    ca_key, ca, key, csr, cert = (str(tmp_path / n) for n in
                                  ("ca.key", "ca.pem", "client.key", "client.csr", "client.pem"))
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
        "-keyout", ca_key, "-out", ca)
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client", "-keyout", key, "-out", csr)
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
        "-out", cert)
    return ca, cert, key


def test_tls_client_auth_policy_require_verify(tmp_path):
    import ssl
    cert, key = make_cert(tmp_path)
    ca, client_cert, client_key = make_ca_and_client_cert(tmp_path)
    with tcp_server(tls_cert=cert, tls_key=key, tls_root_ca_file=ca,
                    tls_client_auth_policy="require-verify") as srv:
        assert srv.tls_required                       # the policy implies it, as in nsqd
        with pytest.raises((minq.MinqError, ssl.SSLError, OSError)):
            with minq.Client(srv.address, tls=client_tls_context(), timeout=1) as c:
                c.publish("t", b"no certificate")
        ctx = client_tls_context()
        ctx.load_cert_chain(client_cert, client_key)
        with minq.Client(srv.address, tls=ctx) as c:
            c.publish("t", b"with a certificate")
        assert srv.broker.get_topic("t").depth == 1


def test_tls_min_version_refuses_older_clients(tmp_path):
    import ssl
    cert, key = make_cert(tmp_path)
    with tcp_server(tls_cert=cert, tls_key=key, tls_min_version="tls1.3") as srv:
        old = client_tls_context()
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((minq.MinqError, ssl.SSLError, OSError)):
            with minq.Client(srv.address, tls=old, timeout=1) as c:
                c.publish("t", b"x")
        with minq.Client(srv.address, tls=client_tls_context()) as c:
            c.publish("t", b"tls 1.3")
    for bad in ({"tls_min_version": "tls9"}, {"tls_client_auth_policy": "maybe"}):
        with minq.Broker() as b, pytest.raises(minq.InvalidArgument):
            minq.TCPServer(b, "127.0.0.1:0", tls_cert=cert, tls_key=key, **bad)


# -- interop with a real NSQ client ----------------------------------------------

def pynsq_round_trip(address, **writer_options):
    """pynsq's Writer publishes PUB, MPUB and DPUB; its Reader consumes them all."""
    nsq = pytest.importorskip("nsq")
    tornado_ioloop = pytest.importorskip("tornado.ioloop")
    tornado_gen = pytest.importorskip("tornado.gen")
    got, replies = [], []
    loop = tornado_ioloop.IOLoop.current()

    def handler(msg):
        got.append(msg.body)
        if len(got) == 4:
            loop.add_callback(loop.stop)
        return True

    reader = nsq.Reader(message_handler=handler, nsqd_tcp_addresses=[address],
                        topic="interop", channel="py", max_in_flight=10)
    writer = nsq.Writer([address], **writer_options)

    def publish():
        writer.pub("interop", b"one", lambda conn, data: replies.append(data))
        writer.mpub("interop", [b"two", b"three"], lambda conn, data: replies.append(data))
        writer.dpub("interop", 10, b"four", lambda conn, data: replies.append(data))

    loop.call_later(0.5, publish)
    timeout = loop.call_later(15, loop.stop)
    loop.start()
    loop.remove_timeout(timeout)
    reader.close()
    for conn in list(writer.conns.values()):
        conn.close()
    loop.run_sync(lambda: tornado_gen.sleep(0.1))
    assert replies == [b"OK", b"OK", b"OK"]
    assert sorted(got) == [b"four", b"one", b"three", b"two"]


def test_pynsq_writer_and_reader_work_unchanged(server):
    pynsq_round_trip(server.address, deflate=True)
    stats = channel_stats(server.broker, "interop", "py")
    assert stats["depth"] == 0 and stats["in_flight_count"] == 0
    assert stats["message_count"] == 4


def test_pynsq_against_python_minq_py_serve_defaults(tmp_path):
    pytest.importorskip("nsq")
    s = Served(cwd=tmp_path)            # default flags; only the port is free-picked
    try:
        pynsq_round_trip(s.address)
    finally:
        assert s.stop() == 0


def test_client_and_server_speak_snappy(server):
    with minq.Client(server.address, snappy=True) as c:
        c.publish("t", b"squeezed " * 1000)
        with c.consumer("t", "c") as cons:
            m = cons.get(timeout=5)
            assert m.body == b"squeezed " * 1000
            assert channel_stats(server.broker, "t", "c")["clients"][0]["snappy"] is True
            m.finish()
    r = Raw(server)
    r.cmd("IDENTIFY", b'{"feature_negotiation": true, "snappy": true, "deflate": true}')
    assert r.error() == "E_IDENTIFY_FAILED cannot enable both deflate and snappy compression"


def test_corrupt_snappy_input_gets_e_invalid(server):
    r = Raw(server)
    r.cmd("IDENTIFY", b'{"feature_negotiation": true, "snappy": true}')
    assert json.loads(r.response())["snappy"] is True
    packed = bytearray(minq.SnappyCompressor().compress(b"NOP\n"))
    packed[-5] ^= 0xFF                                 # the chunk's checksum no longer fits
    r.send(bytes(packed))
    d = minq.SnappyDecompressor()
    plain = d.decompress(r.buf)            # what came with the IDENTIFY reply
    r.sock.settimeout(5)
    while True:
        chunk = r.sock.recv(65536)
        if not chunk:
            break
        plain += d.decompress(chunk)
    assert plain.startswith(struct.pack(">lL", 6, 0) + b"OK")           # the upgrade's OK
    assert b"E_INVALID failed to read command - snappy: checksum mismatch" in plain


def snappy_session(server):
    """A connection past an IDENTIFY that negotiated snappy, and a decoder of
    what the server sends from then on (python-snappy's, not minq's)."""
    snappy = pytest.importorskip("snappy")
    r = Raw(server)
    r.cmd("IDENTIFY", b'{"feature_negotiation": true, "snappy": true}')
    assert json.loads(r.response())["snappy"] is True
    d = snappy.StreamDecompressor()
    plain, r.buf = d.decompress(r.buf), b""

    def frames(n):
        nonlocal plain
        out = []
        while len(out) < n:
            if len(plain) >= 4 and len(plain) >= 4 + struct.unpack_from(">l", plain)[0]:
                size = struct.unpack_from(">l", plain)[0]
                out.append((struct.unpack_from(">L", plain, 4)[0], plain[8:4 + size]))
                plain = plain[4 + size:]
                continue
            chunk = r.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed after {out}")
            plain += d.decompress(chunk)
        return out
    return r, frames


@pytest.mark.parametrize("piece", [1, 7, 1000, 4096, 30000])
def test_a_snappy_stream_cut_anywhere_is_read_whole(server, piece):
    # Compressed and stored chunks, a stream identifier repeated midway, and
    # a 500 KiB MPUB (chunks of 64 KiB), sent in pieces of *piece* bytes.
    rnd = random.Random(piece)
    big = [rnd.randbytes(500) for _ in range(1000)]
    cmds = [b"PUB s\n" + struct.pack(">l", 2000) + b"text " * 400,
            b"PUB s\n" + struct.pack(">l", 300) + rnd.randbytes(300),
            b"MPUB s\n" + struct.pack(">ll", 4 + 504 * 1000, 1000)
            + b"".join(struct.pack(">l", 500) + b for b in big),
            b"NOP\n", b"PUB s\n" + struct.pack(">l", 5) + b"after"]
    c = minq.SnappyCompressor()
    stream = c.compress(b"".join(cmds[:2])) + minq.SnappyCompressor().compress(
        b"".join(cmds[2:]))                        # the second carries its own identifier
    r, frames = snappy_session(server)
    for i in range(0, len(stream), piece):
        r.send(stream[i:i + piece])
    assert frames(5)[1:] == [(0, b"OK")] * 4          # the upgrade's OK, then one per publish
    with server.broker.consumer("s", "c", max_in_flight=2000) as cons:
        got = [m.body for m in drain(cons, 1003)]
    assert got == [b"text " * 400, cmds[1][-300:]] + big + [b"after"]


def test_client_publishes_incompressible_bodies_over_snappy(server):
    bodies = [os.urandom(500) for _ in range(1000)]
    with minq.Client(server.address, snappy=True) as c:
        c.publish_many("t", bodies)
        with c.consumer("t", "c", max_in_flight=1000) as cons:
            got = [m.body for m in drain(cons, 1000, timeout=5)]
    assert got == bodies


def test_a_bad_stream_after_a_worker_s_command_ends_the_connection(server):
    # The PUB to a new topic runs on a worker; the damaged chunk after it is
    # met when its input resumes: an error and a close, not a stalled client.
    r, frames = snappy_session(server)
    packed = bytearray(minq.SnappyCompressor().compress(b"NOP\n"))
    packed[-5] ^= 0xFF
    r.send(minq.SnappyCompressor().compress(b"PUB fresh\n" + struct.pack(">l", 1) + b"x")
           + bytes(packed[10:]))
    ok, answer, err = frames(3)
    assert answer == (0, b"OK")
    assert err[0] == 1 and err[1].startswith(b"E_INVALID failed to read command - snappy")
    assert r.closed()


def test_an_unexpected_error_reading_a_command_ends_only_that_connection(server, monkeypatch,
                                                                          caplog):
    real = minq._NSQProtocol._run

    def run(proto, line):
        if line.startswith(b"NOP"):
            raise RuntimeError("a bug")
        return real(proto, line)
    monkeypatch.setattr(minq._NSQProtocol, "_run", run)
    r, other = Raw(server), Raw(server)
    r.cmd("NOP")
    assert r.error() == "E_INVALID internal error: a bug" and r.closed()
    other.cmd("PUB t", b"x")
    assert other.response() == b"OK"
    assert "its input could not be read" in caplog.text


def test_pynsq_with_snappy(server):
    pytest.importorskip("snappy")
    pynsq_round_trip(server.address, snappy=True)
    assert channel_stats(server.broker, "interop", "py")["depth"] == 0


# =============================================================================
# Client: the Broker's API over TCP
# =============================================================================

def test_client_publish_consume_requeue_and_errors(server):
    with minq.Client(server.address) as c:
        c.publish("t", b"a")
        c.publish_many("t", [b"b", b"c"])
        with pytest.raises(minq.InvalidName):
            c.publish("bad topic", b"x")
        with pytest.raises(minq.InvalidMessage):
            c.publish("t", b"x" * (2 * 1024 * 1024))     # the server's E_BAD_MESSAGE
        with pytest.raises(minq.InvalidArgument):
            c.publish("t", b"x", defer=7200)              # E_INVALID: over max_req_timeout
        with c.consumer("t", "c", max_in_flight=3) as cons:
            msgs = [cons.get(timeout=5) for _ in range(3)]
            assert sorted(m.body for m in msgs) == [b"a", b"b", b"c"]
            msgs[0].requeue()
            again = cons.get(timeout=5)
            assert (again.body, again.attempts) == (msgs[0].body, 2)
            for m in [again] + msgs[1:]:
                m.finish()
            with pytest.raises(minq.NotInFlight):
                again.finish()
    assert channel_stats(server.broker, "t", "c")["depth"] == 0


def test_client_subscribe_runs_handler(server):
    seen, done = [], threading.Event()

    def handler(msg):
        seen.append(msg.body)
        if len(seen) == 20:
            done.set()

    with minq.Client(server.address) as c:
        sub = c.subscribe("t", "c", handler, max_in_flight=8, workers=2)
        c.publish_many("t", [b"%d" % i for i in range(20)])
        assert done.wait(10)
        sub.close()
    assert sorted(seen) == sorted(b"%d" % i for i in range(20))


def test_client_reconnects_after_server_restart():
    b = minq.Broker()
    srv = minq.TCPServer(b, "127.0.0.1:0").start()
    address = srv.address
    c = minq.Client(address, max_backoff=0.2)
    cons = c.consumer("t", "c")
    try:
        assert cons.connected.wait(5)
        srv.close()
        srv = minq.TCPServer(b, address).start()     # same port
        c.publish("t", b"after restart")              # the publisher reconnects too
        m = cons.get(timeout=10)
        assert m.body == b"after restart"
        m.finish()
    finally:
        c.close()
        srv.close()
        b.close()


def test_client_connection_refused_raises_connection_lost():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with minq.Client(f"127.0.0.1:{port}", timeout=0.3) as c:
        with pytest.raises(minq.ConnectionLost):
            c.publish("t", b"x")


# -- nsqlookupd registration, against a fake lookupd speaking TCP protocol V1 --

class FakeLookupd:
    """A real TCP listener speaking nsqlookupd's V1 protocol; records what it hears.

    ``reply_error`` makes it answer the next IDENTIFY with that error and close.
    """

    def __init__(self, port=0, http_port=None):
        import socket
        self.http_port = http_port        # reported in IDENTIFY's reply, with 127.0.0.1
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.heard = __import__("queue").Queue()      # (connection number, line, body)
        self.reply_error = None
        self.conns, self.threads = [], []
        self.accepter = threading.Thread(target=self._accept)
        self.accepter.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, len(self.conns)))
            self.threads.append(t)
            t.start()

    def _serve(self, conn, n):
        f = conn.makefile("rb")
        try:
            assert f.read(4) == b"  V1"
            while True:
                line = f.readline()
                if not line:
                    return
                line = line.decode().strip()
                body = None
                if line == "IDENTIFY":
                    body = json.loads(f.read(struct.unpack(">l", f.read(4))[0]))
                    if self.reply_error:
                        err, self.reply_error = self.reply_error.encode(), None
                        conn.sendall(struct.pack(">l", len(err)) + err)
                        return
                    reply = json.dumps({
                        "tcp_port": 4160, "http_port": self.http_port or 4161, "version": "1.3.0",
                        # no address unless asked: then nobody looks up a name
                        "broadcast_address": "127.0.0.1" if self.http_port else "",
                        "hostname": "fake"}).encode()
                else:
                    reply = b"OK"
                self.heard.put((n, line, body))
                conn.sendall(struct.pack(">l", len(reply)) + reply)
        except (OSError, ValueError, AssertionError):
            pass
        finally:
            f.close()
            conn.close()

    def next(self, timeout=10):
        return self.heard.get(timeout=timeout)

    def lines(self, count, timeout=10):
        return [self.next(timeout)[1] for _ in range(count)]

    def close(self):
        import socket
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.accepter.join(5)
        for t in self.threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def registered():
    """A broker with two topics, registered with a fake lookupd that PINGs fast."""
    b = minq.Broker()
    b.topic("existing").channel("ch")
    b.topic("lonely")
    lk = FakeLookupd()
    reg = minq.LookupdRegistrar(b, [lk.address], broadcast_address="10.0.0.7",
                                tcp_port=4150, http_port=4151, ping_interval=0.2)
    reg.start()
    yield b, lk, reg
    reg.close()
    lk.close()
    b.close()


def test_lookupd_identify_then_register_everything(registered):
    b, lk, reg = registered
    n, line, ident = lk.next()
    assert line == "IDENTIFY"
    assert {k: ident[k] for k in ("version", "broadcast_address", "tcp_port", "http_port")} == \
        {"version": minq.NSQ_VERSION, "broadcast_address": "10.0.0.7",
         "tcp_port": 4150, "http_port": 4151}
    assert ident["hostname"]
    assert sorted(lk.lines(2)) == ["REGISTER existing ch", "REGISTER lonely"]
    assert reg.peers[0].info["hostname"] == "fake"


def test_lookupd_hears_creates_deletes_and_pings(registered):
    b, lk, reg = registered
    lk.lines(3)                                   # IDENTIFY and the two REGISTERs
    b.topic("new").channel("c2")
    assert lk.lines(2) == ["REGISTER new", "REGISTER new c2"]
    b.get_topic("new").delete_channel("c2")
    assert lk.lines(1) == ["UNREGISTER new c2"]
    b.delete_topic("lonely")
    assert lk.lines(1) == ["UNREGISTER lonely"]
    assert lk.lines(2) == ["PING", "PING"]         # every ping_interval while idle


def test_lookupd_restart_gets_everything_registered_again(registered):
    b, lk, reg = registered
    lk.lines(3)
    port = lk.port
    lk.close()
    b.topic("while_down")                          # happens while lookupd is away
    lk2 = FakeLookupd(port)
    try:
        n, line, _ = lk2.next()
        assert line == "IDENTIFY"
        assert sorted(lk2.lines(3)) == ["REGISTER existing ch", "REGISTER lonely",
                                        "REGISTER while_down"]
        assert reg.peers[0].connected
    finally:
        reg.close()
        lk2.close()


def test_lookupd_error_reply_is_logged_and_retried(caplog):
    b = minq.Broker()
    with FakeLookupd() as lk:
        lk.reply_error = "E_BAD_BODY IDENTIFY missing fields"
        with minq.LookupdRegistrar(b, [lk.address], broadcast_address="h", tcp_port=1,
                                   http_port=2, ping_interval=0.2):
            assert lk.next()[1] == "IDENTIFY"      # the second attempt, after the refusal
        assert "E_BAD_BODY" in caplog.text
    b.close()


def test_str_bodies_are_utf8_everywhere(server):
    web = minq.HTTPServer(server.broker, "127.0.0.1:0").start()
    try:
        b = server.broker
        b.publish("t", "héllo")                                   # in-process
        b.publish_many("t", ["wörld"])
        with minq.Client(server.address) as c:                    # over TCP
            c.publish("t", "über")
            c.publish_many("t", ["ça", b"bytes too"])
        assert http(web, "POST", "/pub?topic=t", "ünï".encode())[0] == 200   # over HTTP
        with b.consumer("t", "c", max_in_flight=10) as cons:
            got = drain_finishing(cons, 6)
        assert got == [s.encode() for s in ("héllo", "wörld", "über", "ça")] + \
            [b"bytes too", "ünï".encode()]
        for bad in (5, None, ["list"]):
            with pytest.raises(minq.InvalidMessage):
                b.publish("t", bad)
            with minq.Client(server.address) as c, pytest.raises(minq.InvalidMessage):
                c.publish("t", bad)
    finally:
        web.close()


def test_client_subscription_takes_middleware_too(server):
    trace = []

    def outer(msg, nxt):
        trace.append("outer")
        return nxt(msg)
    done = threading.Event()
    with minq.Client(server.address) as c:
        sub = c.subscribe("t", "c", lambda m: (trace.append(m.body), done.set()),
                          middleware=[outer, minq.dedup()])
        c.publish("t", b"over tcp")
        assert done.wait(10)
        sub.close()
    assert trace == ["outer", b"over tcp"]


def test_random_dispatch_over_tcp(server, monkeypatch):
    monkeypatch.setattr(minq, "_random", random.Random(3))
    server.broker.topic("t").channel("c", dispatch="random")
    with minq.Client(server.address) as c:
        cons = [c.consumer("t", "c", max_in_flight=300) for _ in range(2)]
        wait_until(lambda: channel_stats(server.broker, "t", "c")["client_count"] == 2)
        c.publish_many("t", [b"x"] * 300)
        counts = [len(drain(k, timeout=0.5)) for k in cons]
        assert sum(counts) == 300 and min(counts) > 100, counts
        for k in cons:
            k.close()


# =============================================================================
# asyncio clients: AsyncBroker (in-process) and AsyncClient (over TCP)
# =============================================================================

def arun(coro, timeout=30):
    """Run *coro* in a fresh event loop, bounded; no task of minq may outlive it."""
    async def main():
        result = await asyncio.wait_for(coro, timeout)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not left, f"tasks left running: {left}"
        return result
    return asyncio.run(main())


def real_nsq_binary(name):
    """A real NSQ binary, where one is built: ``MINQ_NSQD`` names nsqd (and its
    folder nsqlookupd), else PATH; skip the test otherwise."""
    nsqd = os.environ.get("MINQ_NSQD") or shutil.which("nsqd")
    found = nsqd if name == "nsqd" else (
        os.path.join(os.path.dirname(nsqd), name) if nsqd else shutil.which(name))
    if not found or not os.access(found, os.X_OK):
        pytest.skip(f"no real {name} built here (set MINQ_NSQD=/path/to/nsqd)")
    return found


def free_ports(n):
    ports, held = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
        ports.append(s.getsockname()[1])
    for s in held:
        s.close()
    return ports


@contextlib.contextmanager
def real_nsq(name, *flags):
    """A real nsqd or nsqlookupd on free loopback ports: yields (tcp, http) addresses."""
    tcp, http = free_ports(2)
    p = subprocess.Popen([real_nsq_binary(name), f"--tcp-address=127.0.0.1:{tcp}",
                          f"--http-address=127.0.0.1:{http}", *flags],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{name} did not start"
                time.sleep(0.05)
        yield f"127.0.0.1:{tcp}", f"127.0.0.1:{http}"
    finally:
        p.terminate()
        p.wait(10)


@pytest.fixture(params=["minq", "nsqd"])
def nsqd_address(request, tmp_path):
    """A TCP address served by minq, then by a real nsqd where one is built."""
    if request.param == "minq":
        with tcp_server() as srv:
            yield srv.address
        return
    with real_nsq("nsqd", f"--data-path={tmp_path}") as (tcp, _):
        yield tcp


def test_async_client_pipelines_a_thousand_concurrent_publishes_on_one_connection(nsqd_address):
    async def main():
        async with minq.AsyncClient(nsqd_address) as c:
            await asyncio.gather(*[c.publish("t", b"%d" % i) for i in range(1000)])
            conns = {id(c._pub_conn)}
            await c.publish_many("t", [b"m1", b"m2"])
            await c.publish("t", b"later", defer=0.05)
            conns.add(id(c._pub_conn))
            assert len(conns) == 1                     # one connection carried them all
            got, want = set(), {b"%d" % i for i in range(1000)} | {b"m1", b"m2", b"later"}
            async with c.consumer("t", "c", max_in_flight=200) as cons:
                while len(got) < 1003:
                    # (nsqd scans a new channel's deferred messages after up to 5 s)
                    m = await cons.get(timeout=10)
                    assert m is not None, f"never came: {want - got}"
                    got.add(m.body)
                    m.finish()
            assert got == want
    arun(main())


def test_async_consumer_finish_requeue_touch(nsqd_address):
    async def main():
        async with minq.AsyncClient(nsqd_address, msg_timeout=1.0) as c:
            await c.publish_many("t", [b"a", b"b"])
            async with c.consumer("t", "c", max_in_flight=2) as cons:
                first, second = await cons.get(timeout=5), await cons.get(timeout=5)
                assert {first.body, second.body} == {b"a", b"b"}
                first.requeue()
                again = await cons.get(timeout=5)
                assert (again.body, again.attempts) == (first.body, 2)
                with pytest.raises(minq.NotInFlight):
                    first.finish()                     # settled by the requeue
                again.finish()
                for _ in range(3):                     # 1.2 s held, past the 1 s timeout
                    await asyncio.sleep(0.4)
                    second.touch()
                second.finish()
                assert await cons.get(timeout=1.1) is None   # nothing timed out and came back
    arun(main())


def test_async_client_maps_errors_and_resends_what_the_server_never_read(server):
    async def main():
        async with minq.AsyncClient(server.address) as c:
            with pytest.raises(minq.InvalidName):
                await c.publish("bad topic", b"x")
            with pytest.raises(minq.InvalidMessage):
                await c.publish("t", b"")
            results = await asyncio.gather(
                *[c.publish("t", b"x" * (2 * 1024 * 1024) if i == 3 else b"%d" % i)
                  for i in range(10)], return_exceptions=True)
            assert isinstance(results[3], minq.InvalidMessage)     # E_BAD_MESSAGE
            assert [r for i, r in enumerate(results) if i != 3] == [None] * 9
            with pytest.raises(minq.InvalidArgument):
                await c.publish("t", b"x", defer=7200)               # E_INVALID
            await c.publish("t", b"after")
    arun(main())
    [topic] = [t for t in server.broker.stats()["topics"] if t["topic_name"] == "t"]
    assert topic["message_count"] == 10                 # 9 of the batch + "after", once each


def test_async_client_connection_refused_and_closed_client():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def main():
        c = minq.AsyncClient(f"127.0.0.1:{port}", timeout=0.3)
        with pytest.raises(minq.ConnectionLost):
            await c.publish("t", b"x")
        await c.close()
        with pytest.raises(minq.BrokerClosed):
            await c.publish("t", b"x")
    arun(main())


def test_async_client_rejects_a_server_that_breaks_the_protocol():
    """A peer answering IDENTIFY with garbage gets ProtocolError, not a hang."""
    async def main(address):
        async with minq.AsyncClient(address, timeout=2) as c:
            with pytest.raises(minq.ProtocolError) as e:
                await c.publish("t", b"x")
            assert e.value.code == "E_PROTOCOL"
    with one_reply_server(b"\x7f\xff\xff\xff garbage") as (address, _):   # a size out of range
        arun(main(address))


@contextlib.contextmanager
def one_reply_server(reply, conns=1):
    """A fake nsqd on loopback: each of *conns* connections gets *reply* to its
    first bytes, then silence (nothing sent, nothing read). Yields the address
    and the accepted sockets."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    accepted = []

    def serve():
        with contextlib.suppress(OSError):
            for _ in range(conns):
                conn, _ = listener.accept()
                accepted.append(conn)
                conn.recv(4096)
                conn.sendall(reply)
    t = threading.Thread(target=serve)
    t.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        listener.close()
        t.join(5)
        for conn in accepted:
            conn.close()


IDENTIFY_OK = struct.pack(">lL", 6, 0) + b"OK"


def test_async_client_answers_heartbeats_and_keeps_its_connection():
    """The server (on a fake clock) sends a heartbeat every second and drops a
    client silent for two: the client's NOPs keep the same connection alive."""
    clock = minq.FakeClock()
    with minq.Broker(clock=clock) as b, minq.TCPServer(b, "127.0.0.1:0").start() as srv:
        async def main():
            async with minq.AsyncClient(srv.address, heartbeat_interval=1.0) as c:
                async with c.consumer("t", "c") as cons:
                    await asyncio.wait_for(asyncio.shield(cons.subscribed), 5)
                    first = cons._conns[srv.address]
                    for _ in range(6):                   # six heartbeats, six NOPs
                        clock.advance(1.0)
                        await asyncio.sleep(0.05)
                    b.publish("t", b"still here")
                    m = await cons.get(timeout=5)
                    assert m.body == b"still here" and m._conn is first
                    m.finish()
        arun(main())


def test_async_client_drops_a_silent_server_and_dials_again():
    """No data for two heartbeat intervals: the peer is dead; the consumer reconnects."""
    async def main(address, accepted):
        async with minq.AsyncClient(address, heartbeat_interval=0.1) as c:
            async with c.consumer("t", "c"):
                for _ in range(300):
                    if len(accepted) == 2:
                        break
                    await asyncio.sleep(0.01)
        assert len(accepted) == 2                      # dropped after 0.2 s, dialled again
    with one_reply_server(IDENTIFY_OK, conns=2) as (address, accepted):
        arun(main(address, accepted))


def test_async_client_close_is_bounded_when_the_server_reads_nothing():
    """A server that stops reading cannot hold close() open: the bytes still
    queued for it are dropped after *timeout*, and the waiting publishes fail."""
    async def main(address):
        c = minq.AsyncClient(address, timeout=0.5)
        body = b"x" * (1 << 20)
        pubs = [asyncio.ensure_future(c.publish("t", body)) for _ in range(64)]
        await asyncio.sleep(0.3)                        # 64 MiB queued, most of it unsent
        started = time.monotonic()
        await c.close()
        assert time.monotonic() - started < 3
        results = await asyncio.gather(*pubs, return_exceptions=True)
        assert all(isinstance(r, minq.ConnectionLost) for r in results), results[:3]
    with one_reply_server(IDENTIFY_OK) as (address, _):
        arun(main(address))


def test_async_get_cancelled_loses_no_message(server):
    async def main():
        async with minq.AsyncClient(server.address) as c:
            async with c.consumer("t", "c", max_in_flight=5) as cons:
                waiting = asyncio.ensure_future(cons.get())
                await asyncio.sleep(0.05)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                await c.publish("t", b"kept")
                m = await cons.get(timeout=5)
                assert m.body == b"kept" and m.attempts == 1
                m.finish()
                assert await cons.get(timeout=0.05) is None
    arun(main())


def test_async_subscribe_bounds_concurrency_and_backs_off(server):
    running, most, seen, failed_at = 0, 0, [], {}

    async def handler(msg):
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.01)
            if msg.body == b"flaky" and msg.attempts < 3:
                failed_at[msg.attempts] = time.monotonic()
                raise RuntimeError("not yet")
            seen.append(msg.body)
        finally:
            running -= 1

    async def main():
        async with minq.AsyncClient(server.address) as c:
            sub = await c.subscribe("t", "c", handler, max_in_flight=20, concurrency=3,
                                    backoff=0.1)
            await c.publish_many("t", [b"%d" % i for i in range(30)] + [b"flaky"])
            deadline = time.monotonic() + 10
            while len(seen) < 31 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await sub.close()
    arun(main())
    assert sorted(seen) == sorted([b"%d" % i for i in range(30)] + [b"flaky"])
    assert most == 3                                   # never more than concurrency at once
    assert failed_at[2] - failed_at[1] >= 0.1          # requeued after backoff * 2**0
    assert channel_stats(server.broker, "t", "c")["depth"] == 0


def test_async_subscription_close_lets_handlers_end_and_gives_back_the_rest(server):
    started, ended = [], []

    async def handler(msg):
        started.append(msg.body)
        await asyncio.sleep(0.2)
        ended.append(msg.body)

    async def main():
        async with minq.AsyncClient(server.address) as c:
            await c.publish_many("t", [b"%d" % i for i in range(10)])
            sub = await c.subscribe("t", "c", handler, max_in_flight=10, concurrency=2)
            while len(started) < 2:
                await asyncio.sleep(0.01)
            await sub.close()
    arun(main())
    assert len(ended) == len(started) == 2             # the two running ended; no new one began
    wait_until(lambda: channel_stats(server.broker, "t", "c")["depth"] == 8, what="the rest back")
    assert channel_stats(server.broker, "t", "c")["in_flight_count"] == 0


def test_async_subscription_takes_async_middleware_and_the_built_in_layers(server):
    order = []

    async def mine(msg, nxt):
        order.append("before")
        result = await nxt(msg)
        order.append("after")
        return result

    async def handler(msg):
        order.append(msg.body)

    async def main():
        async with minq.AsyncClient(server.address) as c:
            sub = await c.subscribe("t", "c", handler, concurrency=1, middleware=[
                mine, minq.log_timing(), minq.dedup(key=lambda m: m.body),
                minq.keep_touching(0.05), minq.requeue_on(KeyError)])
            await c.publish("t", b"x")
            await c.publish("t", b"x")                  # a duplicate: finished unhandled
            while order.count("after") < 2:
                await asyncio.sleep(0.01)
            await sub.close()
    arun(main())
    assert order == ["before", b"x", "after", "before", "after"]


async def round_trip(client, n=200):
    """Publish *n* compressible bodies at once through *client*, read every one
    back on channel "c" and finish it; the consumer stays open for a check."""
    bodies = [b"body %d " % i * 50 for i in range(n)]
    await asyncio.gather(*[client.publish("t", body) for body in bodies])
    cons = client.consumer("t", "c", max_in_flight=50)
    got = []
    while len(got) < n:
        m = await cons.get(timeout=5)
        assert m is not None, f"{n - len(got)} never came"
        got.append(m.body)
        m.finish()
    assert sorted(got) == sorted(bodies)


@pytest.mark.parametrize("layer", ["tls", "snappy", "deflate", "tls+snappy", "tls+deflate"])
def test_async_client_over_tls_snappy_and_deflate(tmp_path, layer):
    cert, key = make_cert(tmp_path) if "tls" in layer else (None, None)
    opts = dict(tls=client_tls_context() if cert else None, snappy="snappy" in layer,
                deflate="deflate" in layer)
    server_opts = dict(tls_cert=cert, tls_key=key, tls_required=True) if cert else {}
    with tcp_server(**server_opts) as srv:
        async def main():
            async with minq.AsyncClient(srv.address, **opts) as c:
                await round_trip(c)
                [client] = channel_stats(srv.broker, "t", "c")["clients"]   # still there
            return client
        client = arun(main())
    assert client["tls"] is bool(cert)
    assert client["snappy"] is opts["snappy"] and client["deflate"] is opts["deflate"]


@pytest.mark.parametrize("layer", ["tls+snappy", "tls+deflate"])
def test_async_client_over_tls_snappy_and_deflate_to_a_real_nsqd(tmp_path, layer):
    cert, key = make_cert(tmp_path)
    with real_nsq("nsqd", f"--data-path={tmp_path}", f"--tls-cert={cert}", f"--tls-key={key}",
                  "--tls-required=true", "--snappy=true", "--deflate=true") as (address, _):
        async def main():
            async with minq.AsyncClient(address, tls=client_tls_context(),
                                        snappy="snappy" in layer,
                                        deflate="deflate" in layer) as c:
                await round_trip(c)
        arun(main())


def test_async_consumer_reads_minq_and_nsqd_that_a_real_nsqlookupd_lists(tmp_path):
    """A real nsqlookupd, a real nsqd and ``minq.py serve`` registered with it:
    the consumer reads both, and drops minq's when it stops."""
    with real_nsq("nsqlookupd") as (lookupd_tcp, lookupd_http), \
            real_nsq("nsqd", f"--data-path={tmp_path}", f"--lookupd-tcp-address={lookupd_tcp}",
                     "--broadcast-address=127.0.0.1") as (nsqd, _):
        s = Served("--data-path", "", "--lookupd-tcp-address", lookupd_tcp,
                   "--broadcast-address", "127.0.0.1", cwd=tmp_path)
        try:
            async def main():
                async with minq.AsyncClient(s.address) as a, minq.AsyncClient(nsqd) as b:
                    await a.publish("t", b"from minq")
                    await b.publish("t", b"from nsqd")
                async with minq.AsyncClient(None, lookupd_http_addresses=[lookupd_http],
                                            lookupd_poll_interval=0.1) as c:
                    async with c.consumer("t", "c", max_in_flight=10) as cons:
                        got = set()
                        while len(got) < 2:
                            m = await cons.get(timeout=10)
                            assert m is not None, got
                            got.add(m.body)
                            m.finish()
                        assert got == {b"from minq", b"from nsqd"}
                        assert cons.connections == sorted([s.address, nsqd])
                        s.stop()
                        for _ in range(200):
                            if cons.connections == [nsqd]:
                                break
                            await asyncio.sleep(0.05)
                        assert cons.connections == [nsqd]
            arun(main())
        finally:
            if s.proc.poll() is None:
                s.stop()


def test_async_client_sends_auth_and_maps_its_refusals(tmp_path):
    with tcp_server(authorizer=minq.Authorizer(secrets_file=secrets_file(tmp_path))) as srv:
        async def main():
            async with minq.AsyncClient(srv.address) as c:
                with pytest.raises(minq.ProtocolError) as e:
                    await c.publish("orders", b"x")          # no secret to give
                assert e.value.code == "E_AUTH_FIRST"
            async with minq.AsyncClient(srv.address, auth_secret="wrong", timeout=0.5) as c:
                with pytest.raises(minq.ProtocolError) as e:
                    await c.publish("orders", b"x")
                assert e.value.code == "E_AUTH_FAILED"
            async with minq.AsyncClient(srv.address, auth_secret="pub-only") as c:
                await c.publish("orders", b"paid")
                with pytest.raises(minq.ProtocolError) as e:
                    await c.publish("refunds", b"x")          # a topic it may not publish to
                assert e.value.code == "E_UNAUTHORIZED"
                await c.publish("orders", b"and again")        # a new connection, AUTH again
            async with minq.AsyncClient(srv.address, auth_secret="reader") as c:
                async with c.consumer("orders", "billing", max_in_flight=2) as cons:
                    got = {(await cons.get(timeout=5)).body for _ in range(2)}
            return got
        assert arun(main()) == {b"paid", b"and again"}


def test_async_consumer_follows_lookupd_producers_as_they_come_and_go():
    """Producers appear in lookupd's answer and are read; one that goes away
    is dropped and not dialled again; max_in_flight is shared between them."""
    listed, asked = [], []

    def answer(req):
        asked.append(req.path)
        return json.dumps({"channels": [], "producers": [
            {"broadcast_address": "127.0.0.1", "tcp_port": int(s.address.rsplit(":", 1)[1]),
             "http_port": 1} for s in listed]}).encode()

    with tcp_server() as a, tcp_server() as b, answering_http(answer) as lookupd:
        def rdy(srv):
            return [cl["ready_count"] for t in srv.broker.stats()["topics"]
                    for ch in t["channels"] for cl in ch["clients"]]

        async def until(check):
            for _ in range(500):
                if check():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("never happened")

        async def main():
            listed.append(a)
            async with minq.AsyncClient(None, lookupd_http_addresses=[lookupd.address],
                                        lookupd_poll_interval=0.05) as c:
                async with c.consumer("t", "c", max_in_flight=4) as cons:
                    await until(lambda: rdy(a) == [4])
                    a.broker.publish("t", b"from a")
                    m = await cons.get(timeout=5)
                    assert m.body == b"from a"
                    m.finish()
                    listed.append(b)                     # a producer appears
                    await until(lambda: rdy(a) == [2] and rdy(b) == [2])
                    b.broker.publish("t", b"from b")
                    m = await cons.get(timeout=5)
                    assert m.body == b"from b"
                    m.finish()
                    listed.remove(b)                     # ...and goes away
                    b.close()
                    await until(lambda: cons.connections == [a.address] and rdy(a) == [4])
                    polls = len(asked)
                    await until(lambda: len(asked) > polls + 3)
                    assert cons.connections == [a.address]   # not dialled again
        arun(main())


def test_async_consumer_shares_a_small_max_in_flight_by_turns(monkeypatch):
    """More connections than max_in_flight: RDY 1 moves round them, none starves."""
    monkeypatch.setattr(minq, "_RDY_ROTATE", 0.05)
    with tcp_server() as a, tcp_server() as b, tcp_server() as c3:
        servers = [a, b, c3]
        producers = [{"broadcast_address": "127.0.0.1", "http_port": 1,
                      "tcp_port": int(s.address.rsplit(":", 1)[1])} for s in servers]
        with answering_http(lambda req: json.dumps({"producers": producers}).encode()) as lk:
            for s in servers:
                s.broker.publish("t", s.address.encode())

            async def main():
                async with minq.AsyncClient(None, lookupd_http_addresses=lk.address) as c:
                    async with c.consumer("t", "c", max_in_flight=1) as cons:
                        got = set()
                        while len(got) < 3:
                            m = await cons.get(timeout=5)
                            assert m is not None, f"starved: {got}"
                            got.add(m.body)
                            m.finish()
                        return got
            assert arun(main()) == {s.address.encode() for s in servers}


def test_async_client_survives_a_durable_server_kill9_losing_nothing(tmp_path):
    """Publishing and consuming through a SIGKILL and restart of ``serve --durable``:
    both reconnect; every publish that returned is delivered."""
    s = Served("--data-path", "d", "--durable", cwd=tmp_path)
    address = s.address
    acked, got = set(), set()

    async def main():
        nonlocal s
        async with minq.AsyncClient(address, max_backoff=0.1, timeout=10) as c:
            async with c.consumer("t", "c", max_in_flight=50) as cons:
                async def consume():
                    while True:
                        m = await cons.get(timeout=0.5)
                        if m is None:
                            if len(got) >= 400 and acked <= got:
                                return
                            continue
                        got.add(m.body)
                        try:
                            m.finish()
                        except minq.NotInFlight:
                            pass                        # its connection died: it comes again
                reading = asyncio.ensure_future(consume())
                for i in range(400):
                    if i == 200:
                        s.stop(signal.SIGKILL)
                        s = Served("--data-path", "d", "--durable", "--tcp-address", address,
                                   cwd=tmp_path)
                    body = b"m%d" % i
                    for _ in range(50):
                        try:
                            await c.publish("t", body)
                            acked.add(body)
                            break
                        except minq.ConnectionLost:
                            await asyncio.sleep(0.05)
                await asyncio.wait_for(reading, 20)
    try:
        arun(main(), timeout=60)
    finally:
        s.stop()
    assert len(acked) == 400 and acked <= got


def test_async_close_leaves_nothing_behind_under_dev_mode(server, tmp_path):
    """``python -X dev``: no pending task, unclosed transport, never-retrieved
    error or thread left, by an AsyncClient or an AsyncBroker in fsync mode."""
    script = textwrap.dedent(f"""
        import asyncio, gc, threading, minq
        async def handler(msg):
            pass
        async def main():
            async with minq.AsyncClient({server.address!r}) as c:
                await asyncio.gather(*[c.publish("t", b"x") for _ in range(100)])
                sub = await c.subscribe("t", "c", handler)
                cons = c.consumer("t", "c2")
                waiter = asyncio.ensure_future(cons.get())
                await asyncio.sleep(0.1)
            assert await waiter is None                  # close ends a waiting get()
            with minq.Broker(data_path={str(tmp_path)!r}, fsync=True) as b:
                async with minq.AsyncBroker(b) as ab:
                    sub = await ab.subscribe("t", "c", handler)
                    await asyncio.gather(*[ab.publish("t", b"x") for _ in range(100)])
                    cons = ab.consumer("t", "c2")
                    waiter = asyncio.ensure_future(cons.get())
                    await asyncio.sleep(0.1)
                assert await waiter is None
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert not left, left
            assert threading.active_count() == 1, threading.enumerate()
        asyncio.run(main(), debug=True)
        gc.collect()
        print("clean")
    """)
    r = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", script],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(HERE)})
    assert r.returncode == 0 and r.stdout == "clean\n", r.stderr
    assert r.stderr == "", r.stderr


# -- the wire both clients drive, fed bytes cut at every offset -------------------

def server_frames(*frames):
    return b"".join(struct.pack(">lL", len(d) + 4, t) + d for t, d in frames)


@pytest.mark.parametrize("compression", ["", "deflate", "snappy"])
def test_client_wire_handshake_and_frames_split_at_every_offset(compression):
    import zlib
    opts = minq._ClientOptions("127.0.0.1:4150", deflate=compression == "deflate",
                               snappy=compression == "snappy", auth_secret="s3cret")
    info = {"max_rdy_count": 2500, "auth_required": True, "deflate": compression == "deflate",
            "deflate_level": 6, "snappy": compression == "snappy", "tls_v1": False}
    msg = struct.pack(">qH16s", 1, 1, b"0123456789abcdef") + b"body"
    after = server_frames((0, b'{"identity":"me"}'), (0, b"_heartbeat_"), (2, msg), (0, b"OK"))
    if compression == "deflate":
        z = zlib.compressobj(6, zlib.DEFLATED, -15)
        after = z.compress(server_frames((0, b"OK"))) + z.flush(zlib.Z_SYNC_FLUSH) + \
            z.compress(after) + z.flush(zlib.Z_SYNC_FLUSH)
    elif compression == "snappy":
        s = minq.SnappyCompressor()
        after = s.compress(server_frames((0, b"OK"))) + s.compress(after)
    stream = server_frames((0, json.dumps(info).encode())) + after
    for cut in range(len(stream) + 1):
        wire = minq._ClientWire(opts, "127.0.0.1")
        assert wire.hello().startswith(b"  V2IDENTIFY\n")
        frames, sent = [], b""
        for piece in (stream[:cut], stream[cut:]):
            frames += wire.feed(piece)
            sent += wire.outgoing()
        assert wire.ready and wire.server_info == info, cut
        assert wire.auth_info == {"identity": "me"}
        assert wire.heartbeats == 1 and frames == [(2, msg), (0, b"OK")], cut
        assert wire.layers.compression == compression
        if not compression:
            assert sent == b"AUTH\n" + struct.pack(">l", 6) + b"s3cret"


def test_client_wire_refuses_bad_frames_and_handshake_errors():
    opts = minq._ClientOptions()
    wire = minq._ClientWire(opts, "h")
    with pytest.raises(minq.ProtocolError) as e:
        wire.feed(server_frames((1, b"E_BAD_BODY IDENTIFY bad")))
    assert e.value.code == "E_BAD_BODY"
    wire = minq._ClientWire(opts, "h")
    with pytest.raises(minq.ProtocolError):
        wire.feed(struct.pack(">l", 3) + b"abc")            # a frame smaller than its type
    wire = minq._ClientWire(opts, "h")
    with pytest.raises(minq.ProtocolError):
        wire.feed(server_frames((0, b'{"auth_required": true}')))   # no secret to give


# -- in-process: AsyncBroker ------------------------------------------------------

def test_async_broker_consumer_and_subscribe_in_process():
    seen = []

    async def handler(msg):
        seen.append(msg.body)

    async def main():
        with minq.Broker() as b:
            async with minq.AsyncBroker(b) as ab:
                m = await ab.publish("t", b"one")
                assert isinstance(m, minq.Message) and m.body == b"one"
                assert [x.body for x in await ab.publish_many("t", [b"two", b"three"])] \
                    == [b"two", b"three"]
                async with ab.consumer("t", "c", max_in_flight=3) as cons:
                    got = [await cons.get(timeout=1) for _ in range(3)]
                    assert [g.body for g in got] == [b"one", b"two", b"three"]
                    got[0].requeue()
                    again = await cons.get(timeout=1)
                    assert (again.body, again.attempts) == (b"one", 2)
                    for g in [again] + got[1:]:
                        g.finish()
                    assert await cons.get(timeout=0.05) is None
                sub = await ab.subscribe("t", "s", handler, concurrency=2)
                await ab.publish_many("t", [b"a", b"b", b"c"])
                while len(seen) < 3:
                    await asyncio.sleep(0.01)
                await sub.close()
                assert sorted(seen) == [b"a", b"b", b"c"]
                assert b.stats()["topics"][0]["channels"][1]["depth"] == 0
    arun(main())


def test_async_broker_wakes_the_loop_once_per_batch_from_other_threads():
    async def main():
        with minq.Broker() as b:
            async with minq.AsyncBroker(b) as ab:
                cons = ab.consumer("t", "c", max_in_flight=1000)
                loop = asyncio.get_running_loop()
                wakes = []
                real = loop.call_soon_threadsafe

                def counting(fn, *args):
                    wakes.append(fn)
                    return real(fn, *args)
                loop.call_soon_threadsafe = counting
                t = threading.Thread(target=b.publish_many,
                                     args=("t", [b"%d" % i for i in range(500)]))
                t.start()
                t.join()
                got = [await cons.get(timeout=2) for _ in range(500)]
                del loop.call_soon_threadsafe
                assert [m.body for m in got] == [b"%d" % i for i in range(500)]
                assert len(wakes) == 1                 # one wake-up for the batch of 500
                for m in got:
                    m.finish()
                await cons.close()
    arun(main())


def test_async_broker_fsync_publish_waits_for_its_group_commit_off_the_loop(tmp_path,
                                                                            monkeypatch):
    """In fsync mode the publish is awaited while the fsync runs elsewhere: the
    loop keeps running (here the fsync waits until a coroutine lets it go)."""
    release = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        assert release.wait(10), "the loop was blocked"
        real_fsync(fd)

    async def main():
        with minq.Broker(data_path=str(tmp_path), fsync=True) as b:
            async with minq.AsyncBroker(b) as ab:
                await ab.publish("t", b"warm-up")
                monkeypatch.setattr(os, "fsync", slow_fsync)
                publishing = asyncio.ensure_future(ab.publish("t", b"durable"))
                await asyncio.sleep(0.05)
                assert not publishing.done()            # waiting for its fsync...
                release.set()                           # ...which this coroutine ends
                msg = await publishing
                assert msg.body == b"durable"
                monkeypatch.setattr(os, "fsync", real_fsync)
                many = await ab.publish_many("t", [b"x", b"y"])
                assert len(many) == 2
            with pytest.raises(minq.InvalidMessage):
                await minq.AsyncBroker(b).publish("t", b"")
    arun(main())


def test_async_calls_that_need_not_wait_still_take_turns_with_other_tasks():
    """Publishing 20,000 messages in memory, then draining them from a full
    inbox, never waits for anything; other tasks still run meanwhile."""
    async def main():
        with minq.Broker() as b:
            async with minq.AsyncBroker(b) as ab:
                ticks = 0

                async def ticker():
                    nonlocal ticks
                    while True:
                        ticks += 1
                        await asyncio.sleep(0)
                cons = ab.consumer("t", "c", max_in_flight=2500)
                ticking = asyncio.ensure_future(ticker())
                await asyncio.sleep(0)
                before = ticks
                for i in range(20_000):
                    await ab.publish("t", b"%d" % i)
                during_publish, before = ticks - before, ticks
                for _ in range(2500):
                    (await cons.get()).finish()
                during_get = ticks - before
                ticking.cancel()
                await asyncio.gather(ticking, return_exceptions=True)
                await cons.close()
        assert during_publish > 0 and during_get > 0
    arun(main())


def test_async_broker_consumer_ends_when_the_broker_closes():
    async def main():
        b = minq.Broker()
        ab = minq.AsyncBroker(b)
        cons = ab.consumer("t", "c")
        waiting = asyncio.ensure_future(cons.get())
        await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, b.close)
        assert await asyncio.wait_for(waiting, 5) is None
        await ab.close()
    arun(main())


# =============================================================================
# HTTP API: nsqd's endpoints, parameters, status codes and error bodies
# =============================================================================

@pytest.fixture
def web():
    b = minq.Broker()
    tcp = minq.TCPServer(b, "127.0.0.1:0").start()
    srv = minq.HTTPServer(b, "127.0.0.1:0", tcp_address=tcp.address,
                          options={"mem_queue_size": 10000, "msg_timeout": 60.0}).start()
    yield srv
    srv.close()
    tcp.close()
    b.close()


def http(srv, method, path, body=None, headers=None):
    import http.client
    host, port = srv.rsplit(":", 1) if isinstance(srv, str) else srv.server_address[:2]
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("X-NSQ-Content-Type"), r.read()
    finally:
        conn.close()


def test_http_pub_and_defer(web):
    assert http(web, "POST", "/pub?topic=t", b"hello") == (200, "nsq; version=1.0", b"OK")
    assert http(web, "POST", "/pub?topic=t&defer=60000", b"later")[0] == 200
    b = web.broker
    with b.consumer("t", "c") as c:      # created after: both wait at the topic
        assert c.get(timeout=2).body == b"hello"
    assert channel_stats(b, "t", "c")["deferred_count"] == 1


@pytest.mark.parametrize("path, body, status, code", [
    ("/pub", b"x", 400, "MISSING_ARG_TOPIC"),
    ("/pub?topic=bad!name", b"x", 400, "INVALID_TOPIC"),
    ("/pub?topic=t", b"", 400, "MSG_EMPTY"),
    ("/pub?topic=t&defer=-5", b"x", 400, "INVALID_DEFER"),
    ("/pub?topic=t&defer=3600001", b"x", 400, "INVALID_DEFER"),
    ("/mpub?topic=t", b"ok\n" + b"x" * (1024 * 1024 + 1), 413, "MSG_TOO_BIG"),
    ("/mpub?topic=t&binary=true", struct.pack(">l", 10**9), 413, "BAD_BODY"),
    ("/mpub?topic=t&binary=true", struct.pack(">ll", 1, 0), 413, "BAD_MESSAGE"),
    ("/mpub?topic=t&binary=true", struct.pack(">ll", 1, 50) + b"short", 413, "BAD_MESSAGE"),
    ("/nope", b"", 404, "NOT_FOUND"),
    ("/topic/delete?topic=missing", b"", 404, "TOPIC_NOT_FOUND"),
    ("/topic/pause", b"", 400, "MISSING_ARG_TOPIC"),
    ("/channel/create?topic=missing&channel=c", b"", 404, "TOPIC_NOT_FOUND"),
    ("/channel/create?topic=t", b"", 400, "MISSING_ARG_CHANNEL"),
    ("/channel/create?topic=t&channel=bad!", b"", 400, "INVALID_ARG_CHANNEL"),
    ("/stats?include_clients=maybe", b"", 400, "INVALID_REQUEST"),
    ("/config/no_such_option", b"", 400, "INVALID_OPTION"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 60 else None)
def test_http_errors_use_nsqd_codes_and_change_nothing(web, path, body, status, code):
    method = "GET" if path.startswith(("/stats", "/config")) else "POST"
    got = http(web, method, path, body)
    assert got[0] == status and json.loads(got[2]) == {"message": code}
    assert got[1] == "nsq; version=1.0"
    assert web.broker.stats()["topics"] == []
    assert http(web, "GET", "/ping")[2] == b"OK"


def test_http_wrong_method_405(web):
    status, _, body = http(web, "GET", "/pub?topic=t")
    assert (status, json.loads(body)) == (405, {"message": "METHOD_NOT_ALLOWED"})


@pytest.mark.parametrize("path, code", [("/pub?topic=t", "MSG_TOO_BIG"),
                                        ("/mpub?topic=t", "BODY_TOO_BIG")])
def test_http_oversize_body_refused_by_content_length_without_reading(web, path, code):
    import socket
    host, port = web.server_address[:2]
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: 2000000000\r\n\r\npartial")
    reply = b""
    while True:                              # the server closes: the body is never read
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b'"' + code.encode() + b'"' in reply
    s.close()
    assert web.broker.stats()["topics"] == []
    assert http(web, "POST", "/pub?topic=t", b"next")[0] == 200


def test_http_mpub_text_and_binary(web):
    assert http(web, "POST", "/mpub?topic=t", b"a\nb\n\nc\n")[2] == b"OK"
    payload = struct.pack(">l", 2) + struct.pack(">l", 2) + b"d1" + struct.pack(">l", 2) + b"d2"
    assert http(web, "POST", "/mpub?topic=t&binary=true", payload)[2] == b"OK"
    assert web.broker.stats()["topics"][0]["message_count"] == 5


def test_http_stats_json_matches_nsqd_schema(web):
    b = web.broker
    b.publish("t", b"x")
    with minq.Client(web.tcp_address) as client, client.consumer("t", "c") as cons:
        cons.get(timeout=5)
        status, header, body = http(web, "GET", "/stats?format=json")
        stats = json.loads(body)
        assert list(stats) == ["version", "health", "start_time", "topics", "memory", "producers"]
        assert stats["producers"] is None               # HTTP publishes are not producers
        (t,) = stats["topics"]
        # nsqd's keys in nsqd's order, then minq's one addition (records lost to damage)
        assert list(t) == ["topic_name", "channels", "depth", "backend_depth", "message_count",
                           "message_bytes", "paused", "e2e_processing_latency", "corrupt_count"]
        (c,) = t["channels"]
        assert list(c) == ["channel_name", "depth", "backend_depth", "in_flight_count",
                           "deferred_count", "message_count", "requeue_count", "timeout_count",
                           "client_count", "clients", "paused", "e2e_processing_latency",
                           "corrupt_count"]
        assert c["in_flight_count"] == 1 and c["client_count"] == 1
        assert list(c["clients"][0]) == [
            "client_id", "hostname", "version", "remote_address", "state", "ready_count",
            "in_flight_count", "message_count", "finish_count", "requeue_count", "connect_ts",
            "sample_rate", "deflate", "snappy", "user_agent", "topology_zone",
            "topology_region", "tls", "tls_cipher_suite", "tls_version",
            "tls_negotiated_protocol", "tls_negotiated_protocol_is_mutual"]
        assert list(stats["memory"]) == ["heap_objects", "heap_idle_bytes", "heap_in_use_bytes",
                                         "heap_released_bytes", "gc_pause_usec_100",
                                         "gc_pause_usec_99", "gc_pause_usec_95",
                                         "next_gc_bytes", "gc_total_runs"]
        client.publish("t", b"from tcp")
        stats = json.loads(http(web, "GET", "/stats?format=json&include_mem=false")[2])
        assert "memory" not in stats
        assert stats["producers"][0]["pub_counts"] == [{"topic": "t", "count": 1}]
        stats = json.loads(http(web, "GET", "/stats?format=json&include_clients=false")[2])
        assert stats["topics"][0]["channels"][0]["clients"] is None
        assert json.loads(http(web, "GET", "/stats?format=json&topic=missing")[2])["topics"] is None
        assert json.loads(http(web, "GET", "/stats?format=json&channel=nope")[2])["topics"] == []
        text = http(web, "GET", "/stats")[2].decode()
        assert "Health: OK" in text and "[t" in text


def test_http_what_nsqadmin_reads_and_does(web):
    """nsqadmin's calls (clusterinfo): V1 negotiation, semver /info, /stats, /nodes, actions."""
    b = web.broker
    b.topic("t").channel("c")
    v1 = {"Accept": "application/vnd.nsq; version=1.0"}
    for path in ("/info", "/stats?format=json", "/stats?format=json&topic=t&channel=c",
                 "/stats?format=json&include_clients=false", "/nodes", "/topics",
                 "/channels?topic=t", "/lookup?topic=t"):
        status, header, body = http(web, "GET", path, headers=v1)
        # With this header nsqadmin reads the body as is (no {"data": ...} envelope).
        assert (status, header) == (200, "nsq; version=1.0"), path
        assert "data" not in json.loads(body)
    info = json.loads(http(web, "GET", "/info", headers=v1)[2])
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"])      # else "out of date"
    assert {"broadcast_address", "hostname", "http_port", "tcp_port"} <= set(info)
    [node] = json.loads(http(web, "GET", "/nodes")[2])["producers"]
    assert len(node["tombstones"]) == len(node["topics"])
    for action in ("channel/pause", "channel/unpause", "channel/empty", "topic/pause",
                   "topic/unpause", "topic/empty", "channel/delete", "topic/delete"):
        q = "topic=t&channel=c" if action.startswith("channel") else "topic=t"
        assert http(web, "POST", f"/{action}?{q}", headers=v1)[0] == 200, action
    assert b.topics == {}


def test_http_topic_and_channel_admin(web):
    b = web.broker
    assert http(web, "POST", "/topic/create?topic=t")[:2] == (200, "nsq; version=1.0")
    assert http(web, "POST", "/channel/create?topic=t&channel=c")[0] == 200
    assert http(web, "POST", "/channel/pause?topic=t&channel=c")[0] == 200
    assert b.get_topic("t").get_channel("c").paused
    assert http(web, "POST", "/channel/unpause?topic=t&channel=c")[0] == 200
    b.publish("t", b"x")
    assert http(web, "POST", "/channel/empty?topic=t&channel=c")[0] == 200
    assert channel_stats(b, "t", "c")["depth"] == 0
    assert http(web, "POST", "/channel/delete?topic=t&channel=nope")[0] == 404
    assert http(web, "POST", "/channel/delete?topic=t&channel=c")[0] == 200
    assert http(web, "POST", "/topic/pause?topic=t")[0] == 200
    assert b.get_topic("t").paused
    assert http(web, "POST", "/topic/unpause?topic=t")[0] == 200
    assert http(web, "POST", "/topic/empty?topic=t")[0] == 200
    assert http(web, "POST", "/topic/delete?topic=t")[0] == 200
    assert b.stats()["topics"] == []


def test_http_info_and_config(web):
    info = json.loads(http(web, "GET", "/info")[2])
    assert info["version"] == "1.3.0" and info["http_port"] == web.server_address[1]
    assert info["tcp_port"] == int(web.tcp_address.rsplit(":", 1)[1])
    assert list(info)[:3] == ["version", "broadcast_address", "hostname"]
    assert json.loads(http(web, "GET", "/config/mem_queue_size")[2]) == 10000
    assert json.loads(http(web, "GET", "/config/msg_timeout")[2]) == 60 * 10**9


def test_http_lookupd_endpoints_name_this_server(web):
    b = web.broker
    b.topic("t").channel("c2")
    b.topic("t").channel("c1")
    b.topic("u")
    status, _, body = http(web, "GET", "/lookup?topic=t")
    data = json.loads(body)
    assert status == 200 and data["channels"] == ["c1", "c2"]
    [p] = data["producers"]
    assert list(p) == ["remote_address", "hostname", "broadcast_address", "tcp_port",
                       "http_port", "version", "topology_zone", "topology_region"]
    # Listening on 127.0.0.1, minq hands out that address (nsqd would give the hostname).
    assert (p["broadcast_address"], p["tcp_port"], p["http_port"], p["version"]) == \
        ("127.0.0.1", int(web.tcp_address.rsplit(":", 1)[1]), web.server_address[1], "1.3.0")
    status, _, body = http(web, "GET", "/lookup?topic=nope")
    assert (status, json.loads(body)) == (404, {"message": "TOPIC_NOT_FOUND"})
    status, _, body = http(web, "GET", "/lookup?topic=bad%20name")   # lookupd: not found
    assert (status, json.loads(body)) == (404, {"message": "TOPIC_NOT_FOUND"})
    status, _, body = http(web, "GET", "/lookup")
    assert (status, json.loads(body)) == (400, {"message": "MISSING_ARG_TOPIC"})
    status, _, body = http(web, "GET", "/channels")
    assert (status, json.loads(body)) == (400, {"message": "MISSING_ARG_TOPIC"})
    assert json.loads(http(web, "GET", "/topics")[2]) == {"topics": ["t", "u"]}
    assert json.loads(http(web, "GET", "/channels?topic=t")[2]) == {"channels": ["c1", "c2"]}
    assert json.loads(http(web, "GET", "/channels?topic=nope")[2]) == {"channels": []}
    [node] = json.loads(http(web, "GET", "/nodes")[2])["producers"]
    assert (node["topics"], node["tombstones"]) == (["t", "u"], [False, False])
    assert node["broadcast_address"] == "127.0.0.1"


def test_http_broadcast_address_option_is_what_clients_are_told(web):
    b = web.broker
    with minq.HTTPServer(b, "127.0.0.1:0", tcp_address=web.tcp_address,
                         options={"broadcast_address": "mq.example.com",
                                  "broadcast_tcp_port": 14150}).start() as srv:
        info = json.loads(http(srv, "GET", "/info")[2])
        assert (info["broadcast_address"], info["tcp_port"]) == ("mq.example.com", 14150)
        b.topic("t")
        [p] = json.loads(http(srv, "GET", "/lookup?topic=t")[2])["producers"]
        assert (p["broadcast_address"], p["tcp_port"]) == ("mq.example.com", 14150)


def test_pynsq_reader_finds_minq_through_its_lookupd_endpoints(web):
    nsq = pytest.importorskip("nsq")
    tornado_ioloop = pytest.importorskip("tornado.ioloop")
    assert http(web, "POST", "/pub?topic=found", b"via lookup")[2] == b"OK"
    got = []
    loop = tornado_ioloop.IOLoop.current()

    def handler(msg):
        got.append(msg.body)
        loop.add_callback(loop.stop)
        return True

    reader = nsq.Reader(message_handler=handler, topic="found", channel="c",
                        lookupd_http_addresses=[f"http://{web.address}"],
                        lookupd_poll_interval=1, lookupd_poll_jitter=0.0)
    timeout = loop.call_later(15, loop.stop)
    loop.start()
    loop.remove_timeout(timeout)
    reader.close()
    loop.run_sync(lambda: __import__("tornado.gen").gen.sleep(0.1))
    # The HTTP lookup resolved the address on asyncio's executor thread: end it.
    loop.asyncio_loop.run_until_complete(loop.asyncio_loop.shutdown_default_executor())
    assert got == [b"via lookup"]


_PROM_LINE = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                        r'[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|Inf|NaN)')


def test_http_metrics_are_prometheus_text_with_e2e_latency(tmp_path, clock):
    with minq.Broker(clock=clock, data_path=str(tmp_path)) as b, \
            minq.HTTPServer(b, "127.0.0.1:0").start() as srv:
        b.publish("t", b"x")
        b.publish("t", b"y")
        with b.consumer("t", "c", max_in_flight=2) as cons:
            m = cons.get(timeout=5)
            clock.advance(0.02)
            m.finish()                                   # 20 ms from publish to FIN
            cons.get(timeout=5)                          # one left in flight
            import http.client
            conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            ctype, text = r.getheader("Content-Type"), r.read().decode()
            conn.close()
    assert ctype.startswith("text/plain; version=0.0.4")
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-z_0-9]+ .+", line), line
            continue
        assert _PROM_LINE.fullmatch(line), line
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
    ch = 'topic="t",channel="c"'
    assert samples['minq_topic_messages_total{topic="t"}'] == 2
    assert samples[f"minq_channel_in_flight{{{ch}}}"] == 1
    assert samples[f"minq_channel_clients{{{ch}}}"] == 1
    assert samples[f"minq_channel_depth{{{ch}}}"] == 0
    assert samples[f'minq_channel_e2e_latency_seconds_bucket{{{ch},le="0.01"}}'] == 0
    assert samples[f'minq_channel_e2e_latency_seconds_bucket{{{ch},le="0.05"}}'] == 1
    assert samples[f'minq_channel_e2e_latency_seconds_bucket{{{ch},le="+Inf"}}'] == 1
    assert samples[f"minq_channel_e2e_latency_seconds_sum{{{ch}}}"] == pytest.approx(0.02)
    assert samples["minq_up"] == 1 and samples["minq_storage_logs"] >= 1
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["minq_channel_e2e_latency_seconds"].type == "histogram"
    assert families["minq_topic_messages"].type == "counter"


# -- /history: the rings behind the admin page's charts ------------------------

def test_history_ring_is_bounded_and_marks_gaps():
    ring = minq._Ring(5, 2)
    nbytes = ring.nbytes
    for s in range(10):
        ring.put(s, [s, s * 10])
    assert ring.columns(9) == [[5, 6, 7, 8, 9], [50, 60, 70, 80, 90]]
    ring.put(13, [13, 130])                         # 10, 11, 12 were not sampled
    assert ring.columns(13)[0] == [9, None, None, None, 13]
    ring.put(12, [0, 0])                            # older than the newest: ignored
    assert ring.columns(15)[0] == [None, None, 13, None, None]   # nothing since 13
    assert ring.columns(30) == [[None] * 5, [None] * 5]
    ring.put(10**6, [1.5, 2.25])                    # a long gap clears at most the ring
    assert ring.columns(10**6) == [[None] * 4 + [1.5], [None] * 4 + [2.25]]
    assert ring.nbytes == nbytes == 5 * 2 * 4


def test_history_summary_keeps_the_max_of_gauges_and_the_mean_of_rates():
    ring = minq._Summary(3, 2, 60, 1)               # a row a minute: (depth, rate)
    for s in range(60, 180):                        # minutes 1 and 2
        ring.add(s, [s % 60, 10.0 if s < 120 else float(s % 2)])
    ring.add(180, [7, float("nan")])                # minute 3 so far: no rate yet
    assert ring.columns(3) == [[59, 59, 7], [10, 0.5, None]]


def _sample(h, clock, b):
    h.sample(clock.monotonic(), clock.time_ns() / 1e9, b.stats(include_clients=False))


def test_history_samples_each_second_and_summarises_each_minute():
    clock = minq.FakeClock(start=1200.0)            # at a whole minute
    b = minq.Broker(clock=clock)
    h = minq._StatsHistory()
    b.topic("t").channel("backlog")                 # no consumer: its depth grows
    try:
        with b.consumer("t", "busy", max_in_flight=10) as cons:
            for _ in range(120):                    # 2 minutes: 5 a second, all finished
                b.publish_many("t", [b"x"] * 5)
                for m in drain(cons, 5, timeout=2):
                    m.finish()
                clock.advance(1)
                _sample(h, clock, b)
            seconds = h.series("t", "backlog", "10m")
            busy = h.series("t", "busy", "10m")
            minutes = h.series("t", "backlog", "24h")
            topic = h.series("t", None, "10m")
            for _ in range(700):                    # 10 minutes later, all quiet
                clock.advance(1)
                _sample(h, clock, b)
            later = h.series("t", "backlog", "10m")
    finally:
        b.close()
    assert (seconds["step"], minutes["step"]) == (1, 60)
    assert len(seconds["fields"]["depth"]) == 600 and len(minutes["fields"]["depth"]) == 1440
    assert set(seconds["fields"]) == {"depth", "in_flight", "deferred", "rate_in", "rate_out"}
    assert set(topic["fields"]) == {"depth", "rate_in", "rate_out"}
    depth = seconds["fields"]["depth"]
    assert depth[:480] == [None] * 480 and depth[-3:] == [590, 595, 600]
    assert seconds["fields"]["rate_in"][-119:] == [5] * 119      # the first has no rate
    assert seconds["fields"]["rate_in"][-120] is None
    assert seconds["fields"]["rate_out"][-119:] == [0] * 119
    assert busy["fields"]["rate_out"][-119:] == [5] * 119        # finished each second
    assert busy["fields"]["depth"][-1] == busy["fields"]["in_flight"][-1] == 0
    assert topic["fields"]["rate_in"][-1] == topic["fields"]["rate_out"][-1] == 5
    assert minutes["fields"]["depth"][-4:] == [None, 295, 595, 600]   # each minute's max
    assert minutes["fields"]["rate_in"][-3:] == [5, 5, 5]             # ... and mean
    assert seconds["e2e_percentiles"] is None
    assert later["fields"]["depth"] == [600] * 600                # the busy minutes rolled off
    assert later["fields"]["rate_in"] == [0] * 600
    assert later["end"] - seconds["end"] == 700


def test_history_forgets_deleted_channels_and_holds_a_fixed_size_per_series(clock):
    b = minq.Broker(clock=clock)
    h = minq._StatsHistory()
    try:
        b.topic("t").channel("c")
        b.topic("t").channel("gone")
        b.topic("quiet").channel("c")
        for _ in range(3):
            clock.advance(1)
            _sample(h, clock, b)
        # Values that never change cost no rings (thousands of quiet topics) ...
        assert {s.nbytes for s in h._series.values()} == {0}
        assert h.series("t", "c", "10m")["fields"]["depth"][-4:] == [None, 0, 0, 0]
        b.publish("t", b"x")                         # ... values that do, a fixed size
        for _ in range(3):
            clock.advance(1)
            _sample(h, clock, b)
        sizes = {k: s.nbytes for k, s in h._series.items()}
        assert sizes == {("t", ""): 25920, ("t", "c"): 42240, ("t", "gone"): 42240,
                         ("quiet", ""): 0, ("quiet", "c"): 0}
        assert h.series("t", "c", "10m")["fields"]["depth"][-7:] == [None, 0, 0, 0, 1, 1, 1]
        assert h.series("t", "c", "10m")["fields"]["rate_in"][-3:] == [1, 0, 0]
        b.get_topic("t").delete_channel("gone")
        for _ in range(2000):
            clock.advance(1)
            _sample(h, clock, b)
        assert {k: s.nbytes for k, s in h._series.items()} == {
            ("t", ""): 25920, ("t", "c"): 42240, ("quiet", ""): 0, ("quiet", "c"): 0}
        assert not h.has("t", "gone") and h.has("t", "c") and h.has("t")
    finally:
        b.close()


def test_history_spaced_samples_fill_the_seconds_between(clock):
    # With thousands of topics a sample is costly and comes every few
    # seconds: the seconds between take its values, they are not gaps.
    with minq.Broker(clock=clock) as b:
        h = minq._StatsHistory()
        h.every = 5
        b.topic("t").channel("c")
        for k in range(4):
            b.publish_many("t", [b"x"] * 10)
            clock.advance(5)
            _sample(h, clock, b)
        series = h.series("t", "c", "10m")["fields"]
    assert series["depth"][-16:] == [10] + [20] * 5 + [30] * 5 + [40] * 5
    assert series["rate_in"][-15:] == [2] * 15 and series["depth"][-17] is None


def test_history_keeps_e2e_percentiles_when_the_stats_carry_them(clock):
    b = minq.Broker(clock=clock)
    h = minq._StatsHistory()
    b.topic("t").channel("c")
    percentiles = [{"quantile": 0.99, "value": 25_000_000}, {"quantile": 0.5, "value": 2_500_000}]
    later = [{"quantile": 0.99, "value": 40_000_000}, {"quantile": 0.5, "value": 2_500_000}]

    def run(seconds, start):
        for k in range(start, start + seconds):
            stats = b.stats(include_clients=False)
            for x in [stats["topics"][0]] + stats["topics"][0]["channels"]:
                x["e2e_processing_latency"] = {"count": 1, "percentiles": (
                    None if k < 60 else percentiles if k < 120 else later)}
            clock.advance(1)
            h.sample(clock.monotonic(), clock.time_ns() / 1e9, stats)
    try:
        run(120, 0)
        got = h.series("t", "c", "10m")["e2e_percentiles"]
        steady = h._series[("t", "c")].nbytes          # unchanged values: no rings
        run(30, 120)
        changed = h.series("t", "c", "10m")["e2e_percentiles"]
        minutes = h.series("t", "c", "24h")["e2e_percentiles"]
        assert h._series[("t", "c")].nbytes == 2 * (600 + 1440) * 4
    finally:
        b.close()
    assert steady == 0
    assert [p["quantile"] for p in got] == [0.99, 0.5]
    assert got[0]["ms"][-60:] == [25] * 60 and got[1]["ms"][-60:] == [2.5] * 60
    assert got[0]["ms"][-61] is None
    assert changed[0]["ms"][-91:] == [None] + [25] * 60 + [40] * 30
    assert minutes[0]["ms"][-1] == 40                  # each minute's worst


def test_http_history_serves_the_last_ten_minutes_and_an_overview(clock):
    with minq.Broker(clock=clock) as b, minq.HTTPServer(b, "127.0.0.1:0").start() as srv:
        b.topic("orders").channel("billing")
        for k in range(5):
            b.publish_many("orders", [b"x"] * 4)
            clock.advance(1)                # the server samples on the broker's clock
            wait_until(lambda: srv.history.series("orders", "billing", "10m")["fields"][
                "depth"][-1] == 4 * (k + 1), what=f"sample {k}")
        status, v1, body = http(srv, "GET", "/history?topic=orders&channel=billing")
        one = json.loads(body)
        topic = json.loads(http(srv, "GET", "/history?topic=orders&window=24h")[2])
        every = json.loads(http(srv, "GET", "/history")[2])
    assert (status, v1) == (200, "nsq; version=1.0")
    assert set(one) == {"topic", "channel", "window", "step", "end", "fields",
                        "e2e_percentiles"}
    assert (one["topic"], one["channel"], one["window"], one["step"]) == (
        "orders", "billing", "10m", 1)
    assert one["end"] == pytest.approx(clock.time_ns() / 1e9, abs=1)
    assert one["fields"]["depth"][-5:] == [4, 8, 12, 16, 20]
    assert one["fields"]["rate_in"][-4:] == [4, 4, 4, 4]
    assert (topic["channel"], topic["step"], len(topic["fields"]["depth"])) == (None, 60, 1440)
    assert every["window"] == "10m" and every["step"] == 10
    (t,) = every["topics"]
    assert t["topic_name"] == "orders" and len(t["fields"]["depth"]) == 60
    (c,) = t["channels"]
    assert c["channel_name"] == "billing" and set(c["fields"]) == {"depth", "rate_in",
                                                                   "rate_out"}
    assert max(v for v in c["fields"]["depth"] if v is not None) == 20


@pytest.mark.parametrize("path, status, code", [
    ("/history?window=1h", 400, "INVALID_WINDOW"),
    ("/history?channel=c", 400, "MISSING_ARG_TOPIC"),
    ("/history?topic=bad!name", 400, "INVALID_TOPIC"),
    ("/history?topic=t&channel=bad!", 400, "INVALID_ARG_CHANNEL"),
    ("/history?topic=missing", 404, "TOPIC_NOT_FOUND"),
    ("/history?topic=t&channel=missing", 404, "CHANNEL_NOT_FOUND"),
])
def test_http_history_refuses_bad_parameters(web, path, status, code):
    web.broker.topic("t")
    got = http(web, "GET", path)
    assert (got[0], json.loads(got[2])) == (status, {"message": code})
    assert http(web, "POST", "/history")[0] == 405


def test_http_server_samples_no_more_after_close(clock):
    before = set(threading.enumerate())
    with minq.Broker(clock=clock) as b:
        srv = minq.HTTPServer(b, "127.0.0.1:0").start()
        b.topic("t")
        clock.advance(1)
        wait_until(lambda: srv.history.has("t"), what="a sample")
        srv.close()
        clock.advance(1)
        b.topic("u")
        clock.advance(1)
        assert not srv.history.has("u")
    assert set(threading.enumerate()) <= before


def _chromium():
    """Playwright driving Debian's Chromium, or a skip saying what is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    return sync_api, exe


def test_admin_page_in_headless_chromium(web, tmp_path):
    sync_api, exe = _chromium()
    b = web.broker
    b.topic("orders").channel("billing")
    b.topic("orders").channel("audit")
    b.publish_many("orders", [b"x"] * 7)
    with b.consumer("orders", "audit", max_in_flight=3) as cons:
        drain(cons, 3, timeout=5)                       # 3 in flight on audit
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"])
            try:
                page = browser.new_page()
                asked = []
                page.on("request", lambda r: asked.append(r.url))
                page.goto(f"http://{web.address}/")
                page.wait_for_selector('tr[data-channel="billing"]', timeout=10000)

                def shown(channel, field):
                    return page.inner_text(f'tr[data-channel="{channel}"] td[data-field="{field}"]')

                stats = {c["channel_name"]: c for c in json.loads(
                    http(web, "GET", "/stats?format=json&topic=orders")[2])["topics"][0]["channels"]}
                for ch in ("billing", "audit"):
                    for field in ("depth", "in_flight_count", "deferred_count", "message_count"):
                        assert shown(ch, field) == str(stats[ch][field]), (ch, field)
                assert shown("audit", "in_flight_count") == "3"
                assert shown("billing", "depth") == "7"
                assert shown("billing", "state") == "active"
                # Rates show after a moment, not only after the second 2 s refresh.
                page.wait_for_function(
                    """() => document.querySelector(
                        'tr[data-channel="billing"] td[data-field="rate"]').textContent !== '-'""",
                    timeout=1500)
                width = page.evaluate("document.querySelector('#stats').offsetWidth")
                assert shown("audit", "clients") == "1"
                assert page.inner_text('tr.topic[data-topic="orders"] td[data-field="clients"]') == "1"
                # It refreshes by itself.
                b.publish("orders", b"y")
                page.wait_for_function(
                    """() => document.querySelector(
                        'tr[data-channel="billing"] td[data-field="depth"]').textContent === '8'""",
                    timeout=10000)
                # Pause, seen by the broker and on the page.
                page.click('tr[data-channel="billing"] button[data-action="pause"]')
                page.wait_for_selector('tr[data-channel="billing"] button[data-action="unpause"]',
                                       timeout=10000)
                assert b.get_topic("orders").get_channel("billing").paused
                assert shown("billing", "state") == "paused"
                assert page.evaluate("document.querySelector('#stats').offsetWidth") == width
                # Destructive actions ask first: dismissing keeps the messages ...
                page.once("dialog", lambda d: d.dismiss())
                page.click('tr[data-channel="billing"] button[data-action="empty"]')
                page.wait_for_timeout(300)
                assert b.get_topic("orders").get_channel("billing").stats()["depth"] == 8
                # ... accepting empties the channel.
                messages = []
                page.once("dialog", lambda d: (messages.append(d.message), d.accept()))
                page.click('tr[data-channel="billing"] button[data-action="empty"]')
                page.wait_for_function(
                    """() => document.querySelector(
                        'tr[data-channel="billing"] td[data-field="depth"]').textContent === '0'""",
                    timeout=10000)
                assert "billing" in messages[0]
                assert b.get_topic("orders").get_channel("billing").stats()["depth"] == 0
                out = Path(os.environ.get("MINQ_ARTIFACTS") or tmp_path)
                out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out / "admin-page.png"), full_page=True)
                # Delete asks too, then the channel is gone from the broker and the page.
                page.once("dialog", lambda d: (messages.append(d.message), d.accept()))
                page.click('tr[data-channel="billing"] button[data-action="delete"]')
                page.wait_for_selector('tr[data-channel="billing"]', state="detached",
                                       timeout=10000)
                assert messages[1].startswith("Delete channel orders/billing")
                assert "billing" not in b.get_topic("orders").channels
                assert not [u for u in asked if "favicon" in u]    # no 404 to log
            finally:
                browser.close()


_CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]

# The values a chart draws, read back from the page: its path's y coordinates
# turned into values by the chart's own scale (data-ymax/top/bottom), in order.
_RENDERED_JS = r"""([sel, series]) => {
  const svg = document.querySelector(sel);
  if (!svg) return null;
  const path = svg.querySelector('path[data-series="' + series + '"]');
  if (!path) return null;
  const ymax = +svg.dataset.ymax, top = +svg.dataset.top, bottom = +svg.dataset.bottom;
  return (path.getAttribute("d").match(/[ML][^ML]*/g) || []).map((s) => {
    const y = +s.slice(1).trim().split(/\s+/)[1];
    return (bottom - y) / (bottom - top) * ymax;
  });
}"""


def _rendered(page, selector, series):
    return page.evaluate(_RENDERED_JS, [selector, series])


def _artifacts(tmp_path):
    out = Path(os.environ.get("MINQ_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def _served(**options):
    """A real-clock broker behind TCP and HTTP, for the browser tests."""
    b = minq.Broker(**options)
    tcp = minq.TCPServer(b, "127.0.0.1:0").start()
    srv = minq.HTTPServer(b, "127.0.0.1:0", tcp_address=tcp.address).start()
    try:
        yield srv
    finally:
        srv.close()
        tcp.close()
        b.close()


def _publish_at(b, topic, rate, count):
    """Publish *count* messages at *rate* a second (paced, not bursting)."""
    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        b.publish(topic, b"m%d" % i)


def _finishing(consumer, stop):
    """Finish every message *consumer* gets until *stop* is set (a thread)."""
    def run():
        while not stop.is_set():
            m = consumer.get(timeout=0.1)
            if m is not None:
                m.finish()
    t = threading.Thread(target=run, name="test-finisher")
    t.start()
    return t


def test_admin_page_charts_views_clients_and_actions(tmp_path):
    """Publish 20 a second for 5 s to a topic with a backlog channel and a
    consumed one: the overview's small charts and each view's large charts
    draw it; the channel view lists its TCP and in-process consumers; every
    action works from the views; it reads at 1400 px and on a phone."""
    sync_api, exe = _chromium()
    rate, count = 20, 100
    out = _artifacts(tmp_path)
    stop = threading.Event()
    with _served() as web:
        b = web.broker
        b.topic("orders").channel("billing")               # nobody consumes: a backlog
        client = minq.Client(web.tcp_address, client_id="audit-worker-1",
                             user_agent="test-suite/1.0")
        remote = client.consumer("orders", "audit", max_in_flight=5)
        inproc = b.consumer("orders", "audit", max_in_flight=1)
        wait_until(lambda: channel_stats(b, "orders", "audit")["client_count"] == 2,
                   what="two consumers on audit")
        finisher = _finishing(remote, stop)
        try:
            _publish_at(b, "orders", rate, count)
            wait_until(lambda: web.history.series("orders", "billing", "10m")["fields"][
                "depth"][-1] == count, what="a sample after the last publish")
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=exe, args=_CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 900})
                    dialogs, refuse = [], []     # refuse: dismiss the next dialog

                    def answer(d):
                        dialogs.append(d.message)
                        d.dismiss() if refuse and refuse.pop() else d.accept()
                    page.on("dialog", answer)
                    page.goto(f"http://{web.address}/")
                    # The overview shows the last minutes at once: billing's depth grew
                    # to the backlog, and the topic's rate in is drawn.
                    spark = 'tr[data-channel="billing"] td[data-field="depth_chart"] svg'
                    page.wait_for_function(
                        "([sel, n]) => { const v = (" + _RENDERED_JS + ")([sel, 'depth']);"
                        " return v && v.length && Math.max(...v) > n - 0.5; }",
                        arg=[spark, count], timeout=10000)
                    depth = _rendered(page, spark, "depth")
                    assert max(depth) == pytest.approx(count, abs=0.5)
                    assert depth == sorted(depth)                       # only ever growing
                    ins = _rendered(page, 'tr.topic[data-topic="orders"] '
                                          'td[data-field="rate_chart"] svg', "rate_in")
                    assert 0 < max(ins) <= 2 * rate
                    page.screenshot(path=str(out / "admin-overview-backlog.png"))
                    width = page.evaluate("document.querySelector('#stats').offsetWidth")
                    assert width <= 1400

                    # The topic's view: its rate in, second by second.
                    page.click('tr.topic[data-topic="orders"] td.name a')
                    chart = 'figure[data-chart="rates"] svg'
                    page.wait_for_selector(chart + ' path[data-series="rate_in"]',
                                           state="attached", timeout=10000)
                    busy = [v for v in _rendered(page, chart, "rate_in") if v > 0.5]
                    assert len(busy) >= 3
                    assert rate / 2 <= sorted(busy)[len(busy) // 2] <= rate * 2
                    assert page.inner_text("h2") == "topic orders"

                    # A channel's view: its clients, TCP and in-process, and how fast
                    # it finishes what comes in.
                    page.click('tr[data-channel="audit"] td.name a')
                    row = '#clients tr[data-client-id="audit-worker-1"]'
                    page.wait_for_selector(row, timeout=10000)
                    cells = {f: page.inner_text(f'{row} td[data-field="{f}"]') for f in (
                        "remote_address", "user_agent", "tls", "ready_count", "finish_count")}
                    assert cells["remote_address"].startswith("127.0.0.1:")
                    assert cells["user_agent"] == "test-suite/1.0"
                    assert (cells["tls"], cells["ready_count"]) == ("-", "5")
                    assert int(cells["finish_count"]) > 0
                    inproc_row = f'#clients tr[data-client-id="{inproc.client_id}"]'
                    assert page.inner_text(
                        f'{inproc_row} td[data-field="remote_address"]') == "in-process"
                    page.wait_for_selector('figure[data-chart="rates"] '
                                           'path[data-series="rate_out"]', state="attached",
                                           timeout=10000)
                    done = [v for v in _rendered(page, chart, "rate_out") if v > 0.5]
                    assert len(done) >= 3
                    assert rate / 4 <= sorted(done)[len(done) // 2] <= rate * 2
                    page.screenshot(path=str(out / "admin-channel-clients.png"), full_page=True)

                    # On a phone's width nothing needs scrolling sideways.
                    page.set_viewport_size({"width": 390, "height": 844})
                    page.wait_for_timeout(300)
                    assert page.evaluate("document.documentElement.scrollWidth") <= 390
                    page.screenshot(path=str(out / "admin-phone-channel.png"), full_page=True)
                    page.goto(f"http://{web.address}/#/")
                    page.wait_for_selector('tr[data-channel="billing"]', timeout=10000)
                    assert page.evaluate("document.documentElement.scrollWidth") <= 390
                    page.screenshot(path=str(out / "admin-phone-overview.png"), full_page=True)
                    page.set_viewport_size({"width": 1400, "height": 900})

                    # Billing's view follows new messages by itself.
                    page.click('tr[data-channel="billing"] td.name a')
                    depth_chart = 'figure[data-chart="depth"] svg'
                    page.wait_for_selector(depth_chart + ' path[data-series="depth"]',
                                           state="attached", timeout=10000)
                    b.publish_many("orders", [b"more"] * 10)
                    page.wait_for_function(
                        "([sel, n]) => { const v = (" + _RENDERED_JS + ")([sel, 'depth']);"
                        " return v && v.length && Math.abs(v[v.length - 1] - n) < 0.5; }",
                        arg=[depth_chart, count + 10], timeout=10000)

                    # Each action, from the channel's view, then the topic's.
                    def pause_and_unpause(target):
                        for action, then, paused in (("pause", "unpause", True),
                                                     ("unpause", "pause", False)):
                            page.click(f'#detail-actions button[data-action="{action}"]')
                            page.wait_for_selector(
                                f'#detail-actions button[data-action="{then}"]', timeout=10000)
                            assert target.paused == paused

                    billing = b.get_topic("orders").get_channel("billing")
                    pause_and_unpause(billing)
                    refuse.append(True)          # asked first: dismissing keeps them
                    page.click('#detail-actions button[data-action="empty"]')
                    wait_until(lambda: not refuse, what="the dialog")
                    page.wait_for_timeout(300)
                    assert billing.stats()["depth"] == count + 10
                    page.click('#detail-actions button[data-action="empty"]')
                    wait_until(lambda: billing.stats()["depth"] == 0, what="billing emptied")
                    assert dialogs[-1].startswith("Empty channel orders/billing")
                    page.click('#detail-actions button[data-action="delete"]')
                    page.wait_for_function("location.hash === '#/topic/orders'", timeout=10000)
                    assert dialogs[-1].startswith("Delete channel orders/billing")
                    assert "billing" not in b.get_topic("orders").channels
                    page.wait_for_selector('tr[data-channel="audit"]', timeout=10000)
                    assert page.query_selector('tr[data-channel="billing"]') is None
                    topic = b.get_topic("orders")
                    pause_and_unpause(topic)
                    page.click('#detail-actions button[data-action="empty"]')
                    wait_until(lambda: dialogs[-1].startswith("Empty topic orders"),
                               what="the empty dialog")
                    page.click('#detail-actions button[data-action="delete"]')
                    page.wait_for_function("location.hash === '#/'", timeout=10000)
                    assert dialogs[-1].startswith("Delete topic orders")
                    wait_until(lambda: not b.has_topic("orders"), what="orders deleted")
                    page.wait_for_selector("#empty:not([hidden])", timeout=10000)
                finally:
                    browser.close()
        finally:
            stop.set()
            finisher.join()
            remote.close()
            inproc.close()
            client.close()


def test_admin_page_charts_e2e_percentiles_when_on(tmp_path):
    """With e2e percentiles on (serve's --e2e-processing-latency-percentile),
    a channel's view charts them: messages finished 30 ms and 3 ms after
    their publish."""
    sync_api, exe = _chromium()
    with _served(e2e_percentiles=[0.99, 0.5]) as web:
        b = web.broker
        with b.consumer("orders", "billing", max_in_flight=10) as cons:
            for wait in [0.03] * 4 + [0.003] * 6:
                b.publish("orders", b"x")
                m = cons.get(timeout=5)
                time.sleep(wait)
                m.finish()
            cons.channel.settle()

        def sampled():
            e2e = web.history.series("orders", "billing", "10m")["e2e_percentiles"]
            return e2e and sum(v is not None for v in e2e[0]["ms"]) >= 2
        wait_until(sampled, what="2 samples with percentiles")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=_CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"http://{web.address}/#/channel/orders/billing")
                chart = 'figure[data-chart="e2e"] svg'
                page.wait_for_selector(chart + ' path[data-series="p99"]', state="attached",
                                       timeout=10000)
                p99, p50 = _rendered(page, chart, "p99"), _rendered(page, chart, "p50")
                stats = b.stats()["topics"][0]["channels"][0]["e2e_processing_latency"]
                want = [p["value"] / 1e6 for p in stats["percentiles"]]
                assert p99 and p50 and want[0] >= 30 and 3 <= want[1] < 30
                assert p99[-1] == pytest.approx(want[0], rel=0.01)     # drawn as measured
                assert p50[-1] == pytest.approx(want[1], rel=0.01)
                assert "p99" in page.inner_text('figure[data-chart="e2e"] .legend')
                page.screenshot(path=str(_artifacts(tmp_path) / "admin-channel-e2e.png"),
                                full_page=True)
            finally:
                browser.close()


def test_admin_page_stays_responsive_with_200_topics_of_5_channels(tmp_path):
    """1,200 rows, each with two small charts: all shown, refreshed in place,
    and an action answers.  The times are written down, not asserted."""
    sync_api, exe = _chromium()
    with _served() as web:
        b = web.broker
        for i in range(200):
            t = b.topic(f"topic-{i:03d}")
            for j in range(5):
                t.channel(f"channel-{j}")
            if i % 7:
                b.publish_many(t.name, [b"x"] * (i % 7))
        wait_until(lambda: web.history.has("topic-199", "channel-4"), what="a sample")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=_CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                t0 = time.monotonic()
                page.goto(f"http://{web.address}/")
                page.wait_for_function(
                    "document.querySelectorAll('#stats tr.channel').length === 1000",
                    timeout=30000)
                page.wait_for_function(
                    """() => document.querySelector('tr[data-topic="topic-199"]'
                       + '[data-channel="channel-4"] path[data-series="depth"]')
                       .getAttribute('d') !== ''""", timeout=30000)
                shown = time.monotonic() - t0
                # A 2 s refresh runs; the page answers a click meanwhile.
                row = 'tr[data-topic="topic-150"][data-channel="channel-2"]'
                t0 = time.monotonic()
                page.click(f'{row} button[data-action="pause"]')
                page.wait_for_selector(f'{row} button[data-action="unpause"]', timeout=30000)
                paused = time.monotonic() - t0
                assert b.get_topic("topic-150").get_channel("channel-2").paused
                assert page.inner_text('tr[data-topic="topic-006"][data-channel="channel-0"] '
                                       'td[data-field="depth"]') == "6"
                frame = page.evaluate("""() => new Promise((done) => {
                    const t0 = performance.now();
                    requestAnimationFrame(() => done(performance.now() - t0)); })""")
                out = _artifacts(tmp_path)
                page.screenshot(path=str(out / "admin-many-topics.png"))
                (out / "admin-many-topics.txt").write_text(
                    f"1,000 channels: shown in {shown:.2f} s, a pause shown in {paused:.2f} s, "
                    f"a frame in {frame:.0f} ms\n")
            finally:
                browser.close()


def test_metrics_keep_every_digit_of_large_latency_sums(clock):
    with minq.Broker(clock=clock, msg_timeout=3000, max_msg_timeout=3000) as b, \
            b.consumer("t", "c") as cons:
        b.publish("t", b"x")
        m = cons.get(timeout=5)
        clock.advance(1234.567891)
        m.finish()
        text = minq.prometheus_metrics(b.stats())
    [line] = [ln for ln in text.splitlines()
              if ln.startswith("minq_channel_e2e_latency_seconds_sum")]
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(1234.567891, rel=1e-9)
    assert 'le="+Inf"} 1' in text and 'le="300"} 0' in text


def test_http_stats_text_and_metrics_carry_e2e_percentiles(clock):
    with minq.Broker(clock=clock, e2e_percentiles=[0.99, 0.5]) as b, \
            minq.HTTPServer(b, "127.0.0.1:0").start() as srv, b.consumer("t", "c") as cons:
        b.publish("t", b"x")
        finish_after(b, clock, cons, 0.0015)
        stats = json.loads(http(srv, "GET", "/stats?format=json")[2])
        text = http(srv, "GET", "/stats")[2].decode()
        metrics = http(srv, "GET", "/metrics")[2].decode()
    for obj in (stats["topics"][0], stats["topics"][0]["channels"][0]):
        e2e = obj["e2e_processing_latency"]        # nsqd's layout, values in ns
        assert e2e["count"] == 1 and [p["quantile"] for p in e2e["percentiles"]] == [0.99, 0.5]
        assert all(abs(p["value"] - 1_500_000) <= 15_000 for p in e2e["percentiles"])
    assert text.count("e2e%: 1.5ms, 1.5ms") == 2      # nsqd's text form, topic and channel
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                   if line.startswith("minq_channel_e2e_processing_latency"))
    key = 'minq_channel_e2e_processing_latency_seconds{topic="t",channel="c",quantile="0.99"}'
    assert float(samples[key]) == pytest.approx(0.0015, rel=0.01)
    assert samples['minq_channel_e2e_processing_latency_seconds_count{topic="t",channel="c"}'] \
        == "1"
    assert "# TYPE minq_topic_e2e_processing_latency_seconds summary" in metrics


def udp_listener():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(5)
    return u


def statsd_lines(u, packets):
    """What *packets* UDP packets carry: {name: (value, type)}, each packet checked."""
    got = {}
    for _ in range(packets):
        data = u.recv(65536)
        assert data.endswith(b"\n")
        for line in data.decode().splitlines():
            name, rest = line.split(":")
            value, kind = rest.split("|")
            got[name] = (int(value), kind)
    return got


def test_statsd_pushes_nsqds_names_and_types(clock):
    u = udp_listener()
    with u, minq.Broker(clock=clock, e2e_percentiles=[0.99]) as b:
        b.topic("t").channel("c")
        b.topic("t").channel("tmp#ephemeral")
        b.publish_many("t", [b"abc", b"de", b"f"])
        with b.consumer("t", "c", max_in_flight=2) as cons:
            finish_after(b, clock, cons, 0.002)
            cons.get(timeout=5).requeue()
            pusher = minq.StatsdPusher(b, "127.0.0.1:%d" % u.getsockname()[1],
                                       minq.statsd_prefix("nsq.%s", "10.0.0.7", 4151),
                                       packet_size=200, exclude_ephemeral=True)
            sent = pusher.push()
            got = statsd_lines(u, sent)
            assert sent > 1 and all(len(p) <= 200 for p in pusher.packets(pusher.lines()))
            t, c = "nsq.10_0_0_7_4151.topic.t", "nsq.10_0_0_7_4151.topic.t.channel.c"
            assert got[f"{t}.message_count"] == (3, "c")
            assert got[f"{t}.message_bytes"] == (6, "c")
            assert got[f"{t}.depth"] == (0, "g") and got[f"{t}.backend_depth"] == (0, "g")
            assert got[f"{c}.message_count"] == (3, "c")
            st = b.stats()["topics"][0]["channels"][0]
            for key in ("depth", "backend_depth", "in_flight_count", "deferred_count"):
                assert got[f"{c}.{key}"] == (st[key], "g"), key
            assert got[f"{c}.requeue_count"] == (1, "c") and got[f"{c}.timeout_count"] == (0, "c")
            assert got[f"{c}.clients"] == (1, "g") and st["in_flight_count"] == 2
            assert abs(got[f"{c}.e2e_processing_latency_99"][0] - 2_000_000) < 20_000
            assert got[f"{t}.e2e_processing_latency_99"][1] == "g"
            assert got["nsq.10_0_0_7_4151.mem.heap_objects"][1] == "g"
            assert got["nsq.10_0_0_7_4151.mem.gc_runs"][1] == "c"
            assert not [n for n in got if "ephemeral" in n]
            b.publish("t", b"more")                  # counters carry the change since
            got = statsd_lines(u, pusher.push())
            assert got[f"{t}.message_count"] == (1, "c") and got[f"{c}.requeue_count"] == (0, "c")
            quiet = minq.StatsdPusher(b, "127.0.0.1:%d" % u.getsockname()[1], mem_stats=False)
            got = statsd_lines(u, quiet.push())
            assert "topic.t.channel.tmp#ephemeral.depth" in got and not [
                n for n in got if n.startswith("mem.")]


def test_statsd_prefix_expands_as_nsqd():
    assert minq.statsd_prefix("nsq.%s", "10.0.0.7", 4151) == "nsq.10_0_0_7_4151."
    assert minq.statsd_prefix("nsq.%s", "::1", 4151) == "nsq.[__1]_4151."
    assert minq.statsd_prefix("app.", "h", 1) == "app." and minq.statsd_prefix("app", "h", 1) \
        == "app."
    assert minq.statsd_prefix("", "h", 1) == ""


def test_statsd_unreachable_costs_a_log_line(broker, caplog):
    pusher = minq.StatsdPusher(broker, "no-such-host.invalid:8125")
    assert pusher.push() == 0
    assert "STATSD: failed to push stats to no-such-host.invalid:8125" in caplog.text


def test_http_ping_reports_storage_failure(tmp_path, monkeypatch):
    with minq.Broker(data_path=str(tmp_path), durable=True) as b, \
            minq.HTTPServer(b, "127.0.0.1:0").start() as srv:
        _failing_disk(monkeypatch, lambda: True)
        status, _, body = http(srv, "POST", "/pub?topic=t", b"x")
        assert (status, json.loads(body)) == (503, {"message": "EXITING"})
        status, _, body = http(srv, "GET", "/ping")
        assert status == 500 and b"NOK" in body
        monkeypatch.undo()
        assert http(srv, "POST", "/pub?topic=t", b"x")[0] == 200
        assert http(srv, "GET", "/ping")[2] == b"OK"


def test_serve_http_curl_style_publish(tmp_path):
    s = Served("--data-path", "", cwd=tmp_path)
    try:
        assert http(s.http_address, "POST", "/pub?topic=t", b"via http")[2] == b"OK"
        with minq.Client(s.address) as c, c.consumer("t", "c") as cons:
            assert cons.get(timeout=5).body == b"via http"
    finally:
        assert s.stop() == 0


def raw_http(srv, data, timeout=5.0, shut=True):
    """Send raw bytes to an HTTP server; return everything it answers until it closes."""
    host, port = srv.server_address[:2] if not isinstance(srv, str) else srv.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def statuses(reply):
    return [int(m) for m in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", reply, re.M)]


def test_http_chunked_body_is_read_as_the_body_not_as_a_request(web):
    hidden = b"POST /topic/create?topic=smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    body = b"5\r\nhello\r\n" + b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"
    reply = raw_http(web, b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert statuses(reply) == [200]
    assert "smuggled" not in web.broker.topics
    with web.broker.consumer("t", "c") as c:
        assert c.get(timeout=2).body == b"hello" + hidden


@pytest.mark.parametrize("head, status", [
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),     # both: refused
    (b"Content-Length: 5\r\nContent-Length: 7\r\n", 400),              # differing lengths
    (b"Transfer-Encoding: gzip\r\n", 501),
    (b"Content-Length: -1\r\n", 400),
    (b"Content-Length: 5\r\nContent-Length: 5\r\n", 200),              # the same twice: fine
])
def test_http_ambiguous_bodies_are_refused(web, head, status):
    reply = raw_http(web, b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n"
                          b"hello\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(reply)[0] == status
    if status != 200:
        assert statuses(reply) == [status]          # closed: the rest is not a request
        assert b'"message"' in reply


@pytest.mark.parametrize("chunks", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n",
                                    b"5\r\nhel", b"3\r\nabc\r\n0\r\nTrailer: x"])
def test_http_bad_chunked_framing_is_400_and_closes(web, chunks):
    reply = raw_http(web, b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    assert statuses(reply) in ([400], [])
    assert "t" not in web.broker.topics


def test_http_chunked_body_over_the_limit_is_413(web):
    big = b"x" * (1024 * 1024)
    body = b"%x\r\n" % len(big) + big + b"\r\n" + b"1\r\ny\r\n0\r\n\r\n"
    reply = raw_http(web, b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert statuses(reply) == [413] and b"MSG_TOO_BIG" in reply


def test_http_a_body_sent_to_a_get_endpoint_is_not_a_second_request(web):
    inner = b"POST /topic/create?topic=smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    reply = raw_http(web, b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(inner) + inner)
    assert statuses(reply) == [200]
    assert "smuggled" not in web.broker.topics


@pytest.mark.parametrize("method, path, status", [("PUT", "/pub?topic=t", 405),
                                                  ("PUT", "/mpub?topic=t", 405),
                                                  ("HEAD", "/ping", 405), ("GET", "/pub", 405),
                                                  ("HEAD", "/", 200)])
def test_http_methods_as_nsqd_allows(web, method, path, status):
    assert http(web, method, path, b"x" if method == "PUT" else None)[0] == status
    assert "t" not in web.broker.topics


@pytest.fixture
def strict_web():
    b = minq.Broker()
    srv = minq.HTTPServer(b, "127.0.0.1:0", options={
        "http_header_timeout": 0.3, "http_read_timeout": 0.3, "http_idle_timeout": 0.3}).start()
    yield srv
    srv.close()
    b.close()


@pytest.mark.parametrize("sent", [b"", b"GET /pi", b"GET /ping HTTP/1.1\r\nHost: x\r\n",
                                  b"POST /pub?topic=t HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"])
def test_http_partial_requests_are_closed_after_their_timeout(strict_web, sent):
    started = time.monotonic()
    reply = raw_http(strict_web, sent, timeout=10, shut=False)
    assert reply == b""                             # closed, nothing half-handled
    assert time.monotonic() - started < 8
    assert "t" not in strict_web.broker.topics
    assert http(strict_web, "GET", "/ping")[0] == 200


def test_http_idle_keep_alive_connection_is_closed(strict_web):
    from http.client import HTTPConnection
    conn = HTTPConnection(*strict_web.server_address[:2], timeout=10)
    conn.request("GET", "/ping")
    assert conn.getresponse().read() == b"OK"
    s = conn.sock
    s.settimeout(10)
    assert s.recv(1) == b""                          # the server closed it when idle
    conn.close()


def test_http_listen_backlog_takes_a_burst_of_connections(web):
    assert web.request_queue_size >= 1024
    socks = [socket.create_connection(web.server_address[:2], timeout=5) for _ in range(300)]
    try:
        for s in socks[:5]:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in socks[:5]:
            assert s.recv(1000).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()


def test_http_tls_required_answers_403_and_https_serves(tmp_path):
    import ssl
    from http.client import HTTPSConnection
    cert, key = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    with minq.Broker() as b:
        https = minq.HTTPServer(b, "127.0.0.1:0", tls_context=ctx,
                                options={"tls_required": True}).start()
        plain = minq.HTTPServer(b, "127.0.0.1:0", options={
            "tls_required": True, "https_port": https.server_address[1]}).start()
        open_ = minq.HTTPServer(b, "127.0.0.1:0", options={"tls_required": "tcp-https"}).start()
        try:
            status, _, body = http(plain, "POST", "/pub?topic=t", b"x")
            assert status == 403
            assert json.loads(body) == {"message": "TLS_REQUIRED",
                                        "https_port": https.server_address[1]}
            assert http(plain, "GET", "/ping")[0] == 403
            conn = HTTPSConnection(*https.server_address[:2], timeout=5,
                                               context=client_tls_context())
            conn.request("POST", "/pub?topic=t", body=b"over tls")
            assert conn.getresponse().status == 200
            conn.close()
            assert http(open_, "GET", "/ping")[0] == 200      # tcp-https: HTTP stays open
            assert b.get_topic("t").depth == 1
        finally:
            for s in (https, plain, open_):
                s.close()


def test_http_over_the_memory_budget_waits_then_503(strict_web):
    budget = strict_web.body_budget
    assert budget.try_take(budget.limit)
    body = b"x\n" * 50_000
    status, _, reply = http(strict_web, "POST", "/mpub?topic=t", body)
    assert (status, json.loads(reply)) == (503, {"message": "BODY_MEMORY_FULL"})
    budget.give_back(budget.limit)
    assert http(strict_web, "POST", "/mpub?topic=t", body)[0] == 200
    assert strict_web.broker.get_topic("t").depth == 50_000 and budget.used == 0


def test_http_pub_to_a_new_topic_on_a_full_disk_is_503_json(tmp_path, monkeypatch, caplog):
    with minq.Broker(data_path=str(tmp_path), durable=True) as b, \
            minq.HTTPServer(b, "127.0.0.1:0").start() as srv:
        _full_disk_for_new_files(monkeypatch, tmp_path)
        status, _, body = http(srv, "POST", "/pub?topic=fresh", b"x")
        assert (status, json.loads(body)) == (503, {"message": "EXITING"})
        assert "Traceback" not in caplog.text


def test_http_fuzz_every_reply_is_well_formed_and_the_server_stays(strict_web):
    rnd = random.Random(99)
    methods = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"PATCH", b"G\x00T", b""]
    paths = [b"/pub?topic=t", b"/mpub?topic=t&binary=true", b"/mpub?topic=t", b"/stats",
             b"/ping", b"/topic/create?topic=x", b"/channel/pause?topic=t&channel=c",
             b"/config/msg_timeout", b"/%zz", b"*", b"/" + b"a" * 70000]
    for i in range(120):
        lines = [rnd.choice(methods) + b" " + rnd.choice(paths) + b" " +
                 rnd.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b""])]
        body = rnd.randbytes(rnd.randrange(0, 300))
        for _ in range(rnd.randrange(0, 4)):
            lines.append(rnd.choice([b"Content-Length: %d" % rnd.randrange(-2, 400),
                                     b"Transfer-Encoding: chunked", b"Host: x",
                                     b"Expect: 100-continue", b"X: " + rnd.randbytes(20),
                                     b"Connection: keep-alive", b"bad header line"]))
        if rnd.random() < 0.3:
            body = b"".join(b"%x\r\n" % n + rnd.randbytes(n) + b"\r\n"
                            for n in [rnd.randrange(0, 40) for _ in range(3)]) + b"0\r\n\r\n"
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        if rnd.random() < 0.2:
            data = data[:rnd.randrange(len(data))]
        reply = raw_http(strict_web, data, timeout=10)
        for m in re.finditer(rb"HTTP/1\.[01] (\d{3}) ", reply):
            assert 100 <= int(m.group(1)) < 600
        assert not reply or reply.startswith(b"HTTP/1."), (data, reply[:200])
    assert http(strict_web, "GET", "/ping")[0] == 200
    assert threading.active_count() < 20


def test_http_request_split_anywhere_is_read_whole(web):
    data = (b"POST /pub?topic=split HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    for cut in range(1, len(data)):
        s = socket.create_connection(web.server_address[:2], timeout=5)
        s.sendall(data[:cut])
        time.sleep(0.002)
        s.sendall(data[cut:])
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
        s.close()
    assert web.broker.get_topic("split").depth == len(data) - 1


def test_http_pipelined_requests_are_answered_in_order_behind_a_blocking_one(web):
    # /topic/create runs on a worker, /pub goes through the publish batch,
    # /ping is answered at once: the answers still come in request order.
    reqs = [b"POST /topic/create?topic=p HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /pub?topic=p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none",
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /pub?topic=p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ntwo",
            b"GET /stats?format=json&topic=p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
    reply = raw_http(web, b"".join(reqs), shut=False)
    codes = [int(c) for c in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]   # (bodies end mid-line)
    assert codes == [200, 200, 200, 404, 200, 200]
    assert json.loads(reply[reply.rindex(b"\r\n\r\n") + 4:])["topics"][0]["depth"] == 2
    with web.broker.consumer("p", "c", max_in_flight=10) as c:
        assert [m.body for m in drain(c)] == [b"one", b"two"]


def test_http_same_head_twice_with_different_bodies_publishes_both(web):
    head = b"POST /pub?topic=h HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
    reply = raw_http(web, head + b"abc" + head + b"xyz")
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    with web.broker.consumer("h", "c", max_in_flight=10) as c:
        assert [m.body for m in drain(c)] == [b"abc", b"xyz"]


def test_http_expect_100_continue_is_answered_before_the_body(web):
    s = socket.create_connection(web.server_address[:2], timeout=5)
    s.sendall(b"POST /pub?topic=e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
              b"Expect: 100-continue\r\n\r\n")
    assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"body")
    assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    s.close()


@pytest.mark.parametrize("head, kept", [(b"GET /ping HTTP/1.0\r\n", False),
                                        (b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n", True),
                                        (b"GET /ping HTTP/1.1\r\n", True),
                                        (b"GET /ping HTTP/1.1\r\nConnection: close\r\n", False)])
def test_http_keep_alive_as_the_version_and_connection_header_say(web, head, kept):
    s = socket.create_connection(web.server_address[:2], timeout=5)
    s.sendall(head + b"\r\n")
    reply = b""
    while b"\r\n\r\nOK" not in reply:
        reply += s.recv(4096)
    s.sendall(b"GET /ping HTTP/1.1\r\n\r\n")
    rest = s.recv(4096)
    assert bool(rest) == kept and (b"Connection: close" in reply) == (not kept)
    s.close()


def test_http_idle_keep_alive_connections_need_no_thread(web):
    before = threading.active_count()
    socks = []
    for _ in range(200):
        s = socket.create_connection(web.server_address[:2], timeout=5)
        s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        socks.append(s)
    assert threading.active_count() == before
    for s in socks:
        s.close()


# =============================================================================
# CLI: python minq.py serve
# =============================================================================

def test_parse_duration_accepts_nsqd_forms():
    assert minq.parse_duration("60s") == 60
    assert minq.parse_duration("15m") == 900
    assert minq.parse_duration("1h30m") == 5400
    assert minq.parse_duration("250ms") == 0.25
    assert minq.parse_duration("2") == 2
    for bad in ("", "5x", "s", "1h 2m"):
        with pytest.raises(minq.InvalidArgument):
            minq.parse_duration(bad)


class Served:
    """``python minq.py serve`` in a subprocess, its port read from the banner."""

    def __init__(self, *args, cwd):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "minq.py"), "serve", "--tcp-address", "127.0.0.1:0",
             "--http-address", "127.0.0.1:0", *args],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on tcp://([0-9.]+:\d+)", line)
        if not m:
            self.proc.kill()
            pytest.fail(f"no banner: {line!r} {self.proc.stderr.read()}")
        self.address = m.group(1)
        h = re.search(r"http://([0-9.]+:\d+)", line)
        self.http_address = h.group(1) if h else None
        self.banner = line

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        _, self.stderr = self.proc.communicate(timeout=20)
        return self.proc.returncode


def test_serve_banner_sigterm_exit_0_and_restart_keeps_messages(tmp_path):
    s = Served("--data-path", "data", cwd=tmp_path)
    assert str(tmp_path / "data") in s.banner
    with minq.Client(s.address) as c:
        c.publish("t", b"kept")
        with c.consumer("t", "c") as cons:      # creates the channel; message in flight...
            assert cons.get(timeout=5).body == b"kept"
    assert s.stop(signal.SIGINT) == 0
    s = Served("--data-path", "data", cwd=tmp_path)
    with minq.Client(s.address) as c, c.consumer("t", "c") as cons:
        m = cons.get(timeout=5)
        assert (m.body, m.attempts) == (b"kept", 2)
        m.finish()
    assert s.stop() == 0


def test_lookupd_channels_exist_before_a_new_topics_first_message():
    asked = []

    def channels(req):
        asked.append((req.path, req.headers.get("Accept")))
        return json.dumps({"channels": ["archive", "live#ephemeral"]}).encode()
    b = minq.Broker()
    try:
        with answering_http(channels) as web, \
                FakeLookupd(http_port=web.server_address[1]) as lk, \
                minq.LookupdRegistrar(b, [lk.address], broadcast_address="h", tcp_port=1,
                                      http_port=2) as reg:
            wait_until(lambda: reg.peers[0].connected, 10, "the registrar to connect")
            b.publish("new", b"first")
            assert sorted(b.get_topic("new").channels) == ["archive"]   # ephemeral skipped
            assert b.get_topic("new").get_channel("archive").stats()["depth"] == 1
            assert asked == [("/channels?topic=new", "application/vnd.nsq; version=1.0")]
    finally:
        b.close()


def test_lookupd_malformed_address_fails_at_once():
    with minq.Broker() as b:
        with pytest.raises(minq.InvalidArgument):
            minq.LookupdRegistrar(b, ["lookupd:port"], broadcast_address="h", tcp_port=1,
                                  http_port=2)


def test_serve_registers_with_lookupd_tcp_address(tmp_path):
    with FakeLookupd() as lk:
        s = Served("--lookupd-tcp-address", lk.address, "--broadcast-address", "127.0.0.1",
                   "--data-path", "", cwd=tmp_path)
        try:
            _, line, ident = lk.next()
            assert line == "IDENTIFY"
            assert ident["broadcast_address"] == "127.0.0.1"
            assert ident["tcp_port"] == int(s.address.rsplit(":", 1)[1])
            assert ident["http_port"] == int(s.http_address.rsplit(":", 1)[1])
            with minq.Client(s.address) as c:
                c.publish("from_serve", b"x")
            assert lk.lines(1) == ["REGISTER from_serve"]
        finally:
            assert s.stop() == 0


def test_serve_durable_ok_means_survives_kill9(tmp_path):
    s = Served("--data-path", "d", "--durable", "--mem-queue-size", "5", cwd=tmp_path)
    with minq.Client(s.address) as c:
        for i in range(50):
            c.publish("t", b"m%d" % i)
        c.publish_many("t", [b"batch%d" % i for i in range(10)])
    s.stop(signal.SIGKILL)
    s = Served("--data-path", "d", "--durable", cwd=tmp_path)
    with minq.Client(s.address) as c, c.consumer("t", "c", max_in_flight=100) as cons:
        got = set()
        while len(got) < 60:
            m = cons.get(timeout=5)
            assert m is not None, f"lost after kill -9: {60 - len(got)} messages"
            got.add(m.body)
            m.finish()
    assert s.stop() == 0


def test_serve_config_file_and_flags(tmp_path):
    (tmp_path / "minq.toml").write_text('mem_queue_size = 7\nmsg_timeout = "90s"\n'
                                        'data_path = ""\nmax_rdy_count = 10\n')
    s = Served("--config", "minq.toml", "--max-rdy-count", "20", cwd=tmp_path)
    assert "memory only" in s.banner
    r = Raw(s.address)
    r.cmd("IDENTIFY", b'{"feature_negotiation": true}')
    reply = json.loads(r.response())
    assert reply["max_rdy_count"] == 20 and reply["msg_timeout"] == 90000
    r.close()
    assert s.stop() == 0


def test_config_file_reads_the_same_without_tomllib(tmp_path, monkeypatch):
    path = tmp_path / "minq.toml"
    path.write_text('# flags, with _ for -\nmem_queue_size = 1_000\nmsg_timeout = "90s"  # nsqd form\n'
                    "data_path = ''\ndurable = true\nlookupd_tcp_address = [\"a:4160\", \"b:4160\"]\n")
    expected = {"mem_queue_size": 1000, "msg_timeout": "90s", "data_path": "", "durable": True,
                "lookupd_tcp_address": ["a:4160", "b:4160"]}
    if sys.version_info >= (3, 11):
        assert minq._read_config(str(path)) == expected
    monkeypatch.setitem(sys.modules, "tomllib", None)      # as on Python 3.9 and 3.10
    assert minq._read_config(str(path)) == expected
    path.write_text("[table]\nkey = 1\n")
    with pytest.raises(minq.InvalidArgument, match="line 1"):
        minq._read_config(str(path))


@pytest.mark.parametrize("args, text", [
    (["--msg-timeout", "soon"], "invalid duration"),
    (["--mem-queue-size", "many"], "--mem-queue-size"),
    (["--bogus"], "unrecognized arguments"),
])
def test_serve_bad_flags_exit_2_with_reason(tmp_path, args, text):
    r = subprocess.run([sys.executable, str(HERE / "minq.py"), "serve", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and text in r.stderr


def test_serve_port_in_use_exits_1(server, tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "minq.py"), "serve", "--data-path", "",
                        "--tcp-address", server.address], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot start" in r.stderr


def test_serve_bad_lookupd_address_exits_1_and_frees_its_ports(tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "minq.py"), "serve", "--data-path", "",
                        "--tcp-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0",
                        "--lookupd-tcp-address", "lookupd:port"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot start" in r.stderr and "lookupd:port" in r.stderr


# -- the tools: pub, tail, stats, end to end against a live server -----------

def run_tool(*args, input=None, timeout=30):
    return subprocess.run([sys.executable, str(HERE / "minq.py"), *args], input=input,
                          capture_output=True, timeout=timeout)


def test_pub_tool_one_message_and_stdin_lines(web):
    b = web.broker
    r = run_tool("pub", "t", "hello", "--nsqd-tcp-address", web.tcp_address)
    assert r.returncode == 0, r.stderr
    r = run_tool("pub", "t", "--nsqd-tcp-address", web.tcp_address, "--batch", "2",
                 input=b"a\nb\n\nc\r\n")
    assert r.returncode == 0, r.stderr
    assert b"published 3 message(s) to t" in r.stderr
    with b.consumer("t", "c", max_in_flight=10) as cons:
        assert [m.body for m in drain(cons, 4, timeout=5)] == [b"hello", b"a", b"b", b"c"]


def test_pub_tool_defer_and_errors(web):
    ch = web.broker.topic("t").channel("c")
    r = run_tool("pub", "t", "later", "--defer", "30m", "--nsqd-tcp-address", web.tcp_address)
    assert r.returncode == 0, r.stderr
    assert (ch.stats()["deferred_count"], ch.stats()["depth"]) == (1, 0)   # held back
    r = run_tool("pub", "bad topic!", "x", "--nsqd-tcp-address", web.tcp_address)
    assert r.returncode == 1 and b"minq pub:" in r.stderr and b"topic" in r.stderr
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    started = time.monotonic()
    r = run_tool("pub", "t", "x", "--nsqd-tcp-address", free, "--connect-timeout", "300ms",
                 timeout=60)
    assert r.returncode == 1 and b"cannot connect" in r.stderr
    assert time.monotonic() - started < 4          # gave up after 300 ms, not 5 s


def test_tail_tool_prints_new_messages_on_an_ephemeral_channel(web):
    b = web.broker
    b.topic("t").channel("work")                  # a real consumer group, untouched by tail
    proc = subprocess.Popen([sys.executable, str(HERE / "minq.py"), "tail", "t", "-n", "2",
                             "--print-topic", "--nsqd-tcp-address", web.tcp_address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: [c for c in b.get_topic("t").channels if c.endswith("#ephemeral")],
                   10, "tail's ephemeral channel")
        for body in (b"one", b"two", b"three"):
            b.publish("t", body)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == [b"t | one", b"t | two"]
    assert b.get_topic("t").get_channel("work").stats()["depth"] == 3
    wait_until(lambda: not [c for c in b.get_topic("t").channels if c.endswith("#ephemeral")],
               5, "its ephemeral channel to go with it")


def test_tail_tool_ends_cleanly_on_sigterm(web):
    b = web.broker
    proc = subprocess.Popen([sys.executable, str(HERE / "minq.py"), "tail", "t",
                             "--nsqd-tcp-address", web.tcp_address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "t" in b.topics and b.get_topic("t").channels, 10, "tail's channel")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    wait_until(lambda: not b.get_topic("t").channels, 5, "its ephemeral channel to go with it")


def test_stats_tool_prints_depths_and_rates(web):
    b = web.broker
    b.topic("orders").channel("billing")
    b.publish_many("orders", [b"x"] * 5)
    r = run_tool("stats", "--nsqd-http-address", web.address, "--interval", "100ms",
                 "--count", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["topic/channel", "depth", "mem", "disk", "inflt", "def",
                                "req", "t-o", "msgs", "msg/s", "clients", "state"]
    with b.consumer("orders", "billing") as cons:
        cons.get(timeout=5)
        r = run_tool("stats", "--nsqd-http-address", web.address, "--count", "1")
    topic_row = [line.split() for line in r.stdout.decode().splitlines()
                 if line.startswith("orders ")][0]
    assert topic_row[-2] == "1"                    # the topic's clients: those of its channels
    rows = [line.split() for line in lines if line.startswith("orders/billing")]
    assert len(rows) == 2
    assert rows[0][1:4] == ["5", "5", "0"] and rows[0][8:10] == ["5", "-"]
    assert float(rows[1][9]) == 0.0                # no new messages between the two reports
    r = run_tool("stats", "--nsqd-http-address", web.address, "--topic", "nope", "--count", "1")
    assert r.returncode == 0 and b"(no topics)" in r.stdout


@contextlib.contextmanager
def fake_lookupd_http(*servers):
    """nsqlookupd's /lookup and /nodes, listing *servers*; ``asked`` has the paths."""
    producers = [{"broadcast_address": "127.0.0.1", "hostname": "h",
                  "tcp_port": int(s.tcp_address.rsplit(":", 1)[1]),
                  "http_port": int(s.address.rsplit(":", 1)[1])} for s in servers]
    asked = []

    def answer(req):
        asked.append(req.path)
        return json.dumps({"channels": [], "producers": producers}).encode()
    with answering_http(answer) as httpd:
        httpd.asked = asked
        yield httpd


@pytest.fixture
def web2():
    """A second server, for the tools' several-address flags."""
    b = minq.Broker()
    tcp = minq.TCPServer(b, "127.0.0.1:0").start()
    srv = minq.HTTPServer(b, "127.0.0.1:0", tcp_address=tcp.address).start()
    yield srv
    srv.close()
    tcp.close()
    b.close()


def test_pub_tool_takes_to_nsq_flags_single_or_double_dash(web, web2):
    r = run_tool("pub", "-topic=t", "-delimiter=,", "-rate=1000",
                 f"-nsqd-tcp-address={web.tcp_address}", "--nsqd-tcp-address", web2.tcp_address,
                 "-producer-opt=snappy", "--producer-opt", "user_agent,tests/1",
                 input=b"a,b,,c")
    assert r.returncode == 0, r.stderr
    for srv in (web, web2):                        # every message to each server
        with srv.broker.consumer("t", "c", max_in_flight=10) as cons:
            assert [m.body for m in drain(cons, 3, timeout=5)] == [b"a", b"b", b"c"]
    assert run_tool("pub", "--version").stdout.startswith(b"to_nsq v1.3.0")


def test_tail_tool_takes_nsq_tail_flags_and_finds_servers_through_lookupd(web, web2):
    def tail(*flags):
        return subprocess.Popen([sys.executable, str(HERE / "minq.py"), "tail", *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def channels(srv, topic):
        return srv.broker.has_topic(topic) and srv.broker.get_topic(topic).channels
    with fake_lookupd_http(web, web2) as lookupd:
        procs = [tail("-topic=a", "-topic=b", "-n=2", "-channel=c", "-print-topic",
                      f"-nsqd-tcp-address={web.tcp_address}", "-consumer-opt=max_in_flight,5"),
                 tail("--topic", "x", "--n", "2", "--channel", "c",
                      "--lookupd-http-address", lookupd.address)]
        try:
            wait_until(lambda: channels(web, "a") and channels(web, "b"), 10, "tail 1")
            wait_until(lambda: channels(web, "x") and channels(web2, "x"), 10, "tail 2")
            web.broker.publish("a", b"1")
            web.broker.publish("b", b"2")
            web.broker.publish("x", b"from web")
            web2.broker.publish("x", b"from web2")
            outs = [p.communicate(timeout=10) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
        assert "/lookup?topic=x" in lookupd.asked
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert sorted(outs[0][0].splitlines()) == [b"a | 1", b"b | 2"]
    assert sorted(outs[1][0].splitlines()) == [b"from web", b"from web2"]
    assert run_tool("tail", "-version").stdout.startswith(b"nsq_tail v1.3.0")


def test_stats_tool_takes_nsq_stat_flags_and_sums_servers(web, web2):
    for srv, n in ((web, 2), (web2, 3)):
        srv.broker.topic("t").channel("c")
        srv.broker.publish_many("t", [b"x"] * n)
    forms = [("-nsqd-http-address=" + web.address, "--nsqd-http-address", web2.address),
             ("--lookupd-http-address",)]
    with fake_lookupd_http(web, web2) as lookupd:
        for flags in forms:
            if flags == ("--lookupd-http-address",):
                flags += (lookupd.address,)
            r = run_tool("stats", *flags, "-topic=t", "-channel=c", "-status-every=50ms",
                         "-count=2", "-http-client-connect-timeout=1s",
                         "-http-client-request-timeout=3s")
            assert r.returncode == 0, r.stderr
            rows = [line.split() for line in r.stdout.decode().splitlines()
                    if line.startswith("t/c ")]
            assert len(rows) == 2 and rows[0][1] == "5" and rows[0][8] == "5", rows
        assert "/lookup?topic=t" in lookupd.asked
    assert run_tool("stats", "-version").stdout.startswith(b"nsq_stat v1.3.0")


@pytest.mark.parametrize("argv, error", [
    (["pub", "--topic", "t", "--producer-opt", "max_attempts,3"],
     b"--producer-opt 'max_attempts' is not implemented"),
    (["pub", "--topic", "t", "--delimiter", "ab"], b"--delimiter must be a single byte"),
    (["pub"], b"--topic required"),
    (["tail", "--topic", "t", "--consumer-opt", "backoff_strategy,full_jitter"],
     b"--consumer-opt 'backoff_strategy' is not implemented"),
    (["tail"], b"--topic required"),
    (["tail", "-topic=t", "-nsqd-tcp-address=a:1", "-lookupd-http-address=b:2"],
     b"not both"),
    (["stats", "-nsqd-http-address=a:1", "-lookupd-http-address=b:2"], b"not both"),
    (["stats", "--nsqd-http-address", "http://a:1"], b"should not contain a scheme"),
    (["stats", "--interval", "0s"], b"--interval"),
    (["stats", "--count", "-1"], b"--count"),
])
def test_tools_refuse_what_they_do_not_take_in_one_line(argv, error):
    r = run_tool(*argv, input=b"", timeout=30)
    assert r.returncode == 1 and error in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_tool(argv[0], "--no-such-flag", timeout=30)
    assert r.returncode == 2 and b"unrecognized arguments: --no-such-flag" in r.stderr


def test_tools_help_explains_with_examples():
    for tool in ("pub", "tail", "stats"):
        r = run_tool(tool, "--help")
        assert r.returncode == 0 and b"examples:" in r.stdout and b"NSQ" in r.stdout
    r = run_tool("--help")
    assert all(t in r.stdout for t in (b"serve", b"pub", b"tail", b"stats"))


def proc_memory(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_max_size_mpub_of_one_byte_messages_costs_a_small_multiple_of_its_size(tmp_path):
    s = Served("--data-path", "data", cwd=tmp_path)
    try:
        assert http(s.http_address, "POST", "/channel/create?topic=t&channel=c")[0] == 404
        assert http(s.http_address, "POST", "/topic/create?topic=t")[0] == 200
        assert http(s.http_address, "POST", "/channel/create?topic=t&channel=c")[0] == 200
        base = proc_memory(s.proc.pid, "VmRSS")
        size = 5 * 1024 * 1024
        assert http(s.http_address, "POST", "/mpub?topic=t", b"x\n" * (size // 2))[0] == 200
        text_peak = proc_memory(s.proc.pid, "VmHWM") - base
        count = (size - 4) // 5
        payload = struct.pack(">l", count) + (struct.pack(">l", 1) + b"y") * count
        r = Raw(s.address, timeout=30)
        r.cmd("MPUB t", payload)
        assert r.response() == b"OK"
        both_peak = proc_memory(s.proc.pid, "VmHWM") - base
        depth = minq_stats(s)["topics"][0]["channels"][0]["depth"]
        assert depth == size // 2 + count
        # the body itself, its offsets and a chunk of records at a time:
        # not a Python object per message (which cost 1.2 GB here)
        assert text_peak < 6 * size and both_peak < 6 * size, (text_peak, both_peak)
    finally:
        assert s.stop() == 0


def minq_stats(s):
    return json.loads(http(s.http_address, "GET", "/stats?format=json")[2])


def test_sigterm_with_idle_half_sent_and_busy_clients_stops_at_once_and_keeps_all(tmp_path):
    s = Served("--data-path", "data", cwd=tmp_path)
    host, port = s.http_address.split(":")
    idle = socket.create_connection((host, int(port)), timeout=10)     # keep-alive, idle
    idle.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(1000).startswith(b"HTTP/1.1 200")
    half = socket.create_connection((host, int(port)), timeout=10)     # half-sent request
    half.sendall(b"POST /pub?topic=t HTTP/1.1\r\nContent-Length: 100\r\n\r\nnot all")
    silent = socket.create_connection((host, int(port)), timeout=10)   # nothing sent
    for i in range(100):
        assert http(s.http_address, "POST", "/pub?topic=t", b"m%d" % i)[0] == 200
    stop_publishing = threading.Event()
    published = []

    def busy():                                    # a TCP client publishing flat out
        try:
            with minq.Client(s.address, timeout=0.5) as c:
                while not stop_publishing.is_set():
                    c.publish("t", b"busy")
                    published.append(1)
        except minq.MinqError:
            pass
    t = threading.Thread(target=busy)
    t.start()
    wait_until(lambda: len(published) > 100, 10, "the busy publisher to get going")
    started = time.monotonic()
    rc = s.stop()
    took = time.monotonic() - started
    stop_publishing.set()
    t.join(10)
    for sock in (idle, half, silent):
        sock.close()
    assert rc == 0 and took < 8, took               # not held open by any client
    s = Served("--data-path", "data", cwd=tmp_path)
    try:
        depth = minq_stats(s)["topics"][0]["depth"]
        assert depth >= 100 + len(published) - 1    # each acknowledged publish kept
    finally:
        assert s.stop() == 0


def test_sigterm_lets_a_request_in_progress_finish_within_the_grace(tmp_path):
    s = Served("--data-path", "data", "--shutdown-timeout", "20s", cwd=tmp_path)
    count = 1_000_000
    body = b"x\n" * count                          # about a second of work for the handler
    result = {}

    def post():
        result["reply"] = http(s.http_address, "POST", "/mpub?topic=t", body)
    t = threading.Thread(target=post)
    t.start()
    wait_until(lambda: list((tmp_path / "data").glob("t.*.seg")), 10,
               "the handler to start writing")
    rc = s.stop()                                   # SIGTERM while it is being handled
    t.join(30)
    assert rc == 0
    assert result["reply"][0] == 200                # it finished and was answered
    s = Served("--data-path", "data", cwd=tmp_path)
    try:
        assert minq_stats(s)["topics"][0]["depth"] == count
    finally:
        assert s.stop() == 0


def run_minq(*args, timeout=30, cwd=None, argv0=None):
    code = None
    if argv0:                                       # as the installed command would run
        code = (f"import sys; sys.argv[0] = {argv0!r}; import minq; "
                f"sys.exit(minq.main({list(args)!r}))")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(HERE / "minq.py"), *args]
    return subprocess.run(cmd, cwd=cwd or HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(HERE)})


@pytest.mark.parametrize("nsqd_args", [
    # command lines as nsqd's documentation writes them
    ["-data-path=data", "-mem-queue-size=100", "-msg-timeout=90s", "-max-rdy-count", "20"],
    ["--lookupd-tcp-address=127.0.0.1:1", "--broadcast-address=127.0.0.1", "-node-id=7",
     "-statsd-address=127.0.0.1:8125", "-statsd-prefix=nsq.%s", "-statsd-mem-stats=false",
     "-e2e-processing-latency-percentile=0.99,0.95", "-snappy", "-verbose"],
    ["-max-channel-consumers=2", "-min-output-buffer-timeout=50ms", "-tls-min-version=tls1.2",
     "-http-client-connect-timeout=1s", "-http-client-request-timeout=3s", "-deflate=false",
     "-max-deflate-level=5", "-sync-every=100", "-sync-timeout=1s", "-queue-scan-worker-pool-max=4"],
])
def test_serve_starts_unchanged_from_an_nsqd_command_line(tmp_path, nsqd_args):
    s = Served(*nsqd_args, cwd=tmp_path)
    try:
        with minq.Client(s.address) as c:
            c.publish("t", b"works")
        r = Raw(s.address)
        r.cmd("IDENTIFY", b'{"feature_negotiation": true, "output_buffer_timeout": 30}')
        reply = r.response() if "-min-output-buffer-timeout=50ms" not in nsqd_args else r.error()
        if "-max-rdy-count" in nsqd_args:
            assert json.loads(reply)["max_rdy_count"] == 20
            assert json.loads(reply)["msg_timeout"] == 90000
            assert (tmp_path / "data" / "minq.dat").exists() or (tmp_path / "data").is_dir()
        if "-min-output-buffer-timeout=50ms" in nsqd_args:
            assert reply == "E_BAD_BODY IDENTIFY output buffer timeout (30) is invalid"
    finally:
        assert s.stop() == 0


def test_serve_tracks_e2e_percentiles_and_pushes_statsd_from_nsqd_flags(tmp_path):
    u = udp_listener()
    s = Served("--data-path=", f"-statsd-address=127.0.0.1:{u.getsockname()[1]}",
               "-statsd-interval=100ms", "-statsd-mem-stats=false",
               "-e2e-processing-latency-percentile=0.5",
               "-e2e-processing-latency-percentile", "0.99,0.95", cwd=tmp_path)
    try:
        with u, minq.Client(s.address) as c:
            c.publish("t", b"x")
            with c.consumer("t", "c") as cons:
                cons.get(timeout=5).finish()
            stats = json.loads(http(s.http_address, "GET", "/stats?format=json")[2])
            e2e = stats["topics"][0]["e2e_processing_latency"]
            assert [p["quantile"] for p in e2e["percentiles"]] == [0.99, 0.95, 0.5]
            port = s.http_address.rsplit(":", 1)[1]
            wait_until(lambda: f"nsq.127_0_0_1_{port}.topic.t.channel.c.message_count" in
                       statsd_lines(u, 1), what="a statsd push with the channel")
    finally:
        assert s.stop() == 0
    for bad in ("-e2e-processing-latency-percentile=0", "-e2e-processing-latency-percentile=x"):
        r = run_minq("serve", "-tcp-address=127.0.0.1:0", "-http-address=", "-data-path=", bad)
        assert r.returncode != 0 and "e2e-processing-latency-percentile" in r.stderr


def test_serve_warns_once_about_the_nsqd_flags_it_ignores(tmp_path):
    r = run_minq("serve", "-tcp-address=127.0.0.1:0", "-http-address=", "-data-path=",
                 "-verbose", "-node-id", "3", "--version")
    assert r.returncode == 0 and r.stdout.startswith("nsqd v1.3.0 ")   # --version after the flags
    p = subprocess.Popen([sys.executable, str(HERE / "minq.py"), "serve", "-tcp-address=127.0.0.1:0",
                          "-http-address=", "-data-path=", "-verbose",
                          "-node-id", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert "listening on" in p.stdout.readline()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    lines = [line for line in err.splitlines() if "ignoring nsqd option" in line]
    assert len(lines) == 1 and "node-id, verbose" in lines[0]


def test_serve_version_and_help_in_nsqd_forms():
    # nsqd's version line (harnesses parse "NAME vX.Y.Z (built w/TOKEN)"); minq's own
    # version rides in the token, and `minq --version` says it first.
    r = run_minq("serve", "--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"nsqd v1.3.0 (built w/minq-{minq.VERSION})")
    assert run_minq("--version").stdout.strip() == f"minq {minq.VERSION} (nsqd 1.3.0 protocol)"
    assert minq.__version__ == minq.VERSION
    text = " ".join(run_minq("serve", "--help").stdout.split())
    for shown in ("(default 60s)", "(default 250ms)", "(default 15m)", "(default 1h)",
                  "(default 25ms)"):
        assert shown in text
    assert "(default 0)" not in text and "60.0" not in text and "0.25" not in text


def test_serve_logs_its_version_and_ports_as_nsqd_does(tmp_path):
    # The lines NSQ clients' test harnesses read from nsqd's stderr (gnsq's
    # expressions), beside minq's own banner on stdout.
    version_re = re.compile(r"(?P<name>[a-z]+) v(?P<version>[0-9]+\.[0-9]+\.[0-9]+)"
                            r"(?:-[a-z]+)? \(built w\/(?P<go_version>[a-z0-9.-]+)\)")
    listening_re = re.compile(r"(?P<protocol>[A-Z]+): listening on "
                              r"(?P<address>(?:[0-9]{1,3}\.){3}[0-9]{1,3}):(?P<port>[0-9]+)")
    s = Served("--data-path", "", cwd=tmp_path)
    assert s.stop() == 0
    err = s.stderr
    found = {m["protocol"]: f"{m['address']}:{m['port']}" for m in listening_re.finditer(err)}
    assert found == {"TCP": s.address, "HTTP": s.http_address}
    m = version_re.search(err)
    assert m and (m["name"], m["version"]) == ("nsqd", "1.3.0") and minq.VERSION in m["go_version"]


def test_installed_command_calls_itself_minq():
    r = run_minq("--help", argv0="/usr/local/bin/minq")
    assert r.stdout.startswith("usage: minq ") and "python minq.py" not in r.stdout
    r = run_minq("tail", "--help", argv0="/usr/local/bin/minq")
    assert "  minq tail orders -n 10" in r.stdout
    assert "usage: minq.py" in run_minq("--help").stdout


@pytest.mark.parametrize("face", ["TCP", "HTTP"])
def test_address_in_use_names_the_face_and_leaves_no_data_behind(tmp_path, face):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        flag = "--tcp-address" if face == "TCP" else "--http-address"
        r = run_minq("serve", "--tcp-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0",
                     flag, f"127.0.0.1:{port}", "--data-path", "data", cwd=tmp_path)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert f"cannot listen on {face} address 127.0.0.1:{port}: Address already in use" in lines[0]
    assert not (tmp_path / "data").exists()


def test_stats_and_tail_against_a_server_that_is_down_exit_1_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]           # bound, never accepting: then closed
    r = run_minq("stats", "--nsqd-http-address", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.strip() == f"minq stats: cannot get stats from http://127.0.0.1:{port}: " \
                               "Connection refused"
    started = time.monotonic()
    r = run_minq("tail", "t", "-n", "1", "--nsqd-tcp-address", f"127.0.0.1:{port}",
                 "--connect-timeout", "500ms")
    assert r.returncode == 1 and time.monotonic() - started < 20
    assert r.stderr.strip().startswith(f"minq tail: cannot connect to 127.0.0.1:{port}: ")
    assert r.stderr.count("cannot connect") == 1


def test_stats_tool_shows_paused_channels(tmp_path):
    s = Served(cwd=tmp_path)
    try:
        assert http(s.http_address, "POST", "/topic/create?topic=t")[0] == 200
        assert http(s.http_address, "POST", "/channel/create?topic=t&channel=c")[0] == 200
        assert http(s.http_address, "POST", "/channel/pause?topic=t&channel=c")[0] == 200
        r = run_minq("stats", "--nsqd-http-address", s.http_address, "--count", "1")
        rows = {line.split()[0]: line.split()[-1] for line in r.stdout.splitlines()[1:]}
        assert rows == {"t": "active", "t/c": "paused"}
    finally:
        assert s.stop() == 0


def test_without_fcntl_memory_mode_works_and_a_data_path_says_why_not(tmp_path):
    r = run_child(f"""
        import sys
        sys.modules["fcntl"] = None                   # as on Windows
        import minq
        with minq.Broker() as b, minq.TCPServer(b, "127.0.0.1:0").start() as srv:
            with minq.Client(srv.address) as c:
                c.publish("t", b"memory mode")
                with c.consumer("t", "c") as cons:
                    assert cons.get(timeout=5).body == b"memory mode"
        try:
            minq.Broker(data_path={str(tmp_path / 'd')!r})
        except minq.InvalidArgument as e:
            print(e)
        """)
    assert r.returncode == 0, r.stderr
    assert "storing messages needs a POSIX system" in r.stdout and "memory only" in r.stdout


def test_to_http_command_like_nsq_to_http_from_nsqd_and_from_lookupd(backends, web):
    ok = backends()
    tcp = web.tcp_address
    for how in (["-nsqd-tcp-address", tcp], ["--lookupd-http-address", web.address]):
        web.broker.publish_many("t", [b"a", b"b", b"c"])
        p = subprocess.Popen([sys.executable, str(HERE / "minq.py"), "to-http", "-topic=t",
                              *how, "--post", ok.url, "-n", "2", "--status-every", "1",
                              "--consumer-opt", "max_attempts,3", "-content-type=text/plain"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: len(ok.accepted) == 3 and settled(web.broker, "t", "nsq_to_http"))
            client = channel_stats(web.broker, "t", "nsq_to_http")["clients"][0]
            assert client["user_agent"].startswith("nsq_to_http/1.3.0")
        finally:
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert "to-http [aggregate]: 3 requests, 3 delivered" in err
        assert sorted(ok.accepted) == [b"a", b"b", b"c"]
        assert ok.got[0][1]["Content-Type"] == "text/plain"
        ok.accepted.clear()


@pytest.mark.parametrize("args, text", [
    (["--post", "http://x/"], "--nsqd-tcp-address or --lookupd-http-address required"),
    (["--nsqd-tcp-address", "a:1"], "--get or --post required"),
    (["--nsqd-tcp-address", "a:1", "--get", "http://x/"], "invalid GET address"),
    (["--nsqd-tcp-address", "a:1", "--lookupd-http-address", "b:2", "--post", "http://x/"],
     "not both"),
    (["--nsqd-tcp-address", "a:1", "--post", "http://x/", "--get", "http://x/%s"], "not both"),
    (["--nsqd-tcp-address", "a:1", "--get", "http://x/%s", "--content-type", "a/b"],
     "--content-type only used with --post"),
    (["--nsqd-tcp-address", "a:1", "--post", "http://x/", "--sample", "2"], "between 0.0 and 1.0"),
    (["--nsqd-tcp-address", "a:1", "--post", "http://x/", "--header", "nocolon"], "key: value"),
    (["--nsqd-tcp-address", "a:1", "--post", "http://x/", "--consumer-opt", "bogus,1"],
     "--consumer-opt 'bogus' is not implemented"),
])
def test_to_http_command_refuses_what_nsq_to_http_refuses(args, text):
    r = run_minq("to-http", "--topic", "t", *args)
    assert r.returncode == 1 and text in r.stderr, r.stderr
    assert run_minq("to-http", "--version").stdout.startswith("minq to-http")


# =============================================================================
# Docs: every code example in README.md runs
# =============================================================================

def readme_python_blocks():
    text = (HERE / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    """Blocks that talk to ``python minq.py serve`` on 4150 get a live server on a free port."""
    monkeypatch.chdir(tmp_path)
    code = readme_python_blocks()[index]
    if "import nsq" in code:
        pytest.importorskip("nsq")
    if "127.0.0.1:4150" not in code or "TCPServer(" in code:
        exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
        return
    with tcp_server() as srv:
        code = code.replace("127.0.0.1:4150", srv.address)
        exec(compile(code, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
        assert srv.broker.stats()["topics"], "the example published nothing"


def test_readme_curl_examples_run_and_then_the_tools_in_order(web):
    """The curl block, each line against a live server (skipped where curl is missing),
    then the tools' block on the same server, as a reader following README would."""
    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    text = (HERE / "README.md").read_text()
    lines = [ln for block in re.findall(r"```sh\n(.*?)```", text, re.S)
             for ln in block.splitlines() if ln.startswith("curl ")]
    assert lines
    b = web.broker
    for line in lines:
        r = subprocess.run(["bash", "-c", line.replace("127.0.0.1:4151", web.address)
                            + " -w ' %{http_code}'"], capture_output=True, text=True,
                           timeout=30)
        assert r.stdout.endswith(" 200"), (line, r.stdout)
    assert not channel_stats(b, "orders", "billing")["paused"]
    assert b.stats()["topics"][0]["message_count"] == 4
    outputs = run_readme_tool_block(web)
    assert outputs[2].splitlines() == ["hello", "one", "two"]   # what curl published


def test_readme_tool_examples_run(web):
    """The pub/tail/stats block, each line against a live server."""
    web.broker.topic("orders").channel("billing")
    outputs = run_readme_tool_block(web)
    assert outputs[2].splitlines() == ["order #3", "order #4", "order #5"]
    assert "orders/billing" in outputs[3]


def run_readme_tool_block(web):
    text = (HERE / "README.md").read_text()
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "minq.py pub" in b]
    outputs = []
    for line in block.splitlines():
        line = re.sub(r"\s{2,}#.*$", "", line)
        flag = (f"--nsqd-http-address {web.address}" if "minq.py stats" in line
                else f"--nsqd-tcp-address {web.tcp_address}")
        line = line.replace("python minq.py", f"{sys.executable} {HERE / 'minq.py'}")
        r = subprocess.run(["bash", "-c", f"{line} {flag}"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (line, r.stderr)
        outputs.append(r.stdout)
    return outputs


def test_readme_test_command_is_what_ci_runs():
    first_block = re.search(r"```\n(.*?)```", (HERE / "README.md").read_text(), re.S).group(1)
    serve, test = [re.sub(r"\s+#.*$", "", line) for line in first_block.splitlines()]
    assert serve == "python minq.py serve"
    assert test in (HERE / ".ci" / "run").read_text().splitlines()


def test_readme_go_example_runs(tmp_path):
    """The go-nsq block, where Go and the go-nsq module can be had (not on our CI machines)."""
    if not shutil.which("go"):
        pytest.skip("Go is not installed")
    text = (HERE / "README.md").read_text()
    (snippet,) = re.findall(r"```go\n(.*?)```", text, re.S)
    with tcp_server() as srv:
        (tmp_path / "main.go").write_text(
            'package main\nimport (\n"log"\n"time"\n"github.com/nsqio/go-nsq"\n)\n'
            "func main() {\n" + snippet.replace("127.0.0.1:4150", srv.address)
            + "time.Sleep(2 * time.Second)\n}\n")
        for cmd in (["go", "mod", "init", "example"], ["go", "mod", "tidy"]):
            if subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120).returncode:
                pytest.skip("the go-nsq module cannot be fetched here")
        r = subprocess.run(["go", "run", "."], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert "hello" in r.stderr


def test_readme_to_http_example_runs(web, backends):
    text = (HERE / "README.md").read_text()
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "to-http" in b]
    one, two = backends(), backends()
    line = (block.replace("\\\n", " ").strip()
            .replace("127.0.0.1:4150", web.tcp_address)
            .replace("http://127.0.0.1:8080/orders", one.url)
            .replace("http://127.0.0.1:8081/orders", two.url)
            .replace("python minq.py", f"{sys.executable} {HERE / 'minq.py'}"))
    web.broker.topic("orders").channel("billing")
    web.broker.publish_many("orders", [b"o%d" % i for i in range(10)])
    p = subprocess.Popen(["bash", "-c", f"exec {line}"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(one.accepted) + len(two.accepted) == 10)
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)
    assert p.returncode == 0
    assert len(one.accepted) == len(two.accepted) == 5          # round-robin
