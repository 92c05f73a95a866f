"""Issue 12 (live versions): a long-lived service process follows promote, rollback and the regression watch's
auto-rollback; shadow → canary 5% → 50% with the candidate turning bad partway auto-aborts with no caller seeing an
error; a healthy canary finishes through the offline gate; sticky routing and shares over 10,000+ calls.

Everything is real: the service is `tests/service_app.py` in its own process (one `Pipeline(task, "production")`
built at start-up, never rebuilt), the model is the fake OpenAI-compatible server process
(`tests/fakeserver.py`, keyword answers as JSON), MLflow is a sqlite store, the metrics store a sqlite file, and
the moves are made with the `promptsys` command in other processes.

The toy task "tickets" (JSON output: label + confidence) has two versions. v1 ends every review with a glowing
one, so the model always says "positive" (right on 4 of 12 examples); v2 reads the review (12 of 12)."""
from __future__ import annotations
import json, os, subprocess, sys, threading, time, urllib.request
from collections import Counter, defaultdict
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from promptsys.config import load_settings
from promptsys.pipeline import Pipeline, route_bucket
from promptsys import evaluation as pe, promotion as pp, registry, rollout as ro, schedule
from promptsys.metrics import events
from tests.fakeserver import start_server, stop_server, control
from tests.test_promote import TEXTS

PERIOD = 1.0       # [mlflow] alias_cache_seconds: how fast running services must follow
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tickets(prompts: Path):
    d = prompts / "tickets"; (d / "data").mkdir(parents=True)
    (d / "task.toml").write_text('name = "tickets"\ndescription = "Toy JSON task."\n[output]\nkind = "json"\n'
                                 'field = "label"\nlabels = ["positive", "negative", "neutral"]\nconfidence = true\n'
                                 '[defaults]\nmax_tokens = 32\n[dataset]\npath = "data/d.jsonl"\n[fallback]\n'
                                 'label = "neutral"\nconfidence = 0.0\n'
                                 '[versions]\n1 = "Ends on a glowing review."\n2 = "Reads the review (CAND)."\n')
    (d / "v1_glowing.txt").write_text('Answer as JSON {"label", "confidence"}.\nReview: {{text}}\n'
                                      'Review: I love it.\nJSON:')
    (d / "v2_reads.txt").write_text('CAND-MARK Answer as JSON {"label", "confidence"}.\nReview: {{text}}\nJSON:')
    rows = [dict(id=f"{l[:3]}{i}", text=x, label=l) for l, xs in TEXTS.items() for i, x in enumerate(xs)]
    (d / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def overrides(tmp: Path, url: str) -> dict:
    return {"promptsys.prompts_dir": str(tmp / "prompts"), "promptsys.state_dir": str(tmp / "state"),
            "promptsys.records": "none", "promptsys.mode": "service", "cache.dir": str(tmp / "cache"),
            "cache.enabled": "false", "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
            "mlflow.experiment_prefix": "t", "mlflow.alias_cache_seconds": str(PERIOD),
            "model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
            "openai.model": "gpt-4o-mini", "breaker.enabled": "false", "retry.max_attempts": "2",
            "retry.initial_wait": "0.01", "monitor.enabled": "true", "monitor.db_path": str(tmp / "metrics.db"),
            "monitor.flush_seconds": "0.2", "eval.runs_dir": str(tmp / "runs"), "rollout.min_calls": "30",
            "gate.max_cost_increase": "0.5", "gate.max_p95_latency_increase": "100"}


@pytest.fixture
def world(tmp_path):
    "A fake model server, the tickets task in a fresh MLflow store with both versions evaluated, v1 in production."
    tickets(tmp_path / "prompts")
    proc, url = start_server("--delay-ms", "2", "--answer-mode", "json")
    ov = overrides(tmp_path, url)
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    pe.evaluate("tickets", settings=s, progress=False)
    pp.promote("tickets", 1, settings=s, force=True, user="test", reason="baseline")
    try: yield dict(tmp=tmp_path, url=url, ov=ov, s=s)
    finally:
        registry.stop_live(); stop_server(proc)


class Service:
    "tests/service_app.py in its own process, and callers hammering it from threads."
    def __init__(self, world):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "service_app.py"), "--task", "tickets",
                                      "--overrides", json.dumps(world["ov"])], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=world["tmp"])
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), self.proc.stderr.read()
        self.url = f"http://127.0.0.1:{line.split()[1]}"
        self.log: list = []                  # (t, user, status, body)
        self._stop = threading.Event(); self._threads = []
    def call(self, text: str, user: str):
        req = urllib.request.Request(self.url + "/classify", json.dumps({"text": text, "user": user}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with OPENER.open(req, timeout=30) as r: return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e: return e.code, json.loads(e.read() or b"{}")
    def load(self, threads: int = 4, users: int = 400):
        texts = [x for xs in TEXTS.values() for x in xs]
        def loop(k):
            i = 0
            while not self._stop.is_set():
                u = f"user{(k * 7919 + i * 104729) % users}"; i += 1
                st, body = self.call(texts[i % len(texts)], u)
                self.log.append((time.time(), u, st, body))
        self._threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(threads)]
        for t in self._threads: t.start()
    def stop_load(self):
        self._stop.set()
        for t in self._threads: t.join(30)
        self._stop.clear()
    def since(self, t0: float) -> list: return [x for x in self.log if x[0] >= t0]
    def close(self):
        self.stop_load(); self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()


def cli(world, *args) -> subprocess.CompletedProcess:
    "The real `promptsys` command in another process, on the test's settings."
    sets = [x for k, v in world["ov"].items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "PROMPTSYS_SETTINGS": str(ROOT / "settings.ini")}
    return subprocess.run([sys.executable, "-m", "promptsys.cli", *sets, *args], capture_output=True, text=True,
                          env=env, cwd=world["tmp"], timeout=300)


def failures(rows: list) -> list:
    "Calls a caller saw fail: an HTTP error, a failed result, or the task's canned fallback answer."
    return [r for r in rows if r[2] != 200 or not r[3]["ok"] or r[3]["fallback"]]


def switch_time(svc: Service, t0: float, version: int, deadline: float = 15.0) -> float:
    "Seconds after `t0` (a move returned) of the last answer from another version than `version` (0: none)."
    end = t0 + deadline
    while time.time() < end:
        time.sleep(0.2)
        rows = svc.since(t0)
        other = [r for r in rows if r[3].get("version") != version]
        last_other = max((r[0] for r in other), default=t0)
        if rows and rows[-1][3].get("version") == version and time.time() - last_other > 1.0:
            return last_other - t0
    raise AssertionError(f"the service never switched to v{version}: {Counter(r[3].get('version') for r in svc.since(t0))}")


def test_a_running_service_follows_promote_rollback_and_the_watch(world):
    svc = Service(world)
    try:
        svc.load()
        time.sleep(1.0)
        assert {r[3]["version"] for r in svc.log} == {1}
        out = cli(world, "promote", "tickets", "--version", "2", "--reason", "live test"); t0 = time.time()
        assert out.returncode == 0, out.stderr
        assert "running services follow within 1 s" in out.stdout
        promote_s = switch_time(svc, t0, 2)
        out = cli(world, "rollback", "tickets"); t1 = time.time()
        assert out.returncode == 0 and "running services follow within 1 s" in out.stdout, out.stderr
        rollback_s = switch_time(svc, t1, 1)
        assert cli(world, "promote", "tickets", "--version", "2").returncode == 0
        switch_time(svc, time.time(), 2)
        # the regression watch: production (v2) turns bad on the offline examples (valid JSON, wrong labels)
        control(world["url"], wrong_if_contains="CAND-MARK")
        w = schedule.watch("tickets", settings=world["s"], auto_rollback=True); t2 = time.time()
        assert w["regression"] and w["rolled_back"], w
        watch_s = switch_time(svc, t2, 1)
        svc.stop_load()
    finally: svc.close()
    print(f"\nlast answer from the old version, after the move returned: promote {promote_s:.2f} s, rollback "
          f"{rollback_s:.2f} s, watch {watch_s:.2f} s (refresh period {PERIOD} s); {len(svc.log)} calls")
    assert max(promote_s, rollback_s, watch_s) < PERIOD + 1.0   # within the refresh period (+ scheduling slack)
    assert failures(svc.log) == []                        # zero failed calls through all three switches
    # the service recorded each change it saw (a move of `previous` alone is a change too): production went
    # 1 → 2 → 1 → 2 → 1
    prods = [1] + [e["after"].get("production") for e in events("alias_changed", settings=world["s"])]
    assert [p for i, p in enumerate(prods) if i and p != prods[i - 1]] == [2, 1, 2, 1]


def shares(svc: Service, t0: float, t1: float) -> tuple[dict, float]:
    "{user: set of versions that answered it} for callers between t0 and t1, and the candidate's share of calls."
    rows = [r for r in svc.log if t0 <= r[0] < t1]
    seen = defaultdict(set)
    for _, u, _, b in rows: seen[u].add((b["version"], b["role"]))
    return seen, sum(b["role"] == "canary" for _, _, _, b in rows) / max(1, len(rows))


def wait_routes(svc: Service, pred, deadline: float = 10.0):
    end = time.time() + deadline
    n = len(svc.log)
    while time.time() < end:
        if any(pred(r[3]) for r in svc.log[n:]): return time.time()
        time.sleep(0.1)
    raise AssertionError("the service never took the new rollout state")


def test_shadow_then_canary_auto_aborts_when_the_candidate_turns_bad(world):
    s = world["s"]
    svc = Service(world)
    try:
        svc.load(threads=4)
        out = cli(world, "rollout", "shadow", "tickets", "--version", "2", "--percent", "50")
        assert out.returncode == 0, out.stderr
        time.sleep(PERIOD + 3)
        j = ro.judge("tickets", s)
        assert j.candidate["by_role"]["shadow"] > 30 and j.shadow["pairs"] > 30
        assert 0.2 < j.shadow["agreement"] < 0.5        # v1 always says positive, v2 reads: 4 of 12 texts agree
        assert {r[3]["role"] for r in svc.log} == {"primary"}        # shadow answers never reach a caller
        out = cli(world, "rollout", "start", "tickets", "--version", "2", "--percent", "5", "--shadow", "50")
        assert out.returncode == 0, out.stderr
        t5 = wait_routes(svc, lambda b: b["role"] == "canary")
        time.sleep(4)
        out = cli(world, "rollout", "advance", "tickets", "--to", "50")
        assert out.returncode == 0, out.stdout + out.stderr
        t50 = wait_routes(svc, lambda b: True, 2) + PERIOD + 0.5
        time.sleep(4)
        control(world["url"], garble_if_contains="CAND-MARK")          # the candidate now answers with bad JSON
        t_bad = time.time()
        watch = cli(world, "rollout", "watch", "tickets", "--interval", "0.5", "--seconds", "60")
        t_abort = time.time()
        time.sleep(PERIOD + 2)
        svc.stop_load()
    finally: svc.close()
    assert watch.returncode == 1 and "regression" in watch.stdout, watch.stdout + watch.stderr
    assert ro.state("tickets", s) is None
    last = pp.history("tickets", s)[-1]
    assert last["action"] == "rollout-auto-abort" and last["evidence"]["verdict"] == "regression"
    assert any(m["name"] == "error rate" and m["worse"] for m in last["evidence"]["metrics"])
    assert failures(svc.log) == []                        # no caller received an error, before, during or after
    bad = [r for r in svc.log if r[0] > t_bad + PERIOD]
    assert bad and all(r[3]["version"] == 1 or r[3]["role"] == "canary" for r in bad)
    assert {r[3]["role"] for r in bad if r[0] < t_abort} >= {"retry"}   # failed canary calls answered by v1
    after = [r for r in svc.log if r[0] > t_abort + PERIOD + 0.5]
    assert after and {(r[3]["version"], r[3]["role"]) for r in after} == {(1, "primary")}
    seen5, share5 = shares(svc, t5 + PERIOD, t5 + 4)
    seen50, share50 = shares(svc, t50, t_bad)
    assert all(len(v) == 1 for v in seen5.values())       # sticky: one version per caller while the share stands
    assert all(len(v) == 1 for v in seen50.values())
    moved_back = [u for u, v in seen5.items() if ("canary" in {r for _, r in v}) and u in seen50
                  and "canary" not in {r for _, r in seen50[u]}]
    assert moved_back == []                               # raising the share never moves a canary caller back
    print(f"\ncanary share of calls: {share5:.3f} at 5%, {share50:.3f} at 50% ({len(svc.log)} calls)")


def test_a_healthy_canary_finishes_through_the_offline_gate(world):
    s = world["s"]
    svc = Service(world)
    try:
        svc.load(threads=2)
        assert cli(world, "rollout", "start", "tickets", "--version", "2", "--percent", "25").returncode == 0
        time.sleep(PERIOD + 5)
        out = cli(world, "rollout", "status", "tickets")
        assert out.returncode == 0 and "no regression" in out.stdout, out.stdout + out.stderr
        nb = schedule.run_notebook(ROOT / "experiments" / "rollout.ipynb", world["tmp"] / "rollout_run.ipynb",
                                   dict(task="tickets", settings_path=str(ROOT / "settings.ini"), overrides=world["ov"]))
        assert nb["ok"] and nb["verdict"] == "no regression" and nb["candidate"] == 2, nb
        assert nb["calls"]["candidate"]["by_role"]["canary"] > 0
        assert '"image/png"' in (world["tmp"] / "rollout_run.ipynb").read_text()      # the plots were drawn
        out = cli(world, "rollout", "advance", "tickets", "--to", "100")
        assert out.returncode == 0 and "promoted to production through the gate" in out.stdout, out.stdout + out.stderr
        t0 = time.time()
        switch_time(svc, t0, 2)
        svc.stop_load()
    finally: svc.close()
    assert ro.state("tickets", s) is None and failures(svc.log) == []
    actions = [e["action"] for e in pp.history("tickets", s)]
    assert actions[-2:] == ["promote", "rollout-promote"]
    assert pp.history("tickets", s)[-2]["ended_rollout"] == pp.history("tickets", s)[-1]["rollout"]


def test_sticky_routing_and_shares_over_ten_thousand_calls(world):
    """In-process pipeline against the model server, at 5% and then 50%: one call from each of 30,000 callers
    plus three more from 2,000 of them (36,000 calls a share). Callers are drawn by a hash salted with the
    rollout's (random) id, so the candidate's share of callers is binomial around the target: with 30,000
    callers its standard deviation is 0.29 points at 50%, and ±1 point holds at 3.5 sigma. The response cache is
    on (per version: each version's key prefix), so after one model call per version the calls are cache hits
    that still go through the routing."""
    s = world["s"]
    s2 = load_settings(ROOT / "settings.ini", overrides={**world["ov"], "monitor.enabled": "false",
                                                          "cache.enabled": "true"}, env={})
    pipe = Pipeline("tickets", "production", settings=s2)
    from concurrent.futures import ThreadPoolExecutor
    users = [f"caller-{i}" for i in range(30_000)]
    keys = users + [u for u in users[:2000] for _ in range(3)]
    def stage(percent: float) -> dict:
        st = ro.start("tickets", 2, percent, settings=s, user="test")
        pipe.live.refresh()
        assert pipe.routes().percent == percent and pipe.routes().salt == st["id"]
        with ThreadPoolExecutor(4) as ex:
            rs = list(ex.map(lambda k: (k, pipe.run("I love it", route_key=k)), keys))
        by = defaultdict(set)
        for u, r in rs: by[u].add(r.version)
        return dict(share=sum(r.version == 2 for _, r in rs[:30_000]) / 30_000, calls=len(rs), by=by,
                    ok=all(r.ok for _, r in rs),
                    routed=all((r.version == 2) == (route_bucket(u, st["id"]) < percent * 100) for u, r in rs))
    a, b = stage(5), stage(50)
    ro.abort("tickets", settings=s, user="test")
    print(f"\nshares of 30,000 callers: {a['share']:.4f} at 5%, {b['share']:.4f} at 50% ({a['calls']:,} calls each)")
    assert a["ok"] and b["ok"] and a["routed"] and b["routed"] and a["calls"] >= 10_000
    assert abs(a["share"] - 0.05) <= 0.01 and abs(b["share"] - 0.50) <= 0.01
    assert all(len(v) == 1 for v in a["by"].values()) and all(len(v) == 1 for v in b["by"].values())
    assert [u for u in users if a["by"][u] == {2} and b["by"][u] != {2}] == []     # no canary caller moved back
