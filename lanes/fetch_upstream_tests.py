"""Put the upstream unit tests listed in tests/upstream/sources.txt into a folder outside this repository.

    python lanes/fetch_upstream_tests.py --git-dir PATH/TO/Megatron-Bridge/.git --out DIR

Reads each listed file at its pinned commit from a local clone of the upstream repository (``git show
COMMIT:PATH``) and writes it to ``DIR/<package>/<path below tests/unit_tests>``, with empty
``__init__.py`` files where upstream has package folders. The files stay outside this repository:
point the lane at them with ``MOELORA_UPSTREAM_TESTS=DIR nox -s upstream``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SOURCES = Path(__file__).resolve().parent.parent / "tests" / "upstream" / "sources.txt"
STRIP = "tests/unit_tests/"


def entries() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in SOURCES.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, repo, commit, path = line.split()
            rows.append((package, repo, commit, path))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-dir", required=True, type=Path, help="a local clone of the upstream repository")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--package", default="megatron_bridge")
    args = parser.parse_args(argv)
    written = 0
    for package, repo, commit, path in entries():
        if package != args.package:
            continue
        show = subprocess.run(
            ["git", "--git-dir", str(args.git_dir), "show", f"{commit}:{path}"], capture_output=True
        )
        if show.returncode != 0:
            print(f"{repo}@{commit}:{path} is not in {args.git_dir}: {show.stderr.decode().strip()}", file=sys.stderr)
            return 1
        target = args.out / package / path.removeprefix(STRIP)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(show.stdout)
        folder = target.parent
        while folder != args.out / package:
            (folder / "__init__.py").touch()
            folder = folder.parent
        written += 1
    print(f"{written} upstream test files in {args.out / args.package}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
