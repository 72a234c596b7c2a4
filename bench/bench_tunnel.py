#!/usr/bin/env python3
"""End-to-end tunnel benchmark over loopback: pytunnel -L / -R against a direct connection,
``ssh -L`` (a private sshd) and the two Python tunnels pproxy and asyncssh, side by side in one
run, with references: pytunnel -L with TLS on the tunnel, ``ssh -L -c aes128-gcm@openssh.com``,
a ``socat`` relay, an ``haproxy`` TCP proxy (one process, event-driven C: what a
user-space relay without Python costs), and two chained plain trio relays (the floor for any
two-process Python/trio relay).

Figures, each the median of ``--repeat`` samples (3), with its ratio to the direct connection,
to ``ssh -L`` and to ``pytunnel -L`` measured in the same run (issue 12's rows):

1. bulk throughput, iperf3 (JSON): 1 stream and ``-P 4``, each both directions (``-R``);
2. HTTP keep-alive: wrk ``-t2 -c50 -d5s --latency`` against nginx serving a 1 KiB static file:
   requests/s, p50 and p99 latency;
3. HTTP new connection per request: the same wrk with ``-H 'Connection: close'``;
4. 64 B round trip: p50 and p99 of ``--pings`` (2000) ping-pongs on one connection to an echo
   target, the client pinned to one CPU (``--pin-cpu``);
5. connection setup: p50 and p99 of connect + first echoed byte, ``--conns`` (500) sequential
   connections;
6. memory: RSS growth of the tunnel processes per idle TCP connection (2,000 connections held
   open through a fresh tunnel, ``VmRSS`` from ``/proc/PID/status``).

The report ends with issue 12's table (a row per figure, a column per path) and its goals as
PASS/FAIL lines (SKIP where a path a goal compares with was not run). ``--issue-table`` runs
exactly the issue's columns: direct, ssh -L aes128-gcm, pproxy, asyncssh, pytunnel -L and
pytunnel -L (TLS).

The Python peers, each two processes on loopback like pytunnel's ``serve`` + ``connect``:

* ``pproxy``: ``pproxy -l socks5://...`` as the server and ``pproxy -l
  tunnel{TARGET}://FRONT -r socks5://...`` as the client; plain bytes between the two (no
  encryption), one connection between them per relayed connection (no multiplexing).
* ``asyncssh``: an asyncssh SSH server (this file, ``--asyncssh-server``) and a client holding
  ``forward_local_port`` per target (``--asyncssh-client``); encrypted, asyncssh's first
  cipher choice unless ``--asyncssh-cipher`` (the run prints the one negotiated).

Everything runs as child processes on 127.0.0.1 only: iperf3 server, nginx, an echo target
(``_probes.py``), sshd (own host key, authorized_keys and config in a temporary directory),
``pytunnel serve`` / ``pytunnel connect`` (the CLI), ssh clients, socat, haproxy, pproxy, the
asyncssh ends, the trio relays (this file, ``--trio-relay``). Each one is ended by its pid (and
the pids of the children it forked, found in ``/proc``) when the benchmark ends, however it
ends; the temporary directory is removed. Every loop is bounded in count and in time. Samples
of one case run back to back over all paths, in an order rotated per repeat.

The tools come from ``bench/setup_tools.sh`` (Debian packages) and the ``bench`` extra
(``pip install -e '.[bench]'``: pproxy, asyncssh); this is not part of CI.

    python bench/bench_tunnel.py --issue-table    # issue 12's columns, 17-22 min
    python bench/bench_tunnel.py --issue-table --quick  # 1 repeat, 2 s samples, 3-4 min
    python bench/bench_tunnel.py                  # every path, ~40 min
    python bench/bench_tunnel.py --json out.json  # + every sample as JSON
    python bench/bench_tunnel.py --report out.json  # the tables again
    python bench/bench_tunnel.py --paths direct,pytunnel-L,ssh-L --no-rss
    python bench/bench_tunnel.py --only-profile --profile-dir /tmp/prof
        # py-spy (pip install py-spy) on the pytunnel -L client and server under iperf3 and
        # wrk load; --profile-path pytunnel-L-tls for the TLS tunnel
"""

from __future__ import annotations

import argparse
import atexit
import builtins
import contextlib
import getpass
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _probes import HOST, ProbeError, parse_targets, percentile, pinned, round_trips, setup_times
from _quiet import wait_quiet

SSH_AES = "aes128-gcm@openssh.com"
HTTP_FILE = "index.html"
HTTP_FILE_SIZE = 1024

# --------------------------------------------------------------------------- /proc helpers


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[int, int, list[str]] | None:
    """(ppid, starttime, fields after the command name) of ``pid``, or None if it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    # rest[0] is the state (field 3), so field n is rest[n - 3]
    return int(rest[1]), int(rest[19]), rest


def process_table() -> dict[int, int]:
    """pid -> ppid for every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                table[int(name)] = st[0]
    return table


def descendants(root: int, table: dict[int, int] | None = None) -> list[int]:
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    for _ in range(100_000):  # bounded walk
        if not todo:
            break
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of ``pid`` in clock ticks (0 if it is gone)."""
    st = proc_stat(pid)
    if st is None:
        return 0
    f = st[2]
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def rss_kib(pid: int) -> int:
    text = _read(f"/proc/{pid}/status") or ""
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def listening(port: int) -> bool:
    """Whether something listens on TCP ``port`` (IPv4 or IPv6), from /proc/net/tcp*."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (_read(table) or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[1].endswith(suffix) and parts[3] == "0A":
                return True
    return False


#: Busy fraction of all CPUs below which a sample may start (``_quiet.wait_quiet``): between
#: samples this benchmark's own processes idle, so what is busy is other work.
QUIET_THRESHOLD = 0.15


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def loadavg() -> str:
    return " ".join((_read("/proc/loadavg") or "? ? ?").split()[:3])


# --------------------------------------------------------------------------- processes


class BenchError(Exception):
    pass


@dataclass
class Child:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        text = _read(str(self.log)) or ""
        return "\n".join("    | " + x for x in text.splitlines()[-lines:])


class Processes:
    """Every process the benchmark starts, so that each can be ended by its pid.

    Children forked by them (sshd's per-connection processes, socat's per-connection forks,
    nginx's worker) are found through /proc at cleanup, and also recorded whenever the
    benchmark looks at a tree, in case their parent is already gone by then.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []
        self.seen: dict[int, int] = {}  # descendant pid -> its starttime
        self.pdeathsig = shutil.which("setpriv")
        self._counter = 0

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        self._counter += 1
        log = self.tmp / f"{self._counter:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        # setpriv --pdeathsig: the child gets SIGTERM if the benchmark itself is killed outright
        wrapped = [self.pdeathsig, "--pdeathsig", "TERM", "--", *argv] if self.pdeathsig else argv
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                wrapped,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name, argv, popen, log)
        self.children.append(child)
        return child

    def tree(self, child: Child) -> list[int]:
        """``child`` and its live descendants (remembered for cleanup)."""
        pids = descendants(child.pid)
        for pid in pids:
            st = proc_stat(pid)
            if st is not None:
                self.seen.setdefault(pid, st[1])
        return [child.pid, *pids]

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        self._terminate([child], timeout)
        if child in self.children:
            self.children.remove(child)

    def _terminate(self, children: list[Child], timeout: float) -> None:
        table = process_table()
        extra: dict[int, int] = {}
        for child in children:
            for pid in descendants(child.pid, table):
                st = proc_stat(pid)
                if st is not None:
                    extra[pid] = st[1]
        if children is self.children:  # full cleanup: also the ones seen earlier
            for pid, start in self.seen.items():
                extra.setdefault(pid, start)

        def same(pid: int, start: int) -> bool:
            st = proc_stat(pid)
            return st is not None and st[1] == start and st[2][0] != "Z"

        for sig in (signal.SIGTERM, signal.SIGKILL):
            for child in children:
                if child.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, sig)
            for pid, start in extra.items():
                if same(pid, start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            for _ in range(int(timeout / 0.05) + 1):
                if all(not c.alive() for c in children) and not any(
                    same(p, s) for p, s in extra.items()
                ):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=2)

    def cleanup(self) -> None:
        if self.children or self.seen:
            self._terminate(self.children, 5.0)
        self.children = []
        self.seen = {}


@contextlib.contextmanager
def run_dir(prefix: str, on_cleanup: Callable[[], None] | None = None) -> Iterator[Processes]:
    """A temporary directory and the registry of the processes started in it.

    When the block ends, however it ends (SIGTERM and SIGHUP become ``SystemExit``; atexit
    covers an exit from elsewhere), ``on_cleanup`` runs, every child is ended by its pid and
    the directory is removed, once.
    """

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    procs = Processes(Path(tempfile.mkdtemp(prefix=prefix)))
    done = False

    def cleanup() -> None:
        nonlocal done
        if done:
            return
        done = True
        if on_cleanup is not None:
            on_cleanup()
        procs.cleanup()
        shutil.rmtree(procs.tmp, ignore_errors=True)

    atexit.register(cleanup)
    try:
        yield procs
    finally:
        cleanup()


def wait_for(what: str, check, timeout: float, child: Child | None = None, step: float = 0.05):
    """Poll ``check()`` until it returns something truthy; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        value = check()
        if value:
            return value
        if child is not None and not child.alive():
            raise BenchError(
                f"{child.name} exited ({child.popen.returncode}) while waiting for "
                f"{what}:\n{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    tail = f"\n{child.log_tail()}" if child is not None else ""
    raise BenchError(f"timed out after {timeout:g} s waiting for {what}{tail}")


def reported_port(child: Child, pattern: str, what: str, timeout: float = 300) -> int:
    """The port in the first line of ``child``'s output that ``pattern`` matches (its first
    group). For a process that binds port 0 and prints the port it got: a number chosen
    here and bound by the child later could be taken in between by another process (a
    neighbouring pytest-xdist worker, say)."""
    regex = re.compile(pattern, re.M)

    def port() -> int | None:
        found = regex.search(child.log.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    found: int = wait_for(what, port, timeout, child, step=0.5)
    return found


def callgrind_total(child: Child, what: str) -> int:
    """The instructions a child run under ``valgrind --tool=callgrind`` reports in its log
    once it has exited (the last "Collected" line: a child that forked reports twice)."""
    found = re.findall(r"Collected : (\d+)", child.log.read_text(errors="replace"))
    if not found:
        raise BenchError(f"{what}: no callgrind totals:\n{child.log_tail()}")
    return int(found[-1])


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


# --------------------------------------------------------------------------- targets


class IdleSink:
    """A TCP server in a thread that accepts connections and holds them, sending nothing.

    A connection is closed when its peer closes it (so relays through a tunnel can finish).
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        conns: set[socket.socket] = set()
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    if key.data is None:
                        for _ in range(256):
                            try:
                                conn, _ = self.listener.accept()
                            except (BlockingIOError, InterruptedError):
                                break
                            except OSError:
                                break
                            conn.setblocking(False)
                            sel.register(conn, selectors.EVENT_READ, "conn")
                            conns.add(conn)
                            self.accepted += 1
                            self.open = len(conns)
                    else:
                        conn = key.fileobj
                        try:
                            data = conn.recv(65536)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            sel.unregister(conn)
                            conn.close()
                            conns.discard(conn)
                            self.open = len(conns)
        finally:
            for conn in conns:
                conn.close()
            sel.close()
            self.listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Targets:
    iperf: int
    http: int
    sink: int
    echo: int


# --------------------------------------------------------------------------- paths


@dataclass
class Path_:
    """One way to reach the targets: the front port for each target port, and the processes
    that carry the traffic (their CPU and memory are what is measured)."""

    key: str
    label: str
    front: dict[int, int] = field(default_factory=dict)
    #: (role, child) of the processes relaying the traffic, e.g. ("client", ...)
    procs: list[tuple[str, Child]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    #: The ``Host`` its HTTP requests must carry (a name route); such a path carries only the
    #: HTTP target, so the bulk and memory cases skip it.
    host: str | None = None


class Env:
    """Starts targets and paths; knows every tool's location."""

    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.pytunnel = args.pytunnel
        self.token = "bench-" + os.urandom(12).hex()
        self.iperf3 = which("iperf3")
        self.wrk = which("wrk")
        self.nginx = which("nginx")
        self.sshd = which("sshd")
        self.ssh = which("ssh")
        self.ssh_keygen = which("ssh-keygen")
        self.socat = which("socat")
        self.haproxy = which("haproxy")
        local = Path(sys.executable).parent / "pproxy"  # the running environment's first
        self.pproxy = str(local) if local.exists() else (shutil.which("pproxy") or str(local))
        self.sshd_port = 0
        self.sshd_child: Child | None = None
        self.ssh_key = tmp / "id_ed25519"
        self.asyncssh_cipher = "?"

    # ---------------------------------------------------------------- targets

    def start_iperf_server(self, port: int | None = None) -> tuple[int, Child]:
        port = port or free_port()
        argv = [self.iperf3, "-s", "-B", HOST, "-p", str(port)]
        child = self.procs.start("iperf3-server", argv)
        wait_for(f"iperf3 server on {port}", lambda: listening(port), 10, child)
        return port, child

    def start_nginx(self) -> tuple[int, Child]:
        port = free_port()
        root = self.tmp / "nginx"
        www = root / "www"
        (root / "tmp").mkdir(parents=True)
        www.mkdir()
        (www / HTTP_FILE).write_bytes(b"x" * (HTTP_FILE_SIZE - 1) + b"\n")
        for d in (root, www, root / "tmp"):
            d.chmod(0o755)
        (www / HTTP_FILE).chmod(0o644)
        conf = root / "nginx.conf"
        t = root / "tmp"
        conf.write_text(
            f"""daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    default_type application/octet-stream;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {www};
        location / {{ }}
    }}
}}
"""
        )
        argv = [self.nginx, "-p", str(root), "-e", str(root / "stderr.log"), "-c", str(conf)]
        child = self.procs.start("nginx", argv)
        wait_for(f"nginx on {port}", lambda: listening(port), 10, child)
        return port, child

    def start_echo(self) -> tuple[int, Child]:
        """The echo target of the round-trip and setup cases (``_probes.py``, its own process,
        so the measuring client in this process does not share a GIL with it)."""
        argv = [sys.executable, str(Path(__file__).resolve().parent / "_probes.py")]
        child = self.procs.start("echo-target", argv)
        ports = wait_for(
            "echo target", lambda: parse_targets(_read(str(child.log)) or ""), 20, child
        )
        return ports[2], child

    # ---------------------------------------------------------------- sshd

    def setup_sshd(self) -> None:
        tmp = self.tmp / "ssh"
        tmp.mkdir()
        tmp.chmod(0o700)
        host_key = tmp / "ssh_host_ed25519_key"
        for key in (host_key, self.ssh_key):
            r = run([self.ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], 30)
            if r.returncode:
                raise BenchError(f"ssh-keygen failed: {r.stderr}")
        auth = tmp / "authorized_keys"
        shutil.copy(f"{self.ssh_key}.pub", auth)
        auth.chmod(0o600)
        cfg = tmp / "sshd_config"
        cfg.write_text(
            f"""ListenAddress {HOST}
HostKey {host_key}
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {auth}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
PermitOpen any
X11Forwarding no
PrintMotd no
UseDNS no
MaxStartups 100
LogLevel ERROR
"""
        )
        if not os.path.isdir("/run/sshd") and os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        r = run([self.sshd, "-t", "-f", str(cfg)], 30)
        if r.returncode:
            raise BenchError(f"sshd -t rejected the config: {r.stderr.strip()}")
        port = free_port()
        argv = [self.sshd, "-D", "-e", "-f", str(cfg), "-p", str(port)]
        self.sshd_child = self.procs.start("sshd", argv)
        self.sshd_port = port
        wait_for(f"sshd on {port}", lambda: listening(port), 10, self.sshd_child)

    def ssh_default_cipher(self) -> str:
        r = run([self.ssh, "-G", "-F", "/dev/null", HOST], 10)
        m = re.search(r"^ciphers (\S+)", r.stdout, re.M)
        return m.group(1).split(",")[0] if m else "?"

    # ---------------------------------------------------------------- paths

    def path_direct(self, targets: list[int]) -> Path_:
        return Path_("direct", "direct", {t: t for t in targets})

    def _pytunnel_server(self, name: str, tls: bool) -> tuple[Child, int, str | None]:
        argv = [self.pytunnel, "serve", "--listen", f"{HOST}:0", "--log-level", "warning"]
        if tls:  # a self-signed certificate made in the temp dir; the client pins it
            argv += ["--tls-self-signed", "--tls-dir", str(self.tmp / f"tls-{name}")]
        child = self.procs.start(name, argv, env={"PYTUNNEL_TOKEN": self.token})

        def address() -> tuple[int, str | None] | None:
            log = _read(str(child.log)) or ""
            m = re.search(r"pytunnel server listening on \S+:(\d+)", log)
            f = re.search(r"fingerprint: (SHA256:\S+)", log)
            if m and (f or not tls):
                return int(m.group(1)), (f.group(1) if f else None)
            return None

        port, fingerprint = wait_for("pytunnel server address", address, 20, child)
        return child, port, fingerprint

    def path_pytunnel(self, mode: str, targets: list[int], tls: bool = False) -> Path_:
        """``mode`` is "L" or "R"; forwards are asked for on port 0 and read back from the
        lines ``pytunnel connect`` prints. ``tls``: TLS on the tunnel connection, so that, as
        with ssh, the bytes between the two processes are encrypted."""
        suffix = mode + ("-tls" if tls else "")
        server, port, fingerprint = self._pytunnel_server(f"pytunnel-serve-{suffix}", tls)
        argv = [self.pytunnel, "connect", f"{HOST}:{port}", "--log-level", "warning"]
        if fingerprint:
            argv += ["--tls-fingerprint", fingerprint]
        for t in targets:
            argv += [f"-{mode}", f"0:{HOST}:{t}"]
        client = self.procs.start(
            f"pytunnel-connect-{suffix}", argv, env={"PYTUNNEL_TOKEN": self.token}
        )
        kind = "local" if mode == "L" else "remote"
        pattern = re.compile(rf"^{kind} forward \S+:(\d+) -> \S+:(\d+)$", re.M)

        def forwards() -> dict[int, int] | None:
            found = {int(t): int(f) for f, t in pattern.findall(_read(str(client.log)) or "")}
            return found if len(found) == len(targets) else None

        front = wait_for(f"pytunnel -{mode} forwards", forwards, 20, client)
        for f in front.values():
            wait_for(f"listener on {f}", lambda f=f: listening(f), 10, client)
        cmd_s = "PYTUNNEL_TOKEN=... " + shlex.join(server.argv)
        cmd_c = "PYTUNNEL_TOKEN=... " + shlex.join(argv)
        return Path_(
            f"pytunnel-{suffix}",
            f"pytunnel -{mode}" + (" (TLS)" if tls else ""),
            front,
            [("client", client), ("server", server)],
            [cmd_s, cmd_c],
        )

    def path_pytunnel_name(self, targets: list[int], http: int) -> Path_:
        """The HTTP target behind a name route on the server's shared HTTP port (``-R
        app:80:...``): what the routing costs next to a plain ``-R`` of the same target."""
        argv = [
            self.pytunnel, "serve", "--listen", f"{HOST}:0", "--log-level", "warning",
            "--http-listen", f"{HOST}:0", "--domain", "bench.test",
        ]  # fmt: skip
        server = self.procs.start("pytunnel-serve-name", argv, env={"PYTUNNEL_TOKEN": self.token})

        def addresses() -> tuple[int, int] | None:
            log = _read(str(server.log)) or ""
            m = re.search(r"pytunnel server listening on \S+:(\d+)", log)
            h = re.search(r"routing HTTP by name on \S+:(\d+)", log)
            return (int(m.group(1)), int(h.group(1))) if m and h else None

        port, shared = wait_for("pytunnel server addresses", addresses, 20, server)
        client_argv = [
            self.pytunnel, "connect", f"{HOST}:{port}", "--log-level", "warning",
            "-R", f"app:80:{HOST}:{http}",
        ]  # fmt: skip
        client = self.procs.start(
            "pytunnel-connect-name", client_argv, env={"PYTUNNEL_TOKEN": self.token}
        )
        wait_for(
            "pytunnel name route",
            lambda: "name route http://app.bench.test" in (_read(str(client.log)) or ""),
            20,
            client,
        )
        return Path_(
            "pytunnel-name",
            "pytunnel -R app:80",
            {http: shared},
            [("client", client), ("server", server)],
            [
                "PYTUNNEL_TOKEN=... " + shlex.join(argv),
                "PYTUNNEL_TOKEN=... " + shlex.join(client_argv),
            ],
            host="app.bench.test",
        )

    def path_ssh(self, targets: list[int], cipher: str | None) -> Path_:
        assert self.sshd_child is not None
        front = {t: free_port() for t in targets}
        argv = [
            self.ssh,
            "-N",
            "-F",
            "/dev/null",
            "-p",
            str(self.sshd_port),
            "-i",
            str(self.ssh_key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        if cipher:
            argv += ["-c", cipher]
        for t, f in front.items():
            argv += ["-L", f"{HOST}:{f}:{HOST}:{t}"]
        argv.append(f"{getpass.getuser()}@{HOST}")
        name = "ssh-L" + (f"-{cipher.split('@')[0]}" if cipher else "")
        client = self.procs.start(name, argv)
        for f in front.values():
            wait_for(f"ssh -L listener on {f}", lambda f=f: listening(f), 20, client)
        key = "ssh-L" if not cipher else "ssh-L-aes"
        label = "ssh -L" if not cipher else f"ssh -L -c {cipher.split('@')[0]}"
        # the sshd process serving this connection is a child of the listener: the newest one
        return Path_(
            key,
            label,
            front,
            [("client", client), ("server", self.sshd_child)],
            [shlex.join(self.sshd_child.argv), shlex.join(argv)],
        )

    def path_socat(self, targets: list[int]) -> Path_:
        front, children, cmds = {}, [], []
        for t in targets:
            f = free_port()
            argv = [
                self.socat,
                f"TCP-LISTEN:{f},bind={HOST},reuseaddr,fork,backlog=4096",
                f"TCP:{HOST}:{t}",
            ]
            child = self.procs.start(f"socat-{t}", argv)
            wait_for(f"socat on {f}", lambda f=f: listening(f), 10, child)
            front[t] = f
            children.append(("relay", child))
            cmds.append(shlex.join(argv))
        return Path_("socat", "socat", front, children, cmds)

    def path_haproxy(self, targets: list[int]) -> Path_:
        """One ``haproxy`` process in TCP mode with a ``listen`` section per target: an
        event-driven relay in C, a single thread (``nbthread 1``, as each pytunnel process
        runs one), long timeouts so idle connections stay open for the memory case."""
        assert self.haproxy is not None
        front: dict[int, int] = {}
        # two descriptors a connection, within the hard limit haproxy may raise itself to
        maxconn = min(20000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // 2)
        lines = [
            "global",
            f"    maxconn {maxconn}",
            "    nbthread 1",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 1h",
            "    timeout server 1h",
        ]
        for t in targets:
            f = free_port()
            front[t] = f
            lines += [f"listen t{t}", f"    bind {HOST}:{f}", f"    server s {HOST}:{t}"]
        config = self.tmp / f"haproxy-{targets[0]}.cfg"
        config.write_text("\n".join(lines) + "\n")
        argv = [self.haproxy, "-db", "-f", str(config)]
        child = self.procs.start("haproxy", argv)
        for f in front.values():
            wait_for(f"haproxy on {f}", lambda f=f: listening(f), 10, child)
        return Path_("haproxy", "haproxy", front, [("relay", child)], [shlex.join(argv)])

    def _trio_relay(
        self, name: str, maps: list[int], flag: str = "--trio-relay"
    ) -> tuple[Child, dict[int, int]]:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            flag,
            ",".join(str(t) for t in maps),
        ]
        child = self.procs.start(name, argv)
        pattern = re.compile(r"^relay (\d+) -> (\d+)$", re.M)

        def ports() -> dict[int, int] | None:
            found = {int(t): int(f) for f, t in pattern.findall(_read(str(child.log)) or "")}
            return found if len(found) == len(maps) else None

        return child, wait_for(f"{name} ports", ports, 20, child)

    def path_trio_relay(self, targets: list[int]) -> Path_:
        """Two chained plain trio relays (one connection per connection, no multiplexing, no
        framing): the floor for a two-process Python/trio design such as pytunnel's."""
        server, near = self._trio_relay("trio-relay-server", targets)
        client, far = self._trio_relay("trio-relay-client", [near[t] for t in targets])
        front = {t: far[near[t]] for t in targets}
        return Path_(
            "trio-relay",
            "trio relay x2",
            front,
            [("client", client), ("server", server)],
            [shlex.join(server.argv), shlex.join(client.argv)],
        )

    def _relay_pair(self, key: str, flag: str, targets: list[int]) -> Path_:
        server, near = self._trio_relay(f"{key}-server", targets, flag)
        client, far = self._trio_relay(f"{key}-client", [near[t] for t in targets], flag)
        front = {t: far[near[t]] for t in targets}
        return Path_(
            key,
            LABELS[key],
            front,
            [("client", client), ("server", server)],
            [shlex.join(server.argv), shlex.join(client.argv)],
        )

    def path_trio_raw_relay(self, targets: list[int]) -> Path_:
        """Two chained trio relays written the way pytunnel's pumps are (a task per direction
        on the bare socket: a non-blocking ``os.read``, trio's ``wait_readable`` only when it
        finds nothing): the floor for any design with a trio task per relayed direction."""
        return self._relay_pair("trio-raw-relay", "--trio-raw-relay", targets)

    def path_asyncio_relay(self, targets: list[int]) -> Path_:
        """Two chained plain asyncio relays (streams, ``read``/``write``+``drain``): what the
        same two-process shape costs on asyncio's event loop, next to pproxy's."""
        return self._relay_pair("asyncio-relay", "--asyncio-relay", targets)

    def path_pproxy(self, targets: list[int]) -> Path_:
        """pproxy (pure-Python asyncio) as a two-hop port forward, as its README gives it: a
        SOCKS5 server process, and a client process listening with the fixed-target
        ``tunnel{HOST:PORT}://`` scheme per target that reaches it through the server
        (``-r socks5://...``). One TCP connection between the two per relayed connection: no
        multiplexing, and no encryption (plain bytes on the hop between the processes)."""
        near = free_port()
        server_argv = [self.pproxy, "-l", f"socks5://{HOST}:{near}"]
        server = self.procs.start("pproxy-server", server_argv)
        wait_for(f"pproxy server on {near}", lambda: listening(near), 20, server)
        front = {t: free_port() for t in targets}
        client_argv = [self.pproxy]
        for t, f in front.items():
            client_argv += ["-l", f"tunnel{{{HOST}:{t}}}://{HOST}:{f}"]
        client_argv += ["-r", f"socks5://{HOST}:{near}"]
        client = self.procs.start("pproxy-client", client_argv)
        for f in front.values():
            wait_for(f"pproxy listener on {f}", lambda f=f: listening(f), 20, client)
        return Path_(
            "pproxy",
            "pproxy",
            front,
            [("client", client), ("server", server)],
            [shlex.join(server_argv), shlex.join(client_argv)],
        )

    def path_asyncssh(self, targets: list[int]) -> Path_:
        """asyncssh: an SSH server process of this script (``--asyncssh-server``: host and client
        keys made in the temp dir, public-key auth, direct-tcpip allowed) and a client process
        (``--asyncssh-client``) holding one ``forward_local_port`` per target, as asyncssh's
        docs show local port forwarding. The cipher is asyncssh's first choice unless
        ``--asyncssh-cipher`` names one; the client prints the one negotiated."""
        keys = Path(tempfile.mkdtemp(prefix="asyncssh-", dir=self.tmp))  # one per path made
        me = [sys.executable, str(Path(__file__).resolve())]
        server_argv = [*me, "--asyncssh-server", str(keys)]
        server = self.procs.start("asyncssh-server", server_argv)

        def port() -> int | None:
            m = re.search(r"^asyncssh server on (\d+)$", _read(str(server.log)) or "", re.M)
            return int(m.group(1)) if m else None

        sport = wait_for("asyncssh server port", port, 30, server)
        spec = ",".join(str(t) for t in targets)
        client_argv = [*me, "--asyncssh-client", str(keys), str(sport), spec]
        if self.args.asyncssh_cipher:
            client_argv.append(self.args.asyncssh_cipher)
        client = self.procs.start("asyncssh-client", client_argv)
        pattern = re.compile(r"^forward (\d+) -> (\d+)$", re.M)

        def forwards() -> dict[int, int] | None:
            found = {int(t): int(f) for f, t in pattern.findall(_read(str(client.log)) or "")}
            return found if len(found) == len(targets) else None

        front = wait_for("asyncssh forwards", forwards, 30, client)
        m = re.search(r"^cipher (\S+)$", _read(str(client.log)) or "", re.M)
        self.asyncssh_cipher = m.group(1) if m else "?"
        return Path_(
            "asyncssh",
            "asyncssh",
            front,
            [("client", client), ("server", server)],
            [
                shlex.join(server_argv),
                shlex.join(client_argv) + f"  # cipher {self.asyncssh_cipher}",
            ],
        )

    def make_path(self, key: str, targets: list[int], http: int | None = None) -> Path_:
        """The path ``key`` to ``targets``; ``http`` is the one a name route carries (default:
        the last target)."""
        if key == "direct":
            return self.path_direct(targets)
        if key == "pytunnel-L":
            return self.path_pytunnel("L", targets)
        if key == "pytunnel-R":
            return self.path_pytunnel("R", targets)
        if key == "pytunnel-L-tls":
            return self.path_pytunnel("L", targets, tls=True)
        if key == "pytunnel-name":
            return self.path_pytunnel_name(targets, targets[-1] if http is None else http)
        if key == "ssh-L":
            return self.path_ssh(targets, None)
        if key == "ssh-L-aes":
            return self.path_ssh(targets, SSH_AES)
        if key == "socat":
            return self.path_socat(targets)
        if key == "haproxy":
            return self.path_haproxy(targets)
        if key == "trio-relay":
            return self.path_trio_relay(targets)
        if key == "trio-raw-relay":
            return self.path_trio_raw_relay(targets)
        if key == "asyncio-relay":
            return self.path_asyncio_relay(targets)
        if key == "pproxy":
            return self.path_pproxy(targets)
        if key == "asyncssh":
            return self.path_asyncssh(targets)
        raise ValueError(key)

    def stop_path(self, path: Path_) -> None:
        for _role, child in path.procs:
            if child is not self.sshd_child:
                self.procs.stop(child)


def path_cpu(procs: Processes, path: Path_) -> int:
    """CPU ticks used so far by the processes of ``path`` (and their children)."""
    total = 0
    for _, child in path.procs:
        for pid in procs.tree(child):
            total += cpu_ticks(pid)
    return total


def check_http(path: Path_, http_port: int) -> None:
    url = f"http://{HOST}:{path.front[http_port]}/{HTTP_FILE}"
    request = urllib.request.Request(url, headers={"Host": path.host} if path.host else {})
    for attempt in range(5):
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                body = resp.read()
            if len(body) == HTTP_FILE_SIZE:
                return
            raise BenchError(f"{path.label}: got {len(body)} bytes from {url}")
        except OSError as exc:
            if attempt == 4:
                raise BenchError(f"{path.label}: GET {url} failed: {exc}") from None
            time.sleep(0.5)


# --------------------------------------------------------------------------- measurements

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    figure: str
    case: str
    path: str
    rep: int
    values: dict[str, float | None]
    busy_before: float
    tunnel_cpu: float | None  # CPU seconds of the path's processes / wall seconds
    command: str
    error: str | None = None


def iperf_cases(quick: bool) -> list[tuple[str, list[str]]]:
    return [
        ("1 stream", []),
        ("1 stream -R", ["-R"]),
        ("-P 4", ["-P", "4"]),
        ("-P 4 -R", ["-P", "4", "-R"]),
    ]


def run_iperf(env: Env, port: int, extra: list[str], seconds: float) -> tuple[dict, str]:
    argv = [
        env.iperf3,
        "-c",
        HOST,
        "-p",
        str(port),
        "-t",
        f"{seconds:g}",
        "-J",
        "--connect-timeout",
        "5000",
        *extra,
    ]
    r = run(argv, seconds + 30)
    cmd = shlex.join(argv)
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"iperf3 printed no JSON (rc {r.returncode}): {r.stderr[-300:]}") from None
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    return data, cmd


def run_wrk(
    env: Env,
    port: int,
    seconds: float,
    threads: int,
    conns: int,
    host: str | None = None,
    close: bool = False,
) -> tuple[dict, str]:
    """wrk against nginx through ``port``; ``close``: ``Connection: close`` on every request,
    so each request is a new connection (through a tunnel: a new relayed stream)."""
    url = f"http://{HOST}:{port}/{HTTP_FILE}"
    argv = [
        env.wrk,
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "5s",
        *(["-H", f"Host: {host}"] if host else []),
        *(["-H", "Connection: close"] if close else []),
        url,
    ]
    r = run(argv, seconds + 30)
    cmd = shlex.join(argv)
    out = r.stdout
    if r.returncode != 0:
        raise BenchError(f"wrk failed (rc {r.returncode}): {r.stderr[-300:]} {out[-300:]}")

    def lat(pct: str) -> float | None:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if not m:
            return None
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[m.group(2)]
        return float(m.group(1)) * scale

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not rps:
        raise BenchError(f"wrk printed no Requests/sec: {out[-300:]}")
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return {
        "rps": float(rps.group(1)),
        "p50_ms": lat("50"),
        "p99_ms": lat("99"),
        "errors": float(errors),
    }, cmd


def measure_round_trip(port: int, pings: int, cpu: int | None) -> tuple[dict, str]:
    """64-byte ping-pong on one connection, the client pinned to CPU ``cpu``."""
    with pinned(cpu) as on:
        times = round_trips(port, pings)
    us = [t * 1e6 for t in times]
    where = "unpinned" if on is None else f"client on CPU {on}"
    return {
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "n": float(len(us)),
    }, f"{pings} x 64 B echo round trips on one connection to 127.0.0.1:{port} ({where})"


def measure_setup(port: int, conns: int) -> tuple[dict, str]:
    """Connect + first echoed byte, ``conns`` sequential fresh connections."""
    us = [t * 1e6 for t in setup_times(port, conns)]
    return {
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "n": float(len(us)),
    }, f"{conns} sequential connect + 1 byte echoed to 127.0.0.1:{port}"


#: A case's measurement for one path: None if the path does not carry the target it needs,
#: else a callable returning (values, command).
CaseFn = Callable[[Path_], Callable[[], tuple[dict, str]] | None]


def cases(
    args: argparse.Namespace, env: Env, iperf: int, http: int, echo: int
) -> list[tuple[str, str, CaseFn]]:
    """(figure, case, measurement) of every case the arguments ask for, in the order run."""
    out: list[tuple[str, str, CaseFn]] = []
    if not args.no_iperf:
        for case, extra in iperf_cases(args.quick):

            def iperf_fn(
                p: Path_, extra: list[str] = extra
            ) -> Callable[[], tuple[dict, str]] | None:
                if iperf not in p.front:  # an HTTP-only path (a name route)
                    return None

                def go() -> tuple[dict, str]:
                    data, cmd = run_iperf(env, p.front[iperf], extra, args.seconds)
                    try:
                        gbps = data["end"]["sum_received"]["bits_per_second"] / 1e9
                    except KeyError:
                        raise BenchError("iperf3 JSON without end.sum_received") from None
                    return {"gbps": gbps}, cmd

                return go

            out.append(("iperf", case, iperf_fn))
    for close, wanted in ((False, not args.no_wrk), (True, not args.no_close)):
        if not wanted:
            continue

        def wrk_fn(p: Path_, close: bool = close) -> Callable[[], tuple[dict, str]]:
            return lambda: run_wrk(
                env,
                p.front[http],
                args.wrk_seconds,
                args.wrk_threads,
                args.wrk_conns,
                p.host,
                close=close,
            )

        out.append(("wrk", "close" if close else "http", wrk_fn))
    if not args.no_rtt:
        out.append(
            (
                "rtt",
                "64 B",
                lambda p: (
                    None
                    if echo not in p.front
                    else lambda: measure_round_trip(p.front[echo], args.pings, args.pin_cpu)
                ),
            )
        )
    if not args.no_setup:
        out.append(
            (
                "setup",
                "connect",
                lambda p: (
                    None
                    if echo not in p.front
                    else lambda: measure_setup(p.front[echo], args.conns)
                ),
            )
        )
    return out


def show_values(figure: str, vals: dict) -> str:
    if figure == "iperf":
        return f"{vals['gbps']:6.2f} Gbit/s"
    if figure == "wrk":
        return (
            f"{vals['rps']:9.0f} req/s  p50 {fmt(vals['p50_ms'])} ms  "
            f"p99 {fmt(vals['p99_ms'])} ms  errors {vals['errors']:.0f}"
        )
    return f"p50 {vals['p50_us']:8.0f} us  p99 {vals['p99_us']:8.0f} us  (n {vals['n']:.0f})"


def measure_rss(
    env: Env, procs: Processes, key: str, sink: IdleSink, n: int, rep: int, log
) -> Sample:
    """Fresh tunnel processes; warm up; open ``n`` idle connections; VmRSS growth / n."""
    # sshd's session processes of earlier paths may still be exiting: they are not this path's
    earlier = set(procs.tree(env.sshd_child)) if env.sshd_child is not None else set()
    path = env.make_path(key, [sink.port])
    conns: list[socket.socket] = []
    values: dict[str, float | None] = {}
    error = None
    try:
        front = path.front[sink.port]

        def roles_rss() -> dict[str, int]:
            out: dict[str, int] = {}
            for role, child in path.procs:
                pids = procs.tree(child)
                if child is env.sshd_child:
                    # the listener does not grow; this path's session processes do
                    pids = [p for p in pids[1:] if p not in earlier]
                out[role] = out.get(role, 0) + sum(rss_kib(p) for p in pids)
            return out

        def open_conns(count: int, deadline: float) -> None:
            for _ in range(count):
                if time.monotonic() > deadline:
                    raise BenchError(f"opening {count} connections took too long")
                conns.append(socket.create_connection((HOST, front), timeout=5))

        def wait_sink(accepted: int, open_: int | None, timeout: float) -> None:
            wait_for(
                f"{accepted} connections at the sink",
                lambda: sink.accepted >= accepted and (open_ is None or sink.open <= open_),
                timeout,
                step=0.05,
            )

        # warm-up: first connections pay for imports, caches and first allocations
        base_acc = sink.accepted
        open_conns(50, time.monotonic() + 30)
        wait_sink(base_acc + 50, None, 30)
        for c in conns:
            c.close()
        conns.clear()
        wait_sink(0, 0, 30)
        time.sleep(1.0)
        before = roles_rss()
        base_acc = sink.accepted
        t0 = time.monotonic()
        open_conns(n, time.monotonic() + 120)
        wait_sink(base_acc + n, None, 120)
        opened = time.monotonic() - t0
        time.sleep(1.5)
        during = roles_rss()
        for c in conns:
            c.close()
        conns.clear()
        wait_sink(0, 0, 60)
        time.sleep(1.5)
        after = roles_rss()
        total = 0.0
        for role in before:
            grow = (during[role] - before[role]) * 1024 / n
            values[f"{role}_bytes_per_conn"] = grow
            values[f"{role}_rss_before_kib"] = before[role]
            values[f"{role}_rss_loaded_kib"] = during[role]
            values[f"{role}_rss_after_close_kib"] = after[role]
            total += grow
        values["total_bytes_per_conn"] = total
        values["open_seconds"] = opened
    except (BenchError, OSError) as exc:
        error = str(exc)
    finally:
        for c in conns:
            c.close()
        env.stop_path(path)
    sample = Sample(
        "rss", f"{n} idle conns", key, rep, values, 0.0, None, " ; ".join(path.commands), error
    )
    if error:
        log(f"  [{rep + 1}] rss {path.label:<22} ERROR {error}")
    else:
        per = " ".join(
            f"{k.split('_')[0]}={(v or 0) / 1024:.1f}KiB/conn"
            for k, v in values.items()
            if k.endswith("bytes_per_conn")
        )
        log(f"  [{rep + 1}] rss {path.label:<22} {per} (opened in {values['open_seconds']:.1f}s)")
    return sample


# --------------------------------------------------------------------------- reporting


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def summarize(samples: list[Sample], figure: str, case: str, path: str, key: str):
    xs = [
        s.values[key]
        for s in samples
        if s.figure == figure
        and s.case == case
        and s.path == path
        and s.error is None
        and s.values.get(key) is not None
    ]
    return median(xs), (min(xs) if xs else None), (max(xs) if xs else None), len(xs)


def cpu_median(samples: list[Sample], figure: str, case: str, path: str) -> float | None:
    xs = [
        s.tunnel_cpu
        for s in samples
        if s.figure == figure
        and s.case == case
        and s.path == path
        and s.error is None
        and s.tunnel_cpu is not None
    ]
    return median(xs)


@dataclass(frozen=True)
class Figure:
    """One row of the report: a value of the samples of one case."""

    figure: str
    case: str
    key: str
    label: str
    unit: str
    higher: bool  # whether a higher value is better
    digits: int = 0
    scale: float = 1.0  # shown value = sample value * scale


def figures(samples: list[Sample]) -> list[Figure]:
    """The report's rows that the samples have, in the issue's order."""
    rss_case = next((s.case for s in samples if s.figure == "rss"), "")
    rows = [
        Figure("iperf", c, "gbps", f"iperf3 {c}", "Gbit/s", True, 2) for c, _ in iperf_cases(False)
    ]
    rows += [
        Figure("wrk", "http", "rps", "HTTP keep-alive", "req/s", True),
        Figure("wrk", "http", "p50_ms", "HTTP keep-alive p50", "ms", False, 2),
        Figure("wrk", "http", "p99_ms", "HTTP keep-alive p99", "ms", False, 2),
        Figure("wrk", "close", "rps", "HTTP new connection per request", "req/s", True),
        Figure("wrk", "close", "p99_ms", "HTTP new connection p99", "ms", False, 2),
        Figure("rtt", "64 B", "p50_us", "64 B round trip p50", "us", False),
        Figure("rtt", "64 B", "p99_us", "64 B round trip p99", "us", False),
        Figure("setup", "connect", "p50_us", "connection setup p50", "us", False),
        Figure("setup", "connect", "p99_us", "connection setup p99", "us", False),
        Figure(
            "rss",
            rss_case,
            "total_bytes_per_conn",
            "memory per idle relayed connection, all processes",
            "KiB",
            False,
            1,
            1 / 1024,
        ),
    ]
    have = {(s.figure, s.case) for s in samples}
    return [f for f in rows if (f.figure, f.case) in have]


def fig_median(samples: list[Sample], f: Figure, path: str) -> float | None:
    m = summarize(samples, f.figure, f.case, path, f.key)[0]
    return None if m is None else m * f.scale


def paired(samples: list[Sample], f: Figure, a: str, b: str) -> float | None:
    """Median over repeats of (a's sample / b's sample) within the same repeat."""
    by_rep: dict[int, dict[str, float]] = {}
    for s in samples:
        if s.figure == f.figure and s.case == f.case and s.error is None and s.path in (a, b):
            value = s.values.get(f.key)
            if value:
                by_rep.setdefault(s.rep, {})[s.path] = value
    return median([v[a] / v[b] for v in by_rep.values() if a in v and b in v])


def report(samples: list[Sample], paths: list[tuple[str, str]], args, log) -> dict[str, Any]:
    """Per figure, each path's median, its spread and its ratio to a direct connection, to
    ``ssh -L`` and to ``pytunnel -L``; then issue 12's table and its goals as PASS/FAIL."""
    summary: dict[str, Any] = {"figures": {}, "goals": []}
    keys = [k for k, _ in paths]
    label = dict(paths)
    ssh = "ssh-L" if "ssh-L" in keys else "ssh-L-aes"  # the ratio column's ssh
    refs = [(r, label[r]) for r in ("direct", ssh, "pytunnel-L") if r in keys]
    rows = figures(samples)
    heads = {
        "iperf": f"Bulk throughput (iperf3, {args.seconds:g} s per sample; Gbit/s received)",
        "wrk": (
            f"HTTP (wrk -t{args.wrk_threads} -c{args.wrk_conns} -d{args.wrk_seconds:g}s "
            f"--latency, nginx, {HTTP_FILE_SIZE}-byte file; 'new connection': "
            f"-H 'Connection: close')"
        ),
        "rtt": (
            f"64 B round trip ({args.pings} pings on one connection; the client "
            + ("not pinned" if args.pin_cpu is None else f"pinned to CPU {args.pin_cpu}")
            + ")"
        ),
        "setup": f"Connection setup (connect + first echoed byte, {args.conns} sequential)",
        "rss": "Memory per idle relayed connection (VmRSS growth / connections, all processes)",
    }
    shown: set[str] = set()
    for f in rows:
        if f.figure not in shown:
            shown.add(f.figure)
            log("")
            log(f"### {heads[f.figure]}, median of {args.repeat}")
            log("")
            log(
                "| figure | path | median | min..max | "
                + " | ".join(f"vs {lab}" for _, lab in refs)
                + " | tunnel CPU |"
            )
            log("|---|---|---:|---:|" + "---:|" * len(refs) + "---:|")
        ref_m = {r: fig_median(samples, f, r) for r, _ in refs}
        for key, lab in paths:
            m, lo, hi, n = summarize(samples, f.figure, f.case, key, f.key)
            if not n:
                continue
            m, lo, hi = (None if x is None else x * f.scale for x in (m, lo, hi))
            cpu = cpu_median(samples, f.figure, f.case, key)
            summary["figures"].setdefault(f.label, {})[key] = m
            log(
                f"| {f.label}, {f.unit} | {lab} | {fmt(m, f.digits)} | "
                f"{fmt(lo, f.digits)}..{fmt(hi, f.digits)} | "
                + " | ".join(ratio(m, ref_m[r]) for r, _ in refs)
                + f" | {'-' if cpu is None else f'{cpu * 100:.0f}%'} |"
            )
    if any(f.figure in ("iperf", "wrk") for f in rows):
        log("")
        log(
            "tunnel CPU: CPU time of the relaying processes (both ends, children included) per "
            "second of wall clock; 100% = one core."
        )
    if any(f.figure == "rss" for f in rows):
        rss_detail(samples, paths, args, log)
    if rows:
        issue_table(samples, rows, paths, log)
    goals(samples, keys, label, log, summary)
    return summary


def rss_detail(samples: list[Sample], paths: list[tuple[str, str]], args, log) -> None:
    rss = [s for s in samples if s.figure == "rss"]
    case = rss[0].case
    log("")
    log(f"### Memory per idle connection by process ({case}, fresh processes per sample)")
    log("")
    log(
        "| path | client side B/conn | server side B/conn | total B/conn | "
        "client RSS idle -> loaded -> closed (MiB) | server RSS idle -> loaded -> closed (MiB) |"
    )
    log("|---|---:|---:|---:|---:|---:|")
    for key, label in paths:
        if not any(s.path == key for s in rss):
            continue
        c = summarize(samples, "rss", case, key, "client_bytes_per_conn")[0]
        sv = summarize(samples, "rss", case, key, "server_bytes_per_conn")[0]
        tot = summarize(samples, "rss", case, key, "total_bytes_per_conn")[0]

        def trio_(role: str, key: str = key) -> str:
            parts = [
                summarize(samples, "rss", case, key, f"{role}_rss_{w}_kib")[0]
                for w in ("before", "loaded", "after_close")
            ]
            return " -> ".join(fmt(None if p is None else p / 1024, 1) for p in parts)

        log(
            f"| {label} | {fmt(c, 0)} | {fmt(sv, 0)} | {fmt(tot, 0)} | "
            f"{trio_('client')} | {trio_('server')} |"
        )
    log("")
    log(
        "ssh -L: client = the ssh process; server = sshd's per-connection processes (not the "
        "listener). Each column is its own median, so total need not equal client + server."
    )


def issue_table(
    samples: list[Sample], rows: list[Figure], paths: list[tuple[str, str]], log
) -> None:
    """Issue 12's table: a row per figure, a column per path, each cell the median and, in
    brackets, its ratio to pytunnel -L's."""
    have = [(k, lab) for k, lab in paths if any(s.path == k for s in samples)]
    log("")
    log("### Issue 12's table (medians; in brackets: / pytunnel -L)")
    log("")
    log("| figure | " + " | ".join(lab for _, lab in have) + " |")
    log("|---|" + "---:|" * len(have))
    for f in rows:
        base = fig_median(samples, f, "pytunnel-L")
        cells = []
        for key, _ in have:
            m = fig_median(samples, f, key)
            cells.append(
                "-"
                if m is None
                else f"{m:,.{f.digits}f}"
                + ("" if key == "pytunnel-L" or base is None else f" ({ratio(m, base)})")
            )
        log(f"| {f.label}, {f.unit} | " + " | ".join(cells) + " |")


#: Issue 12's goals: (name, figure, case, key, measured path, reference path, factor). Met when
#: measured / reference >= factor for a figure where higher is better, <= factor otherwise.
#: "ssh" stands for ssh -L with aes128-gcm (the issue's column), else ssh -L.
GOALS = [
    ("round trip p50 <= pproxy's", "rtt", "64 B", "p50_us", "pytunnel-L", "pproxy", 1.0),
    ("round trip p50 <= 3x ssh -L's", "rtt", "64 B", "p50_us", "pytunnel-L", "ssh", 3.0),
    ("keep-alive req/s >= pproxy's", "wrk", "http", "rps", "pytunnel-L", "pproxy", 1.0),
    ("keep-alive req/s >= 0.5x ssh -L's", "wrk", "http", "rps", "pytunnel-L", "ssh", 0.5),
    ("keep-alive p99 <= pproxy's", "wrk", "http", "p99_ms", "pytunnel-L", "pproxy", 1.0),
    ("new-connection req/s >= asyncssh's", "wrk", "close", "rps", "pytunnel-L", "asyncssh", 1.0),
    (
        "connection setup p50 <= asyncssh's",
        "setup",
        "connect",
        "p50_us",
        "pytunnel-L",
        "asyncssh",
        1.0,
    ),
    *[
        (f"bulk {c} >= 1.0x ssh -L's", "iperf", c, "gbps", "pytunnel-L", "ssh", 1.0)
        for c, _ in iperf_cases(False)
    ],
    *[
        (f"TLS bulk {c} >= 0.8x plain", "iperf", c, "gbps", "pytunnel-L-tls", "pytunnel-L", 0.8)
        for c, _ in iperf_cases(False)
    ],
]
#: Bytes per idle relayed connection, all of pytunnel -L's processes together.
MEMORY_GOAL = 8 * 1024


def goals(samples: list[Sample], keys: list[str], label: dict[str, str], log, summary) -> None:
    ssh = "ssh-L-aes" if "ssh-L-aes" in keys else "ssh-L"
    lines = []
    for name, figure, case, key, a, b, factor in GOALS:
        b = ssh if b == "ssh" else b
        f = next(
            (x for x in figures(samples) if (x.figure, x.case, x.key) == (figure, case, key)), None
        )
        if f is None:
            continue
        ma, mb = fig_median(samples, f, a), fig_median(samples, f, b)
        if ma is None or not mb:
            missing = " and ".join(
                label.get(p, LABELS.get(p, p)) for p, m in ((a, ma), (b, mb)) if not m
            )
            lines.append(f"- SKIP {name}: {missing} not measured")
            summary["goals"].append({"goal": name, "verdict": "SKIP"})
            continue
        r = ma / mb
        ok = r >= factor if f.higher else r <= factor
        pr = paired(samples, f, a, b)
        verdict = "PASS" if ok else "FAIL"
        lines.append(
            f"- {verdict} {name}: {label.get(a, a)} {ma:,.{f.digits}f} / {label.get(b, b)} "
            f"{mb:,.{f.digits}f} {f.unit} = {r:.3f}x (goal {'>=' if f.higher else '<='} "
            f"{factor:g}x)" + ("" if pr is None else f" [paired {pr:.2f}x]")
        )
        summary["goals"].append(
            {"goal": name, "verdict": verdict, "ratio": r, "paired_ratio": pr, "a": a, "b": b}
        )
    mem = next((x for x in figures(samples) if x.figure == "rss"), None)
    if mem is not None:
        m = summarize(samples, "rss", mem.case, "pytunnel-L", "total_bytes_per_conn")[0]
        name = "memory per idle relayed connection <= 8 KiB (pytunnel -L, both processes)"
        if m is None:
            lines.append(f"- SKIP {name}: pytunnel -L not measured")
            summary["goals"].append({"goal": name, "verdict": "SKIP"})
        else:
            verdict = "PASS" if m <= MEMORY_GOAL else "FAIL"
            lines.append(f"- {verdict} {name}: {m / 1024:.1f} KiB")
            summary["goals"].append({"goal": name, "verdict": verdict, "bytes": m})
    if not lines:
        return
    log("")
    log(
        f"### Issue 12's goals (ratios of medians of this run; ssh -L = {LABELS[ssh]}; "
        "in brackets the median of the per-repeat ratios)"
    )
    log("")
    for line in lines:
        log(line)
    counts = Counter(g["verdict"] for g in summary["goals"])
    log("")
    log(
        f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
        "(a goal is judged only with both its paths in the run)"
    )


# --------------------------------------------------------------------------- profiling


def profile(
    env: Env,
    procs: Processes,
    targets: Targets,
    out_dir: Path,
    seconds: float,
    log,
    key: str = "pytunnel-L",
) -> None:
    """py-spy record on the pytunnel -L client and server during iperf3 and wrk runs.

    py-spy samples only while a thread is running (not parked in epoll), so the shares below
    are shares of the CPU each process used; ``--nonblocking`` leaves the process running.
    """
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(pyspy, os.X_OK):
        log("profile: py-spy not found (pip install py-spy); skipped")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, list[str] | None]] = [
        ("iperf-1", []),
        ("iperf-1-R", ["-R"]),
        ("iperf-P4-R", ["-P", "4", "-R"]),
        ("wrk", None),
    ]
    path = env.make_path(key, [targets.iperf, targets.http])
    try:
        for case, extra in cases:
            spies = []
            for role, child in path.procs:
                raw = out_dir / f"{key}-{case}-{role}.txt"
                argv = [
                    pyspy,
                    "record",
                    "--pid",
                    str(child.pid),
                    "--rate",
                    "250",
                    "--duration",
                    f"{seconds:g}",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(raw),
                ]
                spies.append((role, raw, procs.start(f"py-spy-{role}", argv)))
            time.sleep(1.0)
            c0 = path_cpu(procs, path)
            t0 = time.monotonic()
            if extra is None:
                vals, cmd = run_wrk(env, path.front[targets.http], seconds - 2, 2, 50)
                result = f"{vals['rps']:.0f} req/s"
            else:
                data, cmd = run_iperf(env, path.front[targets.iperf], extra, seconds - 2)
                result = f"{data['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s"
            wall = time.monotonic() - t0
            cpu = (path_cpu(procs, path) - c0) / TICK / wall
            log(f"profile {path.label} {case}: {result}, tunnel CPU {cpu * 100:.0f}% ({cmd})")
            for role, raw, spy in spies:
                try:
                    spy.popen.wait(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    procs.stop(spy)
                procs.children = [c for c in procs.children if c is not spy]
                log(f"  {role}: {raw}")
                log(summarize_raw(raw, 14))
    finally:
        env.stop_path(path)


#: Frames every sample passes through (click, the CLI, trio's run loop): left out of
#: the inclusive list, which would otherwise start with them.
_WRAPPER_FRAME = re.compile(
    r"\((core|decorators|_serve|_connect)\.py\)$|^(unrolled_run|run|wrapper) \(_run\.py\)$"
)


def summarize_raw(raw: Path, top: int) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in (_read(str(raw)) or "").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [
            re.sub(r" \((?:.*/)?([^/]+\.py):\d+\)", r" (\1)", f) for f in stack.split(";")[1:]
        ]  # first entry: process/thread name
        if not frames:
            continue
        total += n
        selfc[frames[-1]] += n
        for f in set(frames):
            if not _WRAPPER_FRAME.search(f):
                incl[f] += n
    if not total:
        return "    (no samples)"
    lines = [f"    {total} samples; self:"]
    lines += [f"      {c / total * 100:5.1f}%  {f}" for f, c in selfc.most_common(top)]
    lines.append("    inclusive:")
    lines += [f"      {c / total * 100:5.1f}%  {f}" for f, c in incl.most_common(top + 6)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


ALL_PATHS = [
    "direct",
    "pytunnel-L",
    "pytunnel-R",
    "pytunnel-L-tls",
    "pytunnel-name",
    "ssh-L",
    "ssh-L-aes",
    "socat",
    "haproxy",
    "trio-relay",
    "trio-raw-relay",
    "asyncio-relay",
    "pproxy",
    "asyncssh",
]

#: Each path's label in the report (``Path_.label``), also for ``--report`` of a saved run.
LABELS = {
    "direct": "direct",
    "pytunnel-L": "pytunnel -L",
    "pytunnel-R": "pytunnel -R",
    "pytunnel-L-tls": "pytunnel -L (TLS)",
    "pytunnel-name": "pytunnel -R app:80",
    "ssh-L": "ssh -L",
    "ssh-L-aes": f"ssh -L -c {SSH_AES.split('@')[0]}",
    "socat": "socat",
    "haproxy": "haproxy",
    "trio-relay": "trio relay x2",
    "trio-raw-relay": "trio raw relay x2",
    "asyncio-relay": "asyncio relay x2",
    "pproxy": "pproxy",
    "asyncssh": "asyncssh",
}

#: The columns of issue 12's table, in its order (``--issue-table``).
ISSUE_PATHS = ["direct", "ssh-L-aes", "pproxy", "asyncssh", "pytunnel-L", "pytunnel-L-tls"]

#: Paths whose memory per idle connection is measured (a direct connection has no relay; a
#: name route carries HTTP only; socat forks a process per connection).
RSS_PATHS = [
    "pytunnel-L",
    "pytunnel-R",
    "pytunnel-L-tls",
    "ssh-L",
    "ssh-L-aes",
    "haproxy",
    "trio-relay",
    "trio-raw-relay",
    "asyncio-relay",
    "pproxy",
    "asyncssh",
]


def _run_until_interrupted(run: Callable[..., Any], main: Callable[[], Any]) -> None:
    """``run(main)``, ending quietly on SIGINT (how the benchmarks stop a reference relay)
    also when trio raises the ``KeyboardInterrupt`` inside an exception group: a traceback
    printed at exit would be counted by callgrind_tunnel.py as the relay's work. SIGINT is
    armed first: a process started by one that ignores it (a pytest-xdist worker does)
    inherits the ignoring, and Python then installs no handler of its own."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run(main)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        group = getattr(builtins, "BaseExceptionGroup", None)
        if group is None or not isinstance(exc, group) or exc.split(KeyboardInterrupt)[1]:
            raise


def _serve_trio_relays(spec: str, pump: Any, bare: bool) -> None:
    """Serve each target of ``T1,T2`` on a free port, relaying every connection with two
    ``pump(src, dst)`` tasks, given the ``SocketStream``s or (``bare``) their trio sockets;
    prints ``relay FRONT -> TARGET`` per target and runs until interrupted."""
    import trio

    async def handle(conn: Any, target: int) -> None:
        async with conn:
            try:
                upstream = await trio.open_tcp_stream(HOST, target)
            except OSError:
                return
            near, far = (conn.socket, upstream.socket) if bare else (conn, upstream)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(pump, near, far)
                nursery.start_soon(pump, far, near)

    async def serve(target: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST, backlog=4096)
        print(f"relay {listeners[0].socket.getsockname()[1]} -> {target}", flush=True)
        task_status.started()

        async def one(conn: Any) -> None:
            await handle(conn, target)

        await trio.serve_listeners(one, listeners)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for t in spec.split(","):
                await nursery.start(serve, int(t))

    _run_until_interrupted(trio.run, main)


def trio_relay_main(spec: str) -> int:
    """``--trio-relay T1,T2``: listen on a free port per target port and relay each
    connection to it with two trio tasks (the simplest trio relay: no framing, no
    multiplexing). Prints ``relay FRONT -> TARGET`` per target."""
    import trio

    async def pump(src: Any, dst: Any) -> None:
        try:
            while data := await src.receive_some(256 * 1024):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    _serve_trio_relays(spec, pump, bare=False)
    return 0


def trio_raw_relay_main(spec: str) -> int:
    """``--trio-raw-relay T1,T2``: as ``--trio-relay``, but each direction is a task on the
    bare file descriptors (``os.read`` / ``os.write`` on the non-blocking sockets, trio's
    ``wait_readable`` / ``wait_writable`` only when a call would block, a checkpoint every
    eight reads that found data so busy connections take turns), as pytunnel's pumps read a
    socket. Prints ``relay FRONT -> TARGET`` per target."""
    import socket as stdlib_socket

    import trio

    async def pump(src: Any, dst: Any) -> None:
        sfd, dfd = src.fileno(), dst.fileno()
        streak = 0
        try:
            while True:
                try:
                    data = os.read(sfd, 256 * 1024)
                except BlockingIOError:
                    streak = 0
                    await trio.lowlevel.wait_readable(src)
                    continue
                if not data:
                    dst.shutdown(stdlib_socket.SHUT_WR)
                    return
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(dfd, view) :]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(dst)
                streak += 1
                if streak >= 8:
                    streak = 0
                    await trio.lowlevel.checkpoint()
        except OSError:
            pass

    _serve_trio_relays(spec, pump, bare=True)
    return 0


def asyncio_relay_main(spec: str) -> int:
    """``--asyncio-relay T1,T2``: as ``--trio-relay`` on asyncio's event loop (the default
    loop, streams: ``read`` then ``write`` and ``drain``, two tasks per connection): the
    same shape as pproxy's relays without its protocol. Prints ``relay FRONT -> TARGET``."""
    import asyncio

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    async def main() -> None:
        servers = []
        for t in spec.split(","):

            async def one(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, t: int = int(t)
            ) -> None:
                await handle(r, w, t)

            server = await asyncio.start_server(one, HOST, 0, backlog=4096)
            print(f"relay {server.sockets[0].getsockname()[1]} -> {t}", flush=True)
            servers.append(server)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def asyncssh_server_main(keys: str) -> int:
    """``--asyncssh-server DIR``: an asyncssh SSH server on a free loopback port that accepts
    the client key it writes to DIR (with its own host key, whose public half it writes there
    too) and allows direct-tcpip (local forwarding) to any target. Prints ``asyncssh server on
    PORT`` and serves until it is ended by its pid."""
    import asyncio

    import asyncssh

    folder = Path(keys)

    class Server(asyncssh.SSHServer):
        def connection_requested(
            self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
        ) -> bool:
            return True  # forward to the target, as sshd's AllowTcpForwarding yes does

    async def serve() -> None:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key.write_public_key(str(folder / "host_key.pub"))
        client_key.write_private_key(str(folder / "client_key"))
        server = await asyncssh.listen(
            HOST,
            0,
            server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(
                client_key.export_public_key().decode()
            ),
            server_factory=Server,
        )
        print(f"asyncssh server on {server.sockets[0].getsockname()[1]}", flush=True)
        await server.wait_closed()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


def asyncssh_client_main(keys: str, port: str, spec: str, cipher: str | None = None) -> int:
    """``--asyncssh-client DIR PORT T1,T2 [CIPHER]``: connect to the ``--asyncssh-server`` of
    DIR (its host key pinned, its client key) and ``forward_local_port`` a free loopback port
    to each target port. Prints the cipher negotiated and ``forward FRONT -> TARGET`` per
    target, then holds the connection until it is ended by its pid."""
    import asyncio

    import asyncssh

    folder = Path(keys)

    async def run_client() -> None:
        host_key = asyncssh.read_public_key(str(folder / "host_key.pub"))
        options: dict[str, Any] = {}
        if cipher:
            options["encryption_algs"] = [cipher]
        async with asyncssh.connect(
            HOST,
            int(port),
            known_hosts=([host_key], [], []),
            client_keys=[str(folder / "client_key")],
            username="bench",
            agent_path=None,
            **options,
        ) as conn:
            print(f"cipher {conn.get_extra_info('send_cipher')}", flush=True)
            for target in spec.split(","):
                listener = await conn.forward_local_port(HOST, 0, HOST, int(target))
                print(f"forward {listener.get_port()} -> {target}", flush=True)
            await conn.wait_closed()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_client())
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 repeat, 2 s samples, 200 idle connections: a smoke run",
    )
    p.add_argument("--repeat", type=int, default=None, help="samples per figure (3)")
    p.add_argument("--seconds", type=float, default=None, help="iperf3 -t (5)")
    p.add_argument("--wrk-seconds", type=float, default=None, help="wrk -d (5)")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-conns", type=int, default=50)
    p.add_argument("--rss-conns", type=int, default=None, help="idle connections (2000)")
    p.add_argument(
        "--paths",
        default=",".join(ALL_PATHS),
        help=f"comma-separated subset of {','.join(ALL_PATHS)}",
    )
    p.add_argument(
        "--issue-table",
        action="store_true",
        help=f"issue 12's table: exactly the paths {','.join(ISSUE_PATHS)} (overrides --paths)",
    )
    p.add_argument("--no-iperf", action="store_true")
    p.add_argument("--no-wrk", action="store_true", help="no HTTP keep-alive case")
    p.add_argument("--no-close", action="store_true", help="no HTTP new-connection case")
    p.add_argument("--no-rtt", action="store_true", help="no 64 B round-trip case")
    p.add_argument("--no-setup", action="store_true", help="no connection-setup case")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--pings", type=int, default=None, help="round trips per sample (2000)")
    p.add_argument("--conns", type=int, default=None, help="connections per setup sample (500)")
    p.add_argument(
        "--pin-cpu",
        type=int,
        default=None,
        help="CPU the round-trip client runs on (default: the last one allowed; -1: not pinned)",
    )
    p.add_argument(
        "--asyncssh-cipher",
        default=None,
        help="encryption the asyncssh client asks for alone (default: asyncssh's own order)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=2.0,
        help="before each sample, wait up to this many seconds for idle CPUs",
    )
    p.add_argument("--pytunnel", default=None, help="pytunnel CLI (default: next to python)")
    p.add_argument("--json", type=Path, default=None, help="write every sample here")
    p.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="also py-spy the pytunnel -L client and server under iperf3 load",
    )
    p.add_argument("--profile-seconds", type=float, default=12.0)
    p.add_argument(
        "--profile-path",
        default="pytunnel-L",
        choices=["pytunnel-L", "pytunnel-R", "pytunnel-L-tls"],
        help="which pytunnel path --profile-dir profiles",
    )
    p.add_argument("--only-profile", action="store_true", help="skip the measurements")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the tables again from a --json file; measure nothing",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.repeat = args.repeat or (1 if q else 3)
    args.seconds = args.seconds or (2.0 if q else 5.0)
    args.wrk_seconds = args.wrk_seconds or (2.0 if q else 5.0)
    args.rss_conns = args.rss_conns or (200 if q else 2000)
    args.pings = max(1, min(args.pings or (500 if q else 2000), 100_000))
    args.conns = max(1, min(args.conns or (100 if q else 500), 10_000))
    if args.pin_cpu is None and hasattr(os, "sched_getaffinity"):
        args.pin_cpu = max(os.sched_getaffinity(0))
    elif args.pin_cpu is not None and args.pin_cpu < 0:
        args.pin_cpu = None
    if args.issue_table:
        args.paths = ",".join(ISSUE_PATHS)
    if args.pytunnel is None:
        args.pytunnel = default_pytunnel()
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    for x in args.paths:
        if x not in ALL_PATHS:
            p.error(f"unknown path {x!r}")
    if "direct" not in args.paths:
        args.paths.insert(0, "direct")
    return args


def default_pytunnel() -> str:
    """The ``pytunnel`` console script of the running interpreter's environment, else PATH's."""
    local = Path(sys.executable).parent / "pytunnel"
    return str(local) if local.exists() else (shutil.which("pytunnel") or "pytunnel")


def raise_nofile(need: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, need)
    if hard != resource.RLIM_INFINITY and want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))  # root only
            return want, want
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine_info(env: Env) -> list[str]:
    cpu = "?"
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    def tool(argv: list[str], pattern: str) -> str:
        try:
            r = run(argv, 10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        m = re.search(pattern, r.stdout + r.stderr)
        return m.group(1) if m else "?"

    git = "?"
    try:
        root = Path(__file__).resolve().parent.parent
        head = run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], 10).stdout.strip()
        dirty = run(["git", "-C", str(root), "status", "--porcelain", "src"], 10).stdout
        git = f"{head} ({len(dirty.splitlines())} files modified in src/)"
    except (OSError, subprocess.TimeoutExpired):
        pass
    tools = [
        tool([env.ssh, "-V"], r"(OpenSSH_\S+)"),
        tool([env.iperf3, "--version"], r"(iperf \S+)"),
        "wrk " + tool([env.wrk, "-v"], r"wrk (\S+)"),
        tool([env.nginx, "-v"], r"(nginx/\S+)"),
        "socat " + tool([env.socat, "-V"], r"socat version (\S+)"),
        tool([env.haproxy or "haproxy", "-v"], r"(HAProxy version \S+)"),
    ]
    return [
        f"machine: nproc {os.cpu_count()}, CPU {cpu}, kernel {platform.release()}",
        f"python {platform.python_version()} | trio {version('trio')} | "
        f"msgpack {version('msgpack')} | trio-pytunnel {version('trio-pytunnel')} | "
        f"pproxy {version('pproxy')} | asyncssh {version('asyncssh')} | git {git}",
        "tools: " + ", ".join(tools),
    ]


def report_from(path: Path) -> int:
    data = json.loads(path.read_text())
    # runs saved before the round-trip and setup cases lack their options
    defaults = {"pings": 2000, "conns": 500, "pin_cpu": None}
    saved = argparse.Namespace(**{**defaults, **data["args"]})
    samples = [Sample(**s) for s in data["samples"]]
    print(f"report of: {data['command']}")
    for line in data["machine"]:
        print(line)
    paths = [(k, LABELS[k]) for k in saved.paths]
    report(samples, paths, saved, print)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trio-relay"] and len(argv) == 2:  # the trio-relay reference path
        return trio_relay_main(argv[1])
    if argv[:1] == ["--trio-raw-relay"] and len(argv) == 2:
        return trio_raw_relay_main(argv[1])
    if argv[:1] == ["--asyncio-relay"] and len(argv) == 2:
        return asyncio_relay_main(argv[1])
    if argv[:1] == ["--asyncssh-server"] and len(argv) == 2:  # the asyncssh path's two ends
        return asyncssh_server_main(argv[1])
    if argv[:1] == ["--asyncssh-client"] and len(argv) in (4, 5):
        return asyncssh_client_main(*argv[1:])
    args = parse_args(argv)
    if args.report is not None:
        return report_from(args.report)
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    nofile = raise_nofile(4 * args.rss_conns + 4096)

    def close_sinks() -> None:
        while _SINKS:
            _SINKS.pop().close()

    with run_dir("pytunnel-bench-", close_sinks) as procs:
        tmp = procs.tmp
        tmp.chmod(0o711)  # nginx's worker (nobody) must reach its document root
        env = Env(args, procs, tmp)
        return _main(args, env, procs, tmp, nofile)


#: Idle sinks to close at cleanup (threads of this process).
_SINKS: list[IdleSink] = []


def _main(args, env: Env, procs: Processes, tmp: Path, nofile) -> int:
    def log(line: str = "") -> None:
        print(line, flush=True)

    missing = [
        n for n, p in (("iperf3", env.iperf3), ("wrk", env.wrk), ("nginx", env.nginx)) if p is None
    ]
    if any(k.startswith("ssh") for k in args.paths):
        missing += [
            n
            for n, p in (("sshd", env.sshd), ("ssh", env.ssh), ("ssh-keygen", env.ssh_keygen))
            if p is None
        ]
    if "socat" in args.paths and env.socat is None:
        missing.append("socat")
    if "haproxy" in args.paths and env.haproxy is None:
        missing.append("haproxy")
    if "pproxy" in args.paths and not os.access(env.pproxy, os.X_OK):
        missing.append("pproxy (pip install -e '.[bench]')")
    if "asyncssh" in args.paths and importlib.util.find_spec("asyncssh") is None:
        missing.append("asyncssh (pip install -e '.[bench]')")
    if missing:
        log(f"missing tools: {', '.join(missing)}; run bench/setup_tools.sh first")
        return 2
    machine = machine_info(env)  # at the start: src/ may change while the benchmark runs
    for line in machine:
        log(line)
    log(f"RLIMIT_NOFILE {nofile[0]} (children inherit it); temp dir {tmp}")
    log(f"load average at start: {loadavg()}")

    iperf_port, iperf_child = env.start_iperf_server()
    http_port, _ = env.start_nginx()
    sink = IdleSink()
    _SINKS.append(sink)
    echo_port, _ = env.start_echo()
    targets = Targets(iperf_port, http_port, sink.port, echo_port)
    if any(k.startswith("ssh") for k in args.paths):
        env.setup_sshd()
        log(f"ssh default cipher (client's first choice): {env.ssh_default_cipher()}")

    samples: list[Sample] = []
    try:
        if not args.only_profile:
            target_ports = [iperf_port, http_port, echo_port]
            paths = [env.make_path(k, target_ports, http_port) for k in args.paths]
            labels = [(p.key, p.label) for p in paths]
            log("")
            log("targets:")
            log(f"  {shlex.join(iperf_child.argv)}")
            log(
                f"  nginx: 1 worker, {HTTP_FILE_SIZE}-byte /{HTTP_FILE}, access_log off "
                f"(port {http_port})"
            )
            log(
                "  echo (round trip, setup): bench/_probes.py, a thread per connection "
                f"(port {echo_port})"
            )
            if "asyncssh" in args.paths:
                log(f"asyncssh cipher negotiated: {env.asyncssh_cipher}")
            log("paths (front port per target):")
            for p in paths:
                check_http(p, http_port)
                bulk = p.front.get(iperf_port, "-")
                echo = p.front.get(echo_port, "-")
                log(
                    f"  {p.label}: iperf3 via {bulk}, http via {p.front[http_port]}, "
                    f"echo via {echo}"
                )
                for c in p.commands:
                    log(f"      {c}")
            log("")
            deadline_note = time.monotonic()
            for rep in range(args.repeat):
                order = paths[rep % len(paths) :] + paths[: rep % len(paths)]  # rotate
                for figure, case, fn in cases(args, env, iperf_port, http_port, echo_port):
                    for p in order:
                        if fn(p) is None:  # this path does not carry the case's target
                            continue
                        busy = wait_quiet(args.quiet_wait, QUIET_THRESHOLD)
                        c0, t0 = path_cpu(procs, p), time.monotonic()
                        err, vals, cmd = None, {}, ""
                        try:
                            vals, cmd = fn(p)()
                        except (BenchError, ProbeError, OSError, subprocess.TimeoutExpired) as exc:
                            err = str(exc) or type(exc).__name__
                            if figure == "iperf":
                                # a failed test can leave iperf3's server busy: start a new one
                                procs.stop(iperf_child)
                                _, iperf_child = env.start_iperf_server(iperf_port)
                        wall = time.monotonic() - t0
                        cpu = (path_cpu(procs, p) - c0) / TICK / wall if p.procs else None
                        samples.append(Sample(figure, case, p.key, rep, vals, busy, cpu, cmd, err))
                        log(
                            f"  [{rep + 1}] {figure} {case:<12} {p.label:<22} "
                            + (f"ERROR {err}" if err else show_values(figure, vals))
                            + ("" if cpu is None else f"  cpu {cpu * 100:4.0f}%")
                            + f"  (busy before {busy * 100:.0f}%)"
                        )
            for p in paths:
                env.stop_path(p)
            log(
                "(bulk, http, round trip and setup phase: "
                f"{time.monotonic() - deadline_note:.0f} s)"
            )
            if not args.no_rss:
                rss_keys = [k for k in RSS_PATHS if k in args.paths]
                for rep in range(args.repeat):
                    for key in rss_keys:
                        samples.append(measure_rss(env, procs, key, sink, args.rss_conns, rep, log))
            log("")
            log(f"load average at end: {loadavg()}")
            log("")
            log("commands (ports are picked per run):")
            seen = set()
            for s in samples:
                what = f"{s.figure} {s.case}" if s.figure == "wrk" else s.figure
                if s.command and (what, s.path) not in seen:
                    seen.add((what, s.path))
                    log(f"  {what:10} {s.path:<14} {s.command}")
            summary = report(samples, labels, args, log)
            if args.json:
                args.json.write_text(
                    json.dumps(
                        {
                            "command": shlex.join([sys.executable, *sys.argv]),
                            "machine": machine,
                            "args": {
                                k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()
                            },
                            "samples": [s.__dict__ for s in samples],
                            "summary": summary,
                        },
                        indent=1,
                    )
                )
                log(f"\nwrote {args.json}")
        if args.profile_dir:
            log("")
            profile(
                env, procs, targets, args.profile_dir, args.profile_seconds, log, args.profile_path
            )
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
