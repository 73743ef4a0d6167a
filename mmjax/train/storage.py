"""Workdir files on a local path or a ``gs://BUCKET/PATH`` URL: the one place that knows both.

Local paths go through ``pathlib``/``os`` (writes through a temporary file and
``os.replace``); ``gs://`` URLs through ``etils.epath`` and ``gcsfs``. A bucket has no
directories and no exclusive creation: :func:`create_exclusive` uploads with
``ifGenerationMatch=0``, :func:`move_tree` copies then deletes. Importing this module points
tensorstore at a GCS emulator when ``STORAGE_EMULATOR_HOST`` is set, and changes nothing
otherwise. Why each of these: ``docs/architecture.md``, section 8.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil
import tempfile

from etils import epath

GCS = "gs://"

Path = pathlib.Path | epath.Path


def _use_emulator() -> None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if not host or host == "default":
        return
    url = (host if "://" in host else f"http://{host}").rstrip("/")
    os.environ["STORAGE_EMULATOR_HOST"] = url  # google-cloud-storage needs the scheme
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_use_emulator()


def is_gcs(location) -> bool:
    return str(location).startswith(GCS)


def check_location(location: str, what: str = "--workdir") -> None:
    """A local path or ``gs://BUCKET/PATH``; any other URL is refused in one line."""
    text = str(location)
    if is_gcs(text):
        bucket, _, rest = text[len(GCS):].partition("/")
        if bucket and rest.strip("/"):
            return
        raise ValueError(f"{what} {text}: a gs:// location needs a bucket and a path in it "
                         f"(gs://BUCKET/PATH)")
    if "://" in text:
        raise ValueError(f"{what} {text}: only local paths and gs://BUCKET/PATH URLs are "
                         f"supported")


def path(location) -> Path:
    """``location`` as a path object: ``epath.Path`` for ``gs://`` (``/``, ``.parent`` and
    ``str()`` keep the URL; orbax accepts it), else an absolute ``pathlib.Path``."""
    if isinstance(location, epath.Path) and is_gcs(location):
        return location
    if is_gcs(location):
        return epath.Path(str(location).rstrip("/"))
    return pathlib.Path(location).absolute()


@functools.cache
def _gcsfs():
    """One gcsfs file system without a listings cache: another process (a second run, or
    orbax's tensorstore writes) may change the bucket at any time."""
    import gcsfs

    return gcsfs.GCSFileSystem(use_listings_cache=False)


def _key(location) -> str:
    return str(location)[len(GCS):].rstrip("/")


def exists(location) -> bool:
    if is_gcs(location):
        return _gcsfs().exists(_key(location))
    return os.path.exists(location)


def is_dir(location) -> bool:
    if is_gcs(location):
        return _gcsfs().isdir(_key(location))
    return os.path.isdir(location)


def read_bytes(location) -> bytes:
    if is_gcs(location):
        return _gcsfs().cat_file(_key(location))
    return pathlib.Path(location).read_bytes()


def read_text(location) -> str:
    return read_bytes(location).decode()


def write_bytes(location, data: bytes) -> None:
    """Replace the file atomically (creating its directory where there are directories)."""
    if is_gcs(location):
        _gcsfs().pipe_file(_key(location), bytes(data))
        return
    target = pathlib.Path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(location, text: str) -> None:
    write_bytes(location, text.encode())


def makedirs(location) -> None:
    """A local directory and its parents; nothing on a bucket (objects need no directory)."""
    if not is_gcs(location):
        os.makedirs(location, exist_ok=True)


def listdir(location) -> list[str]:
    """The names directly under ``location`` (files and directories); ``[]`` when missing."""
    if is_gcs(location):
        try:
            entries = _gcsfs().ls(_key(location), detail=False)
        except FileNotFoundError:
            return []
        prefix = _key(location) + "/"
        return sorted({e.rstrip("/")[len(prefix):] for e in entries
                       if e.rstrip("/").startswith(prefix)} - {""})
    try:
        return sorted(os.listdir(location))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove(location, *, missing_ok: bool = True) -> None:
    """Delete one file."""
    try:
        if is_gcs(location):
            _gcsfs().rm_file(_key(location))
        else:
            os.unlink(location)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(location) -> None:
    """Delete a directory and everything under it (nothing when missing)."""
    if is_gcs(location):
        keys = _gcsfs().find(_key(location))
        if keys:
            _gcsfs().rm(keys)
        return
    shutil.rmtree(location, ignore_errors=True)


def move_tree(src, dst) -> None:
    """Move a directory tree to ``dst`` (which must not exist); ``dst``'s parent is created.
    On a bucket: every object is copied, then the sources are deleted (a crash in between
    leaves a copy behind, never a loss)."""
    if is_gcs(src) != is_gcs(dst):
        raise ValueError(f"cannot move {src} to {dst}: not on the same storage")
    if is_gcs(src):
        fs, src_key, dst_key = _gcsfs(), _key(src), _key(dst)
        keys = fs.find(src_key)
        if not keys:
            raise FileNotFoundError(f"{src}: nothing to move")
        for key in keys:
            fs.copy(key, dst_key + key[len(src_key):])
        fs.rm(keys)
        return
    pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(dst):
        raise FileExistsError(f"cannot move {src} to {dst}: it exists")
    shutil.move(str(src), str(dst))


def create_exclusive(location, data: bytes) -> bool:
    """Create the file with ``data`` unless it exists (atomically: of several concurrent
    callers exactly one gets ``True``). Local: ``O_CREAT | O_EXCL``; GCS: an upload with
    ``ifGenerationMatch=0``."""
    if is_gcs(location):
        try:
            _gcsfs().pipe_file(_key(location), bytes(data), mode="create")
        except FileExistsError:
            return False
        return True
    pathlib.Path(location).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(location, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def mtime(location) -> float:
    """The time of the file's last change (POSIX seconds); on GCS its object's ``updated``."""
    if is_gcs(location):
        info = _gcsfs().info(_key(location))
        return info["mtime"].timestamp()
    return os.stat(location).st_mtime


def touch(location) -> None:
    """Set the file's modification time to now: ``os.utime`` locally; on GCS the object is
    uploaded again with its own content (objects cannot be touched)."""
    if is_gcs(location):
        write_bytes(location, read_bytes(location))
    else:
        os.utime(location)


__all__ = ["GCS", "check_location", "create_exclusive", "exists", "is_dir", "is_gcs",
           "listdir", "makedirs", "move_tree", "mtime", "path", "read_bytes", "read_text",
           "remove", "remove_tree", "touch", "write_bytes", "write_text"]
