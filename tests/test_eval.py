"""Issue 3 (eval): datasets, scorers and eval runs end to end — a real sqlite MLflow store in a temp dir, the fake
OpenAI-compatible server as the model (keyword answers: deterministic and instant), a real diskcache, and a real
papermill execution of experiments/eval_prompts.ipynb."""
import json, os, shutil, socket, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from promptsys.config import load_settings
from promptsys.errors import DatasetError, TrackingError
from promptsys.prompts import load_task
from promptsys import evaluation as pe, registry
from tests.fakeserver import start_server, stop_server, stats, keyword_label

N = 12


def _overrides(tmp: Path, url: str) -> dict:
    return {"promptsys.prompts_dir": str(tmp / "prompts"), "promptsys.state_dir": str(tmp / "state"),
            "promptsys.records": "none", "cache.dir": str(tmp / "cache"),
            "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "mlflow.experiment_prefix": "t",
            "model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
            "openai.model": "gpt-4o-mini", "breaker.shared": "false", "retry.max_attempts": "2",
            "retry.initial_wait": "0.01", "monitor.enabled": "false", "eval.runs_dir": str(tmp / "runs")}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    "A copy of prompts/sentiment with its first 12 rows, a fake model server and a fresh MLflow store."
    tmp = tmp_path_factory.mktemp("eval")
    d = tmp / "prompts" / "sentiment"
    shutil.copytree(ROOT / "prompts" / "sentiment", d, ignore=shutil.ignore_patterns("README.md", "aliases.json", "audit.jsonl"))
    rows = (ROOT / "prompts/sentiment/data/sentiment.jsonl").read_text().splitlines()[:N]
    (d / "data" / "sentiment.jsonl").write_text("\n".join(rows) + "\n")
    proc, url = start_server("--delay-ms", "0")
    ov = _overrides(tmp, url)
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    try: yield dict(tmp=tmp, url=url, s=s, ov=ov, task=load_task("sentiment", d.parent))
    finally: stop_server(proc)


def calls(url) -> int: return stats(url)["total"]


# -- datasets ---------------------------------------------------------------------------------------------------------

def test_bad_rows_are_typed_errors_or_counted(env, tmp_path):
    t = env["task"]
    f = tmp_path / "d.jsonl"
    f.write_text('{"id": "a", "text": "Love it", "label": "positive"}\n'
                 '{"id": "b", "text": "", "label": "negative"}\n'
                 '[1, 2]\n'
                 '{"id": "a", "text": "dup", "label": "neutral"}\n'
                 '{"id": "c", "text": "ok", "label": "meh"}\n'
                 '{"id": "d", "text": "ok"\n')
    with pytest.raises(DatasetError) as e:
        pe.load_dataset(f, t)
    assert "d.jsonl:2: missing or empty input field 'text'" in str(e.value) and e.value.details["line"] == 2
    ds = pe.load_dataset(f, t, bad_rows="skip")
    assert len(ds) == 1 and [l for l, _ in ds.skipped] == [2, 3, 4, 5, 6]
    assert "duplicate id" in ds.skipped[2][1] and "not one of" in ds.skipped[3][1] and "not valid JSON" in ds.skipped[4][1]
    c = tmp_path / "d.csv"
    c.write_text("id,text,label\n1,Great stuff,positive\n2,Broke fast,negative,extra\n")
    with pytest.raises(DatasetError, match=r"d.csv:3: 1 more field"):
        pe.load_dataset(c, t)
    assert len(pe.load_dataset(c, t, bad_rows="skip")) == 1


def test_skipped_rows_are_counted_in_the_run(env, tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"text": "Great, love it", "label": "positive"}\nnot json\n{"text": "It broke", "label": "negative"}\n')
    s = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "eval.bad_rows": "skip"}, env={})
    df = pe.evaluate(env["task"], [1], f, settings=s, progress=False)
    run = registry.mlflow_client(s).get_run(df.run_id.iloc[0])
    assert run.data.metrics["n_skipped"] == 1 and run.data.metrics["n_examples"] == 2 and df.accuracy.iloc[0] == 1.0


# -- eval runs --------------------------------------------------------------------------------------------------------

def test_eval_logs_one_run_per_version_with_params_metrics_artifacts(env):
    s, url, t = env["s"], env["url"], env["task"]
    before = calls(url)
    df = pe.evaluate("sentiment", settings=s, progress=False, scorers={"short_answers": lambda d: (d.tokens_out <= 2).mean()})
    assert calls(url) - before == N * len(t.versions)
    assert list(df.index) == sorted(t.versions) and df.n_examples.eq(N).all() and df.error_rate.eq(0).all()
    client = registry.mlflow_client(s)
    exp = client.get_experiment_by_name("t-sentiment")
    ds = pe.load_dataset(t.dataset, t)
    runs = {int(r.data.params["version"]): r for r in client.search_runs(
        [exp.experiment_id], f"tags.`promptsys.kind` = 'eval' and params.dataset_hash = '{ds.hash}'")}
    assert set(runs) == set(t.versions)
    for n, r in runs.items():
        p, m = r.data.params, r.data.metrics
        assert r.info.status == "FINISHED"
        assert (p["task"], p["prompt_hash"], p["provider"], p["model"], p["dataset_hash"], p["dataset_rows"]) == \
               ("sentiment", t.versions[n].hash, "openai", "gpt-4o-mini", ds.hash, str(N))
        assert p["prompt_uri"].startswith("prompts:/t-sentiment/")
        for k in ("accuracy", "f1_macro", "precision_positive", "recall_negative", "format_validity", "latency_p50_ms",
                  "latency_p95_ms", "tokens_per_call", "cost_per_call_usd", "cost_total_usd", "error_rate",
                  "fallback_rate", "retry_rate", "short_answers"):
            assert k in m, k
        assert m["accuracy"] == pytest.approx(df.loc[n, "accuracy"]) and m["cost_per_call_usd"] > 0
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"examples.json", "confusion_matrix.png", "versions_comparison.png", "labels.json", "dataset"} <= arts
        assert [a.path for a in client.list_artifacts(r.info.run_id, "dataset")] == ["dataset/sentiment.jsonl"]
        assert [(i.dataset.name, i.dataset.digest) for i in r.inputs.dataset_inputs] == [("sentiment.jsonl", ds.hash)]
        ex = pe.run_examples(client, r.info.run_id)
        assert [e["id"] for e in ex] == [e.id for e in ds.examples]
        # the fake model answers by keywords: the examples table holds exactly its answers
        assert all(e["predicted"] == keyword_label(t.versions[n].render(text=e["input"])) for e in ex)
        assert json.loads(r.data.tags["mlflow.linkedPrompts"])[0]["name"] == "t-sentiment"
    # the registry holds each version once, tagged with its number and hash
    reg = registry.registry_versions(client, "t-sentiment")
    assert sorted((int(v.tags["version"]), v.tags["hash"]) for v in reg) == sorted((n, v.hash) for n, v in t.versions.items())


def test_rerun_is_served_from_cache_and_registry_is_idempotent(env):
    s, url = env["s"], env["url"]
    pe.evaluate("sentiment", [1, 2], settings=s, progress=False)   # make sure the cache is warm
    client = registry.mlflow_client(s)
    nreg = len(registry.registry_versions(client, "t-sentiment"))
    before = calls(url)
    df = pe.evaluate("sentiment", [1, 2], settings=s, progress=False)
    assert calls(url) == before and df.cache_hit_rate.eq(1.0).all()
    assert len(registry.registry_versions(client, "t-sentiment")) == nreg


def test_repeats_bypass_the_cache_and_measure_consistency(env):
    s, url = env["s"], env["url"]
    pe.evaluate("sentiment", [1], settings=s, progress=False)
    before = calls(url)
    df = pe.evaluate("sentiment", [1], settings=s, repeats=3, progress=False)
    assert calls(url) - before == 2 * N      # first answers from the cache, the 2 repeats fresh
    assert df.consistency.iloc[0] == 1.0     # the keyword model is deterministic


class _Dies:
    "Wraps a provider: raises `exc` on every call after the first `after`."
    def __init__(self, inner, after, exc): self.inner, self.after, self.exc, self.n = inner, after, exc, 0
    def __getattr__(self, k): return getattr(self.inner, k)
    def complete(self, req):
        self.n += 1
        if self.n > self.after: raise self.exc
        return self.inner.complete(req)


@pytest.mark.parametrize("exc,status", [(KeyboardInterrupt, "KILLED"), (RuntimeError("crash"), "FAILED")])
def test_interrupted_eval_ends_its_run_and_resumes_without_requerying(env, tmp_path, exc, status):
    from promptsys.providers import make_provider
    s = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "cache.dir": str(tmp_path / "cache")}, env={})
    url, client = env["url"], registry.mlflow_client(s)
    dying = _Dies(make_provider(s), 5, exc)
    before = calls(url)
    with pytest.raises(type(exc) if isinstance(exc, Exception) else exc):
        pe.evaluate("sentiment", [3], settings=s, provider=dying, concurrency=1, progress=False)
    assert calls(url) - before == 5
    exp_id = client.get_experiment_by_name("t-sentiment").experiment_id
    last = client.search_runs([exp_id], "params.version = '3'", order_by=["attributes.start_time DESC"])[0]
    assert last.info.status == status
    before = calls(url)
    df = pe.evaluate("sentiment", [3], settings=s, concurrency=1, progress=False)
    assert calls(url) - before == N - 5 and df.cache_hit_rate.iloc[0] == pytest.approx(5 / N)


def test_runs_left_running_by_a_killed_process_are_marked_killed(env):
    s = env["s"]
    client = registry.mlflow_client(s)
    exp_id = client.get_experiment_by_name("t-sentiment").experiment_id
    p = subprocess.Popen([sys.executable, "-c", "pass"]); p.wait()      # a pid that is certainly dead
    run = client.create_run(exp_id, tags={"promptsys.kind": "eval", "promptsys.pid": str(p.pid),
                                          "promptsys.host": socket.gethostname()})
    mine = client.create_run(exp_id, tags={"promptsys.pid": str(os.getpid()), "promptsys.host": socket.gethostname()})
    pe.evaluate("sentiment", [1], settings=s, progress=False)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_run(mine.info.run_id).info.status == "RUNNING"     # a live process's run is left alone
    client.set_terminated(mine.info.run_id, "FINISHED")


def test_compare_reads_back_the_latest_runs(env):
    s = env["s"]
    df = pe.compare("sentiment", s)
    assert set(df.index) == set(env["task"].versions)
    assert {"accuracy", "latency_p95_ms", "cost_per_call_usd", "run_id", "dataset_hash"} <= set(df.columns)
    fig = pe.compare_figure(df)
    assert len(fig.axes) == 2


def test_unreachable_tracking_server_is_a_fast_typed_error(env):
    s = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "mlflow.tracking_uri": "http://127.0.0.1:9"}, env={})
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable"):
        pe.evaluate("sentiment", [1], settings=s, progress=False)
    assert time.monotonic() - t0 < 30


def test_cli_eval(env, capsys):
    from promptsys.cli import main
    sets = [x for k, v in env["ov"].items() for x in ("--set", f"{k}={v}")]
    assert main([*sets, "eval", "sentiment", "--versions", "1,2", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "v1_bare" in out and "v2_role_format" in out and "t-sentiment" in out


def test_eval_notebook_runs_under_papermill(env):
    import papermill as pm
    from promptsys.schedule import notebook_result
    out = env["tmp"] / "runs" / "eval_out.ipynb"
    out.parent.mkdir(exist_ok=True)
    pm.execute_notebook(str(ROOT / "experiments/eval_prompts.ipynb"), str(out), kernel_name="python3", language="python",
                        cwd=str(ROOT / "experiments"), progress_bar=False,
                        parameters=dict(task="sentiment", versions=[1, 4], sample_size=6, repeats=1,
                                        settings_path=str(ROOT / "settings.ini"), overrides=env["ov"]))
    res = notebook_result(out)
    assert res["ok"] and res["errors"] == 0 and set(res["runs"]) == {"1", "4"}
    client = registry.mlflow_client(env["s"])
    for rid in res["runs"].values():
        r = client.get_run(rid)
        assert r.info.status == "FINISHED" and r.data.params["dataset_rows"] == "6"
    # the committed notebook has no outputs; the executed one does
    src = json.loads((ROOT / "experiments/eval_prompts.ipynb").read_text())
    assert all(not c.get("outputs") for c in src["cells"] if c["cell_type"] == "code")
    assert src["cells"][1]["metadata"]["tags"] == ["parameters"]


def test_ctrl_c_on_the_cli_marks_the_run_killed_and_the_rerun_resumes(env, tmp_path):
    "A real SIGINT to a real `promptsys eval` process."
    import signal
    from tests.fakeserver import control
    ov = {**env["ov"], "cache.dir": str(tmp_path / "cache"), "eval.concurrency": "1"}
    sets = [x for k, v in ov.items() for x in ("--set", f"{k}={v}")]
    url = env["url"]
    control(url, delay_ms=700)
    try:
        before = calls(url)
        p = subprocess.Popen([sys.executable, "-c", "import sys; from promptsys.cli import main; sys.exit(main())", *sets, "eval", "sentiment", "--versions", "2"],
                             cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        t0 = time.monotonic()
        while calls(url) - before < 3 and time.monotonic() - t0 < 60: time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally: control(url, delay_ms=0)
    assert p.returncode == 130, err[-2000:]
    served = calls(url) - before
    assert 3 <= served < N
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    client = registry.mlflow_client(s)
    exp_id = client.get_experiment_by_name("t-sentiment").experiment_id
    last = client.search_runs([exp_id], "params.version = '2'", order_by=["attributes.start_time DESC"])[0]
    assert last.info.status == "KILLED"
    before = calls(url)
    pe.evaluate("sentiment", [2], settings=s, progress=False)
    assert calls(url) - before in (N - served, N - served + 1)   # at most the call in flight at Ctrl-C is asked again


# -- durability (issue 8): the eval logs each version's run while the next one runs, in a child process ------------

def _complete(client, run) -> bool:
    "A run has everything an eval logs: its metrics, examples table, labels report and both figures."
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    return ("accuracy" in run.data.metrics and "f1_macro" in run.data.metrics
            and {"examples.json", "labels.json", "confusion_matrix.png", "versions_comparison.png", "dataset"} <= arts)


def _gone(pgid: int, timeout: float = 60) -> bool:
    "Wait until every process of the group has exited (the MLflow worker outlives a killed eval briefly)."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try: os.killpg(pgid, 0)
        except ProcessLookupError: return True
        time.sleep(0.05)
    return False


def _finished(db: Path) -> set:
    import sqlite3
    if not db.exists(): return set()                          # the first eval's worker has not created it yet
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try: return {r[0] for r in con.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED'")}
    except sqlite3.OperationalError: return set()             # its schema is still being created
    finally: con.close()


def _children(pid: int) -> list:
    try: return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError: return []


def _alive(pid: int) -> bool:
    "Running (not exited, not a zombie waiting for its reaper)."
    try: st = Path(f"/proc/{pid}/stat").read_text()
    except OSError: return False
    return st.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids, timeout: float = 60) -> bool:
    t0 = time.monotonic()
    while any(_alive(p) for p in pids):
        if time.monotonic() - t0 > timeout: return False
        time.sleep(0.05)
    return True


def test_kill_9_at_any_moment_leaves_no_finished_run_incomplete(env, tmp_path):
    "SIGKILL a real `promptsys eval` (3 versions) at moments spread over its life — and at the moment its first run "
    "turns FINISHED (in its MLflow worker, which outlives the command: [eval] tracking = background); the eval "
    "process alone, or it and its worker together. No FINISHED run lacks anything, and the next eval leaves no run "
    "RUNNING and no spool entry behind."
    import signal
    from tests.fakeserver import control
    db = tmp_path / "mlflow.db"
    ov = {**env["ov"], "mlflow.tracking_uri": f"sqlite:///{db}", "cache.enabled": "false", "eval.concurrency": "2",
          "promptsys.state_dir": str(tmp_path / "state")}
    sets = [x for k, v in ov.items() for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "promptsys.cli", *sets, "eval", "sentiment", "--versions", "1,2,3"]
    envp = {**os.environ, "PYTHONPATH": str(ROOT)}
    control(env["url"], delay_ms=60)
    lingering = []
    try:
        lives = []
        for _ in range(2):                                   # one eval from start to exit (the faster of two: the
            t0 = time.monotonic()                            # first one's cold start), the kills spread over it
            subprocess.run(cmd, cwd=tmp_path, env=envp, capture_output=True, check=True)
            lives.append(time.monotonic() - t0)
        whole = min(lives)
        for i, when in enumerate((0.3, "first FINISHED", 0.7, 0.95)):
            before = _finished(db)
            p = subprocess.Popen(cmd, cwd=tmp_path, env=envp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            workers = []
            def watch():                                      # the eval's MLflow worker, once it is forked
                workers.extend(c for c in _children(p.pid) if c not in workers)
            t1 = time.monotonic()
            if isinstance(when, float):
                while time.monotonic() - t1 < whole * when and p.poll() is None: watch(); time.sleep(0.005)
            else:                                             # the moment a run of this eval is marked FINISHED
                while not _finished(db) - before and (p.poll() is None or any(map(_alive, workers))):
                    if p.poll() is None: watch()
                    time.sleep(0.005)
            if i % 2:                                         # the eval and its worker at once
                for pid in [p.pid, *workers]:
                    try: os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError: pass
            else:                                             # the eval alone: its worker sees it gone
                try: os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError: pass               # it was quicker this time: already gone, no kill
            p.wait()
            assert _gone(p.pid)
            lingering += workers
        assert _wait_gone(lingering)                          # the workers of evals killed alone have ended
    finally: control(env["url"], delay_ms=0)
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    client = registry.mlflow_client(s, pending=False)
    exp_id = client.get_experiment_by_name("t-sentiment").experiment_id
    runs = client.search_runs([exp_id], max_results=1000)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) >= 3 and all(_complete(client, r) for r in finished)
    pe.evaluate("sentiment", [1], settings=s, progress=False, limit=2)     # the next start
    left = [r.info.run_id for r in client.search_runs([exp_id], "attributes.status = 'RUNNING'")]
    assert left == []
    runs = client.search_runs([exp_id], max_results=1000)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED", "FAILED"}
    assert all(_complete(client, r) for r in runs if r.info.status == "FINISHED")
    assert list((tmp_path / "state" / "tracking-spool").iterdir()) == []


def _open_store(db: Path) -> list:
    "Processes that each open a new MLflow client on `db` (and read it), as evals and their workers do."
    code = ("import sys; from promptsys.config import load_settings; from promptsys import registry; "
            f"s = load_settings({str(ROOT / 'settings.ini')!r}, overrides={{'mlflow.tracking_uri': 'sqlite:///{db}'}}, "
            "env={}); registry.mlflow_client(s, pending=False).search_experiments(); print('ok')")
    envp = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return [sys.executable, "-c", code], envp


def _tables(db: Path) -> set:
    import sqlite3
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try: return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally: con.close()


def test_processes_creating_one_new_store_at_once_all_open_it(tmp_path):
    "Three processes open one new sqlite store at the same moment (an eval's worker and the next eval did, in CI). "
    "MLflow alone lets each run the schema migrations on the one file (`table _alembic_tmp_experiments already "
    "exists`, `expected to match one row ... in 'alembic_version'`); promptsys makes the store in a private file "
    "and links it, so all three open it."
    for k in range(3):
        db = tmp_path / f"mlflow{k}.db"
        cmd, envp = _open_store(db)
        ps = [subprocess.Popen(cmd, env=envp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
        outs = [p.communicate(timeout=300) for p in ps]
        assert [o.strip() for o, _ in outs] == ["ok"] * 3, [e[-600:] for _, e in outs]
        assert not [t for t in _tables(db) if t.startswith("_alembic_tmp")]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no private copy left


def test_kill_9_while_a_new_store_is_made_leaves_no_half_store(tmp_path):
    "SIGKILL a process in the middle of creating a new store's tables: the store's name never appears on a half-made "
    "database, and the next process creates it whole (and removes the killed one's private file)."
    import signal
    db = tmp_path / "mlflow.db"
    cmd, envp = _open_store(db)
    p = subprocess.Popen(cmd, env=envp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:     # the private file has some tables, not all
        tmp = list(tmp_path.glob(".mlflow.db.*.init"))
        if tmp and tmp[0].stat().st_size > 64 * 1024: break
        time.sleep(0.002)
    assert p.poll() is None, "the store was made before the kill: nothing was tested"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not db.exists() and list(tmp_path.glob(".mlflow.db.*.init"))
    out = subprocess.run(cmd, env=envp, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-600:]
    assert {"experiments", "runs", "registered_models", "alembic_version"} <= _tables(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


# -- issue 17: the command exits once its eval is spooled; the worker logs the runs after it ------------------------

def _cli_env(env, tmp_path):
    db = tmp_path / "mlflow.db"
    ov = {**env["ov"], "mlflow.tracking_uri": f"sqlite:///{db}", "cache.enabled": "false",
          "promptsys.state_dir": str(tmp_path / "state")}
    sets = [x for k, v in ov.items() for x in ("--set", f"{k}={v}")]
    return db, ov, [sys.executable, "-m", "promptsys.cli", *sets], {**os.environ, "PYTHONPATH": str(ROOT)}


def _eval_runs(db: Path) -> list:
    "(run id, status, version, dataset_rows, superseded) of every run in the store."
    import sqlite3
    if not db.exists(): return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        q = """SELECT r.run_uuid, r.status, v.value, n.value, (SELECT value FROM tags WHERE run_uuid = r.run_uuid
               AND key = 'promptsys.superseded') FROM runs r LEFT JOIN params v ON v.run_uuid = r.run_uuid
               AND v.key = 'version' LEFT JOIN params n ON n.run_uuid = r.run_uuid AND n.key = 'dataset_rows'"""
        return con.execute(q).fetchall()
    except sqlite3.OperationalError: return []                # the schema is still being created
    finally: con.close()


def _run_cli(cli, tmp_path, envp, *args):
    "Run the promptsys CLI (`cli` from `_cli_env`) in `tmp_path`; its completed process, asserted successful."
    r = subprocess.run([*cli, *args], cwd=tmp_path, env=envp, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_eval_command_exits_before_its_runs_are_logged(env, tmp_path):
    "`promptsys eval` exits once its eval is durably spooled: its output pipes close at its exit (the worker holds "
    "none of them), the spool entry is there right after, its worker is in a session of its own, and the runs "
    "appear FINISHED and complete afterwards, the entry removed."
    db, ov, cli, envp = _cli_env(env, tmp_path)
    r = _run_cli(cli, tmp_path, envp, "eval", "sentiment", "--versions", "1,2,3")
    exited = time.monotonic()
    spool = tmp_path / "state" / "tracking-spool"
    entries = list(spool.iterdir())
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()       # handed over, not logged yet
    m = json.loads((entries[0] / "manifest.json").read_text())
    assert m["versions"] == [1, 2, 3] and os.getsid(m["worker_pid"]) == m["worker_pid"]
    assert f"background process (pid {m['worker_pid']})" in r.stdout and "run_id" not in r.stdout
    assert [x for x in _eval_runs(db) if x[1] == "FINISHED"] == []
    while (list(spool.iterdir()) or _alive(m["worker_pid"])) and time.monotonic() - exited < 90: time.sleep(0.05)
    assert list(spool.iterdir()) == [] and not _alive(m["worker_pid"])
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    client = registry.mlflow_client(s)
    runs = client.search_runs([client.get_experiment_by_name("t-sentiment").experiment_id])
    assert sorted(r.data.params["version"] for r in runs) == ["1", "2", "3"]
    assert all(r.info.status == "FINISHED" and _complete(client, r) for r in runs)


def test_eval_command_waits_for_its_runs_with_tracking_wait(env, tmp_path):
    "`[eval] tracking = wait`: the command returns once every run is FINISHED, and prints their ids."
    db, ov, cli, envp = _cli_env(env, tmp_path)
    r = _run_cli(cli, tmp_path, envp, "--set", "eval.tracking=wait", "eval", "sentiment", "--versions", "1,2")
    runs = _eval_runs(db)
    assert sorted(x[2] for x in runs) == ["1", "2"] and {x[1] for x in runs} == {"FINISHED"}
    assert "run_id" in r.stdout and all(x[0] in r.stdout for x in runs) and "background" not in r.stdout
    assert list((tmp_path / "state" / "tracking-spool").iterdir()) == []


@pytest.mark.parametrize("when,then", [("at once", "promote"), ("runs started", "eval")])
def test_a_killed_background_worker_loses_no_run(env, tmp_path, when, then):
    "kill -9 the worker an eval left behind — right after the command exits, or once it has started the runs — and "
    "the next command that reads runs (`promote`, or a second eval) logs every run from the spool: each version's "
    "latest run FINISHED and complete, the dead worker's runs KILLED and marked superseded, the spool empty."
    import signal
    db, ov, cli, envp = _cli_env(env, tmp_path)
    _run_cli(cli, tmp_path, envp, "eval", "sentiment", "--versions", "1,2,3")
    spool = tmp_path / "state" / "tracking-spool"
    [entry] = list(spool.iterdir())
    worker = json.loads((entry / "manifest.json").read_text())["worker_pid"]
    t0 = time.monotonic()
    while when == "runs started" and time.monotonic() - t0 < 60:
        if [x for x in _eval_runs(db) if x[1] == "RUNNING"]: break
        time.sleep(0.005)
    os.kill(worker, signal.SIGKILL)
    assert _wait_gone([worker])
    assert (entry / "manifest.json").is_file()                 # nothing logged is lost: the spool is still there
    if when == "runs started": assert [x for x in _eval_runs(db) if x[1] == "RUNNING"]
    if then == "promote":
        r = _run_cli(cli, tmp_path, envp, "promote", "sentiment", "--dry-run")
        assert "would promote" in r.stdout, r.stdout
    else:
        _run_cli(cli, tmp_path, envp, "eval", "sentiment", "--versions", "1", "--limit", "2")
        t0 = time.monotonic()
        while list(spool.iterdir()) and time.monotonic() - t0 < 90: time.sleep(0.05)
    assert list(spool.iterdir()) == []
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    client = registry.mlflow_client(s)
    runs = client.search_runs([client.get_experiment_by_name("t-sentiment").experiment_id], max_results=1000)
    full = [r for r in runs if r.data.params.get("dataset_rows") == str(N)]
    done = [r for r in full if r.info.status == "FINISHED"]
    assert sorted(r.data.params["version"] for r in done) == ["1", "2", "3"] and all(_complete(client, r) for r in done)
    rest = [r for r in full if r.info.status != "FINISHED"]
    superseded = [r for r in runs if r.data.tags.get("promptsys.superseded") == "true"]     # the dead worker's
    assert all(r in superseded for r in rest) and all(r.info.status == "KILLED" for r in superseded)
    if when == "runs started": assert superseded
    assert not [r for r in runs if r.info.status == "RUNNING"]
