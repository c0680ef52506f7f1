"""minq benchmarks: every figure is printed beside the stdlib limit for the same path.

    python bench.py                      # all sections, default sizes
    python bench.py --sections core      # one section
    python bench.py --scale 0.1          # smaller runs (quick look)

Sections:
  core   in-process: publish->deliver->finish throughput (1 publisher, 1 consumer),
         fan-out to 3 channels, end-to-end latency percentiles, memory per queued
         message; beside queue.Queue measured in the same run.

Numbers depend on the machine and its load: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import gc
import queue
import statistics
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


def minq_throughput(n: int) -> float:
    with minq.Broker() as b:
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
    m = best_of(3, lambda: minq_throughput(n))
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


SECTIONS = {"core": section_core}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every message count by this (default 1.0)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s): {', '.join(unknown)}")
    print(f"minq {minq.VERSION} on Python {sys.version.split()[0]}")
    for name in names:
        SECTIONS[name](args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
