"""Which files of a folder this project wrote: the rule that nothing else is overwritten or deleted.

Every writer of the project (save_pretrained, the Hub files of an export, `xlstm7b eval --out`,
`xlstm7b plot`, `xlstm7b tokenizer train`) records the files it writes in the folder's
`.xlstm7b-written.json`, with each file's size, modification time and writer. A file is the
project's while it is recorded and unchanged since; any other file (the user's, another tool's, one
of ours that the user has since edited) is never overwritten or removed unless the user says so. A
writer replaces only what the same writer wrote: `eval --out` never replaces a checkpoint's
config.json, although save_pretrained wrote it.

A run's RUN_DIR/model exported before the record existed is adopted by `adopt_earlier_export` where
its files prove themselves ours; see there.
"""

import json
import os
import sys
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


def safetensors_file(path: Path) -> bool:
    """Whether `path` is a plain file that starts with a safetensors header (length, then a JSON object)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            return path.is_file() and not path.is_symlink() and 2 <= n <= 100_000_000 and isinstance(json.loads(fh.read(n)), dict)
    except (OSError, ValueError):
        return False


def json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def earlier_export(folder: Path) -> dict[str, str]:
    """The files of `folder` that a training run's export by an earlier version (before the record)
    provably wrote, by name -> writer: in RUN_DIR/model (beside RUN_DIR/train.lock), a tokenizer.json
    that is a byte-for-byte copy of RUN_DIR/tokenizer.json, as the trainer exported it, with a
    config.json of model_type "xlstm" and the weights it loads (model.safetensors, or the index and
    every shard it names, each a safetensors file). Nothing if any part is missing or is not what it
    claims. Outside a run nothing is provable: the released model and transformers' saves write the
    same config.json and weights, so a folder holding them stays foreign."""
    config, index = json_object(folder / "config.json"), json_object(folder / "model.safetensors.index.json")
    if config is None or config.get("model_type") != "xlstm" or not run_tokenizer_copy(folder):
        return {}
    if index is not None:
        shards = index.get("weight_map")
        if not isinstance(shards, dict) or not shards:
            return {}
        weights = ["model.safetensors.index.json", *sorted(set(map(str, shards.values())))]
    else:
        weights = ["model.safetensors"]
    if not all(Path(n).name == n and safetensors_file(folder / n) for n in weights if n != "model.safetensors.index.json"):
        return {}
    return {n: "save_pretrained" for n in ["config.json", *weights]} | {"tokenizer.json": "save_for_hub"}


def run_tokenizer_copy(folder: Path) -> bool:
    """Whether folder/tokenizer.json is a plain file with the bytes of the run's own tokenizer
    (folder is a run's export: RUN_DIR/model, beside RUN_DIR/train.lock and RUN_DIR/tokenizer.json)."""
    tokenizer, run = folder / "tokenizer.json", folder.parent
    try:
        return ((run / "train.lock").is_file() and tokenizer.is_file() and not tokenizer.is_symlink()
                and (run / "tokenizer.json").is_file() and tokenizer.read_bytes() == (run / "tokenizer.json").read_bytes())
    except OSError:
        return False


def adopt_earlier_export(folder: Path) -> list[str]:
    """Records the files of an earlier version's export in `folder` (see `earlier_export`) as the
    project's, saying so in one line, when the folder has no record yet; returns their names. Every
    other file of the folder stays foreign: never replaced or removed."""
    folder = Path(folder)
    if (folder / RECORD).exists() or not folder.is_dir() or not (ours := earlier_export(folder)):
        return []
    for writer in sorted(set(ours.values())):
        remember(folder, [n for n, w in ours.items() if w == writer], writer)
    print(f"{folder}: {len(ours)} file(s) of an export by an earlier xlstm7b version ({', '.join(ours)}) adopted into "
          f"{RECORD}; they may now be replaced", file=sys.stderr, flush=True)
    return list(ours)
