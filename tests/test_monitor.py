"""Monitoring: synthetic traffic through the real pipeline (fake OpenAI-compatible server over HTTP), checked
against SQL computed directly on the metrics database; alerts, feedback, the HTML page in headless Chromium,
durability across a restart, the Prometheus exposition and the dashboard notebook."""
import http.server, json, os, re, shutil, sqlite3, subprocess, sys, textwrap, threading, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server, control  # noqa: E402
from promptsys.config import load_settings  # noqa: E402
from promptsys.errors import InputValidationError  # noqa: E402
from promptsys.pipeline import Pipeline  # noqa: E402
from promptsys import metrics, monitor  # noqa: E402

DATA = [json.loads(l) for l in (ROOT / "prompts/sentiment/data/sentiment.jsonl").read_text().splitlines() if l.strip()]
WINDOW = 24 * 3600


def overrides(tmp: Path, url: str, **extra) -> dict:
    ov = {"model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
          "cache.enabled": "false", "promptsys.state_dir": str(tmp), "promptsys.records": "none",
          "monitor.enabled": "true", "monitor.db_path": str(tmp / "m.db"), "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
          "retry.initial_wait": "0.01", "retry.jitter": "0", "retry.max_attempts": "1", "breaker.enabled": "false",
          "promptsys.mode": "service"}
    ov.update(extra)
    return ov


def settings_for(tmp: Path, url: str, **extra):
    return load_settings(ROOT / "settings.ini", overrides=overrides(tmp, url, **extra))


def cli(ov: dict, *args, check=True) -> subprocess.CompletedProcess:
    "Run the promptsys CLI in a separate process with the same settings."
    sets = [x for k, v in ov.items() for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-c", "import sys; from promptsys.cli import main; sys.exit(main())",
           "--settings", str(ROOT / "settings.ini"), *sets, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check: assert r.returncode == 0, r.stderr
    return r


def sql(db, q, args=()):
    con = sqlite3.connect(str(db))
    try: return con.execute(q, args).fetchall()
    finally: con.close()


def linear_percentile(db, p, where, args):
    "The p-th percentile of latency: the latencies straight from SQL, interpolated by numpy (its default, 'linear')."
    import numpy as np
    return float(np.percentile([r[0] for r in sql(db, f"SELECT latency_ms FROM calls WHERE {where}", args)], p))


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--delay-ms", "0")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def traffic(server, tmp_path_factory):
    "Mixed traffic on v2 and v3: good calls, injected 500s (→ fallbacks), slow calls, a re-sent request, a bad input."
    tmp = tmp_path_factory.mktemp("traffic")
    url = server
    s = settings_for(tmp, url)
    p2, p3 = Pipeline("sentiment", 2, settings=s), Pipeline("sentiment", 3, settings=s)
    control(url, p500=0.0, delay_ms=0, reset_stats=True)
    results = {}
    for i, row in enumerate(DATA[:24]): results[f"v2-{i}"] = (p2.run(row["text"], request_id=f"v2-{i}"), row)
    for i, row in enumerate(DATA[24:36]): results[f"v3-{i}"] = (p3.run(row["text"], request_id=f"v3-{i}"), row)
    control(url, p500=1.0)
    for i, row in enumerate(DATA[36:40]): results[f"v2-f{i}"] = (p2.run(row["text"], request_id=f"v2-f{i}"), row)
    control(url, p500=0.0, delay_ms=40)
    for i, row in enumerate(DATA[40:43]): results[f"v3-s{i}"] = (p3.run(row["text"], request_id=f"v3-s{i}"), row)
    control(url, delay_ms=0)
    for _ in range(2): p2.run(DATA[50]["text"], request_id="dup-1")        # a client re-sending one request
    with pytest.raises(InputValidationError): p2.run("", request_id="bad-1")
    calls = len(results) + 3
    return dict(s=s, ov=overrides(tmp, url), tmp=tmp, db=tmp / "m.db", results=results, calls=calls, url=url)


def test_pipeline_wires_the_store(traffic):
    p = Pipeline("sentiment", 2, settings=traffic["s"])
    assert metrics.metrics_store(traffic["s"]) in p.sinks
    assert metrics.metrics_store(traffic["s"]) is metrics.metrics_store(traffic["s"])   # one per db per process


def test_every_call_is_recorded(traffic):
    metrics.metrics_store(traffic["s"]).flush()
    db = traffic["db"]
    assert sql(db, "SELECT COUNT(*) FROM calls")[0][0] == traffic["calls"]
    assert sql(db, "PRAGMA journal_mode")[0][0] == "wal"
    row = sql(db, "SELECT task, version, provider, model, success, fallback, label, tokens_in, cost_usd FROM calls "
                  "WHERE request_id = 'v2-0'")[0]
    r, _ = traffic["results"]["v2-0"]
    assert row == ("sentiment", 2, "openai", r.model, 1, 0, r.label, r.tokens_in, pytest.approx(r.cost_usd))
    assert sql(db, "SELECT COUNT(*) FROM calls WHERE fallback = 1")[0][0] == 4
    assert sql(db, "SELECT error_type FROM calls WHERE request_id = 'bad-1'") == [("InputValidationError",)]


def test_dashboard_numbers_equal_sql(traffic):
    s, db = traffic["s"], traffic["db"]
    now = time.time() + 1
    text = monitor.dashboard_text(s, now=now)
    where, args = "ts > ? AND ts <= ?", (now - WINDOW, now)
    n, ok, avg, cost = sql(db, f"SELECT COUNT(*), SUM(success = 1 AND fallback = 0), AVG(latency_ms), SUM(cost_usd) "
                               f"FROM calls WHERE {where}", args)[0]
    assert n == traffic["calls"]
    assert f"Requests: {n:,}" in text
    assert f"Success: {100 * ok / n:.1f}%" in text
    lat = f"{avg / 1000:.2f}s" if avg >= 1000 else f"{avg:.0f}ms"
    assert f"Avg latency: {lat} (p95 " in text
    assert (f"Cost: ${cost:.4f}" if cost < 1 else f"Cost: ${cost:,.2f}") in text
    # every line of the box has the same width, and the breakdown table lists v2 and v3
    box = [l for l in text.splitlines() if l and l[0] in "┌│├└"]
    assert len({monitor._cells(l) for l in box}) == 1
    assert re.search(r"^sentiment\s+v2\s+", text, re.M) and re.search(r"^sentiment\s+v3\s+", text, re.M)

    # the summary, group by group, against SQL alone
    sm = monitor.summary(s, now=now)
    assert sm["overall"]["requests"] == n
    for g in sm["groups"]:
        w, a = where + " AND task = ? AND version = ?", (*args, g["task"], g["version"])
        n, ok, err, fb, retried, hits, cost = sql(db, f"""SELECT COUNT(*), SUM(success = 1 AND fallback = 0), SUM(success = 0),
            SUM(fallback), SUM(retries > 0), SUM(cache_hit), SUM(cost_usd) FROM calls WHERE {w}""", a)[0]
        assert g["requests"] == n
        assert g["success_rate"] == pytest.approx(ok / n) and g["error_rate"] == pytest.approx(1 - ok / n)
        assert g["errors"] == err and g["fallback_rate"] == pytest.approx(fb / n)
        assert g["retry_rate"] == pytest.approx(retried / n) and g["cache_hit_rate"] == pytest.approx(hits / n)
        assert g["cost_usd"] == pytest.approx(cost) and g["cost_per_call_usd"] == pytest.approx(cost / n)
        for p in (50, 95, 99): assert g[f"latency_p{p}_ms"] == linear_percentile(db, p, w, a)
    v2 = next(g for g in sm["groups"] if g["version"] == 2)
    assert v2["fallbacks"] == 4 and v2["error_types"] == {"fallback": 4, "InputValidationError": 1}
    assert v2["consistency_calls"] == 2 and v2["consistency"] == 1.0     # dup-1 answered the same twice
    assert v2["cost_usd"] > 0                                          # gpt-4o-mini is priced

    # the CLI in another process prints the same box numbers
    out = cli(traffic["ov"], "dashboard").stdout
    for key in ("Requests:", "Success:", "Cost:"):
        assert re.search(re.escape(key) + r" \S+", out).group(0) == re.search(re.escape(key) + r" \S+", text).group(0)
    js = json.loads(cli(traffic["ov"], "dashboard", "--json").stdout)
    assert js["overall"]["requests"] == traffic["calls"]


def test_feedback_changes_accuracy(traffic):
    s, db = traffic["s"], traffic["db"]
    before = next(g for g in monitor.summary(s)["groups"] if g["version"] == 3)
    assert before["accuracy"] is None and before["feedback_labels"] == 0
    fed = [(rid, r, row) for rid, (r, row) in traffic["results"].items() if rid.startswith("v3-")]
    for rid, r, row in fed:
        got = metrics.record_feedback(rid, correct_label=row["label"], settings=s)
        assert got["correct"] == (r.label == row["label"])
    expected = sum(r.label == row["label"] for _, r, row in fed) / len(fed)
    after = next(g for g in monitor.summary(s)["groups"] if g["version"] == 3)
    assert after["feedback_labels"] == len(fed) and after["accuracy"] == pytest.approx(expected)
    # the same number straight from SQL (the latest label per request)
    good, total = sql(db, """SELECT SUM(c.label = f.correct_label), COUNT(*) FROM calls c JOIN feedback f ON f.request_id = c.request_id
                             WHERE c.version = 3 AND f.id = (SELECT MAX(id) FROM feedback g WHERE g.request_id = c.request_id
                             AND g.correct_label IS NOT NULL)""")[0]
    assert after["accuracy"] == pytest.approx(good / total)
    # a user corrects one answer that was right: accuracy drops by exactly one call
    rid, r, _ = next(x for x in fed if x[1].label == x[2]["label"])
    wrong = next(l for l in ("positive", "negative", "neutral") if l != r.label)
    cli(traffic["ov"], "feedback", rid, "--label", wrong)                         # through the CLI, another process
    again = next(g for g in monitor.summary(s)["groups"] if g["version"] == 3)
    assert again["accuracy"] == pytest.approx(expected - 1 / len(fed))
    # satisfaction from scores
    metrics.record_feedback("v3-0", score=1.0, settings=s); metrics.record_feedback("v3-1", score=0.0, settings=s)
    metrics.record_feedback("v3-1", score=0.5, settings=s)                        # latest wins
    sat = next(g for g in monitor.summary(s)["groups"] if g["version"] == 3)
    assert sat["feedback_scores"] == 2 and sat["satisfaction"] == pytest.approx(0.75)
    with pytest.raises(InputValidationError): metrics.record_feedback("v3-0", correct_label="meh", settings=s)
    # the accuracy rule reads the same numbers (and the p95 rule sees v3's slow calls)
    strict = load_settings(ROOT / "settings.ini", overrides={**traffic["ov"], "alerts.min_accuracy": "0.9",
                                                             "alerts.max_p95_latency_ms": "20"})
    raised = {a.key: a for a in monitor.evaluate_alerts(strict)}
    assert raised["accuracy:sentiment:v3"].value == pytest.approx(again["accuracy"])
    assert raised["p95_latency:sentiment:v3"].value >= 40
    assert "accuracy:sentiment:v2" not in raised                  # v2 has no labelled feedback
    assert "Avg accuracy: " in monitor.dashboard_text(s) and "no feedback" not in monitor.dashboard_text(s)


class _Hook(http.server.BaseHTTPRequestHandler):
    posts: list = []
    def do_POST(self):
        _Hook.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass


def test_injected_degradation_fires_the_right_alert_once(server, tmp_path):
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    _Hook.posts = []
    try:
        webhook = f"http://127.0.0.1:{hook.server_address[1]}/alerts"
        s = settings_for(tmp_path, server, **{"alerts.webhook_url": webhook})
        p = Pipeline("sentiment", 2, settings=s)
        control(server, p500=0.0, delay_ms=0)
        for row in DATA[:20]: assert not p.run(row["text"]).fallback
        seen = []
        assert monitor.check_alerts(s, callbacks=[seen.append]) == []            # healthy: nothing
        control(server, p500=1.0)
        try:
            for row in DATA[20:40]: assert p.run(row["text"]).fallback               # service mode: failures → fallbacks
        finally: control(server, p500=0.0)
        first = monitor.check_alerts(s, callbacks=[seen.append])
        assert [(a.key, a.fired, a.severity) for a in first] == [("error_rate:sentiment:v2", True, "critical")]
        assert first[0].value == pytest.approx(0.5)
        second = monitor.check_alerts(s, callbacks=[seen.append])
        assert [(a.key, a.fired) for a in second] == [("error_rate:sentiment:v2", False)]
        out = cli(overrides(tmp_path, server, **{"alerts.webhook_url": webhook}), "alerts").stdout  # a separate cron run
        assert re.search(r"^deduplicated\s+error_rate:sentiment:v2", out, re.M), out
        assert [a.key for a in seen] == ["error_rate:sentiment:v2"]
        assert [x["key"] for x in _Hook.posts] == ["error_rate:sentiment:v2"] and "error rate 50.0%" in _Hook.posts[0]["text"]
        db = tmp_path / "m.db"
        assert sql(db, "SELECT key, fired, suppressed FROM alert_state") == [("error_rate:sentiment:v2", 1, 2)]
        assert sql(db, "SELECT COUNT(*) FROM alert_log")[0][0] == 1
        assert "⚠️ sentiment v2: error rate 50.0% > 5.0%" not in monitor.dashboard_text(s)   # critical shows as 🔴
        assert "🔴 sentiment v2: error rate 50.0% > 5.0%" in monitor.dashboard_text(s)
        # a hook other modules call (the eval scheduler's regression watch), deduplicated across processes too
        assert metrics.raise_alert("regression:sentiment", "accuracy dropped", "critical", s) is True
        code = ("import sys; from promptsys.config import load_settings; from promptsys.metrics import raise_alert; "
                f"s = load_settings({str(ROOT / 'settings.ini')!r}, overrides={overrides(tmp_path, server)!r}); "
                "sys.exit(0 if raise_alert('regression:sentiment', 'again', 'critical', s) is False else 3)")
        assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
        assert "🔴 accuracy dropped" in monitor.dashboard_text(s)                    # shown on the dashboard
        assert [a.key for a in monitor.fired_alerts(s)] == ["regression:sentiment", "error_rate:sentiment:v2"]
    finally:
        hook.shutdown(); hook.server_close()


def _png_pixels(path):
    import matplotlib.image as mpimg
    return mpimg.imread(str(path))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_html_page_renders_in_headless_chromium(traffic, tmp_path):
    import base64
    page = tmp_path / "report.html"
    metrics.flush_pending(traffic["db"])            # this process's queued records, before another process reads
    cli(traffic["ov"], "dashboard", "--html", str(page))
    html = page.read_text(encoding="utf-8")
    imgs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 4
    for b in imgs: assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Requests: {traffic['calls']}" in html, re.findall(r"Requests: [0-9,]+", html)
    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (exit {r.returncode}): {r.stderr[-2000:]}"
    px = _png_pixels(shot)[..., :3]
    assert px.shape[:2] == (1600, 1200)
    assert px.std() > 0.05                                   # not a blank page
    nonwhite = (px.min(axis=2) < 0.9).mean()
    assert nonwhite > 0.03, nonwhite                          # text, table and plots were drawn
    # the plot colours are on the page (the stacked bar's green, the latency line's teal)
    import numpy as np
    flat = (px.reshape(-1, 3) * 255).astype(int)
    near = lambda rgb: (np.abs(flat - np.array(rgb)).max(axis=1) <= 8).sum()
    assert near((0x4c, 0x9a, 0x2a)) > 50 and near((0xd1, 0x49, 0x5b)) > 20     # the ok and the failed request bars


WRITER = textwrap.dedent("""
    import os, sys, time
    from promptsys.config import load_settings
    from promptsys.metrics import metrics_store
    db, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = load_settings({settings!r}, overrides={{"monitor.db_path": db, "monitor.flush_seconds": "60",
                      "monitor.batch_size": "100000", "promptsys.state_dir": os.path.dirname(db)}})
    st = metrics_store(s)
    rec = lambda i: dict(ts=time.time(), request_id=f"{{mode}}-{{i}}", task="sentiment", version=2, latency_ms=1.0,
                         success=True, fallback=False, label="positive", cost_usd=0.0, retries=0, cache_hit=False)
    for i in range(n): st(rec(i))
    if mode == "crash":
        st.flush()                       # what was flushed survives ...
        for i in range(n, n + 50): st(rec(i))
        os._exit(0)                      # ... the last, unflushed batch is lost
    # normal exit: no flush() call — atexit writes the queue
""").format(settings=str(ROOT / "settings.ini"))


def test_no_record_lost_across_a_normal_restart(tmp_path):
    db = tmp_path / "m.db"
    script = tmp_path / "writer.py"; script.write_text(WRITER)
    run = lambda n, mode: subprocess.run([sys.executable, str(script), str(db), str(n), mode], cwd=ROOT, timeout=120,
                                         capture_output=True, text=True)
    r = run(500, "normal"); assert r.returncode == 0, r.stderr
    assert sql(db, "SELECT COUNT(*) FROM calls")[0][0] == 500
    r = run(300, "again"); assert r.returncode == 0, r.stderr                     # the restarted service appends
    assert sql(db, "SELECT COUNT(*) FROM calls")[0][0] == 800
    assert sql(db, "SELECT COUNT(DISTINCT request_id) FROM calls")[0][0] == 800
    r = run(200, "crash"); assert r.returncode == 0, r.stderr                      # documented: the unflushed batch is lost
    assert sql(db, "SELECT COUNT(*) FROM calls WHERE request_id LIKE 'crash-%'")[0][0] == 200


def test_prometheus_exposition(traffic):
    from prometheus_client.parser import text_string_to_metric_families
    s, db = traffic["s"], traffic["db"]
    text = monitor.prometheus_text(s)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    total = sum(x.value for x in fams["promptsys_calls"].samples if x.name == "promptsys_calls_total")
    assert total == sql(db, "SELECT COUNT(*) FROM calls")[0][0]
    fb = [x.value for x in fams["promptsys_calls"].samples if x.labels == {"task": "sentiment", "version": "2", "outcome": "fallback"}]
    assert fb == [4.0]
    req = {x.labels["version"]: x.value for x in fams["promptsys_window_requests"].samples}
    assert req == {str(v): float(n) for v, n in sql(db, "SELECT version, COUNT(*) FROM calls GROUP BY version")}
    p95 = [x.value for x in fams["promptsys_window_latency_ms"].samples if x.labels["quantile"] == "0.95" and x.labels["version"] == "3"]
    assert p95 == [linear_percentile(db, 95, "version = 3", ())]
    assert 'promptsys_calls_total{outcome="fallback",task="sentiment",version="2"} 4.0' in cli(traffic["ov"], "metrics").stdout


def test_dashboard_notebook_runs_under_papermill(traffic, tmp_path):
    pm = pytest.importorskip("papermill")
    out = tmp_path / "dashboard.out.ipynb"
    pm.execute_notebook(str(ROOT / "experiments/dashboard.ipynb"), str(out), kernel_name="python3", progress_bar=False,
                        cwd=str(ROOT), parameters=dict(settings_path=str(ROOT / "settings.ini"),
                                                       overrides={k: v for k, v in traffic["ov"].items()}, hours=24.0))
    nb = json.loads(out.read_text())
    result = next(c for c in nb["cells"] if "result" in c["metadata"].get("tags", []))
    got = json.loads("".join(result["outputs"][0]["text"]))
    assert got["requests"] == sql(traffic["db"], "SELECT COUNT(*) FROM calls")[0][0]
    assert any(o.get("data", {}).get("image/png") for c in nb["cells"] for o in c.get("outputs", []))  # the plots
    src = json.loads((ROOT / "experiments/dashboard.ipynb").read_text())
    assert all(not c.get("outputs") for c in src["cells"] if c["cell_type"] == "code")               # committed clean
    assert "parameters" in next(c for c in src["cells"] if c["cell_type"] == "code")["metadata"]["tags"]


def test_budget_alerts(server, tmp_path):
    s = settings_for(tmp_path, server, **{"budget.daily_usd": "0.0002", "budget.on_exceed": "warn"})
    p = Pipeline("sentiment", 2, settings=s)
    metrics.watch_budget(p.budget, s)                  # Budget.on_alert → raise_alert (what the pipeline could wire)
    control(server, p500=0.0, delay_ms=0)
    for row in DATA[:20]: p.run(row["text"])
    spent = p.budget.spent()["global:day"]
    assert spent > 0.0002                                # on_exceed = warn lets calls go on
    status = monitor.budget_status(s, ["sentiment"])
    assert [(b["scope"], b["spent_usd"]) for b in status] == [("global:day", pytest.approx(spent))]
    keys = [a.key for a in monitor.evaluate_alerts(s)]
    assert keys == ["budget:global:day"]
    for _ in range(50):                                  # the forwarded alert is written synchronously, but be patient
        if sql(tmp_path / "m.db", "SELECT COUNT(*) FROM alert_log WHERE key = 'budget:global:day'")[0][0]: break
        time.sleep(0.05)
    assert sql(tmp_path / "m.db", "SELECT COUNT(*) FROM alert_log WHERE key = 'budget:global:day'")[0][0] == 1
    assert [(a.key, a.fired) for a in monitor.check_alerts(s)] == [("budget:global:day", False)]   # already sent: deduplicated


def test_metrics_serve(traffic):
    import socket, urllib.request
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0)); port = so.getsockname()[1]
    sets = [x for k, v in traffic["ov"].items() for x in ("--set", f"{k}={v}")]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from promptsys.cli import main; sys.exit(main())",
                             "--settings", str(ROOT / "settings.ini"), *sets, "metrics", "--serve", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(300):
            try: body = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode(); break
            except OSError: time.sleep(0.1)
        else: pytest.fail("metrics server did not come up")
        assert "promptsys_calls_total" in body and "promptsys_window_latency_ms" in body
    finally:
        proc.terminate(); proc.wait(10)


def test_mlflow_tracing_optional(server, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    s = settings_for(tmp_path, server)
    tracer = metrics.TraceSink(s, flush_seconds=3600)
    store = metrics.MetricsStore(tmp_path / "traced.db", flush_seconds=3600)
    store.listeners.append(tracer)                         # what [monitor] tracing = true wires in metrics_store
    p = Pipeline("sentiment", 2, settings=s, sinks=[store])
    control(server, p500=0.0, delay_ms=0)
    rs = [p.run(row["text"], request_id=f"t-{i}") for i, row in enumerate(DATA[:3])]
    store.close()                                          # the batch reaches the tracer ...
    assert tracer.flush() == 3 and tracer.failed == 0      # ... which logs it to MLflow
    from promptsys.registry import mlflow_client, experiment_name
    client = mlflow_client(s)
    exp = client.get_experiment_by_name(experiment_name("sentiment", s))
    traces = mlflow.search_traces(locations=[exp.experiment_id], return_type="list")
    assert len(traces) == 3
    got = {}
    for tr in traces:
        (span,) = tr.data.spans
        got[span.attributes["promptsys.request_id"]] = span
    assert set(got) == {"t-0", "t-1", "t-2"}
    sp = got["t-0"]
    assert sp.span_type == "LLM" and sp.name == "sentiment.v2"
    assert sp.attributes["promptsys.label"] == rs[0].label
    assert (sp.end_time_ns - sp.start_time_ns) / 1e6 == pytest.approx(rs[0].latency_ms, abs=0.01)


def test_throughput_matches_a_known_request_rate(server, tmp_path):
    "Real pipeline calls paced at 25 per second for 8 s: the dashboard's throughput is that rate within 5%."
    s = settings_for(tmp_path, server)
    p = Pipeline("sentiment", 2, settings=s)
    rate, n = 25.0, 200
    t0 = time.perf_counter()
    for i in range(n):
        wait = t0 + i / rate - time.perf_counter()
        if wait > 0: time.sleep(wait)
        assert p.run(DATA[i % len(DATA)]["text"], request_id=f"paced-{i}").ok
    g = monitor.summary(s, hours=1)["groups"][0]
    assert g["requests"] == n
    assert g["throughput_rps"] == pytest.approx(rate, rel=0.05), g["throughput_rps"]
    assert g["peak_rps"] <= rate * 1.05          # no minute busier than the pace (8 s fit in one or two minutes)
    text = monitor.dashboard_text(s, hours=1)
    assert re.search(r"Throughput: 2[45]\.\d\d req/s", text), text
    prom = monitor.prometheus_text(s, hours=1)
    assert re.search(r'promptsys_window_throughput_rps\{task="sentiment",version="2",window="1h"\} 2[45]\.', prom)


def test_a_call_is_found_by_request_id_with_its_output_and_no_secret(server, tmp_path):
    "The answer of one call through HTTP, found with `promptsys logs --request-id` in another process."
    key = "sk-test-" + "9" * 24
    env_key = "PROMPTSYS_TEST_LOGS_KEY"
    os.environ[env_key] = key
    try:
        ov = overrides(tmp_path, server, **{"openai.api_key_env": env_key})
        s = load_settings(ROOT / "settings.ini", overrides=ov)
        r = Pipeline("sentiment", 2, settings=s).run(DATA[0]["text"], request_id="find-me-1")
        assert r.ok
        metrics.metrics_store(s).flush()
        out = cli(ov, "logs", "sentiment", "--request-id", "find-me-1").stdout
        assert "request_id: find-me-1" in out and f"output: {json.dumps(r.output, separators=(',', ':'))}" in out
        assert key not in out and key not in (tmp_path / "m.db").read_bytes().decode("latin-1")
        rows = [json.loads(l) for l in cli(ov, "logs", "sentiment", "--json").stdout.splitlines()]
        assert [x["request_id"] for x in rows] == ["find-me-1"] and rows[0]["output"] == json.dumps(r.output, separators=(",", ":"))
    finally: os.environ.pop(env_key, None)


def test_pruning_keeps_the_store_bounded_under_a_steady_write_load(tmp_path):
    """A writer thread adds 20 calls every 10 ms for 6 s while the store prunes every 0.5 s with a 2 s retention:
    the raw rows stay bounded, every record written is either still there or was pruned as too old (none lost),
    and the rollups still count every call."""
    db = tmp_path / "m.db"
    st = metrics.MetricsStore(db, flush_seconds=0.05, batch_size=500)
    st.retention = dict(calls_days=2 / 86400, rollup_days=0, every=0.5)
    sizes, stop, sent = [], time.time() + 6, 0
    while time.time() < stop:
        for _ in range(20):
            st(dict(ts=time.time(), request_id=f"w{sent}", task="t", version=1, success=1, fallback=0,
                    latency_ms=10.0, role="primary", retries=0, cache_hit=0, cost_usd=0.0)); sent += 1
        time.sleep(0.01)
        if sent % 400 == 0: sizes.append(sql(db, "SELECT COUNT(*) FROM calls")[0][0])
    st.close()
    assert st.written == sent and st.dropped == 0
    left = sql(db, "SELECT COUNT(*), MIN(ts) FROM calls")[0]
    ids = {r[0] for r in sql(db, "SELECT request_id FROM calls")}
    assert ids == {f"w{i}" for i in range(sent - len(ids), sent)}      # what is left is the newest, gap-free
    assert sql(db, "SELECT SUM(n) FROM rollup")[0][0] == sent           # the aggregates count every call
    rate = sent / 6
    assert max(sizes[len(sizes) // 2:]) < rate * 3.5, (sizes, rate)    # retention 2 s + prune period 0.5 s + slack
    assert left[0] < sent / 2


def test_feedback_driven_accuracy_for_a_json_task(tmp_path):
    """Calls of the shipped json task `classification` (two versions), reviewers' expected answers given with
    `promptsys feedback --expected` (the first two in other processes) or `record_feedback`: accuracy, per-field accuracy and quality per version in
    `promptsys dashboard --json`, and the min_accuracy alert fires for the worse version."""
    ov = {"promptsys.state_dir": str(tmp_path), "monitor.db_path": str(tmp_path / "m.db"), "alerts.min_accuracy": "0.6"}
    s = load_settings(ROOT / "settings.ini", overrides=ov)
    st = metrics.MetricsStore(tmp_path / "m.db", flush_seconds=3600)
    cats, now = ["billing", "bug", "account", "shipping", "refund"], time.time()
    truth = {f"t{i}": {"category": cats[i % 5], "priority": ("low", "high")[i % 2]} for i in range(20)}
    for i, (rid, t) in enumerate(truth.items()):
        v = 1 + i % 2                     # v1 answers every ticket right; v2 gets the priority wrong on 6 of its 10
        out = dict(t, priority=("high" if t["priority"] == "low" else "low") if v == 2 and i % 10 < 6 else t["priority"])
        st(dict(ts=now - 60 + i, request_id=rid, task="classification", version=v, role="primary", success=1, fallback=0,
                latency_ms=100.0, retries=0, cache_hit=0, cost_usd=0.0, label=out["category"], output=json.dumps(out)))
    st.close()
    for i, (rid, t) in enumerate(truth.items()):
        if i < 2: r = json.loads(cli(ov, "feedback", rid, "--expected", json.dumps(t)).stdout)     # another process
        else: r = metrics.record_feedback(rid, expected=t, settings=s)
        assert r["task"] == "classification" and r["expected"] == t
    bad = cli(ov, "feedback", "t0", "--label", "billing", check=False)
    assert bad.returncode == 2 and "no single label" in bad.stderr and "Traceback" not in bad.stderr
    groups = {g["version"]: g for g in json.loads(cli(ov, "dashboard", "--json").stdout)["groups"]}
    assert (groups[1]["accuracy"], groups[1]["field_accuracy"]) == (1.0, {"category": 1.0, "priority": 1.0})
    assert (groups[2]["accuracy"], groups[2]["field_accuracy"]) == (0.4, {"category": 1.0, "priority": 0.4})
    assert groups[2]["feedback_quality"] == pytest.approx(0.7) and groups[2]["feedback_labels"] == 10
    keys = [a.key for a in monitor.evaluate_alerts(s)]
    assert "accuracy:classification:v2" in keys and "accuracy:classification:v1" not in keys, keys


def test_live_quality_scores_a_sample_per_version_on_the_embedded_model(tmp_path):
    """The shipped summary task and its judge on the embedded model (greedy): half of the live calls of two
    versions are scored in the background — the task's reference-free checks and the judge's rating — chosen
    by request id; the scores per version are in `promptsys dashboard --json`, each scored call's score and its
    (opted-in, redacted) inputs in `promptsys logs --request-id`, and the min_live_quality rule reads them."""
    prompts = tmp_path / "prompts"
    for name in ("summary", "summary_judge"): shutil.copytree(ROOT / "prompts" / name, prompts / name)
    toml = prompts / "summary" / "task.toml"
    text = re.sub(r"(?m)^sample = .*$", "sample = 0.5", toml.read_text())
    toml.write_text(re.sub(r"(?m)^judge_sample = .*$", "judge_sample = 0.5", text) + "\n[log]\ninputs = true\n")
    key = "sk-test-" + "7" * 24
    ov = {"promptsys.prompts_dir": str(prompts), "promptsys.state_dir": str(tmp_path), "model.provider": "local",
          "monitor.enabled": "true", "monitor.db_path": str(tmp_path / "m.db"), "cache.enabled": "false",
          "promptsys.records": "none", "alerts.min_live_quality": "0.99", "quality.min_scored": "1",
          "promptsys.mode": "service"}     # a summary over 240 characters gets the task's fallback: scored 0
    s = load_settings(ROOT / "settings.ini", overrides=ov)
    reviews = [json.loads(l)["review"] for l in (prompts / "summary/data/reviews.jsonl").read_text().splitlines()[:6]]
    reviews[0] += f" My account key is {key}."
    ids = {v: [f"v{v}-{i}" for i in range(len(reviews))] for v in (1, 2)}
    for v in (1, 2):
        pipe = Pipeline("summary", v, settings=s)
        for rid, review in zip(ids[v], reviews): pipe.run(review, request_id=rid)
        assert pipe.live_quality.join(300)
        st = pipe.live_quality.stats()
        assert st["judge_errors"] == 0 and st["dropped"] == 0 and st["judge_note"] == "", st
    picked = {v: [r for r in ids[v] if metrics_bucket(r) < 5000] for v in (1, 2)}
    assert 1 <= len(picked[1]) < len(reviews) and 1 <= len(picked[2]) < len(reviews), picked   # a sample, not all
    metrics.metrics_store(s).flush()
    rows = sql(tmp_path / "m.db", "SELECT request_id, version, score, checks_total, judge, valid, failed FROM quality "
               "WHERE task = 'summary' ORDER BY request_id")
    assert sorted(r[0] for r in rows) == sorted(picked[1] + picked[2])
    for rid, v, score, checks, judge, valid, failed in rows:
        if valid: assert checks == 2 and judge is not None and 0 <= judge <= 1 and 0 <= score <= 1, (rid, score, judge)
        else: assert (score, checks, judge, failed) == (0.0, 0, None, "fallback"), (rid, score, failed)
    assert sum(r[5] for r in rows) >= 2, rows                                 # most answers are the model's own
    groups = {g["version"]: g for g in json.loads(cli(ov, "dashboard", "--json", "--task", "summary").stdout)["groups"]}
    for v in (1, 2):
        mine = [r[2] for r in rows if r[1] == v]
        assert groups[v]["live_scored"] == len(picked[v])
        assert groups[v]["live_judged"] == sum(1 for r in rows if r[1] == v and r[5])
        assert groups[v]["live_quality"] == pytest.approx(sum(mine) / len(mine))
    one = next(r[0] for r in rows if r[5])
    out = cli(ov, "logs", "summary", "--request-id", one).stdout
    assert f"request_id: {one}" in out and "quality: " in out and "(judge " in out and "inputs: {" in out, out
    first = json.loads(cli(ov, "logs", "summary", "--request-id", "v1-0", "--json").stdout.splitlines()[0])
    assert "***" in first["inputs"] and key not in first["inputs"] and key not in (tmp_path / "m.db").read_bytes().decode("latin-1")
    low = [v for v in (1, 2) if groups[v]["live_quality"] < 0.99]
    keys = {a.key for a in monitor.evaluate_alerts(s, task="summary", min_calls=1)}
    assert {f"live_quality:summary:v{v}" for v in low} <= keys and low, (keys, groups)


def metrics_bucket(request_id: str) -> int:
    "The bucket (0..9999) the live-quality sample is drawn by: the same function the pipeline uses."
    from promptsys.pipeline import route_bucket
    return route_bucket(request_id, "quality")
