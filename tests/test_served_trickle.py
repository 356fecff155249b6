"""A served teacher that trickles its status line, headers or body a byte a second cannot outlast `timeout`."""

import socket
import threading
import time

import pytest

from opdplus.teachers.base import TeacherUnavailableError
from opdplus.teachers.http import JsonClient

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"


class ByteASecondServer:
    """Answers each connection by sending `prefix` at once, then one byte a second of `trickled` (for ~8 s)."""

    def __init__(self, prefix: bytes, trickled: bytes):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.prefix, self.trickled = prefix, trickled
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket):
        with connection:
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(4096) or b"\r\n\r\n"
                connection.sendall(self.prefix)
                for byte in self.trickled[:8]:
                    connection.sendall(bytes([byte]))
                    time.sleep(1.0)
            except OSError:  # the client gave up
                pass

    def close(self):
        self.listener.close()


@pytest.mark.parametrize(
    "prefix, trickled",
    [(b"", HEAD + b" " * 100), (HEAD, b" " * 100), (HEAD.replace(b"200 OK", b"503 Busy"), b" " * 100)],
    ids=["status-line-and-headers", "body", "error-body"],
)
def test_a_byte_a_second_fails_at_the_total_deadline(prefix, trickled):
    server = ByteASecondServer(prefix, trickled)
    try:
        client = JsonClient(server.url, timeout=2.0, max_retries=0, backoff=0.01)
        started = time.monotonic()
        with pytest.raises(TeacherUnavailableError) as error:
            client.get("/v1/models")
        elapsed = time.monotonic() - started
        message = str(error.value)
        assert elapsed < 3.0, elapsed
        assert "\n" not in message and server.url in message and "within 2 s" in message, message
    finally:
        server.close()
