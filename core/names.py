"""Adapter names: the one rule for what a registry name may be, and the names derived from it.

A name is checked once, where it enters (a request field typed ``AdapterName``, whose error names the field);
past that point it is an ``AdapterName`` and nothing checks it again. Lookups of names that cannot exist (a
generate request, ``GET /adapters/{name}``) are not errors of the request but adapters that are not there: the
registry answers 404 for them through the same type, which is also its guard against path traversal.

Derived names:
  ``name.checkpoint(step)``  the registry name of a job's published checkpoint, ``<name>-step-<n>``
  ``name.slot(sha256)``      the adapter's key inside a served or evaluated ``BoneModel``, one per version
  ``TRAINING_SLOT``          the key of the one adapter a training model holds
  ``BASE_ADAPTER``           the key that selects the base model: a batch row's slot, an evaluation's result
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from bone import config as bone_config

MAX_LENGTH = 64
# A name is one folder (or object-store prefix) of the registry: '.' and '-' may not lead (no hidden folders).
PATTERN = rf"^[a-z0-9][a-z0-9._-]{{0,{MAX_LENGTH - 1}}}$"
_NAME = re.compile(PATTERN)

# bone's name for the base model in a mixed batch; it cannot be an adapter name here: '_' may not lead.
BASE_ADAPTER = bone_config.BASE_ADAPTER
# PEFT's default adapter name. A training model holds exactly one adapter, and checkpoints are written without
# adapter names in their keys, so this key never leaves the worker.
TRAINING_SLOT = "default"

CHECKPOINT_INFIX = "-step-"
# Published checkpoints are adapters themselves, so "<name>-step-<n>" must fit MAX_LENGTH. Seven digits cover
# the default BONE_MAX_TRAIN_STEPS (2,000,000), which makes the limit 51 characters on every server with that
# default or less; a server that allows more steps lowers it so every checkpoint name still fits.
CHECKPOINT_STEP_DIGITS = 7


def is_adapter_name(value: object) -> bool:
    # fullmatch: with match, '$' would also accept one trailing newline. ".." fits the character class but
    # is never one plain path part.
    return isinstance(value, str) and _NAME.fullmatch(value) is not None and ".." not in value


def max_length_with_checkpoints(max_step: int) -> int:
    """The longest name whose checkpoint names fit for every step up to ``max_step``."""
    return MAX_LENGTH - len(CHECKPOINT_INFIX) - max(CHECKPOINT_STEP_DIGITS, len(str(max_step)))


class AdapterName(str):
    """A registry adapter name: 1 to 64 of ``a-z 0-9 . _ -``, starting with a letter or digit, never "..".

    ``AdapterName(value)`` checks (``ValueError``); as a pydantic field type it checks at validation, so a
    request model's error names the field. JSON Schema: ``maxLength`` and ``pattern``.
    """

    MAX_LENGTH: ClassVar[int] = MAX_LENGTH
    PATTERN: ClassVar[str] = PATTERN

    def __new__(cls, value: str) -> AdapterName:
        if isinstance(value, AdapterName):
            return value
        if not is_adapter_name(value):
            raise ValueError(
                f"adapter name {value!r} must match {PATTERN} (lowercase letters, digits, '.', '_', '-'; no '..')"
            )
        return super().__new__(cls, value)

    def checkpoint(self, step: int) -> AdapterName:
        """The registry name of this job's checkpoint at ``step`` (``training.publish_checkpoints``)."""
        return AdapterName(f"{self}{CHECKPOINT_INFIX}{step}")

    def slot(self, sha256: str) -> str:
        """This adapter version's key inside a ``BoneModel`` that holds many adapters (serving, evaluations).

        A plain identifier (letters, digits, '_', '-'; no '.'), which every module-dict key accepts. Names are
        lowercase, so an upper-case 'D' can stand for '.' and distinct names keep distinct slots ("a.b", "a_b"
        and "a-b" too); the sha256 prefix keeps two versions of one name apart while both are in use.
        """
        return f"a_{self.replace('.', 'D')}_{sha256[:12]}"

    # --- pydantic -----------------------------------------------------------------------------------------
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # The length bound runs first, in pydantic's own code, so a megabyte string never reaches the regex.
        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(max_length=MAX_LENGTH), serialization=core_schema.to_string_ser_schema()
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = PATTERN
        return json_schema
