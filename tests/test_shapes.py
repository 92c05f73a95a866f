"""Issue 13 (first part): chat prompts and tasks with several typed inputs, end to end.

A toy task "route" takes three inputs — `subject`, `body` and an optional enum `tier` — and answers a label. v1 is
a plain text prompt that ends every ticket with a glowing review (so the keyword model always says "positive":
right on 4 of 12); v2 is a chat prompt (`v2_chat.toml`: a system message, one few-shot turn, then the ticket)
that reads the body (12 of 12). The model is the fake OpenAI-compatible server process (and its Anthropic
endpoint), which records every request body, so the tests assert the exact payload each provider is sent; one
test runs the chat prompt on the embedded model (greedy, through the GGUF's own chat template)."""
from __future__ import annotations
import json, os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from promptsys.config import load_settings
from promptsys.errors import InputValidationError, ConfigError
from promptsys.pipeline import Pipeline
from promptsys.prompts import load_task
from promptsys import evaluation as pe, promotion as pp, registry
from tests.fakeserver import start_server, stop_server, requests, control
from tests.test_promote import TEXTS

SYSTEM = "You route customer reviews. Answer with one word: positive, negative or neutral."


def route_task(prompts: Path):
    d = prompts / "route"; (d / "data").mkdir(parents=True)
    (d / "task.toml").write_text(
        'name = "route"\ndescription = "Toy task with three inputs."\n'
        '[inputs.subject]\nmax_chars = 100\n[inputs.body]\nmax_chars = 2000\ncontrol_chars = "reject"\n'
        '[inputs.tier]\ntype = "enum"\nvalues = ["free", "pro", "enterprise"]\nrequired = false\ndefault = "free"\n'
        '[output]\nkind = "label"\nlabels = ["positive", "negative", "neutral"]\n[dataset]\npath = "data/d.jsonl"\n'
        '[versions]\n1 = "Plain text; ends on a glowing review."\n2 = "Chat: system, one few-shot turn, the ticket."\n')
    (d / "v1_plain.txt").write_text("Subject: {{subject}} ({{tier}})\nReview: {{body}}\nReview: I love it.\nSentiment:")
    (d / "v2_chat.toml").write_text(
        f'[[messages]]\nrole = "system"\ncontent = "{SYSTEM}"\n\n'
        '[[messages]]\nrole = "user"\ncontent = """Subject: Kettle\nReview: It broke."""\n\n'
        '[[messages]]\nrole = "assistant"\ncontent = "negative"\n\n'
        '[[messages]]\nrole = "user"\ncontent = """Subject: {{subject}} ({{tier}} customer)\nReview: {{body}}"""\n')
    rows = [dict(id=f"{l[:3]}{i}", subject=f"Order {i}", body=x, **({"tier": "pro"} if i % 2 else {}), label=l)
            for l, xs in TEXTS.items() for i, x in enumerate(xs)]
    (d / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    route_task(tmp / "prompts")
    proc, url = start_server("--delay-ms", "0")
    ov = {"promptsys.prompts_dir": str(tmp / "prompts"), "promptsys.state_dir": str(tmp / "state"),
          "promptsys.records": "none", "cache.enabled": "false", "cache.dir": str(tmp / "cache"),
          "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "mlflow.experiment_prefix": "t",
          "model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
          "openai.model": "gpt-4o-mini", "breaker.shared": "false", "retry.max_attempts": "1",
          "eval.runs_dir": str(tmp / "runs"), "gate.max_p95_latency_increase": "100", "gate.max_cost_increase": "1"}
    try: yield dict(tmp=tmp, url=url, ov=ov, s=load_settings(ROOT / "settings.ini", overrides=ov, env={}))
    finally: stop_server(proc)


def test_the_task_declares_three_typed_inputs_and_a_chat_version(env):
    t = load_task("route", env["tmp"] / "prompts")
    assert list(t.inputs) == ["subject", "body", "tier"]
    assert (t.inputs["tier"].type, t.inputs["tier"].required, t.inputs["tier"].default) == ("enum", False, "free")
    v2 = t.version(2)
    assert v2.is_chat and [r for r, _ in v2.messages] == ["system", "user", "assistant", "user"]
    assert set(v2.variables) == {"subject", "tier", "body"} and not t.version(1).is_chat


def test_openai_gets_the_chat_messages(env):
    pipe = Pipeline("route", 2, settings=env["s"])
    r = pipe.run(subject="Blender", body="Excellent work, love it", tier="enterprise")
    assert r.ok and r.output == {"label": "positive"}
    sent = requests(env["url"])[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Subject: Kettle\nReview: It broke."},
        {"role": "assistant", "content": "negative"},
        {"role": "user", "content": "Subject: Blender (enterprise customer)\nReview: Excellent work, love it"}]
    # the same call as a dict, and the optional input's default
    r2 = pipe.run({"subject": "Blender", "body": "It broke"})
    assert r2.output == {"label": "negative"}
    last = requests(env["url"])[-1]["body"]["messages"][-1]["content"]
    assert last == "Subject: Blender (free customer)\nReview: It broke"


def test_anthropic_gets_system_apart_from_the_messages(env):
    os.environ["PROMPTSYS_TEST_ANTHROPIC_KEY"] = "sk-ant-test-not-real"
    s = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "model.provider": "anthropic",
                      "anthropic.base_url": env["url"], "anthropic.api_key_env": "PROMPTSYS_TEST_ANTHROPIC_KEY"},
                      env={})
    r = Pipeline("route", 2, settings=s).run(subject="Mug", body="Terrible smell")
    assert r.ok and r.output == {"label": "negative"} and r.provider == "anthropic"
    sent = requests(env["url"])[-1]
    assert sent["path"] == "/v1/messages" and sent["body"]["system"] == SYSTEM
    assert [m["role"] for m in sent["body"]["messages"]] == ["user", "assistant", "user"]
    assert "sk-ant" not in json.dumps(sent)          # the key travels in a header, and headers are never kept


def test_openai_token_limit_field_per_model(env):
    "Reasoning models (o-series, gpt-5) get `max_completion_tokens` and no sampling settings; others `max_tokens`."
    def sent_for(model, **ov):
        s = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "openai.model": model, **ov}, env={})
        pipe = Pipeline("route", 1, settings=s)
        assert pipe.run(subject="Mug", body="Terrible smell").ok
        body = requests(env["url"])[-1]["body"]
        return {k: v for k, v in body.items() if k != "messages"}, pipe.max_tokens
    got, n = sent_for("gpt-4o-mini")
    assert got == {"model": "gpt-4o-mini", "max_tokens": n, "temperature": 0.0, "seed": 0, "top_p": 1}
    for model in ("o3-mini", "o1", "o4-mini", "gpt-5", "gpt-5-mini"):
        got, n = sent_for(model)
        assert got == {"model": model, "max_completion_tokens": n, "seed": 0}, model
    got, n = sent_for("o3-mini", **{"openai.max_tokens_param": "max_tokens"})      # a server that wants max_tokens
    assert got == {"model": "o3-mini", "max_tokens": n, "temperature": 0.0, "seed": 0, "top_p": 1}
    got, n = sent_for("gpt-4o-mini", **{"openai.max_tokens_param": "max_completion_tokens"})
    assert got == {"model": "gpt-4o-mini", "max_completion_tokens": n, "temperature": 0.0, "seed": 0, "top_p": 1}


def test_base_urls_from_the_environment_when_settings_keep_the_default(env, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", env["url"] + "/v1")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", env["url"])
    monkeypatch.setenv("PROMPTSYS_TEST_ANTHROPIC_KEY", "sk-ant-test-not-real")
    default = {**env["ov"], "openai.base_url": "https://api.openai.com/v1",
               "anthropic.base_url": "https://api.anthropic.com",
               "anthropic.api_key_env": "PROMPTSYS_TEST_ANTHROPIC_KEY"}
    for provider, path in (("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages")):
        s = load_settings(ROOT / "settings.ini", overrides={**default, "model.provider": provider}, env={})
        before = len(requests(env["url"]))
        r = Pipeline("route", 1, settings=s).run(subject="Mug", body="Terrible smell")
        assert r.ok and r.provider == provider, r.error
        assert r.endpoint == (env["url"] + "/v1" if provider == "openai" else env["url"])
        assert requests(env["url"])[-1]["path"] == path and len(requests(env["url"])) >= min(before + 1, 100)
    # a base_url written in the settings wins over the environment
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    s = load_settings(ROOT / "settings.ini", overrides={**env["ov"]}, env={})
    assert Pipeline("route", 1, settings=s).run(subject="Mug", body="Terrible smell").endpoint == env["url"] + "/v1"


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"version": 1, "entries": []}', b'{"entries": {"k": "v"}}',
                                     b'{"entries": {"k": {"response": {"words": "positive"}}}}',
                                     b"\x89PNG\r\n\x1a\n\x00\xff\xfe", b"\xff\xfe{}"])
def test_a_cassette_of_the_wrong_shape_is_a_config_error_not_a_traceback(env, tmp_path, content):
    cassette = tmp_path / "bad.json"
    cassette.write_bytes(content)
    sets = [f"{k}={v}" for k, v in {**env["ov"], "model.provider": "replay", "replay.cassette": str(cassette)}.items()]
    out = subprocess.run([sys.executable, "-m", "promptsys.cli", *[a for kv in sets for a in ("--set", kv)],
                          "run", "route", "--var", "subject=Mug", "--var", "body=Terrible smell"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"cassette {cassette}" in out.stderr and "record again" in out.stderr, out.stderr
    with pytest.raises(ConfigError):
        Pipeline("route", 1, settings=load_settings(ROOT / "settings.ini", env={}, overrides={
            **env["ov"], "model.provider": "replay", "replay.cassette": str(cassette)})).run(subject="a", body="b")


def test_bad_inputs_name_the_variable(env):
    pipe = Pipeline("route", 2, settings=env["s"])
    for kw, msg in [(dict(subject="a"), "missing input 'body'"),
                    (dict(subject="a", body="b", colour="red"), "unknown input(s) 'colour'"),
                    (dict(subject="a", body="b", tier="gold"), "input 'tier': 'gold' is not one of free, pro"),
                    (dict(subject="a", body="b\x1b"), "input 'body': input contains control character U+001B"),
                    (dict(subject="x" * 101, body="b"), "input 'subject': input is too long")]:
        with pytest.raises(InputValidationError, match=re.escape(msg)):
            pipe.run(**kw)
    with pytest.raises(InputValidationError, match="missing input 'body'"):
        pipe.run("only a subject")                       # a bare text fills the first input


def test_eval_gate_and_promote_the_chat_version(env):
    s = env["s"]
    df = pe.evaluate("route", settings=s, progress=False)
    acc = dict(df.accuracy)
    assert acc == {1: pytest.approx(4 / 12), 2: 1.0}
    pp.promote("route", 1, settings=s, force=True, user="test")
    pr = pp.promote("route", settings=s, user="test", reason="the chat prompt reads the ticket")
    assert pr.moved and pr.decision.candidate == 2, str(pr)
    import mlflow.genai
    rv = registry.current_alias(registry.mlflow_client(s), load_task("route", s.promptsys.prompts_dir), "production", s)
    loaded = mlflow.genai.load_prompt(f"prompts:/{registry.prompt_name('route', s)}@production")
    assert not loaded.is_text_prompt and loaded.template[0] == {"role": "system", "content": SYSTEM}
    assert loaded.response_format["properties"]["label"]["enum"] == ["positive", "negative", "neutral"]
    assert (loaded.model_config["provider"], loaded.model_config["model_name"]) == ("openai", "gpt-4o-mini")
    assert int(rv.tags["version"]) == 2
    live = Pipeline("route", "production", settings=s)
    assert live.run(subject="Lid", body="Perfect fit").output == {"label": "positive"} and live.prompt.number == 2


def test_cli_takes_vars_and_json_inputs(env):
    sets = [x for k, v in env["ov"].items() for x in ("--set", f"{k}={v}")]
    def run(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "promptsys.cli", *sets, "run", "route", "--version", "2", *args],
                              capture_output=True, text=True, input=stdin, cwd=env["tmp"], timeout=120)
    out = run("--var", "subject=Pan", "--var", "body=It broke")
    assert out.returncode == 0 and json.loads(out.stdout) == {"label": "negative"}, out.stderr
    out = run("--input", "-", stdin=json.dumps({"subject": "Pan", "body": "Great value", "tier": "pro"}))
    assert out.returncode == 0 and json.loads(out.stdout) == {"label": "positive"}, out.stderr
    out = run("--var", "subject=Pan")
    assert out.returncode != 0 and "missing input 'body'" in out.stderr


def test_a_chat_prompt_on_the_embedded_model(env, tmp_path):
    "The chat version through llama.cpp with the GGUF's chat template, greedy and grammar-constrained."
    s = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "model.provider": "local",
                                                        "local.decoding": "grammar"}, env={})
    pipe = Pipeline("route", 2, settings=s)
    a = pipe.run(subject="Toaster", body="Terrible, it broke after a day and I want a refund.")
    b = pipe.run(subject="Toaster", body="Terrible, it broke after a day and I want a refund.")
    assert a.ok and a.output["label"] in ("positive", "negative", "neutral") and a.output == b.output
    plain = Pipeline("route", 1, settings=s).run(subject="Toaster", body="Terrible, it broke after a day.")
    assert a.tokens_in > plain.tokens_in          # system and few-shot turns went through the chat template


# ---------------------------------------------------------------- output kinds: JSON Schema objects and free text

ORDER_SCHEMA = {"type": "object", "required": ["order_id", "items", "action", "date"], "additionalProperties": False,
                "properties": {"order_id": {"type": "string", "pattern": "^A-[0-9]{5}$"},
                               "items": {"type": "array", "minItems": 1, "items": {
                                   "type": "object", "required": ["name", "qty"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"},
                                                  "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}},
                               "action": {"enum": ["refund", "replace", "track"]},
                               "date": {"type": ["string", "null"]}}}


def orders_task(prompts: Path):
    "An extraction task: an e-mail in, a nested object out. The fake server's echo mode answers what follows 'Echo:'."
    d = prompts / "orders"; (d / "data").mkdir(parents=True)
    (d / "schema.json").write_text(json.dumps(ORDER_SCHEMA, indent=1))
    (d / "task.toml").write_text('name = "orders"\n[inputs.email]\nmax_chars = 4000\n'
                                 '[output]\nkind = "json"\nfield = "action"\nschema_file = "schema.json"\n'
                                 '[dataset]\npath = "data/d.jsonl"\n[versions]\n1 = "Extract the order."\n')
    (d / "v1_extract.toml").write_text('[[messages]]\nrole = "system"\ncontent = "Extract the order as JSON."\n'
                                       '[[messages]]\nrole = "user"\ncontent = """{{email}}"""\n')
    good = lambda i, action: {"order_id": f"A-{i:05d}", "items": [{"name": "mug", "qty": i}], "action": action,
                              "date": None}
    rows = []
    for i in range(1, 7):
        exp = good(i, "refund")
        answer = dict(exp)
        if i in (2, 3): answer["action"] = "track"                  # wrong field: action
        if i == 4: answer["items"] = [{"name": "mug", "qty": 5}]   # wrong field: items
        if i == 5: answer["order_id"] = "12345"                      # breaks the schema's pattern: invalid
        rows.append(dict(id=f"o{i}", email=f"Hi, order A-{i:05d}, please refund. Echo: {json.dumps(answer)}",
                         expected=exp))
    (d / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    orders_task(tmp / "prompts")
    proc, url = start_server("--delay-ms", "0", "--answer-mode", "echo")
    ov = {"promptsys.prompts_dir": str(tmp / "prompts"), "promptsys.state_dir": str(tmp / "state"),
          "promptsys.records": "none", "cache.enabled": "false", "cache.dir": str(tmp / "cache"),
          "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "mlflow.experiment_prefix": "t",
          "model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
          "breaker.shared": "false", "retry.max_attempts": "1", "eval.runs_dir": str(tmp / "runs")}
    try: yield dict(tmp=tmp, url=url, ov=ov, s=load_settings(ROOT / "settings.ini", overrides=ov, env={}))
    finally: stop_server(proc)


def test_structured_output_payload_of_each_provider(kinds):
    email = 'Order A-00042. Echo: {"order_id": "A-00042", "items": [{"name": "lid", "qty": 2}], "action": "track", "date": null}'
    for constrain, want in [("json_schema", {"type": "json_schema", "json_schema": {"name": "output", "strict": True,
                                                                                   "schema": ORDER_SCHEMA}}),
                            ("grammar", {"type": "json_object", "schema": ORDER_SCHEMA})]:
        s = load_settings(ROOT / "settings.ini", overrides={**kinds["ov"], "openai.constrain": constrain}, env={})
        r = Pipeline("orders", 1, settings=s).run(email=email)
        assert r.ok and r.output["items"] == [{"name": "lid", "qty": 2}]
        assert requests(kinds["url"])[-1]["body"]["response_format"] == want
    os.environ["PROMPTSYS_TEST_ANTHROPIC_KEY"] = "sk-ant-test-not-real"
    s = load_settings(ROOT / "settings.ini", overrides={**kinds["ov"], "model.provider": "anthropic",
                      "anthropic.base_url": kinds["url"], "anthropic.api_key_env": "PROMPTSYS_TEST_ANTHROPIC_KEY",
                      "anthropic.constrain": "tool"}, env={})
    r = Pipeline("orders", 1, settings=s).run(email=email)
    body = requests(kinds["url"])[-1]["body"]
    assert body["tools"] == [{"name": "answer", "description": "Give the answer.", "input_schema": ORDER_SCHEMA}]
    assert body["tool_choice"] == {"type": "tool", "name": "answer"} and body["system"] == "Extract the order as JSON."
    assert r.ok and r.output["action"] == "track"       # the fake server answers in text: parsed all the same


def test_schema_errors_name_the_field_path(kinds):
    bad = 'Echo: {"order_id": "A-00001", "items": [{"name": "mug", "qty": 0}], "action": "refund", "date": null}'
    s = load_settings(ROOT / "settings.ini", overrides={**kinds["ov"], "promptsys.mode": "strict"}, env={})
    with pytest.raises(Exception, match=re.escape("items[0].qty: 0 is less than the minimum of 1")):
        Pipeline("orders", 1, settings=s).run(email=bad)


def test_eval_scores_each_field(kinds):
    df = pe.evaluate("orders", settings=kinds["s"], progress=False)
    m = df.loc[1]
    # rows 1 and 6 are right; 2 and 3 get the action wrong, 4 the items, 5 is invalid (every field counts wrong)
    assert m.accuracy == pytest.approx(2 / 6) and m.format_validity == pytest.approx(5 / 6)
    got = registry.mlflow_client(kinds["s"]).get_run(m.run_id).data.metrics        # logged to the MLflow run
    assert got["field_accuracy_action"] == pytest.approx(3 / 6) and got["field_accuracy_items"] == pytest.approx(4 / 6)
    assert got["field_accuracy_order_id"] == pytest.approx(5 / 6) and got["field_accuracy_date"] == pytest.approx(5 / 6)


def test_a_dataset_row_that_breaks_the_schema_names_the_line(kinds):
    t = load_task("orders", kinds["s"].promptsys.prompts_dir)
    f = kinds["tmp"] / "bad.jsonl"
    f.write_text(json.dumps({"id": "x", "email": "hi", "expected": {"order_id": "A-1", "items": [], "action": "x",
                                                                   "date": None}}) + "\n")
    from promptsys.errors import DatasetError
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: 'expected' does not fit the task's schema: order_id: 'A-1' does not match"):
        pe.load_dataset(f, t)


def test_a_json_schema_on_the_embedded_model(kinds):
    "llama.cpp compiles the JSON Schema into a grammar: a 135M model's answer is always schema-valid."
    s = load_settings(ROOT / "settings.ini", overrides={**kinds["ov"], "model.provider": "local",
                                                        "local.decoding": "grammar", "model.max_tokens": "256"}, env={})
    pipe = Pipeline("orders", 1, settings=s)
    email = "Hello, my order A-00731 had 2 mugs and 1 kettle. The kettle broke. Please replace it."
    a, b = pipe.run(email=email), pipe.run(email=email)
    assert a.ok and a.output == b.output, a.error
    from promptsys.validation import validate_output
    assert validate_output(a.output, pipe.task.output) == a.output


def test_a_text_task(kinds, tmp_path):
    d = tmp_path / "prompts" / "summary"; (d / "data").mkdir(parents=True)
    (d / "task.toml").write_text('[output]\nkind = "text"\nmax_chars = 80\nmust_not_contain = ["as an AI"]\n'
                                 '[dataset]\npath = "data/d.jsonl"\n')
    (d / "v1_echo.txt").write_text("Summarise in one sentence: {{text}}")
    rows = [{"id": "a", "text": "Echo: The kettle is loud but fast.", "expected": "The kettle is loud but fast."},
            {"id": "b", "text": "Echo: A fast kettle.", "expected": "The kettle is loud but fast."},
            {"id": "c", "text": "Echo: As an AI I cannot say.", "expected": "It arrived broken."}]
    (d / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = load_settings(ROOT / "settings.ini", overrides={**kinds["ov"], "promptsys.prompts_dir": str(tmp_path / "prompts"),
                      "mlflow.tracking_uri": f"sqlite:///{tmp_path}/m.db"}, env={})
    assert Pipeline("summary", 1, settings=s).run("Echo: Fine.").output == {"text": "Fine."}
    m = pe.evaluate("summary", settings=s, progress=False).loc[1]
    assert m.accuracy == pytest.approx(1 / 3) and m.format_validity == pytest.approx(2 / 3)
    got = registry.mlflow_client(s).get_run(m.run_id).data.metrics
    f1 = got["token_f1"]
    assert got["rouge_l"] == pytest.approx((1.0 + pe.rouge_l("A fast kettle.", "The kettle is loud but fast.")) / 3)
    assert f1 == pytest.approx((1.0 + _f1("A fast kettle.", "The kettle is loud but fast.") + 0.0) / 3)


def _f1(a: str, b: str) -> float:
    "Token F1 written out for the test: common words over both bags."
    wa, wb = re.findall(r"\w+", a.lower()), re.findall(r"\w+", b.lower())
    common = sum(min(wa.count(w), wb.count(w)) for w in set(wa))
    return 0.0 if not common else 2 * (common / len(wa)) * (common / len(wb)) / (common / len(wa) + common / len(wb))


def test_a_new_user_adds_a_two_input_json_task(kinds, tmp_path):
    "The README's path: promptsys new → check → add rows and a version → eval → promote, all from the shell."
    ov = {**kinds["ov"], "promptsys.prompts_dir": str(tmp_path / "prompts"),
          "mlflow.tracking_uri": f"sqlite:///{tmp_path}/m.db", "gate.max_p95_latency_increase": "100",
          "gate.max_cost_increase": "1"}
    sets = [x for k, v in ov.items() for x in ("--set", f"{k}={v}")]
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "promptsys.cli", *sets, *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)
    out = cli("new", "tickets", "--kind", "json", "--inputs", "subject,body")
    assert out.returncode == 0, out.stderr
    assert cli("check", "tickets").returncode == 0
    d = tmp_path / "prompts" / "tickets"
    echo = lambda a: json.dumps({"answer": a, "confidence": 0.9})
    rows = [{"id": f"r{i}", "subject": f"Ticket {i}", "body": f"Is it on? Echo: {echo(a)}", "expected": {"answer": a}}
            for i, a in enumerate(["yes", "no", "yes", "no", "no", "yes", "no", "yes"])]
    (d / "data" / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # v2 ends with its own "Echo:", so the model always answers yes (right on half of the rows)
    (d / "v2_always.txt").write_text('Subject: {{subject}}\nBody: {{body}}\nEcho: {"answer": "yes", "confidence": 1}\n')
    (d / "v3_bad.txt").write_text("Subject: {{subjct}}\n")
    out = cli("check", "tickets")
    assert out.returncode == 1 and "v3_bad.txt:1: uses {{subjct}}, which task.toml does not declare" in out.stdout
    assert "v3_bad.txt:1: does not use the required input 'body'" in out.stdout
    (d / "v3_bad.txt").unlink()
    assert cli("check", "tickets").returncode == 0
    out = cli("eval", "tickets", "--output", str(tmp_path / "examples.jsonl"))
    assert out.returncode == 0, out.stderr
    ex = [json.loads(l) for l in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert len(ex) == 16 and {e["version"] for e in ex} == {1, 2}            # every example of both versions
    assert sum(e["correct"] for e in ex if e["version"] == 1) == 8 and "fields" in ex[0]
    out = cli("promote", "tickets")
    assert out.returncode == 0 and "promoted v1" in out.stdout, out.stdout + out.stderr
    assert "| v1" in (d / "README.md").read_text()


from tests.test_foundation import llama_server  # noqa: E402,F401  (the llama_cpp.server process fixture)


def test_the_shipped_classification_task_through_llama_cpp_server(tmp_path, llama_server):
    """The shipped JSON-Schema chat task through llama.cpp's own server: the schema goes as response_format, the
    answers fit it, and their labels are the embedded model's (same GGUF, chat template and schema grammar)."""
    base = {"promptsys.state_dir": str(tmp_path / "state"), "promptsys.records": "none", "cache.enabled": "false",
            "mlflow.tracking_uri": f"sqlite:///{tmp_path}/m.db", "retry.max_attempts": "1"}
    t = load_task("classification", ROOT / "prompts")
    rows = [json.loads(l) for l in open(t.dataset, encoding="utf-8")][:3]
    inputs = [{k: r[k] for k in ("subject", "body", "tier") if k in r} for r in rows]
    remote = load_settings(ROOT / "settings.ini", overrides={**base, "model.provider": "openai",
                           "openai.base_url": llama_server, "openai.api_key_env": "", "openai.model": "smollm2",
                           "openai.constrain": "grammar"}, env={})
    local = load_settings(ROOT / "settings.ini", overrides={**base, "model.provider": "local",
                                                            "local.decoding": "grammar"}, env={})
    got = [Pipeline(t, 2, settings=remote).run(x) for x in inputs]
    want = [Pipeline(t, 2, settings=local).run(x) for x in inputs]
    assert all(r.ok for r in got), [r.error for r in got]
    from promptsys.validation import validate_output
    assert all(validate_output(r.output, t.output) == r.output for r in got)       # schema-valid, every field
    # the labels are the embedded model's; the confidence's last digits are not (the server's default sampler
    # settings, such as its repeat penalty, differ from the embedded provider's)
    assert [(r.output["category"], r.output["priority"]) for r in got] == \
           [(r.output["category"], r.output["priority"]) for r in want]
