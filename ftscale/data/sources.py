"""Read raw rows from files, `datasets` folders or the hub, each tagged with where it came from."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyarrow import ArrowException

from ftscale.config.data import DataSource
from ftscale.errors import FtscaleError, first_line


class DataError(FtscaleError, ValueError):
    """Unusable data; the message names the file and line (or row) and what is wrong."""


@dataclass(frozen=True)
class SourceRow:
    where: str  # "file.jsonl:12" or "folder[row 3]": shown in every error about this row
    row: Any
    # True: `row` is a JSON line, parsed by `parse()` in whichever process tokenizes it (bytes when not UTF-8).
    line: bool = False

    def parse(self) -> Any:
        """The row object; a line that is not UTF-8 JSON raises a DataError naming it."""
        if not self.line:
            return self.row
        if isinstance(self.row, bytes):
            raw = self.row
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{self.where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
                ) from None
        try:
            return json.loads(self.row)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{self.where}: JSON nested too deeply to read") from None


def _jsonl(path: Path) -> Iterator[SourceRow]:
    # Read by hand rather than through `datasets`: a bad line must be reported with its line number. Lines are
    # streamed (a file larger than memory never sits in it); JSON is parsed where the row is tokenized (a worker
    # process). A line that is not UTF-8 is a bad row (skippable), not a bad file.
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may start the file
            except UnicodeDecodeError:
                yield SourceRow(f"{path}:{n}", raw, line=True)
                continue
            if line.strip():
                yield SourceRow(f"{path}:{n}", line, line=True)


def _json(path: Path) -> Iterator[SourceRow]:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded); save the file as UTF-8") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json source must hold a list of objects") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(f'{path}: a .json source must hold a list of row objects (or {{"data": [...]}})')
    for i, row in enumerate(doc):
        yield SourceRow(f"{path}[item {i}]", row)


def _table(dataset, label: str, first_row_line: int | None = None) -> Iterator[SourceRow]:
    for i, row in enumerate(dataset):
        yield SourceRow(f"{label}:{i + first_row_line}" if first_row_line else f"{label}[row {i}]", row)


def _read_table(reader, path: Path, kind: str):
    """A Parquet or CSV file through `datasets`, whose errors for a corrupt file come from several libraries
    (pyarrow, pandas, its own builder): any of them means this one file cannot be read, so each is reported so."""
    from datasets.exceptions import DatasetGenerationError

    quiet = logging.getLogger("datasets")  # it logs the same failure on its own; ours is the one line that counts
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return reader(str(path))
    except (DatasetGenerationError, ArrowException, ValueError, OSError, UnicodeDecodeError) as e:
        cause = e.__cause__ or e
        raise DataError(f"{path}: cannot be read as {kind} ({first_line(cause)}); check the file is complete and really {kind}") from None
    finally:
        quiet.setLevel(level)


def source_kind(source: DataSource) -> str:
    """ "file", "folder" or "hub" (a dataset name such as "org/name", from the local cache when offline); a path
    that names a missing file is a DataError, not a hub lookup."""
    path = Path(source.path)
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    if (
        path.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv")
        or path.is_absolute()
        or source.path.startswith(".")
        or len(path.parts) > 2
    ):
        raise DataError(f"{path}: no such file or folder")
    return "hub"


def load_hub_dataset(source: DataSource):
    import datasets

    try:
        return datasets.load_dataset(source.path, split=source.split)
    except (OSError, ValueError, ConnectionError) as e:  # the hub's not-found and offline errors
        raise DataError(f"{source.path}: no such file or folder, nor a hub dataset ({first_line(e)})") from None


def read_rows(source: DataSource) -> Iterator[SourceRow]:
    """Rows of one source in file order. Errors of single rows are raised by `SourceRow.parse` or later, so that
    the caller decides (raise or skip); errors about the whole source are raised here."""
    import datasets

    path = Path(source.path)
    suffix = path.suffix.lower()
    kind = source_kind(source)
    if kind == "file":
        if suffix == ".jsonl":
            yield from _jsonl(path)
        elif suffix == ".json":
            yield from _json(path)
        elif suffix == ".parquet":
            yield from _table(_read_table(datasets.Dataset.from_parquet, path, "Parquet"), str(path))
        elif suffix == ".csv":
            yield from _table(_read_table(datasets.Dataset.from_csv, path, "CSV"), str(path), first_row_line=2)  # line 1: header
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}': use .jsonl, .json, .parquet or .csv")
    elif kind == "folder":
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
        except (OSError, ValueError, KeyError, ArrowException, json.JSONDecodeError) as e:
            raise DataError(f"{path}: a damaged datasets folder ({first_line(e)}); save it again") from None
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(f"{path}: has no split '{source.split}' (it has {', '.join(loaded)}); set split: in the source")
            loaded = loaded[source.split]
        yield from _table(loaded, str(path))
    else:
        yield from _table(load_hub_dataset(source), source.path)
