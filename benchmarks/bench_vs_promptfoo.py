"""Whole-process time of a small eval: `promptsys eval` against `promptfoo eval` on the same work, side by side.

The same 3 prompt versions (the sentiment task's v1-v3 files, used as they are by both tools) × N rows, the same
concurrency, one local OpenAI-compatible server (tests/fakeserver.py, answers after --delay-ms), each command timed
from its start to its exit, rounds interleaved (promptsys, promptfoo, promptsys, ...), medians reported. MLflow
tracking is on, on an existing database (a warm-up eval creates it); promptfoo writes its own results database
(in a temp config dir) as it does by default. Response caches are off for both.

Phases (from the server's first-request / last-answer times, and for promptsys from the phase times `promptsys eval`
writes to $PROMPTSYS_EVAL_PHASES): start-up (command to first request), calls (first request to last answer),
tail (last answer to exit) = MLflow set-up wait + logging + exit. Also the CPU time each command used (user + sys,
its child processes included): on a loaded machine the wall times follow it.

`promptsys eval` exits once its eval is spooled ([eval] tracking = background); its MLflow worker logs the runs
after it. The work moved, it did not vanish: for promptsys the table also gives the time until its runs are all
FINISHED in MLflow (the spool entry removed), from the command's start and from its exit, and the CPU time
includes the worker's (read from /proc until it exits) and the figure drawer's (it reports its own). Each round waits for the runs before the next starts.

    python benchmarks/bench_vs_promptfoo.py [--rows 60] [--rounds 5] [--concurrency 32] [--delay-ms 100]
        [--promptfoo DIR] [--large 1000]

promptfoo is not a dependency: install it once outside the repo (its browser download cannot be reached here):
    mkdir -p ~/.cache/promptsys-bench/promptfoo && cd ~/.cache/promptsys-bench/promptfoo &&
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install promptfoo@0.118
Without it (--promptfoo missing) only promptsys is measured. `--large N` also runs one promptsys eval of N rows
a version and reports its whole-process time against the calls alone (target <= 1.25).

A benchmark, not a timed test: prints a table and writes benchmarks/results/bench_vs_promptfoo.json.
"""
from __future__ import annotations
import argparse, csv, json, os, platform, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakeserver import start_server, stop_server, control, stats   # noqa: E402

SETTINGS = """[promptsys]
prompts_dir = {root}/prompts
state_dir = {tmp}/state
records = none
[model]
provider = openai
[openai]
base_url = {url}/v1
api_key_env = BENCH_OPENAI_KEY
model = gpt-4o-mini
max_connections = 100
[cache]
enabled = false
[mlflow]
tracking_uri = sqlite:///{tmp}/mlflow.db
[eval]
concurrency = {conc}
"""

PROMPTFOO = """description: promptsys bench (sentiment v1-v3)
prompts:
{prompts}
providers:
  - id: openai:chat:gpt-4o-mini
    config:
      apiBaseUrl: {url}/v1
      apiKey: bench
      temperature: 0
      max_tokens: 8
tests: file://{tests}
"""


def write_rows(src:Path, n:int, dest:Path) -> list[dict]:
    "The first n rows of the sentiment set (cycled, with new ids, when n is larger than the set)."
    base = [json.loads(l) for l in src.read_text().splitlines() if l.strip()]
    rows = [dict(base[i % len(base)], id=f"b{i:05d}") for i in range(n)]
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def timed(cmd:list, env:dict, url:str, cwd:Path) -> dict:
    "Run `cmd` to its exit; its wall time and the server's phase times."
    import resource
    control(url, reset_stats=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    t1 = time.time()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)   # the command and the children it waited for
    if p.returncode not in (0, 100):   # promptfoo exits 100 when a test assertion fails
        raise RuntimeError(f"{cmd[:3]} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    st = stats(url)
    first, last = st["first_request_at"], st["last_response_at"]
    return dict(wall=t1 - t0, cpu=cpu, startup=first - t0, calls=last - first, tail=t1 - last, requests=st["total"],
                t0=t0, t1=t1, last=last)


def follow_worker(r:dict, spool:Path) -> dict:
    "After `promptsys eval` exited: when its background worker had every run FINISHED (its spool entry gone), and "
    "the worker's CPU time (from /proc, until it exits). A promptsys that logs before it exits: at its exit."
    entries = list(spool.glob("*/manifest.json")) if spool.is_dir() else []
    if not entries: return dict(r, finished=r["wall"], after_exit=0.0, worker_cpu=0.0, drawer_cpu=0.0)
    pid, tick, cpu = json.loads(entries[0].read_text())["worker_pid"], os.sysconf("SC_CLK_TCK"), 0.0
    def read_cpu():
        try: f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError: return None
        return None if f[0] == "Z" else (int(f[11]) + int(f[12])) / tick
    drawer = 0.0                                      # the short-lived process that drew the figures, if any
    while any(p.name[0] != "." for p in spool.iterdir()):
        cpu = read_cpu() or cpu
        for f in spool.glob("*/drawer.json"):
            try: drawer = json.loads(f.read_text())["cpu_s"]
            except (OSError, ValueError): pass
        time.sleep(0.01)
    done = time.time()
    while (c := read_cpu()) is not None: cpu = c; time.sleep(0.01)
    return dict(r, finished=done - r["t0"], after_exit=done - r["t1"], worker_cpu=cpu, drawer_cpu=drawer,
                cpu=r["cpu"] + cpu + drawer)


def promptsys_phases(r:dict, path:Path) -> dict:
    "Split promptsys's tail (last answer to exit) with the phase times the eval wrote."
    if not path.exists(): return dict(r, setup_wait=None, logging=None, exit=None)   # a promptsys without phases
    ph = json.loads(path.read_text()); path.unlink()
    answered = max(ph["calls_done"], r["last"])
    ready = ph.get("tracking_ready") or answered
    wait = max(0.0, ready - answered)
    return dict(r, setup_wait=wait, logging=max(0.0, ph["logged"] - max(answered, ready)),
                exit=r["t1"] - ph["logged"], setup_s=ph.get("tracking_setup_s"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--versions", default="1,2,3")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--delay-ms", type=float, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--promptfoo", default=os.environ.get("PROMPTFOO_DIR",
                    str(Path.home() / ".cache/promptsys-bench/promptfoo")), help="folder holding node_modules/promptfoo")
    ap.add_argument("--large", type=int, default=0, help="also one promptsys eval of N rows (whole / calls)")
    ap.add_argument("--promptsys-root", default=str(ROOT), help="the promptsys checkout to run (e.g. an older commit)")
    a = ap.parse_args(argv)
    versions = [int(v) for v in a.versions.split(",")]
    pf_bin = Path(a.promptfoo) / "node_modules" / ".bin" / "promptfoo"
    have_pf = pf_bin.exists()
    if not have_pf: print(f"promptfoo not found at {pf_bin}: measuring promptsys only", file=sys.stderr)

    proc, url = start_server("--delay-ms", str(a.delay_ms), "--answer-mode", "keyword")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pf-") as d:
            tmp = Path(d)
            (tmp / "settings.ini").write_text(SETTINGS.format(root=ROOT, tmp=tmp, url=url, conc=a.concurrency))
            rows = write_rows(ROOT / "prompts/sentiment/data/sentiment.jsonl", a.rows, tmp / "data.jsonl")
            with open(tmp / "tests.csv", "w", newline="") as f:
                w = csv.writer(f); w.writerow(["text", "__expected"])
                for r in rows: w.writerow([r["text"], f"equals: {r['label']}"])
            files = {int(p.name[1:].split("_")[0]): p for p in (ROOT / "prompts/sentiment").glob("v*_*.txt")}
            (tmp / "promptfooconfig.yaml").write_text(PROMPTFOO.format(
                url=url, tests=tmp / "tests.csv", prompts="\n".join(f"  - file://{files[v]}" for v in versions)))
            env = dict(os.environ, BENCH_OPENAI_KEY="bench", MLFLOW_DISABLE_TELEMETRY="true",
                       PROMPTSYS_SETTINGS=str(tmp / "settings.ini"), PROMPTSYS_EVAL_PHASES=str(tmp / "phases.json"),
                       PYTHONPATH=a.promptsys_root, PROMPTFOO_CONFIG_DIR=str(tmp / "promptfoo"),
                       PROMPTFOO_DISABLE_TELEMETRY="1", PROMPTFOO_DISABLE_UPDATE="1", OPENAI_API_KEY="bench",
                       PROMPTFOO_DISABLE_REDTEAM_REMOTE_GENERATION="1", NO_COLOR="1")
            ps_cmd = [sys.executable, "-m", "promptsys.cli", "eval", "sentiment", "--versions", a.versions,
                      "--dataset", str(tmp / "data.jsonl"), "--no-cache"]
            pf_cmd = [str(pf_bin), "eval", "-c", str(tmp / "promptfooconfig.yaml"), "--no-cache",
                      "--max-concurrency", str(a.concurrency), "--no-progress-bar"]
            spool = tmp / "state" / "tracking-spool"
            follow_worker(timed(ps_cmd, env, url, tmp), spool)  # warm-up: the MLflow database exists from here on
            if have_pf: timed(pf_cmd, env, url, tmp)          # promptfoo's own database and node's file cache
            ps, pf = [], []
            for i in range(a.rounds):
                ps.append(follow_worker(promptsys_phases(timed(ps_cmd, env, url, tmp), tmp / "phases.json"), spool))
                if have_pf: pf.append(timed(pf_cmd, env, url, tmp))
                print(f"round {i + 1}: promptsys {ps[-1]['wall']:.2f} s"
                      + (f", promptfoo {pf[-1]['wall']:.2f} s" if have_pf else ""), file=sys.stderr)
            large = None
            if a.large:
                write_rows(ROOT / "prompts/sentiment/data/sentiment.jsonl", a.large, tmp / "large.jsonl")
                cmd = ps_cmd[:ps_cmd.index("--dataset") + 1] + [str(tmp / "large.jsonl"), "--no-cache"]
                lr = follow_worker(promptsys_phases(timed(cmd, env, url, tmp), tmp / "phases.json"), spool)
                large = dict(rows=a.large, wall_s=round(lr["wall"], 3), calls_s=round(lr["calls"], 3),
                             ratio=round(lr["wall"] / lr["calls"], 3), target=1.25,
                             finished_s=round(lr["finished"], 3), finished_ratio=round(lr["finished"] / lr["calls"], 3),
                             phases={k: round(lr[k], 3) for k in ("startup", "calls", "tail", "setup_wait", "logging",
                                                                  "exit", "after_exit", "worker_cpu",
                                                                  "drawer_cpu")})
    finally:
        stop_server(proc)

    def med(xs, k):
        v = [x[k] for x in xs if x.get(k) is not None]
        return round(statistics.median(v), 3) if v else None
    keys = ("wall", "startup", "calls", "tail", "setup_wait", "logging", "exit", "finished", "after_exit", "cpu",
            "worker_cpu", "drawer_cpu")
    res = dict(benchmark="bench_vs_promptfoo", rows=a.rows, versions=versions, concurrency=a.concurrency,
               delay_ms=a.delay_ms, rounds=a.rounds, promptfoo="0.118" if have_pf else None,
               promptsys={k: med(ps, k) for k in keys},
               promptfoo_s={k: med(pf, k) for k in keys if k in pf[0]} if have_pf else None,
               ratio=round(med(ps, "wall") / med(pf, "wall"), 3) if have_pf else None, target=1.0,
               paired_ratio=round(statistics.median(x["wall"] / y["wall"] for x, y in zip(ps, pf)), 3) if have_pf else None,
               tail_target_s=0.5, tail_rounds=[round(x["tail"], 3) for x in ps], large=large, all_rounds=dict(promptsys=[round(x["wall"], 3) for x in ps],
                                                               promptfoo=[round(x["wall"], 3) for x in pf]),
               machine=dict(python=platform.python_version(), cpus=os.cpu_count(),
                            loadavg_1m=round(os.getloadavg()[0], 2)),
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(f"{len(versions)} versions × {a.rows} rows, concurrency {a.concurrency}, server delay {a.delay_ms:g} ms, "
          f"median of {a.rounds} interleaved rounds (load {res['machine']['loadavg_1m']})")
    print(f"{'phase (s)':<34}{'promptsys':>10}{'promptfoo':>10}")
    names = dict(wall="whole process", startup="start-up (to first request)", calls="calls (first request to last answer)",
                 tail="last answer to exit", setup_wait="  MLflow set-up wait", logging="  MLflow logging",
                 exit="  exit (print, shut down)", finished="runs FINISHED in MLflow (from start)",
                 after_exit="  after the command's exit", cpu="CPU time (user + sys, all processes)",
                 worker_cpu="  of which the MLflow worker", drawer_cpu="  of which the figure drawer")
    for k in keys:
        b = res["promptfoo_s"].get(k) if have_pf and k in res["promptfoo_s"] else None
        v = res["promptsys"][k]
        print(f"{names[k]:<34}" + (f"{v:>10.2f}" if v is not None else f"{'-':>10}")
              + (f"{b:>10.2f}" if b is not None else ""))
    if have_pf: print(f"{'promptsys / promptfoo':<34}{res['ratio']:>10.2f}   (median of the rounds' own ratios "
                      f"{res['paired_ratio']:.2f}; target <= 1.0)")
    if large: print(f"large: {a.large} rows × {len(versions)} versions: whole {large['wall_s']:.2f} s, calls "
                    f"{large['calls_s']:.2f} s, ratio {large['ratio']:.2f} (target <= 1.25); runs FINISHED "
                    f"{large['finished_s']:.2f} s ({large['finished_ratio']:.2f} × calls)  {large['phases']}")
    res["promptsys_root"] = a.promptsys_root if a.promptsys_root != str(ROOT) else "."
    out = ROOT / "benchmarks" / "results" / ("bench_vs_promptfoo.json" if a.promptsys_root == str(ROOT)
                                             else "bench_vs_promptfoo_other.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
