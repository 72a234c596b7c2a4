"""Checks of the built distributions, for .ci/run: what a user installs must be complete.

The test suite runs against the source tree, so a file that the sdist or the wheel leaves out
(a data file, ``py.typed``, a new subpackage) would pass every test and still break users.
Two steps, each exits non-zero with one line per problem:

    python .ci/check_dist.py contents DIST_DIR
        the sdist holds every git-tracked file of src/, tests/, docs/ (and cli/ while it is a
        top-level package) and nothing that git does not track besides the metadata setuptools
        generates; the wheel holds every tracked file of src/.

    python -I .ci/check_dist.py installed SOURCE_ROOT
        run by the interpreter of a fresh venv into which only the wheel was installed, from a
        directory outside the checkout (``-I``: neither PYTHONPATH nor the script's folder is on
        sys.path), so every import comes from the installed wheel: the public modules import,
        ``pytunnel --version`` runs and matches the metadata, ``py.typed`` is there, and every
        tracked file of src/pytunnel is installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DISTRIBUTION = "trio-pytunnel"
#: Modules a user imports (the console script is checked by running it).
PUBLIC_MODULES = (
    "pytunnel",
    "pytunnel.protocol",
    "pytunnel.testing",
    "pytunnel.sync",
    "pytunnel.transports",
    # their dependency (prometheus-client) must come with the wheel
    "pytunnel.metrics",
    "pytunnel.admin",
)
#: Paths that must never ship: caches, build output, local results.
JUNK = ("__pycache__/", ".pyc", ".coverage", ".hypothesis/", ".mypy_cache/", "bench/results/")


def tracked(root: Path, *dirs: str) -> set[str]:
    """Files git tracks under ``dirs`` of ``root`` (relative, '/'-separated)."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--", *dirs],
        check=True,
        capture_output=True,
    ).stdout.decode()
    return {p for p in out.split("\0") if p and (root / p).is_file()}


def check_contents(dist: Path, root: Path) -> list[str]:
    problems: list[str] = []
    sdists = sorted(dist.glob("*.tar.gz"))
    wheels = sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        return [f"expected one sdist and one wheel in {dist}, found {sdists + wheels}"]

    with tarfile.open(sdists[0]) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    # every member sits under "NAME-VERSION/"
    sdist = {n.split("/", 1)[1] for n in names if "/" in n}
    dirs = ["src", "tests", "docs"] + (["cli"] if (root / "cli").is_dir() else [])
    wanted = tracked(root, *dirs) | {"README.md", "pyproject.toml", "CHANGELOG.md"}
    for path in sorted(wanted - sdist):
        problems.append(f"sdist lacks {path}")
    generated = {"PKG-INFO", "setup.cfg"}
    everything = tracked(root, ".")
    for path in sorted(sdist - everything - generated):
        if ".egg-info/" not in path:
            problems.append(f"sdist holds {path}, which git does not track")

    with zipfile.ZipFile(wheels[0]) as whl:
        wheel = set(whl.namelist())
    for path in sorted(tracked(root, "src")):
        if path.removeprefix("src/") not in wheel:
            problems.append(f"wheel lacks {path.removeprefix('src/')}")
    for path in sorted(sdist | wheel):
        if any(j in path for j in JUNK):
            problems.append(f"distribution holds junk: {path}")
    if not any(n.startswith("tests/") for n in sdist):
        problems.append("sdist has no tests/")
    if any(n.startswith("tests/") for n in wheel):
        problems.append("wheel holds tests/")
    return problems


def check_installed(root: Path) -> list[str]:
    problems: list[str] = []
    for name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # any import failure is the finding
            problems.append(f"import {name} failed: {exc!r}")
            continue
        where = Path(module.__file__ or "").resolve()
        if root.resolve() in where.parents:
            problems.append(f"{name} was imported from the checkout ({where}), not the wheel")
    if problems:
        return problems

    import pytunnel

    version = importlib.metadata.version(DISTRIBUTION)
    if version != pytunnel.__version__:
        problems.append(f"metadata version {version} != __version__ {pytunnel.__version__}")

    package = Path(pytunnel.__file__ or "").parent
    if not (package / "py.typed").is_file():
        problems.append(f"py.typed missing from {package}")
    for path in sorted(tracked(root, "src/pytunnel")):
        rel = path.removeprefix("src/pytunnel/")
        if not (package / rel).is_file():
            problems.append(f"installed package lacks {rel}")

    plugins = [
        ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "pytunnel"
    ]
    if len(plugins) != 1 or importlib.util.find_spec(plugins[0].module) is None:
        problems.append(f"pytest11 entry point 'pytunnel' does not resolve: {plugins}")

    script = Path(sys.executable).parent / ("pytunnel.exe" if os.name == "nt" else "pytunnel")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0 or pytunnel.__version__ not in result.stdout:
        problems.append(
            f"`pytunnel --version` exited {result.returncode}: "
            f"{(result.stdout + result.stderr).strip()[-500:]!r}"
        )
    else:
        print(f"pytunnel --version: {result.stdout.strip()}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("contents", "installed"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "contents":
        root = Path(__file__).resolve().parent.parent
        problems = check_contents(Path(argv[2]), root)
    else:
        problems = check_installed(Path(argv[2]))
    for line in problems:
        print(f"check_dist: {line}", file=sys.stderr)
    if not problems:
        print(f"check_dist {argv[1]}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
