"""Downloads of release files, once: resumable, checked by sha256, unpacked atomically.

A file is fetched into `NAME.part` (continued where it stopped: an HTTP Range request, or a seek in a local
mirror), its sha256 compared with the table's, else with the one the Hugging Face Hub reports for it (the
X-Linked-Etag of an LFS file), else recorded as the digest of the first download; only then is it renamed to NAME,
beside `NAME.sha256` (the digest and where it was checked), which later runs check the file against. A mismatch
removes the download and says so in one line.

The source can be replaced by a mirror (`--mirror`, or $VQAR_RELEASE_MIRROR): a local folder, or an http(s) base URL,
laid out as the URLs' host and path (`MIRROR/huggingface.co/FoundationVision/LlamaGen/resolve/main/c2i_B_256.pt`),
for machines without internet access and for the tests, which serve tiny releases from a folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from vqar.reproduce.table import RemoteFile
from vqar.utils.io import atomic_write_text, remove_leftovers, replace_directory, sha256_file

log = logging.getLogger("vqar.reproduce")
MIRROR_ENV = "VQAR_RELEASE_MIRROR"
CHUNK = 1 << 20
UNPACKED_MARK = ".vqar-unpacked"


def default_mirror() -> str | None:
    return os.environ.get(MIRROR_ENV) or None


def _is_url(where: str) -> bool:
    return where.startswith(("http://", "https://"))


def _hex64(text: str | None) -> str | None:
    text = (text or "").strip().strip('"').removeprefix("W/").strip('"').lower()
    return text if len(text) == 64 and all(c in string.hexdigits for c in text) else None


def fetch(file: RemoteFile, folder: str | Path, mirror: str | None = None, progress: bool = True) -> Path:
    """The verified local copy of `file` in `folder`, downloaded (or continued) when needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    target, record = folder / file.name, folder / f"{file.name}.sha256"
    if target.is_file() and _changed_in_the_mirror(file, target, record, mirror):
        log.warning("%s changed in the mirror %s since it was copied, and no digest says which copy is right: "
                    "copying it again", file.name, mirror)  # fmt: skip
        target.unlink()
        record.unlink(missing_ok=True)
    if target.is_file():  # checked again on every use: a file damaged on disk is found before hours of sampling
        recorded = _read_record(record)
        expected = file.sha256 or (recorded or {}).get("sha256")
        against = "the release table" if file.sha256 else f"its digest at download ({record.name})"
        digest = sha256_file(target)
        _check(file, target, digest, expected, against, remove=False)
        if recorded is None:
            _write_record(record, target, digest, "a file already in place")
        return target
    partial = folder / f"{file.name}.part"
    source, reported = _download(file, partial, mirror, progress)
    digest = sha256_file(partial)
    expected, against = (file.sha256, "the release table") if file.sha256 else (reported, "the Hub's digest")
    _check(file, partial, digest, expected, against, remove=True)
    os.replace(partial, target)
    _write_record(record, target, digest, against if expected else f"first download from {source}")
    return target


def unchecked_download(path: str | Path) -> bool:
    """Whether a fetched file was checked against nothing but its own first download (no digest stated for it): a
    copy damaged at its source is then kept, so an error reading it should say how to fetch it again."""
    record = _read_record(Path(f"{path}.sha256"))
    return record is not None and str(record.get("checked_against", "")).startswith("first download")


def _changed_in_the_mirror(file: RemoteFile, target: Path, record: Path, mirror: str | None) -> bool:
    """Whether a local mirror's copy of a file no digest checks was replaced since it was copied (a mirror fixed
    after a damaged copy): a stat, where a digest of the mirror's copy would read gigabytes on every run."""
    if file.sha256 or not mirror or _is_url(mirror) or not unchecked_download(target):
        return False
    source = Path(mirror) / file.mirror_path
    if not source.is_file():
        return False
    return source.stat().st_size != target.stat().st_size or source.stat().st_mtime > record.stat().st_mtime


def _check(file: RemoteFile, path: Path, digest: str, expected: str | None, against: str, remove: bool) -> None:
    size = path.stat().st_size
    problem = None
    if expected is not None and digest != expected:
        problem = f"sha256 {digest[:12]}... does not match {against} ({expected[:12]}...)"
    elif file.size is not None and size != file.size:
        problem = f"{size} bytes where the release table says {file.size}"
    if problem is None:
        return
    if remove:
        path.unlink(missing_ok=True)
        raise ValueError(f"{file.name}: {problem}; the download was removed (run again to fetch it anew)")
    raise ValueError(f"{path}: {problem}; remove the file to download it again")


def _read_record(record: Path) -> dict | None:
    try:
        data = json.loads(record.read_text())
        return data if isinstance(data, dict) and {"sha256", "size"} <= set(data) else None
    except (OSError, ValueError):
        return None


def _write_record(record: Path, target: Path, digest: str, checked: str) -> None:
    text = json.dumps({"sha256": digest, "size": target.stat().st_size, "checked_against": checked}, indent=1)
    atomic_write_text(record, text + "\n")


def _download(file: RemoteFile, partial: Path, mirror: str | None, progress: bool) -> tuple[str, str | None]:
    """Fills `partial` (continuing it); returns the source used and the sha256 the server reports, if any."""
    if mirror and not _is_url(mirror):
        if "://" in mirror:  # else read as a folder named "ftp:"
            raise ValueError(f"mirror {mirror}: give a local folder or an http(s):// base URL")
        if not Path(mirror).is_dir():
            what = "is not a folder" if Path(mirror).exists() else "does not exist"
            raise FileNotFoundError(f"mirror {mirror} {what}; give the folder that holds the files as host/path")
        source = Path(mirror) / file.mirror_path
        if not source.is_file():
            raise FileNotFoundError(f"{file.name}: not in the mirror {mirror} (expected {source})")
        _copy_from(source, partial, progress)
        return str(source), None
    url = f"{mirror.rstrip('/')}/{file.mirror_path}" if mirror else file.url
    reported = _hub_sha256(url) if file.hub_repo and not mirror else None
    unreachable = (f"the mirror {mirror} cannot be reached" if mirror else
                   f"without internet access, point --mirror (or ${MIRROR_ENV}) at a folder holding it")  # fmt: skip
    _http_download(url, partial, file.name, progress, unreachable)
    return url, reported


def _copy_from(source: Path, partial: Path, progress: bool) -> None:
    have = partial.stat().st_size if partial.is_file() else 0
    total = source.stat().st_size
    if have > total:  # not a prefix of this file: start again
        partial.unlink()
        have = 0
    with open(source, "rb") as src, open(partial, "ab") as out, _bar(total, have, source.name, progress) as bar:
        src.seek(have)
        while block := src.read(CHUNK):
            out.write(block)
            bar.update(len(block))


def _bar(total: int | None, initial: int, name: str, progress: bool):
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name, disable=not progress, leave=False)


def _http_download(url: str, partial: Path, name: str, progress: bool, unreachable: str) -> None:
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part is already whole (or is not a prefix): checked by its digest
            return
        if err.code == 404:
            raise FileNotFoundError(f"{name}: not found at {url} (HTTP 404)") from None
        raise OSError(f"{name}: downloading {url} failed (HTTP {err.code} {err.reason})") from None
    except (urllib.error.URLError, TimeoutError) as err:
        raise OSError(f"{name}: cannot download {url} ({getattr(err, 'reason', err)}); {unreachable}") from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
            partial.unlink(missing_ok=True)
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab") as out, _bar(total, have, name, progress) as bar:
            while block := response.read(CHUNK):
                out.write(block)
                bar.update(len(block))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _hub_sha256(url: str) -> str | None:
    """The sha256 the Hub states for an LFS file (X-Linked-Etag of the resolve URL), or None."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        response = opener.open(urllib.request.Request(url, method="HEAD"), timeout=30)
        headers = response.headers
    except urllib.error.HTTPError as err:  # the 302 to the CDN carries the headers
        headers = err.headers
    except (urllib.error.URLError, TimeoutError):
        return None
    return _hex64(headers.get("X-Linked-Etag")) if headers is not None else None


def unpack(archive: Path) -> Path:
    """The folder a .tar.gz unpacks to (beside it), unpacked once: into a temporary folder, then moved in place."""
    stem = archive.name.removesuffix(".tar.gz").removesuffix(".tgz")
    out = archive.parent / stem
    if (out / UNPACKED_MARK).is_file():
        return out
    work = archive.parent / f".{stem}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")  # refuses links and paths that leave the folder
        (work / UNPACKED_MARK).write_text(archive.name + "\n")
        replace_directory(work, out)
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(work, ignore_errors=True)
        raise ValueError(f"cannot unpack {archive}: {err}") from None
    return out


def find_inside(folder: Path, name: str) -> Path:
    """The one file called `name` under `folder`."""
    found = sorted(p for p in folder.rglob(name) if p.is_file())
    if len(found) != 1:
        raise FileNotFoundError(f"expected one {name} under {folder}, found {len(found)}")
    return found[0]
