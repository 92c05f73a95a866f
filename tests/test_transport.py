"""The HTTP providers' transport, sync and async alike: proxies from the environment (HTTP_PROXY, HTTPS_PROXY,
NO_PROXY) and the CA bundle from SSL_CERT_FILE.

A forward proxy (tests/proxyserver.py) runs as its own process on loopback and logs every request it serves;
the fake LLM server (tests/fakeserver.py) runs as a process too, over plain HTTP or over HTTPS with a
certificate from a CA made for the test (the `cryptography` package). Each check runs the sync `complete`
and the async `acomplete` of one provider.
"""
from __future__ import annotations
import asyncio, datetime, ipaddress, subprocess, sys, textwrap
from pathlib import Path
import pytest

from conftest import ROOT
from tests.fakeserver import stop_server
from tests.proxyserver import start_proxy
from promptsys.errors import ProviderError
from promptsys.providers import OpenAIProvider, Request

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
REVIEW = Request([{"role": "user", "content": "Review: I love it, excellent quality\nSentiment:"}], max_tokens=4)


@pytest.fixture
def clean_env(monkeypatch):
    "No proxy variables from the developer's shell (either case)."
    for v in PROXY_VARS: monkeypatch.delenv(v, raising=False); monkeypatch.delenv(v.lower(), raising=False)
    return monkeypatch


@pytest.fixture
def proxy(tmp_path):
    log = tmp_path / "proxy.log"
    log.touch()
    proc, url = start_proxy(log)
    yield url, log
    stop_server(proc)


def both_paths(base_url:str) -> list[str]:
    "The answers of a fresh provider's sync and async calls (each path makes its client from the environment)."
    p = OpenAIProvider(base_url, "fake-model", api_key_env="")
    try:
        return [p.complete(REVIEW).text, asyncio.run(p.acomplete(REVIEW)).text]
    finally: p.close()


def failures(base_url:str) -> list[str]:
    "The error messages of a fresh provider's sync and async calls."
    p, out = OpenAIProvider(base_url, "fake-model", api_key_env="", connect_timeout=3, read_timeout=3), []
    for call in (lambda: p.complete(REVIEW), lambda: asyncio.run(p.acomplete(REVIEW))):
        with pytest.raises(ProviderError) as ei: call()
        out.append(str(ei.value))
    p.close()
    return out


def test_http_proxy_is_used_by_both_paths_and_no_proxy_bypasses_it(clean_env, fake_server, proxy):
    _, url = fake_server()
    proxy_url, log = proxy
    clean_env.setenv("HTTP_PROXY", proxy_url)
    assert both_paths(url + "/v1") == ["positive", "positive"]
    lines = log.read_text().splitlines()
    assert lines == [f"POST {url}/v1/chat/completions"] * 2, lines        # sync and async went through the proxy

    clean_env.setenv("NO_PROXY", "127.0.0.1")
    assert both_paths(url + "/v1") == ["positive", "positive"]
    assert len(log.read_text().splitlines()) == 2                            # NO_PROXY: straight to the server


def test_a_dead_proxy_fails_both_paths(clean_env, fake_server):
    _, url = fake_server()
    clean_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")                     # nobody listens on the discard port
    assert all("connection failed" in m for m in failures(url + "/v1"))


def make_ca_and_server_cert(d:Path) -> tuple[Path, Path, Path]:
    "A CA certificate and a server certificate it signs, for 127.0.0.1 and localhost: (ca.pem, cert.pem, key.pem)."
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("promptsys test CA")).issuer_name(name("promptsys test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "cert.pem", d / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def https_server(tmp_path, fake_server):
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    _, url = fake_server("--certfile", cert, "--keyfile", key)
    return url.replace("http://", "https://") + "/v1", ca


def test_ssl_cert_file_is_the_trust_store_of_both_paths(clean_env, https_server):
    url, ca = https_server
    clean_env.setenv("SSL_CERT_FILE", str(ca))
    clean_env.delenv("SSL_CERT_DIR", raising=False)
    assert both_paths(url) == ["positive", "positive"]                       # the test CA is trusted, sync and async

    clean_env.delenv("SSL_CERT_FILE")                                         # certifi's bundle: the CA is unknown
    assert all("CERTIFICATE_VERIFY_FAILED" in m or "certificate verify failed" in m for m in failures(url))


def test_https_through_the_proxy_with_the_test_ca(clean_env, https_server, proxy):
    url, ca = https_server
    proxy_url, log = proxy
    clean_env.setenv("SSL_CERT_FILE", str(ca))
    clean_env.setenv("HTTPS_PROXY", proxy_url)
    assert both_paths(url) == ["positive", "positive"]
    port = url.split(":")[2].split("/")[0]
    assert log.read_text().splitlines() == [f"CONNECT 127.0.0.1:{port}"] * 2  # a tunnel each, sync and async

    clean_env.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert both_paths(url) == ["positive", "positive"]
    assert len(log.read_text().splitlines()) == 2


def test_async_clients_close_with_their_event_loops(fake_server):
    "Two `asyncio.run` calls with one provider, then exit: no 'Unclosed' session or connector warnings."
    _, url = fake_server()
    code = textwrap.dedent(f"""
        import asyncio, gc, warnings
        warnings.simplefilter("always")
        from promptsys.providers import OpenAIProvider, Request
        p = OpenAIProvider({url + '/v1'!r}, "fake-model", api_key_env="")
        r = Request([{{"role": "user", "content": "great"}}], max_tokens=4)
        print(asyncio.run(p.acomplete(r)).text, asyncio.run(p.acomplete(r)).text)
        gc.collect()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["positive", "positive"]
    assert "Unclosed" not in out.stderr and "unclosed" not in out.stderr, out.stderr
