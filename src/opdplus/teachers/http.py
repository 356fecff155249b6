"""A small JSON-over-HTTP client that survives the network: timeouts, retries with backoff, one-line errors.

stdlib urllib only (no `requests` dependency). Retried: connection errors, timeouts, HTTP 5xx (a server
restarting or overloaded). Not retried: HTTP 4xx and bodies that are not JSON, since asking again gives the
same answer. Thread-safe: the served teachers call it from a thread pool.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

from opdplus.teachers.base import TeacherUnavailableError


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


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
        """The response body, within `timeout` seconds in all: a server that trickles its answer a byte at a
        time never lets a single socket read time out, so the deadline is checked between reads."""
        deadline = time.monotonic() + self.timeout
        chunks = []
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            while chunk := response.read1(1 << 16):
                chunks.append(chunk)
                if time.monotonic() > deadline:
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
                detail = _one_line(error.read().decode("utf-8", "replace"))
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
