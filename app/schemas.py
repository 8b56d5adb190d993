"""Response envelopes several routes share, so /openapi.json documents their bodies instead of a free-form object.

They describe what the routes already send (OpenAI's shapes): ``{"object": "list", "data": [...],
"has_more": ...}`` and ``{"id": ..., "object": ..., "deleted": true}``. Item models live next to their routes.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list that takes ``limit`` and ``after``; subclass it per item type (``class JobList(Page[Job])``)
    so the schema gets a readable name."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = Field(description="another page follows: ask again with `after` = the last id of this one")


class Listing(Page[T], Generic[T]):
    """A list answered whole, in the same envelope."""

    has_more: bool = Field(False, description="always false: the whole list is in `data`")


class Deleted(BaseModel):
    """What a DELETE answers; subclasses pin ``object`` to the kind of thing deleted."""

    id: str
    object: str
    deleted: Literal[True] = True
