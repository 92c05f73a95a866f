"""Budgets end to end: processes sharing one budget, per-task budgets, the alert hook, warn and downgrade.

The model is an OpenAI-compatible fake server (tests/fakeserver.py) priced through a [prices] override at
$1 per 1K tokens, so a call costs a few cents and a budget of a dollar or two lasts a few dozen calls.
The fake server reports usage as ~4 characters a token; promptsys's pre-call estimate (its script-aware
prompt estimate + the full max_tokens answer) stays above that for these short English reviews, so the
estimate is an upper bound of the real cost.
"""
from __future__ import annotations
import asyncio, json, logging, shutil, subprocess, sys, time
from pathlib import Path
import pytest

from conftest import ROOT, make_settings, stats
from promptsys.errors import BudgetExceeded
from promptsys.pipeline import Pipeline
from promptsys.cost import Budget
from promptsys.prompts import load_task

PRICED = {"model.provider": "openai", "openai.model": "fake-model", "openai.api_key_env": "",
          "prices.fake-model": "1.0, 1.0", "cache.enabled": False, "promptsys.records": "none",
          "retry.initial_wait": 0.001, "retry.max_wait": 0.01, "retry.jitter": 0.001}
TEXTS = ["I love this kettle", "terrible, it broke", "arrived on a Tuesday", "great value, excellent",
         "the lid is a bit stiff", "worst purchase ever"]

def v1(url): return url + "/v1"

def task_with_budget(tmp_path, **budget) -> Path:
    "A copy of the sentiment task whose task.toml has a [budget] table; returns its prompts_dir."
    d = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts" / "sentiment", d / "sentiment")
    with open(d / "sentiment" / "task.toml", "a") as f:
        f.write("\n[budget]\n" + "".join(f"{k} = {v}\n" for k, v in budget.items()))
    return d


_WORKER = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from conftest import make_settings
from promptsys.pipeline import Pipeline
from promptsys.errors import BudgetExceeded
cfg = json.loads(sys.argv[2])
s = make_settings(cfg["tmp"], **cfg["overrides"])
recs = []
p = Pipeline("sentiment", 1, settings=s, sinks=[recs.append])
from pathlib import Path
ready = Path(cfg["tmp"]) / "ready"; ready.mkdir(exist_ok=True)
(ready / str(cfg["worker"])).touch()
t_end = time.time() + 60
while len(list(ready.iterdir())) < 4 and time.time() < t_end: time.sleep(0.002)   # start together
i, scope = cfg["worker"], None
while True:
    try: p.run(cfg["texts"][i % len(cfg["texts"])] + f" ({i})")
    except BudgetExceeded as e:
        scope = e.details.get("scope"); break
    i += 4
print(json.dumps({"costs": [r["cost_usd"] for r in recs if r["success"]], "scope": scope,
                  "failed": [r["error_type"] for r in recs if not r["success"]]}))
"""

def test_four_processes_share_one_budget(tmp_path, fake_server):
    _, url = fake_server()
    limit = 2.0
    overrides = {**PRICED, "openai.base_url": v1(url), "budget.total_usd": limit, "promptsys.mode": "strict"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(ROOT),
                               json.dumps({"tmp": str(tmp_path), "overrides": overrides, "worker": w,
                                           "texts": TEXTS})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(4)]
    outs = []
    for pr in procs:
        out, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    costs = [c for o in outs for c in o["costs"]]
    assert all(o["scope"] == "global:total" and o["failed"] == ["BudgetExceeded"] for o in outs)
    assert sum(bool(o["costs"]) for o in outs) >= 2, "the processes really competed for the budget"
    total, biggest = sum(costs), max(costs)
    print(f"4 processes: calls {[len(o['costs']) for o in outs]}, spent ${total:.6f} of ${limit} (largest call ${biggest:.6f})")
    s = make_settings(tmp_path, **overrides)
    b = Budget.from_settings(s, load_task("sentiment", s.promptsys.prompts_dir))
    assert b.spent()["global:total"] == pytest.approx(total, abs=1e-6 * len(costs))   # the counters agree with the records
    assert b.held()["global:total"] == 0.0                                          # no reservation leaked
    assert total <= limit + biggest                       # the requirement: over by less than one call
    assert total <= limit + 1e-6                          # and here (estimate >= real cost) not over at all
    # the budget was used up, not refused early (slack: one estimate, plus estimate - real cost of the
    # reservations the other processes held at that moment)
    assert total >= limit - 4 * biggest
    assert stats(url)["ok"] == len(costs)


def test_task_budget_alert_fires_once_then_stop(tmp_path, fake_server, caplog):
    _, url = fake_server()
    prompts = task_with_budget(tmp_path, total_usd=0.4)
    s = make_settings(tmp_path, **{**PRICED, "openai.base_url": v1(url), "promptsys.prompts_dir": str(prompts),
                                   "budget.alert_at": 0.8})
    p = Pipeline("sentiment", 1, settings=s)
    assert set(p.budget.limits) == {"task:sentiment:total"}
    alerts = []
    p.budget.on_alert.append(lambda scope, spent, lim: alerts.append((scope, spent, lim)))
    caplog.set_level(logging.WARNING, logger="promptsys.cost")
    results = []
    with pytest.raises(BudgetExceeded) as ei:
        for i in range(100): results.append(p.run(TEXTS[i % 6]))
    assert ei.value.details["scope"] == "task:sentiment:total" and "task:sentiment:total" in str(ei.value)
    assert ei.value.hint                                   # tells the user what to do
    spent = sum(r.cost_usd for r in results)
    assert 0.4 - 0.06 < spent <= 0.4
    assert len(alerts) == 1
    scope, at, lim = alerts[0]
    assert scope == "task:sentiment:total" and lim == 0.4 and 0.8 * lim <= at < 0.8 * lim + 0.06
    assert sum("at 8" in r.getMessage() or "at 9" in r.getMessage() for r in caplog.records) == 1
    # another pipeline (another worker) on the same state: refused too, and no second alert
    p2 = Pipeline("sentiment", 1, settings=s)
    p2.budget.on_alert.append(lambda *a: alerts.append(a))
    with pytest.raises(BudgetExceeded): p2.run("great")
    assert len(alerts) == 1


def test_daily_budget_and_service_mode(tmp_path, fake_server):
    _, url = fake_server()
    s = make_settings(tmp_path, **{**PRICED, "openai.base_url": v1(url), "budget.daily_usd": 0.2})
    p = Pipeline("sentiment", 1, settings=s, mode="service")
    results = [p.run(TEXTS[i % 6]) for i in range(12)]
    paid = [r for r in results if not r.fallback]
    refused = [r for r in results if r.fallback]
    assert paid and refused and results.index(refused[0]) == len(paid)     # refused from the first refusal on
    assert all(r.ok and r.cost_usd > 0 for r in paid)
    # in service mode a refused call is answered with the task's fallback, saying why
    assert all(r.output == {"label": "neutral"} and r.cost_usd == 0 for r in refused)
    assert all(r.fallback_reason.startswith("BudgetExceeded: budget global:day") for r in refused)
    assert sum(r.cost_usd for r in paid) <= 0.2
    assert stats(url)["total"] == len(paid)                                # refused calls never reach the server


def test_warn_lets_calls_through(tmp_path, fake_server, caplog):
    _, url = fake_server()
    s = make_settings(tmp_path, **{**PRICED, "openai.base_url": v1(url), "budget.total_usd": 0.05,
                                   "budget.on_exceed": "warn"})
    p = Pipeline("sentiment", 1, settings=s)
    caplog.set_level(logging.WARNING, logger="promptsys.cost")
    results = [p.run(TEXTS[i % 6]) for i in range(5)]
    assert all(r.ok for r in results)
    spent = p.budget.spent()["global:total"]
    assert spent == pytest.approx(sum(r.cost_usd for r in results), abs=1e-5) and spent > 0.05
    assert any("on_exceed=warn" in r.getMessage() for r in caplog.records)


def test_downgrade_to_cheaper_model(tmp_path, fake_server, monkeypatch):
    _, url = fake_server()
    _, cheap = fake_server()
    monkeypatch.setenv("PROMPTSYS_TEST_ANTHROPIC_KEY", "test-anthropic-key")
    s = make_settings(tmp_path, **{**PRICED, "openai.base_url": v1(url), "budget.total_usd": 0.2,
                                   "budget.on_exceed": "downgrade", "budget.downgrade_to": "anthropic:cheap-model",
                                   "anthropic.base_url": cheap, "anthropic.api_key_env": "PROMPTSYS_TEST_ANTHROPIC_KEY",
                                   "prices.cheap-model": "0, 0"})
    p = Pipeline("sentiment", 1, settings=s)
    results = [p.run(TEXTS[i % 6]) for i in range(12)]
    assert all(r.ok for r in results)
    first = [r for r in results if r.provider == "openai"]
    down = [r for r in results if r.provider == "anthropic"]
    assert first and down and results.index(down[0]) == len(first)
    assert all(r.model == "cheap-model" and r.fallback and "downgrade" in r.fallback_reason for r in down)
    assert sum(r.cost_usd for r in results) <= 0.2
    assert stats(cheap)["ok"] == len(down)


def test_cancelled_call_releases_its_reservation(tmp_path, fake_server):
    "A call cancelled mid-flight (asyncio.wait_for timing out) must not keep its budget hold forever."
    _, url = fake_server("--delay-ms", "500")
    s = make_settings(tmp_path, **{**PRICED, "openai.base_url": v1(url), "budget.total_usd": 10})
    p = Pipeline("sentiment", 1, settings=s)
    async def go():
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(p.arun("great"), 0.1)
    asyncio.run(go())
    import gc; gc.collect()
    assert p.budget.held()["global:total"] == 0.0


def test_unpriced_model_is_refused_under_a_budget(tmp_path, fake_server, caplog):
    "Issue 6: an unknown model cost $0, so `daily_usd = 5` never stopped it. Now refused, typed, saying how to price it."
    _, url = fake_server()
    ov = {**PRICED, "openai.base_url": v1(url), "openai.model": "unlisted-model", "budget.daily_usd": 5}
    p = Pipeline("sentiment", 1, settings=make_settings(tmp_path, **ov))
    with pytest.raises(BudgetExceeded) as ei: p.run("great")
    e = ei.value
    assert type(e).__name__ == "PricingError" and "unlisted-model" in str(e)
    assert "[prices] <model> = " in e.hint                 # says how to price it
    assert stats(url)["total"] == 0                        # never called
    # priced by declaration (free): it goes through, under the same budget
    p2 = Pipeline("sentiment", 1, settings=make_settings(tmp_path, **{**ov, "prices.unlisted-model": "0, 0"}))
    assert p2.run("great").ok and stats(url)["ok"] == 1
    # an alias to a priced model prices it as that model
    p3 = Pipeline("sentiment", 1, settings=make_settings(tmp_path, **{**ov, "prices.unlisted-model": "fake-model"}))
    r = p3.run("terrible")
    assert r.ok and r.cost_usd == pytest.approx((r.tokens_in + r.tokens_out) / 1000)
    # without a budget nothing depends on the price: the call goes through at $0, with a warning
    caplog.set_level(logging.WARNING, logger="promptsys.cost")
    p4 = Pipeline("sentiment", 1, settings=make_settings(tmp_path, **{**ov, "budget.daily_usd": 0}))
    assert p4.run("great").cost_usd == 0 and any("no price for model" in m.getMessage() for m in caplog.records)


def test_newer_models_are_not_priced_as_their_prefix(tmp_path):
    "Issue 6: prefix matching priced claude-opus-4-5 as claude-opus-4 ($15/$75 per M instead of $5/$25)."
    from promptsys.cost import PriceTable
    pt = PriceTable.from_settings(make_settings(tmp_path))
    assert pt.cost("claude-opus-4-5", "anthropic", 10**6, 0) == pytest.approx(5.0)
    assert pt.cost("claude-opus-4", "anthropic", 10**6, 0) == pytest.approx(15.0)
    assert pt.price("gpt-4o-mini-2024-07-18", "openai") == pt.price("gpt-4o-mini", "openai")   # a listed snapshot
    assert pt.price("gpt-4o-mini-ft-mycompany", "openai") is None                          # not a loose prefix


_LEASE_WORKER = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from pathlib import Path
from promptsys.cost import Budget
cfg = json.loads(sys.argv[2])
b = Budget(Path(cfg["dir"]), {"global:total": cfg["limit"]})
ready = Path(cfg["dir"] + "-ready"); ready.mkdir(exist_ok=True); (ready / str(cfg["worker"])).touch()
t_end = time.time() + 60
while len(list(ready.iterdir())) < cfg["n"] and time.time() < t_end: time.sleep(0.002)   # start together
spent = n = 0
while True:
    try: r = b.reserve(0.003)
    except Exception: break
    time.sleep(0.001)                                # the call
    b.settle(r, 0.002 + 0.001 * (n % 2)); spent += 0.002 + 0.001 * (n % 2); n += 1
if cfg["die"]: import os; os._exit(0)          # dies holding its lease: never returned
print(json.dumps({"spent": spent, "calls": n}))
"""

def test_leases_keep_the_limit_across_processes_and_count_a_dead_ones_lease(tmp_path):
    "Budget leases: 3 processes spend one ledger in memory; the ledger never lets them pass the limit."
    limit, d = 0.5, tmp_path / "ledger"
    run = lambda w: subprocess.Popen([sys.executable, "-c", _LEASE_WORKER, str(ROOT),
                                      json.dumps({"dir": str(d), "limit": limit, "die": False, "worker": w, "n": 3})],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [run(w) for w in range(3)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    total = sum(o["spent"] for o in outs)
    assert all(o["calls"] > 0 for o in outs) and limit - 0.003 < total <= limit + 1e-9
    b = Budget(d, {"global:total": limit})
    assert b.spent()["global:total"] == pytest.approx(total) and b.held()["global:total"] == 0
    assert json.loads(b._c.get("leases")) == {}            # every lease went back at exit
    # a process that dies holding a lease: the next one to take a lease counts it as spent (conservative)
    d2 = tmp_path / "ledger2"
    b2 = Budget(d2, {"global:total": 1.0})
    p = subprocess.Popen([sys.executable, "-c", _LEASE_WORKER.replace("while True", "while n < 3"), str(ROOT),
                          json.dumps({"dir": str(d2), "limit": 1.0, "die": True, "worker": 0, "n": 1})])
    p.wait(timeout=60)
    held = b2.held()["global:total"]
    assert held > 0                                         # its lease, still held on the ledger
    b2.settle(b2.reserve(0.003), 0.003)
    assert b2.held()["global:total"] == 0 and b2.spent()["global:total"] == pytest.approx(held + 0.003)
