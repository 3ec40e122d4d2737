"""Finished runs kept as one compressed archive: a benchmark's folder of run folders packed
into a .tar.gz (docs/runs/issue15/full-runs.tar.gz and the like), its members named as in
the folder (`<run>/metrics.jsonl`, `<run>/summary.json`, ...). Every command that takes
`--runs` reads such an archive as it reads the folder.

Pack a folder:   tar -czf full-runs.tar.gz -C results/bench/full-runs .
Unpack one (so that `make bench` reuses its runs):
                 mkdir -p results/bench/full-runs && tar -xzf docs/runs/issue15/full-runs.tar.gz -C results/bench/full-runs
"""

from __future__ import annotations

import atexit
import shutil
import tarfile
import tempfile
from pathlib import Path

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

# archive (resolved path, size, mtime) -> the folder it was extracted to, once per process
_extracted: dict[tuple[str, int, int], Path] = {}


def is_runs_archive(path: str | Path) -> bool:
    """Whether `path` names a file packed as an archive of runs (by its name)."""
    path = Path(path)
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def runs_folder(path: str | Path) -> Path:
    """The folder of runs at `path`: the folder itself, or an archive of run folders
    extracted into a temporary folder (once per process, removed when it exits).
    Raises FileNotFoundError if `path` is neither."""
    path = Path(path)
    if path.is_dir():
        return path
    if not is_runs_archive(path):
        raise FileNotFoundError(f"{str(path)!r} is neither a folder of runs nor an archive of them "
                                f"({', '.join(ARCHIVE_SUFFIXES)})")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _extracted:
        folder = Path(tempfile.mkdtemp(prefix=f"fedmoe-{path.name.split('.')[0]}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        with tarfile.open(path) as archive:
            # the "data" filter refuses absolute names, links out of the folder and devices
            archive.extractall(folder, filter="data")
        _extracted[key] = folder
    return _extracted[key]
