"""Monitoring at scale: the dashboard's reads stay bounded as the store grows (rollups, not scans), and the
in-process Prometheus instruments add up across worker processes (prometheus_client's multiprocess mode),
fed by real pipeline calls over HTTP to the fake OpenAI-compatible server."""
import json, os, random, subprocess, sys, textwrap, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server  # noqa: E402
from promptsys.config import load_settings  # noqa: E402
from promptsys import metrics, monitor  # noqa: E402


def fill(db, n, now, seed=0):
    "n calls spread evenly over the 24 h before `now` (2 tasks × 2 versions, failures, shadows, feedback)."
    rnd = random.Random(seed); con = metrics.connect(db); cols = metrics.COLUMNS
    rows = []
    for i in range(n):
        ok = rnd.random() > 0.05
        r = dict(ts=now - 86400 + 86400 * (i + 0.5) / n, request_id=f"r{i}", task=("a", "b")[i % 2], version=1 + (i // 2) % 2,
                 model="m", latency_ms=rnd.lognormvariate(5, 0.5), success=int(ok), fallback=int(ok and rnd.random() < 0.02),
                 error_type=None if ok else "ProviderError", retries=0, cache_hit=0, cost_usd=1e-4, tokens_in=10,
                 tokens_out=2, role="shadow" if rnd.random() < 0.1 else "primary", label=rnd.choice("xyz"),
                 input_hash=f"h{rnd.randrange(n // 2)}")
        rows.append(tuple(map(r.get, cols)))
    con.executemany(f"INSERT INTO calls ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
    con.executemany("INSERT INTO feedback (ts, request_id, correct_label) VALUES (?, ?, ?)",
                    [(now, f"r{i}", rnd.choice("xyz")) for i in range(0, n, 49)])
    con.close()


def vm_steps(monkeypatch, fn) -> int:
    "SQLite virtual-machine instructions (in thousands) executed by every connection `monitor` opens during fn()."
    steps = [0]
    def counting(path):
        con = metrics.connect(path)
        con.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1) or 0, 1000)
        return con
    monkeypatch.setattr(monitor, "connect", counting)
    fn()
    monkeypatch.undo()
    return steps[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp, now = tmp_path_factory.mktemp("scale"), 1_800_000_000.0
    for n in (60_000, 120_000): fill(tmp / f"m{n}.db", n, now)
    return tmp, now


def test_dashboard_reads_stay_bounded_as_the_store_grows(stores, monkeypatch):
    tmp, now = stores
    def steps(n, exact):
        s = load_settings(overrides={"monitor.db_path": str(tmp / f"m{n}.db"), "alerts.budget_used": "0",
                                     **({"monitor.exact_max_calls": str(10 ** 12)} if exact else {})})
        return vm_steps(monkeypatch, lambda: (monitor.dashboard_text(s, now=now, rollouts=False),
                                              monitor.prometheus_text(s, hours=24)))
    raw60, raw120, ours60, ours120 = steps(60_000, True), steps(120_000, True), steps(60_000, False), steps(120_000, False)
    assert raw120 / raw60 > 1.8                  # the raw scan grows with the store
    assert ours120 / ours60 < 1.25, (ours60, ours120)   # the rollups do not (only the window's 2 edge minutes grow)
    assert ours120 < raw120 / 4


def test_large_window_numbers_match_the_raw_scan(stores):
    tmp, now = stores
    base = {"monitor.db_path": str(tmp / "m120000.db")}
    ours = monitor.summary(load_settings(overrides=base), now=now, hours=20)          # window edges mid-minute
    raw = monitor.summary(load_settings(overrides={**base, "monitor.exact_max_calls": str(10 ** 12)}), now=now, hours=20)
    for a, b in zip([raw["overall"], *raw["groups"]], [ours["overall"], *ours["groups"]]):
        for k in ("requests", "successes", "errors", "fallbacks", "cache_hits", "tokens_in", "error_types",
                  "feedback_labels", "first_ts", "last_ts"):
            assert a[k] == b[k], k
        for k in ("cost_usd", "accuracy", "latency_avg_ms"):
            assert a[k] is not None and b[k] == pytest.approx(a[k], rel=1e-9), k
        for k in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
            assert b[k] == pytest.approx(a[k], rel=0.05), k
    assert ours["overall"]["requests"] > 90_000
    series_raw = monitor.timeseries(load_settings(overrides={**base, "monitor.exact_max_calls": str(10 ** 12)}), now=now)
    series = monitor.timeseries(load_settings(overrides=base), now=now)
    assert sum(x["requests"] for x in series) == sum(x["requests"] for x in series_raw)
    assert all(abs(a["requests"] - b["requests"]) <= 0.05 * a["requests"] + 1 for a, b in zip(series_raw, series))


WORKER = textwrap.dedent("""
    import sys
    from promptsys.config import load_settings
    from promptsys.pipeline import Pipeline
    from promptsys import metrics
    url, tmp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = load_settings(sys.argv[4], overrides={"model.provider": "openai", "openai.base_url": url + "/v1",
        "openai.api_key_env": "", "cache.enabled": "false", "promptsys.state_dir": tmp, "promptsys.records": "none",
        "monitor.enabled": "true", "monitor.db_path": tmp + "/m.db", "monitor.prometheus": "true",
        "promptsys.mode": "service", "breaker.enabled": "false", "retry.max_attempts": "1"})
    p = Pipeline("sentiment", 2, settings=s)
    for i in range(n): p.run(f"review number {i} of worker {sys.argv[5]}: fine")
    metrics.metrics_store(s).flush()
""")

SCRAPE = textwrap.dedent("""
    from prometheus_client import generate_latest
    from promptsys import metrics
    print(generate_latest(metrics.prometheus_registry()).decode())
""")


def test_inprocess_prometheus_adds_up_across_worker_processes(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    proc, url = start_server("--delay-ms", "0")
    try:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
        (tmp_path / "prom").mkdir()
        workers = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(tmp_path), str(n), str(ROOT / "settings.ini"), str(k)],
                                    cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for k, n in enumerate((40, 25))]
        for w in workers: assert w.wait(120) == 0, w.stderr.read()
    finally: stop_server(proc)
    out = subprocess.run([sys.executable, "-c", SCRAPE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    fams = {f.name: f for f in text_string_to_metric_families(out.stdout)}
    calls = {tuple(sorted(x.labels.items())): x.value for x in fams["promptsys_requests"].samples
             if x.name == "promptsys_requests_total"}
    assert sum(calls.values()) == 65
    assert all(dict(k)["task"] == "sentiment" and dict(k)["version"] == "2" for k in calls)
    count = [x.value for x in fams["promptsys_request_latency_seconds"].samples if x.name.endswith("_count")]
    assert sum(count) == 65
    db_rows = metrics.connect(tmp_path / "m.db").execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    assert db_rows == 65                              # the store got every call too


def test_served_exporter_scrapes_a_snapshot_refreshed_in_the_background(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest
    now = time.time(); db = tmp_path / "m.db"; fill(db, 3_000, now)
    s = load_settings(overrides={"monitor.db_path": str(db), "alerts.budget_used": "0"})
    col = monitor.MonitorCollector(s, refresh_seconds=1.5)
    reg = CollectorRegistry(auto_describe=False); reg.register(col)
    calls = lambda text: sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("promptsys_calls_total"))
    first = generate_latest(reg).decode()                 # the first scrape computes the snapshot
    assert calls(first) == 3_000
    assert vm_steps(monkeypatch, lambda: generate_latest(reg)) == 0      # later scrapes read no SQL at all
    fill(db, 1_000, now, seed=1)                          # more traffic: the background refresh picks it up
    for _ in range(200):
        if calls(generate_latest(reg).decode()) == 4_000: break
        time.sleep(0.05)
    assert calls(generate_latest(reg).decode()) == 4_000


def test_served_exporter_is_primed_before_it_listens(tmp_path, monkeypatch):
    "`serve_metrics` computes the first snapshot before it accepts a scrape: no scrape ever runs the window's SQL."
    import socket, urllib.request
    now = time.time(); db = tmp_path / "m.db"; fill(db, 2_000, now)
    s = load_settings(overrides={"monitor.db_path": str(db), "alerts.budget_used": "0",
                                 "monitor.scrape_refresh_seconds": "3600"})
    with socket.socket() as sk: sk.bind(("127.0.0.1", 0)); port = sk.getsockname()[1]
    server, _ = monitor.serve_metrics(port, s)
    try:
        body = []
        steps = vm_steps(monkeypatch, lambda: body.append(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()))
        assert steps == 0
        total = sum(float(l.split()[-1]) for l in body[0].splitlines() if l.startswith("promptsys_calls_total"))
        assert total == 2_000
    finally: server.shutdown()
