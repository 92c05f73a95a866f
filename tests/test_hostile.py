"""Hostile input: every bad value, file, name or service a user can hand promptsys, through the CLI and the API.

Each case asserts a clear answer — a typed error with a hint and a sensible exit code, never a Python traceback —
or a safe one, AND that nothing already stored (task folders, prompt files, aliases.json, audit.jsonl, the
settings file, the metrics store) was changed by the failed command. CLI cases run in-process through
`promptsys.cli.main` (a few stdin cases as real subprocesses); no case uses the embedded model.
"""
from __future__ import annotations
import hashlib, io, json, math, os, shutil, socket, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from promptsys import errors as E                      # noqa: E402
from promptsys.cli import main                          # noqa: E402

LATIN1 = "Très bon café, déçu — 10 €\n".encode("latin-1", errors="replace")
BINARY = bytes(range(256)) * 4
LONG = "t" * 300


def _closed_port() -> int:
    "A loopback port nothing listens on."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture
def proj(tmp_path, monkeypatch):
    "A project folder: settings.ini (replay provider, every store inside), prompts/ with two real tasks."
    for k in list(os.environ):
        if k.startswith("PROMPTSYS_"): monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("PROMPTSYS_LOG_DIR", str(tmp_path / "crash"))
    p = tmp_path / "proj"
    (p / "prompts").mkdir(parents=True)
    for t in ("sentiment", "extraction"): shutil.copytree(ROOT / "prompts" / t, p / "prompts" / t)
    (p / "settings.ini").write_text(
        "[promptsys]\nprompts_dir = prompts\nstate_dir = state\nrecords = none\n"
        "[model]\nprovider = replay\n[replay]\ncassette = cassettes/empty.json\n"
        "[retry]\nmax_attempts = 1\ndeadline_seconds = 5\n"
        f"[mlflow]\ntracking_uri = sqlite:///{p}/mlflow.db\n[eval]\nruns_dir = runs\n", encoding="utf-8")
    monkeypatch.chdir(p)
    return p


def snapshot(p:Path) -> dict:
    "A content hash of everything stored: the prompts folder, the settings file, the metrics store."
    out = {}
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).as_posix()
        if f.is_file() and (rel.startswith("prompts/") or rel == "settings.ini" or rel.endswith("metrics.db")):
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def cli(proj:Path, capsys, argv:list, stdin:bytes|None=None, monkeypatch=None):
    "Run `promptsys --settings proj/settings.ini ARGV` in-process: (exit code, stdout, stderr)."
    if stdin is not None: monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    try: rc = main(["--settings", str(proj / "settings.ini"), *argv])
    except SystemExit as e: rc = e.code if isinstance(e.code, int) else 2      # argparse's own refusals
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- setups: what a hostile user did to the project
def settings_add(text:str):
    "Append lines to the project's settings file."
    def f(p): (p / "settings.ini").write_text((p / "settings.ini").read_text() + text, encoding="utf-8")
    return f

def write(rel:str, data:bytes|str):
    "Write (over) a file of the project."
    def f(p):
        q = p / rel; q.parent.mkdir(parents=True, exist_ok=True)
        q.write_bytes(data if isinstance(data, bytes) else data.encode())
    return f

def toml_edit(old:str, new:str, task="sentiment"):
    "Replace text in a task's task.toml."
    def f(p):
        q = p / "prompts" / task / "task.toml"
        t = q.read_text(encoding="utf-8"); assert old in t, old
        q.write_text(t.replace(old, new, 1), encoding="utf-8")
    return f

def env(**kv):
    "Set environment variables (undone after the test by the `proj` fixture's monkeypatch? no: by os.environ restore)."
    def f(p): os.environ.update(kv)
    return f

def remove(rel:str):
    def f(p):
        q = p / rel
        shutil.rmtree(q) if q.is_dir() else q.unlink()
    return f

def chain(*fs):
    def f(p):
        for g in fs: g(p)
    return f


BAD_CONFIG = dict(rc=2, err=["error:", "hint:"])
NOT_FOUND = dict(rc=2, err=["error:", "hint:"])
CLOSED = _closed_port()

# (id, setup, argv, expectation): rc = exit code (or a set), err/out = substrings that must appear
CLI_CASES = [
    # ---- settings: ranges, types, choices, from --set, the file and the environment alike
    ("set-gate-alpha-5", None, ["--set", "gate.alpha=5", "prompts", "list"], dict(rc=2, err=["gate.alpha", "5"])),
    ("set-alpha-0", None, ["--set", "gate.alpha=0", "prompts", "list"], dict(rc=2, err=["gate.alpha"])),
    ("file-breaker-threshold-0", settings_add("[breaker]\nfailure_threshold = 0\n"), ["prompts", "list"],
     dict(rc=2, err=["breaker.failure_threshold", "0"])),
    ("env-budget-negative", env(PROMPTSYS_BUDGET__DAILY_USD="-1"), ["prompts", "list"],
     dict(rc=2, err=["budget.daily_usd", "-1", "PROMPTSYS_BUDGET__DAILY_USD"])),
    ("set-total-budget-negative", None, ["--set", "budget.total_usd=-0.5", "prompts", "list"],
     dict(rc=2, err=["budget.total_usd"])),
    ("set-read-timeout-negative", None, ["--set", "openai.read_timeout=-1", "run", "sentiment", "great"],
     dict(rc=2, err=["openai.read_timeout", "-1"])),
    ("set-read-timeout-zero", None, ["--set", "openai.read_timeout=0", "prompts", "list"],
     dict(rc=2, err=["openai.read_timeout"])),
    ("set-connect-timeout-inf", None, ["--set", "openai.connect_timeout=inf", "prompts", "list"],
     dict(rc=2, err=["openai.connect_timeout"])),
    ("set-temperature-nan", None, ["--set", "model.temperature=nan", "prompts", "list"],
     dict(rc=2, err=["model.temperature"])),
    ("set-temperature-9", None, ["--set", "model.temperature=9", "prompts", "list"],
     dict(rc=2, err=["model.temperature"])),
    ("set-attempts-0", None, ["--set", "retry.max_attempts=0", "prompts", "list"],
     dict(rc=2, err=["retry.max_attempts"])),
    ("set-attempts-negative", None, ["--set", "retry.max_attempts=-3", "prompts", "list"],
     dict(rc=2, err=["retry.max_attempts"])),
    ("set-attempts-word", None, ["--set", "retry.max_attempts=many", "prompts", "list"],
     dict(rc=2, err=["retry.max_attempts", "many"])),
    ("set-attempts-float", None, ["--set", "retry.max_attempts=2.5", "prompts", "list"],
     dict(rc=2, err=["retry.max_attempts"])),
    ("set-deadline-0", None, ["--set", "retry.deadline_seconds=0", "prompts", "list"],
     dict(rc=2, err=["retry.deadline_seconds"])),
    ("set-wait-negative", None, ["--set", "retry.initial_wait=-1", "prompts", "list"],
     dict(rc=2, err=["retry.initial_wait"])),
    ("set-breaker-window-0", None, ["--set", "breaker.window_seconds=0", "prompts", "list"],
     dict(rc=2, err=["breaker.window_seconds"])),
    ("set-half-open-0", None, ["--set", "breaker.half_open_max_calls=0", "prompts", "list"],
     dict(rc=2, err=["breaker.half_open_max_calls"])),
    ("set-repeats-0", None, ["--set", "eval.repeats=0", "prompts", "list"], dict(rc=2, err=["eval.repeats"])),
    ("set-concurrency-0", None, ["--set", "eval.concurrency=0", "prompts", "list"],
     dict(rc=2, err=["eval.concurrency"])),
    ("set-cache-size-negative", None, ["--set", "cache.size_limit_mb=-1", "prompts", "list"],
     dict(rc=2, err=["cache.size_limit_mb"])),
    ("set-bootstrap-negative", None, ["--set", "gate.bootstrap=-1", "prompts", "list"],
     dict(rc=2, err=["gate.bootstrap"])),
    ("set-window-hours-0", None, ["--set", "alerts.window_hours=0", "prompts", "list"],
     dict(rc=2, err=["alerts.window_hours"])),
    ("set-batch-size-0", None, ["--set", "monitor.batch_size=0", "prompts", "list"],
     dict(rc=2, err=["monitor.batch_size"])),
    ("set-n-ctx-0", None, ["--set", "local.n_ctx=0", "prompts", "list"], dict(rc=2, err=["local.n_ctx"])),
    ("set-error-rate-2", None, ["--set", "alerts.max_error_rate=2", "prompts", "list"],
     dict(rc=2, err=["alerts.max_error_rate"])),
    ("set-rollout-min-calls-0", None, ["--set", "rollout.min_calls=0", "prompts", "list"],
     dict(rc=2, err=["rollout.min_calls"])),
    ("set-provider-unknown", None, ["--set", "model.provider=gpt5", "prompts", "list"],
     dict(rc=2, err=["model.provider", "gpt5"])),
    ("set-without-equals", None, ["--set", "model.provider", "prompts", "list"], dict(rc=2, err=["--set"])),
    ("set-unknown-section", None, ["--set", "modle.provider=local", "prompts", "list"],
     dict(rc=2, err=["modle"])),
    ("set-unknown-key", None, ["--set", "model.provdier=local", "prompts", "list"],
     dict(rc=2, err=["provdier"])),
    ("set-bool-garbage", None, ["--set", "cache.enabled=maybe", "prompts", "list"],
     dict(rc=2, err=["cache.enabled"])),
    ("env-unknown-section", env(PROMPTSYS_NOPE__X="1"), ["prompts", "list"], dict(rc=2, err=["nope"])),
    ("env-bad-type", env(PROMPTSYS_RETRY__MAX_ATTEMPTS="four"), ["prompts", "list"],
     dict(rc=2, err=["retry.max_attempts", "four"])),
    ("settings-latin1", write("settings.ini", b"[promptsys]\nstate_dir = caf\xe9\n"), ["prompts", "list"],
     dict(rc=2, err=["settings.ini", "UTF-8"])),
    ("settings-binary", write("settings.ini", BINARY), ["prompts", "list"], dict(rc=2, err=["settings.ini"])),
    ("settings-no-section", write("settings.ini", "state_dir = x\n"), ["prompts", "list"],
     dict(rc=2, err=["cannot parse"])),
    ("settings-unknown-section", settings_add("[caches]\nx = 1\n"), ["prompts", "list"], dict(rc=2, err=["caches"])),
    ("settings-missing", remove("settings.ini"), ["prompts", "list"], dict(rc=2, err=["does not exist"])),
    ("settings-is-directory", chain(remove("settings.ini"), lambda p: (p / "settings.ini").mkdir()),
     ["prompts", "list"], dict(rc=2, err=["settings.ini"])),
    ("state-dir-under-file", chain(write("afile", "x"), settings_add("[cache]\nenabled = true\n")),
     ["--set", "promptsys.state_dir=afile/state", "run", "sentiment", "great"], dict(rc=2, err=["state_dir"])),
    ("prompts-dir-missing", None, ["--set", "promptsys.prompts_dir=nowhere", "prompts", "list"],
     dict(rc=0, out=["no tasks"])),
    ("prompts-dir-is-file", write("pfile", "x"), ["--set", "promptsys.prompts_dir=pfile", "run", "sentiment", "x"],
     dict(rc=2, err=["error:"])),
    # ---- config check itself
    ("config-check-ok", None, ["config", "check"], dict(rc=0, out=["model.provider", "replay", "default"])),
    ("config-check-bad", None, ["--set", "gate.alpha=5", "config", "check"], dict(rc=2, err=["gate.alpha"])),
    ("config-check-json-bad", None, ["--set", "gate.alpha=5", "config", "check", "--json"],
     dict(rc=2, out=['"ok": false', "gate.alpha"])),
    # ---- task folders: encodings, shapes, types
    ("task-toml-latin1", write("prompts/sentiment/task.toml", b'name = "caf\xe9"\n'), ["run", "sentiment", "great"],
     dict(rc=2, err=["task.toml", "UTF-8"])),
    ("task-toml-binary", write("prompts/sentiment/task.toml", BINARY), ["check", "sentiment"],
     dict(rc={1, 2}, err=["task.toml"], any_stream=True)),
    ("task-toml-syntax", write("prompts/sentiment/task.toml", "name = \n[[["), ["run", "sentiment", "great"],
     dict(rc=2, err=["task.toml"])),
    ("prompt-file-latin1", write("prompts/sentiment/v1_bare.txt", LATIN1), ["run", "sentiment", "great"],
     dict(rc=2, err=["v1_bare.txt", "UTF-8"])),
    ("prompt-file-binary", write("prompts/sentiment/v1_bare.txt", BINARY), ["prompts", "show", "sentiment", "1"],
     dict(rc=2, err=["v1_bare.txt"])),
    ("prompt-file-binary-list", write("prompts/sentiment/v1_bare.txt", BINARY), ["prompts", "list"],
     dict(rc=0, out=["BROKEN"])),
    ("chat-file-broken", write("prompts/extraction/v2_chat.toml", "[[messages]]\nrole = 'robot'\n"),
     ["run", "extraction", "x"], dict(rc=2, err=["message 1"])),
    ("chat-file-latin1", write("prompts/extraction/v2_chat.toml", b"[[messages]]\ncontent = 'caf\xe9'\n"),
     ["prompts", "show", "extraction", "2"], dict(rc=2, err=["v2_chat.toml"])),
    ("max-chars-string", toml_edit("max_chars = 4000", 'max_chars = "lots"'), ["run", "sentiment", "great"],
     dict(rc=2, err=["max_chars", "lots"])),
    ("max-chars-negative", toml_edit("max_chars = 4000", "max_chars = -5"), ["run", "sentiment", "great"],
     dict(rc=2, err=["max_chars"])),
    ("min-chars-float", toml_edit("min_chars = 1", "min_chars = 1.5"), ["run", "sentiment", "great"],
     dict(rc=2, err=["min_chars"])),
    ("on-too-long-bogus", toml_edit('on_too_long = "reject"', 'on_too_long = "explode"'),
     ["run", "sentiment", "great"], dict(rc=2, err=["on_too_long"])),
    ("control-chars-bogus", toml_edit('control_chars = "strip"', 'control_chars = 7'),
     ["run", "sentiment", "great"], dict(rc=2, err=["control_chars"])),
    ("labels-string", toml_edit('labels = ["positive", "negative", "neutral"]', 'labels = "positive"'),
     ["run", "sentiment", "great"], dict(rc=2, err=["labels"])),
    ("labels-numbers", toml_edit('labels = ["positive", "negative", "neutral"]', "labels = [1, 2]"),
     ["run", "sentiment", "great"], dict(rc=2, err=["labels"])),
    ("labels-empty", toml_edit('labels = ["positive", "negative", "neutral"]', "labels = []"),
     ["run", "sentiment", "great"], dict(rc=2, err=["labels"])),
    ("labels-duplicate", toml_edit('labels = ["positive", "negative", "neutral"]', 'labels = ["a", "a"]'),
     ["run", "sentiment", "great"], dict(rc=2, err=["labels"])),
    ("output-kind-bogus", toml_edit('kind = "label"', 'kind = "poem"'), ["run", "sentiment", "great"],
     dict(rc=2, err=["kind"])),
    ("output-is-string", toml_edit("[output]\n", 'output = "label"\n[outputx]\n'), ["run", "sentiment", "great"],
     dict(rc=2, err=["error:"])),
    ("defaults-max-tokens-string", toml_edit("max_tokens = 8", 'max_tokens = "eight"'),
     ["run", "sentiment", "great"], dict(rc=2, err=["max_tokens"])),
    ("defaults-temperature-negative", toml_edit("temperature = 0.0", "temperature = -1"),
     ["run", "sentiment", "great"], dict(rc=2, err=["temperature"])),
    ("dataset-path-number", toml_edit('path = "data/sentiment.jsonl"', "path = 5"), ["check", "sentiment"],
     dict(rc={1, 2}, err=["path"], any_stream=True)),
    ("two-files-one-version", write("prompts/sentiment/v1_other.txt", "Text: {{text}}"), ["run", "sentiment", "x"],
     dict(rc=2, err=["two files"])),
    ("task-without-versions", lambda p: [f.unlink() for f in (p / "prompts/sentiment").glob("v*.txt")],
     ["run", "sentiment", "great"], dict(rc=2, err=["error:"])),
    ("task-name-300", None, ["run", LONG, "great"], dict(rc=2, err=["no task"])),
    ("task-name-300-check", None, ["check", LONG], dict(rc=2, err=["error:"])),
    ("task-name-300-show", None, ["prompts", "show", LONG, "1"], dict(rc=2, err=["error:"])),
    ("task-name-300-list", None, ["prompts", "list", LONG], dict(rc=2, err=["error:"])),
    ("task-name-traversal", None, ["run", "../prompts/sentiment", "great"], dict(rc=2, err=["task"])),
    ("task-name-absolute", None, ["prompts", "show", "/etc", "1"], dict(rc=2, err=["task"])),
    ("task-name-nul", None, ["run", "sent\x00iment", "great"], dict(rc=2, err=["task"])),
    ("task-name-empty", None, ["run", "", "great"], dict(rc=2, err=["task"])),
    ("task-unknown-run", None, ["run", "nosuch", "great"], dict(rc=2, err=["nosuch", "tasks:"])),
    ("task-unknown-eval", None, ["eval", "nosuch"], dict(rc=2, err=["nosuch"])),
    ("task-unknown-history", None, ["history", "nosuch"], dict(rc=2, err=["nosuch"])),
    ("task-unknown-schedule", None, ["schedule", "nosuch"], dict(rc=2, err=["nosuch"])),
    ("task-unknown-promote", None, ["promote", "nosuch"], dict(rc=2, err=["nosuch"])),
    ("task-unknown-rollback", None, ["rollback", "nosuch"], dict(rc=2, err=["nosuch"])),
    ("new-existing", None, ["new", "sentiment"], dict(rc=2, err=["already exists"])),
    ("new-bad-name", None, ["new", "../evil"], dict(rc=2, err=["task name"])),
    ("new-long-name", None, ["new", LONG], dict(rc=2, err=["task name"])),
    ("new-bad-inputs", None, ["new", "fresh", "--inputs", "1x"], dict(rc=2, err=["--inputs"])),
    ("prompts-show-version-99", None, ["prompts", "show", "sentiment", "99"], dict(rc=2, err=["no version 99"])),
    ("prompts-show-version-abc", None, ["prompts", "show", "sentiment", "abc"], dict(rc=2, err=["abc"])),
    # ---- run: inputs
    ("stdin-latin1", None, ["run", "sentiment", "-"], dict(rc=2, err=["UTF-8"], stdin=LATIN1)),
    ("stdin-binary", None, ["run", "sentiment", "-"], dict(rc=2, err=["UTF-8"], stdin=BINARY)),
    ("stdin-input-json-latin1", None, ["run", "sentiment", "--input", "-"], dict(rc=2, err=["UTF-8"],
                                                                                stdin=b'{"text": "caf\xe9"}')),
    ("stdin-empty", None, ["run", "sentiment", "-"], dict(rc=2, err=["error:"], stdin=b"")),
    ("text-empty", None, ["run", "sentiment", ""], dict(rc=2, err=["error:"])),
    ("text-whitespace", None, ["run", "sentiment", "   \n\t"], dict(rc=2, err=["error:"])),
    ("text-too-long", None, ["run", "sentiment", "x" * 200_000], dict(rc=2, err=["too long"])),
    ("text-surrogate", None, ["run", "sentiment", "caf\udce9"], dict(rc=2, err=["unicode"])),
    ("input-not-json", None, ["run", "sentiment", "--input", "{text:"], dict(rc=2, err=["JSON"])),
    ("input-json-list", None, ["run", "sentiment", "--input", "[1, 2]"], dict(rc=2, err=["JSON object"])),
    ("input-json-nested", None, ["run", "sentiment", "--input", '{"text": {"a": 1}}'], dict(rc=2, err=["text"])),
    ("var-without-equals", None, ["run", "sentiment", "--var", "text"], dict(rc=2, err=["NAME=VALUE"])),
    ("var-unknown", None, ["run", "sentiment", "--var", "nosuch=1"], dict(rc=2, err=["nosuch"])),
    ("no-input", None, ["run", "sentiment"], dict(rc=2, err=["no input"])),
    ("run-version-99", None, ["run", "sentiment", "great", "--version", "99"], dict(rc=2, err=["99"])),
    ("run-version-abc", None, ["run", "sentiment", "great", "--version", "abc!"], dict(rc=2, err=["abc!"])),
    ("run-version-negative", None, ["run", "sentiment", "great", "--version", "-1"], dict(rc=2, err=["-1"])),
    ("run-cassette-miss", None, ["run", "sentiment", "great"], dict(rc=1, err=["error:", "hint:"])),
    ("run-cassette-not-json", write("cassettes/empty.json", "{nope"), ["run", "sentiment", "great"],
     dict(rc={1, 2}, err=["error:"])),
    ("run-openai-closed-port", None, ["--set", f"openai.base_url=http://127.0.0.1:{CLOSED}/v1",
                                      "--set", "breaker.enabled=false", "--set", "cache.enabled=false",
                                      "run", "sentiment", "great", "--provider", "openai"],
     dict(rc=1, err=["error:", "hint:"])),
    ("run-service-mode-closed-port", None, ["--set", f"openai.base_url=http://127.0.0.1:{CLOSED}/v1",
                                            "--set", "promptsys.mode=service", "--set", "cache.enabled=false",
                                            "run", "sentiment", "great", "--provider", "openai", "--json"],
     dict(rc=0, out=['"fallback": true', '"neutral"'])),      # a safe answer: the task's fallback
    ("local-model-not-gguf", write("model.gguf", b"not a model at all" * 10),
     ["--set", "local.model_path=model.gguf", "--set", "cache.enabled=false", "run", "sentiment", "great",
      "--provider", "local"], dict(rc=2, err=["GGUF"])),
    ("local-model-text-file", write("model.bin", "hello"),
     ["--set", "local.model_path=model.bin", "--set", "cache.enabled=false", "run", "sentiment", "great",
      "--provider", "local"], dict(rc=2, err=["GGUF"])),
    ("local-model-missing", None, ["--set", "local.model_path=none.gguf", "--set", "cache.enabled=false",
                                   "run", "sentiment", "great", "--provider", "local"],
     dict(rc=2, err=["does not exist"])),
    # ---- eval
    ("eval-limit-negative", None, ["eval", "sentiment", "--limit", "-5"], dict(rc=2, err=["--limit"])),
    ("eval-limit-zero", None, ["eval", "sentiment", "--limit", "0"], dict(rc=2, err=["--limit"])),
    ("eval-sample-negative", None, ["eval", "sentiment", "--sample", "-1"], dict(rc=2, err=["--sample"])),
    ("eval-repeats-zero", None, ["eval", "sentiment", "--repeats", "0"], dict(rc=2, err=["--repeats"])),
    ("eval-repeats-negative", None, ["eval", "sentiment", "--repeats", "-2"], dict(rc=2, err=["--repeats"])),
    ("eval-versions-abc", None, ["eval", "sentiment", "--versions", "abc"], dict(rc=2, err=["abc"])),
    ("eval-versions-99", None, ["eval", "sentiment", "--versions", "1,99"], dict(rc=2, err=["99"])),
    ("eval-versions-negative", None, ["eval", "sentiment", "--versions", "-1"], dict(rc=2, err=["-1"])),
    ("eval-dataset-missing", None, ["eval", "sentiment", "--dataset", "none.jsonl"],
     dict(rc=2, err=["none.jsonl"])),
    ("eval-dataset-latin1", write("d.jsonl", b'{"text": "caf\xe9", "label": "positive"}\n'),
     ["eval", "sentiment", "--dataset", "d.jsonl"], dict(rc=2, err=["d.jsonl", "UTF-8"])),
    ("eval-dataset-binary", write("d.jsonl", BINARY), ["eval", "sentiment", "--dataset", "d.jsonl"],
     dict(rc=2, err=["d.jsonl"])),
    ("eval-dataset-directory", lambda p: (p / "dd").mkdir(), ["eval", "sentiment", "--dataset", "dd"],
     dict(rc=2, err=["dd"])),
    ("eval-dataset-not-json", write("d.jsonl", "{oops\n"), ["eval", "sentiment", "--dataset", "d.jsonl"],
     dict(rc=2, err=["d.jsonl"])),
    ("eval-dataset-empty", write("d.jsonl", ""), ["eval", "sentiment", "--dataset", "d.jsonl"],
     dict(rc=2, err=["d.jsonl"])),
    ("eval-dataset-wrong-label", write("d.jsonl", '{"text": "x", "label": "meh"}\n'),
     ["eval", "sentiment", "--dataset", "d.jsonl"], dict(rc=2, err=["d.jsonl"])),
    ("eval-task-dataset-latin1", write("prompts/sentiment/data/sentiment.jsonl", LATIN1), ["eval", "sentiment"],
     dict(rc=2, err=["sentiment.jsonl"])),
    ("check-dataset-latin1", write("prompts/sentiment/data/sentiment.jsonl", LATIN1), ["check", "sentiment"],
     dict(rc={1, 2}, err=["sentiment.jsonl"], any_stream=True)),
    ("eval-output-under-file", write("afile", "x"),
     ["eval", "sentiment", "--limit", "1", "--output", "afile/out.csv"], dict(rc=2, err=["afile"])),
    ("eval-output-bad-suffix", None, ["eval", "sentiment", "--limit", "1", "--output", "out.xls"],
     dict(rc=2, err=[".xls"])),
    ("eval-tracking-unsupported", None, ["--set", "mlflow.tracking_uri=bogus://x", "eval", "sentiment",
                                         "--limit", "1"], dict(rc={1, 2}, err=["tracking"])),
    # ---- promote, stage, rollback, diff
    ("promote-version-99", None, ["promote", "sentiment", "--version", "99"],
     dict(rc=2, err=["no version 99", "versions are"])),
    ("promote-version-negative", None, ["promote", "sentiment", "--version", "-1"], dict(rc=2, err=["-1"])),
    ("promote-tracking-unsupported", None, ["--set", "mlflow.tracking_uri=bogus://x", "promote", "sentiment"],
     dict(rc={1, 2}, err=["tracking"])),
    ("promote-tracking-closed-port", None, ["--set", f"mlflow.tracking_uri=http://127.0.0.1:{CLOSED}",
                                            "promote", "sentiment"], dict(rc={1, 2}, err=["error:", "hint:"])),
    ("stage-version-99", None, ["stage", "sentiment", "99"], dict(rc=2, err=["99"])),
    ("diff-version-99", None, ["diff", "sentiment", "1", "99"], dict(rc=2, err=["99"])),
    ("diff-max-flips-negative", None, ["diff", "sentiment", "1", "2", "--max-flips", "-1"],
     dict(rc=2, err=["--max-flips"])),
    # ---- schedule
    ("schedule-limit-negative", None, ["schedule", "sentiment", "--limit", "-3"], dict(rc=2, err=["--limit"])),
    ("schedule-versions-abc", None, ["schedule", "sentiment", "--versions", "x"], dict(rc=2, err=["x"])),
    # ---- monitor
    ("dashboard-hours-negative", None, ["dashboard", "--hours", "-1"], dict(rc=2, err=["--hours"])),
    ("dashboard-hours-zero", None, ["dashboard", "--hours", "0"], dict(rc=2, err=["--hours"])),
    ("dashboard-hours-nan", None, ["dashboard", "--hours", "nan"], dict(rc=2, err=["--hours"])),
    ("dashboard-bucket-negative", None, ["dashboard", "--bucket-minutes", "-1"],
     dict(rc=2, err=["--bucket-minutes"])),
    ("dashboard-html-under-file", write("afile", "x"), ["dashboard", "--html", "afile/page.html"],
     dict(rc=2, err=["afile"])),
    ("dashboard-unknown-task", None, ["dashboard", "--task", "nosuch", "--json"], dict(rc=0, out=["{"])),
    ("alerts-hours-negative", None, ["alerts", "--dry-run", "--hours", "-1"], dict(rc=2, err=["--hours"])),
    ("metrics-hours-negative", None, ["metrics", "--hours", "-2"], dict(rc=2, err=["--hours"])),
    ("metrics-serve-bad-port", None, ["metrics", "--serve", "99999"], dict(rc=2, err=["--serve", "65535"])),
    ("feedback-score-5", None, ["feedback", "r-1", "--score", "5"], dict(rc=2, err=["--score"])),
    ("feedback-score-nan", None, ["feedback", "r-1", "--score", "nan"], dict(rc=2, err=["--score"])),
    ("feedback-nothing", None, ["feedback", "r-1"], dict(rc=2, err=["error:"])),
    ("rollout-percent-150", None, ["rollout", "start", "sentiment", "--version", "2", "--percent", "150"],
     dict(rc=2, err=["percent"])),
    ("rollout-percent-negative", None, ["rollout", "start", "sentiment", "--version", "2", "--percent", "-5"],
     dict(rc=2, err=["percent"])),
    # ---- argparse's own refusals stay short (usage + message, exit 2)
    ("argparse-unknown-command", None, ["frobnicate"], dict(rc=2, err=["invalid choice"])),
    ("argparse-limit-word", None, ["eval", "sentiment", "--limit", "five"], dict(rc=2, err=["--limit", "expected a whole number"])),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_hostile(case, proj, capsys, monkeypatch):
    name, setup, argv, want = case
    saved_env = dict(os.environ)
    try:
        if setup: setup(proj)
        before = snapshot(proj)
        rc, out, err = cli(proj, capsys, argv, want.get("stdin"), monkeypatch)
    finally:
        os.environ.clear(); os.environ.update(saved_env)
    both = out + err
    assert "Traceback" not in both, both[-3000:]
    assert "internal error" not in both, both[-3000:]
    rcs = want["rc"] if isinstance(want["rc"], set) else {want["rc"]}
    assert rc in rcs, f"exit {rc}, wanted {rcs}\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}"
    for s in want.get("err", []):
        assert s in (both if want.get("any_stream") else err), f"{s!r} not in stderr: {err[-1500:]}"
    for s in want.get("out", []): assert s in out, f"{s!r} not in stdout: {out[-1500:]}"
    if rc not in (0,) and not name.startswith("argparse") and rc == 2 and "hint:" not in err and "error:" in err:
        pytest.fail(f"an error without a hint: {err}")
    after = snapshot(proj)
    assert {k: after.get(k) for k in before} == before, "stored files changed or lost"
    assert not [k for k in after if k not in before and k.startswith("prompts/")], "files added to a task folder"


# ---------------------------------------------------------------- unexpected failures: internal error + a log file
def test_internal_error_writes_log(proj, capsys, monkeypatch):
    "An exception promptsys did not expect prints 'internal error' and the log file's path, never a traceback."
    import promptsys.cli as C
    def boom(a): raise ZeroDivisionError("synthetic")
    monkeypatch.setitem(C.COMMANDS, "doctor", (C.COMMANDS["doctor"][0], C.COMMANDS["doctor"][1], boom))
    rc, out, err = cli(proj, capsys, ["doctor"])
    assert rc == 3 and "Traceback" not in out + err and "internal error" in err, err
    log = Path(err.split("full traceback in ")[1].split()[0])
    assert log.is_file() and "ZeroDivisionError: synthetic" in log.read_text() and "Traceback" in log.read_text()


# ---------------------------------------------------------------- stdin and encodings through a real process
SUB_CASES = [
    ("sub-stdin-latin1", ["run", "sentiment", "-"], LATIN1, 2, "UTF-8"),
    ("sub-stdin-binary", ["run", "sentiment", "--input", "-"], BINARY, 2, "UTF-8"),
    ("sub-bad-setting", ["--set", "gate.alpha=5", "config", "check"], b"", 2, "gate.alpha"),
]

@pytest.mark.parametrize("case", SUB_CASES, ids=[c[0] for c in SUB_CASES])
def test_subprocess_hostile(case, proj):
    name, argv, stdin, code, needle = case
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSYS_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8", PROMPTSYS_LOG_DIR=str(proj / "crash"))
    before = snapshot(proj)
    r = subprocess.run([sys.executable, "-m", "promptsys.cli", "--settings", str(proj / "settings.ini"), *argv],
                       input=stdin, capture_output=True, cwd=proj, env=env, timeout=60)
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err + r.stdout.decode("utf-8", "replace"), err
    assert r.returncode == code and needle in err + r.stdout.decode(), (r.returncode, err)
    assert snapshot(proj) == before


# ---------------------------------------------------------------- the Python API
def _settings(p, **kw):
    from promptsys.config import load_settings
    return load_settings(p / "settings.ini", overrides={k.replace("__", "."): v for k, v in kw.items()}, env={})

def _pipe(p, *a, **kw):
    from promptsys.pipeline import Pipeline
    return Pipeline("sentiment", *a, settings=_settings(p), **kw)

API_CASES = [
    ("api-typed-alpha-5", lambda p: _settings(p, gate__alpha=5), E.ConfigError, "gate.alpha"),
    ("api-typed-threshold-0", lambda p: _settings(p, breaker__failure_threshold=0), E.ConfigError,
     "breaker.failure_threshold"),
    ("api-typed-attempts-str", lambda p: _settings(p, retry__max_attempts="x"), E.ConfigError, "retry.max_attempts"),
    ("api-typed-attempts-float", lambda p: _settings(p, retry__max_attempts=2.5), E.ConfigError,
     "retry.max_attempts"),
    ("api-typed-bool-for-int", lambda p: _settings(p, eval__repeats=True), E.ConfigError, "eval.repeats"),
    ("api-typed-timeout-negative", lambda p: _settings(p, anthropic__read_timeout=-0.1), E.ConfigError,
     "anthropic.read_timeout"),
    ("api-env-budget", lambda p: __import__("promptsys.config").config.load_settings(
        p / "settings.ini", env={"PROMPTSYS_BUDGET__TOTAL_USD": "-3"}), E.ConfigError, "budget.total_usd"),
    ("api-pipeline-mode-bogus", lambda p: _pipe(p, mode="bogus"), E.ConfigError, "mode"),
    ("api-pipeline-version-99", lambda p: _pipe(p, 99), E.PromptNotFound, "99"),
    ("api-pipeline-version-abc", lambda p: _pipe(p, "abc!"), E.PromptNotFound, "abc!"),
    ("api-pipeline-max-tokens-negative", lambda p: _pipe(p, max_tokens=-1), E.InputValidationError, "max_tokens"),
    ("api-pipeline-temperature-negative", lambda p: _pipe(p, temperature=-1), E.InputValidationError,
     "temperature"),
    ("api-run-bytes", lambda p: _pipe(p, cache=False).run(b"\xff\xfe"), E.InputValidationError, "text"),
    ("api-run-none", lambda p: _pipe(p, cache=False).run(None), E.InputValidationError, ""),
    ("api-run-surrogate", lambda p: _pipe(p, cache=False).run("caf\udce9"), E.InputValidationError, "unicode"),
    ("api-run-cassette-miss", lambda p: _pipe(p, cache=False).run("great"), E.CassetteMiss, ""),
    ("api-load-task-traversal", lambda p: __import__("promptsys.prompts").prompts.load_task("../x", p / "prompts"),
     E.PromptNotFound, "task"),
    ("api-load-task-long", lambda p: __import__("promptsys.prompts").prompts.load_task(LONG, p / "prompts"),
     E.PromptNotFound, "task"),
    ("api-evaluate-limit-negative", lambda p: __import__("promptsys.evaluation").evaluation.evaluate(
        "sentiment", settings=_settings(p), limit=-5), E.InputValidationError, "limit"),
    ("api-evaluate-repeats-0", lambda p: __import__("promptsys.evaluation").evaluation.evaluate(
        "sentiment", settings=_settings(p), repeats=0), E.InputValidationError, "repeats"),
    ("api-summary-hours-negative", lambda p: __import__("promptsys.monitor").monitor.summary(
        _settings(p), hours=-1), E.InputValidationError, "hours"),
    ("api-load-task-labels-string", lambda p: __import__("promptsys.prompts").prompts.load_task(
        "sentiment", p / "prompts"), E.ConfigError, "labels = 'positive'",
     toml_edit('labels = ["positive", "negative", "neutral"]', 'labels = "positive"')),
    ("api-dataset-latin1", lambda p: __import__("promptsys.evaluation").evaluation.load_dataset(
        p / "d.jsonl", __import__("promptsys.prompts").prompts.load_task("sentiment", p / "prompts")),
     E.PromptsysError, "d.jsonl", write("d.jsonl", LATIN1)),
]

@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_hostile(case, proj):
    name, call, exc, needle, *setup = case
    if setup: setup[0](proj)
    before = snapshot(proj)
    with pytest.raises(exc) as ei: call(proj)
    assert needle in str(ei.value) and ei.value.hint, str(ei.value)
    assert snapshot(proj) == before


def test_battery_size():
    "The battery is at least 100 cases."
    assert len(CLI_CASES) + len(SUB_CASES) + len(API_CASES) + 1 >= 100
