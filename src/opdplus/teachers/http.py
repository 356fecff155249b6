"""A small JSON-over-HTTP client that survives the network: timeouts, retries with backoff, one-line errors.

stdlib urllib only (no `requests` dependency). Retried: connection errors, timeouts, HTTP 5xx (a server
restarting or overloaded). Not retried: HTTP 4xx and bodies that are not JSON, since asking again gives the
same answer. Thread-safe: the served teachers call it from a thread pool.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

from opdplus.teachers.base import TeacherUnavailableError


ERROR_DETAIL_BYTES = 4096  # of an HTTP error's body, for its message


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class _Deadline:
    """Ends one request `seconds` after it began, whatever the server does.

    A server that trickles its status line, headers or body a byte at a time never lets a single socket
    read time out; at the deadline the request's sockets are shut down, which wakes the blocked read.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._connections: list[http.client.HTTPConnection] = []
        self._sockets: list[socket.socket] = []
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="opdplus-http-deadline", daemon=True).start()

    def watched(self, connection_class: type) -> type:
        """`connection_class` whose sockets this deadline may shut down (kept after urllib lets go of them)."""
        deadline = self

        class Watched(connection_class):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                deadline._connections.append(self)  # its `sock` during connect and the TLS handshake

            def connect(self):
                try:
                    super().connect()
                finally:
                    if self.sock is not None:
                        deadline._sockets.append(self.sock)  # read from until the body ends

        return Watched

    def _watch(self):
        if self._done.wait(self.seconds):
            return
        self.expired = True
        while not self._done.is_set():  # again until the request gives up: a socket may still be connecting
            for sock in [connection.sock for connection in list(self._connections)] + list(self._sockets):
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._done.wait(0.05)

    def close(self):
        self._done.set()


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, request):
        return self.do_open(self.deadline.watched(http.client.HTTPConnection), request)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, request):
        return self.do_open(self.deadline.watched(http.client.HTTPSConnection), request, context=self._context)


class JsonClient:
    def __init__(self, base_url: str, *, timeout: float = 120.0, max_retries: int = 4, backoff: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.bytes_received = 0  # response bodies, for the bandwidth a served teacher costs
        self._lock = threading.Lock()

    def get(self, path: str):
        return self._request("GET", path, None)

    def post(self, path: str, payload: dict):
        return self._request("POST", path, payload)

    def _fetch(self, request: urllib.request.Request) -> bytes:
        """The response body, within `timeout` seconds in all (connect, status line, headers and body)."""
        deadline = _Deadline(self.timeout)
        opener = urllib.request.build_opener(_DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline))
        chunks = []
        try:
            with opener.open(request, timeout=self.timeout) as response:
                while chunk := response.read1(1 << 16):
                    chunks.append(chunk)
        except urllib.error.HTTPError as error:
            try:  # an error's body may trickle too: read the start of it while the deadline holds
                error.detail = error.read(ERROR_DETAIL_BYTES)
            except (OSError, http.client.HTTPException):
                error.detail = b""
            if not deadline.expired:
                raise
        except (OSError, http.client.HTTPException):
            if not deadline.expired:
                raise
        finally:
            deadline.close()
        if deadline.expired:  # a cut-off read may look like a short answer or a reset
            raise TimeoutError(f"timed out: no complete answer within {self.timeout:g} s")
        return b"".join(chunks)

    def _request(self, method: str, path: str, payload: dict | None):
        url = self.base_url + path
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                body = self._fetch(request)
            except urllib.error.HTTPError as error:
                detail = _one_line(vars(error).get("detail", b"").decode("utf-8", "replace"))
                if error.code < 500:
                    raise ValueError(f"{method} {url} was refused with HTTP {error.code}: {detail}") from None
                problem = f"HTTP {error.code}: {detail}"
                continue
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, DNS
                reason = getattr(error, "reason", None) or error
                problem = f"{type(error).__name__}: {_one_line(str(reason))}"
                continue
            with self._lock:
                self.bytes_received += len(body)
            try:
                return json.loads(body)
            except ValueError:
                raise ValueError(f"{method} {url} answered with non-JSON: {_one_line(body.decode('utf-8', 'replace'))}") from None
        raise TeacherUnavailableError(
            f"teacher at {url} unavailable after {self.max_retries + 1} attempts; last error: {problem}")
