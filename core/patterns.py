"""User-supplied module regexes (``bone.target_modules`` / ``exclude_modules`` as a string, in a job or in an
imported adapter_config.json): accepted only if RE2 compiles them.

RE2 matches in time linear in the input and refuses the constructs that make Python's ``re`` backtrack
exponentially (look-around, back-references), so no pattern can freeze a process that matches it against
module names. The bone library then matches with RE2 too (bone/targets.py). Bounded also in length and in the
memory RE2 may compile them into.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import re2

from core.errors import InvalidRequest

MAX_PATTERN_CHARS = 2048
_RE2_MAX_MEM = 8 << 20  # bytes of compiled program: far beyond any module-name regex
REGEX_FIELDS = ("target_modules", "exclude_modules")


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the caller's 422, not a line on the server's stderr
    options.max_mem = _RE2_MAX_MEM
    return options


def check_pattern(pattern: str) -> str:
    """Raise ValueError (one line, for a 422) unless ``pattern`` is a bounded RE2 regex."""
    _check(pattern)  # cached: every stored job's Bone config is checked again each time it is read
    return pattern


@lru_cache(maxsize=1024)
def _check(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a module regex may have at most {MAX_PATTERN_CHARS} characters, got {len(pattern)}")
    try:
        re2.compile(pattern, _options())
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(
            f"module regex {pattern[:80]!r} is not supported: {detail} (RE2 syntax: matching in "
            "linear time, so no look-around and no back-references)"
        ) from None


def check_config_patterns(config: dict[str, Any], *, param: str) -> None:
    """The regex fields of a raw adapter_config.json, before anything matches them."""
    for field in REGEX_FIELDS:
        value = config.get(field)
        if isinstance(value, str):
            try:
                check_pattern(value)
            except ValueError as exc:
                raise InvalidRequest(
                    f"adapter_config.json {field}: {exc}", param=param, code="invalid_bone_config"
                ) from None
