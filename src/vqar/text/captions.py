"""Caption files for image folders, and the generated captions of the bundled digits.

An image folder is captioned by a `captions.jsonl` (one `{"file": "cats/001.jpg", "caption": "..."}` per line;
an image may have several lines, or a list of captions on one) or a `captions.tsv` (`file<TAB>caption` per line,
the layout of the RQ release's CC-3M lists; a first line `file<TAB>caption` is a header). File names are relative
to the folder. Lines with a missing or empty caption or file name are counted and skipped with a warning, as are
images that end up with no caption and captions of files that are not among the folder's images.

The digits have no captions, so vqar writes them from templates: `DIGIT_TEMPLATES` in training and the disjoint
`HELD_OUT_DIGIT_TEMPLATES` to test that a model follows phrasings it has never seen.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("vqar.text")

CAPTION_FILES = ("captions.jsonl", "captions.tsv")
# A first line of these two names is a TSV's header, not an image called "file" (case does not matter).
TSV_HEADER_NAMES = ({"file", "filename", "file_name", "image", "path", "url"}, {"caption", "captions", "text"})

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [
    "a handwritten {word}",
    "the digit {number}",
    "a {word}",
    "the number {word}",
    "a hand drawn digit {number}",
    "an image of the numeral {number}",
    "{word}",
    "a sketch of the number {number}",
    "a photo of the digit {word}",
    "{number}",
    "this is a {word}, drawn by hand",
    "a black and white image of a handwritten {word}",
    "the numeral {word} in ink",
    "a small grey image showing the number {number}",
]
# No held-out phrasing may contain another digit's name, even inside a word: "someone wrote the digit seven" was
# one, and the BPE splits "someone" into s-o-m-e-"one", the token that names the digit 1.
HELD_OUT_DIGIT_TEMPLATES = [
    "a picture of a handwritten {word}",
    "number {number}, written by hand",
    "a student wrote the digit {word}",
]


def digit_captions(label: int, templates: list[str] | None = None) -> list[str]:
    """Every caption of digit `label` from `templates` (default: the training templates)."""
    if not 0 <= label <= 9:
        raise ValueError(f"digit labels are 0..9, got {label}")
    return [t.format(word=DIGIT_WORDS[label], number=label) for t in (templates or DIGIT_TEMPLATES)]


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """{relative file name: [captions]} from a `.jsonl` or `.tsv` caption file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    if path.suffix not in (".jsonl", ".tsv"):
        raise ValueError(f"caption files are .jsonl or .tsv, got {path.name}")
    table: dict[str, list[str]] = defaultdict(list)
    skipped = untabbed = wide = nameless = quoted = 0
    first = True
    with open(path, "rb") as handle:  # read as bytes, so that a line that is not UTF-8 is named by its number
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # an editor's BOM is not a file name
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number} is not UTF-8 text ({err.reason} at byte {err.start}); save the "
                                 "caption file as UTF-8") from None  # fmt: skip
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                name, captions = _jsonl_record(line, f"{path}:{number}")
            else:
                name, tab, caption = line.rstrip("\r\n").partition("\t")
                caption, more, _ = caption.partition("\t")  # columns after the caption (a URL) are not caption text
                if first and _is_tsv_header(name, caption):
                    first = False
                    continue
                untabbed += not tab
                wide += bool(more)
                quoted += caption.startswith('"') and caption.rstrip().endswith('"') and len(caption.rstrip()) > 1
                captions = [caption]
            first = False
            if not name.strip():  # Path("") is ".": the caption would be the folder's, which is no image
                nameless += 1
                continue
            for caption in captions:
                text = None if caption is None else caption_text(caption)
                if text is None:
                    skipped += 1
                    continue
                if not is_unicode(text):  # a JSON escape such as "\udcff": no text a caption store can hold
                    raise ValueError(f"{path}:{number} holds a caption that is not Unicode text (a lone surrogate "
                                     f"escape in {caption!r}); write its characters as UTF-8")  # fmt: skip
                table[Path(name).as_posix()].append(text)
    if untabbed:
        log.warning("%s: %d line(s) without a tab between the file name and the caption skipped", path, untabbed)
    if quoted:  # csv.writer and pandas quote fields that hold quotes, tabs or line breaks
        log.warning('%s: %d caption(s) in double quotes, kept as written, quotes included: a .tsv is read line by '
                    'line, unquoted; write it without quoting (csv.QUOTE_NONE) or as captions.jsonl', path,
                    quoted)  # fmt: skip
    if wide:
        log.warning("%s: %d line(s) with more columns than file<TAB>caption: the columns after the caption were left "
                    "out", path, wide)  # fmt: skip
    if nameless:
        log.warning("%s: %d line(s) with an empty file name skipped", path, nameless)
    if skipped - untabbed:
        log.warning("%s: %d line(s) with a missing or empty caption skipped", path, skipped - untabbed)
    if not table:
        raise ValueError(f"{path} holds no captions")
    return dict(table)


def caption_text(caption: str) -> str | None:
    """A training caption as a caption store keeps it: on one line, each run of whitespace a single space; None
    when nothing visible is left (only whitespace, or format characters such as a zero-width space), a missing
    caption: the caption tokenizer would make it the empty caption, which is guidance's null condition."""
    text = " ".join(caption.split())
    visible = any(not (char.isspace() or unicodedata.category(char) == "Cf") for char in text)
    return text if visible else None


def check_caption_values(captions: list, what: str) -> None:
    """ValueError naming `what` when a caption is neither a string nor null (missing): a number or an object
    written where a caption goes was counted as missing, or made into its Python text ("None", a dict's keys)."""
    for item in captions:
        if item is not None and not isinstance(item, str):
            kind = {bool: "true or false", int: "a number", float: "a number", dict: "an object", list: "a list"}
            raise ValueError(f"{what} holds {kind.get(type(item), type(item).__name__)} ({item!r}); a caption is a "
                             "string, or a list of strings for several captions of one image")  # fmt: skip


def _jsonl_record(line: str, where: str) -> tuple[str, list[str | None]]:
    """The file name and captions of one `.jsonl` line: `"caption"` a string, a list of strings (several captions of
    one image), or missing / null / empty (skipped and counted). Any other value is an error naming the line: it
    was counted as a missing caption, which hid a file written with numbers or nested objects."""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise ValueError(f"{where} is not a JSON object: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise ValueError(f'{where} needs {{"file": ..., "caption": ...}}')
    caption = record.get("caption")
    if caption is None and ("captions" in record or "text" in record):  # the keys a shard's json member may use
        other = "captions" if "captions" in record else "text"
        raise ValueError(f'{where} names its caption "{other}"; a caption file\'s key is "caption" (a string, or a '
                         "list of strings)")  # fmt: skip
    captions = (caption or [None]) if isinstance(caption, list) else [caption]  # [] is a missing caption too
    check_caption_values(captions, f'{where}: "caption"')
    return record["file"], captions


def _is_tsv_header(name: str, caption: str) -> bool:
    files, texts = TSV_HEADER_NAMES
    return name.strip().lower() in files and caption.strip().lower() in texts


def is_unicode(text: str) -> bool:
    """False for text holding lone surrogates (what Python makes of bytes that are not UTF-8 in a command line, or
    of a JSON escape like "\\udcff"), which can be neither tokenized nor written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_one_line(prompt: str) -> None:
    """ValueError naming `prompt` when it holds a line break (\\n, \\r or any other separator `str.splitlines`
    splits on, \\u2028 and \\x0c among them): a prompt is one line, as `vqar sample` writes prompt i on line i + 1
    of prompts.txt and a `--prompts` file holds one per line."""
    lines = prompt.splitlines()
    if not prompt or lines == [prompt]:
        return
    at = len(lines[0]) if lines else 0  # the first line ends where the first break is
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    raise ValueError(f"prompt {shown!r} holds a line break ({prompt[at]!r} at character {at + 1}): a prompt is one "
                     "line (vqar sample writes prompt i on line i + 1 of prompts.txt); join its lines with a space, "
                     "or give each as a prompt of its own")


def find_caption_file(folder: str | Path) -> Path | None:
    """The folder's own caption file; None when it has none. Both kinds in one folder is an error: which of the two
    captions the images is the user's choice (vqar used to take the .jsonl without a word)."""
    found = [Path(folder) / name for name in CAPTION_FILES if (Path(folder) / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{folder} holds both {' and '.join(path.name for path in found)}: name the one to use "
                         "(--captions FILE, or data.captions=FILE)")  # fmt: skip
    return found[0] if found else None


def captions_for_files(root: Path, files: list[Path], table: dict[str, list[str]],
                       source: str | Path = "the caption file", listed: list[Path] | None = None) -> list[list[str]]:
    """The captions of each file (an empty list when it has none; counted and reported: `source` names the
    caption file when it captions none of them, which is mostly names relative to another folder). Entries of
    `table` that name none of the folder's `listed` images (default: `files`) are counted and reported too: a
    typo, a moved file or an image that is not one (`notes.txt`) loses its captions otherwise unsaid."""
    captions = [table.get(path.relative_to(root).as_posix(), []) for path in files]
    names = {path.relative_to(root).as_posix() for path in (files if listed is None else listed)}
    unknown = [name for name in table if name not in names]
    if unknown and len(unknown) < len(table):  # none matching at all is said below, with an example of each side
        log.warning("%s captions %d file(s) that are not among the images in %s (such as %r); their captions are "
                    "unused", source, len(unknown), root, unknown[0])  # fmt: skip
    missing = sum(1 for c in captions if not c)
    if files and missing == len(files):
        log.warning("%s captions none of the %d images in %s: it names files such as %r, where paths relative to "
                    "the folder (like %r) are expected", source, len(files), root, next(iter(table)),
                    files[0].relative_to(root).as_posix())  # fmt: skip
    elif missing:
        log.warning("%d of %d images have no caption and are left out of text-conditioned training", missing,
                    len(files))  # fmt: skip
    return captions
