"""Helpers for tests that run ``argosy serve`` as a real subprocess: start it on a free
loopback port, raw HTTP and SSE access next to the OpenAI SDK, metrics scraping, and
the process tree (tensor-parallel workers are the server's children)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai

API_KEY = "test-key-123"
SMALL_FLAGS = ["--max-model-len", "1024", "--kv-cache-memory", "256MiB", "--max-num-seqs", "16", "--dtype", "float32"]
START_TIMEOUT_S = 180
_LISTEN_RE = re.compile(r"on http://127\.0\.0\.1:(\d+)")


# ------------------------------------------------------------------- server process
class ServerProcess:
    """An ``argosy serve`` subprocess on a free loopback port (logs in ``log_path``)."""

    def __init__(self, tmp_dir: Path, name: str, extra_args: list[str], api_key: str | None = None,
                 wait: bool = True):
        """Start the server; with ``wait`` (default) return once it answers ``/health``,
        else right away (call :meth:`wait_ready` later: several servers start in parallel)."""
        self.log_path = tmp_dir / f"{name}.log"
        self.api_key = api_key
        args = [sys.executable, "-m", "argosy.runtime.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                *SMALL_FLAGS, *extra_args]
        if api_key:
            args += ["--api-key", api_key]
        env = {k: v for k, v in os.environ.items() if k not in ("ARGOSY_API_KEY", "VLLM_API_KEY")}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "ServerProcess":
        """Wait until the server listens and answers ``/health`` (raises RuntimeError with
        its log's tail if it exits or takes too long)."""
        self.port = self._wait_for_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = _LISTEN_RE.search(self.log())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {START_TIMEOUT_S}s:\n{self.log()[-3000:]}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http_request(self, "GET", "/health", auth=False)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"/health never returned 200:\n{self.log()[-3000:]}")

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or self.api_key or "none",
                             max_retries=0, timeout=120)

    def stop(self) -> None:
        terminate(self.proc, timeout=40)
        self._log.close()


class RouterProcess(ServerProcess):
    """An ``argosy router`` subprocess on a free loopback port (same helpers as a server)."""

    def __init__(self, tmp_dir: Path, name: str, upstreams: list[str], extra_args: list[str] = ()):
        self.log_path = tmp_dir / f"{name}.log"
        self.api_key = None
        args = [sys.executable, "-m", "argosy.runtime.cli", "router", "--host", "127.0.0.1", "--port", "0",
                "--poll-interval", "0.2", *[a for u in upstreams for a in ("--upstream", u)], *extra_args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.port = self._wait_for_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy()


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(server: ServerProcess, method: str, path: str, body=None, auth: bool = True,
                 headers: dict | None = None, timeout: float = 120):
    """One raw request; ``body`` is bytes (sent as is) or JSON-able. Returns (status, parsed JSON or bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if auth and server.api_key:
        hdrs["Authorization"] = f"Bearer {server.api_key}"
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


def open_stream(server: ServerProcess, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def read_events(resp: http.client.HTTPResponse, limit: int | None = None) -> list:
    """SSE ``data:`` payloads (parsed JSON, or the string "[DONE]") until the end or ``limit``."""
    events = []
    while limit is None or len(events) < limit:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[len(b"data: "):]
        events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
        if events[-1] == "[DONE]":
            break
    return events


def hard_close(conn: http.client.HTTPConnection) -> None:
    """Drop the connection like a client that went away."""
    if conn.sock is not None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


def scrape(server: ServerProcess) -> dict[str, float]:
    """/metrics as ``{"name{labels}": value}`` (labels in exposition order) plus ``{"name": value}``
    for series whose only label is ``model_name``."""
    status, raw = http_request(server, "GET", "/metrics", auth=False)
    assert status == 200
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
        name, _, labels = key.partition("{")
        if labels.startswith('model_name="') and labels.count("=") == 1:
            out[name] = float(value)
    return out


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def assert_error_body(body, status: int) -> dict:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "param" in err and err["code"] == status, err
    return err


def terminate(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_pids(pid: int) -> list[int]:
    """Live (non-zombie) direct children of ``pid``, read from ``/proc`` (Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
