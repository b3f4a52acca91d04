"""Check the file lists of fastadam's sdist and wheel against the source tree (run by .ci/run).

    python tools/check_dist.py sdist dist/fastadam-0.1.0.tar.gz
    python tools/check_dist.py wheel wheelhouse/fastadam-0.1.0-cp311-cp311-manylinux_2_35_x86_64.whl [--repaired]

The sdist must hold exactly what builds and describes the package: the
top-level build files, and every file git tracks under csrc/ and python/ --
nothing missing (the wheel could not be built from it) and nothing more
(tests, benchmarks, CI and build outputs stay out).

The wheel must hold exactly the package's files from python/fastadam/ (the
type stub and py.typed among them), the compiled module, and, with
--repaired, the OpenMP runtime auditwheel bundled under fastadam.libs/.
Prints the lists' differences and exits 1 if they differ.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDIST_TOP_LEVEL = {"PKG-INFO", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE"}


def tracked(*folders: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", "--", *folders], cwd=ROOT, check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def package_files() -> set[str]:
    """The files of python/fastadam/ that git tracks, as the wheel names them (fastadam/...)."""
    return {p[len("python/"):] for p in tracked("python/fastadam")}


def report(kind: str, actual: set[str], expected: set[str]) -> int:
    missing, extra = sorted(expected - actual), sorted(actual - expected)
    for name in missing:
        print(f"{kind}: missing {name}")
    for name in extra:
        print(f"{kind}: unexpected {name}")
    if missing or extra:
        return 1
    print(f"{kind}: the {len(actual)} files expected, no more")
    return 0


def check_sdist(path: Path) -> int:
    with tarfile.open(path) as archive:
        members = [m.name for m in archive.getmembers() if m.isfile()]
    prefix = members[0].split("/", 1)[0] + "/"
    actual = {m[len(prefix):] for m in members}
    return report("sdist", actual, SDIST_TOP_LEVEL | tracked("csrc", "python"))


def check_wheel(path: Path, repaired: bool) -> int:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
    status = 0
    package = {n for n in names if n.startswith("fastadam/")}
    compiled = {n for n in package if fnmatch.fnmatch(n, "fastadam/_core.*.so")}
    if len(compiled) != 1:
        print(f"wheel: expected one compiled module fastadam/_core.*.so, found {sorted(compiled)}")
        status = 1
    status |= report("wheel, fastadam/", package - compiled, package_files())
    bundled = {n for n in names if n.startswith("fastadam.libs/")}
    gomp = [n for n in bundled if fnmatch.fnmatch(n, "fastadam.libs/libgomp-*.so*")]
    if repaired and len(gomp) != 1:
        print(f"wheel: expected auditwheel's copy of libgomp under fastadam.libs/, found {sorted(bundled)}")
        status = 1
    if not repaired and bundled:
        print(f"wheel: an unrepaired wheel bundles {sorted(bundled)}")
        status = 1
    others = [n for n in names if n not in package and n not in bundled and not n.startswith("fastadam-")]
    if others:
        print(f"wheel: files outside the package and its metadata: {others}")
        status = 1
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("kind", choices=("sdist", "wheel"))
    parser.add_argument("path", type=Path)
    parser.add_argument("--repaired", action="store_true", help="the wheel went through auditwheel repair")
    args = parser.parse_args()
    return check_sdist(args.path) if args.kind == "sdist" else check_wheel(args.path, args.repaired)


if __name__ == "__main__":
    sys.exit(main())
