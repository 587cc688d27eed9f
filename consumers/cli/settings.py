"""The one settings layer of every `tally` command: flag > environment > TOML file > default.

A command's settings are a Struct of `tally.schemas.config` (the defaults live there, once).
`load` resolves one:

1. flags the user gave (``None`` = not given),
2. ``TALLY_<FIELD>`` environment variables (empty = unset),
3. the TOML file — ``--config FILE``, else ``$TALLY_CONFIG``, else ``./tally.toml`` when it
   exists — its ``[COMMAND]`` section over its top-level keys,
4. the Struct's defaults.

Top-level keys are shared: each applies to every command with a setting of that name
(``data_dir``, ``bootstrap_servers``, ``url``, ``token`` ...). A key no command knows, a key
a section's command does not have, or an unknown section is an error naming the known
ones, so a typo is never silently ignored. An invalid value names its layer (the flag, the
variable, or the file and section) in the error.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

import msgspec

from tally.schemas import ConfigError
from tally.schemas.config import COMMANDS, ConsumerSettings, Settings

__all__ = [
    "ENV_CONFIG",
    "ENV_PREFIX",
    "Layer",
    "Loaded",
    "env_name",
    "load",
    "load_settings",
    "parse_topic_map",
]

ENV_PREFIX: Final = "TALLY_"
ENV_CONFIG: Final = "TALLY_CONFIG"
DEFAULT_CONFIG_FILE: Final = "tally.toml"

Layer = Literal["flag", "env", "file", "default"]
RANK: Final[dict[Layer, int]] = {"default": 0, "file": 1, "env": 2, "flag": 3}
"""Higher wins."""

S = TypeVar("S", bound=Settings)

_OFF: Final = ("", "none", "off", "no")
_FIELD_RE: Final = re.compile(r"`\$\.(\w+)")


def env_name(field: str) -> str:
    """The environment variable of a setting: ``data_dir`` → ``TALLY_DATA_DIR``."""
    return ENV_PREFIX + field.upper()


def fields_of(kind: type[Settings]) -> tuple[str, ...]:
    return tuple(f.name for f in msgspec.structs.fields(kind))


def _all_fields() -> set[str]:
    return {f for kind in COMMANDS.values() for f in fields_of(kind)}


def parse_topic_map(items: list[str] | str) -> dict[str, str]:
    """``["scores=pg.public.scores", ...]`` or ``"a=x,b=y"`` → {table: topic}."""
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    out = {}
    for item in items:
        table, sep, topic = item.partition("=")
        if not sep or not table.strip() or not topic.strip():
            raise ConfigError(
                f"--topic takes TABLE=TOPIC (e.g. scores=pg.public.scores), got {item!r}"
            )
        out[table.strip()] = topic.strip()
    return out


@dataclass(frozen=True)
class Loaded(Generic[S]):
    """Resolved settings, and the layer each value came from."""

    settings: S
    origin: Mapping[str, Layer]
    config_file: str | None
    """The TOML file read, if any."""

    def rank(self, field: str) -> int:
        """How strong the layer of ``field`` is (flag 3 > env 2 > file 1 > default 0)."""
        return RANK[self.origin.get(field, "default")]


def _config_path(path: str | None, env: Mapping[str, str]) -> str | None:
    if path:
        return path
    path = env.get(ENV_CONFIG) or None
    if path:
        return path
    return DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None


def _read_toml(path: str, kind: type[Settings]) -> dict[str, Any]:
    """The keys of the file that apply to ``kind``'s command (its section over top level)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
    shared = _all_fields()
    own = set(fields_of(kind))
    top: dict[str, Any] = {}
    section: dict[str, Any] = {}
    for raw_key, value in doc.items():
        key = raw_key.replace("-", "_")
        if key in COMMANDS:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config file {path!r}: {raw_key!r} names a command: write its settings "
                    f"in a [{key}] section"
                )
            _check_section(path, key, value)
            if key == kind.command:
                section = {k.replace("-", "_"): v for k, v in value.items()}
        elif key in shared:
            if key in own:
                top[key] = value
        else:
            raise ConfigError(
                f"config file {path!r}: unknown setting {raw_key!r} (sections: "
                f"{', '.join(f'[{c}]' for c in COMMANDS)}; settings: {', '.join(sorted(shared))})"
            )
    return {**top, **section}


def _check_section(path: str, command: str, table: Mapping[str, Any]) -> None:
    known = fields_of(COMMANDS[command])
    for raw_key in table:
        if raw_key.replace("-", "_") not in known:
            raise ConfigError(
                f"config file {path!r}: [{command}] has no setting {raw_key!r} "
                f"(its settings: {', '.join(known)})"
            )


def _from_env(kind: type[Settings], env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in fields_of(kind):
        value = env.get(env_name(name))
        if value is None or (value == "" and name != "http"):
            continue
        out[name] = parse_topic_map(value) if name == "topics" else value
    return out


def _where(field: str, origin: Layer, path: str | None, command: str) -> str:
    if origin == "flag":
        return f"--{field.replace('_', '-')}"
    if origin == "env":
        return env_name(field)
    if origin == "file":
        return f"{path} ({field!r} at top level or in [{command}])"
    return "the default"


def load(
    kind: type[S],
    flags: Mapping[str, Any],
    config_path: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Loaded[S]:
    """Resolve ``kind``'s settings; ``flags`` holds only the flags the user gave (None = not)."""
    env = os.environ if env is None else env
    path = _config_path(config_path, env)
    layers: list[tuple[Layer, dict[str, Any]]] = [
        ("file", _read_toml(path, kind) if path else {}),
        ("env", _from_env(kind, env)),
        ("flag", {k: v for k, v in flags.items() if v is not None}),
    ]
    merged: dict[str, Any] = {}
    origin: dict[str, Layer] = {}
    for layer, values in layers:
        for k, v in values.items():
            merged[k] = v
            origin[k] = layer
    if isinstance(merged.get("http"), str) and merged["http"].strip().lower() in _OFF:
        merged["http"] = None
    try:
        settings = msgspec.convert(merged, kind, strict=False)
    except msgspec.ValidationError as e:
        m = _FIELD_RE.search(str(e))
        src = ""
        if m is not None and m.group(1) in origin:
            src = f" (from {_where(m.group(1), origin[m.group(1)], path, kind.command)})"
        raise ConfigError(f"invalid setting: {e}{src}") from None
    return Loaded(settings, origin, path)


def load_settings(
    cli: Mapping[str, Any], config_path: str | None = None, env: Mapping[str, str] | None = None
) -> ConsumerSettings:
    """`tally consume`'s settings (``cli``: the flags given); see `load`."""
    return load(ConsumerSettings, cli, config_path, env).settings
