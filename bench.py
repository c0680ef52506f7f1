"""minq benchmarks: every figure is printed beside the stdlib limit for the same path.

    python bench.py                      # all sections, default sizes
    python bench.py --sections core      # one section
    python bench.py --scale 0.1          # smaller runs (quick look)

Sections:
  core     in-process: publish->deliver->finish throughput (1 publisher, 1 consumer),
           fan-out to 3 channels, end-to-end latency percentiles, memory per queued
           message; beside queue.Queue measured in the same run.
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
  http     the same server's HTTP API: POST /pub one message per request and /mpub
           with 100 lines per request, over one keep-alive connection; beside a raw
           http.server (threaded, HTTP/1.1) in a subprocess that reads the body and
           answers OK.

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


SECTIONS = {"core": section_core, "storage": section_storage, "tcp": section_tcp,
            "http": section_http}


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
