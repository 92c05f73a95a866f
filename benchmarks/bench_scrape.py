"""Benchmark: Prometheus scrape and the 24 h dashboard over a store of 1M calls — rollups vs the raw scan they replace.

A metrics store is filled with `--rows` calls spread over the last 24 h (2 tasks × 2 versions, 5% failures, 10%
shadow answers, feedback on 1%), written through `metrics.connect`, so the rollup trigger maintains the per-minute
aggregates as a service's writer would. Then, in the same process and alternating:

* scrape: an HTTP GET of `/metrics` from the exporter `promptsys metrics --serve` runs (`monitor.serve_metrics`: it
  serves a snapshot that a background thread recomputes every `scrape_refresh_seconds`), against the full-table scan
  it replaces (`monitor.prometheus_text` with `[monitor] exact_max_calls` above the row count: what a scrape did
  before); the snapshot's own computation (`snapshot_ms`: all-time counters from the `totals` table, the window's
  gauges and the alert rules, read from the rollups) is what the background thread spends per refresh;
* dashboard: `monitor.dashboard_text` (summary, alert rules incl. the latency trend, table) the same two ways;
* in-process scrape: `generate_latest` of the `prometheus_client` instruments fed by the store's listener
  (`[monitor] prometheus = true`), whose cost does not depend on the store at all.

    python benchmarks/bench_scrape.py [--rows 1000000] [--rounds 5]

Writes benchmarks/results/bench_scrape.json (`rows`, `scrape_ms`, `dashboard_ms`, and the raw-scan figures).
"""
import argparse, json, platform, random, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fill(db, n, now, seed=0):
    from promptsys.metrics import COLUMNS, connect
    rnd = random.Random(seed); con = connect(db)
    ins = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    t0 = time.perf_counter(); done = 0
    while done < n:
        rows = []
        for i in range(done, min(n, done + 50_000)):
            ok = rnd.random() > 0.05
            r = dict(ts=now - 86400 + 86400 * i / n, request_id=f"r{i}", task=("sentiment", "extraction")[i % 2],
                     version=1 + (i // 2) % 2, model="gpt-4o-mini", provider="openai", endpoint="https://api",
                     latency_ms=rnd.lognormvariate(5.5, 0.6), success=int(ok), error_type=None if ok else "ProviderError",
                     fallback=int(ok and rnd.random() < 0.01), retries=int(rnd.random() < 0.1), cache_hit=int(rnd.random() < 0.3),
                     cost_usd=2e-4, tokens_in=120, tokens_out=4, role="shadow" if rnd.random() < 0.1 else "primary",
                     label=rnd.choice(("positive", "negative", "neutral")), input_hash=f"h{rnd.randrange(n // 2)}")
            rows.append(tuple(map(r.get, COLUMNS)))
        con.execute("BEGIN"); con.executemany(ins, rows); con.execute("COMMIT"); done += len(rows)
    con.executemany("INSERT INTO feedback (ts, request_id, correct_label) VALUES (?, ?, ?)",
                    [(now, f"r{i}", rnd.choice(("positive", "negative", "neutral"))) for i in range(0, n, 100)])
    con.close()
    return time.perf_counter() - t0


def timed(fn):
    t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    from promptsys.config import load_settings
    from promptsys import metrics, monitor
    from prometheus_client import generate_latest

    tmp = Path(tempfile.mkdtemp(prefix="bench_scrape_")); db = tmp / "metrics.db"; now = time.time()
    fill_s = fill(db, a.rows, now)
    base = {"monitor.db_path": str(db), "alerts.budget_used": "0"}
    ours, raw = load_settings(overrides=base), load_settings(overrides={**base, "monitor.exact_max_calls": str(10 ** 12)})
    # the in-process instruments, fed the same kind of records through the store's listener (100k of them)
    st = metrics.MetricsStore(tmp / "inproc.db", flush_seconds=3600, batch_size=1000)
    st.listeners.append(metrics.prometheus_listener)
    for i in range(100_000):
        st(dict(ts=now, task=("sentiment", "extraction")[i % 2], version=1 + (i // 2) % 2, model="gpt-4o-mini",
                latency_ms=150.0, success=1, fallback=0, cost_usd=2e-4, tokens_in=120, tokens_out=4, role="primary"))
    st.flush()
    import socket, urllib.request
    with socket.socket() as sk: sk.bind(("127.0.0.1", 0)); port = sk.getsockname()[1]
    t = time.perf_counter(); server, _ = monitor.serve_metrics(port, ours); prime_ms = (time.perf_counter() - t) * 1000
    scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60).read()
    assert b"promptsys_calls_total" in scrape()
    res = dict(scrape_ms=[], raw_scrape_ms=[], snapshot_ms=[], dashboard_ms=[], raw_dashboard_ms=[],
               inprocess_scrape_ms=[])
    for r in range(a.rounds):
        for name, s in ((("", ours), ("raw_", raw)) if r % 2 == 0 else (("raw_", raw), ("", ours))):
            if name: res["raw_scrape_ms"].append(timed(lambda: monitor.prometheus_text(s)))
            else:
                res["scrape_ms"].append(timed(scrape))
                res["snapshot_ms"].append(timed(lambda: monitor.prometheus_text(s)))
            res[f"{name}dashboard_ms"].append(timed(lambda: monitor.dashboard_text(s, rollouts=False)))
        res["inprocess_scrape_ms"].append(timed(lambda: generate_latest(metrics.prometheus_registry())))
    server.shutdown()
    # the two readings agree on the numbers (percentiles within 5%)
    so, sr = monitor.summary(ours, now=now), monitor.summary(raw, now=now)
    same = all(so["overall"][k] == sr["overall"][k] for k in ("requests", "errors", "fallbacks", "cache_hits", "feedback_labels"))
    p95_err = abs(so["overall"]["latency_p95_ms"] / sr["overall"]["latency_p95_ms"] - 1)
    med = {k: round(statistics.median(v), 1) for k, v in res.items()}
    out = dict(rows=a.rows, fill_s=round(fill_s, 1), exporter_start_ms=round(prime_ms, 1), db_mb=round(db.stat().st_size / 2 ** 20, 1), rounds=a.rounds, **med,
               scrape_speedup=round(med["raw_scrape_ms"] / med["scrape_ms"], 1),
               dashboard_speedup=round(med["raw_dashboard_ms"] / med["dashboard_ms"], 1),
               counts_equal=same, p95_relative_error=round(p95_err, 4), samples=res,
               machine=dict(python=platform.python_version(), cpu=platform.processor() or platform.machine()))
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "bench_scrape.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
