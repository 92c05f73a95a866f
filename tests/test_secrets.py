"""API keys come only from the environment and never appear in logs, records, errors, reprs or files.

A recognizable key is put in OPENAI_API_KEY / ANTHROPIC_API_KEY; calls succeed (the fake server requires
the key), fail with a wrong key (401: not retried, typed), and fail in every other way the fake server
can; then everything promptsys produced is searched for the key: every log record at DEBUG (promptsys,
httpx, httpcore), the per-call records (sinks, the JSONL file), exception messages / reprs / tracebacks,
the reprs of settings, providers, pipelines, breakers, budgets, a recorded replay cassette, and every file
under the test's state, cache and records directories.
"""
from __future__ import annotations
import asyncio, json, logging, traceback
from pathlib import Path
import pytest

from conftest import make_settings, control
from promptsys.errors import PromptsysError, ProviderError, redact
from promptsys.pipeline import Pipeline

KEY = "sk-test-SECRETKEY-9f8e7d6c5b4a3210"
ANTHROPIC_KEY = "sk-ant-SECRETKEY-0123456789abcdef"
WRONG = "sk-test-WRONGKEY-0000000000000000"


def all_files_text(*dirs) -> str:
    out = []
    for d in dirs:
        for f in Path(d).rglob("*"):
            if f.is_file(): out.append(f.read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


def test_keys_never_leak(tmp_path, fake_server, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
    _, url = fake_server("--require-key", KEY, "--hang-seconds", "1")
    _, wrong = fake_server("--require-key", WRONG)
    caplog.set_level(logging.DEBUG)                      # everything: promptsys, records, httpx, httpcore
    common = {"model.provider": "openai", "openai.model": "fake-model", "prices.fake-model": "0.01, 0.01",
              "retry.initial_wait": 0.001, "retry.max_wait": 0.01, "retry.jitter": 0.001,
              "openai.read_timeout": 0.2, "promptsys.records": "jsonl", "budget.total_usd": 100,
              "anthropic.base_url": url, "model.fallbacks": "anthropic:claude-fake"}
    records, texts, errors = [], [], []
    s = make_settings(tmp_path, **common, **{"openai.base_url": url + "/v1"})
    p = Pipeline("sentiment", 1, settings=s, sinks=[records.append])

    # successes (the server checks the key), with the cache on: answers get stored
    for t in ("I love it", "terrible", "it is a kettle"): assert p.run(t).ok
    assert p.run("I love it").cache_hit
    # every fault the server can inject, through retries, the breaker and the fallback chain (service mode)
    control(url, p500=0.2, p503=0.1, p429=0.1, phang=0.05, pmalformed=0.1, preset=0.1, retry_after=0.01)
    sl = make_settings(tmp_path, **{**common, "openai.base_url": url + "/v1", "promptsys.records": "log"})
    ps = Pipeline("sentiment", 1, settings=sl, mode="service", sinks=[records.append], cache=False)
    res = asyncio.run(ps.arun_batch([f"great value #{i}" for i in range(60)], concurrency=8, progress=False))
    assert all(r.error is None for r in res)
    texts += [repr(r) for r in res]
    control(url, p500=1.0, p503=0, p429=0, phang=0, pmalformed=0, preset=0)
    for mode in ("strict",):
        try: Pipeline("sentiment", 1, settings=s, mode=mode, cache=False, sinks=[records.append]).run("great")
        except PromptsysError as e: errors.append(e)
    control(url, p500=0.0)

    # a wrong key: 401, not retried, typed; the message and hint say what to do without the key
    sw = make_settings(tmp_path / "wrong", **{**common, "model.fallbacks": "", "openai.base_url": wrong + "/v1"})
    pw = Pipeline("sentiment", 1, settings=sw, sinks=[records.append])
    with pytest.raises(ProviderError) as ei: pw.run("great")
    e = ei.value
    assert e.status == 401 and not e.retryable and e.attempts == 1 and "API key" in e.hint
    errors.append(e)
    # the anthropic provider with a wrong key too
    monkeypatch.setenv("ANTHROPIC_API_KEY", WRONG)
    sa = make_settings(tmp_path / "anth", **{**common, "model.provider": "anthropic", "model.fallbacks": ""})
    with pytest.raises(ProviderError) as ei: Pipeline("sentiment", 1, settings=sa).run("great")
    assert ei.value.status == 401
    errors.append(ei.value)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)

    # a replay cassette recorded through the real (fake) server
    sr = make_settings(tmp_path, **{**common, "model.provider": "replay", "replay.mode": "record",
                                    "replay.inner": "openai", "openai.base_url": url + "/v1", "model.fallbacks": ""})
    pr = Pipeline("sentiment", 1, settings=sr, cache=False)
    assert pr.run("I love it").ok
    cassette = Path(sr.replay.cassette)
    assert cassette.is_file()

    # a key that shows up inside an error text is redacted by the error itself
    leaky = ProviderError(f"upstream said: bad key {KEY}", f"hint with {KEY}")
    errors.append(leaky)
    assert redact(f"x{KEY}y") == "x***y"

    for e in errors:
        texts += [str(e), repr(e), e.message, e.hint or "", json.dumps(e.to_dict()),
                  "".join(traceback.format_exception(e))]
    for obj in (s, sl, sw, sa, sr, p, ps, pw, pr, p.provider, pw.provider, p.budget, p.retry, p.groups,
                *(t for g in p.groups for t in g.targets), *(t.breaker for g in p.groups for t in g.targets)):
        texts.append(repr(obj))
    texts.append(json.dumps(s.as_dict(), default=str))
    texts += [json.dumps(r) for r in records]
    texts += [r.getMessage() + repr(r.args) + (r.exc_text or "") for r in caplog.records]
    texts.append(caplog.text)
    texts.append(all_files_text(tmp_path))                 # state (breakers, budget, records.jsonl), cache, cassette
    assert len(records) >= 60 and Path(s.promptsys.records_path).is_file()
    assert any(r.name == "promptsys.records" for r in caplog.records)     # the records did go to the log
    blob = "\n".join(texts)
    for secret in (KEY, ANTHROPIC_KEY, WRONG, KEY[8:24]):
        assert secret not in blob
    # and the test did see what it searched: the server's answers, the 401, the records
    assert "HTTP 401" in blob and "fake-model" in blob and "Bearer" not in blob
