"""Request-body examples for /openapi.json (and /docs' "Try it out"): the README's walk-through calls, written
once per operation as OpenAPI Example Objects on the JSON media type.

They live here rather than on the request models because several models belong to ``core`` (jobs, evaluations)
and one model serves more than one kind of call (train on inline rows vs an uploaded file). Every example is
one this server accepts: tests/app/test_openapi_examples.py posts each to a live server (after publishing the
adapters they name) and expects success, except where it names something only a real deployment has (an
uploaded file's id). schemathesis mixes them into its generated bodies, so the fuzz test's stateful phase
creates jobs to follow far more often than from random bodies alone.
"""

from __future__ import annotations

from typing import Any

from core.settings import Settings

# The adapter names the examples use (the README's walk-through trains both).
EXAMPLE_ADAPTERS = ("capitals", "chatty")
EXAMPLE_FILE_ID = "file-3f2a9c0d41b84e7aa5c1e2d0"  # an id as POST /files answers one (core.files)

_ROWS = [
    {"prompt": "Q: capital of France?\nA:", "completion": " Paris."},
    {"prompt": "Q: capital of Japan?\nA:", "completion": " Tokyo."},
    {"prompt": "Q: capital of Kenya?\nA:", "completion": " Nairobi."},
]
_CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "A tiny bot."}]},
]


def _example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


def request_examples(settings: Settings) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(method, path) -> {example name: Example Object}. ``settings`` gives the base model's name, which the
    OpenAI-compatible routes take as ``model`` for the base model itself."""
    base = settings.base_model
    capitals, chatty = EXAMPLE_ADAPTERS
    return {
        ("post", "/jobs"): {
            "inline_rows": _example(
                "Train on rows sent inline (prompt/completion)",
                {
                    "adapter_name": capitals,
                    "dataset": {"records": _ROWS},
                    "bone": {"r": 8},
                    "training": {"max_steps": 150, "learning_rate": 0.002},
                },
            ),
            "chat_rows": _example(
                "Train a chat adapter on inline messages rows, Bat blocks, checkpoints every 50 steps",
                {
                    "adapter_name": chatty,
                    "dataset": {"records": _CHAT_ROWS, "format": "messages"},
                    "bone": {"r": 8, "init_weights": "bat"},
                    "training": {"max_steps": 200, "learning_rate": 0.02, "save_every": 50},
                    "overwrite": True,
                },
            ),
            "uploaded_file": _example(
                "Train on a file uploaded with POST /files (its answer's `id`)",
                {
                    "adapter_name": chatty,
                    "dataset": {"file_id": EXAMPLE_FILE_ID},
                    "bone": {"r": 8},
                    "training": {"max_steps": 200, "learning_rate": 0.02, "batch_size": 6},
                },
            ),
        },
        ("post", "/evals"): {
            "inline_rows": _example(
                "Score an adapter against the base model on inline rows",
                {"adapters": [capitals], "dataset": {"records": _ROWS}, "max_new_tokens": 16},
            ),
        },
        ("post", "/adapters/{name}/compose"): {
            "weighted_sum": _example(
                "Publish 0.7 x capitals + 0.3 x chatty under the path's name (exact, no training)",
                {"adapters": {capitals: 0.7, chatty: 0.3}},
            ),
        },
        ("post", "/generate"): {
            "adapter": _example(
                "Greedy completion with an adapter",
                {"adapter": capitals, "prompt": "Q: capital of France?\nA:", "max_new_tokens": 16, "temperature": 0},
            ),
            "base_model": _example(
                "Sampled completion from the base model (adapter null), reproducible by seed, stopping at a newline",
                {
                    "adapter": None,
                    "prompt": "Once upon a time",
                    "max_new_tokens": 32,
                    "temperature": 0.8,
                    "top_p": 0.95,
                    "seed": 7,
                    "stop": ["\n"],
                },
            ),
            "mix": _example(
                "A weighted sum of two adapters, served without publishing it",
                {"adapters": {capitals: 0.7, chatty: 0.3}, "prompt": "Q: capital of Japan?\nA:", "max_new_tokens": 16},
            ),
        },
        ("post", "/v1/completions"): {
            "adapter": _example(
                "Completion with an adapter as the model",
                {"model": capitals, "prompt": "Q: capital of France?\nA:", "max_tokens": 16, "temperature": 0},
            ),
            "score_prompt": _example(
                "Score a prompt without generating (lm-evaluation-harness' loglikelihood)",
                {
                    "model": base,
                    "prompt": "Q: capital of France?\nA: Paris.",
                    "max_tokens": 0,
                    "echo": True,
                    "logprobs": 1,
                },
            ),
        },
        ("post", "/v1/chat/completions"): {
            "adapter": _example(
                "Chat with an adapter as the model",
                {
                    "model": chatty,
                    "messages": [{"role": "user", "content": "who are you?"}],
                    "max_tokens": 32,
                    "temperature": 0,
                },
            ),
            "base_model": _example(
                "Chat with the base model, two samples with log-probabilities",
                {
                    "model": base,
                    "messages": [
                        {"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "What is the capital of Kenya?"},
                    ],
                    "max_tokens": 8,
                    "n": 2,
                    "seed": 7,
                    "logprobs": True,
                    "top_logprobs": 2,
                },
            ),
        },
    }


def add_request_examples(schema: dict[str, Any], settings: Settings) -> None:
    """Put the examples on their operations' JSON request bodies (an operation that is gone is skipped)."""
    paths = schema.get("paths", {})
    for (method, path), examples in request_examples(settings).items():
        media = paths.get(path, {}).get(method, {}).get("requestBody", {}).get("content", {}).get("application/json")
        if media is not None:
            media["examples"] = examples
