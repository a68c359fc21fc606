"""Writing an output dir safely: into a hidden sibling, renamed into place only when complete.

What `--force` may replace is narrow on purpose: an empty dir, or a dir this command itself
wrote (the caller's `replaceable` test, e.g. "its manifest says it is a hobbit model dir"),
and never the source, a parent of it or a dir inside it. Anything else a user made is never
deleted, whatever the flag. A staging dir left behind by a killed process
(`.OUT.partial-PID`, PID no longer running) is swept by the next write into the same parent;
SIGTERM cleans up like Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import HobbitError

_STALE = re.compile(r"^\..+\.(partial|old)-(\d+)$")
_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full: free space there or choose another output path",
    errno.EDQUOT: "the disk quota is exceeded: free space there or choose another output path",
    errno.EROFS: "the filesystem is read-only: choose a writable output path",
    errno.EACCES: "permission denied: choose an output path you can write",
    errno.EPERM: "permission denied: choose an output path you can write",
}
_PATH_ERRORS = {
    errno.ENOTDIR: "a parent of it is a file, not a dir: choose another output path",
    errno.EEXIST: "a parent of it is a file, not a dir: choose another output path",
}


@contextmanager
def staging_dir(
    out: Path,
    force: bool,
    *,
    replaceable: Callable[[Path], str | None],
    keep: Iterable[Path] = (),
    need_bytes: int = 0,
) -> Iterator[Path]:
    """Yields a temporary sibling of `out`, renamed to `out` only if the block succeeds.

    replaceable(out) says why an existing `out` may not be replaced (None: it may); keep:
    paths `out` must not be, contain or lie in (the source); need_bytes: what will be
    written, checked against the free space first.
    """
    out = Path(out)
    _refuse_overlap(out, keep)
    if out.exists() or out.is_symlink():
        if not force:
            raise HobbitError(f"{out} already exists; pass --force to replace it")
        why = _why_not_replaceable(out, replaceable)
        if why:
            raise HobbitError(
                f"--force replaces only an empty dir or one this command wrote, and {out} {why}: "
                "choose another output path, or remove it yourself"
            )
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out) from None
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise write_error(OSError(errno.EROFS, os.strerror(errno.EROFS), str(parent)), out)
    sweep_stale(parent)
    check_free_space(parent, need_bytes, out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise write_error(e, out) from None
    with _sigterm_raises():
        try:
            yield tmp
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in _WRITE_ERRORS:
                raise write_error(e, out) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)


def write_error(e: OSError, out: Path) -> HobbitError:
    """A one-line error for an OS error met while writing `out`."""
    fix = {**_WRITE_ERRORS, **_PATH_ERRORS}.get(e.errno, "check the output path")
    where = f" ({e.filename})" if e.filename else ""
    return HobbitError(f"cannot write {out}: {e.strerror or e}{where}; {fix}")


def check_free_space(where: Path, need_bytes: int, out: Path) -> None:
    """Refuse before writing when `where`'s filesystem has less free space than needed."""
    if need_bytes <= 0:
        return
    free = shutil.disk_usage(where).free
    if free < need_bytes:
        raise HobbitError(
            f"writing {out} needs about {_size(need_bytes)}, its filesystem has {_size(free)} "
            "free: free some space or choose another output path"
        )


def sweep_stale(parent: Path) -> list[Path]:
    """Remove staging dirs in `parent` left by processes that no longer run; returns them."""
    swept = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return swept
    for p in entries:
        m = _STALE.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            swept.append(p)
    return swept


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid we can judge: keep it
    return True


def _refuse_overlap(out: Path, keep: Iterable[Path]) -> None:
    o = out.resolve()
    for k in keep:
        k = Path(k).resolve()
        if o == k or o in k.parents or k in o.parents:
            raise HobbitError(
                f"output {out} overlaps the source {k} (same dir, a parent or a dir inside it); "
                "write the output somewhere else"
            )


def _why_not_replaceable(out: Path, replaceable: Callable[[Path], str | None]) -> str | None:
    if out.is_symlink():
        return "is a symlink"
    if not out.is_dir():
        return "is a file"
    try:
        if not any(out.iterdir()):
            return None
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    return replaceable(out)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises SystemExit, so `finally`/cleanup runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unknown_entries(d: Path, known: Callable[[str], bool]) -> str | None:
    """None if every entry of `d` is one `known` accepts, else a reason naming the others."""
    others = sorted(p.name for p in d.iterdir() if not known(p.name))
    if not others:
        return None
    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
    return f"holds files hobbit did not write ({', '.join(others[:3])}{more})"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
