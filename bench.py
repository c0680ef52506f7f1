"""minq benchmarks: every figure is printed beside the stdlib limit for the same path.

    python bench.py                      # all sections, default sizes
    python bench.py --sections core      # one section
    python bench.py --scale 0.1          # smaller runs (quick look)

Sections:
  core     in-process: publish->deliver->finish throughput (1 publisher, 1 consumer),
           fan-out to 3 channels, end-to-end latency percentiles, memory per queued
           message; beside queue.Queue measured in the same run.  And the same
           throughput through an AsyncBroker consumer (one event loop) beside the
           threaded PullConsumer.
  storage  durable publish->finish beside memory mode; fsync-mode publish with 1, 4
           and 16 publishers beside raw append+fsync per record (and, for scale, the
           fastest bare Python group commit found: 16 threads, no broker); overflow
           through disk (mem_queue_size=0) beside raw sequential appends (and, for
           scale, a publish in memory mode, which touches no disk); restart time of a
           1 GB log; RSS while 2 M messages overflow.  Uses a temporary folder (--dir).
  tcp      `python minq.py serve` in a subprocess, driven over loopback with 100-byte
           messages: PUB one at a time, MPUB in batches of 100, consuming with RDY 200,
           publish-to-receive latency; beside a raw socket server in a subprocess doing
           the same framing and batching (the limit of Python sockets on this machine).
  load     nsqd's own benchmark load on the same server, from Python client processes:
           MPUB x 100 writers, then readers with RDY 2500 and FINs through a 4 KiB
           buffer, for a backlog held by the topic, one overflowed to a channel's log
           and one in a channel's memory; beside a raw socket server doing the least
           work for the same exchanges.  Reading through 10, 100 and 1,000 consumers
           x RDY 8 each (beside the raw server, and 1,000 beside 10).  Then SUB
           latency on a topic holding 1 M messages, and threads and memory with
           10,000 idle consumer connections.
  topics   N topics x 3 channels (N = 1,000 and 10,000) with one message each: create,
           clean stop, restart, descriptors, files, memory per empty topic and channel,
           idle CPU; beside the least a program must do for the same (one short write
           per creation; one listing of the folder and a read of every file it holds).
           Then the same over nsqd's HTTP API on `python minq.py serve` (N = 1,000),
           beside a real nsqd given with --nsqd PATH (a binary you built; skipped
           without one).
  http     the same server's HTTP API: POST /pub one message per request and /mpub
           with 100 lines per request, over one keep-alive connection; beside a raw
           http.server (threaded, HTTP/1.1) in a subprocess that reads the body and
           answers OK.
  aio      minq.AsyncClient on `python minq.py serve` (memory only), each client in a
           process of its own, beside pynsq (tornado) and ansq doing the same (each
           skipped when not installed: pip install .[bench]): reading 200,000
           messages with RDY 2500, FIN each; 32 tasks publishing one message at a
           time; and the worst event-loop lag while one AsyncClient process
           publishes and consumes 100,000 messages, beside the same probe's in an
           idle loop.

Numbers depend on the machine and its load: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import queue
import shutil
import struct
import tempfile
import sys
import threading
import time
import tracemalloc
import urllib.request
from typing import Callable, Dict, List

import minq

BODY = b"x" * 100


def progress(text: str) -> None:
    print(f"  ... {text}", file=sys.stderr, flush=True)


def report(name: str, value: float, unit: str, limit_name: str, limit: float,
           higher_is_better: bool = True) -> None:
    ratio = value / limit if limit else float("nan")
    better = "higher is better" if higher_is_better else "lower is better"
    print(f"{name:<44} {value:>14,.1f} {unit:<10} | {limit_name:<28} {limit:>14,.1f}"
          f" | ratio {ratio:5.2f} ({better})", flush=True)


def best_of(runs: int, fn: Callable[[], float]) -> float:
    return max(fn() for _ in range(runs))


def best_of_each(runs: int, *fns: Callable[[], float]):
    """The best of *runs* of each, taken in turns, so that a busy moment of a
    shared machine weighs on every figure alike."""
    seen: List[List[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, got in zip(fns, seen):
            got.append(fn())
    return tuple(max(got) for got in seen)


def percentiles(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    n = len(s)

    def at(q: float) -> float:
        return s[min(n - 1, int(q * n))]
    return {"p50": at(0.50), "p99": at(0.99), "p999": at(0.999)}


# =============================================================================
# core: the in-process broker beside queue.Queue
# =============================================================================

def queue_throughput(n: int) -> float:
    q: "queue.Queue[bytes]" = queue.Queue()

    def consume() -> None:
        for _ in range(n):
            q.get()
    t = threading.Thread(target=consume)
    t0 = time.perf_counter()
    t.start()
    for _ in range(n):
        q.put(BODY)
    t.join()
    return n / (time.perf_counter() - t0)


def pub_finish_throughput(n: int, **options) -> float:
    """publish->deliver->finish with 1 publisher and 1 consumer thread."""
    with minq.Broker(**options) as b:
        c = b.consumer("bench", "c", max_in_flight=1000)

        def consume() -> None:
            for _ in range(n):
                c.get().finish()
        t = threading.Thread(target=consume)
        t0 = time.perf_counter()
        t.start()
        for _ in range(n):
            b.publish("bench", BODY)
        t.join()
        return n / (time.perf_counter() - t0)


async def finish_all(cons, n: int) -> None:
    """Read *n* messages from an async consumer, finishing each."""
    got = 0
    async for msg in cons:
        msg.finish()
        got += 1
        if got == n:
            return


def async_pub_finish_throughput(n: int) -> float:
    """publish->deliver->finish in one event loop: an AsyncBroker consumer task
    and a publishing coroutine that yields every 100 publishes."""
    import asyncio

    async def run() -> float:
        with minq.Broker() as b:
            ab = minq.AsyncBroker(b)
            cons = ab.consumer("bench", "c", max_in_flight=1000)

            t0 = time.perf_counter()
            reading = asyncio.ensure_future(finish_all(cons, n))
            for i in range(n):
                await ab.publish("bench", BODY)
                if i % 100 == 99:
                    await asyncio.sleep(0)
            await reading
            rate = n / (time.perf_counter() - t0)
            await ab.close()
            return rate
    return asyncio.run(run())


def queue_fanout(n: int, k: int = 3) -> float:
    qs = [queue.Queue() for _ in range(k)]

    def consume(q: "queue.Queue[bytes]") -> None:
        for _ in range(n):
            q.get()
    ts = [threading.Thread(target=consume, args=(q,)) for q in qs]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for _ in range(n):
        for q in qs:
            q.put(BODY)
    for t in ts:
        t.join()
    return n / (time.perf_counter() - t0)


def minq_fanout(n: int, k: int = 3) -> float:
    with minq.Broker() as b:
        cs = [b.consumer("bench", f"c{i}", max_in_flight=1000) for i in range(k)]

        def consume(c: minq.PullConsumer) -> None:
            for _ in range(n):
                c.get().finish()
        ts = [threading.Thread(target=consume, args=(c,)) for c in cs]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for _ in range(n):
            b.publish("bench", BODY)
        for t in ts:
            t.join()
        return n / (time.perf_counter() - t0)


def queue_latency(n: int) -> List[float]:
    q: "queue.Queue[int]" = queue.Queue()
    samples: List[float] = []
    got = threading.Event()

    def consume() -> None:
        for _ in range(n):
            sent = q.get()
            samples.append((time.perf_counter_ns() - sent) / 1000)
            got.set()
    t = threading.Thread(target=consume)
    t.start()
    for _ in range(n):
        got.clear()
        q.put(time.perf_counter_ns())
        got.wait()
    t.join()
    return samples


def minq_latency(n: int) -> List[float]:
    samples: List[float] = []
    got = threading.Event()
    sent = [0]

    def handler(m: minq.Message) -> None:
        samples.append((time.perf_counter_ns() - sent[0]) / 1000)
        got.set()
    with minq.Broker() as b:
        sub = b.subscribe("bench", "c", handler, max_in_flight=10, workers=1)
        for _ in range(n):
            got.clear()
            sent[0] = time.perf_counter_ns()
            b.publish("bench", BODY)
            got.wait()
        sub.close()
    return samples


def queue_memory(n: int) -> float:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    q: "queue.Queue[bytes]" = queue.Queue()
    for i in range(n):
        q.put(b"%100d" % i)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del q
    return used / n - len(BODY)


def minq_memory(n: int) -> float:
    with minq.Broker(mem_queue_size=n) as b:
        b.topic("bench").channel("c")
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            b.publish("bench", b"%100d" % i)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    return used / n - len(BODY)


def async_inprocess_lag(n: int) -> Dict[str, float]:
    """``loop_lag`` through an AsyncBroker: the broker in the loop's own process."""
    import asyncio

    async def run() -> Dict[str, float]:
        with minq.Broker() as b:
            async with minq.AsyncBroker(b) as ab:
                return await loop_lag(ab, n, "lag", "c")
    return asyncio.run(run())


def section_core(scale: float) -> None:
    print("== core: in-process broker vs queue.Queue (100-byte bodies) ==")
    n = max(1000, int(200_000 * scale))
    progress(f"throughput, {n:,} messages, 1 publisher + 1 consumer thread")
    q, m, a = best_of_each(5, lambda: queue_throughput(n), lambda: pub_finish_throughput(n),
                           lambda: async_pub_finish_throughput(n))
    report("publish->deliver->finish, 1P+1C", m, "msg/s", "queue.Queue put/get", q)
    report("  the same, AsyncBroker consumer task", a, "msg/s",
           "PullConsumer (threads) 1P+1C", m)
    progress(f"event loop lag, {n // 2:,} messages through an AsyncBroker from "
             f"{AIO_TASKS} tasks")
    report_lag("  AsyncBroker", [async_inprocess_lag(n // 2) for _ in range(3)])
    progress(f"fan-out to 3 channels, {n // 2:,} messages")
    q, m = best_of_each(3, lambda: queue_fanout(n // 2), lambda: minq_fanout(n // 2))
    report("fan-out to 3 channels (published msg/s)", m, "msg/s", "queue.Queue x3", q)
    nl = max(1000, int(20_000 * scale))
    progress(f"latency, {nl:,} messages one at a time")
    ql = percentiles(queue_latency(nl))
    ml = percentiles(minq_latency(nl))
    for p in ("p50", "p99", "p999"):
        report(f"latency publish->handler start {p}", ml[p], "us", f"queue.Queue {p}", ql[p],
               higher_is_better=False)
    nm = max(1000, int(1_000_000 * scale))
    progress(f"memory, {nm:,} queued messages (tracemalloc)")
    qm = queue_memory(nm)
    mm = minq_memory(nm)
    report("memory per queued msg beyond body", mm, "bytes", "queue.Queue", qm,
           higher_is_better=False)


# =============================================================================
# storage: the segment log beside raw file appends
# =============================================================================

def raw_append(path: str, n: int, fsync: bool = False) -> float:
    """The stdlib limit: one os.write of a framed record per message (and an fsync)."""
    record = struct.pack(">II", len(BODY) + 34, 0) + b"\0" * 34 + BODY
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    t0 = time.perf_counter()
    for _ in range(n):
        os.write(fd, record)
        if fsync:
            os.fsync(fd)
    rate = n / (time.perf_counter() - t0)
    os.close(fd)
    os.unlink(path)
    return rate


def fsync_publish(path: str, n: int, publishers: int) -> float:
    with minq.Broker(data_path=path, durable=True, fsync=True) as b:
        b.topic("bench").channel("c")
        per = max(1, n // publishers)

        def publish() -> None:
            for _ in range(per):
                b.publish("bench", BODY)
        ts = [threading.Thread(target=publish) for _ in range(publishers)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rate = per * publishers / (time.perf_counter() - t0)
        b.topic("bench").get_channel("c").empty()
    shutil.rmtree(path)
    return rate


def python_group_commit(path: str, n: int, threads: int) -> float:
    """The fastest group commit found in CPython, with no broker at all.

    minq's algorithm (threads copy a record each into a preallocated, mapped
    file, then wait on a lock of their own; a leader fdatasyncs for everyone
    queued, releases them, and goes on for a few rounds with those who came
    meanwhile), minus everything a broker does per message.
    """
    record = struct.pack(">II", len(BODY) + 34, 0) + b"\0" * 34 + BODY
    size = max(1 << 20, n * len(record) + 4096)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, size)
    os.fsync(fd)
    mapped = mmap.mmap(fd, size)
    mu = threading.Lock()
    state = {"waiters": [], "leading": False, "end": 0}

    def lead(batch: list) -> None:
        rounds = 4
        while True:
            os.fdatasync(fd)
            rounds -= 1
            with mu:
                for w in batch:
                    w[1] = False
                    w[0].release()
                batch, state["waiters"] = state["waiters"], []
                if not batch:
                    state["leading"] = False
                    return
                if rounds <= 0:
                    nxt = batch.pop(0)
                    nxt[1] = True
                    state["waiters"] = batch
                    nxt[0].release()
                    return

    def publish() -> None:
        with mu:
            end = state["end"]
            mapped[end:end + len(record)] = record
            state["end"] = end + len(record)
            if state["leading"]:
                me = [threading.Lock(), False]
                me[0].acquire()
                state["waiters"].append(me)
            else:
                state["leading"], me = True, None
        if me is not None:
            me[0].acquire()
            if not me[1]:
                return
        with mu:
            batch, state["waiters"] = state["waiters"], []
        lead(batch)

    per = max(1, n // threads)
    ts = [threading.Thread(target=lambda: [publish() for _ in range(per)])
          for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rate = per * threads / (time.perf_counter() - t0)
    mapped.close()
    os.close(fd)
    os.unlink(path)
    return rate


def overflow_publish(path: str, n: int) -> float:
    with minq.Broker(data_path=path, mem_queue_size=0) as b:
        b.topic("bench").channel("c")
        t0 = time.perf_counter()
        for _ in range(n):
            b.publish("bench", BODY)
        rate = n / (time.perf_counter() - t0)
        b.topic("bench").get_channel("c").empty()
    shutil.rmtree(path)
    return rate


def memory_publish(n: int) -> float:
    """The ceiling of any per-message publish path: memory mode, no disk."""
    with minq.Broker() as b:
        b.topic("bench").channel("c")
        t0 = time.perf_counter()
        for _ in range(n):
            b.publish("bench", BODY)
        return n / (time.perf_counter() - t0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def section_storage(scale: float, base: str) -> None:
    print("== storage: segment log vs raw file appends (100-byte bodies) ==")
    n = max(1000, int(100_000 * scale))
    d = tempfile.mkdtemp(prefix="minq-bench-", dir=base)
    try:
        progress(f"durable publish->finish, {n:,} messages")
        mem = best_of(2, lambda: pub_finish_throughput(n))
        dur = []
        for i in range(2):
            path = os.path.join(d, f"durable{i}")
            dur.append(pub_finish_throughput(n, data_path=path, durable=True))
            shutil.rmtree(path)
        report("durable publish->deliver->finish", max(dur), "msg/s", "memory mode", mem)
        nf = max(200, int(3000 * scale))
        raw = raw_append(os.path.join(d, "raw.fsync"), nf, fsync=True)
        for pubs in (1, 4, 16):
            progress(f"fsync mode, {pubs} publisher(s), {nf * pubs:,} messages")
            rate = fsync_publish(os.path.join(d, f"fsync{pubs}"), nf * pubs, pubs)
            report(f"fsync-mode publish, {pubs:>2} publisher(s)", rate, "msg/s",
                   "raw append+fsync/record", raw)
        progress("bare Python group commit, 16 threads")
        floor = python_group_commit(os.path.join(d, "group"), nf * 16, 16)
        report("  (bare Python group commit, 16 threads)", floor, "msg/s",
               "raw append+fsync/record", raw)
        progress(f"overflow through disk, {n:,} messages")
        raw = best_of(2, lambda: raw_append(os.path.join(d, "raw.append"), n))
        ovf = best_of(2, lambda: overflow_publish(os.path.join(d, "overflow"), n))
        report("overflow publish, mem_queue_size=0", ovf, "msg/s", "raw os.write/record", raw)
        progress(f"memory-mode publish (no disk), {n:,} messages")
        mem_pub = best_of(2, lambda: memory_publish(n))
        report("  (memory-mode publish, no disk at all)", mem_pub, "msg/s",
               "raw os.write/record", raw)
        gb = int((1 << 30) * scale)
        progress(f"restart time of a {gb / 2**20:,.0f} MiB log")
        path = os.path.join(d, "restart")
        body = b"r" * 1000
        with minq.Broker(data_path=path, mem_queue_size=0) as b:
            b.topic("bench").channel("c")
            for _ in range(max(1, gb // (1000 * 1034))):
                b.publish_many("bench", [body] * 1000)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        t0 = time.perf_counter()
        b = minq.Broker(data_path=path)
        opened = time.perf_counter() - t0
        depth = b.stats()["topics"][0]["channels"][0]["depth"]
        b.close()
        shutil.rmtree(path)
        print(f"{'restart: open ' + f'{size / 2**20:,.0f} MiB, {depth:,} messages':<44} "
              f"{opened * 1000:>14,.1f} ms", flush=True)
        nr = max(10_000, int(2_000_000 * scale))
        progress(f"RSS while {nr:,} messages overflow (mem_queue_size=1000)")
        path = os.path.join(d, "rss")
        with minq.Broker(data_path=path, mem_queue_size=1000) as b:
            b.topic("bench").channel("c")
            b.publish_many("bench", [BODY] * 1000)
            gc.collect()
            start = rss_bytes()
            for _ in range(nr // 1000):
                b.publish_many("bench", [BODY] * 1000)
            grown = rss_bytes() - start
        shutil.rmtree(path)
        print(f"{'RSS growth while ' + f'{nr:,} messages overflow':<44} "
              f"{grown / 2**20:>14,.1f} MiB", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# =============================================================================
# topics: thousands of topics and channels on one data folder
# =============================================================================

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raw_records(path: str, n: int) -> float:
    """The least a creation can cost: one short line appended per name (s)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for i in range(n):
        os.write(fd, b'{"topic": "t%d", "channel": "c", "exists": true}\n' % i)
    os.close(fd)
    return time.perf_counter() - t0


def raw_read_folder(path: str) -> float:
    """The least a restart can cost: list the folder, read every file but segments (s)."""
    t0 = time.perf_counter()
    for name in os.listdir(path):
        if not name.endswith(".seg"):
            with open(os.path.join(path, name), "rb") as f:
                f.read()
    return time.perf_counter() - t0


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_topics(cmd: List[str], n: int) -> Dict[str, float]:
    """Over nsqd's HTTP API on the server *cmd* starts (``{port}`` in it is the
    HTTP port): n topics made with /topic/create, two /channel/create and a
    /pub each; a SIGTERM; then the restart until /stats lists every message,
    the descriptors the server holds, and its CPU ticks over 2 idle seconds."""
    import http.client
    import json
    import signal
    import subprocess
    port = free_port()
    argv = [a.format(port=port, tcp=free_port()) for a in cmd]
    os.makedirs(argv[argv.index("--data-path") + 1])      # nsqd wants it made

    def start():
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                c.request("GET", "/ping")
                c.getresponse().read()
                return p, c
            except OSError:
                if p.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {p.returncode}")
                time.sleep(0.005)

    def call(c, path, body=None):
        c.request("POST" if body is not None or "create" in path else "GET", path, body)
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
        return data

    def ticks(pid):
        with open(f"/proc/{pid}/stat") as f:
            return sum(map(int, f.read().rsplit(")", 1)[1].split()[11:13]))
    p, c = start()
    t0 = time.perf_counter()
    for i in range(n):
        call(c, f"/topic/create?topic=t{i}")
        for ch in ("c0", "c1", "c2"):
            call(c, f"/channel/create?topic=t{i}&channel={ch}")
        call(c, f"/pub?topic=t{i}", BODY)
    created = time.perf_counter() - t0
    p.send_signal(signal.SIGTERM)
    p.wait(300)
    t0 = time.perf_counter()
    p, c = start()
    while True:
        st = json.loads(call(c, "/stats?format=json"))
        st = st.get("data", st)
        topics = st.get("topics") or []
        if len(topics) == n and sum(ch["depth"] for t in topics for ch in t["channels"]) == 3 * n:
            break
        time.sleep(0.01)
    restarted = time.perf_counter() - t0
    fds = len(os.listdir(f"/proc/{p.pid}/fd"))
    t = ticks(p.pid)
    time.sleep(2)
    idle = ticks(p.pid) - t
    p.send_signal(signal.SIGTERM)
    p.wait(300)
    return {"create": created, "restart": restarted, "fds": fds, "idle": idle}


def section_topics(scale: float, base: str, nsqd: str = "") -> None:
    print("== topics: N topics x 3 channels, one message each ==")
    for n in (int(1000 * scale) or 10, int(10_000 * scale) or 100):
        d = tempfile.mkdtemp(prefix="minq-bench-", dir=base)
        try:
            progress(f"{n:,} topics x 3 channels")
            gc.collect()
            rss0 = rss_bytes()
            t0 = time.perf_counter()
            b = minq.Broker(data_path=d)
            for i in range(n):
                t = b.topic(f"t{i}")
                for c in range(3):
                    t.channel(f"c{c}")
            per = (rss_bytes() - rss0) / n
            for i in range(n):
                b.publish(f"t{i}", BODY)
            created = time.perf_counter() - t0
            t0 = time.perf_counter()
            b.close()
            closed = time.perf_counter() - t0
            files = len(os.listdir(d))
            raw = raw_records(os.path.join(d, "raw.journal"), 4 * n)
            os.unlink(os.path.join(d, "raw.journal"))
            report(f"{n:,} x 3: create + publish", created * 1000, "ms",
                   "raw: a line per creation", raw * 1000, higher_is_better=False)
            fds0 = open_fds()
            t0 = time.perf_counter()
            b = minq.Broker(data_path=d)
            opened = time.perf_counter() - t0
            fds = open_fds() - fds0
            depth = sum(c["depth"] for t in b.stats()["topics"] for c in t["channels"])
            cpu0 = cpu_seconds()
            time.sleep(2)
            idle = (cpu_seconds() - cpu0) / 2
            b.close()
            raw = raw_read_folder(d)
            report(f"{n:,} x 3: restart ({depth:,} messages)", opened * 1000, "ms",
                   "raw: list + read the files", raw * 1000, higher_is_better=False)
            print(f"{f'{n:,} x 3: descriptors after restart':<44} {fds:>14,} "
                  f"(bound {b._files.max_files:,}); files {files:,}; clean stop "
                  f"{closed:.2f} s", flush=True)
            print(f"{f'{n:,} x 3: memory per topic + 3 channels':<44} {per / 1024:>14,.1f} KiB;"
                  f" idle CPU {idle * 100:.1f} % of a core", flush=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    n = int(1000 * scale) or 10
    d = tempfile.mkdtemp(prefix="minq-bench-", dir=base)
    try:
        progress(f"{n:,} topics x 3 channels over the HTTP API of minq.py serve")
        here = os.path.dirname(os.path.abspath(__file__))
        mine = http_topics([sys.executable, os.path.join(here, "minq.py"), "serve",
                            "--data-path", os.path.join(d, "minq"), "--log-level", "error",
                            "--tcp-address", "127.0.0.1:{tcp}",
                            "--http-address", "127.0.0.1:{port}"], n)
        if not nsqd:
            print(f"  (HTTP API: minq create {mine['create']:.2f} s, restart "
                  f"{mine['restart']:.2f} s, {mine['fds']} descriptors; "
                  f"no --nsqd given: nothing beside it)", flush=True)
            return
        progress(f"{n:,} topics x 3 channels over the HTTP API of {nsqd}")
        theirs = http_topics([nsqd, "--data-path", os.path.join(d, "nsqd"),
                              "--tcp-address", "127.0.0.1:{tcp}",
                              "--http-address", "127.0.0.1:{port}"], n)
        for key, what, unit, k in (("create", "create + publish", "ms", 1000),
                                   ("restart", "restart, /stats full", "ms", 1000),
                                   ("fds", "descriptors after restart", "", 1),
                                   ("idle", "idle CPU ticks in 2 s", "", 1)):
            report(f"HTTP {n:,} x 3: {what}", mine[key] * k, unit, "nsqd", theirs[key] * k,
                   higher_is_better=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# =============================================================================
# tcp: python minq.py serve beside a raw length-prefixed socket server
# =============================================================================

# The raw limit: a server doing the least work for the same exchanges.  The
# client sends a 1-byte mode, then: "p" frames [len][body] answered by an OK
# frame; "m" frames [len][count][(len, body) x count] split and answered;
# "c" N messages pushed with a window of 200, acknowledged by 20-byte lines;
# "l" frames answered by an OK frame and the message frame.
RAW_SERVER = r"""
import socket, struct, sys
L = struct.Struct(">l")
OK = struct.pack(">lL", 6, 0) + b"OK"
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = conn.makefile("rb")
mode = f.read(1)
def frames():
    while True:
        head = f.read(4)
        if len(head) < 4:
            return
        yield f.read(L.unpack(head)[0])
if mode in (b"p", b"l"):
    for body in frames():
        if mode == b"p":
            conn.sendall(OK)
        else:
            conn.sendall(OK + struct.pack(">lL", len(body) + 30, 2) + b"\0" * 26 + body)
elif mode == b"m":
    for body in frames():
        count, pos, out = L.unpack_from(body)[0], 4, []
        for _ in range(count):
            n = L.unpack_from(body, pos)[0]
            out.append(body[pos + 4:pos + 4 + n])
            pos += 4 + n
        conn.sendall(OK)
elif mode == b"c":
    n = int(f.readline())
    frame = struct.pack(">lL", 130, 2) + b"\0" * 26 + b"x" * 100
    sent = acked = 0
    while acked < n:
        k = min(200 - (sent - acked), n - sent)
        if k > 0:
            conn.sendall(frame * k)
            sent += k
        data = conn.recv(65536)
        if not data:
            break
        acked += data.count(b"\n")
"""


class TCPPeer:
    """A blocking socket with a read buffer, reading NSQ-style frames."""

    def __init__(self, address: str) -> None:
        import socket
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def frame(self):
        while True:
            if len(self.buf) >= 4:
                size = struct.unpack_from(">l", self.buf)[0]
                if len(self.buf) >= 4 + size:
                    data, self.buf = self.buf[4:4 + size], self.buf[4 + size:]
                    if data[4:] != b"_heartbeat_":
                        return data
                    self.sock.sendall(b"NOP\n")
                    continue
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def frames_available(self):
        """Every complete frame already received, reading once if there is none."""
        out = []
        while True:
            if len(self.buf) >= 4:
                size = struct.unpack_from(">l", self.buf)[0]
                if len(self.buf) >= 4 + size:
                    out.append(self.buf[4:4 + size])
                    self.buf = self.buf[4 + size:]
                    continue
            if out:
                return out
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def start_raw_server():
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", RAW_SERVER], stdout=subprocess.PIPE, text=True)
    return p, f"127.0.0.1:{p.stdout.readline().strip()}"


def start_minq_server(http: bool = False):
    """``minq.py serve`` in a subprocess: (process, TCP address or HTTP address)."""
    import re
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, os.path.join(here, "minq.py"), "serve",
                          "--tcp-address", "127.0.0.1:0",
                          "--http-address", "127.0.0.1:0" if http else "",
                          "--data-path", "",
                          "--log-level", "error"], stdout=subprocess.PIPE, text=True)
    m = re.search(r"http://(\S+);" if http else r"tcp://(\S+?)[;,]", p.stdout.readline())
    return p, m.group(1)


def stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    proc.stdout.close()


def side_by_side(start_raw: Callable, start_minq: Callable, fn: Callable):
    """(minq's figure, the raw server's figure): *fn(address, raw)* against each."""
    proc, addr = start_raw()
    raw = fn(addr, True)
    stop(proc)
    proc, addr = start_minq()
    value = fn(addr, False)
    stop(proc)
    return value, raw


def nsq_connect(address: str) -> TCPPeer:
    peer = TCPPeer(address)
    ident = b'{"output_buffer_size": -1}'
    peer.sock.sendall(b"  V2IDENTIFY\n" + struct.pack(">l", len(ident)) + ident)
    assert peer.frame()[4:] == b"OK"
    return peer


def tcp_pub(address: str, n: int, raw: bool) -> float:
    peer = TCPPeer(address) if raw else nsq_connect(address)
    head = b"" if raw else b"PUB bench\n"
    frame = head + struct.pack(">l", len(BODY)) + BODY
    if raw:
        peer.sock.sendall(b"p")
    t0 = time.perf_counter()
    for _ in range(n):
        peer.sock.sendall(frame)
        peer.frame()
    rate = n / (time.perf_counter() - t0)
    peer.close()
    return rate


def mpub_payload(batch: int) -> bytes:
    parts = struct.pack(">l", batch) + (struct.pack(">l", len(BODY)) + BODY) * batch
    return struct.pack(">l", len(parts)) + parts


def tcp_mpub(address: str, n: int, batch: int, raw: bool) -> float:
    peer = TCPPeer(address) if raw else nsq_connect(address)
    frame = (b"" if raw else b"MPUB bench\n") + mpub_payload(batch)
    if raw:
        peer.sock.sendall(b"m")
    t0 = time.perf_counter()
    for _ in range(n // batch):
        peer.sock.sendall(frame)
        peer.frame()
    rate = (n // batch) * batch / (time.perf_counter() - t0)
    peer.close()
    return rate


def tcp_consume(address: str, n: int, raw: bool) -> float:
    if raw:
        peer = TCPPeer(address)
        peer.sock.sendall(b"c%d\n" % n)
        t0 = time.perf_counter()
    else:
        pub = nsq_connect(address)
        for _ in range(n // 100):
            pub.sock.sendall(b"MPUB consume\n" + mpub_payload(100))
            pub.frame()
        pub.close()
        peer = TCPPeer(address)   # default IDENTIFY: nsqd's 16 KiB / 250 ms buffering
        peer.sock.sendall(b"  V2SUB consume c\n")
        assert peer.frame()[4:] == b"OK"
        t0 = time.perf_counter()
        peer.sock.sendall(b"RDY 200\n")
    got = 0
    while got < n:
        frames = [f for f in peer.frames_available() if f[3] == 2]   # message frames
        got += len(frames)
        peer.sock.sendall(b"".join(b"FIN %s\n" % f[14:30] for f in frames))
    rate = n / (time.perf_counter() - t0)
    peer.close()
    return rate


def tcp_latency(address: str, n: int, raw: bool) -> List[float]:
    if raw:
        pub = TCPPeer(address)
        pub.sock.sendall(b"l")
        sub = pub
    else:
        pub = nsq_connect(address)
        sub = nsq_connect(address)       # unbuffered output, as a latency-minded client
        sub.sock.sendall(b"SUB latency c\nRDY 200\n")
        assert sub.frame()[4:] == b"OK"
    frame = (b"" if raw else b"PUB latency\n") + struct.pack(">l", len(BODY)) + BODY
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        pub.sock.sendall(frame)
        pub.frame()                      # OK
        msg = sub.frame()                # the message
        samples.append((time.perf_counter() - t0) * 1e6)
        if not raw:
            sub.sock.sendall(b"FIN %s\n" % msg[14:30])
    pub.close()
    if sub is not pub:
        sub.close()
    return samples


def section_tcp(scale: float) -> None:
    print("\n[tcp] python minq.py serve (subprocess) vs a raw socket server (subprocess), "
          "100-byte bodies, loopback")
    n = max(2000, int(20_000 * scale))
    runs = (
        ("PUB one at a time", "msg/s", lambda a, raw: tcp_pub(a, n, raw)),
        ("MPUB batches of 100", "msg/s", lambda a, raw: tcp_mpub(a, n * 10, 100, raw)),
        ("consume, RDY 200, FIN each", "msg/s", lambda a, raw: tcp_consume(a, n * 5, raw)),
    )
    for name, unit, fn in runs:
        progress(name)
        value, raw = side_by_side(start_raw_server, start_minq_server, fn)
        report(f"tcp {name}", value, unit, "raw socket, same framing", raw)
    progress("latency")
    lat, raw = side_by_side(start_raw_server, start_minq_server,
                            lambda a, raw: percentiles(tcp_latency(a, n // 2, raw)))
    for q in ("p50", "p99"):
        report(f"tcp publish->receive latency {q}", lat[q], "us", "raw socket round trip",
               raw[q], higher_is_better=False)


# =============================================================================
# load: nsqd's own benchmark load (bench_writer, bench_reader) on minq.py serve
# =============================================================================
#
# The load comes from client processes running this file (``--client``), as
# nsqd's tools do: writers send MPUB batches of 100 x 100 bytes and wait for
# each OK; readers SUB, send RDY 2500 and answer every message with a FIN
# written through a 4 KiB buffer that is flushed by itself when full and after
# every message once more than 75 % of the RDY window has been received since
# its last multiple (go-nsq's buffered writer under bench_reader).  The same
# clients run against a raw socket server doing the least work for the same
# exchanges (answer OK, send prebuilt frames while the window allows); if
# minq's figure is well below that one, the clients were not the bottleneck.

LOAD_TOPIC, LOAD_CHANNEL, LOAD_RDY = "bench", "ch", 2500


def load_connect(address: str, identify: bytes = b"{}"):
    import socket
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"  V2IDENTIFY\n" + struct.pack(">l", len(identify)) + identify)
    return sock


class FrameReader:
    """Frames out of a socket: (type, data), answering heartbeats with NOP."""

    def __init__(self, sock) -> None:
        self.sock, self.buf, self.pos = sock, b"", 0

    def frames(self):
        """Every complete frame received so far, reading once if there is none."""
        out = []
        while not out:
            buf, pos = self.buf, self.pos
            while len(buf) - pos >= 8:
                size, ftype = struct.unpack_from(">lL", buf, pos)
                if len(buf) - pos < 4 + size:
                    break
                data = buf[pos + 8:pos + 4 + size]
                pos += 4 + size
                if ftype == 0 and data == b"_heartbeat_":
                    self.sock.sendall(b"NOP\n")
                else:
                    out.append((ftype, data))
            self.buf, self.pos = buf[pos:], 0
            if not out:
                chunk = self.sock.recv(1 << 18)
                if not chunk:
                    raise EOFError("the server closed the connection")
                self.buf += chunk
        return out

    def expect_ok(self) -> None:
        (ftype, data), = self.frames()
        if ftype != 0:
            raise RuntimeError(f"server error: {data!r}")


def load_session(address: str):
    """A connection past IDENTIFY, and its frame reader."""
    sock = load_connect(address)
    reader = FrameReader(sock)
    reader.expect_ok()
    return sock, reader


def load_writer(address: str, runfor: float) -> int:
    sock, reader = load_session(address)
    cmd = b"MPUB " + LOAD_TOPIC.encode() + b"\n" + mpub_payload(100)
    sent, end = 0, time.monotonic() + runfor
    while time.monotonic() < end:
        sock.sendall(cmd)
        reader.expect_ok()
        sent += 100
    sock.close()
    return sent


def load_reader(address: str, runfor: float) -> int:
    sock, reader = load_session(address)
    sock.sendall(f"SUB {LOAD_TOPIC} {LOAD_CHANNEL}\n".encode())
    reader.expect_ok()
    sock.sendall(b"RDY %d\n" % LOAD_RDY)
    got, pending, end = 0, [], time.monotonic() + runfor
    fill = 4096 // 21                     # FINs that fill go-nsq's 4 KiB buffer
    tail = LOAD_RDY * 3 // 4
    sock.settimeout(0.2)
    import socket
    while time.monotonic() < end:
        try:
            frames = reader.frames()
        except socket.timeout:
            continue
        for ftype, data in frames:
            if ftype == 1:
                raise RuntimeError(f"server error: {data!r}")
            if ftype != 2:
                continue
            got += 1
            pending.append(data[10:26])
            if got % LOAD_RDY > tail or len(pending) >= fill:
                sock.sendall(b"FIN " + b"\nFIN ".join(pending) + b"\n")
                pending = []
    sock.close()
    return got


def load_idle(address: str, conns: int, hold: float) -> Dict[str, int]:
    """*conns* consumers that IDENTIFY (5 s heartbeats), SUB and then only answer
    heartbeats, for *hold* seconds; how many were still connected at the end."""
    import selectors
    import socket
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, conns + 100)), hard))
    host, port = address.rsplit(":", 1)
    sel = selectors.DefaultSelector()
    ident = b'{"heartbeat_interval": 5000}'
    hello = (b"  V2IDENTIFY\n" + struct.pack(">l", len(ident)) + ident)
    socks = []
    for i in range(conns):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(hello + f"SUB idle c{i % 16}\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [b"", 0])
        socks.append(s)
    beats = closed = 0
    end = time.monotonic() + hold
    while time.monotonic() < end:
        for key, _ in sel.select(0.5):
            s, state = key.fileobj, key.data
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(s)
                closed += 1
                continue
            state[0] += chunk
            while len(state[0]) >= 8:
                size = struct.unpack_from(">l", state[0])[0]
                if len(state[0]) < 4 + size:
                    break
                data, state[0] = state[0][8:4 + size], state[0][4 + size:]
                if data == b"_heartbeat_":
                    beats += 1
                    s.send(b"NOP\n")
    for s in socks:
        s.close()
    return {"connected": conns - closed, "heartbeats": beats}


def load_many_readers(address: str, runfor: float, conns: int, rdy: int) -> int:
    """*conns* consumers of one channel on one selectors loop, each SUB and
    RDY *rdy*, FINning what each read brought in one write; messages read."""
    import selectors
    import socket
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, conns + 100)), hard))
    sel = selectors.DefaultSelector()
    hello = f"SUB {LOAD_TOPIC} {LOAD_CHANNEL}\nRDY {rdy}\n".encode()
    for _ in range(conns):
        sock = load_connect(address)
        sock.sendall(hello)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [b""])
    got, end = 0, time.monotonic() + runfor
    while time.monotonic() < end:
        for key, _ in sel.select(0.2):
            sock, state = key.fileobj, key.data
            try:
                chunk = sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError("the server closed a connection")
            buf, pos, fins = state[0] + chunk, 0, []
            while len(buf) - pos >= 8:
                size, ftype = struct.unpack_from(">lL", buf, pos)
                if len(buf) - pos < 4 + size:
                    break
                if ftype == 2:
                    fins.append(buf[pos + 18:pos + 34])
                elif ftype == 1:
                    raise RuntimeError(f"server error: {buf[pos + 8:pos + 4 + size]!r}")
                elif buf[pos + 8:pos + 4 + size] == b"_heartbeat_":
                    sock.sendall(b"NOP\n")
                pos += 4 + size
            state[0] = buf[pos:]
            if fins:
                got += len(fins)
                sock.setblocking(True)
                sock.sendall(b"FIN " + b"\nFIN ".join(fins) + b"\n")
                sock.setblocking(False)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return got


HTTP_PUB = (b"POST /pub?topic=" + LOAD_TOPIC.encode() + b" HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)


def one_at_a_time(address: str, runfor: float, conns: int, http: bool) -> int:
    """*conns* connections, each sending one PUB (or HTTP POST /pub) and waiting
    for its OK before the next, as most producers do; how many were answered."""
    import selectors
    import socket
    host, port = address.rsplit(":", 1)
    sel = selectors.DefaultSelector()
    pub = b"PUB " + LOAD_TOPIC.encode() + b"\n" + struct.pack(">l", len(BODY)) + BODY
    request, answer = (HTTP_PUB, b"\r\n\r\nOK") if http else (pub, b"\x00\x00\x00\x00OK")
    for _ in range(conns):
        if http:
            s = socket.create_connection((host, int(port)), timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            s, reader = load_session(address)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [b""])
        s.send(request)
    answered, end = 0, time.monotonic() + runfor
    while time.monotonic() < end:
        for key, _ in sel.select(0.2):
            s, state = key.fileobj, key.data
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise EOFError("the server closed a connection")
            state[0] += chunk
            n = state[0].count(answer)
            if n:
                answered += n
                state[0] = state[0][state[0].rfind(answer) + len(answer):]
                s.send(request * n)
    return answered


def http_idle(address: str, conns: int, hold: float) -> Dict[str, int]:
    """*conns* HTTP keep-alive connections, each answered one GET /ping and then
    idle for *hold* seconds; how many still answer one at the end."""
    import socket
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, conns + 100)), hard))
    host, port = address.rsplit(":", 1)
    ping = b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks = []
    for _ in range(conns):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(ping)
        if not s.recv(4096).startswith(b"HTTP/1.1 200"):
            raise RuntimeError("GET /ping failed")
        socks.append(s)
    time.sleep(hold)
    alive = 0
    for s in socks:
        try:
            s.sendall(ping)
            alive += s.recv(4096).startswith(b"HTTP/1.1 200")
        except OSError:
            pass
        s.close()
    return {"connected": alive}


def client_main(argv: List[str]) -> int:
    """``python bench.py --client write|read|readmany|idle|pub|httppub|httpidle ADDRESS
    SECONDS [CONNS [RDY]]``: one load client process; prints its count as JSON.
    ``python bench.py --client KIND ADDRESS COUNT TOPIC [CHANNEL]``, KIND one of
    AIO_CLIENTS (the aio section): messages and seconds as JSON."""
    import json
    kind, address = argv[0], argv[1]
    if kind in AIO_CLIENTS:
        print(json.dumps(AIO_CLIENTS[kind](address, int(argv[2]), *argv[3:])), flush=True)
        return 0
    runfor = float(argv[2])
    if kind == "write":
        result = {"messages": load_writer(address, runfor)}
    elif kind == "read":
        result = {"messages": load_reader(address, runfor)}
    elif kind == "readmany":
        result = {"messages": load_many_readers(address, runfor, int(argv[3]), int(argv[4]))}
    elif kind in ("pub", "httppub"):
        result = {"messages": one_at_a_time(address, runfor, int(argv[3]), kind == "httppub")}
    elif kind == "httpidle":
        result = http_idle(address, int(argv[3]), runfor)
    else:
        result = load_idle(address, int(argv[3]), runfor)
    print(json.dumps(result), flush=True)
    return 0


RAW_LOAD_SERVER = r"""
# The least a server can do for nsqd's load: OK to IDENTIFY, SUB and MPUB
# (bodies skipped unread), prebuilt message frames while the RDY window allows,
# a count of FINs to move the window.  One selectors loop, like minq's.
import selectors, socket, struct, sys
FRAME = struct.pack(">lLqH", 130, 2, 0, 1) + b"0123456789abcdef" + b"m" * 100
OK = struct.pack(">lL", 6, 0) + b"OK"
sel = selectors.DefaultSelector()
srv = socket.create_server(("127.0.0.1", 0), backlog=1024)
srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ, None)
print(srv.getsockname()[1], flush=True)
class Conn:
    def __init__(self, s):
        self.s, self.buf, self.rdy, self.inflight, self.out = s, b"", 0, 0, []
    def feed(self, data):
        buf = self.buf + data
        pos = 4 if buf.startswith(b"  V2") else 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = buf[pos:nl]
            if line.startswith(b"FIN "):
                self.inflight -= 1
                pos = nl + 1
            elif line.startswith((b"IDENTIFY", b"MPUB", b"PUB")):
                if len(buf) < nl + 5:
                    break
                size = struct.unpack_from(">l", buf, nl + 1)[0]
                if len(buf) < nl + 5 + size:
                    break
                pos = nl + 5 + size
                self.out.append(OK)
            else:
                pos = nl + 1
                if line.startswith(b"SUB"):
                    self.out.append(OK)
                elif line.startswith(b"RDY"):
                    self.rdy = int(line[4:])
        self.buf = buf[pos:]
        n = self.rdy - self.inflight
        if n > 0:
            self.out.append(FRAME * n)
            self.inflight += n
        if self.out:
            data, self.out = b"".join(self.out), []
            self.s.setblocking(True)
            self.s.sendall(data)
            self.s.setblocking(False)
while True:
    for key, _ in sel.select():
        if key.data is None:
            s, _ = srv.accept()
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(s, selectors.EVENT_READ, Conn(s))
            continue
        c = key.data
        try:
            data = c.s.recv(1 << 16)     # (above 128 KiB, malloc maps and unmaps each buffer)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if data:
            try:
                c.feed(data)
                continue
            except OSError:        # the client went away mid-send
                pass
        sel.unregister(c.s)
        c.s.close()
"""


RAW_HTTP_LOOP = r"""
# The least an HTTP/1.1 server can do for POST /pub and GET /ping over
# keep-alive connections: find the end of the head, skip Content-Length bytes,
# answer 200 OK.  One epoll loop (selectors), like minq's.
import selectors, socket, sys
REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK"
sel = selectors.DefaultSelector()
srv = socket.create_server(("127.0.0.1", 0), backlog=1024)
srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ, None)
print(srv.getsockname()[1], flush=True)
bufs = {}
while True:
    for key, _ in sel.select():
        if key.data is None:
            try:
                s, _ = srv.accept()
            except BlockingIOError:
                continue
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(s, selectors.EVENT_READ, s)
            bufs[s] = b""
            continue
        s = key.data
        try:
            data = s.recv(65536)
        except (BlockingIOError, ConnectionError):
            data = b""
        if not data:
            sel.unregister(s)
            del bufs[s]
            s.close()
            continue
        buf, out = bufs[s] + data, 0
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            i = buf.find(b"Content-Length: ", 0, end)
            n = int(buf[i + 16:buf.index(b"\r\n", i)]) if i >= 0 else 0
            if len(buf) < end + 4 + n:
                break
            buf = buf[end + 4 + n:]
            out += 1
        bufs[s] = buf
        if out:
            s.send(REPLY * out)
"""


def start_raw_http_loop():
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", RAW_HTTP_LOOP], stdout=subprocess.PIPE,
                         text=True)
    return p, f"127.0.0.1:{p.stdout.readline().strip()}"


def start_raw_load_server():
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", RAW_LOAD_SERVER], stdout=subprocess.PIPE,
                         text=True)
    return p, f"127.0.0.1:{p.stdout.readline().strip()}"


def start_minq_load_server(data_path: str, mem_queue_size: int, http: bool = False):
    """``minq.py serve``: (process, its TCP address), and its HTTP address too with *http*."""
    import re
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, os.path.join(here, "minq.py"), "serve",
                          "--tcp-address", "127.0.0.1:0",
                          "--http-address", "127.0.0.1:0" if http else "",
                          "--data-path", data_path, "--mem-queue-size", str(mem_queue_size),
                          "--log-level", "error"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    tcp = re.search(r"tcp://(\S+?)[;,]", line).group(1)
    if http:
        return p, tcp, re.search(r"http://(\S+);", line).group(1)
    return p, tcp


def run_clients(kind: str, address: str, seconds: float, processes: int,
                *extra: str) -> List[Dict[str, int]]:
    """*processes* load client processes of one kind, started together."""
    import json
    import subprocess
    here = os.path.abspath(__file__)
    procs = [subprocess.Popen([sys.executable, here, "--client", kind, address,
                               str(seconds), *extra], stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise RuntimeError(f"load client {kind} failed ({p.returncode})")
        out.append(json.loads(stdout))
    return out


def proc_status(pid: int) -> Dict[str, int]:
    """Threads and resident memory (bytes) of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Threads":
                out["threads"] = int(value)
            elif key == "VmRSS":
                out["rss"] = int(value.split()[0]) * 1024
    return out


def load_case(address: str, case: str, write_s: float, read_s: float) -> Dict[str, float]:
    """Write for *write_s* then read for *read_s*; messages per second of each."""
    if case != "topic":          # the channel exists before the writes
        sock, reader = load_session(address)
        sock.sendall(f"SUB {LOAD_TOPIC} {LOAD_CHANNEL}\n".encode())
        reader.expect_ok()
        sock.close()
    written = sum(r["messages"] for r in run_clients("write", address, write_s, 2))
    got = sum(r["messages"] for r in run_clients("read", address, read_s, 2))
    return {"write": written / write_s, "read": got / read_s}


MANY_READERS, MANY_RDY = (10, 100, 1000), 8


def many_readers_case(address: str, write_s: float, read_s: float) -> Dict[int, float]:
    """Write a backlog for *write_s* (channel made first), then read it for
    *read_s* through each number of MANY_READERS consumers x RDY MANY_RDY
    (2 client processes, half the connections each); messages per second."""
    sock, reader = load_session(address)
    sock.sendall(f"SUB {LOAD_TOPIC} {LOAD_CHANNEL}\n".encode())
    reader.expect_ok()
    sock.close()
    if write_s:
        run_clients("write", address, write_s, 2)
    rates = {}
    for n in MANY_READERS:
        got = run_clients("readmany", address, read_s, 2, str(n // 2), str(MANY_RDY))
        rates[n] = sum(r["messages"] for r in got) / read_s
    return rates


def one_at_a_time_case(address: str, seconds: float, http: bool) -> float:
    """Messages per second from 2 client processes x 16 connections, each
    publishing one message per request and waiting for its answer."""
    kind = "httppub" if http else "pub"
    got = sum(r["messages"] for r in run_clients(kind, address, seconds, 2, "16"))
    return got / seconds


def sub_latency(address: str, backlog: int) -> float:
    """Seconds from SUB to its OK on a topic holding *backlog* messages."""
    sock, reader = load_session(address)
    cmd = b"MPUB sublat\n" + mpub_payload(1000)
    for _ in range(max(1, backlog // 1000)):
        sock.sendall(cmd)
        reader.expect_ok()
    t0 = time.perf_counter()
    sock.sendall(b"SUB sublat ch\n")
    reader.expect_ok()
    elapsed = time.perf_counter() - t0
    sock.close()
    return elapsed


def section_load(scale: float, base: str = None) -> None:
    print("\n[load] nsqd's benchmark load on python minq.py serve (subprocess), from "
          "Python client processes\n  (2 writers: MPUB x 100 of 100 bytes; 2 readers: "
          "RDY 2500, FINs through a 4 KiB buffer), beside a raw\n  socket server doing the "
          "least work for the same exchanges: minq well below it = the clients keep up")
    write_s, read_s = max(1.0, 6 * scale), max(0.5, 2 * scale)
    progress(f"raw server, write {write_s:g} s then read {read_s:g} s")
    proc, addr = start_raw_load_server()
    raw = load_case(addr, "disk", write_s, read_s)
    stop(proc)
    cases = (("topic", "backlog held by the topic (channel made by the first SUB)", 10_000),
             ("disk", "channel made first, backlog overflowed to disk", 10_000),
             ("mem", "channel made first, --mem-queue-size 2000000", 2_000_000))
    for case, text, mem_queue_size in cases:
        progress(f"minq, {text}")
        d = tempfile.mkdtemp(prefix="minq-bench-", dir=base)
        try:
            proc, addr = start_minq_load_server(d, mem_queue_size)
            got = load_case(addr, case, write_s, read_s)
            stop(proc)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        report(f"write, {case}", got["write"], "msg/s", "raw socket, same load", raw["write"])
        report(f"read, {case}", got["read"], "msg/s", "raw socket, same load", raw["read"])

    # Reading through many consumers with a small RDY each: what one dispatch
    # costs must not grow with the consumers (nsqd's reads hardly change).
    many_s = max(1.0, 2 * scale)
    progress(f"read through {', '.join(map(str, MANY_READERS))} consumers x RDY {MANY_RDY}, "
             f"{many_s:g} s each")
    proc, addr = start_raw_load_server()
    raw_many = many_readers_case(addr, 0, many_s)
    stop(proc)
    d = tempfile.mkdtemp(prefix="minq-bench-", dir=base)
    try:
        proc, addr = start_minq_load_server(d, 10_000)
        many = many_readers_case(addr, write_s, many_s)
        stop(proc)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    for n in MANY_READERS:
        report(f"read through {n} consumers x RDY {MANY_RDY}", many[n], "msg/s",
               "raw socket, same load", raw_many[n])
    last = MANY_READERS[-1]
    report(f"read, {last} consumers beside {MANY_READERS[0]}", many[last], "msg/s",
           f"minq, {MANY_READERS[0]} consumers x RDY {MANY_RDY}", many[MANY_READERS[0]])

    # One message per request, as most producers publish: the channel made
    # first (a memory queue overflowing to disk, as nsqd's), 32 connections.
    seconds = max(1.0, 4 * scale)
    for http, name, start_raw in ((False, "PUB", start_raw_load_server),
                                  (True, "HTTP POST /pub", start_raw_http_loop)):
        progress(f"one {name} per request, 32 connections, {seconds:g} s")
        proc, addr = start_raw()
        raw_rate = one_at_a_time_case(addr, seconds, http)
        stop(proc)
        d = tempfile.mkdtemp(prefix="minq-bench-", dir=base)
        try:
            proc, tcp, web = start_minq_load_server(d, 10_000, http=True)
            for path in (f"/topic/create?topic={LOAD_TOPIC}",
                         f"/channel/create?topic={LOAD_TOPIC}&channel={LOAD_CHANNEL}"):
                urllib.request.urlopen(urllib.request.Request(f"http://{web}{path}",
                                                              method="POST")).read()
            rate = one_at_a_time_case(web if http else tcp, seconds, http)
            stop(proc)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        report(f"one {name} per request, 32 conns", rate, "msg/s",
               "raw Python epoll loop, same load", raw_rate)

    backlog = max(10_000, int(1_000_000 * scale))
    progress(f"SUB on a topic holding {backlog:,} messages")
    d = tempfile.mkdtemp(prefix="minq-bench-", dir=base)
    try:
        proc, addr = start_minq_load_server(d, 10_000)
        lat = sub_latency(addr, backlog)
        stop(proc)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    proc, addr = start_raw_load_server()
    raw_lat = sub_latency(addr, 1000)
    stop(proc)
    report(f"SUB answered, topic holding {backlog:,}", lat * 1000, "ms",
           "raw socket, SUB round trip", raw_lat * 1000, higher_is_better=False)

    conns, hold = max(1000, int(10_000 * min(scale, 1.0))), max(5.0, 60 * scale)
    progress(f"{conns:,} idle consumers (IDENTIFY, SUB, 5 s heartbeats) held {hold:g} s")
    idle_connections("idle", "", conns, hold, start_raw_load_server, "raw selectors server",
                     lambda: start_minq_load_server("", 10_000))
    progress(f"{conns:,} idle HTTP keep-alive connections (one GET /ping each) held {hold:g} s")
    idle_connections("httpidle", "HTTP ", conns, hold, start_raw_http_loop, "raw epoll HTTP loop",
                     lambda: start_minq_load_server("", 10_000, http=True))


def idle_connections(kind: str, label: str, conns: int, hold: float, start_raw: Callable,
                     raw_name: str, start_minq: Callable) -> None:
    """*conns* idle connections of a load client of *kind* held *hold* seconds
    on a raw server, then on minq: memory per connection, threads, survivors."""
    seen = {}
    for name, start in (("raw", start_raw), ("minq", start_minq)):
        proc, *addrs = start()
        before = proc_status(proc.pid)
        idle = run_clients(kind, addrs[-1], hold, 1, str(conns))[0]
        seen[name] = (before, proc_status(proc.pid), idle)
        stop(proc)
    (before, after, idle), (raw_before, raw_after, _) = seen["minq"], seen["raw"]
    per = (after["rss"] - before["rss"]) / conns
    raw_per = (raw_after["rss"] - raw_before["rss"]) / conns
    report(f"memory per idle {label}connection ({conns:,})", per / 1024, "KiB",
           raw_name, raw_per / 1024, higher_is_better=False)
    print(f"{'threads with ' + f'{conns:,} {label}connections':<44} "
          f"{after['threads']:>14} (before them: {before['threads']}; {raw_name}: "
          f"{raw_after['threads']})", flush=True)
    beats = f" ({idle['heartbeats']:,} heartbeats answered)" if "heartbeats" in idle else ""
    print(f"{label + 'connections still open after ' + f'{hold:g} s':<44} "
          f"{idle['connected']:>14,} of {conns:,}{beats}", flush=True)


# =============================================================================
# http: the HTTP API beside a raw http.server
# =============================================================================

RAW_HTTP_SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 64 * 1024              # one write per response, as minq does
    disable_nagle_algorithm = True
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def start_raw_http_server():
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", RAW_HTTP_SERVER], stdout=subprocess.PIPE,
                         text=True)
    return p, f"127.0.0.1:{p.stdout.readline().strip()}"


def http_post(address: str, path: str, body: bytes, requests: int) -> float:
    """Requests per second over one keep-alive connection; each must answer 200 OK."""
    import http.client
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    t0 = time.perf_counter()
    for _ in range(requests):
        conn.request("POST", path, body=body)
        r = conn.getresponse()
        if r.status != 200 or r.read() != b"OK":
            raise RuntimeError(f"{path}: HTTP {r.status}")
    rate = requests / (time.perf_counter() - t0)
    conn.close()
    return rate


def section_http(scale: float) -> None:
    print("\n[http] python minq.py serve's HTTP API vs a raw http.server (both subprocesses), "
          "100-byte bodies, one keep-alive connection")
    n = max(1000, int(10_000 * scale))
    lines = b"\n".join([BODY] * 100)
    runs = (("POST /pub, one message each", "/pub?topic=bench", BODY, n, 1),
            ("POST /mpub, 100 lines each", "/mpub?topic=bench", lines, n // 10, 100))
    for name, path, body, requests, per in runs:
        progress(name)
        value, raw = side_by_side(start_raw_http_server, lambda: start_minq_server(http=True),
                                  lambda a, _: http_post(a, path, body, requests) * per)
        report(f"http {name}", value, "msg/s", "raw http.server, same body", raw)


def codec_sample(size: int) -> bytes:
    """Message-like data: JSON records of a few kinds (compressible, not trivially)."""
    import json
    rows = [{"id": i, "user": f"user{i % 97}", "event": ("click", "view", "buy")[i % 3],
             "amount": round(i * 1.37 % 1000, 2)} for i in range(size // 40)]
    return json.dumps(rows).encode()[:size]


def mb_per_s(fn: Callable[[], object], nbytes: int) -> float:
    t0 = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t0) / 1e6


def section_codecs(scale: float) -> None:
    import zlib
    size = max(1 << 18, int((4 << 20) * scale))
    print(f"\n[codecs] the compression a client can negotiate, on {size >> 10} KiB of JSON "
          "records: minq's snappy (Python) vs zlib's deflate (C, level 6) as nsqd uses it")
    data = codec_sample(size)
    packed = minq.SnappyCompressor().compress(data)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    progress("snappy")
    comp = best_of(3, lambda: mb_per_s(lambda: minq.SnappyCompressor().compress(data), size))
    decomp = best_of(3, lambda: mb_per_s(
        lambda: minq.SnappyDecompressor().decompress(packed), size))
    crc = best_of(3, lambda: mb_per_s(lambda: minq.crc32c(data), size))
    progress("deflate")

    def deflate() -> bytes:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    z_comp = best_of(3, lambda: mb_per_s(deflate, size))
    z_decomp = best_of(3, lambda: mb_per_s(lambda: zlib.decompressobj(-15).decompress(deflated),
                                           size))
    report("snappy compress", comp, "MB/s", "zlib deflate compress", z_comp)
    report("snappy decompress (checksums verified)", decomp, "MB/s", "zlib deflate decompress",
           z_decomp)
    report("crc32c (snappy's checksum)", crc, "MB/s", "zlib deflate decompress", z_decomp)
    print(f"{'compressed size, snappy vs deflate':<44} {len(packed) / size * 100:>13.1f}% "
          f"{'of input':<10} | {'deflate':<28} {len(deflated) / size * 100:>13.1f}%")


# =============================================================================
# aio: minq.AsyncClient beside pynsq (tornado) and ansq
# =============================================================================
#
# Every client runs in a process of its own (``--client``), one after the
# other, against the same ``minq.py serve`` holding everything in memory, so
# that no two event loops share a core or an interpreter.  A read is timed
# from its first message to its last, the channel holding 2 x RDY more than
# it reads: a server drained to its last message waits for its output buffer
# timer (250 ms by default, as nsqd) before sending the tail, which would time
# a timer, not a client.  A publish run is timed from its first PUB (after
# one PUB that opened the connection) to the last OK.

AIO_RDY, AIO_TASKS = 2500, 32


def aio_read(address: str, n: int, topic: str, channel: str) -> Dict[str, float]:
    """minq.AsyncClient reads *n* messages with RDY AIO_RDY, finishing each."""
    import asyncio

    async def run() -> Dict[str, float]:
        async with minq.AsyncClient(address) as c:
            async with c.consumer(topic, channel, max_in_flight=AIO_RDY) as cons:
                got, t0 = 0, 0.0
                async for msg in cons:
                    if not got:
                        t0 = time.perf_counter()
                    msg.finish()
                    got += 1
                    if got == n:
                        break
                elapsed = time.perf_counter() - t0
        return {"messages": got, "seconds": elapsed}
    return asyncio.run(run())


def pynsq_read(address: str, n: int, topic: str, channel: str) -> Dict[str, float]:
    """pynsq's Reader (tornado) reads *n* messages, max_in_flight AIO_RDY; the
    handler returns True (FIN) and stops the IOLoop at the last."""
    import nsq
    import tornado.ioloop
    loop = tornado.ioloop.IOLoop.current()
    state = {"got": 0, "t0": 0.0, "t1": 0.0}

    def handler(msg) -> bool:
        if not state["got"]:
            state["t0"] = time.perf_counter()
        state["got"] += 1
        if state["got"] == n:
            state["t1"] = time.perf_counter()
            loop.stop()
        return True
    reader = nsq.Reader(topic=topic, channel=channel, nsqd_tcp_addresses=[address],
                        max_in_flight=AIO_RDY, message_handler=handler)
    loop.start()
    reader.close()
    return {"messages": state["got"], "seconds": state["t1"] - state["t0"]}


def ansq_read(address: str, n: int, topic: str, channel: str) -> Dict[str, float]:
    """ansq's reader reads *n* messages (RDY AIO_RDY on each of its
    connections), awaiting ``fin()`` on each."""
    import asyncio
    import ansq

    async def run() -> Dict[str, float]:
        reader = await ansq.create_reader(topic=topic, channel=channel,
                                          nsqd_tcp_addresses=[address])
        for conn in reader.connections:
            await conn.rdy(AIO_RDY)
        got, t0 = 0, 0.0
        async for message in reader.messages():
            if not got:
                t0 = time.perf_counter()
            await message.fin()
            got += 1
            if got == n:
                break
        elapsed = time.perf_counter() - t0
        await reader.close()
        return {"messages": got, "seconds": elapsed}
    return asyncio.run(run())


def aio_pub(address: str, n: int, topic: str) -> Dict[str, float]:
    """AIO_TASKS tasks sharing one minq.AsyncClient, each awaiting one PUB at a time."""
    import asyncio

    async def run() -> Dict[str, float]:
        per = n // AIO_TASKS
        async with minq.AsyncClient(address) as c:
            await c.publish(topic, BODY)            # connected

            async def publish() -> None:
                for _ in range(per):
                    await c.publish(topic, BODY)
            t0 = time.perf_counter()
            await asyncio.gather(*(publish() for _ in range(AIO_TASKS)))
            elapsed = time.perf_counter() - t0
        return {"messages": per * AIO_TASKS, "seconds": elapsed}
    return asyncio.run(run())


def ansq_pub(address: str, n: int, topic: str) -> Dict[str, float]:
    """AIO_TASKS tasks sharing one ansq writer, each awaiting one ``pub`` at a time."""
    import asyncio
    import ansq

    async def run() -> Dict[str, float]:
        per = n // AIO_TASKS
        writer = await ansq.create_writer(nsqd_tcp_addresses=[address])
        if not await writer.pub(topic, BODY):
            raise RuntimeError("ansq: the first PUB failed")

        async def publish() -> None:
            for _ in range(per):
                reply = await writer.pub(topic, BODY)
                if not reply:
                    raise RuntimeError(f"ansq: PUB failed: {reply}")
        t0 = time.perf_counter()
        await asyncio.gather(*(publish() for _ in range(AIO_TASKS)))
        elapsed = time.perf_counter() - t0
        await writer.close()
        return {"messages": per * AIO_TASKS, "seconds": elapsed}
    return asyncio.run(run())


def pynsq_pub(address: str, n: int, topic: str) -> Dict[str, float]:
    """pynsq's Writer (tornado): AIO_TASKS callback chains, each ``pub`` callback
    issuing its chain's next ``pub``; the IOLoop stops at the last answer."""
    import functools
    import nsq
    import tornado.ioloop
    loop = tornado.ioloop.IOLoop.current()
    writer = nsq.Writer([address])
    per = n // AIO_TASKS
    left = [per] * AIO_TASKS
    state = {"done": 0, "t0": 0.0, "t1": 0.0, "error": None}

    def failed(data) -> bool:
        if isinstance(data, nsq.Error):
            state["error"] = str(data)
            loop.stop()
            return True
        return False

    def sent(i: int, conn, data) -> None:
        if failed(data):
            return
        state["done"] += 1
        left[i] -= 1
        if left[i]:
            writer.pub(topic, BODY, callback=functools.partial(sent, i))
        elif state["done"] == per * AIO_TASKS:
            state["t1"] = time.perf_counter()
            loop.stop()

    def warmed(conn, data) -> None:
        if failed(data):
            return
        state["t0"] = time.perf_counter()
        for i in range(AIO_TASKS):
            writer.pub(topic, BODY, callback=functools.partial(sent, i))

    def start() -> None:
        if not any(c.connected() for c in writer.conns.values()):
            loop.call_later(0.005, start)
            return
        writer.pub(topic, BODY, callback=warmed)
    loop.add_callback(start)
    loop.start()
    if state["error"]:
        raise RuntimeError(f"pynsq: PUB failed: {state['error']}")
    return {"messages": state["done"], "seconds": state["t1"] - state["t0"]}


async def loop_lag(client, n: int, topic: str, channel: str) -> Dict[str, float]:
    """Through *client* (an AsyncClient or an AsyncBroker, which have the same
    shape): AIO_TASKS tasks publish *n* messages one at a time while a consumer
    task reads and finishes them (RDY AIO_RDY), with a probe measuring how late
    each 1 ms sleep wakes; then the probe alone in the idle loop for as long.
    Seconds: the worst and the 99.9th percentile lateness, busy and idle, and
    the longest garbage collection while busy (it stops every thread)."""
    import asyncio
    import gc
    loop = asyncio.get_running_loop()
    running = [True]

    async def probe() -> List[float]:
        lags = []
        while running[0]:
            t = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - t - 0.001)
        return sorted(lags)
    pauses: List[float] = []
    started = [0.0]

    def gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])
    per = n // AIO_TASKS
    total = per * AIO_TASKS
    cons = client.consumer(topic, channel, max_in_flight=AIO_RDY)

    async def publish() -> None:
        for _ in range(per):
            await client.publish(topic, BODY)
    gc.callbacks.append(gc_timer)
    probing = asyncio.ensure_future(probe())
    t0 = loop.time()
    reading = asyncio.ensure_future(finish_all(cons, total))
    await asyncio.gather(*(publish() for _ in range(AIO_TASKS)))
    await reading
    busy_s = loop.time() - t0
    running[0] = False
    busy = await probing
    gc.callbacks.remove(gc_timer)
    await cons.close()
    running[0] = True
    probing = asyncio.ensure_future(probe())
    await asyncio.sleep(busy_s)
    running[0] = False
    idle = await probing
    return {"messages": total, "seconds": busy_s, "lag": busy[-1], "idle_lag": idle[-1],
            "p999": busy[int(0.999 * (len(busy) - 1))],
            "idle_p999": idle[int(0.999 * (len(idle) - 1))], "gc": max(pauses, default=0.0)}


def report_lag(name: str, runs: List[Dict[str, float]]) -> None:
    """The loop-lag figures of the run whose worst lag was least (a VM's
    scheduler can stall any process for milliseconds; one stall in one
    run says nothing of minq), beside the idle loop's in that run."""
    got = min(runs, key=lambda r: r["lag"])
    rate = got["messages"] / got["seconds"]
    report(f"{name} worst loop lag, {rate:,.0f} msg/s", got["lag"] * 1000, "ms",
           "idle loop, same probe", got["idle_lag"] * 1000, higher_is_better=False)
    report(f"{name} loop lag p99.9", got["p999"] * 1000, "ms", "idle loop p99.9",
           got["idle_p999"] * 1000, higher_is_better=False)
    worsts = ", ".join(f"{r['lag'] * 1000:.1f}" for r in runs)
    print(f"  (least worst lag of {len(runs)} runs; the runs' worst: {worsts} ms; longest "
          f"garbage collection in that run: {got['gc'] * 1000:.1f} ms)", flush=True)


def aio_lag(address: str, n: int, topic: str, channel: str) -> Dict[str, float]:
    """``loop_lag`` through one minq.AsyncClient."""
    import asyncio

    async def run() -> Dict[str, float]:
        async with minq.AsyncClient(address) as c:
            return await loop_lag(c, n, topic, channel)
    return asyncio.run(run())


AIO_CLIENTS = {"aioread": aio_read, "pynsqread": pynsq_read, "ansqread": ansq_read,
               "aiopub": aio_pub, "pynsqpub": pynsq_pub, "ansqpub": ansq_pub,
               "aiolag": aio_lag}


def aio_client(kind: str, address: str, *extra: str) -> Dict[str, float]:
    """One client of AIO_CLIENTS in a process of its own; its JSON answer."""
    import json
    import subprocess
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--client", kind, address,
                        *extra], stdout=subprocess.PIPE, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"client {kind} failed ({p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def aio_libraries() -> Dict[str, bool]:
    """Which of the other asyncio-era clients are installed (said when one is not)."""
    import importlib.util
    have = {"pynsq": all(importlib.util.find_spec(m) for m in ("nsq", "tornado")),
            "ansq": importlib.util.find_spec("ansq") is not None}
    for name, ok in have.items():
        if not ok:
            print(f"  ({name} is not installed: skipped; pip install .[bench])", flush=True)
    return have


def report_beside(name: str, mine: float, unit: str, others: Dict[str, float]) -> None:
    """*mine* beside the best of *others* (named), then beside each of the rest."""
    if not others:
        print(f"{name:<44} {mine:>14,.1f} {unit:<10} | (neither pynsq nor ansq to compare)",
              flush=True)
        return
    ranked = sorted(others, key=others.get, reverse=True)
    report(name, mine, unit, f"{ranked[0]} (the faster)", others[ranked[0]])
    for other in ranked[1:]:
        report(f"  the same, beside {other}", mine, unit, other, others[other])


def section_aio(scale: float) -> None:
    print("\n[aio] asyncio clients on python minq.py serve (subprocess, memory only), "
          "100-byte bodies:\n  minq.AsyncClient beside pynsq 0.9 (tornado) and ansq, each "
          "in a client process of its own")
    have = aio_libraries()
    proc, addr = start_minq_load_server("", 1_000_000)
    try:
        n = max(10_000, int(200_000 * scale))
        topic, channels = "aioread", {"AsyncClient": "aio", "pynsq": "pynsq", "ansq": "ansq"}
        queued = n + 2 * AIO_RDY         # never drained: see above
        progress(f"read: {queued:,} messages published, then {n:,} read by each client "
                 f"(RDY {AIO_RDY}, FIN each)")
        for channel in channels.values():
            sock, reader = load_session(addr)
            sock.sendall(f"SUB {topic} {channel}\n".encode())
            reader.expect_ok()
            sock.close()
        with minq.Client(addr) as c:
            for _ in range(queued // 1000):
                c.publish_many(topic, [BODY] * 1000)
        rates = {}
        for name, kind in (("AsyncClient", "aioread"), ("pynsq", "pynsqread"),
                           ("ansq", "ansqread")):
            if name in have and not have[name]:
                continue
            progress(f"read through {name}")
            got = aio_client(kind, addr, str(n), topic, channels[name])
            rates[name] = (got["messages"] - 1) / got["seconds"]
        mine = rates.pop("AsyncClient")
        report_beside(f"aio read, RDY {AIO_RDY}, FIN each", mine, "msg/s", rates)

        n = max(AIO_TASKS * 100, int(50_000 * scale))
        rates = {}
        for name, kind in (("AsyncClient", "aiopub"), ("pynsq", "pynsqpub"),
                           ("ansq", "ansqpub")):
            if name in have and not have[name]:
                continue
            progress(f"publish through {name}: {AIO_TASKS} tasks, {n:,} messages "
                     f"one at a time")
            got = aio_client(kind, addr, str(n), f"aiopub_{kind}")
            rates[name] = got["messages"] / got["seconds"]
        mine = rates.pop("AsyncClient")
        report_beside(f"aio PUB one at a time, {AIO_TASKS} tasks", mine, "msg/s", rates)

        n = max(10_000, int(100_000 * scale))
        progress(f"event-loop lag: {AIO_TASKS} tasks publish {n:,} messages, a consumer "
                 f"task reads them")
        report_lag("aio pub+consume,", [aio_client("aiolag", addr, str(n), f"aiolag{i}", "c")
                                        for i in range(3)])
    finally:
        stop(proc)


SECTIONS = {"core": section_core, "storage": section_storage, "topics": section_topics,
            "tcp": section_tcp, "load": section_load, "http": section_http,
            "codecs": section_codecs, "aio": section_aio}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every message count by this (default 1.0)")
    p.add_argument("--dir", default=None,
                   help="where the storage section writes (default: the system temp dir)")
    p.add_argument("--nsqd", default="",
                   help="a real nsqd binary to measure beside minq in the topics section")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s): {', '.join(unknown)}")
    print(f"minq {minq.VERSION} on Python {sys.version.split()[0]}")
    for name in names:
        if name == "topics":
            section_topics(args.scale, args.dir, args.nsqd)
        elif name in ("storage", "load"):
            SECTIONS[name](args.scale, args.dir)
        else:
            SECTIONS[name](args.scale)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        sys.exit(client_main(sys.argv[2:]))
    sys.exit(main())
