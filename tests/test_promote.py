"""Issue 3 (promotion): the gate, impact analysis, promote / stage / rollback through MLflow prompt aliases, the audit
trail, the task README, serving an alias with MLflow down, the regression watch, the CLI and `promptsys schedule`
(real papermill executions of both experiments notebooks) — on a real sqlite MLflow store in a temp dir.

The model is the fake OpenAI-compatible server (keyword answers), so winners and losers are known in advance: in the
toy task "reviews", v1 shows the model the review (right on all 12 examples) and v2 always ends with a glowing review
(always "positive": right on 4 of 12)."""
import json, os, shutil, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from promptsys.config import load_settings
from promptsys.errors import PromptNotFound
from promptsys.prompts import load_task
from promptsys.pipeline import Pipeline
from promptsys import evaluation as pe, promotion as pp, registry, schedule
from tests.fakeserver import start_server, stop_server, stats, control
from tests.test_eval import _overrides as eval_overrides

TEXTS = {"positive": ["I love it", "Great value", "Excellent work", "Perfect fit"],
         "negative": ["It broke", "Terrible smell", "I want a refund", "Worst ever"],
         "neutral": ["It is blue", "Arrived Monday", "Weighs 2 kg", "Has a lid"]}


def toy_task(prompts: Path):
    d = prompts / "reviews"; (d / "data").mkdir(parents=True)
    (d / "task.toml").write_text('name = "reviews"\ndescription = "Toy sentiment task."\n[output]\nkind = "label"\n'
                                 'labels = ["positive", "negative", "neutral"]\n[dataset]\npath = "data/d.jsonl"\n'
                                 '[versions]\n1 = "Reads the review."\n2 = "Always ends on a glowing review."\n')
    (d / "v1_reads.txt").write_text("Sentiment of this review?\nReview: {{text}}\nSentiment:")
    (d / "v2_glowing.txt").write_text("Sentiment of this review?\nReview: {{text}}\nReview: I love it.\nSentiment:")
    rows = [dict(id=f"{l[:3]}{i}", text=x, label=l) for l, xs in TEXTS.items() for i, x in enumerate(xs)]
    (d / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _overrides(tmp: Path, url: str) -> dict:
    return {**eval_overrides(tmp, url), "gate.max_cost_increase": "0.5", "mlflow.alias_cache_seconds": "0",
            # the fake server answers in ~1 ms: p95 over 12 calls is pure scheduler noise on a loaded machine
            "gate.max_p95_latency_increase": "100"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promote")
    toy_task(tmp / "prompts")
    proc, url = start_server("--delay-ms", "0")
    ov = _overrides(tmp, url)
    s = load_settings(ROOT / "settings.ini", overrides=ov, env={})
    try: yield dict(tmp=tmp, url=url, s=s, ov=ov)
    finally: stop_server(proc)


def task(env): return load_task("reviews", env["tmp"] / "prompts")
def audit(env): return pp.history("reviews", env["s"])
def alias_version(env, alias):
    rv = registry.current_alias(registry.mlflow_client(env["s"]), task(env), alias, env["s"])
    return None if rv is None else int(rv.tags["version"])


def test_mcnemar_and_bootstrap():
    assert pp.mcnemar_exact(0, 0) == 1.0
    assert pp.mcnemar_exact(0, 8) == pytest.approx(2 / 256)
    assert pp.mcnemar_exact(8, 0) == pytest.approx(2 / 256)          # two-sided; the gate also needs c > b
    assert pp.mcnemar_exact(10, 10) == 1.0
    lo, hi = pp.bootstrap_ci([1] * 8 + [0] * 4, 1000)
    assert 0 < lo <= 8 / 12 <= hi <= 1
    assert pp.bootstrap_ci([1, -1] * 10, 1000)[0] < 0


def test_bootstrap_is_fast_at_5000_paired_examples():
    "Issue 6: the pure-Python bootstrap took 5.8 s at n = 5,000 (2,000 resamples); numpy takes ~0.1 s."
    import random, time
    r = random.Random(1)
    diffs = [r.choice([-1, 0, 0, 0, 1]) for _ in range(5000)]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter(); lo, hi = pp.bootstrap_ci(diffs); best = min(best, time.perf_counter() - t)
    assert lo < sum(diffs) / len(diffs) < hi and best <= 0.5, best


def test_two_clones_promoting_against_one_tracking_server_keep_every_audit_entry(tmp_path):
    "Issue 6: audit tags were numbered by each clone's audit.jsonl line count, so two clones overwrote each other's."
    proc, url = start_server("--delay-ms", "0")
    try:
        clones = []
        for name in ("a", "b"):                      # two checkouts, each with its own prompts/ and audit.jsonl ...
            toy_task(tmp_path / name / "prompts")
            ov = {**_overrides(tmp_path / name, url), "mlflow.tracking_uri": f"sqlite:///{tmp_path}/shared.db"}
            clones.append(load_settings(ROOT / "settings.ini", overrides=ov, env={}))   # ... one tracking store
        a, b = clones
        pe.evaluate("reviews", settings=a, progress=False)
        assert pp.promote("reviews", 2, settings=a, force=True, user="ann", reason="a1").moved
        assert pp.promote("reviews", 1, settings=b, user="bo", reason="b1").moved
        pp.stage("reviews", 2, settings=a, user="ann", reason="a2")
        pp.rollback("reviews", settings=b, user="bo", reason="b2")
    finally: stop_server(proc)
    assert [[e["reason"] for e in pp.history("reviews", s)] for s in clones] == [["a1", "a2"], ["b1", "b2"]]
    tags = registry.mlflow_client(a).get_prompt("t-reviews").tags
    assert len([k for k in tags if k.startswith("audit.")]) == 4                     # nothing overwritten
    assert [(e["user"], e["reason"]) for e in pp.registry_history("reviews", b)] == \
           [("ann", "a1"), ("bo", "b1"), ("ann", "a2"), ("bo", "b2")]
    from promptsys.cli import main                     # the CLI: this checkout's trail, or the team's with --registry
    sets = [x for k, v in {**_overrides(tmp_path / "b", url), "mlflow.tracking_uri": f"sqlite:///{tmp_path}/shared.db"}
            .items() for x in ("--set", f"{k}={v}")]
    import contextlib, io
    for flag, want in (([], ["b1", "b2"]), (["--registry"], ["a1", "b1", "a2", "b2"])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf): assert main([*sets, "history", "reviews", "--json", *flag]) == 0
        assert [json.loads(l)["reason"] for l in buf.getvalue().splitlines()] == want, flag


def test_promotion_lifecycle(env):
    s = env["s"]
    # 1. only v2 evaluated, no production: the best evaluated version passes and is promoted
    pe.evaluate("reviews", [2], settings=s, progress=False)
    pr = pp.promote("reviews", settings=s, reason="first", user="alice")
    assert pr.moved and pr.decision.passed and pr.decision.candidate == 2 and pr.decision.production is None
    assert alias_version(env, "production") == 2 and alias_version(env, "previous") is None
    assert Pipeline("reviews", "production", settings=s).prompt.number == 2
    assert json.loads((task(env).dir / "aliases.json").read_text())["aliases"]["production"]["version"] == 2

    # 2. v1 evaluated: dry run passes with its reasons and logs the impact report to v1's run, moves nothing
    df = pe.evaluate("reviews", [1], settings=s, progress=False)
    assert df.accuracy.iloc[0] == 1.0
    dry = pp.promote("reviews", settings=s, dry_run=True)
    d = dry.decision
    assert (dry.moved, d.passed, d.candidate, d.production) == (False, True, 1, 2), d.reasons
    assert d.stats["b_prod_only"] == 0 and d.stats["c_cand_only"] == 8 and d.stats["p_value"] == pytest.approx(2 / 256)
    assert d.stats["ci_low"] > 0 and all(r.startswith(("✓", "-", "!")) for r in d.reasons)
    assert alias_version(env, "production") == 2 and len(audit(env)) == 1
    client = registry.mlflow_client(s)
    arts = [a.path for a in client.list_artifacts(df.run_id.iloc[0], "impact")]
    assert "impact/vs_v2.json" in arts
    imp = dry.impact
    assert len(imp.flips) == 8 and {f["change"] for f in imp.flips} == {"wrong→right"}
    assert {f["input"] for f in imp.flips} == set(TEXTS["negative"] + TEXTS["neutral"])
    assert {l["label"]: l["delta"] for l in imp.per_label} == {"positive": 0.0, "negative": 1.0, "neutral": 1.0}
    assert imp.projection["daily_calls"] == 12 and imp.projection["candidate_cost_per_call_usd"] < imp.projection["baseline_cost_per_call_usd"]

    # the other gate checks refuse too, each with its reason: a cost rise, a p95 latency rise
    strict = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "gate.max_cost_increase": "-0.5",
                                                              "gate.max_p95_latency_increase": "-1"}, env={})
    sd = pp.gate("reviews", 1, settings=strict)
    assert not sd.passed
    assert any(r.startswith("✗ cost per call") for r in sd.reasons) and any(r.startswith("✓ McNemar") for r in sd.reasons)
    assert any(r.startswith(("✗ p95 latency", "✓ p95 latency")) and "noise" in r for r in sd.reasons)

    # 3. promote for real: production v1, previous v2
    pr = pp.promote("reviews", settings=s, reason="v1 wins", user="bob")
    assert pr.moved and alias_version(env, "production") == 1 and alias_version(env, "previous") == 2

    # 4. the losing candidate is refused, with reasons, and nothing moves
    bad = pp.promote("reviews", 2, settings=s, user="carol")
    assert not bad.moved and not bad.decision.passed
    assert any(r.startswith("✗ accuracy gain -0.667") for r in bad.decision.reasons)
    assert any(r.startswith("✗ McNemar") for r in bad.decision.reasons)
    assert alias_version(env, "production") == 1 and len(audit(env)) == 2

    # 5. stage, then rollback restores the previous production version in one command
    pp.stage("reviews", 2, settings=s, user="dave", reason="try again")
    assert alias_version(env, "staging") == 2
    assert Pipeline("reviews", "staging", settings=s).prompt.number == 2
    e = pp.rollback("reviews", settings=s, reason="customer complaints", user="erin")
    assert (e["from"], e["to"]) == (1, 2)
    assert alias_version(env, "production") == 2 and alias_version(env, "previous") == 1
    assert Pipeline("reviews", "production", settings=s).prompt.number == 2

    # 6. the audit trail records every move: in the repo file and as MLflow tags
    h = audit(env)
    assert [(x["action"], x["from"], x["to"], x["user"]) for x in h] == \
           [("promote", None, 2, "alice"), ("promote", 2, 1, "bob"), ("stage", None, 2, "dave"), ("rollback", 1, 2, "erin")]
    assert h[1]["gate"]["passed"] and h[1]["run_ids"]["to"] == df.run_id.iloc[0] and h[1]["reason"] == "v1 wins"
    assert h[1]["to_hash"] == task(env).versions[1].hash
    assert [x["action"] for x in pp.registry_history("reviews", s)] == ["promote", "promote", "stage", "rollback"]
    assert all(pp.AUDIT_TAG.match(k) for k in client.get_prompt("t-reviews").tags if k.startswith("audit."))

    # 7. the README is generated from MLflow: statuses, numbers and notes
    readme = (task(env).dir / "README.md").read_text()
    assert "| v2 | [`v2_glowing.txt`](v2_glowing.txt) | **production** |" in readme
    assert "| v1 | [`v1_reads.txt`](v1_reads.txt) | **retired** |" in readme and "| 1.000 |" in readme
    assert "Reads the review." in readme and "customer complaints" in readme


def test_serving_survives_an_unreachable_tracking_server(env):
    s = env["s"]
    expected = alias_version(env, "production")
    assert expected is not None
    down = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "mlflow.tracking_uri": "http://127.0.0.1:9"}, env={})
    p = Pipeline("reviews", "production", settings=down)
    assert p.prompt.number == expected and p.run("I love it").label == "positive"
    f = task(env).dir / "aliases.json"
    registry.stop_live()          # a fresh process: nothing known in memory either; and first, so that no live
    saved = f.read_text(); f.unlink()   # refresh of an earlier test (on the reachable store) writes the file back
    try:
        with pytest.raises(PromptNotFound, match="unreachable"):
            Pipeline("reviews", "production", settings=down)
    finally: f.write_text(saved)
    # a missing sqlite store counts as unreachable too (never created on the serving path)
    gone = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "mlflow.tracking_uri": f"sqlite:///{env['tmp']}/nope.db"}, env={})
    assert Pipeline("reviews", "production", settings=gone).prompt.number == expected
    assert not (env["tmp"] / "nope.db").exists()


def test_regression_watch_alerts_and_rolls_back(env):
    s = env["s"]
    pp.promote("reviews", 1, settings=s, user="frank")                 # v1 (accuracy 1.0) back in production
    assert alias_version(env, "production") == 1
    ok = schedule.watch("reviews", settings=s)
    assert (ok["regression"], ok["accuracy"]) == (False, 1.0)
    control(env["url"], answer_mode="fixed", answer="neutral")          # the "model" degrades
    try:
        w = schedule.watch("reviews", settings=s, auto_rollback=True)
    finally: control(env["url"], answer_mode="keyword")
    assert w["regression"] and w["recorded_accuracy"] == 1.0 and w["accuracy"] == pytest.approx(4 / 12)
    assert w["rolled_back"] and alias_version(env, "production") == 2
    assert audit(env)[-1]["action"] == "rollback" and audit(env)[-1]["user"] == "promptsys-watch"
    pp.promote("reviews", 1, settings=s, user="frank", force=True, reason="restore after the watch test")
    pe.evaluate("reviews", [1], settings=s, progress=False)              # a fresh, healthy latest run for v1


def test_cli_history_diff_stage_and_ui_help(env, capsys):
    from promptsys.cli import main
    sets = [x for k, v in env["ov"].items() for x in ("--set", f"{k}={v}")]
    assert main([*sets, "history", "reviews"]) == 0
    out = capsys.readouterr().out
    assert "rollback v1 → v2  by erin" in out and out.count("\n") == len(audit(env))
    assert main([*sets, "diff", "reviews", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 broken (right→wrong)" in out and "Terrible smell" in out and "per label" in out
    assert main([*sets, "promote", "reviews", "--version", "2", "--dry-run"]) == 1    # refused → non-zero
    assert "REFUSED" in capsys.readouterr().out
    assert main([*sets, "stage", "reviews", "2"]) == 0 and alias_version(env, "staging") == 2
    with pytest.raises(SystemExit) as e:
        main(["ui", "--help"])
    assert e.value.code == 0 and "--port" in capsys.readouterr().out


def test_schedule_runs_both_notebooks_with_papermill(env, capsys):
    from promptsys.cli import main
    sets = [x for k, v in env["ov"].items() for x in ("--set", f"{k}={v}")]
    # production (v1) is the best: nothing to promote, no regression → exit 0
    code = main(["--settings", str(ROOT / "settings.ini"), *sets, "schedule", "reviews"])
    out = capsys.readouterr().out
    assert code == 0, out
    outs = sorted((env["tmp"] / "runs").glob("*_reviews_*.ipynb"))
    assert [p.name.split("_", 2)[-1] for p in outs] == ["eval_prompts.ipynb", "promote.ipynb"]
    res = schedule.notebook_result(outs[1])
    assert res["ok"] and res["noop"] and res["candidate"] == 1 and res["dry_run"]
    ev = schedule.notebook_result(outs[0])
    assert ev["ok"] and ev["errors"] == 0 and set(ev["runs"]) == {"1", "2"}
    assert '"regression": false' in out
    # issue 6: both executed notebooks are artifacts of the eval runs the scheduled run produced, and those runs say so
    client, stamp = registry.mlflow_client(env["s"]), outs[0].name.split("_", 1)[0]
    for rid in ev["runs"].values():
        assert sorted(a.path for a in client.list_artifacts(rid, "scheduled")) == [f"scheduled/{p.name}" for p in outs]
        assert client.get_run(rid).data.tags["promptsys.scheduled"] == stamp
    got = client.download_artifacts(ev["runs"]["1"], f"scheduled/{outs[0].name}", str(env["tmp"] / "downloaded"))
    assert schedule.notebook_result(got) == ev                            # the executed copy, outputs and all
    # a refused gate makes the scheduled run fail: put the worse v2 in production, demand an impossible gain
    pp.promote("reviews", 2, settings=env["s"], force=True, user="test")
    code = main(["--settings", str(ROOT / "settings.ini"), *sets, "--set", "gate.min_gain=0.9", "schedule", "reviews", "--no-watch"])
    out = capsys.readouterr().out
    assert code == 1 and "REFUSED" in out and "min gain 0.900" in out
    assert alias_version(env, "production") == 2                         # dry run by default: nothing moved


def test_promote_notebook_promotes_when_not_dry_run(env):
    res = schedule.run_notebook(ROOT / "experiments/promote.ipynb", env["tmp"] / "runs" / "promote_real.ipynb",
                          dict(task="reviews", dry_run=False, reason="notebook", settings_path=str(ROOT / "settings.ini"),
                               overrides=env["ov"]))
    assert res["ok"] and res["moved"] and (res["candidate"], res["production"]) == (1, 2)
    assert alias_version(env, "production") == 1 and audit(env)[-1]["reason"] == "notebook"


def test_demo_on_a_copy_of_the_sentiment_task(tmp_path, capsys):
    "README command 1 on the fake model (the real one is exercised by `promptsys demo` itself)."
    shutil.copytree(ROOT / "prompts" / "sentiment", tmp_path / "prompts" / "sentiment",
                    ignore=shutil.ignore_patterns("README.md", "aliases.json", "audit.jsonl"))
    proc, url = start_server("--delay-ms", "0")
    try:
        s = load_settings(ROOT / "settings.ini", overrides=_overrides(tmp_path, url), env={})
        assert pp.demo("sentiment", s, limit=6) == 0
    finally: stop_server(proc)
    out = capsys.readouterr().out
    assert "gate PASSED" in out and "promptsys ui" in out and "v3_few_shot" in out
    d = tmp_path / "prompts" / "sentiment"
    assert "**production**" in (d / "README.md").read_text() and len((d / "audit.jsonl").read_text().splitlines()) == 1
