"""Reliability layer end to end: retries, circuit breaker, fallbacks, cascade, load balancing, rate limits.

Every test runs real processes on loopback: promptsys's openai/anthropic providers against
tests/fakeserver.py, which injects 5xx, 429 + Retry-After, hangs past the read timeout, malformed JSON and
connection resets at configurable rates. Waits are shrunk through settings (retry.initial_wait=0.001 ...)
so thousands of calls take seconds. No timed assertions except lower bounds that a rate limit or a
Retry-After imposes.
"""
from __future__ import annotations
import asyncio, json, logging, socket, subprocess, sys, time
from collections import Counter
from pathlib import Path
import pytest

from conftest import ROOT, control, stats, make_settings
from promptsys.errors import (PromptsysError, ProviderError, CircuitOpen, RateLimited, OutputValidationError)
from promptsys.pipeline import Pipeline
from promptsys.breaker import breaker_for, OPEN, CLOSED, HALF_OPEN

FAST = {"retry.initial_wait": 0.001, "retry.max_wait": 0.01, "retry.jitter": 0.001,
        "cache.enabled": False, "promptsys.records": "none", "openai.model": "fake-model",
        "openai.api_key_env": "", "anthropic.api_key_env": "PROMPTSYS_TEST_ANTHROPIC_KEY"}
FALLBACK = {"label": "neutral"}          # prompts/sentiment/task.toml [fallback]
TEXTS = ["I love this kettle, great value", "terrible, it broke after a day", "it is a kettle",
         "excellent battery, perfect size", "awful support, I want a refund", "arrived on Tuesday"]


def v1(url:str) -> str: return url.rstrip("/") + "/v1"

def openai_settings(tmp_path, url:str, **kw):
    "Settings for the openai provider at fake server `url`, fast retries, no cache."
    return make_settings(tmp_path, **{"model.provider": "openai", "openai.base_url": v1(url), **FAST, **kw})

def dead_url() -> str:
    "A loopback URL nothing listens on (connections are refused)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"

@pytest.fixture(autouse=True)
def _anthropic_key(monkeypatch):
    "The fake server's Anthropic endpoint wants an x-api-key header (any value)."
    monkeypatch.setenv("PROMPTSYS_TEST_ANTHROPIC_KEY", "test-anthropic-key")


# ---------------------------------------------------------------------------------------------------------
# Thousands of calls through a faulty server
# ---------------------------------------------------------------------------------------------------------

N_CALLS = 2000
FAULTS = dict(p500=0.04, p503=0.02, p429=0.03, phang=0.004, pmalformed=0.03, preset=0.03)

@pytest.mark.parametrize("how,n_calls", [("async", N_CALLS), ("threads", 600)])
def test_thousands_of_calls_with_faults(tmp_path, fake_server, how, n_calls):
    "No unhandled exception; valid result or typed fallback; retries within limit; records and server agree."
    # read_timeout well above a loaded machine's worst answer time, hang well above read_timeout: a slow
    # answer must not be mistaken for a hang, or the server's counts and ours would disagree
    _, url = fake_server("--hang-seconds", "3", "--retry-after", "0.01", "--seed", "7")
    control(url, **FAULTS)
    max_attempts = 3
    # breaker off: a refused attempt never reaches the server, and this test counts requests exactly
    s = openai_settings(tmp_path, url, **{"promptsys.mode": "service", "openai.read_timeout": 1.0,
                                          "retry.max_attempts": max_attempts, "breaker.enabled": False,
                                          "prices.fake-model": "0.01, 0.02"})
    records = []
    p = Pipeline("sentiment", 1, settings=s, sinks=[records.append])
    inputs = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(n_calls)]
    if how == "async": results = asyncio.run(p.arun_batch(inputs, concurrency=32, progress=False))
    else: results = p.run_batch(inputs, concurrency=8, progress=False)

    assert len(results) == len(records) == n_calls
    st = stats(url)
    kinds = Counter()
    for r in results:
        assert r.error is None, r                         # service mode: nothing surfaces as an error
        assert 0 <= r.retries <= max_attempts - 1
        if r.fallback:
            assert r.output == FALLBACK and r.provider == "task" and r.fallback_reason
            assert r.fallback_reason.split(":")[0] in ("ProviderError", "ProviderTimeout", "RateLimited")
            assert r.retries == max_attempts - 1          # every fault here is retryable: all attempts used
            kinds["fallback"] += 1
        else:
            assert r.ok and r.label in ("positive", "negative", "neutral") and r.provider == "openai"
            assert r.cost_usd > 0 and r.tokens_in > 0
            kinds["ok"] += 1
    # records are the results, one each
    assert Counter(rec["request_id"] for rec in records).most_common(1)[0][1] == 1
    assert sum(rec["retries"] for rec in records) == sum(r.retries for r in results)
    assert sum(rec["fallback"] for rec in records) == kinds["fallback"]
    assert abs(sum(rec["cost_usd"] for rec in records) - sum(r.cost_usd for r in results)) < 1e-9
    # the server saw exactly one request per attempt, and one good answer per non-fallback result
    assert st["total"] == sum(r.retries + 1 for r in results)
    assert st["ok"] == kinds["ok"]
    faults = sum(st[k] for k in ("500", "503", "429", "hang", "malformed", "reset"))
    assert faults == st["total"] - st["ok"] and faults > 0.1 * n_calls     # the faults really happened
    print(f"{how}: {n_calls} calls, {kinds['fallback']} task fallbacks, {st['total']} requests, {faults} faults "
          f"({ {k: st[k] for k in ('500', '503', '429', 'hang', 'malformed', 'reset')} })")
    assert sum(r.retries for r in results) == faults - kinds["fallback"]  # each fault retried unless the last
    assert st["hang"] > 0 and st["reset"] > 0 and st["malformed"] > 0 and st["429"] > 0
    assert [t.in_flight for t in p.groups[0].targets] == [0]


def test_thousands_of_calls_all_layers_on(tmp_path, fake_server):
    "Breaker (cycling open / half-open / closed), fallback model and task fallback together, under faults."
    _, primary = fake_server("--seed", "3", "--retry-after", "0.01", "--hang-seconds", "1")
    _, secondary = fake_server("--seed", "4", "--retry-after", "0.01")
    control(primary, p500=0.15, p429=0.02, pmalformed=0.05, preset=0.05, phang=0.002)
    control(secondary, p500=0.08, preset=0.02)
    max_attempts = 3
    s = openai_settings(tmp_path, primary, **{
        "promptsys.mode": "service", "openai.read_timeout": 0.2, "retry.max_attempts": max_attempts,
        "breaker.failure_threshold": 3, "breaker.reset_timeout": 0.05, "breaker.window_seconds": 5,
        "model.fallbacks": "anthropic:claude-fake", "anthropic.base_url": secondary})
    moves = []
    for ep in (v1(primary), secondary):
        breaker_for(ep, s).on_transition.append(lambda ep, old, new, why: moves.append((ep, old, new)))
    records = []
    p = Pipeline("sentiment", 1, settings=s, sinks=[records.append])
    n = 1000
    results = asyncio.run(p.arun_batch([TEXTS[i % 6] + f" #{i}" for i in range(n)], concurrency=32, progress=False))
    assert len(results) == len(records) == n
    by = Counter()
    for r in results:
        assert r.error is None and r.output is not None
        assert r.retries <= 2 * (max_attempts - 1)                      # at most max_attempts per model
        if r.provider == "openai": assert not r.fallback; by["primary"] += 1
        elif r.provider == "anthropic":
            assert r.fallback and r.fallback_reason.startswith("openai:fake-model failed: "); by["fallback model"] += 1
        else:
            assert r.provider == "task" and r.fallback and r.output == FALLBACK and r.fallback_reason
            by["task fallback"] += 1
    # a primary failing ~27% of attempts opens a 3-failures-in-5-s breaker again and again (a success between
    # failures does not reset the count): the fallback model takes much of the load, the primary still serves
    assert by["primary"] > n / 10 and by["fallback model"] > 0
    sent = stats(primary)["total"] + stats(secondary)["total"]
    print(f"all layers on: {dict(by)}, {len(moves)} breaker transitions, {sent} requests")
    assert sum(r.retries for r in results) <= sent <= sum(r.retries for r in results) + 2 * n
    # the breaker really cycled, and only along the state machine's edges
    allowed = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN), (OPEN, CLOSED)}
    assert moves and set((a, b) for _, a, b in moves) <= allowed
    assert any(b == OPEN for ep, _, b in moves if ep == v1(primary))
    # recovery: faults stop, the reset timeout passes, the next calls close every breaker again
    for u in (primary, secondary): control(u, p500=0, p429=0, pmalformed=0, preset=0, phang=0)
    time.sleep(0.1)
    assert all(p.run(t).provider == "openai" for t in TEXTS)
    assert breaker_for(v1(primary), s).state == CLOSED


def test_retries_capped_and_non_retryable_not_retried(tmp_path, fake_server):
    "A dead-for-good endpoint gets exactly max_attempts requests per call; a 400-class error gets one."
    _, url = fake_server()
    control(url, p500=1.0)
    s = openai_settings(tmp_path, url, **{"retry.max_attempts": 4, "breaker.enabled": False})
    p = Pipeline("sentiment", 1, settings=s)
    with pytest.raises(ProviderError) as ei:
        p.run("great")
    assert ei.value.status == 500 and ei.value.attempts == 4
    assert stats(url)["total"] == 4
    control(url, p500=0.0, require_key="a-key-we-do-not-send", reset_stats=True)
    with pytest.raises(ProviderError) as ei:
        p.run("great")
    assert ei.value.status == 401 and not ei.value.retryable and ei.value.attempts == 1
    assert stats(url)["401"] == 1 and stats(url)["total"] == 1


# ---------------------------------------------------------------------------------------------------------
# Circuit breaker
# ---------------------------------------------------------------------------------------------------------

def test_breaker_opens_under_burst_and_closes_after_recovery(tmp_path, fake_server, caplog):
    _, url = fake_server()
    s = openai_settings(tmp_path, url, **{"retry.max_attempts": 2, "breaker.failure_threshold": 4,
                                          "breaker.reset_timeout": 0.5, "breaker.window_seconds": 30})
    p = Pipeline("sentiment", 1, settings=s)
    br = breaker_for(v1(url), s)
    seen = []
    br.on_transition.append(lambda ep, old, new, why: seen.append((ep, old, new)))
    caplog.set_level(logging.INFO, logger="promptsys.breaker")
    assert p.run("great").ok and br.state == CLOSED

    control(url, p500=1.0)
    errors = []
    for _ in range(6):
        with pytest.raises(ProviderError) as ei: p.run("great")
        errors.append(type(ei.value))
    # 2 calls x 2 attempts = 4 failures open it; every later call is refused without reaching the server
    assert errors[:2] == [ProviderError, ProviderError] and set(errors[2:]) == {CircuitOpen}
    assert br.state == OPEN and seen == [(v1(url), CLOSED, OPEN)]
    assert stats(url)["500"] == 4
    assert any("closed -> open" in r.getMessage() for r in caplog.records)

    # service mode answers with the task's fallback while the circuit is open
    ps = Pipeline("sentiment", 1, settings=s, mode="service")
    r = ps.run("great")
    assert r.fallback and r.output == FALLBACK and r.fallback_reason.startswith("CircuitOpen")

    control(url, p500=0.0)
    time.sleep(0.55)
    assert br.state == HALF_OPEN
    r = p.run("great")                     # the probe
    assert r.ok and r.label == "positive"
    assert br.state == CLOSED
    assert seen[1:] == [(v1(url), OPEN, HALF_OPEN), (v1(url), HALF_OPEN, CLOSED)]
    assert any("half_open -> closed" in r.getMessage() for r in caplog.records)
    assert all(p.run("great").ok for _ in range(5))


def test_breaker_probe_failure_reopens(tmp_path, fake_server):
    _, url = fake_server()
    control(url, p503=1.0)
    s = openai_settings(tmp_path, url, **{"retry.max_attempts": 1, "breaker.failure_threshold": 2,
                                          "breaker.reset_timeout": 0.3})
    p = Pipeline("sentiment", 1, settings=s)
    br = breaker_for(v1(url), s)
    for _ in range(2):
        with pytest.raises(ProviderError): p.run("great")
    assert br.state == OPEN
    time.sleep(0.35)
    with pytest.raises(ProviderError) as ei: p.run("great")      # probe fails ...
    assert not isinstance(ei.value, CircuitOpen)
    assert br.state == OPEN                                      # ... and the timer restarts
    with pytest.raises(CircuitOpen): p.run("great")


def test_breaker_opens_on_failures_with_successes_between_them(tmp_path, fake_server):
    """Issue 6: a success used to clear the failures, so 4 failures then a success, over and over (80 failures),
    never opened a breaker documented as "5 failures within window_seconds". Now the 5th failure in the window does."""
    _, url = fake_server()
    s = openai_settings(tmp_path, url, **{"retry.max_attempts": 1})          # the defaults: 5 failures in 30 s
    assert (s.breaker.failure_threshold, s.breaker.window_seconds, s.breaker.failure_rate) == (5, 30.0, 0.0)
    p = Pipeline("sentiment", 1, settings=s)
    br = breaker_for(v1(url), s)
    outcomes = []
    for _ in range(20):                                                      # 20 x (4 failures, 1 success) = 80
        control(url, p500=1.0)
        for _ in range(4):
            with pytest.raises(ProviderError) as ei: p.run("great")
            outcomes.append(type(ei.value).__name__)
        control(url, p500=0.0)
        try: outcomes.append("ok" if p.run("great").ok else "bad")
        except CircuitOpen: outcomes.append("CircuitOpen")
    assert outcomes[:6] == ["ProviderError"] * 4 + ["ok", "ProviderError"]   # the 5th failure opened it ...
    assert set(outcomes[6:]) == {"CircuitOpen"} and br.state == OPEN         # ... and the successes did not close it
    assert stats(url)["500"] == 5


def test_breaker_failure_rate_over_the_window(tmp_path, fake_server):
    "The rate verdict: 1 failure in 3 calls stays closed; 2 in 3 opens once the window holds min_calls calls."
    _, url = fake_server()
    rate = {"retry.max_attempts": 1, "breaker.failure_threshold": 0, "breaker.failure_rate": 0.5,
            "breaker.min_calls": 12, "breaker.shared": True}
    def drive(p, every:int, n:int) -> list[str]:
        out = []
        for i in range(n):
            control(url, p500=1.0 if i % 3 < every else 0.0)
            try: out.append("ok" if p.run("great").ok else "bad")
            except CircuitOpen: out.append("open")
            except ProviderError: out.append("fail")
        return out
    low = drive(Pipeline("sentiment", 1, settings=openai_settings(tmp_path / "a", url, **rate)), 1, 60)
    assert low.count("fail") == 20 and "open" not in low                    # 20 failures, a third of the calls
    high = drive(Pipeline("sentiment", 1, settings=openai_settings(tmp_path / "b", url, **rate)), 2, 30)
    # the rate is judged at each failure: the first one with >= 12 calls in the window is the 13th call (9 of 13)
    assert high[:13].count("fail") == 9 and high[13:] == ["open"] * 17


_CHILD = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from conftest import make_settings
from promptsys.pipeline import Pipeline
from promptsys.errors import CircuitOpen, ProviderError
from promptsys.breaker import breaker_for
cfg = json.loads(sys.argv[2])
s = make_settings(cfg["tmp"], **cfg["overrides"])
p = Pipeline("sentiment", 1, settings=s)
n = 0
while True:
    try: p.run("great")
    except CircuitOpen: break
    except ProviderError: n += 1
    if n > 50: sys.exit("breaker never opened")
print(json.dumps({"failures": n, "state": breaker_for(s.openai.base_url, s).state}))
"""

def test_breaker_state_shared_across_processes(tmp_path, fake_server):
    "A child process's failures open the breaker; the parent, on the same state_dir, sees it open."
    _, url = fake_server()
    overrides = {"model.provider": "openai", "openai.base_url": v1(url), **FAST, "retry.max_attempts": 1,
                 "breaker.failure_threshold": 3, "breaker.reset_timeout": 60, "breaker.shared": True}
    s = make_settings(tmp_path, **overrides)
    p = Pipeline("sentiment", 1, settings=s)
    assert p.run("great").ok                                  # the parent has seen the breaker closed
    control(url, p500=1.0)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), json.dumps({"tmp": str(tmp_path), "overrides": overrides})],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child == {"failures": 3, "state": OPEN}
    before = stats(url)["total"]
    time.sleep(0.15)                                          # past the parent's 0.1 s trust in its clean reading
    br = breaker_for(v1(url), s)
    assert br.state == OPEN
    with pytest.raises(CircuitOpen): p.run("great")
    assert stats(url)["total"] == before                      # refused without a request
    # not shared: a process-local breaker knows nothing of the child's failures
    s2 = make_settings(tmp_path, **{**overrides, "breaker.shared": False})
    control(url, p500=0.0)
    assert Pipeline("sentiment", 1, settings=s2).run("great").ok


# ---------------------------------------------------------------------------------------------------------
# Fallback chain and cascade
# ---------------------------------------------------------------------------------------------------------

def test_fallback_model_when_primary_dead(tmp_path, fake_server):
    _, url = fake_server()
    for primary in (dead_url(), None):
        if primary is None:                       # second round: the primary answers, but only 500s
            _, primary = fake_server(); control(primary, p500=1.0)
        s = make_settings(tmp_path / primary.rsplit(":", 1)[1], **{
            **FAST, "model.provider": "openai", "openai.base_url": v1(primary), "retry.max_attempts": 2,
            "model.fallbacks": "anthropic:claude-fake", "anthropic.base_url": url})
        for mode in ("strict", "service"):
            r = Pipeline("sentiment", 1, settings=s, mode=mode).run("I love it, great kettle")
            assert r.ok and r.label == "positive"
            assert r.fallback and r.provider == "anthropic" and r.model == "claude-fake"
            assert r.fallback_reason.startswith("openai:fake-model failed: ")
            assert ("connection failed" in r.fallback_reason) or ("HTTP 500" in r.fallback_reason)
            assert r.retries >= 1                 # the primary was retried before falling back


def test_everything_dead_service_fallback_strict_error(tmp_path):
    s = make_settings(tmp_path, **{**FAST, "model.provider": "openai", "openai.base_url": v1(dead_url()),
                                   "model.fallbacks": "anthropic:claude-fake", "anthropic.base_url": dead_url(),
                                   "retry.max_attempts": 2})
    records = []
    r = Pipeline("sentiment", 1, settings=s, mode="service", sinks=[records.append]).run("great")
    assert r.output == FALLBACK and r.fallback and r.provider == "task" and r.error is None
    assert "connection failed" in r.fallback_reason and r.retries == 2      # one retry per model
    assert records[-1]["fallback"] and records[-1]["fallback_reason"] == r.fallback_reason
    with pytest.raises(ProviderError) as ei:
        Pipeline("sentiment", 1, settings=s, mode="strict", sinks=[records.append]).run("great")
    assert isinstance(ei.value, PromptsysError) and ei.value.retryable and ei.value.hint
    assert records[-1]["success"] is False and records[-1]["error_type"] == "ProviderError"


def test_cascade_escalates_on_invalid_output(tmp_path, fake_server):
    _, cheap = fake_server("--answer-mode", "fixed", "--answer", "banana")
    _, smart = fake_server()
    s = make_settings(tmp_path, **{**FAST, "openai.base_url": v1(cheap), "anthropic.base_url": smart,
                                   "model.cascade": "openai:cheap-model, anthropic:smart-model",
                                   "prices.cheap-model": "0.001, 0.001", "prices.smart-model": "0.01, 0.01"})
    records = []
    p = Pipeline("sentiment", 1, settings=s, sinks=[records.append])
    r = p.run("awful, it broke")
    assert r.ok and r.label == "negative" and r.provider == "anthropic" and r.model == "smart-model"
    assert r.fallback and r.fallback_reason.startswith("openai:cheap-model failed: OutputValidationError")
    # both calls are paid for and counted: the same prompt twice, answers "banana" and "negative" (2 tokens each)
    assert stats(cheap)["ok"] == 1 and stats(smart)["ok"] == 1
    t = r.tokens_in // 2
    assert r.tokens_in == 2 * t and r.tokens_out == 4
    assert r.cost_usd == pytest.approx((t * 0.001 + 2 * 0.001 + t * 0.01 + 2 * 0.01) / 1000)
    assert records[-1]["cost_usd"] == r.cost_usd
    # the cheap model's valid answers are not escalated
    control(cheap, answer="positive")
    r = p.run("awful, it broke")
    assert r.provider == "openai" and not r.fallback and r.label == "positive"
    # without a cascade, an invalid answer is an OutputValidationError (strict) / the task fallback (service)
    s2 = make_settings(tmp_path, **{**FAST, "model.provider": "openai", "openai.base_url": v1(cheap)})
    control(cheap, answer="banana")
    with pytest.raises(OutputValidationError): Pipeline("sentiment", 1, settings=s2).run("great")
    r = Pipeline("sentiment", 1, settings=s2, mode="service").run("great")
    assert r.fallback and r.output == FALLBACK and r.fallback_reason.startswith("OutputValidationError")


# ---------------------------------------------------------------------------------------------------------
# Load balancing
# ---------------------------------------------------------------------------------------------------------

def test_load_balancing_survives_a_killed_endpoint(tmp_path, fake_server):
    servers = [fake_server() for _ in range(3)]
    urls = [u for _, u in servers]
    s = make_settings(tmp_path, **{**FAST, "model.provider": "openai", "openai.base_url": v1(urls[0]),
                                   "openai.endpoints": f"{v1(urls[1])}, {v1(urls[2])}", "openai.balance": "round_robin",
                                   "retry.max_attempts": 3, "breaker.failure_threshold": 2,
                                   "breaker.reset_timeout": 60})
    p = Pipeline("sentiment", 1, settings=s)
    assert len(p.groups[0].targets) == 3
    first = [p.run(TEXTS[i % 6]) for i in range(30)]
    counts = [stats(u)["total"] for u in urls]
    assert counts == [10, 10, 10]                           # round-robin, exactly
    fake_server.stop(servers[1][0])                         # kill the middle one mid-run
    rest = [p.run(TEXTS[i % 6]) for i in range(60)]
    assert all(r.ok and not r.fallback for r in first + rest)
    assert sum(r.retries for r in rest) == 2                 # two attempts hit the dead one, then its breaker opened
    assert breaker_for(v1(urls[1]), s).state == OPEN
    assert breaker_for(v1(urls[0]), s).state == CLOSED and breaker_for(v1(urls[2]), s).state == CLOSED
    after = [stats(u)["total"] for u in (urls[0], urls[2])]
    d0, d2 = after[0] - counts[0], after[1] - counts[2]
    assert d0 + d2 == 60 and abs(d0 - d2) <= 2               # the survivors share the load evenly
    assert Counter(r.endpoint for r in rest)[v1(urls[1])] == 0


def test_least_in_flight_prefers_idle_endpoint(tmp_path, fake_server):
    _, slow = fake_server("--delay-ms", "300")
    _, fast = fake_server()
    s = make_settings(tmp_path, **{**FAST, "model.provider": "openai", "openai.base_url": v1(slow),
                                   "openai.endpoints": v1(fast), "openai.balance": "least_in_flight"})
    p = Pipeline("sentiment", 1, settings=s)
    res = asyncio.run(p.arun_batch(TEXTS * 5, concurrency=6, progress=False))
    assert all(r.ok for r in res)
    n_slow, n_fast = stats(slow)["total"], stats(fast)["total"]
    assert n_slow + n_fast == 30 and n_fast > 2 * n_slow      # the slow one holds its calls: it gets few


# ---------------------------------------------------------------------------------------------------------
# Rate limiting
# ---------------------------------------------------------------------------------------------------------

def test_requests_per_minute_caps_throughput(tmp_path, fake_server):
    _, url = fake_server()
    rpm, n = 1200, 40                                      # 20/s with one second (20 calls) of burst
    s = openai_settings(tmp_path, url, **{"ratelimit.requests_per_minute": rpm})
    p = Pipeline("sentiment", 1, settings=s)
    t0 = time.monotonic()
    res = asyncio.run(p.arun_batch([TEXTS[i % 6] for i in range(n)], concurrency=8, progress=False))
    elapsed = time.monotonic() - t0
    assert all(r.ok for r in res) and len(res) == n
    assert elapsed >= (n - rpm / 60) / (rpm / 60) * 0.95     # lower bound only: (40 - 20 burst) / 20 per s = 1 s


def test_tokens_per_minute_caps_throughput(tmp_path, fake_server):
    _, url = fake_server()
    tpm, n = 12000, 10                                      # 200 tokens/s, one second of burst
    s = openai_settings(tmp_path, url, **{"ratelimit.tokens_per_minute": tpm})
    p = Pipeline("sentiment", 1, settings=s)
    prov = p.provider
    from promptsys.providers import Request
    need = sum(prov.estimate_request_tokens(Request([{"role": "user", "content": p.prompt.render(text=TEXTS[i % 6])}]))
               + p.max_tokens for i in range(n))               # what the limiter charges: prompt estimate + max answer
    t0 = time.monotonic()
    assert all(p.run(TEXTS[i % 6]).ok for i in range(n))
    assert need > tpm / 60 and time.monotonic() - t0 >= (need - tpm / 60) / (tpm / 60) * 0.95


def test_429_retry_after_holds_the_endpoint(tmp_path, fake_server):
    _, url = fake_server("--retry-after", "0.4")
    control(url, p429=1.0)
    s = openai_settings(tmp_path, url, **{"retry.max_attempts": 1, "breaker.enabled": True})
    p = Pipeline("sentiment", 1, settings=s)
    with pytest.raises(RateLimited) as ei: p.run("great")
    t_429 = time.monotonic()
    assert ei.value.retry_after == pytest.approx(0.4) and ei.value.status == 429
    control(url, p429=0.0)
    assert p.run("great").ok                               # waits for the endpoint's hold to pass
    assert time.monotonic() - t_429 >= 0.35
    assert breaker_for(v1(url), s).state == CLOSED          # a 429 is not an endpoint-health failure
    # with retries, the retry itself waits at least Retry-After
    control(url, p429=1.0, retry_after=0.3, reset_stats=True)
    s2 = openai_settings(tmp_path, url, **{"retry.max_attempts": 2})
    t0 = time.monotonic()
    with pytest.raises(RateLimited) as ei: Pipeline("sentiment", 1, settings=s2).run("great")
    assert ei.value.attempts == 2 and stats(url)["429"] == 2
    assert time.monotonic() - t0 >= 0.28


def test_deadline_bounds_attempts(tmp_path, fake_server):
    "With time left for ~5 attempts of a hanging endpoint, max_attempts=50 does not matter: the deadline stops it."
    _, url = fake_server("--hang-seconds", "2")
    control(url, phang=1.0)
    s = openai_settings(tmp_path, url, **{"retry.max_attempts": 50, "retry.deadline_seconds": 0.5,
                                          "openai.read_timeout": 0.1, "breaker.enabled": False})
    from promptsys.errors import ProviderTimeout
    with pytest.raises(ProviderTimeout) as ei: Pipeline("sentiment", 1, settings=s).run("great")
    assert 1 <= ei.value.attempts <= 6 and stats(url)["hang"] == ei.value.attempts


def test_arun_batch_in_two_event_loops(tmp_path, fake_server):
    "A notebook or a service may call asyncio.run(p.arun_batch(...)) more than once on one pipeline."
    _, url = fake_server()
    p = Pipeline("sentiment", 1, settings=openai_settings(tmp_path, url))
    for _ in range(2):
        res = asyncio.run(p.arun_batch(TEXTS, concurrency=4, progress=False))
        assert all(r.ok for r in res)
