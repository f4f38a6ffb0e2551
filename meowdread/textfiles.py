"""Text inputs (corpus, prompts): UTF-8 with or without a byte-order mark, LF or CRLF line ends, and a file that
is not text, or not a file, named for what it is instead of failing somewhere inside a parser.

    meowdread fit --config configs/tiny.yaml --data.corpus corpus.jsonl.gz   # "gzip-compressed, not UTF-8 text"
"""

from __future__ import annotations

import codecs
import re
import stat
from pathlib import Path

LINE_END = re.compile(r"\r\n|\r|\n")  # not str.splitlines, which also splits at U+2028 and other characters
Location = int | str  # a line number, or "row 12" where the data has rows instead of lines

# What a file is, from its first bytes, when it is not text; and what to do about it.
MAGIC = [
    (rb"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (rb"PK\x03\x04", "a zip archive", "unpack it first (unzip)"),
    (rb"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd)"),
    (rb"BZh[1-9]1AY&SY", "bzip2-compressed", "decompress it first (bunzip2)"),
    (rb"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz)"),
    (rb"PAR1", "a Parquet file", "give it the suffix .parquet"),
    (rb"\xff\xfe|\xfe\xff", "UTF-16 text", "save it as UTF-8"),
]


class CorpusError(ValueError):
    """Bad input in a corpus, prompts or lexicon file; the message names the file, the line and the field.

    ``line`` is a line number (``file:12: …``) or, where the data has rows rather than lines, a phrase such
    as ``"row 12"`` (``file: row 12: …``).
    """

    def __init__(self, path: str | Path, line: Location | None, field: str | None, problem: str):
        at = where(path, line)
        super().__init__(f"{at}: {field}: {problem}" if field else f"{at}: {problem}")


def where(path: str | Path, line: Location | None) -> str:
    return f"{path}:{line}" if isinstance(line, int) else f"{path}: {line}" if line else str(path)


def lines(text: str) -> list[str]:
    """The lines of a text, whatever its line ends: LF, CRLF or CR."""
    return LINE_END.split(text)


def read_text(path: Path, key: str) -> str:
    """The text of a regular file: UTF-8, a byte-order mark dropped. Anything else is named for what it is."""
    check_regular_file(path, key)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CorpusError(path, None, key, f"cannot read it ({err.strerror or err})") from None
    for magic, what, fix in MAGIC:
        if re.match(magic, data):
            raise CorpusError(path, None, key, f"{what}, not UTF-8 text: {fix}")
    if b"\x00" in data[:8192]:
        raise CorpusError(path, None, key, "a binary file (it holds NUL bytes), not text")
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        line, start = body.count(b"\n", 0, err.start) + 1, body.rfind(b"\n", 0, err.start) + 1
        raise CorpusError(path, line, None, f"not valid UTF-8 ({err.reason} at byte {err.start - start})") from None
    head = text.lstrip()[:100].lower()
    if head.startswith("version https://git-lfs"):
        raise CorpusError(path, None, key, "a Git LFS pointer, not the data: fetch the file itself (git lfs pull)")
    if head.startswith(("<!doctype html", "<html")):
        raise CorpusError(path, None, key, "an HTML page, not data: download the raw file")
    return text


def check_regular_file(path: Path, key: str) -> None:
    """A file that can be read to its end: not missing, not a directory, a pipe or a device."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CorpusError(path, None, key, "file not found") from None
    except OSError as err:
        raise CorpusError(path, None, key, f"cannot read it ({err.strerror or err})") from None
    if stat.S_ISDIR(mode):
        raise CorpusError(path, None, key, "a directory, not a file")
    if not stat.S_ISREG(mode):
        kinds = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device")]
        kind = next((name for test, name in kinds if test(mode)), "a special file (a device or a socket)")
        raise CorpusError(path, None, key, f"{kind}, not a regular file: write the data to a file and give its path")
