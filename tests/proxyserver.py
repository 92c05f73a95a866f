"""A small forward proxy for tests (stdlib only): plain HTTP requests in absolute form are forwarded, CONNECT
opens a tunnel (HTTPS through the proxy). Every request it serves is appended to a log file as one line,
``METHOD TARGET`` (no headers, so no credentials), so a test can tell whether a client used it.

    python3 tests/proxyserver.py --log FILE [--port 0]

Prints ``READY <port>`` when listening; stops on SIGTERM. ``start_proxy(log)`` runs it as a process and
returns ``(proc, "http://127.0.0.1:<port>")``; stop it with ``tests.fakeserver.stop_server``.
"""
from __future__ import annotations
import argparse, http.client, http.server, select, signal, socket, subprocess, sys, threading, urllib.parse

_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailers", "upgrade",
        "transfer-encoding", "content-length", "server", "date"}


def start_proxy(log, timeout:float=10):
    "Start the proxy as a process logging to `log`; returns (proc, proxy URL)."
    proc = subprocess.Popen([sys.executable, __file__, "--log", str(log)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    box = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start(); t.join(timeout)
    if not box or not box[0].startswith("READY "):
        proc.kill(); proc.wait(5)
        raise RuntimeError(f"proxy did not start: {box!r}")
    return proc, f"http://127.0.0.1:{int(box[0].split()[1])}"


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    log_path = ""

    def log_message(self, format, *args): pass  # noqa: A002

    def _note(self):
        with open(self.log_path, "a", encoding="utf-8") as f: f.write(f"{self.command} {self.path}\n")

    def do_CONNECT(self):
        self._note()
        host, _, port = self.path.rpartition(":")
        try: upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            self.send_error(502); return
        self.send_response(200, "Connection established"); self.end_headers()
        self.close_connection = True
        conns = [self.connection, upstream]
        try:
            while True:
                ready, _, _ = select.select(conns, [], [], 30)
                if not ready: break
                for s in ready:
                    data = s.recv(65536)
                    if not data: return
                    (upstream if s is self.connection else self.connection).sendall(data)
        except OSError: pass
        finally: upstream.close()

    def _forward(self):
        self._note()
        u = urllib.parse.urlsplit(self.path)
        if u.scheme != "http" or not u.hostname:
            self.send_error(400, "absolute http:// URL expected"); return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
        try:
            conn.request(self.command, (u.path or "/") + (f"?{u.query}" if u.query else ""), body, headers)
            r = conn.getresponse(); data = r.read()
        except OSError:
            self.send_error(502); return
        finally: conn.close()
        self.send_response(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in _HOP: self.send_header(k, v)
        self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="forward proxy for tests")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log", required=True)
    args = ap.parse_args(argv)
    Proxy.log_path = args.log
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Proxy)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    print(f"READY {server.server_address[1]}", flush=True)
    try: server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt: pass
    finally: server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
