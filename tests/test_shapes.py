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
