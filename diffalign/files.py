"""Atomic files: every writer of the package goes through here.

A file is written to a temporary name in its own folder, flushed to disk (fsync) and renamed into place, so a
reader (or a resume after a crash) sees the old file or the new one, never half of one. The result has the
permissions any other program's new file would have (``0666`` less the umask): :func:`tempfile.mkstemp`'s
private ``0600`` would leave outputs unreadable to everyone else on a shared server or a mounted volume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (``0666``) or folder (``0777``) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` writes the content to ``tmp`` (any writer that takes a path:
    ``image.save``, ``save_file``, ``to_parquet``), which is then synced and renamed onto ``path``. On any error
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_copy(source: str | Path, path: str | Path) -> Path:
    """Copy the file ``source`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save ``tensors`` (made contiguous, on the CPU) as a safetensors file at ``path``, atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temporary folder next to ``path`` to fill; on success it is renamed onto ``path`` (replacing an existing
    one when ``replace``), on error removed. The folder gets the umask's mode, not ``mkdtemp``'s ``0700``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        os.chmod(tmp, default_mode(directory=True))
        yield tmp
        if path.exists():
            if not replace:
                raise FileExistsError(f"{path} exists")
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_save_image(path: str | Path, image) -> Path:
    """Save a PIL ``image`` at ``path`` atomically, in the format its suffix names."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
