"""Which files of a folder this project wrote: the rule that nothing else is overwritten or deleted.

Every writer of the project (save_pretrained, the Hub files of an export, `xlstm7b eval --out`,
`xlstm7b plot`, `xlstm7b tokenizer train`) records the files it writes in the folder's
`.xlstm7b-written.json`, with each file's size, modification time and writer. A file is the
project's while it is recorded and unchanged since; any other file (the user's, another tool's, one
of ours that the user has since edited) is never overwritten or removed unless the user says so. A
writer replaces only what the same writer wrote: `eval --out` never replaces a checkpoint's
config.json, although save_pretrained wrote it.
"""

import json
import os
from collections.abc import Iterable
from pathlib import Path

RECORD = ".xlstm7b-written.json"


class ForeignFileError(ValueError):
    """A writer would overwrite or remove a file the project did not write; the message names it."""


def stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def recorded(record: dict, path: Path, writer: str | None) -> bool:
    """Whether `record` holds `path` unchanged since `writer` (None: any writer) wrote it."""
    entry = record.get(path.name)
    try:
        return (isinstance(entry, list) and path.is_file() and not path.is_symlink() and entry[:2] == stamp(path)
                and (writer is None or entry[2:] == [writer]))
    except OSError:
        return False


def read_record(folder: Path) -> dict[str, list[int]]:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):  # none yet, or damaged: then nothing in the folder is provably ours
        return {}
    return record if isinstance(record, dict) else {}


def is_ours(path: Path, writer: str | None = None) -> bool:
    """Whether `path` was written by the project (by `writer`, if given) and is unchanged since."""
    path = Path(path)
    return recorded(read_record(path.parent), path, writer)


def foreign_files(folder: Path, names: Iterable[str] | None = None, writer: str | None = None) -> list[Path]:
    """The files among `names` (default: everything in `folder`) that exist and are not the
    project's (not `writer`'s, if given)."""
    folder = Path(folder)
    record = read_record(folder)
    paths = [folder / n for n in names] if names is not None else (sorted(folder.iterdir()) if folder.is_dir() else [])
    return [p for p in paths if p.name not in (RECORD, RECORD + ".tmp") and (p.exists() or p.is_symlink())
            and not recorded(record, p, writer)]


def check_overwrite(path: Path, writer: str, fix: str) -> None:
    """A ForeignFileError if `path` exists and `writer` did not write it; `fix` says what to do
    instead. A folder at `path` is left to the caller's own message."""
    path = Path(path)
    if not path.is_dir() and foreign_files(path.parent, [path.name], writer):
        raise ForeignFileError(f"{path} exists and was not written by xlstm7b {writer} (or was changed since); it is "
                               f"left untouched: {fix}")


def remember(folder: Path, names: Iterable[str], writer: str) -> None:
    """Records the files `names` of `folder`, just written by `writer`, as the project's."""
    folder = Path(folder)
    record = read_record(folder)
    record.update({n: [*stamp(folder / n), writer] for n in names})
    record = {n: entry for n, entry in record.items() if (folder / n).is_file()}
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, folder / RECORD)


def forget(folder: Path, names: Iterable[str], writer: str) -> None:
    """Removes the files `names` of `folder` that `writer` wrote (others are left alone)."""
    folder = Path(folder)
    for n in names:
        if is_ours(folder / n, writer):
            (folder / n).unlink()
    remember(folder, [], writer)
