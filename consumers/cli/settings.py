"""Resolve `ConsumerSettings`: defaults < TOML file < environment < command line."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

import msgspec

from schemas import ConfigError
from schemas.config import ConsumerSettings

__all__ = ["load_settings", "parse_topic_map"]

ENV_PREFIX = "TALLY_"


def parse_topic_map(items: list[str] | str) -> dict[str, str]:
    """``["scores=pg.public.scores", ...]`` or ``"a=x,b=y"`` → {table: topic}."""
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    out = {}
    for item in items:
        table, sep, topic = item.partition("=")
        if not sep or not table.strip() or not topic.strip():
            raise ConfigError(f"--topic takes TABLE=TOPIC (e.g. scores=pg.public.scores), got {item!r}")
        out[table.strip()] = topic.strip()
    return out


def _from_toml(path: str | None) -> dict[str, Any]:
    if path is None:
        path = os.environ.get(ENV_PREFIX + "CONFIG")
        if path is None:
            if not os.path.exists("tally.toml"):
                return {}
            path = "tally.toml"
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
    section = doc.get("consume", doc)
    return {k.replace("-", "_"): v for k, v in section.items() if not isinstance(v, dict) or k == "topics"}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ConsumerSettings.__struct_fields__:
        v = env.get(ENV_PREFIX + name.upper())
        if v is None:
            continue
        out[name] = parse_topic_map(v) if name == "topics" else v
    return out


def load_settings(
    cli: Mapping[str, Any], config_path: str | None = None, env: Mapping[str, str] | None = None
) -> ConsumerSettings:
    """Merge the layers; ``cli`` holds only the flags the user actually gave."""
    merged: dict[str, Any] = {}
    merged.update(_from_toml(config_path))
    merged.update(_from_env(os.environ if env is None else env))
    merged.update({k: v for k, v in cli.items() if v is not None})
    if isinstance(merged.get("http"), str) and merged["http"].lower() in ("", "none", "off", "no"):
        merged["http"] = None
    try:
        return msgspec.convert(merged, ConsumerSettings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid setting: {e}") from None
