"""Configuration as data: dataclasses with defaults in code, TOML presets, ``--set`` overrides.

Order of precedence (later wins): defaults in the dataclasses of :mod:`privenc.schema`, a
TOML file or a preset shipped in ``privenc/presets/``, then ``--set section.key=value`` flags.
Unknown sections and keys, wrong types and invalid values raise :class:`ConfigError`, which
names the key and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from privenc.errors import ConfigError
from privenc.schema import (  # noqa: F401  (re-exported: the config's public names)
    ATTACKERS,
    ENCODER_LOSSES,
    NORMS,
    PLACES_GROUPS,
    POOLS,
    SECTIONS,
    SOURCES,
    ClassifierConfig,
    Config,
    DataConfig,
    EncoderConfig,
    TrainConfig,
    VerifyConfig,
    dump_toml,
    validate,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


# --------------------------------------------------------------------------- presets and files


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``section.key: old -> new`` for every value of ``new`` (a ``Config.to_dict()``) that
    ``old`` holds differently; ``ignore`` names keys that may differ. A key ``old`` lacks (a
    run from before the key existed) counts as its default, which keeps the earlier behaviour."""
    defaults = Config().to_dict()

    def before(section: str, key: str) -> Any:
        return old.get(section, {}).get(key, defaults.get(section, {}).get(key))

    return [f"{section}.{key}: {before(section, key)!r} -> {value!r}"
            for section, values in new.items() for key, value in values.items()
            if f"{section}.{key}" not in ignore and before(section, key) != value]


def preset_names() -> list[str]:
    files = resources.files("privenc").joinpath("presets").iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def _read_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from None


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then a preset name or TOML file, then ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if source:
        path = Path(source)
        # A folder is never a config file: `--config demo` run beside a folder named demo (an
        # output folder, say) still means the preset.
        if path.is_file() or (path.suffix == ".toml" and not path.is_dir()):
            if not path.is_file():
                raise ConfigError(f"config file {source!r} does not exist")
            raw = _read_toml(path.read_text(), str(path))
        elif path.is_dir() and source not in preset_names():
            raise ConfigError(f"config {source!r} is a folder, not a TOML file; presets: {', '.join(preset_names())}")
        elif source in preset_names():
            text = resources.files("privenc").joinpath("presets", f"{source}.toml").read_text()
            raw = _read_toml(text, f"preset {source!r}")
        else:
            raise ConfigError(
                f"{source!r} is neither a TOML file nor a preset; presets: {', '.join(preset_names())}"
            )
    for item in overrides:
        _apply_override(raw, item)
    try:
        return from_dict(raw)
    except ConfigError as err:
        if source and source not in preset_names():  # a file: say which (a run's config.toml, say)
            raise ConfigError(f"{source}{' with the --set values' if overrides else ''}: {err}") from None
        raise


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The demo preset, which commands given no --config fall back to. Its tasks are synthetic
    category names: when ``overrides`` point the data at another source they are dropped, unless
    the overrides name them too, so that only tasks the user chose reach that source."""
    config = load_config("demo", overrides)
    if config.data.source != "synthetic":
        named = {item.partition("=")[0].strip() for item in overrides}
        for key in ("train.private", "train.desirable", "verify.tasks"):
            if key not in named:
                section, _, name = key.partition(".")
                setattr(getattr(config, section), name, [])
    return config


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.iters=500")
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    raw.setdefault(section, {})[name] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """Values are TOML literals (``3``, ``1e-4``, ``true``, ``[1, 2]``, ``"x"``); anything that
    is not a TOML literal is taken as a bare string (``train.private=army_base``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_dict(raw: dict[str, Any]) -> Config:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys, got {type(values).__name__}")
        sections[name] = build_section(name, cls, values)
    config = Config(**sections)
    validate(config)
    return config


def build_section(section: str, cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(names)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        if isinstance(value, str) and args[0] is str:
            return [value]  # --set train.private=army_base means the one-element list
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    else:  # pragma: no cover - a new field type that this function does not know yet
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise ConfigError(f"{key} must be of type {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is None:
        return hint.__name__
    args = ", ".join(_type_name(a) for a in typing.get_args(hint))
    return f"{origin.__name__}[{args}]"


