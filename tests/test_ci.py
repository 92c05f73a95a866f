"""Change control in CI (`promptsys ci`): a real git repository holding the toy task "reviews" (v1 in production
in its committed aliases.json), the fake OpenAI-compatible server (keyword answers), the CLI in its own process.
A branch that makes the production version worse fails with its report; one that makes it better passes."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
from tests.fakeserver import start_server, stop_server
from tests.test_promote import toy_task

READS = "Sentiment of this review?\nReview: {{text}}\nSentiment:"
GLOWING = "Sentiment of this review?\nReview: {{text}}\nReview: I love it.\nSentiment:"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--delay-ms", "0")
    yield url
    stop_server(proc)


def repo_with(tmp: Path, v1: str) -> Path:
    "A git repository whose last commit has the toy task with `v1` as its text and v1 in production."
    repo = tmp / "repo"; toy_task(repo / "prompts")
    d = repo / "prompts" / "reviews"
    (d / "v1_reads.txt").write_text(v1)
    (d / "aliases.json").write_text(json.dumps({"aliases": {"production": {"version": 1}}}))
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "reviews: v1 in production"]):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args], check=True)
    return repo


def run_ci(repo: Path, url: str, tmp: Path, *extra):
    sets = {"promptsys.prompts_dir": str(repo / "prompts"), "promptsys.state_dir": str(tmp / "state"),
            "model.provider": "openai", "openai.base_url": url + "/v1", "openai.api_key_env": "",
            "cache.enabled": "false", "breaker.shared": "false", "retry.max_attempts": "1",
            "gate.max_p95_latency_increase": "100"}     # loopback answers in ~1 ms: their p95 is scheduler noise
    cmd = [sys.executable, "-c", "import sys; from promptsys.cli import main; sys.exit(main())",
           "--settings", str(ROOT / "settings.ini"), *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
           "ci", "--base", "HEAD", "--report", str(tmp / "report.md"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)


def test_a_branch_that_makes_production_worse_fails(server, tmp_path):
    repo = repo_with(tmp_path, READS)
    (repo / "prompts/reviews/v1_reads.txt").write_text(GLOWING)          # the pull request's edit
    r = run_ci(repo, server, tmp_path)
    assert r.returncode == 1, r.stderr
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("## promptsys ci — ❌ failed") and "reviews v1 (edited) vs v1 as on HEAD: REFUSED (worse)" in report
    assert "| candidate | 0.3333 |" in report and "| baseline | 1 |" in report
    assert "Flipped examples (8):" in report and "| neg0 | negative | negative | positive |" in report
    assert "Traceback" not in r.stderr
    assert not (repo / "mlflow.db").exists() and "mlflow.db" not in subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True).stdout   # scratch MLflow only


def test_a_branch_that_makes_production_better_passes(server, tmp_path):
    repo = repo_with(tmp_path, GLOWING)
    (repo / "prompts/reviews/v1_reads.txt").write_text(READS)
    (repo / "prompts/reviews/v3_new.txt").write_text(GLOWING)             # and a new version, worse: advisory
    r = run_ci(repo, server, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    report = (tmp_path / "report.md").read_text()
    assert "reviews v1 (edited) vs v1 as on HEAD: PASSED (better) — required" in report
    assert "reviews v3 (added) vs production v1: REFUSED (worse) — advisory" in report
    strict = run_ci(repo, server, tmp_path, "--strict")                    # every changed version must pass
    assert strict.returncode == 1


def test_ci_outside_a_repository_is_a_clear_error(server, tmp_path):
    toy_task(tmp_path / "prompts")
    r = run_ci(tmp_path, server, tmp_path)
    assert r.returncode == 2 and "hint:" in r.stderr and "Traceback" not in r.stderr, r.stderr
