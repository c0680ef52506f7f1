"""minq benchmarks: every figure is printed beside the stdlib limit for the same path.

    python bench.py                      # all sections, default sizes
    python bench.py --sections core      # one section
    python bench.py --scale 0.1          # smaller runs (quick look)

Sections:
  core     in-process: publish->deliver->finish throughput (1 publisher, 1 consumer),
           fan-out to 3 channels, end-to-end latency percentiles, memory per queued
           message; beside queue.Queue measured in the same run.
  storage  durable publish->finish beside memory mode; fsync-mode publish with 1, 4
           and 16 publishers beside raw append+fsync per record; overflow through disk
           (mem_queue_size=0) beside raw sequential appends; restart time of a 1 GB
           log; RSS while 2 M messages overflow.  Uses a temporary folder (--dir).

Numbers depend on the machine and its load: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import shutil
import struct
import tempfile
import sys
import threading
import time
import tracemalloc
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


def section_core(scale: float) -> None:
    print("== core: in-process broker vs queue.Queue (100-byte bodies) ==")
    n = max(1000, int(200_000 * scale))
    progress(f"throughput, {n:,} messages, 1 publisher + 1 consumer thread")
    q = best_of(3, lambda: queue_throughput(n))
    m = best_of(3, lambda: pub_finish_throughput(n))
    report("publish->deliver->finish, 1P+1C", m, "msg/s", "queue.Queue put/get", q)
    progress(f"fan-out to 3 channels, {n // 2:,} messages")
    q = best_of(3, lambda: queue_fanout(n // 2))
    m = best_of(3, lambda: minq_fanout(n // 2))
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
        progress(f"overflow through disk, {n:,} messages")
        raw = best_of(2, lambda: raw_append(os.path.join(d, "raw.append"), n))
        ovf = best_of(2, lambda: overflow_publish(os.path.join(d, "overflow"), n))
        report("overflow publish, mem_queue_size=0", ovf, "msg/s", "raw os.write/record", raw)
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


SECTIONS = {"core": section_core, "storage": section_storage}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every message count by this (default 1.0)")
    p.add_argument("--dir", default=None,
                   help="where the storage section writes (default: the system temp dir)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s): {', '.join(unknown)}")
    print(f"minq {minq.VERSION} on Python {sys.version.split()[0]}")
    for name in names:
        if name == "storage":
            section_storage(args.scale, args.dir)
        else:
            SECTIONS[name](args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
