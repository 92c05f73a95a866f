"""API keys come only from the environment and never appear in logs, records, errors, reprs or files.

A recognizable key is put in OPENAI_API_KEY / ANTHROPIC_API_KEY; calls succeed (the fake server requires
the key), fail with a wrong key (401: not retried, typed), and fail in every other way the fake server
can; then everything promptsys produced is searched for the key: every log record at DEBUG (promptsys,
httpx, httpcore), the per-call records (sinks, the JSONL file), exception messages / reprs / tracebacks,
the reprs of settings, providers, pipelines, breakers, budgets, a recorded replay cassette, and every file
under the test's state, cache and records directories.

Three more roads, in two more tests: a server's error body that quotes the key right where it is cut to 300
characters (no prefix of the key may survive); a model that answers with the API key and the base URL's
password in its text, with `user:password@` in the base URL (the answer is scrubbed before it is cached,
recorded in a cassette, written to records and the metrics store, or printed by `promptsys run --json`; the
endpoint every consumer sees — records, metrics rows, breaker keys — is the redacted URL, and the calls still
authenticate: the fake server requires those credentials).
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


# --- secrets that arrive by other roads: an answer quoting the key, a base URL with credentials, a body cut
PW = "url-PASSWORD-77c1e5"


class _QuotingServer:
    "An in-process HTTP server that refuses every request with a 400 whose body quotes `key` across char 300."
    def __init__(self, key:str):
        import http.server, threading
        body = json.dumps({"error": {"message": "x" * 250 + f" bad key {key} (check it)"}}).encode()

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            def log_message(self, *a): pass
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(400); self.send_header("Content-Length", str(len(body))); self.end_headers()
                self.wfile.write(body)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
    def close(self): self.server.shutdown(); self.server.server_close()


def test_an_error_body_cut_across_the_key_leaks_no_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    srv = _QuotingServer(KEY)
    try:
        s = make_settings(tmp_path, **{"model.provider": "openai", "openai.base_url": srv.url + "/v1",
                                       "openai.model": "fake-model", "model.fallbacks": ""})
        with pytest.raises(ProviderError) as ei: Pipeline("sentiment", 1, settings=s, cache=False).run("great")
    finally: srv.close()
    e = ei.value
    assert e.status == 400 and "HTTP 400" in str(e) and "bad key" in str(e)      # the body is quoted...
    for text in (str(e), repr(e), json.dumps(e.to_dict()), "".join(traceback.format_exception(e))):
        assert KEY[:10] not in text and "sk-test-SE" not in text               # ...but not a prefix of the key


def _ini(path:Path, tmp:Path, url:str) -> Path:
    "A settings file for `promptsys run` with every store under `tmp`."
    root = Path(__file__).resolve().parents[1]
    path.write_text(f"""[promptsys]
prompts_dir = {root / 'prompts'}
state_dir = {tmp / 'cli-state'}
records = jsonl
records_path = {tmp / 'cli-state' / 'records.jsonl'}
[model]
provider = openai
[openai]
base_url = {url}
model = fake-model
[cache]
dir = {tmp / 'cli-cache'}
[monitor]
enabled = true
db_path = {tmp / 'cli-metrics.db'}
[mlflow]
tracking_uri = sqlite:///{tmp}/cli-mlflow.db
""")
    return path


def test_keys_in_answers_and_url_credentials_are_scrubbed_everywhere(tmp_path, fake_server, monkeypatch):
    """A model answers with the API key and the base URL's password in its text; the base URL carries
    `user:password@`. The server requires those credentials (HTTP basic auth), so calls that succeed prove the
    requests still authenticate; nothing promptsys stores or prints may hold the key or the password."""
    import sqlite3, subprocess, sys
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    answer = f"positive. By the way, your key is {KEY} and the gateway password is {PW}."
    _, url = fake_server("--require-basic", f"team:{PW}", "--answer-mode", "fixed", "--answer", answer)
    base = url.replace("http://", f"http://team:{PW}@") + "/v1"
    endpoint = url.replace("http://", "http://***@") + "/v1"
    records = []
    common = {"model.provider": "openai", "openai.base_url": base, "openai.model": "fake-model",
              "promptsys.records": "jsonl", "monitor.enabled": True, "model.fallbacks": ""}
    s = make_settings(tmp_path, **common)
    p = Pipeline("sentiment", 1, settings=s, sinks=[records.append])
    results = [p.run("I love it"), p.run("I love it"), asyncio.run(p.arun("great value"))]
    assert [r.ok for r in results] == [True] * 3 and results[1].cache_hit
    assert all(r.label == "positive" and "***" in r.raw for r in results)             # the answer, scrubbed
    # a cassette recorded through the same server
    sr = make_settings(tmp_path, **{**common, "model.provider": "replay", "replay.mode": "record",
                                    "replay.inner": "openai"})
    assert Pipeline("sentiment", 1, settings=sr, cache=False).run("it is a kettle").ok
    cassette = Path(sr.replay.cassette).read_text()
    assert "***" in cassette
    # `promptsys run --json` in its own process (it reads the key from the environment like a service)
    ini = _ini(tmp_path / "cli.ini", tmp_path, base)
    out = subprocess.run([sys.executable, "-m", "promptsys.cli", "--settings", str(ini), "run", "sentiment",
                          "I love it", "--json"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["output"] == {"label": "positive"} and printed["endpoint"] == endpoint and "***" in printed["raw"]
    # the metrics store's rows (both processes' databases)
    from promptsys.metrics import metrics_store
    metrics_store(s).flush()
    rows = []
    for db in (Path(s.monitor.db_path), tmp_path / "cli-metrics.db"):
        with sqlite3.connect(db) as c:
            rows += [json.dumps(r) for r in c.execute("SELECT * FROM calls")]
    assert rows and all(endpoint in r for r in rows)
    ini.unlink()                                      # the user's own settings file is not something promptsys wrote
    breakers = [t.breaker for g in p.groups for t in g.targets]
    assert [b.endpoint for b in breakers] == [endpoint]
    assert {r["endpoint"] for r in records} == {endpoint} and p.provider.endpoint == endpoint

    blob = "\n".join([*(repr(r) + r.raw + json.dumps(r.to_record()) for r in results), json.dumps(records),
                      out.stdout, out.stderr, cassette, *rows, *(repr(b) for b in breakers), repr(p.provider),
                      all_files_text(tmp_path)])        # caches, cassette, records.jsonl, metrics dbs, breaker state
    for secret in (KEY, PW, KEY[:12], f"team:{PW}"):
        assert secret not in blob
    assert "fake-model" in blob and endpoint in blob
