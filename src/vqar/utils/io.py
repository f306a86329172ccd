"""Crash-safe file writing: write a temporary file, fsync it, then rename it over the target.

Temporary names carry the writer's process id (`.NAME.PID.RANDOM.tmp`, `.tmp-...-PID`), so whatever a killed process
left behind is recognised and removed by the next one (`remove_leftovers`) without touching the files of a process
that is still writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

# .NAME.PID.RANDOM.tmp (atomic files), .tmp-STEP-PID (checkpoints), .NAME.tmp-PID (code stores)
LEFTOVER = re.compile(r"^\.(?:.+\.(\d+)\.[0-9a-f]+\.tmp|tmp-.+-(\d+)|.+\.tmp-(\d+))$")


def fsync_dir(path: Path) -> None:
    """Makes a rename inside `path` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `target`; on success it is fsynced and renamed to `target`, on failure
    removed, so `target` is always either the old file or the complete new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        yield tmp_path
        # The permissions a plain open() would give (writers such as safetensors create files 0600 whatever the
        # umask, and a colleague on a shared cluster could not read the model).
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(target: str | Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp_path)` and moves the result to `target` atomically."""
    with atomic_path(target) as tmp:
        write(tmp)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write(target, lambda p: p.write_text(text))


def replace_directory(built: str | Path, target: str | Path, remove_old: bool = True) -> Path | None:
    """Puts the finished folder `built` at `target` (a sibling), so that a crash leaves one complete folder or the
    other, never a mix. On Linux the two swap places in one step and the old folder is then removed under `built`'s
    name (a temporary one, which `remove_leftovers` tidies after a kill). Elsewhere the old `target` is moved aside
    first and removed once `built` is in place: a kill between the two renames leaves it as
    `.NAME.replaced-PID`, and `target` missing. Without `remove_old`, where the old folder now lies is returned
    (None when there was none), for the caller to remove once the files that go with the new one are in place too:
    removing a large folder takes seconds."""
    built, target = Path(built), Path(target)
    if target.exists() and _exchange(built, target):
        fsync_dir(target.parent)
        old: Path | None = built
    else:
        old = target.parent / f".{target.name}.replaced-{os.getpid()}" if target.exists() else None
        if old is not None:
            os.replace(target, old)
        os.replace(built, target)
        fsync_dir(target.parent)
    if remove_old and old is not None:
        shutil.rmtree(old, ignore_errors=True)
        return None
    return old


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths atomically (Linux's renameat2 with RENAME_EXCHANGE); False where the C library, the kernel
    or the filesystem cannot, for the caller to fall back on renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or a C library older than glibc 2.28
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # an old kernel, NFS, FUSE ...
        return False
    raise OSError(code, os.strerror(code), str(second))


def folder_entries(folder: str | Path) -> list[str]:
    """The sorted names in `folder`, without the temporary files of vqar's writers (`remove_leftovers` tidies
    those): what a command that would write into the folder has to respect."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if not LEFTOVER.match(entry.name))


def describe_entries(names: list[str], shown: int = 4) -> str:
    """`names` for a one-line error: the first `shown`, then how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_replaceable(target: str | Path, overwrite: bool, kind: str, is_kind: Callable[[Path], bool],
                      option: str = "--out", own_entries: re.Pattern | None = None,
                      why_not: Callable[[Path], str | None] | None = None) -> None:  # fmt: skip
    """Refuses an output `target` that a command would replace (delete, then write anew) when that would lose data:
    a non-empty folder needs `overwrite`, and even then must be `kind` ("a code store"), which `is_kind` recognises;
    a file, or a folder of anything else, is named in one line and left alone. A missing or empty folder is fine.
    `option` is how the command line names the target. With `own_entries` (the names such a folder is made of), a
    `kind` that also holds other files (the user's notes, the very images being read) is refused too. `why_not`
    says, where it can, what inside the folder makes it no `kind` (a stray file a level down)."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} is a file, not {kind}; choose another {option}")
    entries = folder_entries(target)
    if not entries:
        return
    if not is_kind(target):
        detail = why_not(target) if why_not is not None else None
        held = describe_entries(entries) + (f": {detail}" if detail else "")
        raise FileExistsError(f"{target} is not {kind} (it holds {held}); --overwrite replaces only {kind}, so "
                              f"nothing was changed: choose another {option}")  # fmt: skip
    if not overwrite:
        raise FileExistsError(f"{target} already exists ({kind}); pass --overwrite to replace it or choose another "
                              f"{option}")  # fmt: skip
    foreign = [name for name in entries if own_entries is not None and not own_entries.match(name)]
    if foreign:
        raise FileExistsError(f"{target} is {kind} but also holds {describe_entries(foreign)}, which it is not made "
                              f"of: --overwrite would delete them with it, so nothing was changed; move them out, or "
                              f"choose another {option}")  # fmt: skip


def check_folder_writable(folder: str | Path, out: str | Path | None = None, option: str = "--out") -> None:
    """Makes the output folder `folder` and writes a file in it, so that one that cannot be written (a file on its
    way, no permission) is one line naming it before the work whose results it was to hold, not after. A folder this
    makes is removed again if the command then fails (`created_folders_removed_on_failure`). `out`: the output the
    messages name, where it is a file to be written in `folder` (default: `folder` itself), as `option` names it."""
    folder = Path(folder)
    named = folder if out is None else out
    in_the_way = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    if in_the_way is not None:
        raise NotADirectoryError(f"{option} {named} cannot be made: {in_the_way} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # named as vqar's temporary files are (LEFTOVER): another rank checking the folder meanwhile passes over it
        probe = folder / f".write-test.tmp-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"{option} {named} cannot be written: {err.strerror or err}") from None


@contextlib.contextmanager
def created_folders_removed_on_failure(out: str | Path, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """If the body raises, removes the folders on the way to `out` (`out` included) that did not exist when it
    started and are empty now, so a failed command leaves no empty folders behind; the body may call the function
    it is given to do the same when it fails without raising. A folder holding anything (a checkpoint, a partial
    extraction to resume, someone else's file) is kept, and so are the folders above it; a folder that existed
    before is never touched."""
    # abspath, not resolve: `out` need not exist, and these are the names the command creates.
    path = Path(os.path.abspath(out))
    created = [folder for folder in (path, *path.parents) if not folder.exists()] if enabled else []

    def tidy() -> None:
        for folder in created:  # deepest first
            try:
                if not folder.exists():  # never made (an error before the first write)
                    continue
                if folder.is_symlink() or not folder.is_dir() or any(folder.iterdir()):
                    return
                folder.rmdir()
            except OSError:  # taken meanwhile, or not ours to remove
                return

    try:
        yield tidy
    except BaseException:
        tidy()
        raise


class OutputLocked(OSError):
    """Another process holds the write lock of an output (`write_lock`)."""


@contextlib.contextmanager
def write_lock(target: str | Path) -> Iterator[None]:
    """Holds an exclusive lock on writing `target` for the body, or raises OutputLocked at once (naming the holder's
    pid) while another process holds it. The lock is the file `.NAME.lock` beside `target`, not in it, so a body
    that replaces the folder (--overwrite) keeps it; the file is removed at the end, and one a killed process left
    is taken over (the kernel drops a dead process's lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock
        yield
        return
    path = Path(os.path.abspath(target))  # `--out .` has a name too
    lock = path.parent / f".{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # the lock file is vqar's own: name what the user chose instead
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionError(f"cannot write {target}: its folder {lock.parent} is not writable "
                                  f"({err.strerror})") from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputLocked(f"another vqar process{who} is writing {target}; wait for it to finish or choose "
                               "another --out") from None  # fmt: skip
        # A holder that finished between our open and our lock removed the file: the lock taken is then on a name
        # nobody opens any more, so try again on the file that is there now.
        try:
            now = os.stat(lock)
        except FileNotFoundError:
            now = None
        held = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held, so no process locks the file after us
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_leftovers(folder: str | Path, prefix: str = ".") -> list[Path]:
    """Removes the temporary files and folders (named `prefix...`) in `folder` that a process which is no longer
    running left (a SIGKILL during a write); returns what was removed."""
    folder = Path(folder)
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = LEFTOVER.match(entry.name) if entry.name.startswith(prefix) else None
        if match is None or process_alive(int(match[1] or match[2] or match[3])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
