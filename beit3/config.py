"""YAML loading for the typed config schema, with errors that name the file and the offending field."""

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

SchemaT = TypeVar("SchemaT", bound=BaseModel)

MAX_CONFIG_BYTES = 1 << 20
"""Configs are written by hand and take a few KB: a larger file is refused before it is parsed."""


class ConfigError(ValueError):
    """A config file that cannot be read or does not satisfy its schema."""


def _describe(error: ValidationError, prefix: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        lines.append(f"  {field}: {message}" if field else f"  {message}")
    return "\n".join(lines)


def validate_config(schema: type[SchemaT], data: object, source: str, prefix: str = "") -> SchemaT:
    """Validate plain data against a schema; the error names the source and each bad field."""
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid config\n{_describe(error, prefix)}") from None


class _AliasUsed(Exception):
    """Raised by the loader, which does not know the file, at the first alias; reported with the file's name."""

    def __init__(self, anchor: str, line: int):
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line


class _AliasFreeLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: each `*name` repeats its anchor's value, and aliases of aliases grow
    exponentially (a 1 KB file can stand for gigabytes once validation copies it), so configs spell values out."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasUsed(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def read_config_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML config, read with its size bounded and aliases refused."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            content = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file ({error})") from None
    if len(content) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than {MAX_CONFIG_BYTES:,} bytes")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: cannot read config file ({error})") from None
    try:
        data = yaml.load(text, Loader=_AliasFreeLoader)
    except _AliasUsed as alias:
        raise ConfigError(f"{path}: line {alias.line}: YAML aliases (*{alias.anchor}) are not allowed in configs; "
                          "write the value out") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


def load_config(schema: type[SchemaT], path: str | Path) -> SchemaT:
    """Read a YAML file into a validated instance of `schema`."""
    return validate_config(schema, read_config_mapping(path), str(path))
