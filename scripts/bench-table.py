#!/usr/bin/env python3
"""Turns scripts/bench's results (one JSON object per line) into the table in docs/benchmarks.md,
between the results markers, and prints it.

    bench-table.py RESULTS.jsonl CONVERGE_JSON SECONDS CONNECTIONS KEYS VALUE_SIZE WRK_THREADS
"""
import datetime
import json
import platform
import subprocess
import sys

results_path, converge, dur, conns, keys, vsize, wrk_threads = sys.argv[1:]
rows = [json.loads(line) for line in open(results_path) if line.strip()]
by = {(r["label"], r["client"]): r for r in rows}


def fmt(v, nd=2):
    return "–" if v is None else (f"{v:,.0f}" if nd == 0 else f"{v:.{nd}f}")


def rate(label, client):
    r = by.get((label, client))
    return r["ops_per_sec"] if r else None


def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                     capture_output=True, text=True).stdout.strip()
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
lines = [
    f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node() or 'this machine'} "
    f"({cpu}, {cores} cores). {conns} connections ({wrk_threads} wrk threads), {keys} keys, {vsize}-byte values, "
    f"{dur} s per row; clients and servers share the machine. CPU: the servers' user+system time per operation "
    "(for Redis, over its SET and GET rows together).",
    "",
    "| workload | client | ops/s | p50 ms | p99 ms | p99.9 ms | errors | server CPU µs/op |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
]
for r in rows:
    lines.append(f"| {r['label']} | {r['client']} | {fmt(r['ops_per_sec'], 0)} | {fmt(r['p50_ms'])} | "
                 f"{fmt(r['p99_ms'])} | {fmt(r.get('p999_ms'))} | {r.get('errors', 0)} | "
                 f"{fmt(r.get('cpu_us_per_op'), 0)} |")
c = json.loads(converge)
lines += ["", f"Anti-entropy: a replica paused while 1,000 keys were written through its partner held all of them "
              f"**{c['converge_ms']:.0f} ms** after it was resumed (target ≤ 1 s).", ""]

put, get = rate("kvstore PUT", "wrk"), rate("kvstore GET", "wrk")
redis_get = rate("redis GET", "redis-benchmark")
p99 = lambda label: by.get((label, "wrk"), {}).get("p99_ms")
lines += [
    "| target | measured | goal |",
    "|---|---:|---:|",
    f"| kvstore durable PUT / etcd PUT (1 member), both driven by wrk | {ratio(put, rate('etcd PUT', 'wrk'))} | ≥ 3× |",
    f"| kvstore GET (wrk) / Redis GET (redis-benchmark) | {ratio(get, redis_get)} | ≥ 0.5× |",
    f"| kvstore GET, routed client (kvs-bench) / Redis GET | "
    f"{ratio(rate('kvstore GET, routed client', 'kvs-bench'), redis_get)} | ≥ 0.8× |",
    f"| kvstore p99 at {conns} connections, PUT / GET (wrk) | {fmt(p99('kvstore PUT'), 1)} / "
    f"{fmt(p99('kvstore GET'), 1)} ms | < 10 ms |",
    f"| kvstore durable PUT / etcd 3 members PUT (wrk) | {ratio(put, rate('etcd 3 members PUT', 'wrk'))} | — |",
    f"| kvstore durable PUT / Redis SET + WAIT 1 0, replicated (kvs-bench) | "
    f"{ratio(rate('kvstore PUT', 'kvs-bench'), rate('redis SET + WAIT 1 0 (replicated, appendfsync always)', 'kvs-bench'))}"
    " | — |",
    f"| kvstore with TLS / without, PUT / GET (wrk) | {ratio(rate('kvstore PUT, TLS', 'wrk'), put)} / "
    f"{ratio(rate('kvstore GET, TLS', 'wrk'), get)} | — |",
    f"| cross-check, kvs-bench for both: kvstore PUT / etcd PUT | "
    f"{ratio(rate('kvstore PUT', 'kvs-bench'), rate('etcd PUT', 'kvs-bench'))} | — |",
]
table = "\n".join(lines)
doc = open("docs/benchmarks.md").read()
start, end = "<!-- results:start -->", "<!-- results:end -->"
head, rest = doc.split(start, 1)
_, tail = rest.split(end, 1)
open("docs/benchmarks.md", "w").write(head + start + "\n" + table + "\n" + end + tail)
print("\n" + table)
