"""Writing a command's outputs: a file or a whole folder, all or nothing.

``StagedFolder`` writes a folder's files into a staging folder and moves them into place only
when every step succeeded (``amp-compiler convert``: a failing ONNX export leaves no
half-written folder, and an existing folder as it was). ``file_destination`` checks an
``--out FILE`` before the slow part; ``write_file`` replaces a file atomically (temporary file,
fsync, ``os.replace``: a link is replaced, never followed).

Existing files are refused unless ``overwrite`` (``--overwrite``); a file-system refusal
(read-only, a file where a folder should be) is bad input: a ``ConfigError`` naming the path.

    >>> with StagedFolder(Path("out/gpt"), ["plan.json"], overwrite=False) as staged:
    ...     (staged.path / "plan.json").write_text(text)
    >>> staged.written
    [PosixPath('out/gpt/plan.json')]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from amp_compiler.errors import ConfigError


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """ConfigError when one of ``paths`` exists (without ``overwrite``) or is a folder."""
    # lexists: a link counts even when it dangles (writing through it would create its target)
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists"
                          + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
                          + "; pass --overwrite to replace")
    folders = [p for p in existing if p.is_dir() and not p.is_symlink()]
    if folders:
        raise ConfigError(f"{folders[0]} is a folder; remove it or choose another --out")


@contextlib.contextmanager
def os_errors(path: Path) -> Iterator[None]:
    """A file system refusal (read-only, /proc, a file where a folder should be) is bad input:
    one line naming the path, exit 2."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"cannot write {path} ({e.strerror or e}); choose another --out") from e


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first (to undo on failure)."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    with os_errors(missing[0] if missing else folder):
        for f in reversed(missing):
            f.mkdir()
    return missing


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders ``make_folders`` created, those still empty."""
    for f in folders:
        with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
            f.rmdir()


def file_destination(path: Path, overwrite: bool) -> list[Path]:
    """Check ``--out FILE`` before the slow part: not a folder, not existing (without
    --overwrite), its folder creatable and writable. Returns the folders it created."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; name a file in it")
    refuse_existing([path], overwrite)
    created = make_folders(path.parent)
    try:
        with os_errors(path):
            tempfile.TemporaryDirectory(dir=path.parent, prefix=".amp_probe_").cleanup()
    except ConfigError:
        remove_empty(created)
        raise
    return created


def write_file(path: Path, text: str) -> None:
    """Atomically (temporary file, fsync, os.replace): a link at ``path`` is replaced, not
    followed, and a failure leaves the old file or none."""
    from amp_compiler.onnx.io import replacing  # the ONNX component is optional

    with os_errors(path), replacing(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


class StagedFolder:
    """An all-or-nothing output folder: files are written into a staging folder (``.path``) and
    moved into ``out`` only when the block succeeds; on failure ``out`` is as it was.

    A new ``out`` is the staging folder renamed (one step); into an existing folder each file is
    ``os.replace``d (a link there is replaced, never followed). ``written`` lists the files moved.
    """

    def __init__(self, out: Path, names: Sequence[str], overwrite: bool) -> None:
        if os.path.lexists(out) and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder; give a folder path")
        refuse_existing([out / n for n in names], overwrite)
        self.out, self.written = out, []
        self._created = [] if out.is_dir() else make_folders(out.parent)
        # inside an existing folder (it may be a link to another file system), else beside it
        where, prefix = (out, ".amp_staging_") if out.is_dir() else (out.parent, f".{out.name}.amp_staging_")
        try:
            with os_errors(out):
                self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
                mask = os.umask(0)
                os.umask(mask)
                os.chmod(self.path, 0o777 & ~mask)  # it may become ``out``: a normal folder's mode
        except ConfigError:
            remove_empty(self._created)
            raise

    def __enter__(self) -> "StagedFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        committed = False
        try:
            if exc_type is None:
                with os_errors(self.out):
                    self._commit()
                committed = True
        finally:
            shutil.rmtree(self.path, ignore_errors=True)  # gone already when renamed to ``out``
            if not committed:
                remove_empty(self._created)

    def _commit(self) -> None:
        from amp_compiler.onnx.io import fsync_path  # the ONNX component is optional

        staged = sorted(p.name for p in self.path.iterdir())
        for name in staged:
            fsync_path(self.path / name)
        if not os.path.lexists(self.out):
            os.rename(self.path, self.out)
        else:
            for name in staged:
                os.replace(self.path / name, self.out / name)
        fsync_path(self.out)
        self.written = [self.out / name for name in staged]
