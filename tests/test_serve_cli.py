"""`xlstm7b serve` in its own process: a disconnect frees the slot, a full queue is overloaded,
SIGTERM gives new requests a 503 while the running request finishes, a stream cut by the shutdown
deadline ends with a finish reason and [DONE], the access log; the command's errors."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
pytest.importorskip("uvicorn", reason="needs the serve extra (uvicorn, FastAPI)")

import xlstm7b.serve.cli as serve_cli  # noqa: E402
from test_serve import MODEL, free_port, metric_values  # noqa: E402


@contextlib.contextmanager
def launch(checkpoint_dir, *flags: str):
    """`xlstm7b serve` in its own process on a free port, until it answers /health; yields an object
    with url, proc and log (its stderr so far, a file: a pipe could fill and block the server)."""
    port, log = free_port(), checkpoint_dir / f"serve-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xlstm7b", "serve", "--checkpoint", str(checkpoint_dir), "--port", str(port), "--model-name", MODEL,
             *flags], env=os.environ | {"OMP_NUM_THREADS": "1"}, stderr=err, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the server did not start within 120 s"
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    try:
        yield type("CLIServer", (), dict(url=url, proc=proc, log=log.read_text))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cli_server(checkpoint_dir):
    with launch(checkpoint_dir, "--max-batch", "1", "--max-queue", "1", "--max-tokens", "100000", "--shutdown-timeout", "20") as s:
        yield s


def metric(url, name) -> float:
    return metric_values(httpx.get(url + "/metrics").text)[name]


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def long_stream(url, max_tokens):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "temperature": 0}
    return httpx.stream("POST", url + "/v1/completions", json=body, timeout=60)


def test_cli_disconnect_frees_the_slot_and_a_full_queue_is_overloaded(cli_server):
    url = cli_server.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with long_stream(url, 100_000) as stream:  # holds the one slot for minutes unless freed
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(r=client.completions.create(model=MODEL, prompt="a", max_tokens=3)))
        waiter.start()
        wait_for(lambda: metric(url, "xlstm7b_queue_length") == 1)
        with pytest.raises(openai.APIStatusError) as full:
            client.completions.create(model=MODEL, prompt="b", max_tokens=3)
        assert full.value.status_code == 503 and "overloaded" in full.value.message
    # the client went away: its slot goes to the queued request, which finishes at once
    waiter.join(timeout=20)
    assert queued["r"].usage.completion_tokens == 3
    wait_for(lambda: metric(url, "xlstm7b_active_slots") == 0)
    assert metric(url, 'xlstm7b_requests_finished_total{reason="cancelled"}') == 1
    # a client that gives up on a non-streamed request frees the slot too
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 100_000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=1.0)
    wait_for(lambda: metric(url, "xlstm7b_active_slots") == 0)
    assert metric(url, 'xlstm7b_requests_finished_total{reason="cancelled"}') == 2


def refused_while_shutting_down(url):
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(url + "/health").status_code == 503


def test_cli_sigterm_finishes_the_running_request_and_refuses_new_ones(cli_server):
    url, proc = cli_server.url, cli_server.proc
    with long_stream(url, 400) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused_while_shutting_down(url)  # the server still listens: a new request gets its 503
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and len(events) == 400  # the first was read above
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn ends by re-raising the signal it caught
    log = cli_server.log()
    assert "/v1/completions status=200 prompt_tokens=2 output_tokens=400" in log and "finish=length" in log  # the access log
    assert "status=503" in log


def test_cli_a_stream_cut_by_the_shutdown_deadline_ends_with_a_finish_reason_and_done(checkpoint_dir):
    with launch(checkpoint_dir, "--max-tokens", "100000", "--shutdown-timeout", "1") as server:
        with long_stream(server.url, 100_000) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            refused_while_shutting_down(server.url)
            rest = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - t0 < 15
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "cancelled"
        assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_cli_without_the_serve_extra(monkeypatch, capsys):
    monkeypatch.setattr(serve_cli, "MISSING", "fastapi")
    assert serve_cli.main(["--checkpoint", "x"]) == 2
    assert "pip install 'xlstm7b[serve]'" in capsys.readouterr().err


def test_other_commands_do_not_import_the_server():
    code = "import sys, xlstm7b.cli; assert 'fastapi' not in sys.modules and 'xlstm7b.serve' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_cli_errors(tmp_path, checkpoint_dir, capsys):
    assert serve_cli.main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    for flag, value, words in [("--max-batch", "0", "an integer >= 1"), ("--max-n", "0", "an integer >= 1"),
                               ("--max-stop-strings", "0", "an integer >= 1"), ("--max-body-mb", "0", "a number > 0"),
                               ("--prefix-cache-mb", "-1", "a number >= 0"), ("--shutdown-timeout", "nan", "a number >= 0")]:
        with pytest.raises(SystemExit) as exit_:
            serve_cli.main(["--checkpoint", str(checkpoint_dir), flag, value])
        assert exit_.value.code == 2 and f"argument {flag}: must be {words}" in capsys.readouterr().err
    assert serve_cli.main(["--checkpoint", str(checkpoint_dir), "--tokenizer", str(tmp_path / "t.json")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        serve_cli.main(["--checkpoint", str(checkpoint_dir), "--port", "99999"])
    assert exit_.value.code == 2 and "port number from 0 to 65535" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as busy:  # the port is taken: said before the weights load
        assert serve_cli.main(["--checkpoint", str(tmp_path / "none"), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    assert serve_cli.main(["--checkpoint", str(checkpoint_dir), "--host", "no-such-host.invalid"]) == 2
    assert "cannot listen on no-such-host.invalid" in capsys.readouterr().err
