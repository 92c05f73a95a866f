"""The embedded model's llama.cpp build: portable on every x86-64 host, checked in a child process, and
exercised with prompts long enough to reach the matrix-multiply paths (issue: no SIGILL from a native build)."""
from __future__ import annotations
import json, subprocess, sys, zipfile
from pathlib import Path
import pytest
from conftest import make_settings

pytest.importorskip("llama_cpp")
from promptsys import localbuild as lb  # noqa: E402

SIGILL = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


def test_installed_build_is_portable():
    "The installed llama-cpp-python is promptsys's portable build: no AMX, nothing past the x86-64-v3 baseline."
    import llama_cpp
    b = lb.installed_build()
    assert b is not None and b["label"] == lb.build_variant()[0], b
    assert "+portable." in b["version"] and "-DGGML_NATIVE=OFF" in b["cmake_args"]
    info = llama_cpp.llama_print_system_info().decode()
    feats = lb.system_features(info)
    assert feats & lb.FORBIDDEN_FEATURES == frozenset(), info
    isa = feats & set(lb.HOST_FLAG)                       # instruction sets, not OPENMP / REPACK / LLAMAFILE
    assert isa <= lb.PORTABLE_FEATURES, info
    assert {"AVX2", "FMA", "F16C"} <= isa, info


def test_long_prompt_through_the_local_provider(tmp_path):
    "A prompt of several hundred tokens, in both decoding modes, through the provider a pipeline uses."
    from promptsys.providers import Request, make_provider
    from promptsys.prompts import OutputSchema
    schema = OutputSchema("label", "label", ("positive", "negative", "neutral"))
    review = ("I bought this kettle for the office. It boils a full litre in under three minutes, the lid opens "
              "with one hand and the base is stable, but after two weeks the switch started sticking and the "
              "plastic smell never went away. Support answered within a day and sent a replacement. ") * 6
    msgs = [{"role": "user", "content": f"Review: {review}\nIs this review positive, negative or neutral?"}]
    for decoding in ("grammar", "logprob"):
        p = make_provider(make_settings(tmp_path, **{"local.decoding": decoding}), "local")
        c = p.complete(Request(msgs, max_tokens=4, schema=schema))
        assert c.tokens_in > 300, c.tokens_in
        assert c.text in schema.labels
        again = p.complete(Request(msgs, max_tokens=4, schema=schema))
        assert (again.text, again.tokens_in) == (c.text, c.tokens_in)     # greedy: deterministic


def test_probe_passes_and_its_verdict_is_kept(tmp_path, monkeypatch):
    model = lb.default_model_path()
    res = lb.check_build(model, tmp_path, force=True)
    assert res["tokens"] > 300 and res["fingerprint"] == lb.build_fingerprint()
    marker = tmp_path / "localbuild" / f"{res['fingerprint']}.json"
    assert json.loads(marker.read_text())["tokens"] == res["tokens"]
    lb._checked.clear()                                    # a new process: the verdict comes from the file
    monkeypatch.setattr(lb, "run_probe", lambda *a, **k: pytest.fail("probe re-run for a checked build"))
    assert lb.check_build(model, tmp_path)["tokens"] == res["tokens"]


def test_a_build_that_dies_with_sigill_gives_a_typed_error(tmp_path):
    "A real child process killed by SIGILL: the parent gets LocalBuildError naming the signal and the fix."
    with pytest.raises(lb.LocalBuildError) as e:
        lb.check_build(lb.default_model_path(), tmp_path, force=True, probe=SIGILL)
    assert "SIGILL" in e.value.message and "illegal instruction" in e.value.message
    assert lb.INSTALL_CMD in e.value.hint
    assert not list((tmp_path / "localbuild").glob("*.json"))   # no verdict kept for a failing build


def test_local_provider_refuses_a_crashing_build(tmp_path, monkeypatch):
    "The provider checks the build before its first load and raises instead of dying."
    from promptsys import local
    from promptsys.providers import Request
    monkeypatch.setattr(local, "_models", {})
    monkeypatch.setattr(lb, "_checked", {})
    monkeypatch.setattr(lb, "PROBE", SIGILL)
    p = local.LocalProvider(state_dir=tmp_path)
    with pytest.raises(lb.LocalBuildError, match="SIGILL"):
        p.complete(Request([{"role": "user", "content": "Hello"}], max_tokens=2))


def test_install_local_reuses_the_wheel_built_for_these_flags(monkeypatch):
    "A repeat install takes the wheel promptsys built (no compile), and never one built with other flags."
    label = lb.build_variant()[0]
    wheel = lb.find_wheel(label)
    assert wheel is not None and f"+{label}-" in wheel.name
    assert lb.find_wheel(lb.build_variant(native=True)[0]) != wheel
    monkeypatch.setattr(lb, "build_wheel", lambda *a, **k: pytest.fail("rebuilt although a wheel exists"))
    said = []
    assert lb.install_local(model=False, log=said.append) == wheel
    assert said == [f"reusing {wheel}", f"llama-cpp-python {lb.installed_build()['version']} already installed"]


def test_relabelled_wheel_installs_under_its_new_version(tmp_path):
    w = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("tiny/__init__.py", "x = 1\n")
        z.writestr("tiny-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny\nVersion: 1.0\n")
        z.writestr("tiny-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tiny-1.0.dist-info/RECORD", "")
    out = tmp_path / "out"; out.mkdir()
    new = lb.relabel_wheel(w, "portable.0123456789", out, {"cmake_args": ["-DGGML_NATIVE=OFF"]})
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), str(new)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    di = target / "tiny-1.0+portable.0123456789.dist-info"
    assert "Version: 1.0+portable.0123456789" in (di / "METADATA").read_text()
    assert json.loads((di / "promptsys_build.json").read_text())["cmake_args"] == ["-DGGML_NATIVE=OFF"]


def test_doctor_command(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([str(Path(sys.executable).parent / "promptsys"), "doctor"], capture_output=True, text=True,
                       cwd=root, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for words in ("forward pass", "system info", "instruction sets", "portable", "AVX2 = 1"):
        assert words in r.stdout, r.stdout
    assert "AMX" not in r.stdout.split("system info", 1)[1].split("\n", 1)[0]
