"""Fake LLM HTTP server for tests and benchmarks (stdlib only).

Run as a separate process::

    python3 tests/fakeserver.py --port 0 [--host 127.0.0.1] [--seed 0]
        [--answer-mode {keyword,fixed,json,echo}] [--answer TEXT]
        [--require-key KEY] [--delay-ms N]
        [--p500 P] [--p503 P] [--p429 P] [--phang P] [--pmalformed P] [--preset P]
        [--retry-after SECONDS] [--hang-seconds SECONDS]
        [--require-basic USER:PASSWORD] [--certfile PEM --keyfile PEM]

On startup it prints exactly one line ``READY <port>`` to stdout and stops
cleanly on SIGTERM / SIGINT. With ``--certfile``/``--keyfile`` it speaks HTTPS (the returned base URL
still says ``http://``: swap the scheme). ``--require-basic`` refuses model requests (401) whose
``Authorization`` is not HTTP basic auth with those credentials.

Endpoints
---------
* ``POST /v1/chat/completions`` and ``POST /chat/completions`` (OpenAI style)
* ``POST /v1/messages`` (Anthropic Messages style; needs ``x-api-key`` and
  ``anthropic-version`` headers)
* ``GET /health`` -> ``{"ok": true}``
* ``GET /requests`` -> the last 100 model request bodies (``[{"path", "body"}]``; headers are never kept)
* ``GET /stats`` -> ``{"total": N, "ok": n, "500": n, "503": n, "429": n,
  "hang": n, "malformed": n, "reset": n, "401": n, "400": n, "config": {...},
  "first_request_at": t, "last_response_at": t}`` (epoch seconds of the first model request's arrival and of
  the last model answer sent since the last reset; null before any: benchmarks time phases with them)
* ``POST /control`` with any subset of the config keys (``p500``, ``p503``,
  ``p429``, ``phang``, ``pmalformed``, ``preset``, ``retry_after``,
  ``hang_seconds``, ``delay_ms``, ``answer_mode``, ``answer``, ``seed``,
  ``garble_if_contains`` / ``wrong_if_contains`` (a string or null: prompts containing it get an answer
  that is not JSON / a wrong label),
  ``require_key`` (string or null)) and/or ``"reset_stats": true``.
  Returns the new config.

Helpers for pytest fixtures (importable as ``from tests.fakeserver import
start_server`` or via a path import): :func:`start_server`,
:func:`stop_server`, :func:`control`, :func:`stats`.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

__all__ = ["start_server", "stop_server", "control", "stats", "requests", "main"]

_THIS_FILE = os.path.abspath(__file__)

# urllib must not go through any HTTP proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------
# Test helpers
# --------------------------------------------------------------------------

def start_server(*args: str, timeout: float = 10):
    """Launch the fake server as a subprocess on a free port.

    Returns ``(proc, base_url)`` where ``base_url`` is ``http://127.0.0.1:<port>``.
    Raises ``RuntimeError`` (including the server's stderr) if the READY line
    does not arrive within ``timeout`` seconds.
    """
    err = tempfile.TemporaryFile(mode="w+b")
    cmd = [sys.executable, _THIS_FILE, "--port", "0", *[str(a) for a in args]]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True
    )
    proc._fakeserver_stderr = err  # type: ignore[attr-defined]

    box: list = []

    def _reader():
        try:
            box.append(proc.stdout.readline())
        except Exception as e:  # pragma: no cover
            box.append(e)

    t = threading.Thread(target=_reader, daemon=True)
    t.start()
    t.join(timeout)
    line = box[0] if box and isinstance(box[0], str) else ""
    if line.startswith("READY "):
        try:
            port = int(line.split()[1])
        except (IndexError, ValueError):
            port = None
        if port:
            return proc, f"http://127.0.0.1:{port}"

    # failure: collect diagnostics and make sure nothing is left behind
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass
    try:
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    except Exception:  # pragma: no cover
        stderr = "<unavailable>"
    _close_pipes(proc)
    if line:
        reason = f"got {line!r} instead of 'READY <port>'"
    elif box:
        reason = f"server exited (code {proc.returncode}) without printing READY"
    else:
        reason = f"no READY line within {timeout} s"
    raise RuntimeError(
        f"fake LLM server failed to start: {reason}\ncommand: {cmd}\nstderr:\n{stderr}"
    )


def _close_pipes(proc) -> None:
    for f in (proc.stdout, getattr(proc, "_fakeserver_stderr", None)):
        try:
            if f is not None:
                f.close()
        except Exception:
            pass


def stop_server(proc) -> None:
    """Terminate the server process and wait for it (kill after 5 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    _close_pipes(proc)


def _request(url: str, data: bytes | None = None, timeout: float = 10) -> dict:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with _OPENER.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def control(base_url: str, **cfg) -> dict:
    """Change the fault config at runtime; returns the new config.

    Example: ``control(url, p429=1.0, retry_after=0)``, ``control(url, reset_stats=True)``.
    """
    return _request(base_url.rstrip("/") + "/control", json.dumps(cfg).encode())


def requests(base_url: str) -> list:
    """The last request bodies the server received (oldest first)."""
    return _request(base_url.rstrip("/") + "/requests")


def stats(base_url: str) -> dict:
    """Return the server's counters (plus ``"config"``)."""
    return _request(base_url.rstrip("/") + "/stats")


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

import argparse  # noqa: E402
import http.server  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402

PROB_KEYS = ("p500", "p503", "p429", "phang", "pmalformed", "preset")
FAULT_OUTCOMES = ("500", "503", "429", "hang", "malformed", "reset")
STAT_KEYS = ("total", "ok", "500", "503", "429", "hang", "malformed", "reset", "401", "400")
ANSWER_MODES = ("keyword", "fixed", "json", "echo")

POSITIVE = ("love", "great", "excellent", "perfect", "amazing", "good")
POS_BLOCKERS = ("not", "never", "terrible", "awful", "bad", "broke", "worst")
NEGATIVE = ("terrible", "awful", "bad", "broke", "worst", "hate", "refund", "junk")


def keyword_label(text: str) -> str:
    t = text.lower()
    i = t.rfind("review:")
    if i >= 0:
        t = t[i + len("review:"):]
    if any(w in t for w in POSITIVE) and not any(w in t for w in POS_BLOCKERS):
        return "positive"
    if any(w in t for w in NEGATIVE):
        return "negative"
    return "neutral"


def _fmt_num(v) -> str:
    s = repr(float(v))
    return s[:-2] if s.endswith(".0") else s


def _parts(content) -> list:
    """Text pieces of a message content (string or list of content blocks)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, dict):
                t = p.get("text")
                if isinstance(t, str):
                    out.append(t)
        return out
    return [str(content)]


class State:
    def __init__(self, args):
        self.lock = threading.Lock()
        self.seed = args.seed
        self.rng = random.Random(args.seed)
        self.require_key = args.require_key
        self.cfg = self._build({
            "p500": args.p500, "p503": args.p503, "p429": args.p429,
            "phang": args.phang, "pmalformed": args.pmalformed, "preset": args.preset,
            "retry_after": args.retry_after, "hang_seconds": args.hang_seconds,
            "delay_ms": args.delay_ms, "answer_mode": args.answer_mode,
            "answer": args.answer, "garble_if_contains": None, "wrong_if_contains": None,
        })
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.first_at = self.last_at = None          # epoch seconds: first model request, last model answer
        self.recent = collections.deque(maxlen=100)   # the last request bodies (GET /requests), never headers

    @staticmethod
    def _build(c: dict) -> dict:
        c = dict(c)
        cum, acc = [], 0.0
        for k in PROB_KEYS:
            acc += c[k]
            cum.append(acc)
        c["_cum"] = tuple(cum)
        c["_retry_after_s"] = _fmt_num(c["retry_after"])
        return c

    def public_config(self) -> dict:
        c = {k: v for k, v in self.cfg.items() if not k.startswith("_")}
        c["seed"] = self.seed
        c["auth_required"] = self.require_key is not None
        return c

    def update(self, body: dict) -> dict:
        """Apply a /control body.  Raises ValueError on bad input."""
        if not isinstance(body, dict):
            raise ValueError("control body must be a JSON object")
        new = {k: v for k, v in self.cfg.items() if not k.startswith("_")}
        reset_stats = False
        seed = None
        require_key = self.require_key
        for k, v in body.items():
            if k in PROB_KEYS:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    raise ValueError(f"{k} must be a number in [0, 1]")
                new[k] = float(v)
            elif k in ("retry_after", "hang_seconds", "delay_ms"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ValueError(f"{k} must be a non-negative number")
                new[k] = v
            elif k == "answer_mode":
                if v not in ANSWER_MODES:
                    raise ValueError(f"answer_mode must be one of {ANSWER_MODES}")
                new[k] = v
            elif k == "answer":
                if not isinstance(v, str):
                    raise ValueError("answer must be a string")
                new[k] = v
            elif k in ("garble_if_contains", "wrong_if_contains"):
                if v is not None and not isinstance(v, str):
                    raise ValueError(f"{k} must be a string or null")
                new[k] = v or None
            elif k == "seed":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError("seed must be an integer")
                seed = v
            elif k == "require_key":
                if v is not None and not isinstance(v, str):
                    raise ValueError("require_key must be a string or null")
                require_key = v
            elif k == "reset_stats":
                reset_stats = bool(v)
            else:
                raise ValueError(f"unknown control key: {k}")
        built = self._build(new)
        with self.lock:
            self.cfg = built
            self.require_key = require_key
            if seed is not None:
                self.seed = seed
                self.rng = random.Random(seed)
            if reset_stats:
                self.stats = dict.fromkeys(STAT_KEYS, 0)
                self.first_at = self.last_at = None
                self.recent.clear()
        return self.public_config()

    def count(self, key: str) -> None:
        with self.lock:
            self.stats[key] += 1

    def draw(self, cfg: dict) -> str:
        """Draw the outcome for one request and count it."""
        with self.lock:
            if self.first_at is None:
                self.first_at = time.time()
            u = self.rng.random()
            outcome = "ok"
            for name, c in zip(FAULT_OUTCOMES, cfg["_cum"]):
                if u < c:
                    outcome = name
                    break
            self.stats[outcome] += 1
        return outcome


STATE: State = None  # type: ignore[assignment]
_ids = itertools.count(1)

_JSON_HEAD = "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n"


def _err_openai(message: str, typ: str, code=None) -> bytes:
    return json.dumps({"error": {"message": message, "type": typ, "code": code}}).encode()


def _err_anthropic(message: str, typ: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": typ, "message": message}}).encode()


BASIC = None  # the expected Authorization header when --require-basic is given


class _BadRequest(Exception):
    pass


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "fakellm/1.0"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def setup(self):
        if hasattr(self.request, "do_handshake"):
            self.request.do_handshake()
        super().setup()

    # -- low level -------------------------------------------------------
    def _send(self, status: int, body: bytes, extra: str = "") -> None:
        reason = self.responses.get(status, ("",))[0]
        head = _JSON_HEAD.format(status, reason, len(body)) + extra + "\r\n"
        self.wfile.write(head.encode("latin-1") + body)

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te and "chunked" in te.lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    raise _BadRequest("bad chunked encoding")
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        cl = self.headers.get("Content-Length")
        if not cl:
            return b""
        try:
            n = int(cl)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise _BadRequest("bad Content-Length")
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, sending nothing."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            # detach() so the fd really closes now even though rfile still
            # references the socket object; later shutdown/close become no-ops.
            os.close(sock.detach())
        except OSError:
            pass

    # -- routing ---------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, b'{"ok": true}')
        elif path == "/requests":
            with STATE.lock:
                recent = list(STATE.recent)
            self._send(200, json.dumps(recent).encode())
        elif path == "/stats":
            with STATE.lock:
                s = dict(STATE.stats)
                s.update(first_request_at=STATE.first_at, last_response_at=STATE.last_at)
            s["config"] = STATE.public_config()
            self._send(200, json.dumps(s).encode())
        elif path in ("/v1/chat/completions", "/chat/completions", "/v1/messages", "/control"):
            self._send(405, _err_openai("method not allowed", "invalid_request_error"))
        else:
            self._send(404, _err_openai(f"not found: {path}", "invalid_request_error"))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_body()
        except _BadRequest as e:
            self._send(400, _err_openai(str(e), "invalid_request_error"))
            return
        if path in ("/v1/chat/completions", "/chat/completions"):
            self._model(body, anthropic=False)
        elif path == "/v1/messages":
            self._model(body, anthropic=True)
        elif path == "/control":
            try:
                cfg = STATE.update(json.loads(body) if body.strip() else {})
            except ValueError as e:  # includes JSONDecodeError / UnicodeDecodeError
                self._send(400, _err_openai(f"bad control request: {e}", "invalid_request_error"))
                return
            self._send(200, json.dumps(cfg).encode())
        else:
            self._send(404, _err_openai(f"not found: {path}", "invalid_request_error"))

    # -- model endpoints -------------------------------------------------
    def _model(self, raw: bytes, anthropic: bool) -> None:
        st = STATE
        cfg = st.cfg  # immutable snapshot (replaced wholesale by /control)
        st.count("total")
        err = _err_anthropic if anthropic else None

        # auth
        if BASIC is not None and self.headers.get("Authorization") != BASIC:
            st.count("401")
            self._send(401, _err_openai("basic auth required", "invalid_request_error"))
            return
        key = st.require_key
        if anthropic:
            sent = self.headers.get("x-api-key")
            if sent is None or self.headers.get("anthropic-version") is None:
                st.count("401")
                self._send(401, _err_anthropic(
                    "missing x-api-key or anthropic-version header", "authentication_error"))
                return
            if key is not None and sent != key:
                st.count("401")
                self._send(401, _err_anthropic("invalid api key", "authentication_error"))
                return
        elif key is not None and self.headers.get("Authorization") != "Bearer " + key:
            st.count("401")
            self._send(401, _err_openai("invalid api key", "invalid_request_error", "invalid_api_key"))
            return

        # parse
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("body must be a JSON object")
            messages = req.get("messages")
            if not isinstance(messages, list):
                raise ValueError("'messages' must be a list")
            with st.lock:
                st.recent.append({"path": self.path.split("?", 1)[0], "body": req})
        except ValueError as e:
            st.count("400")
            msg = f"invalid request body: {e}"
            self._send(400, err(msg, "invalid_request_error") if err
                       else _err_openai(msg, "invalid_request_error"))
            return

        # faults
        outcome = st.draw(cfg)
        if outcome == "reset":
            self._reset()
            return
        if outcome == "hang":
            time.sleep(cfg["hang_seconds"])
        if cfg["delay_ms"]:
            time.sleep(cfg["delay_ms"] / 1000.0)
        if outcome == "500":
            self._send(500, err("internal server error (injected)", "api_error") if err
                       else _err_openai("internal server error (injected)", "server_error"))
            return
        if outcome == "503":
            self._send(503, err("overloaded (injected)", "overloaded_error") if err
                       else _err_openai("service unavailable (injected)", "server_error"),
                       "Retry-After: 1\r\n")
            return
        if outcome == "429":
            self._send(429, err("rate limited (injected)", "rate_limit_error") if err
                       else _err_openai("rate limited (injected)", "rate_limit_error",
                                        "rate_limit_exceeded"),
                       f"Retry-After: {cfg['_retry_after_s']}\r\n")
            return
        if outcome == "malformed":
            self._send(200, b'{"content": [' if anthropic else b'{"choices": [')
            return

        # answer
        total_chars = 0
        last_user = None
        for m in messages:
            if not isinstance(m, dict):
                continue
            parts = _parts(m.get("content"))
            for p in parts:
                total_chars += len(p)
            if m.get("role") == "user":
                last_user = parts
        if anthropic:
            for p in _parts(req.get("system")):
                total_chars += len(p)
        if last_user is None:
            last_user = _parts(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) else []
        mode = cfg["answer_mode"]
        prompt = "\n".join(p for m in messages if isinstance(m, dict) for p in _parts(m.get("content")))
        if mode == "fixed":
            answer = cfg["answer"]
        elif mode == "echo":          # the answer is whatever follows the last "Echo:" in the last user message
            last = "\n".join(last_user)
            answer = last[last.rfind("Echo:") + 5:].strip() if "Echo:" in last else ""
        else:
            label = keyword_label("\n".join(last_user))
            if cfg.get("wrong_if_contains") and cfg["wrong_if_contains"] in prompt:
                label = {"positive": "negative", "negative": "neutral", "neutral": "positive"}[label]
            answer = label if mode == "keyword" else json.dumps({"label": label, "confidence": 0.9})
        if cfg.get("garble_if_contains") and cfg["garble_if_contains"] in prompt:
            answer = "Sure! I think this one is " + answer.replace("{", "(").replace("}", ")")
        ptok = max(1, (total_chars + 3) // 4)
        ctok = max(1, (len(answer) + 3) // 4)
        model = req.get("model")
        n = next(_ids)
        if anthropic:
            resp = {
                "id": f"msg_fake{n:08d}", "type": "message", "role": "assistant",
                "model": model, "content": [{"type": "text", "text": answer}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": ptok, "output_tokens": ctok},
            }
        else:
            resp = {
                "id": f"chatcmpl-fake{n:08d}", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": ptok, "completion_tokens": ctok,
                          "total_tokens": ptok + ctok},
            }
        self._send(200, json.dumps(resp).encode())
        with st.lock:
            st.last_at = time.time()


class FakeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True
    tls = None  # an ssl.SSLContext when serving HTTPS

    def get_request(self):
        sock, addr = self.socket.accept()
        if self.tls is not None:  # the handshake happens in the handler's thread (Handler.setup)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            # client went away / timed out / socket already reset: stay quiet
            return
        super().handle_error(request, client_address)


def _prob(s: str) -> float:
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("probability must be in [0, 1]")
    return v


def _nonneg(s: str) -> float:
    v = float(s)
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Fake OpenAI/Anthropic-compatible LLM server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answer-mode", choices=ANSWER_MODES, default="keyword")
    ap.add_argument("--answer", default="OK", help="answer text for --answer-mode fixed")
    ap.add_argument("--require-key", default=None, metavar="KEY")
    ap.add_argument("--delay-ms", type=_nonneg, default=0.0)
    for k in PROB_KEYS:
        ap.add_argument(f"--{k}", type=_prob, default=0.0)
    ap.add_argument("--retry-after", type=_nonneg, default=0.05)
    ap.add_argument("--hang-seconds", type=_nonneg, default=30.0)
    ap.add_argument("--require-basic", default=None, metavar="USER:PASSWORD")
    ap.add_argument("--certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    ap.add_argument("--keyfile", default=None, help="the certificate's private key (PEM)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    global STATE, BASIC
    args = parse_args(argv)
    STATE = State(args)
    if args.require_basic is not None:
        import base64
        BASIC = "Basic " + base64.b64encode(args.require_basic.encode()).decode()
    server = FakeServer((args.host, args.port), Handler)
    if args.certfile:
        import ssl
        server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.tls.load_cert_chain(args.certfile, args.keyfile)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        sys.stdout.write(f"READY {server.server_address[1]}\n")
        sys.stdout.flush()
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
