"""Issue 13 (scorers): declared scoring, continuous per-example scores in the gate, an LLM judge.

`parcel` is a json task scored as the shipped `extraction` is: `[scoring] primary = "field_mean"`, `items`
compared as a set. Its two versions answer through the fake server's echo mode (the answer is whatever follows
the last "Echo:" of the prompt), each echoing its own draft column of the dataset, so every answer — and so
every score — is known before the run. v2's drafts get more fields and more items right than v1's on most
rows without being perfect anywhere: an exact-match accuracy cannot tell them apart (both 0), the per-example
`field_mean` can, and the gate decides on its paired bootstrap interval instead of McNemar.

`blurb` is a text task with the `contains` and `regex` scorers and a judge: `rater`, a promptsys task of its
own (json, a 1..5 score) that the fake server also answers by echo. The judge runs on the embedded model too
(greedy: the same ratings on every run)."""
from __future__ import annotations
import json, os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from promptsys.config import load_settings
from promptsys.errors import ConfigError
from promptsys.prompts import load_task
from promptsys import evaluation as pe, promotion as pp, registry
from tests.fakeserver import start_server, stop_server, control

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["order_id", "items", "action"],
          "properties": {"order_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                         "items": {"type": "array", "items": {"type": "object", "required": ["name", "quantity"],
                                   "properties": {"name": {"type": "string"},
                                                  "quantity": {"type": "integer", "minimum": 1}}}},
                         "action": {"enum": ["return", "refund", "track"]}}}


def _items(*pairs): return [{"name": n, "quantity": q} for n, q in pairs]


def parcel_rows() -> list[dict]:
    "24 orders; v1's drafts (column a) and v2's (column b), scored by hand in `WANT`."
    rows = []
    for i in range(24):
        exp = {"order_id": f"P-{i:03d}", "items": _items(("mug", 2), ("lid", 1), ("tray", 1)), "action": "return"}
        a = dict(exp, items=_items(("mug", 2)), action="refund")                           # 1 of 3 items, wrong action
        b = dict(exp, items=_items(("mug", 2), ("lid", 1)), action="return", order_id=None)  # 2 of 3 items, no id
        if i >= 18: a, b = b, a                                                            # v1 better on 6 rows
        rows.append(dict(id=f"p{i}", email=f"Order P-{i:03d}: mug x2, lid, tray. Please take them back.",
                         a=json.dumps(a), b=json.dumps(b), expected=exp))
    return rows

# per-row field_mean: order_id, items (set F1), action
A_SCORE = (1 + 2 * (1 / 3) * 1 / (1 / 3 + 1) + 0) / 3          # id right, items F1 (p=1, r=1/3) = 0.5, action wrong
B_SCORE = (0 + 2 * (2 / 3) * 1 / (2 / 3 + 1) + 1) / 3          # id missing, items F1 0.8, action right
WANT = {1: (18 * A_SCORE + 6 * B_SCORE) / 24, 2: (18 * B_SCORE + 6 * A_SCORE) / 24}


def parcel_task(prompts: Path):
    d = prompts / "parcel"; (d / "data").mkdir(parents=True)
    (d / "schema.json").write_text(json.dumps(SCHEMA))
    (d / "task.toml").write_text(
        'name = "parcel"\n[inputs.email]\nmax_chars = 2000\n[inputs.a]\nmax_chars = 2000\n[inputs.b]\nmax_chars = 2000\n'
        '[output]\nkind = "json"\nfield = "action"\nschema_file = "schema.json"\n[dataset]\npath = "data/d.jsonl"\n'
        '[scoring]\nprimary = "field_mean"\n[scoring.fields.items]\nmatch = "set"\n')
    (d / "v1_a.txt").write_text("E-mail: {{email}}\nOther draft: {{b}}\nEcho: {{a}}")
    (d / "v2_b.txt").write_text("E-mail: {{email}}\nOther draft: {{a}}\nEcho: {{b}}")
    (d / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in parcel_rows()))


BLURBS = [  # (text, the version's answer, the reference, the judge's rating of the answer)
    ("The kettle is loud but it boils fast.", "A loud kettle that boils fast.", "The kettle is loud but fast.", 4),
    ("The lamp flickers and died in a week.", "The lamp died within a week.", "The lamp flickers and broke fast.", 5),
    ("Nice chair, wobbly legs.", "A nice chair", "A nice chair with wobbly legs.", 2),
]


def blurb_tasks(prompts: Path):
    d = prompts / "blurb"; (d / "data").mkdir(parents=True)
    (d / "task.toml").write_text(
        '[inputs.text]\nmax_chars = 500\n[inputs.draft]\nmax_chars = 500\n[inputs.rating]\nmax_chars = 20\n'
        '[output]\nkind = "text"\nmax_chars = 100\n[dataset]\npath = "data/d.jsonl"\n'
        '[scoring]\nscorers = ["rouge_l", "contains", "regex"]\nregex = "\\\\.$"\n'
        '[scoring.judge]\ntask = "rater"\nfield = "score"\ninputs = { summary = "answer", verdict = "rating" }\n')
    (d / "v1_echo.txt").write_text("Text: {{text}} ({{rating}})\nEcho: {{draft}}")
    rows = [dict(id=f"b{i}", text=t, draft=a, rating=json.dumps({"score": r}), expected=ref,
                 contains=["chair", "wobbly"] if "chair" in t else [])
            for i, (t, a, ref, r) in enumerate(BLURBS)]
    (d / "data" / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    j = prompts / "rater"; j.mkdir()
    (j / "task.toml").write_text(
        '[inputs.summary]\nmax_chars = 500\n[inputs.verdict]\nmax_chars = 50\n'
        '[output]\nkind = "json"\nfield = "score"\n[output.schema]\ntype = "object"\nrequired = ["score"]\n'
        '[output.schema.properties.score]\ntype = "integer"\nminimum = 1\nmaximum = 5\n')
    (j / "v1_rate.txt").write_text("Rate this summary from 1 to 5: {{summary}}\nEcho: {{verdict}}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    parcel_task(tmp / "prompts"); blurb_tasks(tmp / "prompts")
    proc, url = start_server("--delay-ms", "0", "--answer-mode", "echo")
    ov = {"promptsys.prompts_dir": str(tmp / "prompts"), "promptsys.state_dir": str(tmp / "state"),
          "promptsys.records": "none", "cache.enabled": "false", "cache.dir": str(tmp / "cache"),
          "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db", "mlflow.experiment_prefix": "t",
          "model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
          "breaker.shared": "false", "retry.max_attempts": "1", "eval.runs_dir": str(tmp / "runs"),
          "gate.max_p95_latency_increase": "100", "gate.max_cost_increase": "1"}
    try: yield dict(tmp=tmp, url=url, ov=ov, s=load_settings(ROOT / "settings.ini", overrides=ov, env={}))
    finally: stop_server(proc)


def test_partial_credit_per_field_and_as_a_set(env):
    df = pe.evaluate("parcel", settings=env["s"], progress=False)
    assert dict(df.accuracy) == {1: 0.0, 2: 0.0}                    # no answer is exactly right
    assert df.loc[1, "field_mean"] == pytest.approx(WANT[1]) and df.loc[2, "field_mean"] == pytest.approx(WANT[2])
    got = registry.mlflow_client(env["s"]).get_run(df.loc[2, "run_id"]).data.metrics
    assert got["field_accuracy_items"] == pytest.approx((18 * 0.8 + 6 * 0.5) / 24)   # the mean set F1
    assert got["field_accuracy_action"] == pytest.approx(18 / 24) and got["field_mean"] == pytest.approx(WANT[2])


def test_the_gate_compares_the_primary_metric_with_a_paired_bootstrap(env):
    s = env["s"]
    pp.promote("parcel", 1, settings=s, force=True, user="test")
    d = pp.gate("parcel", 2, settings=s)
    assert d.passed, str(d)
    assert (d.stats["metric"], d.stats["test"], d.stats["n"]) == ("field_mean", "paired bootstrap", 24)
    assert d.stats["gain"] == pytest.approx(WANT[2] - WANT[1]) and d.stats["ci_low"] > 0
    assert "p_value" not in d.stats and any("paired bootstrap" in r for r in d.reasons)
    back = pp.gate("parcel", 1, settings=s, production=2)              # the other way round: refused
    assert not back.passed and back.stats["ci_high"] < 0
    acc = pp.gate("parcel", 2, settings=s, metric="accuracy")           # on exact match the two are equal
    assert not acc.passed and acc.stats["test"] == "mcnemar" and acc.stats["gain"] == 0
    pr = pp.promote("parcel", settings=s, user="test", reason="more fields right")
    assert pr.moved and pr.decision.candidate == 2
    imp = pp.impact("parcel", 2, 1, settings=s, log_to_run=False)     # what `promptsys diff` shows
    assert [(f["field"], round(f["candidate"], 4)) for f in imp.per_field] == [
        ("order_id", 0.25), ("items", round((18 * 0.8 + 6 * 0.5) / 24, 4)), ("action", 0.75)]
    assert [(l["label"], l["baseline_recall"], l["candidate_recall"]) for l in imp.per_label] == [("return", 0.25, 0.75)]
    assert (imp.metric, len(imp.changes), imp.flips) == ("field_mean", 24, [])   # no answer flips right/wrong
    assert "<table>" in imp._repr_html_() and "field_mean moved on 24 examples" in imp.to_text()


def test_the_regression_watch_guards_a_json_task_on_its_primary_metric(env):
    "After the gate test put v2 in production: the watch compares field_mean, and catches answers turning bad."
    from promptsys import schedule
    s = env["s"]
    assert registry.resolve_alias(load_task("parcel", s.promptsys.prompts_dir), "production", s).number == 2
    ok = schedule.watch("parcel", settings=s, auto_rollback=False)
    assert (ok["metric"], ok["regression"]) == ("field_mean", False)
    assert ok["accuracy"] == pytest.approx(WANT[2]) and ok["recorded_accuracy"] == pytest.approx(WANT[2])
    control(env["url"], garble_if_contains="P-01")            # orders P-010..P-019: 10 of 24 answers not JSON
    try: bad = schedule.watch("parcel", settings=s, auto_rollback=False)
    finally: control(env["url"], garble_if_contains=None)
    assert (bad["metric"], bad["regression"]) == ("field_mean", True)
    assert bad["accuracy"] < WANT[2] - 0.2 and bad["drop"] > s.gate.regression_threshold


def test_text_scorers_and_a_judge_task(env):
    df = pe.evaluate("blurb", settings=env["s"], progress=False)
    m = df.loc[1]
    assert m.rouge_l == pytest.approx(sum(pe.rouge_l(a, ref) for _, a, ref, _ in BLURBS) / 3)
    # contains: row 3 names its phrases (1 of 2 found); the others fall back to the reference (never contained)
    assert m.contains == pytest.approx((0 + 0 + 0.5) / 3)
    assert m.regex == pytest.approx(2 / 3)                              # "A nice chair" does not end with a period
    assert m.judge == pytest.approx(((4 - 1) / 4 + (5 - 1) / 4 + (2 - 1) / 4) / 3) and m.judge_errors == 0
    run = registry.mlflow_client(env["s"]).get_run(m.run_id)
    assert (run.data.params["judge_task"], run.data.params["judge_version"]) == ("rater", "1")
    assert run.data.params["judge_hash"] == load_task("rater", env["s"].promptsys.prompts_dir).version(1).hash
    off = pe.evaluate("blurb", settings=env["s"], progress=False, judge=False, track=False)
    assert "judge" not in off.columns


def test_scoring_mistakes_are_config_errors(env, tmp_path):
    import shutil
    p = tmp_path / "prompts"; shutil.copytree(env["tmp"] / "prompts", p)
    toml = p / "parcel" / "task.toml"
    toml.write_text(toml.read_text().replace('primary = "field_mean"', 'primary = "rouge_l"'))
    with pytest.raises(ConfigError, match="primary 'rouge_l' is not a metric of this task"):
        load_task("parcel", p)
    b = p / "blurb" / "task.toml"
    b.write_text(b.read_text().replace('verdict = "rating"', 'verdict = "mood"'))
    s = load_settings(ROOT / "settings.ini", overrides={**env["ov"], "promptsys.prompts_dir": str(p)}, env={})
    with pytest.raises(ConfigError, match=r"inputs \{'verdict': 'mood'\}"):
        pe.evaluate("blurb", settings=s, progress=False, track=False)


def test_the_shipped_summary_judge_on_the_embedded_model(tmp_path, make_settings):
    "The shipped summary task, judged by the shipped summary_judge on the embedded model: greedy, repeatable."
    s = make_settings(tmp_path, **{"model.provider": "local", "cache.enabled": "false", "promptsys.records": "none"})
    a = pe.evaluate("summary", [2], settings=s, limit=3, progress=False, track=False, details=True)[1][2].rows
    b = pe.evaluate("summary", [2], settings=s, limit=3, progress=False, track=False, details=True)[1][2].rows
    scores = [r["judge"] for r in a]
    assert scores == [r["judge"] for r in b]
    assert all(x in (0.0, 0.25, 0.5, 0.75, 1.0) for x in scores), scores   # 1..5 scaled: the grammar keeps it an int
