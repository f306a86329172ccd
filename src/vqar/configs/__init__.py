"""Run configurations: dataclass schemas filled from packaged YAML presets and `key=value` overrides.

A preset is a YAML file shipped in this folder (`configs/<group>/<name>.yaml`) or any YAML path. Overrides use
OmegaConf dotlists (`model.quantizer.depth=4`, `train.steps=500`) plus per-group shorthands in the style of the
RQ-Transformer tools (`d=4 c=256`). Unknown keys, ill-typed values and invalid combinations raise `ConfigError`
with a message that names the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("vqar.configs")

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message saying why."""


def changed_settings(config: Any, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The settings of the dataclass instance `config` (every field, or those of `names`) whose values differ from
    the dataclass's defaults, in that order: what a check refuses where a setting would be saved and do nothing."""
    defaults = type(config)()
    names = [field.name for field in dataclasses.fields(config)] if names is None else names
    return {name: getattr(config, name) for name in names if getattr(config, name) != getattr(defaults, name)}


def preset_names(group: str) -> list[str]:
    """Names of the presets shipped for `group` (e.g. "tokenizer")."""
    folder = resources.files(__name__).joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(group: str, name: str) -> str:
    path = resources.files(__name__).joinpath(group, f"{name}.yaml")
    if not path.is_file():
        raise ConfigError(f"no {group} preset named {name!r}; available: {', '.join(preset_names(group))}")
    return path.read_text()


def compose_node(
    schema: type,
    group: str,
    preset: str | Path | None,
    overrides: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    shape: Callable[[DictConfig], None] | None = None,
) -> DictConfig:
    """A configuration from `schema`'s defaults, then `base` (e.g. a named model size), then the preset (a name in
    `group` or a YAML path), then the overrides, before it becomes a `schema` instance (`to_config`); values may
    still be missing ("???"). `shape` may change the schema first, e.g. put the chosen architecture's dataclass in
    a section typed Any."""
    base_cfg = OmegaConf.structured(schema)
    if shape is not None:
        shape(base_cfg)
    layers = [OmegaConf.create(dict(base))] if base else []
    if preset is not None:
        layers.append(_load_preset(group, preset, base_cfg))
    layers.append(parse_overrides(base_cfg, overrides, aliases or {}))
    try:
        return OmegaConf.merge(base_cfg, *layers)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err, base_cfg, layers)) from None


def to_config(node: DictConfig, validate: bool = True) -> Any:
    """The dataclass instance of a composed configuration, validated unless `validate` is False (ConfigError
    naming what is wrong)."""
    try:
        config = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err)) from None
    validate = getattr(config, "validate", None) if validate else None
    if validate is not None:
        try:
            validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return config


def preset_fields(group: str, preset: str | Path | None, overrides: Sequence[str], keys: Sequence[str]) -> dict:
    """The raw values of top-level `keys` that a preset and overrides set (the last one wins), read before the
    schema is known: what decides the schema (an architecture name, say)."""
    found: dict[str, Any] = {}
    if preset is not None:
        loaded = _parse_preset(group, preset)
        if isinstance(loaded, DictConfig):
            found.update({k: loaded[k] for k in keys if k in loaded})
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in keys:
            found[key] = _override_node(item, f"{key}={value}")[key]
    return found


def parse_overrides(base: DictConfig, overrides: Sequence[str], aliases: Mapping[str, str]) -> DictConfig:
    """`key=value` strings -> a DictConfig, with shorthands expanded and every key checked against `base`."""
    dotlist = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"overrides are key=value pairs, got {item!r}")
        key = aliases.get(key, key)
        check_key(base, key, aliases)
        _override_node(item, f"{key}={value}")  # a value YAML cannot read is named here, not a parser traceback
        dotlist.append(f"{key}={value}")
    try:
        return OmegaConf.from_dotlist(dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err)) from None


def say_settings_given_twice(overrides: Sequence[str], aliases: Mapping[str, str] | None = None) -> None:
    """A warning for each setting a command line gives twice with another value, in one spelling or two
    (`model=A ... model=B`, `steps=7 train.steps=9`, a shorthand and its long form), naming the value used: the
    last one was taken without a word. (It may be a change appended to a long command, so it is not refused.)"""
    seen: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        setting = (aliases or {}).get(key, key)
        if setting in seen and seen[setting].partition("=")[2] != value:
            log.warning("%s is given twice (%s, then %s): the last is used", setting, seen[setting], item)
        seen[setting] = item


def _override_node(item: str, entry: str) -> DictConfig:
    """The DictConfig of one override `entry` ("key=value"); ConfigError naming the override `item` as given when
    its value is no YAML (an unclosed `[1,2` or `{a`)."""
    try:
        return OmegaConf.from_dotlist([entry])
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ConfigError(f"cannot read the value of override {item!r}: {problem} (close its brackets, or quote "
                          "it)") from None  # fmt: skip


def check_key(base: DictConfig, key: str, aliases: Mapping[str, str] | None = None) -> None:
    """Raises ConfigError unless the dotted `key` names a field of `base`."""
    node: Any = base
    walked: list[str] = []
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():  # noqa: SIM118 (`in node` skips "???" values)
            raise ConfigError(_unknown_key_message(key, walked, node, aliases or {}))
        walked.append(part)
        node = None if OmegaConf.is_missing(node, part) else node[part]


def to_yaml(config: Any) -> str:
    """YAML text of a schema instance (what run directories store as `run.yaml`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def from_dict(schema: type[T], data: Mapping[str, Any]) -> T:
    """A schema instance from a plain dict (for configs stored next to weights); unknown keys are an error."""
    base = OmegaConf.structured(schema)
    _check_tree(base, OmegaConf.create(dict(data)), "")
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, data))
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err)) from None


def _preset_text(group: str, preset: str | Path) -> tuple[str, str]:
    """(YAML text, where it came from) of a preset name in `group` or a YAML path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path.read_text(), str(path)
    named = str(preset) in preset_names(group)  # a run folder may share a preset's name: the preset is meant
    if not named and (path.exists() or "/" in str(preset) or "\\" in str(preset)):  # a path: say what it is
        what = "a folder" if path.is_dir() else "a file without a .yaml or .yml suffix" if path.exists() else \
            "no file"  # fmt: skip
        raise ConfigError(f"{preset} is {what}: a preset is a name ({', '.join(preset_names(group))}) or a YAML "
                          "file (.yaml / .yml)")  # fmt: skip
    return preset_text(group, str(preset)), f"preset {preset!r}"


def _parse_preset(group: str, preset: str | Path) -> Any:
    """The YAML of a preset name in `group` or a YAML path, parsed; ConfigError naming it where it does not parse."""
    text, origin = _preset_text(group, preset)
    try:
        return OmegaConf.create(text)
    except Exception as err:  # YAML syntax errors come in several types
        raise ConfigError(f"cannot parse {origin}: {err}") from None


def _load_preset(group: str, preset: str | Path, base: DictConfig) -> DictConfig:
    loaded = _parse_preset(group, preset)
    origin = _preset_text(group, preset)[1]
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{origin} must hold a mapping at the top level")
    if not loaded:  # the schema's defaults alone are no run (they fail later, naming a setting nobody gave)
        raise ConfigError(f"{origin} is empty: it holds no settings (name a preset, see `vqar presets`, or a YAML file "
                          "that sets the run)")  # fmt: skip
    _check_tree(base, loaded, "", origin)
    return loaded


def _check_tree(base: DictConfig, tree: DictConfig, prefix: str, origin: str = "config") -> None:
    for key in tree:
        dotted = f"{prefix}{key}"
        try:
            check_key(base, dotted)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from None
        child = tree[key]
        if isinstance(child, DictConfig):
            _check_tree(base, child, f"{dotted}.", origin)


def _unknown_key_message(key: str, walked: list[str], node: Any, aliases: Mapping[str, str]) -> str:
    where = ".".join(walked)
    if not isinstance(node, DictConfig):
        return f"unknown config key {key!r}: {where!r} is a value, not a section"
    valid = sorted(str(k) for k in node)
    bad = key.split(".")[len(walked)]
    guess = difflib.get_close_matches(bad, valid, n=1)
    hint = f" (did you mean {'.'.join([*walked, guess[0]])!r}?)" if guess else ""
    scope = f"under {where!r}" if where else "at the top level"
    text = f"unknown config key {key!r}{hint}. Valid keys {scope}: {', '.join(valid)}"
    if aliases:
        text += ". Shorthands: " + ", ".join(f"{a}={target}" for a, target in sorted(aliases.items()))
    return text


def _describe_omegaconf_error(err: OmegaConfBaseException, base: DictConfig | None = None,
                              layers: Sequence[DictConfig] = ()) -> str:  # fmt: skip
    """A message naming the key of OmegaConf's error; `base` and the `layers` merged onto it find the key of an
    error that does not name one."""
    key = getattr(err, "full_key", None)
    message = str(err).split("\n")[0]
    if key and "is not a ListConfig" in message:  # OmegaConf's words for a scalar given to a list field
        value = getattr(err, "value", None)
        return f"{key} takes a list, got {value!r}: write the items in brackets, e.g. {key}=[{value}]"
    if not key and "is not a subclass of" in message and base is not None:  # a value given to a group: no key said
        for layer in layers:
            found = _group_given_a_value(base, layer, "")
            if found is not None:
                group, value = found
                keys = [str(k) for k in OmegaConf.select(base, group)]
                return (f"{group} is a group of settings, not a value (got {value!r}): set its keys one by one, e.g. "
                        f"{group}.{keys[0]}=...; its keys: {', '.join(keys)}")  # fmt: skip
    return f"invalid value for {key!r}: {message}" if key else message


def _group_given_a_value(base: DictConfig, layer: DictConfig, prefix: str) -> tuple[str, Any] | None:
    """The dotted key and value of the first group of `base` (a section) that `layer` sets to a plain value."""
    for key in layer:
        if key not in base.keys() or OmegaConf.is_missing(base, key) or OmegaConf.is_missing(layer, key):  # noqa: SIM118
            continue
        section, value = base[key], layer[key]
        if not isinstance(section, DictConfig):
            continue
        if not isinstance(value, DictConfig):
            return f"{prefix}{key}", OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        found = _group_given_a_value(section, value, f"{prefix}{key}.")
        if found is not None:
            return found
    return None
