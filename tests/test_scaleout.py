"""Issue 5 (scale-out): shared state on Redis and a team MLflow on PostgreSQL.

Real servers, started by the fixtures on loopback in temp dirs and stopped after: Debian's ``redis-server``,
PostgreSQL 15 (``initdb`` + ``pg_ctl``; as the ``postgres`` user when run as root) and ``mlflow server`` on it.
A test skips, saying why, only when a server binary is missing (``bash .ci/services.sh install`` installs them).

Four **replica processes** (this file run as ``python tests/test_scaleout.py worker``: a tiny JSON-lines RPC on
stdin/stdout) each hold a real ``Pipeline`` on the fake model server, with its OWN state dir — the only thing
they share is Redis. Scenario tests drive them concurrently.
"""
from __future__ import annotations
import glob, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
URL_ENV = "PROMPTSYS_TEST_REDIS_URL"


# -- settings with a [redis] section (whether or not the schema has one yet) -----------------------------------------

def scaleout_settings(tmp, fake_url:str, *, use="all", prefix="t", retry_seconds=0.5, **overrides):
    "Settings for one replica: every local store under `tmp`, the fake OpenAI server as model, `[redis]` as given."
    from promptsys.config import SCHEMA, Section, Settings, load_settings
    tmp = Path(tmp)
    ov = {"promptsys.prompts_dir": str(ROOT / "prompts"), "promptsys.state_dir": str(tmp / "state"),
          "promptsys.records": "none", "cache.dir": str(tmp / "cache"), "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
          "monitor.enabled": "false", "monitor.db_path": str(tmp / "metrics.db"), "eval.runs_dir": str(tmp / "runs"),
          "replay.cassette": str(tmp / "cassette.json"), "model.provider": "openai", "openai.base_url": fake_url + "/v1",
          "openai.api_key_env": "", "openai.model": "gpt-4o-mini", "retry.max_attempts": "1", "retry.initial_wait": "0.01",
          **{k.replace("__", ".", 1) if "." not in k else k: v for k, v in overrides.items()}}
    use = use if isinstance(use, str) else ", ".join(use)
    red = {"use": use, "url_env": URL_ENV, "key_prefix": prefix, "retry_seconds": retry_seconds, "timeout": 0.25}
    if "redis" in SCHEMA:   # the lead's schema knows [redis]: go through the loader like a settings.ini would
        known = SCHEMA["redis"]
        return load_settings(ROOT / "settings.ini", env={},
                             overrides={**ov, **{f"redis.{k}": str(v) for k, v in red.items() if k in known}})
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    secs = {k: Section(v) for k, v in s.as_dict().items()}
    secs["redis"] = Section(red, use=tuple(x.strip() for x in use.split(",") if x.strip()))
    return Settings(secs, s.path, s.base)


# -- the replica worker (runs in its own process) --------------------------------------------------------------------

def _worker():
    import logging, traceback
    from promptsys.pipeline import Pipeline
    from promptsys import shared
    from promptsys.errors import PromptsysError
    warned: list[str] = []
    class _H(logging.Handler):
        def emit(self, r):
            if r.levelno >= logging.WARNING: warned.append(r.getMessage())
    lg = logging.getLogger("promptsys.shared"); lg.addHandler(_H()); lg.setLevel(logging.INFO)
    pipe = None
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "exit": break
            if op == "setup":
                warned.clear()
                os.environ[URL_ENV] = cmd["redis_url"]
                s = scaleout_settings(cmd["tmp"], cmd["fake_url"], use=cmd.get("use", "all"), prefix=cmd["prefix"],
                                      **cmd.get("overrides", {}))
                pipe = shared.attach(Pipeline("sentiment", 1, settings=s))
                out = {"pipeline": repr(pipe), "cache": type(pipe.cache).__name__, "budget": type(pipe.budget).__name__}
            elif op == "run":
                res = []
                for t in cmd["texts"]:
                    try:
                        r = pipe.run(t, cache=cmd.get("cache", True))
                        res.append(dict(ok=r.ok, cost=r.cost_usd, cache_hit=r.cache_hit, label=r.label, error=None))
                    except PromptsysError as e:
                        res.append(dict(ok=False, cost=0.0, cache_hit=False, label=None, error=type(e).__name__))
                out = {"results": res}
            elif op == "state":
                out = {"breakers": [t.breaker.state for g in pipe.groups for t in g.targets],
                       "spent": pipe.budget.spent(), "held": pipe.budget.held(), "warnings": warned}
            else: out = {"exception": f"unknown op {op}"}
        except Exception:
            out = {"exception": traceback.format_exc()}
        print(json.dumps(out), flush=True)


class Replica:
    "One replica process: `call(op, **kw)` sends a command; `send`/`recv` split it to drive replicas concurrently."
    def __init__(self, tmp:Path):
        self.tmp, self.log = tmp, open(tmp / "replica.log", "w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=str(ROOT))
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", f"replica did not start: {line!r} {self.stderr()}"
    def stderr(self) -> str: self.log.seek(0); return self.log.read()[-3000:]
    def send(self, op:str, **kw): self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n"); self.proc.stdin.flush()
    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"replica died: {self.stderr()}"
        out = json.loads(line)
        assert "exception" not in out, out["exception"]
        return out
    def call(self, op:str, **kw) -> dict: self.send(op, **kw); return self.recv()
    def stop(self):
        try: self.send("exit"); self.proc.wait(10)
        except Exception: self.proc.kill(); self.proc.wait()
        self.log.close()


def each(replicas, op:str, per_replica:list[dict]|None=None, **kw) -> list[dict]:
    "Send `op` to every replica at once (they work concurrently), then collect the answers in order."
    for i, r in enumerate(replicas): r.send(op, **{**kw, **((per_replica or [{}] * len(replicas))[i])})
    return [r.recv() for r in replicas]


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker()
    sys.exit(0)

# ====================================================================================================================
import pytest  # noqa: E402
from tests.fakeserver import start_server, stop_server, control, stats  # noqa: E402


def _free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0)); return so.getsockname()[1]


def _wait_port(port:int, timeout:float, proc=None) -> bool:
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if proc is not None and proc.poll() is not None: return False
        try: socket.create_connection(("127.0.0.1", port), 0.2).close(); return True
        except OSError: time.sleep(0.05)
    return False


# -- Redis --------------------------------------------------------------------------------------------------------------

class RedisServer:
    "A throwaway redis-server on a loopback port (no persistence); `kill()` is a SIGKILL, `start()` again reuses the port."
    def __init__(self, port:int|None=None):
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
    def start(self):
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait_port(self.port, 15, self.proc), "redis-server did not start"
        return self
    def client(self):
        import redis
        return redis.Redis.from_url(self.url)
    def kill(self):
        if self.proc and self.proc.poll() is None: self.proc.send_signal(signal.SIGKILL); self.proc.wait(10)
    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()


def _need_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; or bash .ci/services.sh install)")
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'promptsys[redis]')")


@pytest.fixture(scope="session")
def redis_server():
    _need_redis()
    srv = RedisServer().start()
    try: yield srv
    finally: srv.stop()


@pytest.fixture(scope="module")
def fake():
    proc, url = start_server("--delay-ms", "0")
    try: yield url
    finally: stop_server(proc)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, redis_server):
    "Four replica processes, each with its own state dir (they share nothing but Redis)."
    rs = []
    try:
        for i in range(4): rs.append(Replica(tmp_path_factory.mktemp(f"replica{i}")))
        yield rs
    finally:
        for r in rs: r.stop()


_n = iter(range(10**6))
def _setup(rs, fake_url, redis_url, **kw) -> str:
    "Fresh shared state for a scenario: a new key prefix on the same Redis."
    prefix = f"t{next(_n)}-{os.getpid()}"
    for r, out in zip(rs, each(rs, "setup", [dict(tmp=str(r.tmp / prefix), fake_url=fake_url, redis_url=redis_url,
                                                 prefix=prefix, **kw) for r in rs])):
        assert out["cache"] in ("RedisCache", "NoneType") and out["budget"] == "RedisBudget", out
    return prefix


# -- the four replica scenarios ------------------------------------------------------------------------------------------

def test_four_replicas_never_spend_more_than_the_budget_plus_one_call(replicas, fake, redis_server):
    limit = 0.00015   # ~20 calls of ~$0.000007: fewer than any one replica asks for
    prefix = _setup(replicas, fake, redis_server.url, overrides={"budget.total_usd": str(limit), "cache.enabled": "false"})
    texts = [[f"replica {i} review {k}: {'great' if k % 2 else 'awful'} blender, order {i}-{k}" for k in range(30)]
             for i in range(4)]
    outs = each(replicas, "run", [dict(texts=t, cache=False) for t in texts])
    res = [x for o in outs for x in o["results"]]
    costs = [x["cost"] for x in res if x["ok"]]
    assert {x["error"] for x in res if not x["ok"]} == {"BudgetExceeded"}
    assert all(any(x["error"] == "BudgetExceeded" for x in o["results"]) for o in outs)   # every replica hit the shared limit
    assert len(costs) >= 5 and sum(costs) <= limit + max(costs)
    st = replicas[0].call("state")
    assert st["spent"]["global:total"] == pytest.approx(sum(costs), abs=1e-6 * len(costs))   # every replica's spend, on Redis
    assert st["held"]["global:total"] == 0 and st["warnings"] == []
    raw = redis_server.client().hgetall(f"{prefix}:budget:global:total")
    assert int(raw[b"spent"]) == sum(round(c * 1e6) for c in costs) and int(raw[b"held"]) == 0


def test_a_breaker_opened_by_one_replica_is_open_for_all_and_closes_for_all(replicas, fake, redis_server):
    _setup(replicas, fake, redis_server.url, overrides={"breaker.failure_threshold": "3", "breaker.reset_timeout": "2.0",
                                                        "breaker.window_seconds": "60", "cache.enabled": "false"})
    control(fake, p500=1.0)
    try:
        out = replicas[0].call("run", texts=["great"] * 3, cache=False)["results"]
        assert [x["error"] for x in out] == ["ProviderError"] * 3
        n0 = stats(fake)["total"]
        assert [s["breakers"] for s in each(replicas, "state")] == [["open"]] * 4
        outs = each(replicas[1:], "run", texts=["great"], cache=False)
        assert [o["results"][0]["error"] for o in outs] == ["CircuitOpen"] * 3
        assert stats(fake)["total"] == n0                       # nobody called the failing endpoint
    finally:
        control(fake, p500=0.0)
    time.sleep(2.2)                                              # the reset timeout: half-open for everyone
    assert [s["breakers"] for s in each(replicas, "state")] == [["half_open"]] * 4
    assert replicas[2].call("run", texts=["great stuff"], cache=False)["results"][0]["ok"]    # one probe closes it ...
    assert [s["breakers"] for s in each(replicas, "state")] == [["closed"]] * 4               # ... for all
    outs = each(replicas, "run", texts=["awful"], cache=False)
    assert all(o["results"][0]["ok"] for o in outs)


def test_a_response_cached_by_one_replica_is_a_hit_for_the_others(replicas, fake, redis_server):
    prefix = _setup(replicas, fake, redis_server.url)
    texts = ["I love this kettle", "Broke after a day, awful", "It is a kettle"]
    n0 = stats(fake)["total"]
    first = replicas[1].call("run", texts=texts)["results"]
    assert [x["cache_hit"] for x in first] == [False] * 3 and stats(fake)["total"] == n0 + 3
    for o in each(replicas, "run", texts=texts):
        assert [x["cache_hit"] for x in o["results"]] == [True] * 3
        assert [x["label"] for x in o["results"]] == [x["label"] for x in first]
    assert stats(fake)["total"] == n0 + 3
    r = redis_server.client()
    keys = list(r.scan_iter(f"{prefix}:cache:*"))
    assert len(keys) == 3 and 0 < r.pttl(keys[0]) <= 7 * 86400 * 1000   # the [cache] ttl_seconds, as PX
    assert json.loads(r.get(keys[0]))["provider"] == "openai"


def test_redis_killed_mid_run_calls_go_on_on_local_state_with_one_warning(replicas, fake):
    _need_redis()
    srv = RedisServer().start()
    try:
        prefix = _setup(replicas, fake, srv.url, overrides={"budget.total_usd": "100", "breaker.failure_threshold": "3"})
        outs = each(replicas, "run", [dict(texts=[f"great {i}-{k}" for k in range(5)]) for i in range(4)])
        assert all(x["ok"] for o in outs for x in o["results"])
        srv.kill()
        during = each(replicas, "run", [dict(texts=[f"awful {i}-{k}" for k in range(10)]) for i in range(4)])
        assert all(x["ok"] and not x["cache_hit"] for o in during for x in o["results"])
        again = each(replicas, "run", [dict(texts=[f"awful {i}-{k}" for k in range(10)]) for i in range(4)])
        assert all(x["ok"] and x["cache_hit"] for o in again for x in o["results"])   # the local cache took over
        st = each(replicas, "state")
        for s in st:
            assert s["breakers"] == ["closed"] and len(s["warnings"]) == 1, s["warnings"]
            assert "unreachable" in s["warnings"][0] and "using local state" in s["warnings"][0]
        # Redis comes back (empty): after retry_seconds the replicas use it again, and the costs settled during
        # the outage are added to the shared counters
        srv.start()
        time.sleep(0.6)
        after = each(replicas, "run", [dict(texts=[f"fine {i}"]) for i in range(4)])
        assert all(o["results"][0]["ok"] for o in after)
        r = srv.client()
        spent = int(r.hget(f"{prefix}:budget:global:total", "spent") or 0)
        outage_and_after = sum(x["cost"] for o in during + after for x in o["results"])
        assert spent == pytest.approx(outage_and_after * 1e6, abs=len(during) * 10 + 8)
        assert len(list(r.scan_iter(f"{prefix}:cache:*"))) == 4
        assert all(len(s["warnings"]) == 1 for s in each(replicas, "state"))   # still one warning each
    finally:
        srv.stop()


# -- the backends in-process: semantics the scenarios don't reach ----------------------------------------------------------

@pytest.fixture
def links(redis_server):
    from promptsys.shared import RedisLink
    prefix = f"u{next(_n)}-{os.getpid()}"
    return RedisLink(redis_server.url, prefix), RedisLink(redis_server.url, prefix)


def test_cache_has_the_embedded_interface_and_values(links, tmp_path):
    from promptsys.cache import ResponseCache
    from promptsys.shared import RedisCache
    rc, local = RedisCache(links[0], ttl=60), ResponseCache(tmp_path / "c", ttl=60)
    pub = lambda o: {m for m in dir(o) if not m.startswith("_")} - {"link", "local", "prefix", "directory"}
    assert pub(local) <= pub(rc) | {"volume"}
    for c in (rc, local):
        assert c.get("a") is None and c.set("a", {"x": [1, "é"]}) and c.get("a") == {"x": [1, "é"]}
        assert c.set("b", {"y": 1}, ttl=0.5) and len(c) == 2 and c.delete("b") and not c.delete("b") and len(c) == 1
        st = c.stats()
        assert (st["entries"], st["hits"], st["misses"]) == (1, 1, 1)
        assert c.clear() == 1 and len(c) == 0
    rc.set("t", {"v": 1}, ttl=1.5)
    assert 0 < links[0].client.pttl(rc.prefix + "t") <= 1500
    assert RedisCache(links[1], 60).get("t") == {"v": 1}


def test_breaker_store_updates_are_atomic_and_run_fn_once(links):
    from promptsys.shared import RedisStore
    stores = [RedisStore(links[i % 2]) for i in range(4)]
    calls = []
    def bump(st):
        calls.append(1)
        return {"n": (st or {"n": 0})["n"] + 1}
    def work(s):
        for _ in range(25): s.update("breaker:x", bump)
    ts = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in ts: t.start()
    for t in ts: t.join()
    assert stores[0].get("breaker:x") == {"n": 100} and len(calls) == 100


def test_breaker_failure_rate_counts_every_replica_s_calls_on_redis(links):
    """Issue 6, the rate verdict on Redis: replica a's successes (written at most once a second) count in replica b's
    failure rate, so b opens at 13 failures of 26 calls, not 10 of 10; a state stored by the previous version
    (no "calls") is read as it is."""
    from promptsys.shared import RedisStore
    from promptsys.breaker import CircuitBreaker
    from promptsys.errors import ProviderError
    boom = ProviderError("500 from the model server", retryable=True, status=500)
    key = links[0].key("breaker:ep")
    links[0].client.set(key, json.dumps({"state": "closed", "failures": [], "opened_at": 0.0, "probes": 0, "probe_at": 0.0}))
    a, b = (CircuitBreaker("ep", 0, 10, 60, store=RedisStore(link), failure_rate=0.5, min_calls=10) for link in links)
    for _ in range(12): a.before(); a.success()
    time.sleep(1.05); a.before(); a.success()            # a second later: a's 13 successes are on Redis
    n = 0
    while b.allows() and n < 100: b.before(); b.failure(boom); n += 1
    assert n == 13 and a.state == "open"
    st = json.loads(links[1].client.get(key))
    assert [sum(c[i] for c in st["calls"]) for i in (1, 2)] == [13, 13] and st["why"].startswith("13 of 26 calls failed")


def test_budget_alert_fires_once_across_replicas_and_warn_mode_holds(links, tmp_path):
    from promptsys.errors import BudgetExceeded
    from promptsys.shared import RedisBudget
    bs = []
    for i, l in enumerate(links):
        b = RedisBudget(tmp_path / f"ledger{i}", {"global:day": 0.001, "task:t:total": 0.01}, alert_at=0.5)
        b.attach(l); bs.append(b)
    alerts = []
    for b in bs: b.on_alert.append(lambda *a: alerts.append(a))
    for k in range(6):
        b = bs[k % 2]
        b.settle(b.reserve(0.0001, "m"), 0.0001)
    assert [a[0] for a in alerts] == ["global:day"] and alerts[0][1] == pytest.approx(0.0005)
    assert bs[1].spent() == pytest.approx({"global:day": 0.0006, "task:t:total": 0.0006})
    with pytest.raises(BudgetExceeded, match="global:day would be exceeded"): bs[0].reserve(0.0005)
    assert bs[0].held() == {"global:day": 0.0, "task:t:total": 0.0}
    bs[1].on_exceed = "warn"
    r = bs[1].reserve(0.0005)                       # over, but warn mode holds it anyway
    assert bs[0].held()["global:day"] == pytest.approx(0.0005)
    bs[1].release(r)
    assert bs[0].held()["global:day"] == 0


def test_rate_limits_and_429_penalties_are_fleet_wide(links):
    from promptsys.shared import RedisRateLimiter
    a, b = (RedisRateLimiter(l, "http://m/v1", requests_per_minute=60, tokens_per_minute=600) for l in links)
    assert a.tok is not None and a.req is not None
    assert a._delay(5) == 0                          # a takes the one-second burst's request slot ...
    assert b._delay(5) > 0.5                         # ... so b must wait about a second
    c, d = (RedisRateLimiter(l, "http://n/v1") for l in links)   # no limits: only the 429 penalty is shared
    assert c._delay(0) == 0 and d._delay(0) == 0
    c.penalize(5)
    d._pen_read = 0.0
    assert 4 < d._delay(0) <= 5 and 4 < c._delay(0) <= 5


def test_nothing_raises_when_redis_is_unreachable(tmp_path, caplog):
    pytest.importorskip("redis")
    import logging
    from promptsys.shared import RedisBudget, RedisCache, RedisLink, RedisRateLimiter, RedisStore
    from promptsys.breaker import CircuitBreaker
    from promptsys.cache import ResponseCache
    from promptsys.errors import ProviderError
    link = RedisLink(f"redis://127.0.0.1:{_free_port()}/0", "x", retry_seconds=0.05)
    with caplog.at_level(logging.INFO, logger="promptsys.shared"):
        c = RedisCache(link, 60, local=lambda: ResponseCache(tmp_path / "c"))
        assert c.set("k", {"v": 1}) and c.get("k") == {"v": 1} and len(c) == 1 and c.delete("k") and c.clear() == 0
        br = CircuitBreaker("e", failure_threshold=2, store=RedisStore(link))
        br.before(); br.failure(ProviderError("x", retryable=True)); br.failure(ProviderError("x", retryable=True))
        assert br.state == "open"
        b = RedisBudget(tmp_path / "ledger", {"global:total": 1.0}); b.attach(link)
        b.settle(b.reserve(0.2), 0.1)
        assert b.spent() == {"global:total": pytest.approx(0.1)} and b.held() == {"global:total": 0.0}
        rl = RedisRateLimiter(link, "e", requests_per_minute=6000); rl.acquire(); rl.penalize(0.01)
        time.sleep(0.06)                               # past retry_seconds: one more try, still down, no new warning
        assert c.get("nope") is None
    warns = [r for r in caplog.records if r.name == "promptsys.shared" and r.levelname == "WARNING"]
    assert len(warns) == 1 and link.outages == 1 and len(b._pending) == 1


def test_factories_choose_the_backend_from_settings(tmp_path, fake, redis_server, monkeypatch):
    from promptsys import shared
    from promptsys.breaker import CircuitBreaker
    from promptsys.cache import ResponseCache
    from promptsys.cost import Budget
    from promptsys.errors import ConfigError
    from promptsys.retry import RateLimiter
    local = scaleout_settings(tmp_path / "a", fake, use=())
    assert isinstance(shared.cache_for(local), ResponseCache) and type(shared.budget_for(local)) is Budget
    assert isinstance(shared.rate_limiter_for("e", local), RateLimiter)
    assert shared.status(local) == dict(cache="local", breaker="local", budget="local", ratelimit="local")
    monkeypatch.setenv(URL_ENV, redis_server.url)
    s = scaleout_settings(tmp_path / "b", fake, use="cache, breaker")
    assert isinstance(shared.cache_for(s), shared.RedisCache) and shared.cache_for(s) is shared.cache_for(s)
    assert isinstance(shared.breaker_for("e", s).store, shared.RedisStore) and type(shared.budget_for(s)) is Budget
    assert shared.status(s)["redis"] == "up" and shared.status(s)["budget"] == "local"
    monkeypatch.delenv(URL_ENV)
    with pytest.raises(ConfigError, match=URL_ENV): shared.cache_for(scaleout_settings(tmp_path / "c", fake, use="cache", prefix="other"))


# -- PostgreSQL + team MLflow ------------------------------------------------------------------------------------------

def _pg_bindir() -> Path|None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists(): return Path(d)
    if (p := shutil.which("initdb")) and shutil.which("pg_ctl"): return Path(p).parent
    return None


class Postgres:
    """A throwaway PostgreSQL cluster on a loopback port, run as the postgres user when we are root.

    Its folder is a fresh `mkdtemp` directly under the temp dir (not under pytest's 0700 tmp tree, which the
    postgres user could not enter), removed on `stop()`."""
    def __init__(self):
        self.bindir, self.port = _pg_bindir(), _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="promptsys-pg-"))
        self.data = self.dir / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user: shutil.chown(self.dir, "postgres", "postgres")
    def _run(self, *cmd, check=True):
        return subprocess.run([*self.as_user, *map(str, cmd)], check=check, capture_output=True, text=True, timeout=120)
    def start(self):
        try:
            self._run(self.bindir / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.dir / "log", "-w", "-t", "60", "-o",
                      f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
            self._run(self.bindir / "psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres", "-c", "CREATE DATABASE mlflow")
        except subprocess.CalledProcessError as e:
            self.stop()
            pytest.fail(f"could not start PostgreSQL: {e.cmd}: {e.stderr or e.stdout}")
        return self
    @property
    def uri(self) -> str: return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/mlflow"
    def stop(self):
        if self.data.exists():
            r = self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop", check=False)
            pidfile = self.data / "postmaster.pid"
            if r.returncode != 0 and pidfile.exists():     # pg_ctl could not do it: a fast shutdown by signal
                pid = int(pidfile.read_text().split()[0])
                try:
                    os.kill(pid, signal.SIGINT)
                    for _ in range(100):
                        os.kill(pid, 0); time.sleep(0.1)
                except ProcessLookupError: pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    if _pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (Debian: apt-get install postgresql; or bash .ci/services.sh install)")
    if os.geteuid() == 0 and shutil.which("runuser") is None: pytest.skip("running as root without runuser: cannot start postgres")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]')")
    pg = Postgres().start()
    try: yield pg
    finally: pg.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    "`mlflow server` on the PostgreSQL backend store, serving artifacts from a temp dir, on loopback, one worker."
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.uri,
                             "--artifacts-destination", str(tmp / "artifacts"), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        t = time.monotonic() + 240
        while True:
            if proc.poll() is not None: log.seek(0); pytest.fail(f"mlflow server exited: {log.read()[-3000:]}")
            try:
                if opener.open(url + "/health", timeout=2).status == 200: break
            except OSError: pass
            if time.monotonic() > t: log.seek(0); pytest.fail(f"mlflow server did not start in 240 s: {log.read()[-3000:]}")
            time.sleep(0.5)
        yield dict(url=url, artifacts=tmp / "artifacts", postgres=postgres)
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM); proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try: os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError: pass
            proc.wait()
        log.close()


def test_mlflow_server_on_postgres_keeps_runs_prompts_aliases_and_artifacts(mlflow_server, tmp_path):
    "MLflow itself through the team server: what promptsys relies on, checked without promptsys in between."
    import mlflow
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=mlflow_server["url"], registry_uri=mlflow_server["url"])
    exp = c.create_experiment("scaleout-raw")
    run = c.create_run(exp)
    c.log_batch(run.info.run_id, metrics=[mlflow.entities.Metric("accuracy", 0.75, 0, 0)],
                params=[mlflow.entities.Param("prompt_hash", "abc123")])
    (tmp_path / "examples.json").write_text('[{"id": 1}]')
    c.log_artifact(run.info.run_id, str(tmp_path / "examples.json"))
    c.set_terminated(run.info.run_id)
    r = c.get_run(run.info.run_id)
    assert r.data.metrics["accuracy"] == 0.75 and r.data.params["prompt_hash"] == "abc123"
    assert r.info.artifact_uri.startswith("mlflow-artifacts:")          # served by the tracking server ...
    assert [a.path for a in c.list_artifacts(run.info.run_id)] == ["examples.json"]
    assert list(mlflow_server["artifacts"].rglob("examples.json"))      # ... stored under its artifact root
    v1 = c.register_prompt("scaleout-raw", "Classify: {{text}}", tags={"version": "1"})
    v2 = c.register_prompt("scaleout-raw", "Sentiment of {{text}}?", tags={"version": "2"})
    c.set_prompt_alias("scaleout-raw", "production", int(v2.version))
    assert c.get_prompt_version_by_alias("scaleout-raw", "production").template == "Sentiment of {{text}}?"
    c.set_prompt_alias("scaleout-raw", "production", int(v1.version))
    assert c.get_prompt_version_by_alias("scaleout-raw", "production").tags["version"] == "1"
    # the rows are in PostgreSQL, not in a file next to us
    import psycopg
    with psycopg.connect(f"host=127.0.0.1 port={mlflow_server['postgres'].port} user=postgres dbname=mlflow") as con:
        assert con.execute("select count(*) from runs where run_uuid = %s", (run.info.run_id,)).fetchone()[0] == 1


def test_eval_gate_promote_rollback_through_the_postgres_backed_server(mlflow_server, fake, tmp_path):
    pe = pytest.importorskip("promptsys.evaluation")
    pp = pytest.importorskip("promptsys.promotion")
    reg = pytest.importorskip("promptsys.registry")
    from promptsys.pipeline import Pipeline
    from promptsys.prompts import load_task
    d = tmp_path / "prompts" / "sentiment"
    shutil.copytree(ROOT / "prompts" / "sentiment", d, ignore=shutil.ignore_patterns("README.md", "aliases.json", "audit.jsonl"))
    rows = (ROOT / "prompts/sentiment/data/sentiment.jsonl").read_text().splitlines()[:12]
    (d / "data" / "sentiment.jsonl").write_text("\n".join(rows) + "\n")
    s = scaleout_settings(tmp_path, fake, use=(), **{"promptsys.prompts_dir": str(tmp_path / "prompts"),
                                                      "mlflow.tracking_uri": mlflow_server["url"],
                                                      "mlflow.experiment_prefix": "team", "mlflow.alias_cache_seconds": "0"})
    assert reg.tracking_uri(s) == mlflow_server["url"]                 # settings only: nothing else points at the server
    t = load_task("sentiment", tmp_path / "prompts")
    df = pe.evaluate(t, settings=s, progress=False)
    assert sorted(df.index) == sorted(t.versions) and df.n_examples.eq(12).all()
    client = reg.mlflow_client(s)
    run = client.get_run(df.run_id.iloc[0])
    assert run.info.status == "FINISHED" and "examples.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # gate + promote: no production yet, so the best evaluated version goes
    pr = pp.promote(t, settings=s, reason="first production")
    assert pr.moved and pr.decision.passed
    first = pr.decision.candidate
    assert Pipeline(t, "production", settings=s).prompt.number == first
    # a forced promotion of another version, then one-step rollback
    other = next(n for n in sorted(t.versions) if n != first)
    gd = pp.gate(t, other, settings=s)
    pr2 = pp.promote(t, other, settings=s, reason="try another wording", force=not gd.passed)
    assert pr2.moved and reg.alias_number(reg.current_alias(client, t, "production", s)) == other
    e = pp.rollback(t, settings=s, reason="scale-out test rollback")
    assert (e["from"], e["to"]) == (other, first)
    assert reg.alias_number(reg.current_alias(client, t, "production", s)) == first
    assert reg.alias_number(reg.current_alias(client, t, "previous", s)) == other
    assert Pipeline(t, "production", settings=s).prompt.number == first
    acts = [(h["action"], h["to"]) for h in pp.history(t, s)]
    assert acts[-3:] == [("promote", first), ("promote", other), ("rollback", first)]
    assert all(h["tracking_uri"] == mlflow_server["url"] for h in pp.history(t, s))


def test_two_clones_promoting_against_the_postgres_backed_server_keep_every_audit_entry(mlflow_server, fake, tmp_path):
    """Issue 6: audit tags were numbered by each clone's own audit.jsonl line count (audit.00001, ...), so two clones
    promoting against one tracking server overwrote each other's entries. Keys are now unique across writers."""
    pp = pytest.importorskip("promptsys.promotion")
    reg = pytest.importorskip("promptsys.registry")
    pe = pytest.importorskip("promptsys.evaluation")
    rows = (ROOT / "prompts/sentiment/data/sentiment.jsonl").read_text().splitlines()[:12]
    clones = []
    for name in ("laptop", "ci"):                        # two checkouts: own prompts/, own audit.jsonl, one server
        d = tmp_path / name / "prompts" / "sentiment"
        shutil.copytree(ROOT / "prompts" / "sentiment", d, ignore=shutil.ignore_patterns("README.md", "aliases.json", "audit.jsonl"))
        (d / "data" / "sentiment.jsonl").write_text("\n".join(rows) + "\n")
        clones.append(scaleout_settings(tmp_path / name, fake, use=(), **{
            "promptsys.prompts_dir": str(tmp_path / name / "prompts"), "mlflow.tracking_uri": mlflow_server["url"],
            "mlflow.experiment_prefix": "clones", "mlflow.alias_cache_seconds": "0"}))
    a, b = clones
    pe.evaluate("sentiment", [1, 2], settings=a, progress=False)
    assert pp.promote("sentiment", 1, settings=a, force=True, user="ann", reason="laptop 1").moved
    assert pp.promote("sentiment", 2, settings=b, force=True, user="bo", reason="ci 1").moved
    pp.stage("sentiment", 1, settings=a, user="ann", reason="laptop 2")
    pp.rollback("sentiment", settings=b, user="bo", reason="ci 2")
    assert [[e["reason"] for e in pp.history("sentiment", s)] for s in clones] == [["laptop 1", "laptop 2"], ["ci 1", "ci 2"]]
    tags = reg.mlflow_client(a).get_prompt("clones-sentiment").tags
    assert len([k for k in tags if k.startswith("audit.")]) == 4                     # nothing overwritten
    assert [e["reason"] for e in pp.registry_history("sentiment", b)] == ["laptop 1", "ci 1", "laptop 2", "ci 2"]


def test_cli_shared_reports_where_state_lives(monkeypatch, capsys):
    from promptsys import cli
    assert cli.main(["--settings", str(ROOT / "settings.ini"), "shared", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == dict(cache="local", breaker="local",
                                                                                 budget="local", ratelimit="local")


def test_password_in_the_url_works_and_never_reaches_the_log(tmp_path, caplog):
    _need_redis()
    import logging
    from promptsys.cache import ResponseCache
    from promptsys.shared import RedisCache, RedisLink
    srv = RedisServer()
    srv.proc = subprocess.Popen(["redis-server", "--port", str(srv.port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--requirepass", "s3cret-pw"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_port(srv.port, 15, srv.proc)
        link = RedisLink(f"redis://:s3cret-pw@127.0.0.1:{srv.port}/0", "pw")
        c = RedisCache(link, 60, local=lambda: ResponseCache(tmp_path / "c"))
        assert c.set("k", {"v": 1}) and c.get("k") == {"v": 1} and link.down_since is None
        assert RedisLink(f"redis://:wrong@127.0.0.1:{srv.port}/0", "pw").ping() is False     # refused: an outage, not a crash
        with caplog.at_level(logging.WARNING, logger="promptsys.shared"):
            srv.kill()
            assert c.get("k") is None and c.set("k", {"v": 2}) and c.get("k") == {"v": 2}
        text = caplog.text + repr(link) + repr(c)
        assert "unreachable" in caplog.text and "s3cret-pw" not in text and "wrong" not in text
    finally:
        srv.stop()


def test_a_crashed_updater_s_breaker_lock_only_delays_the_others(links):
    from promptsys.shared import RedisStore
    st = RedisStore(links[0], lease=0.3)
    links[1].client.set(links[1].key("lock", "breaker:y"), "crashed-holder", px=300)   # never released
    assert st.update("breaker:y", lambda old: {"n": 1}) == {"n": 1}                      # waits out the lease
    assert RedisStore(links[1]).get("breaker:y") == {"n": 1}
    assert links[0].client.get(links[0].key("lock", "breaker:y")) is None
