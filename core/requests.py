"""The base of every API request body: what no field of any request may carry, said once.

Request models (``/generate``, the OpenAI routes, jobs, evaluations, compose) derive from ``RequestModel``
instead of pydantic's ``BaseModel``, so a new field gets these bounds without a line of its own:

- every float is finite: JSON that parses as ``inf`` (``1e309``) or a ``NaN`` literal is a 422 naming the
  field (``allow_inf_nan=False``); a stored record therefore always validates again when read back;
- every string is at most ``MAX_STRING_CHARS`` characters (dictionary keys included) unless the field states
  its own bound (a prompt is bounded by the server's token limit, see ``app.routes.generate``);
- every string is valid Unicode: a lone surrogate (``"\\udfff"`` in JSON) is refused by pydantic itself.

Fields typed ``Any`` (inline training records, OpenAI's content parts) are not strings to pydantic: their
routes bound them where they read them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Names, paths, patterns, stop strings, roles: generous, never unbounded, and small enough that a string just
# over it still fits a modest body bound (a 422 naming the field, not a 413 for the whole body).
MAX_STRING_CHARS = 4096


class RequestModel(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, str_max_length=MAX_STRING_CHARS)


SEED_BOUND = (
    2**63
)  # seeds are 0 <= seed < 2**63 (torch takes 64-bit seeds; JSON clients lose precision above 2**53 anyway)
