"""YAML loading for the typed config schema, with errors that name the file and the offending field."""

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

SchemaT = TypeVar("SchemaT", bound=BaseModel)


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


def load_config(schema: type[SchemaT], path: str | Path) -> SchemaT:
    """Read a YAML file into a validated instance of `schema`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file ({error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return validate_config(schema, data, str(path))
