"""`scripts/run` end to end: the real script, its own redis-server, gateway and worker.

Both tests reuse the repo's `.venv` (the script sees it is up to date and
skips the install) and put the model cache and the run dir (logs, dev key)
in a temporary directory, so they do not touch a developer's `.run/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "run"

pytestmark = [
    pytest.mark.slow,
    # Building the tiny model trains it for a few seconds; on a loaded 2-core box that can take minutes.
    pytest.mark.timeout(600),
    pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs the repo's .venv"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return bool(re.search(r"^State:\s+Z", state, re.M))  # a zombie is gone, just not reaped yet


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    # One cache for the module: the first start builds the tiny model (~10 s), the second reuses it.
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def run_env(tmp_path, model_cache) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("VLMQ_REDIS_URL", "VLMQ_API_KEYS", "VLMQ_MODEL", "VLMQ_HOST", "VLMQ_RUN_DIR"):
        env.pop(name, None)
    env.update(
        VLMQ_PORT=str(free_port()),
        VLMQ_MODEL_CACHE_DIR=str(model_cache),
        VLMQ_RUN_DIR=str(tmp_path / "run"),
        VLMQ_READY_TIMEOUT="420",
    )
    return env


def test_demo_answers_about_the_sample_image(run_env):
    port = int(run_env["VLMQ_PORT"])
    proc = subprocess.run(
        [str(RUN), "--demo"],
        cwd=REPO,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=540,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    answer = re.search(r"^Answer: (.*)$", out, re.M)
    assert answer, out[-4000:]
    assert "blue" in answer.group(1).lower(), answer.group(0)
    assert "redis: started" in out  # VLMQ_REDIS_URL unset: it ran its own
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", out)]
    assert len(set(pids)) >= 3, out[-4000:]  # redis, gateway, worker
    assert all(pid_gone(pid) for pid in pids)
    assert port_free(port)


class Output:
    """Collects a subprocess's output lines on a thread."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, proc: subprocess.Popen) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text, re.M)
            if found:
                return found
            if proc.poll() is not None:
                time.sleep(0.2)  # let the reader drain the pipe
                raise AssertionError(f"scripts/run exited ({proc.returncode}) early:\n{self.text[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text[-4000:]}")


def get(url: str, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_ctrl_c_stops_everything_it_started(run_env, tmp_path):
    port = int(run_env["VLMQ_PORT"])
    proc = subprocess.Popen(
        [str(RUN)],
        cwd=REPO,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = Output(proc.stdout)
    pids: list[int] = []
    try:
        url = out.wait_for(r"^\s+URL:\s+(\S+)$", 480, proc).group(1)
        out.wait_for(r"Press Ctrl-C to stop", 10, proc)
        assert url == f"http://127.0.0.1:{port}"
        key = re.search(r"^\s+API key:\s+(\S+)", out.text, re.M).group(1)
        redis_port = int(re.search(r"^\s+Redis:\s+redis://127\.0\.0\.1:(\d+)/", out.text, re.M).group(1))
        pids = [int(p) for p in re.findall(r"\(pid (\d+)", out.text)]
        assert len(set(pids)) >= 3, out.text[-4000:]  # redis, gateway, worker

        status, body = get(f"{url}/readyz")
        assert status == 200, body
        assert "vlmq-tiny-qwen2-vl" in body["models"]
        # The dev key it printed is the one it generated, kept in the run dir, and it works.
        assert (tmp_path / "run" / "dev-key").read_text().strip() == f"dev:{key}"
        assert get(f"{url}/v1/models", key)[0] == 200
        assert "curl -s" in out.text

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, out.text[-4000:]
        assert all(pid_gone(pid) for pid in pids), [p for p in pids if not pid_gone(p)]
        assert port_free(port)
        assert port_free(redis_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in pids:  # only what this script started, and only if the test failed half-way
            if not pid_gone(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
