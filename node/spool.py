"""The spool: received instances as files, ``<root>/<study>/<series>/<sop>.dcm``.

* File names come only from UIDs that pass the DICOM UID grammar
  (PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters); a UID
  with any other character (``../``, ``/``, spaces) is refused and never used.
* Writes are atomic: a temporary file in the target directory, ``fsync``,
  ``rename`` onto the final name, ``fsync`` of the directory. A reader sees
  either nothing or the complete file; a crash leaves at most a ``.tmp-*`` file
  that :meth:`Spool.remove_stale_temporaries` clears at start.
* A free-space guard refuses an instance (DICOM Out of Resources) while less than
  ``min_free_bytes`` would remain after writing it. ``free_bytes`` is injectable
  so tests can trigger the guard without filling a disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from node.errors import SpoolError

log = logging.getLogger(__name__)

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
UID_MAX_LENGTH = 64
SUFFIX = ".dcm"
TMP_PREFIX = ".tmp-"


def is_valid_uid(uid: str) -> bool:
    """True when ``uid`` follows the DICOM UID grammar (and so is safe as a file name)."""
    return 0 < len(uid) <= UID_MAX_LENGTH and UID_PATTERN.fullmatch(uid) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Files of received instances under ``root``.

    ``free_bytes`` returns the bytes available on the spool's file system
    (default: :func:`shutil.disk_usage`); ``min_free_bytes`` is the floor the
    guard keeps free.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        min_free_bytes: int = 0,
        free_bytes: Callable[[], int] | None = None,
        fsync: bool = True,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self._free_bytes = free_bytes or (lambda: shutil.disk_usage(self.root).free)
        self.fsync = fsync

    # -- names ---------------------------------------------------------------

    def relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """``study/series/sop.dcm`` relative to the root; SpoolError for an unsafe UID."""
        for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP", sop_uid)):
            if not is_valid_uid(uid):
                raise SpoolError(f"{name} Instance UID {uid[:80]!r} is not a valid DICOM UID")
        return Path(study_uid) / series_uid / (sop_uid + SUFFIX)

    def abspath(self, rel: Path | str) -> Path:
        """The absolute path of ``rel``; SpoolError if it would leave the spool."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise SpoolError(f"path {str(rel)[:80]!r} lies outside the spool")
        return path

    # -- space ---------------------------------------------------------------

    def free_bytes(self) -> int:
        return int(self._free_bytes())

    def has_room_for(self, size: int) -> bool:
        """True while writing ``size`` bytes leaves at least ``min_free_bytes`` free."""
        return self.free_bytes() - size >= self.min_free_bytes

    # -- writing -------------------------------------------------------------

    def write_atomic(self, rel: Path | str, parts: Sequence[bytes]) -> Path:
        """Write the concatenation of ``parts`` to ``rel`` atomically; return the absolute path."""
        path = self.abspath(rel)
        directory = path.parent
        try:
            new_dirs = not directory.is_dir()
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            os.close(fd)
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(directory)
                if new_dirs:
                    _fsync_dir(directory.parent)
                    _fsync_dir(directory.parent.parent)
        except OSError as exc:
            raise SpoolError(f"cannot write {rel} in the spool: {exc.strerror or exc}") from exc
        return path

    def read(self, rel: Path | str) -> bytes:
        try:
            return self.abspath(rel).read_bytes()
        except OSError as exc:
            raise SpoolError(f"cannot read {rel} from the spool: {exc.strerror or exc}") from exc

    def exists(self, rel: Path | str) -> bool:
        return self.abspath(rel).is_file()

    def remove(self, rel: Path | str) -> int:
        """Delete one file; return the bytes freed (0 when it was already gone)."""
        path = self.abspath(rel)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SpoolError(f"cannot delete {rel} from the spool: {exc.strerror or exc}") from exc
        return size

    def prune_empty_dirs(self, rel_dir: Path | str) -> None:
        """Remove ``rel_dir`` and its parents up to the root while they are empty."""
        path = self.abspath(rel_dir)
        while path != self.root and path.is_relative_to(self.root):
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent

    # -- scanning ------------------------------------------------------------

    def iter_files(self) -> Iterator[Path]:
        """Relative paths of every spooled instance file (``*/*/*.dcm``)."""
        for path in sorted(self.root.glob(f"*/*/*{SUFFIX}")):
            if not path.name.startswith(TMP_PREFIX):
                yield path.relative_to(self.root)

    def remove_stale_temporaries(self) -> int:
        """Delete ``.tmp-*`` files a crash left behind; return how many."""
        count = 0
        for path in self.root.glob(f"*/*/{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                count += 1
        if count:
            log.warning("removed %d incomplete temporary files from the spool", count)
        return count
