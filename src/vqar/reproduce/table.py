"""The release table: every official checkpoint vqar loads, where its files live, the protocol behind its reported
numbers and the numbers, each with its source. The table is data (`releases.yaml` beside this module); more tables
can be added with $VQAR_RELEASES (paths separated by the OS path separator) or `--releases FILE`, in the same
layout (a release of the same name replaces the built-in one)."""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

log = logging.getLogger("vqar.reproduce")

BUILTIN = Path(__file__).with_name("releases.yaml")
ENV_TABLES = "VQAR_RELEASES"
METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "rfid")
# What a generator release's protocol must say (a value with its source, or that the sources do not state it).
PROTOCOL_KEYS = ("evaluator", "reference", "conditions", "n_samples", "image_size", "temperature", "top_k", "top_p",
                 "cfg_scale", "cfg_schedule", "cfg_interval")  # fmt: skip
EVALUATORS = ("adm", "pytorch-fid")
HEX = "0123456789abcdef"
CONDITIONS = ("per-class", "random-classes", "unconditional", "prompts")


@dataclass(frozen=True)
class Setting:
    """One protocol setting or reported number: its value and where it is stated, or that no source states it."""

    value: Any = None
    source: str = ""
    stated: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)  # e.g. a reference's `member` inside an archive

    def describe(self) -> str:
        return f"not stated ({self.note})" if not self.stated else f"{self.value!r} [{self.source}]"


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: its URL, size and sha256 where a source states them (None: unknown)."""

    url: str
    size: int | None = None
    sha256: str | None = None
    unpack: bool = False  # a .tar.gz release, unpacked once after its check
    note: str = ""
    source: str = ""

    @property
    def name(self) -> str:
        return Path(urlparse(self.url).path).name

    @property
    def mirror_path(self) -> str:
        """Where a local mirror keeps it: the URL's host and path (`huggingface.co/ORG/REPO/resolve/main/FILE`)."""
        parsed = urlparse(self.url)
        return f"{parsed.netloc}{parsed.path}"

    @property
    def hub_repo(self) -> str | None:
        parsed = urlparse(self.url)
        parts = parsed.path.strip("/").split("/")
        return "/".join(parts[:2]) if parsed.netloc == "huggingface.co" and len(parts) >= 4 else None


@dataclass(frozen=True)
class Release:
    name: str
    family: str
    description: str
    files: dict[str, RemoteFile]
    category: str = "generator"  # or "tokenizer" (listed; measured with `vqar eval rfid`)
    load: dict = field(default_factory=dict)
    protocol: dict[str, Setting] = field(default_factory=dict)
    reported: dict[str, Setting] = field(default_factory=dict)
    repo_config_sampling: dict | None = None
    table: str = ""  # the file it came from

    def setting(self, key: str) -> Setting:
        return self.protocol.get(key, Setting(stated=False, note="not in the table"))


@dataclass
class ReleaseTable:
    releases: dict[str, Release]
    references: dict[str, RemoteFile]

    def get(self, name: str) -> Release:
        if name not in self.releases:
            # names are lower case: `VAR-D16` is compared as `var-d16`, which difflib would not find by itself
            close = difflib.get_close_matches(name.lower(), list(self.releases), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown release {name!r}{hint} (`vqar releases` lists them)")
        return self.releases[name]

    def reference(self, release: Release) -> tuple[RemoteFile, str | None]:
        """The reference file of a release's protocol and the member to use inside it (for an archive)."""
        setting = release.setting("reference")
        if not setting.stated or setting.value not in self.references:
            raise ValueError(f"{release.name}: the table names no known reference batch ({setting.describe()})")
        return self.references[setting.value], setting.extra.get("member")


def _setting(raw, where: str) -> Setting:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected {{value: ..., source: ...}} or {{stated: false, note: ...}}, got {raw!r}")
    raw = dict(raw)
    if raw.pop("stated", True) is False:
        return Setting(stated=False, note=str(raw.get("note", "")))
    if "value" not in raw or not raw.get("source"):
        raise ValueError(f"{where}: a stated setting needs a value and its source")
    value, source = raw.pop("value"), str(raw.pop("source"))
    note = str(raw.pop("note", ""))
    return Setting(value=value, source=source, note=note, extra=raw)


def _remote(raw, where: str) -> RemoteFile:
    if not isinstance(raw, dict) or "url" not in raw:
        raise ValueError(f"{where}: a file needs a url")
    unknown = set(raw) - {"url", "size", "sha256", "unpack", "note", "source"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    url, size, digest = raw["url"], raw.get("size"), raw.get("sha256")
    if not isinstance(url, str) or not urlparse(url).scheme or not urlparse(url).path.strip("/"):
        raise ValueError(f"{where}: url must be the address of a file (https://HOST/PATH), got {url!r}")
    if size not in (None, "unknown") and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"{where}: size must be a number of bytes or 'unknown', got {size!r}")
    if digest not in (None, "unknown") and (len(str(digest)) != 64 or set(str(digest).lower()) - set(HEX)):
        raise ValueError(f"{where}: sha256 must be 64 hex digits or 'unknown', got {digest!r}")
    return RemoteFile(
        url=url,
        size=None if size in (None, "unknown") else size,
        sha256=None if digest in (None, "unknown") else str(digest).lower(),
        unpack=bool(raw.get("unpack", False)),
        note=str(raw.get("note", "")),
        source=str(raw.get("source", "")),
    )


def _release(raw, table: Path) -> Release:
    if not isinstance(raw, dict):
        raise ValueError(f"{table}: each entry of releases: must be a mapping (name:, files:, ...), got {_kind(raw)}")
    name = raw.get("name")
    if not name:
        raise ValueError(f"{table}: a release without a name")
    where = f"{table.name}: {name}"
    category = raw.get("category", "generator")
    protocol = {key: _setting(value, f"{where} protocol.{key}")
                for key, value in _section(raw, "protocol", dict, where).items()}  # fmt: skip
    reported = {key: _setting(value, f"{where} reported.{key}")
                for key, value in _section(raw, "reported", dict, where).items()}  # fmt: skip
    unknown = set(reported) - set(METRICS)
    if unknown:
        raise ValueError(f"{where}: unknown metrics {sorted(unknown)} (known: {', '.join(METRICS)})")
    if category not in ("generator", "tokenizer"):
        raise ValueError(f"{where}: category must be generator or tokenizer, got {category!r}")
    if category == "generator":
        missing = [key for key in PROTOCOL_KEYS if key not in protocol]
        if missing:
            raise ValueError(f"{where}: the protocol does not say {', '.join(missing)} (mark unstated settings "
                             "{stated: false, note: ...})")  # fmt: skip
        for key, allowed in (("evaluator", EVALUATORS), ("conditions", CONDITIONS)):
            if protocol[key].stated and protocol[key].value not in allowed:
                raise ValueError(f"{where}: {key} must be one of {allowed}, got {protocol[key].value!r}")
    files = {role: _remote(value, f"{where} files.{role}")
             for role, value in _section(raw, "files", dict, where).items()}  # fmt: skip
    if not files:
        raise ValueError(f"{where}: no files")
    return Release(
        name=str(name),
        family=str(raw.get("family", "")),
        description=str(raw.get("description", "")),
        files=files,
        category=category,
        load=dict(_section(raw, "load", dict, where)),
        protocol=protocol,
        reported=reported,
        repo_config_sampling=raw.get("repo_config_sampling"),
        table=str(table),
    )


def _read(path: Path) -> tuple[dict[str, Release], dict[str, RemoteFile]]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ValueError(f"cannot read the release table {path}: {err}") from None
    except UnicodeDecodeError:  # else the codec's words, which name neither the file nor what it should be
        raise ValueError(f"{path} is not a release table: it is not UTF-8 text (a binary file?); give a YAML or "
                         "JSON file with releases: (a list) and references:") from None  # fmt: skip
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not a release table: YAML (or JSON) cannot read it "
                         f"({_yaml_problem(err)})") from None  # fmt: skip
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a release table: expected a mapping with releases: (a list) and "
                         f"references:, got {_kind(raw)}")  # fmt: skip
    references = {key: _remote(value, f"{path.name}: references.{key}")
                  for key, value in _section(raw, "references", dict, path).items()}  # fmt: skip
    releases = {}
    for entry in _section(raw, "releases", list, path):
        release = _release(entry, path)
        if release.name in releases:
            raise ValueError(f"{path}: release {release.name} is listed twice")
        releases[release.name] = release
    return releases, references


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's complaint on one line: its own message spans several, with a caret under the spot."""
    problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def _section(raw: dict, key: str, kind: type, where) -> dict | list:
    """Entry `key` of a table or release (empty where absent), refused in one line unless it is a `kind`."""
    value = raw.get(key) or kind()
    if not isinstance(value, kind):
        expected = "a list" if kind is list else "a mapping"
        raise ValueError(f"{where}: {key}: must be {expected}, got {_kind(value)}")
    return value


def _kind(value) -> str:
    """What a YAML value is, in words, for errors (its text would be too long: a whole file, say)."""
    names = {str: "text", list: "a list", dict: "a mapping", int: "a number", float: "a number", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)


def load_table(extra: list[str | Path] | None = None) -> ReleaseTable:
    """The built-in table, then those of $VQAR_RELEASES, then `extra` (later ones replace releases by name)."""
    paths = [BUILTIN]
    paths += [Path(p) for p in os.environ.get(ENV_TABLES, "").split(os.pathsep) if p]
    paths += [Path(p) for p in extra or []]
    table, origin = ReleaseTable({}, {}), {}
    for path in paths:
        releases, references = _read(path)
        for name in sorted(releases.keys() & table.releases.keys()):  # meant (a mirror's URLs), or a name taken
            log.warning("the release %s of %s replaces the one of %s", name, path, origin[name])
        origin.update(dict.fromkeys(releases, path))
        table.releases.update(releases)
        table.references.update(references)
    return table
