"""Fetching packages from registries without installing them: ``apt-get download`` (Debian)
and ``npm pack`` (npm), cached in the work folder and unpacked once."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Callable, Sequence

from ufb_ref.fsio import atomic_folder, clean_stale_temporaries

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Fetched:
    """A package as fetched: its name and version as the registry gave them, the downloaded
    file and its sha256, and the folder it was unpacked into."""

    package: str
    version: str
    artifact: str
    sha256: str
    root: Path


class FetchError(Exception):
    """A package could not be downloaded or unpacked."""


_APT_UPDATED = False  # one `apt-get update` per process, only after a download fails


def _run(cmd: Sequence[str], cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    LOG.debug("running %s", " ".join(cmd))
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_member_path(name: str) -> str | None:
    name = name.lstrip("/")
    if name.startswith("./"):
        name = name[2:]
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def extract_tar_stream(stream, dest: Path, patterns: Sequence[str] = ()) -> int:
    """Extract regular files of a tar stream (optionally only matching globs)."""
    n = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            if not m.isreg():
                continue
            if patterns and not any(fnmatch.fnmatch(m.name, p) or fnmatch.fnmatch("./" + m.name.lstrip("./"), p)
                                    for p in patterns):
                continue
            rel = _safe_member_path(m.name)
            if rel is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    return n


def _extract_once(dest: Path, do_extract: Callable[[Path], int]) -> Path:
    """Unpack once: the folder gets its ``.complete`` marker only when everything is in it."""
    if (dest / ".complete").exists():
        return dest

    def fill(tmp: Path) -> None:
        count = do_extract(tmp)
        if count == 0:
            raise FetchError(f"nothing extracted into {dest}")
        (tmp / ".complete").write_text(str(count))

    clean_stale_temporaries(dest)  # what a killed unpacking left
    with atomic_folder(dest, replace=True) as tmp:
        fill(tmp)
    return dest


def _newest(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)


def _download_once(folder: Path, pattern: str, refresh: bool, tool: str,
                   download: Callable[[], None]) -> Path:
    """The newest file matching ``pattern`` in ``folder``, downloaded with ``tool`` if there
    is none yet (or ``refresh``); ``download`` raises FetchError when the tool fails."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = _newest(folder, pattern)
    if refresh or not existing:
        for p in existing:
            p.unlink()
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} not available")
        download()
        existing = _newest(folder, pattern)
        if not existing:
            raise FetchError(f"{tool} produced no {pattern} in {folder}")
    return existing[-1]


def _failed(what: str, r: subprocess.CompletedProcess) -> FetchError:
    return FetchError(f"{what} failed: {(r.stderr or r.stdout).strip()[-400:]}")


def fetch_deb(package: str, work: Path, refresh: bool, extract: Sequence[str] = ()) -> Fetched:
    """``apt-get download`` a .deb (cached in work/debs) and unpack it with dpkg-deb."""
    debs = work / "debs"

    def download() -> None:
        global _APT_UPDATED
        r = _run(["apt-get", "download", package], cwd=debs)
        if r.returncode != 0 and not _APT_UPDATED:
            LOG.info("apt-get download %s failed; running apt-get update once", package)
            _APT_UPDATED = True
            _run(["apt-get", "update"], timeout=900)
            r = _run(["apt-get", "download", package], cwd=debs)
        if r.returncode != 0:
            raise _failed(f"apt-get download {package}", r)

    deb = _download_once(debs, f"{package}_*.deb", refresh, "apt-get", download)
    info = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
    if info.returncode != 0:
        raise FetchError(f"dpkg-deb -f {deb.name} failed: {info.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in info.stdout.splitlines() if ": " in line)
    version = fields.get("Version", "unknown")
    digest = sha256_file(deb)
    dest = work / "extract" / f"{package}_{version.replace(':', '%3a')}_{digest[:12]}"

    def do_extract(tmp: Path) -> int:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        try:
            n = extract_tar_stream(proc.stdout, tmp, extract)
        finally:
            proc.stdout.close()
            rc = proc.wait()
        if rc != 0:
            raise FetchError(f"dpkg-deb --fsys-tarfile {deb.name} failed ({rc})")
        return n

    root = _extract_once(dest, do_extract)
    return Fetched(fields.get("Package", package), version, deb.name, digest, root)


def fetch_npm(package: str, work: Path, refresh: bool, extract: Sequence[str] = ()) -> Fetched:
    """``npm pack`` a registry package (cached in work/npm) and unpack the tarball."""
    dest_dir = work / "npm"
    stem = package.lstrip("@").replace("/", "-")

    def download() -> None:
        r = _run(["npm", "pack", package, "--ignore-scripts", "--json"], cwd=dest_dir)
        if r.returncode != 0:
            raise _failed(f"npm pack {package}", r)

    tgz = _download_once(dest_dir, f"{stem}-[0-9]*.tgz", refresh, "npm", download)
    digest = sha256_file(tgz)
    dest = work / "extract" / f"{stem}_{digest[:12]}"

    def do_extract(tmp: Path) -> int:
        with tgz.open("rb") as fh:
            return extract_tar_stream(fh, tmp, extract)

    root = _extract_once(dest, do_extract)
    meta = json.loads((root / "package" / "package.json").read_text())
    return Fetched(meta.get("name", package), meta.get("version", "unknown"), tgz.name, digest, root)
