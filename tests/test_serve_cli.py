"""`onspec serve` / `onspec bench serve` refusals, as a user meets them: a clear message, exit 2, no traceback.
(The server itself is exercised in tests/test_serve.py.)"""
import socket
import subprocess
import sys

from onspec.cluster.redis_server import free_port
from tests.conftest import DATA_DIR


def onspec(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "onspec.cluster.cli", *args, "--data-dir", str(DATA_DIR)],
                          capture_output=True, text=True, timeout=timeout)


def _refused(r, needle):
    assert r.returncode == 2, r.stderr
    assert "onspec: error:" in r.stderr and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _refused(onspec("serve", "--port", str(s.getsockname()[1])), "cannot listen on 127.0.0.1")


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("server:\n  replicas: 0\n  bogus: 1\n")
    _refused(onspec("serve", "--config", str(cfg)), "invalid configuration")


def test_bench_serve_unreachable_url():
    _refused(onspec("bench", "serve", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "1"),
             "cannot reach the server")


def test_bench_serve_bad_counts():
    _refused(onspec("bench", "serve", "--concurrency", "0"), "must be at least 1")


def test_chat_template_that_cannot_be_read():
    _refused(onspec("serve", "--chat-template", "no_such_template", "--tool-call-parser", "hermes"),
             "model.chat_template 'no_such_template'")
