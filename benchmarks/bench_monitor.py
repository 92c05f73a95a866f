"""Benchmark: a pipeline call with the metrics store on / the same call with it off (target ≤ 1.05); retention.

The same task, prompt and model over HTTP against the fake OpenAI-compatible server (tests/fakeserver.py,
no delay, cache disabled), so the ratio isolates what monitoring adds to a real network call: building the
record, enqueueing it, and the background writer's batched SQLite transactions competing for the GIL.
Interleaved A/B: every input goes through both pipelines back to back (the order alternating), each call
timed alone, so both variants see the same machine load (this machine is shared and noisy); a round is
`--calls` such pairs and the reported ratio is the median over rounds of mean(on) / mean(off). The store
runs as in production (writer thread, [monitor] flush_seconds / batch_size), so some of its writes land
during "off" calls; the script therefore also times the parts alone — building the record, enqueueing it,
and writing it in batches — and reports the conservative ratio that charges all of them to "on"
(`estimated_ratio_from_parts`).

A third variant also scores a share of live calls in the background (`[quality] sample`, live quality:
validity and the task's checks on a worker thread), interleaved with the other two.

Retention: a store holding `--retention-rows` calls spread over 60 days is pruned to `[monitor]
retention_days` (30) by `metrics.prune` while another thread keeps writing batches through a `MetricsStore`;
reported: the file's size and its used pages before and after, the prune's time and rows deleted, and the
longest a concurrent batch waited to commit (the writers' cost of pruning in short transactions).

    python benchmarks/bench_monitor.py [--rounds 31] [--calls 100] [--quality-sample 0.1] [--retention-rows 300000]

Writes benchmarks/results/bench_monitor.json.
"""
import argparse, json, platform, sqlite3, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--calls", type=int, default=100, help="calls per run")
    ap.add_argument("--quality-sample", type=float, default=0.1, help="the live-quality variant's [quality] sample")
    ap.add_argument("--retention-rows", type=int, default=300_000, help="calls in the store the retention prunes")
    a = ap.parse_args(argv)

    from promptsys.config import load_settings
    from promptsys.pipeline import Pipeline
    from promptsys import metrics

    tmp = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    proc, url = start_server("--delay-ms", "0")
    try:
        base = {"model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
                "cache.enabled": "false", "promptsys.state_dir": str(tmp), "promptsys.records": "none"}
        off = load_settings(ROOT / "settings.ini", overrides={**base, "monitor.enabled": "false"})
        on = load_settings(ROOT / "settings.ini", overrides={**base, "monitor.enabled": "true",
                                                              "monitor.db_path": str(tmp / "metrics.db")})
        qual = load_settings(ROOT / "settings.ini", overrides={**base, "monitor.enabled": "true",
                                                                "monitor.db_path": str(tmp / "metrics.db"),
                                                                "quality.sample": str(a.quality_sample)})
        pipes = {"off": Pipeline("sentiment", 2, settings=off), "on": Pipeline("sentiment", 2, settings=on),
                 "quality": Pipeline("sentiment", 2, settings=qual)}
        assert pipes["quality"].live_quality is not None and pipes["on"].live_quality is None
        assert not any(isinstance(s, metrics.MetricsStore) for s in pipes["off"].sinks)
        assert any(isinstance(s, metrics.MetricsStore) for s in pipes["on"].sinks)
        rows = [json.loads(l)["text"] for l in (ROOT / "prompts/sentiment/data/sentiment.jsonl").read_text().splitlines() if l.strip()]
        texts = [rows[i % len(rows)] for i in range(a.calls)]

        store = metrics.metrics_store(on)
        clock = time.perf_counter

        orders = [("off", "on", "quality"), ("on", "quality", "off"), ("quality", "off", "on")]

        def pairs() -> dict:
            "One round: each text through the three pipelines back to back (order rotating), each call timed."
            tot = {"off": 0.0, "on": 0.0, "quality": 0.0}
            for i, t in enumerate(texts):
                for name in orders[i % 3]:
                    p = pipes[name]; t0 = clock(); p.run(t); tot[name] += clock() - t0
            return {k: v / len(texts) for k, v in tot.items()}

        for _ in range(2): pairs()                                         # warm up: connections, imports, schema
        per = {"off": [], "on": [], "quality": []}; ratios = []; qratios = []
        for r in range(a.rounds):
            got = pairs()
            for k, v in got.items(): per[k].append(v)
            ratios.append(got["on"] / got["off"]); qratios.append(got["quality"] / got["off"])

        pipes["quality"].live_quality.join(60)
        qstats = pipes["quality"].live_quality.stats()
        store.flush()
        con = sqlite3.connect(str(tmp / "metrics.db"))
        written = con.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        scored = con.execute("SELECT COUNT(*) FROM quality").fetchone()[0]
        con.close()
        expected = 2 * (2 + a.rounds) * a.calls
        # the request-path cost of one record, alone
        res = pipes["on"].run(texts[0])
        store.close()                                                     # stop the writer: time the parts alone
        n = 20000
        t0 = time.perf_counter()
        recs = [res.to_record() for _ in range(n)]
        record_us = (time.perf_counter() - t0) / n * 1e6
        store._thread = object()                                          # keep the writer from starting mid-measure
        t0 = time.perf_counter()
        for rec in recs: store(rec)
        enqueue_us = (time.perf_counter() - t0) / n * 1e6
        store._thread = None
        t0 = time.perf_counter()
        store.flush()
        write_us = (time.perf_counter() - t0) / n * 1e6
        store.close()
        overhead = (record_us + enqueue_us + write_us) / 1e6 / statistics.median(per["off"])
        retention = bench_retention(tmp / "retention.db", a.retention_rows, res.to_record())
    finally:
        stop_server(proc)

    result = dict(
        benchmark="bench_monitor", what="Pipeline.run with [monitor] enabled / the same call with it off (fake OpenAI server over HTTP, cache off)",
        target="<= 1.05", rounds=a.rounds, calls_per_run=a.calls,
        ratio_median=round(statistics.median(ratios), 4), ratio_min=round(min(ratios), 4), ratio_max=round(max(ratios), 4),
        per_call_ms_off=round(statistics.median(per["off"]) * 1e3, 4), per_call_ms_on=round(statistics.median(per["on"]) * 1e3, 4),
        to_record_us=round(record_us, 3), enqueue_us_per_record=round(enqueue_us, 3), write_us_per_record=round(write_us, 3),
        estimated_ratio_from_parts=round(1 + overhead, 4), records_written=written, records_expected=expected,
        quality_sample=a.quality_sample, quality_ratio_median=round(statistics.median(qratios), 4),
        quality_ratio_min=round(min(qratios), 4), quality_ratio_max=round(max(qratios), 4),
        per_call_ms_quality=round(statistics.median(per["quality"]) * 1e3, 4), quality_rows_scored=scored,
        quality_dropped=qstats["dropped"], retention=retention,
        python=platform.python_version(), machine=platform.machine(), date=time.strftime("%Y-%m-%d"),
    )
    print(f"{'variant':28} {'per call':>10}")
    print(f"{'monitor off':28} {result['per_call_ms_off']:>8.3f}ms")
    print(f"{'monitor on (SQLite, WAL)':28} {result['per_call_ms_on']:>8.3f}ms")
    print(f"ratio on/off: median {result['ratio_median']:.3f} (min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f}; "
          f"target <= 1.05) over {a.rounds} rounds of {a.calls} interleaved call pairs")
    print(f"per record: to_record {record_us:.2f} µs + enqueue {enqueue_us:.2f} µs (request path) + batched write "
          f"{write_us:.2f} µs (writer thread) → estimated ratio {1 + overhead:.4f}")
    print(f"records written {written} of {expected}")
    print(f"live quality (sample {a.quality_sample:g}) on/off: median {result['quality_ratio_median']:.3f} "
          f"(min {result['quality_ratio_min']:.3f}, max {result['quality_ratio_max']:.3f}); {scored} calls scored, "
          f"{qstats['dropped']} dropped")
    rt = retention
    print(f"retention: {rt['rows_before']:,} calls over 60 days, {rt['file_mb_before']:.1f} MB → prune to "
          f"{rt['retention_days']:g} days: {rt['deleted']:,} rows in {rt['prune_seconds']:.2f} s; used "
          f"{rt['used_mb_before']:.1f} → {rt['used_mb_after']:.1f} MB (file {rt['file_mb_after']:.1f} MB, its free "
          f"pages reused); a concurrent writer's batch waited at most {rt['writer_max_wait_ms']:.1f} ms "
          f"(p99 {rt['writer_p99_wait_ms']:.1f} ms, {rt['writer_batches']} batches, {rt['writer_lost']} records lost)")
    out = ROOT / "benchmarks/results/bench_monitor.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if written == expected else 1


def bench_retention(db: Path, rows: int, rec: dict, days: float = 30.0) -> dict:
    "A store of `rows` calls over 60 days pruned to `days` while a writer thread commits batches: sizes and times."
    import threading
    from promptsys import metrics
    st = metrics.MetricsStore(db, flush_seconds=3600, batch_size=5000)
    now = time.time()
    for i in range(rows): st(dict(rec, ts=now - 60 * 86400 * (1 - i / rows), request_id=f"b{i}"))
    st.flush(); st.close()
    def used_mb() -> tuple[float, float]:
        con = sqlite3.connect(str(db))
        try:
            ps, pc, fl = (con.execute(f"PRAGMA {k}").fetchone()[0] for k in ("page_size", "page_count", "freelist_count"))
        finally: con.close()
        return (pc - fl) * ps / 1e6, db.stat().st_size / 1e6
    used0, file0 = used_mb()
    writer = metrics.MetricsStore(db, flush_seconds=3600, batch_size=256)
    waits, stop, sent = [], threading.Event(), [0]
    def write():
        while not stop.is_set():
            for _ in range(50): writer(dict(rec, ts=time.time(), request_id=f"w{sent[0]}")); sent[0] += 1
            t0 = time.perf_counter(); writer.flush(); waits.append(time.perf_counter() - t0)
            time.sleep(0.01)
    th = threading.Thread(target=write); th.start()
    time.sleep(0.2)
    t0 = time.perf_counter(); out = metrics.prune(db, days, 400); secs = time.perf_counter() - t0
    time.sleep(0.2); stop.set(); th.join(); writer.close()
    con = sqlite3.connect(str(db))
    left = con.execute("SELECT COUNT(*) FROM calls WHERE request_id LIKE 'w%'").fetchone()[0]
    con.close()
    used1, file1 = used_mb()
    waits.sort()
    return dict(rows_before=rows, retention_days=days, deleted=out["calls"], prune_seconds=round(secs, 3),
                file_mb_before=round(file0, 2), used_mb_before=round(used0, 2), file_mb_after=round(file1, 2),
                used_mb_after=round(used1, 2), writer_batches=len(waits),
                writer_max_wait_ms=round(waits[-1] * 1e3, 2), writer_p99_wait_ms=round(waits[int(0.99 * (len(waits) - 1))] * 1e3, 2),
                writer_lost=sent[0] - left)


if __name__ == "__main__":
    sys.exit(main())
