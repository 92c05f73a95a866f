"""Shared pytest fixtures for promptsys's tests.

- The repository root is put on ``sys.path`` so ``import promptsys`` and ``from tests.fakeserver import ...``
  work from any working directory.
- ``make_settings(tmp_path, **overrides)``: settings from the repository's settings.ini with every store
  (state_dir, cache, MLflow, metrics db, records, cassettes, eval runs) inside ``tmp_path``. Overrides
  are ``"section.key"`` strings (``**{"retry.max_attempts": 2}``) or ``section__key`` keywords
  (``retry__max_attempts=2``); values may be strings (parsed like the file) or typed. ``PROMPTSYS_*``
  environment variables are ignored, so a developer's shell cannot change a test. Importable
  (``from conftest import make_settings``) and a fixture of the same name.
- ``fake_server(*args, **kw)``: starts ``tests/fakeserver.py`` as a process (loopback only) and returns
  ``(proc, url)``; every server a test started is stopped when the test ends, pass or fail.
  ``fake_server.openai_url(url)`` is the base_url promptsys's OpenAI provider wants (``url + "/v1"``).
- After each test module, the alias refresh threads its pipelines started are stopped (``registry.stop_live``).
"""
from __future__ import annotations
import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tests.fakeserver import start_server, stop_server, control, stats  # noqa: E402

SETTINGS_FILE = ROOT / "settings.ini"


def make_settings(tmp_path, /, **overrides):
    "Settings from settings.ini with every store under `tmp_path`; `overrides` as 'section.key' or section__key."
    from promptsys.config import load_settings
    tmp = Path(tmp_path)
    base = {
        "promptsys.state_dir": str(tmp / "state"),
        "promptsys.records_path": str(tmp / "state" / "records.jsonl"),
        "cache.dir": str(tmp / "cache"),
        "mlflow.tracking_uri": f"sqlite:///{tmp}/mlflow.db",
        "monitor.db_path": str(tmp / "metrics.db"),
        "replay.cassette": str(tmp / "cassettes" / "default.json"),
        "eval.runs_dir": str(tmp / "runs"),
    }
    base.update({k.replace("__", ".", 1) if "." not in k else k: v for k, v in overrides.items()})
    return load_settings(SETTINGS_FILE, overrides=base, env={})


@pytest.fixture(autouse=True, scope="module")
def _stop_live_refresh():
    "After each test module, stop the alias refresh threads its pipelines started. Their stores are that module's, "
    "and each refresh calls `mlflow_client`, which points MLflow's process-global tracking URI (and with it the "
    "tracer's export target) at its store: a later module's MLflow traces were exported there."
    yield
    if "promptsys.registry" in sys.modules: sys.modules["promptsys.registry"].stop_live()


@pytest.fixture(name="make_settings")
def _make_settings_fixture():
    "The `make_settings(tmp_path, **overrides)` helper as a fixture."
    return make_settings


class _Servers:
    "Starts fake servers and remembers them so the fixture can stop every one."
    def __init__(self): self.procs = []
    def __call__(self, *args, timeout:float=10):
        proc, url = start_server(*[str(a) for a in args], timeout=timeout)
        self.procs.append(proc)
        return proc, url
    @staticmethod
    def openai_url(url:str) -> str: return url.rstrip("/") + "/v1"
    def stop(self, proc): stop_server(proc)
    def stop_all(self):
        for p in self.procs:
            try: stop_server(p)
            except Exception: pass   # already gone; the next one must still be stopped


@pytest.fixture
def fake_server():
    "Factory: `proc, url = fake_server('--p500', '0.1')`; all servers are stopped after the test."
    s = _Servers()
    try: yield s
    finally: s.stop_all()
