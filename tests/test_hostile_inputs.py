"""Hostile inputs from issue 15: served teachers that lie or trickle, bad teacher options, malformed data records,
YAML tricks and prompts longer than the model's context. Each must end in one line naming what is wrong, before
anything is written."""

import math
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from opdplus.teachers import TeacherUnavailableError, get_teacher, score_sequences
from test_teachers import FakeServer

SEQUENCES = [[5, 6, 7, 8], [9, 10, 11]]


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- 1. served log-probs must be log-probs


def _vllm_set(value):
    def mutate(body):
        choice = next(choice for choice in body["choices"] if choice["index"] == 0)
        choice["prompt_logprobs"][2] = {k: {**v, "logprob": value} for k, v in choice["prompt_logprobs"][2].items()}
        return body
    return mutate


def _sglang_set(value):
    def mutate(body):
        body[0]["meta_info"]["input_token_logprobs"][2][0] = value
        return body
    return mutate


@pytest.mark.parametrize("api,mutate", [("vllm", _vllm_set), ("sglang", _sglang_set)])
@pytest.mark.parametrize("value", [0.5, True, math.nan, math.inf, -math.inf, "-0.1"])
def test_served_logprob_must_be_finite_and_not_positive(server, api, mutate, value):
    teacher = get_teacher(server.url, api=api, model="teacher", backoff=0.01, max_retries=0, timeout=5.0)
    server.mutate = mutate(value)
    with pytest.raises(ValueError) as error:
        score_sequences(teacher, SEQUENCES)
    message = one_line(str(error.value))
    assert server.url in message and "sequence 0" in message and "position 2" in message, message


def test_served_logprob_tolerates_rounding_above_zero(server):
    teacher = get_teacher(server.url, model="teacher", backoff=0.01, max_retries=0, timeout=5.0)
    server.mutate = _vllm_set(5e-5)
    score_sequences(teacher, SEQUENCES)  # a server's float error around log 1 = 0 is not a lie


# ---------------------------------------------------------------- 2. a total deadline per request; one Ctrl-C


class TricklingServer:
    """Sends headers at once, then one byte of body every `interval` seconds (for up to a minute)."""

    def __init__(self, interval=0.3):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.trickle()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.trickle()

            def trickle(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(200):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(interval)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_trickling_server_fails_after_the_total_timeout():
    trickling = TricklingServer()
    try:
        started = time.monotonic()
        with pytest.raises(TeacherUnavailableError) as error:
            get_teacher(trickling.url, model=None, timeout=1.0, max_retries=0, backoff=0.01)
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, elapsed
        message = one_line(str(error.value))
        assert trickling.url in message and "timed out" in message, message
    finally:
        trickling.close()


def test_one_ctrl_c_stops_a_run_waiting_on_a_served_teacher(server):
    teacher = get_teacher(server.url, model="teacher", backoff=0.01, max_retries=0, timeout=4.0, batch_size=1)
    server.delay = 3.0
    main_thread = threading.main_thread().ident
    timer = threading.Timer(0.3, signal.pthread_kill, (main_thread, signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            score_sequences(teacher, SEQUENCES)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 1.5
