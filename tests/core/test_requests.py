"""The shared base of request bodies (core/requests.py): finite floats, bounded and valid strings, and every
JSON body of every route built on it, so a new field or route cannot forget the rule."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

import app.routes
from core.requests import MAX_STRING_CHARS, RequestModel


def json_body_models() -> list[tuple[str, type]]:
    found = []
    for info in pkgutil.iter_modules(app.routes.__path__):
        module = importlib.import_module(f"app.routes.{info.name}")
        for route in module.router.routes:
            if isinstance(route, APIRoute):
                for param in route.dependant.body_params:
                    annotation = param.field_info.annotation
                    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
                        found.append((route.path, annotation))
    return found


def nested_models(model: type[BaseModel], seen: set | None = None) -> set[type[BaseModel]]:
    """``model`` and every model its fields hold (lists, unions, dicts of models included)."""
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if inspect.isclass(tp) and issubclass(tp, BaseModel):
                nested_models(tp, seen)
            stack.extend(getattr(tp, "__args__", ()) or ())
    return seen


def test_every_json_body_of_every_route_is_a_request_model():
    bodies = json_body_models()
    assert {path for path, _ in bodies} >= {
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/jobs",
        "/evals",
        "/adapters/{name}/compose",
    }
    names = {inner.__name__ for _, model in bodies for inner in nested_models(model)}
    assert {
        "ChatMessage",
        "RecordsDataset",
        "HFDataset",
        "TrainingSpec",
        "BoneSpec",
    } <= names  # the walk reaches inside
    for path, model in bodies:
        for inner in nested_models(model):
            assert issubclass(inner, RequestModel), f"{path}: {inner.__name__} is not a core.requests.RequestModel"


class Sample(RequestModel):
    x: float = 0.0
    weights: dict[str, float] = {}
    name: str = ""


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"x": 1e309}', "x"),
        ('{"x": -1e309}', "x"),
        ('{"x": NaN}', "x"),
        ('{"x": Infinity}', "x"),
        ('{"weights": {"a": 1e400}}', "weights"),
        ('{"name": "a\\udfffb"}', "name"),
    ],
)
def test_non_finite_floats_and_broken_strings_are_refused(raw, field):
    with pytest.raises(ValidationError) as refused:
        Sample.model_validate(json.loads(raw))
    assert refused.value.errors()[0]["loc"][0] == field


def test_strings_are_bounded_unless_a_field_says_otherwise():
    Sample(name="n" * MAX_STRING_CHARS)
    with pytest.raises(ValidationError):
        Sample(name="n" * (MAX_STRING_CHARS + 1))
    with pytest.raises(ValidationError):
        Sample(weights={"k" * (MAX_STRING_CHARS + 1): 1.0})
