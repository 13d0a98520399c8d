"""Names that reach the filesystem or the database: adapter ids, base model ids, file names.

Blobs are addressed by sha256, never by a client-chosen name, so these checks are the first of
two walls against path traversal: a name that could mean a path (``/``, ``..``, NUL, absolute,
over-long) is refused before anything is written.
"""

from __future__ import annotations

import re

from loraserve.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_ADAPTER_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
# Hub-style names such as "meta-llama/Llama-2-7b-hf" are allowed; they never become paths.
_BASE_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/=-]{0,127}")


def check_adapter_id(value: str, field: str = "adapter_id") -> str:
    """``[a-z0-9][a-z0-9._-]{0,127}`` without ``..``."""
    if not value:
        raise InvalidArgument.field(field, "is required")
    if not _ADAPTER_ID.fullmatch(value) or ".." in value:
        raise InvalidArgument.field(
            field,
            f"{_shown(value)} is not a valid adapter id: use 1-128 characters of "
            "[a-z0-9._-], starting with a letter or digit, without '..'",
        )
    return value


def check_base_model_id(value: str, field: str = "base_model") -> str:
    if not value:
        raise InvalidArgument.field(field, "is required")
    if not _BASE_MODEL_ID.fullmatch(value) or ".." in value or "//" in value or value.endswith("/"):
        raise InvalidArgument.field(
            field,
            f"{_shown(value)} is not a valid base model id: use 1-256 characters of "
            "[A-Za-z0-9._/-], without '..' or empty path segments",
        )
    return value


def check_file_name(value: str, field: str = "file_name") -> str:
    """Only the two PEFT files; a pickle checkpoint is refused with its own message."""
    if value in ADAPTER_FILES:
        return value
    if value.lower().endswith(PICKLE_SUFFIXES) and "/" not in value and "\x00" not in value:
        raise InvalidArgument.field(
            field,
            f"{_shown(value)}: pickle checkpoints are refused (loading one can run arbitrary "
            f"code); save the adapter with safetensors ({WEIGHTS_FILE})",
        )
    raise InvalidArgument.field(
        field, f"{_shown(value)} is not an adapter file; expected one of {', '.join(ADAPTER_FILES)}"
    )


def check_tag(value: str, field: str = "tags") -> str:
    if not _TAG.fullmatch(value):
        raise InvalidArgument.field(
            field, f"{_shown(value)} is not a valid tag: 1-128 characters of [A-Za-z0-9._:/=-]"
        )
    return value


def check_domain(value: str, field: str = "domain") -> str:
    if value and not _TAG.fullmatch(value):
        raise InvalidArgument.field(
            field, f"{_shown(value)} is not a valid domain: 1-128 characters of [A-Za-z0-9._:/=-]"
        )
    return value


def _shown(value: str, limit: int = 64) -> str:
    """A name as it may appear in an error message: escaped and cut short."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)
