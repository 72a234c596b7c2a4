#!/usr/bin/env python3
"""A/B benchmark of two commits: the whole tunnel (``pytunnel serve`` + ``pytunnel connect -L``,
two processes, as a user runs them) of OLD against NEW, in one run, samples interleaved.

Made for restructurings that must not slow anything down: on a shared 2-core machine the noise
between two runs made minutes apart is larger than the effects to detect, so both versions run
side by side and every sample of OLD is taken next to a sample of NEW. Per repeat, each metric
is measured for both versions back to back, in an order that alternates between repeats (OLD
NEW, NEW OLD, ...), so neither version is always the first after a pause. The report gives
per metric the median of each version, NEW/OLD of the medians, and the median (min..max) of the
per-repeat ratios: the paired ratio, robust to slow drifts in machine speed.

Metrics, each through the -L forwards of one tunnel per version:

* ``upload MB/s``: ``--mib`` MiB client -> target (a sink that replies with the byte count it
  got, so a truncated transfer is an error, not a fast sample);
* ``download MB/s``: ``--mib`` MiB target -> client (the client checks the count);
* ``bulk CPU s/GB``: CPU time of both pytunnel processes per GB over the two bulk samples;
* ``round trip us``: median of ``--pings`` 64-byte echo round trips on one connection;
* ``connect ms``: median over ``--conns`` fresh connections of connect + first echoed byte
  (-L accept, stream open, dial at the server, target accept).

Each repeat starts fresh tunnel processes for both versions (so that where the scheduler puts
a process is noise rather than a lasting advantage for one side), warms them up untimed, then
takes its samples.

Each version is a tree of its commit unpacked with ``git archive`` into a temporary directory
(no worktree is registered, so nothing is left behind in the repository even if this is
killed); ``NEW`` may be ``WORKTREE``, the checkout as it is, uncommitted changes included. The
CLI of each tree runs with the interpreter running this script and ``PYTHONPATH`` set to that
tree, through the console-script entry point its own ``pyproject.toml`` declares, so the
script works across commits that move the CLI. The targets run in a child process. Every child
is ended by its pid (``bench_tunnel.Processes``); every loop is bounded in count and time, and
``--max-minutes`` bounds the whole run (the report then covers the repeats completed).

    python bench/compare.py main                 # main against HEAD, ~5 min
    python bench/compare.py main WORKTREE --quick  # against uncommitted changes, < 3 min
    python bench/compare.py HEAD~3 HEAD --repeat 9 --json ab.json

``--tls both`` puts TLS on both tunnels (``serve --tls-self-signed``, the client pinning the
certificate's fingerprint); ``--tls old`` / ``--tls new`` on one side only, so that
``compare.py HEAD HEAD --tls new`` measures what TLS costs against the plain tunnel of the
same code, paired.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shlex
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _probes import (
    CHUNK,
    COUNT,
    ProbeError,
    parse_targets,
    recv_exact,
    round_trips,
    serve_targets,
    setup_times,
)
from _probes import connect as _connect
from _quiet import wait_quiet
from bench_tunnel import (
    HOST,
    QUIET_THRESHOLD,
    TICK,
    BenchError,
    Child,
    Processes,
    cpu_ticks,
    free_port,
    listening,
    loadavg,
    run_dir,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"


# --------------------------------------------------------------------------- targets


@dataclass
class Targets:
    sink: int
    source: int
    echo: int


# --------------------------------------------------------------------------- versions


@dataclass
class Version:
    """One side of the comparison: a source tree and its running tunnel."""

    label: str  # "OLD" or "NEW"
    ref: str
    commit: str
    subject: str
    tree: Path
    entry: str  # "module:function", from the tree's pyproject.toml
    front: dict[str, int] = field(default_factory=dict)  # target name -> local forward port
    procs: list[Child] = field(default_factory=list)
    tls: bool = False  # TLS on the tunnel connection (self-signed, pinned)

    def cli(self) -> list[str]:
        """The tree's CLI; run it with ``cwd=self.tree`` (``-c`` puts the cwd on sys.path)."""
        module, func = self.entry.split(":")
        code = (
            f"import sys; sys.argv[0] = 'pytunnel'; from {module} import {func}; sys.exit({func}())"
        )
        return [sys.executable, "-c", code]

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": f"{self.tree / 'src'}{os.pathsep}{self.tree}"}


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def checkout(label: str, ref: str, tmp: Path) -> Version:
    """The tree of ``ref`` under ``tmp`` (``WORKTREE``: this checkout, used in place)."""
    if ref == WORKTREE:
        dirty = len(git("status", "--porcelain", "src", "cli").splitlines())
        commit = git("rev-parse", "--short", "HEAD") + f" + {dirty} modified files in src/ cli/"
        subject, tree = "(the working tree)", REPO
    else:
        try:
            full = git("rev-parse", "--verify", f"{ref}^{{commit}}")
        except subprocess.CalledProcessError:
            raise BenchError(f"{ref!r} is not a commit") from None
        commit, subject = full[:10], git("log", "-1", "--format=%s", full)
        tree = tmp / label
        tree.mkdir()
        archive = subprocess.Popen(
            ["git", "-C", str(REPO), "archive", "--format=tar", full], stdout=subprocess.PIPE
        )
        untar = subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, timeout=120)
        if archive.stdout is not None:
            archive.stdout.close()
        if archive.wait(timeout=120) or untar.returncode:
            raise BenchError(f"could not unpack {ref} into {tree}")
    return Version(label, ref, commit, subject, tree, entry_point(tree))


def entry_point(tree: Path) -> str:
    """``module:function`` of the ``pytunnel`` console script in ``tree``'s pyproject.toml.

    Read with a pattern, not a TOML parser: ``tomllib`` needs Python 3.11 and the project
    supports 3.10.
    """
    text = (tree / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = section and re.search(r'^pytunnel\s*=\s*"([\w.]+:\w+)"', section.group(1), re.M)
    if not found:
        raise BenchError(f"no pytunnel console script in {tree / 'pyproject.toml'}")
    return found.group(1)


def check_imports(version: Version) -> None:
    """The tree's own code must be what runs (an editable install elsewhere must not win)."""
    module = version.entry.split(":")[0]
    code = f"import pytunnel, {module} as m; print(pytunnel.__file__); print(m.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **version.env()},
        cwd=version.tree,
        capture_output=True,
        text=True,
        timeout=60,
    )
    files = result.stdout.split()
    if result.returncode or not all(Path(f).resolve().is_relative_to(version.tree) for f in files):
        raise BenchError(
            f"{version.label}: the code imported is not {version.tree}'s: "
            f"{(result.stdout + result.stderr).strip()[-400:]}"
        )


def _fingerprint(cert: Path) -> str | None:
    """``SHA256:...`` of the PEM certificate ``cert`` (as ``pytunnel serve`` prints it)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    except (OSError, ValueError):
        return None
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def start_tunnel(
    version: Version, procs: Processes, targets: Targets, token: str, tmp: Path
) -> None:
    port = free_port()
    env = {**version.env(), "PYTUNNEL_TOKEN": token}
    serve = [*version.cli(), "serve", "--listen", f"{HOST}:{port}", "--log-level", "warning"]
    tls_dir = tmp / f"tls-{version.label}"
    if version.tls:
        serve += ["--tls-self-signed", "--tls-dir", str(tls_dir)]
    server = procs.start(f"{version.label}-serve", serve, env=env, cwd=version.tree)
    wait_for(f"{version.label} server on {port}", lambda: listening(port), 30, server)
    version.front = {name: free_port() for name in ("sink", "source", "echo")}
    argv = [*version.cli(), "connect", f"{HOST}:{port}", "--log-level", "warning"]
    if version.tls:
        fingerprint = wait_for(
            f"{version.label} certificate",
            lambda: _fingerprint(tls_dir / "server.crt"),
            30,
            server,
        )
        argv += ["--tls-fingerprint", fingerprint]
    for name, front in version.front.items():
        argv += ["-L", f"{HOST}:{front}:{HOST}:{getattr(targets, name)}"]
    client = procs.start(f"{version.label}-connect", argv, env=env, cwd=version.tree)
    version.procs = [server, client]

    def echoes() -> bool:
        try:
            with socket.create_connection((HOST, version.front["echo"]), timeout=5) as s:
                s.sendall(b"?")
                return s.recv(1) == b"?"
        except OSError:
            return False

    wait_for(f"{version.label} tunnel to echo a byte", echoes, 30, client, step=0.2)


def tunnel_ticks(version: Version) -> int:
    return sum(cpu_ticks(c.pid) for c in version.procs)


# --------------------------------------------------------------------------- measurements


def upload(version: Version, nbytes: int) -> float:
    block = memoryview(b"u" * CHUNK)
    t0 = time.perf_counter()
    with _connect(version.front["sink"]) as s:
        left = nbytes
        while left > 0:
            s.sendall(block[: min(left, CHUNK)])
            left -= min(left, CHUNK)
        s.shutdown(socket.SHUT_WR)
        (got,) = COUNT.unpack(recv_exact(s, COUNT.size))
    elapsed = time.perf_counter() - t0
    if got != nbytes:
        raise BenchError(f"upload: the target got {got} of {nbytes} bytes")
    return nbytes / 1e6 / elapsed


def download(version: Version, nbytes: int) -> float:
    buf = bytearray(CHUNK)
    got = 0
    t0 = time.perf_counter()
    with _connect(version.front["source"]) as s:
        s.sendall(COUNT.pack(nbytes))
        while got <= nbytes and (n := s.recv_into(buf)):
            got += n
    elapsed = time.perf_counter() - t0
    if got != nbytes:
        raise BenchError(f"download: got {got} of {nbytes} bytes")
    return nbytes / 1e6 / elapsed


def round_trip(version: Version, pings: int) -> float:
    return statistics.median(round_trips(version.front["echo"], pings)) * 1e6


def connect_time(version: Version, conns: int) -> float:
    return statistics.median(setup_times(version.front["echo"], conns)) * 1e3


#: name, unit, whether higher is better
METRICS = [
    ("upload", "MB/s", True),
    ("download", "MB/s", True),
    ("bulk CPU", "s/GB", False),
    ("round trip", "us", False),
    ("connect", "ms", False),
]


@dataclass
class Sample:
    metric: str
    version: str
    rep: int
    value: float | None
    busy_before: float
    error: str | None = None


def measure_bulk(version: Version, nbytes: int) -> dict[str, float]:
    """upload, download and the tunnel's CPU per GB over both."""
    c0 = tunnel_ticks(version)
    up = upload(version, nbytes)
    down = download(version, nbytes)
    cpu = (tunnel_ticks(version) - c0) / TICK
    return {"upload": up, "download": down, "bulk CPU": cpu / (2 * nbytes / 1e9)}


def run_rep(
    rep: int, versions: list[Version], args: argparse.Namespace, log: Callable[[str], None]
) -> list[Sample]:
    """One repeat: every measurement for both versions, back to back."""
    order = versions if rep % 2 == 0 else versions[::-1]
    samples: list[Sample] = []
    #: the metrics each step measures, and the step
    steps: list[tuple[list[str], Callable[[Version], dict[str, float]]]] = [
        (["upload", "download", "bulk CPU"], lambda v: measure_bulk(v, args.bytes)),
        (["round trip"], lambda v: {"round trip": round_trip(v, args.pings)}),
        (["connect"], lambda v: {"connect": connect_time(v, args.conns)}),
    ]
    for names, fn in steps:
        for v in order:
            busy = wait_quiet(args.quiet_wait, QUIET_THRESHOLD) if args.quiet_wait > 0 else 0.0
            try:
                values = fn(v)
            except (BenchError, ProbeError, OSError) as exc:
                samples += [Sample(n, v.label, rep, None, busy, str(exc)) for n in names]
                log(f"  [{rep + 1}] {v.label} {'/'.join(names)}: ERROR {exc}")
                continue
            samples += [Sample(n, v.label, rep, x, busy) for n, x in values.items()]
            shown = "  ".join(f"{n} {x:.1f}" for n, x in values.items())
            log(f"  [{rep + 1}] {v.label} {shown}  (busy before {busy * 100:.0f}%)")
    return samples


# --------------------------------------------------------------------------- report


def report(samples: list[Sample], log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    log("")
    log("| metric | OLD median | NEW median | NEW/OLD | paired NEW/OLD (min..max) | n | better |")
    log("|---|---:|---:|---:|---:|---:|---|")
    for metric, unit, higher in METRICS:
        by: dict[str, dict[int, float]] = {"OLD": {}, "NEW": {}}
        for s in samples:
            if s.metric == metric and s.value is not None:
                by[s.version][s.rep] = s.value
        old, new = list(by["OLD"].values()), list(by["NEW"].values())
        if not old or not new:
            log(f"| {metric} ({unit}) | - | - | - | - | 0 | |")
            continue
        mo, mn = statistics.median(old), statistics.median(new)
        paired = [by["NEW"][r] / by["OLD"][r] for r in by["OLD"] if r in by["NEW"] and by["OLD"][r]]
        pm = statistics.median(paired) if paired else float("nan")
        spread = f"{min(paired):.2f}..{max(paired):.2f}" if paired else "-"
        log(
            f"| {metric} ({unit}) | {mo:.1f} | {mn:.1f} | {mn / mo:.3f} | {pm:.3f} ({spread}) "
            f"| {len(paired)} | {'higher' if higher else 'lower'} |"
        )
        summary[metric] = {"old": mo, "new": mn, "ratio": mn / mo, "paired_ratio": pm}
    busy = [s.busy_before for s in samples]
    contended = sum(b >= QUIET_THRESHOLD for b in busy)
    errors = sum(s.error is not None for s in samples)
    log("")
    log(
        f"NEW/OLD above 1 is faster for 'higher' metrics and slower for 'lower' ones. {contended} "
        f"of {len(busy)} samples started while other processes kept >= "
        f"{QUIET_THRESHOLD:.0%} of the CPUs busy; {errors} failed."
    )
    return summary


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("old", help="the reference commit (OLD)")
    p.add_argument(
        "new", nargs="?", default="HEAD", help=f"the commit measured (NEW; or {WORKTREE})"
    )
    p.add_argument("--quick", action="store_true", help="3 repeats of smaller samples: < 3 min")
    p.add_argument("--repeat", type=int, default=None, help="repeats (7; --quick 3)")
    p.add_argument("--mib", type=float, default=None, help="MiB per bulk sample (256; --quick 64)")
    p.add_argument("--pings", type=int, default=None, help="round trips per sample (2000; 500)")
    p.add_argument("--conns", type=int, default=None, help="connections per sample (300; 100)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help="before each sample wait up to this many s for idle CPUs (2; --quick 0.5; 0: off)",
    )
    p.add_argument("--max-minutes", type=float, default=15.0, help="stop repeating after this")
    p.add_argument("--json", type=Path, default=None, help="write every sample here")
    p.add_argument(
        "--tls",
        choices=["none", "both", "old", "new"],
        default="none",
        help="TLS on the tunnel of both versions, or of one",
    )
    p.add_argument("--serve-targets", action="store_true", help=argparse.SUPPRESS)
    q = "--quick" in argv
    if "--serve-targets" in argv:
        return argparse.Namespace(serve_targets=True)
    a = p.parse_args(argv)
    a.repeat = max(1, min(a.repeat or (3 if q else 7), 50))
    a.mib = a.mib or (64.0 if q else 256.0)
    a.bytes = int(a.mib * 1024 * 1024)
    a.pings = max(1, min(a.pings or (500 if q else 2000), 100_000))
    a.conns = max(1, min(a.conns or (100 if q else 300), 10_000))
    a.quiet_wait = (0.5 if q else 2.0) if a.quiet_wait is None else a.quiet_wait
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.serve_targets:
        return serve_targets()
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)

    with run_dir("pytunnel-compare-") as procs:
        try:
            return _main(args, procs, procs.tmp)
        except BenchError as exc:
            print(f"compare failed: {exc}", flush=True)
            return 1


def _main(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    def log(line: str = "") -> None:
        print(line, flush=True)

    t_start = time.monotonic()
    versions = [checkout("OLD", args.old, tmp), checkout("NEW", args.new, tmp)]
    for v in versions:
        v.tls = args.tls in ("both", v.label.lower())
        check_imports(v)
        subject = v.subject if len(v.subject) <= 60 else v.subject[:57] + "..."
        tls = " over TLS" if v.tls else ""
        log(f"{v.label}: {v.ref} = {v.commit} {subject!r} (entry point {v.entry}){tls}")
    log(f"python {sys.version.split()[0]}, nproc {os.cpu_count()}, load average {loadavg()}")
    log(
        f"{args.repeat} repeats; bulk {args.mib:g} MiB each way, {args.pings} round trips, "
        f"{args.conns} connections per sample; quiet wait {args.quiet_wait:g} s"
    )

    targets_child = procs.start("targets", [sys.executable, __file__, "--serve-targets"])

    def ports() -> list[int] | None:
        return parse_targets(targets_child.log.read_text() if targets_child.log.exists() else "")

    targets = Targets(*wait_for("targets", ports, 20, targets_child))
    token = "compare-" + os.urandom(12).hex()
    # the first connections of a process pay for imports, caches and first allocations
    warm = argparse.Namespace(**{**vars(args), "bytes": min(args.bytes, 8 << 20)})
    warm.pings, warm.conns, warm.quiet_wait = 50, 10, 0.0

    samples: list[Sample] = []
    deadline = t_start + args.max_minutes * 60
    for rep in range(args.repeat):
        if time.monotonic() > deadline:
            log(f"--max-minutes reached: {rep} of {args.repeat} repeats done")
            break
        # fresh tunnel processes per repeat, started in the repeat's order: which CPU a
        # process lands on and what its neighbours do then is noise, not a bias for one side
        for v in versions if rep % 2 == 0 else versions[::-1]:
            start_tunnel(v, procs, targets, token, tmp)
        run_rep(rep, versions, warm, lambda _line: None)
        samples += run_rep(rep, versions, args, log)
        for v in versions:
            for child in v.procs:
                procs.stop(child)
    log(f"load average at end: {loadavg()}; {time.monotonic() - t_start:.0f} s in all")
    summary = report(samples, log)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": [sys.executable, *sys.argv],
                    "versions": {v.label: {"ref": v.ref, "commit": v.commit} for v in versions},
                    "args": {
                        k: str(x) if isinstance(x, Path) else x for k, x in vars(args).items()
                    },
                    "samples": [s.__dict__ for s in samples],
                    "summary": summary,
                },
                indent=1,
            )
        )
        log(f"wrote {args.json}")
    return 1 if any(s.error for s in samples) else 0


if __name__ == "__main__":
    sys.exit(main())
