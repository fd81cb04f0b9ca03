"""Atomic file writing for everything we save: a file appears whole or not at all.

``replacing(path)`` yields a temporary path in a fresh folder beside ``path``; when the block
succeeds the file is flushed to disk and ``os.replace``d onto ``path``, so readers see the old
file or the whole new one, and on error nothing is left behind. ``check_destination`` refuses
an existing file (a dangling link counts as one) unless ``overwrite=True``, and a missing
folder, before any slow work; ``save_model`` writes an ``onnx.ModelProto`` that way (weights of
models over ~1.8 GB in a side file). ``export_onnx``, ``convert_onnx(out=...)``, the CLI and
``amp_compiler.save`` all write through these.

    >>> path = check_destination("model.onnx", overwrite=False)   # fail before the work
    >>> with replacing(path) as tmp:
    ...     onnx.save_model(model, tmp)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import onnx

from amp_compiler.errors import OnnxError

# Protobuf files cannot exceed 2 GiB; above this the weights go to a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class OnnxFileExistsError(OnnxError, FileExistsError):
    """The destination file exists and ``overwrite=True`` was not given."""


def check_destination(path: str | os.PathLike, overwrite: bool, *,
                      error: type[Exception] = OnnxError, example: str = "model.onnx") -> str:
    """The absolute destination path; raises if it exists (without overwrite) or has no folder
    (``error`` for a folder or a missing folder, the example file name in its message).

    A symbolic link counts as existing even when it dangles: writing "through" it would create
    or clobber a file elsewhere. With ``overwrite`` the link itself is replaced (``replacing``).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise error(f"'{path}' is a folder; pass a file path such as '{os.path.join(path, example)}'")
    if os.path.lexists(path) and not overwrite:
        raise OnnxFileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")
    if not os.path.isdir(os.path.dirname(path)):
        raise error(f"the folder of '{path}' does not exist; create it first")
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to disk; folders that refuse fsync are skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):  # a file that cannot reach the disk is an error
            raise
        # some file systems do not fsync folders
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Write a file atomically: yields a temporary path in a fresh folder beside ``path``; when
    the block succeeds the file is flushed to disk and ``os.replace``d onto ``path`` (a link at
    ``path`` is replaced, never followed), so readers see the old file or the whole new one.
    On error nothing is left behind. Other files may be put in the yielded path's folder."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    tmpdir = tempfile.mkdtemp(prefix=".amp_tmp_", dir=folder)
    try:
        tmp = os.path.join(tmpdir, base)
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, os.path.join(folder, base))
        fsync_path(folder)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write ``model`` atomically: a temporary folder beside ``path``, then ``os.replace``.

    Models over ~1.8 GB keep their weights in ``<name>.data`` beside the file (moved first, so
    the model file never points at a missing one). On any error nothing is left behind.
    """
    path = check_destination(path, overwrite)
    folder, base = os.path.split(path)
    with replacing(path) as tmp:
        try:
            large = model.ByteSize() > _EXTERNAL_DATA_BYTES
        except ValueError:  # protobuf refuses to size messages over 2 GiB
            large = True
        if large:
            data = base + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data, size_threshold=1024)
            staged = os.path.join(os.path.dirname(tmp), data)
            fsync_path(staged)
            os.replace(staged, os.path.join(folder, data))
        else:
            onnx.save_model(model, tmp)
    return path
