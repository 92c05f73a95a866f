"""A small long-lived HTTP service built on promptsys, for the live-version tests and benchmarks.

    python tests/service_app.py --task NAME --overrides '{"section.key": "value", ...}' [--port 0]

It builds one `Pipeline(task, version="production")` at start-up, as a real service does, and never rebuilds
it: whatever version answers comes from the pipeline following the alias and the rollout state live.

* ``POST /classify`` with ``{"text": ..., "user": ...}`` → ``{"ok", "output", "version", "role", "request_id",
  "fallback", "error"}`` (HTTP 200 whenever the pipeline answered, 422 for bad input, 500 for anything else)
* ``POST /feedback`` with ``{"request_id", "correct_label"}`` → what was stored
* ``GET /health`` → ``{"ok": true, "version": <production's version now>}``

Prints ``READY <port>`` once serving; stops on SIGTERM.
"""
from __future__ import annotations
import argparse, http.server, json, signal, sys, threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_handler(pipe, settings):
    from promptsys.errors import PromptsysError, InputValidationError

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def _send(self, code:int, body:dict):
            raw = json.dumps(body).encode()
            self.send_response(code); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw))); self.end_headers(); self.wfile.write(raw)
        def do_GET(self):
            if self.path == "/health": return self._send(200, {"ok": True, "version": pipe.prompt.number})
            self._send(404, {"error": "not found"})
        def do_POST(self):
            try: body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except ValueError: return self._send(400, {"error": "body is not JSON"})
            try:
                if self.path == "/classify":
                    r = pipe.run(body.get("text"), route_key=body.get("user"))
                    return self._send(200, dict(ok=r.ok, output=r.output, version=r.version, role=r.role,
                                                request_id=r.request_id, fallback=r.fallback, error=r.error))
                if self.path == "/feedback":
                    from promptsys.metrics import record_feedback
                    return self._send(200, record_feedback(body["request_id"], correct_label=body.get("correct_label"),
                                                           settings=settings))
                self._send(404, {"error": "not found"})
            except InputValidationError as e: self._send(422, e.to_dict())
            except PromptsysError as e: self._send(500, e.to_dict())
            except Exception as e: self._send(500, {"type": type(e).__name__, "message": str(e)})
    return Handler


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True); ap.add_argument("--overrides", default="{}")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    from promptsys.config import load_settings
    from promptsys.pipeline import Pipeline
    s = load_settings(ROOT / "settings.ini", overrides=json.loads(a.overrides), env={})
    pipe = Pipeline(a.task, version="production", settings=s)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), make_handler(pipe, s))
    srv.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=srv.shutdown, daemon=True).start())
    print(f"READY {srv.server_address[1]}", flush=True)
    srv.serve_forever()
    from promptsys.metrics import flush_pending, db_path
    flush_pending(db_path(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
