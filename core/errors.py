"""One small error hierarchy for the service.

HTTP status codes exist only at the edge (``app/errors.py`` maps ``status`` onto responses); everything
below raises these with a message a user can act on and, where one field is at fault, its dotted path.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ServiceError):
    status, type, code = 422, "invalid_request_error", "invalid_value"


class Unauthorized(ServiceError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(ServiceError):
    status, type, code = 404, "not_found", "not_found"


class Conflict(ServiceError):
    status, type, code = 409, "conflict", "conflict"


class PayloadTooLarge(ServiceError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class RateLimited(ServiceError):
    status, type, code = 429, "rate_limit_error", "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailable(ServiceError):
    status, type, code = 503, "service_unavailable", "service_unavailable"


class GenerationFailed(ServiceError):
    """Generating one request failed (its sampling, stop check or detokenizing, or the model on its row alone);
    the other requests of its batch are unaffected."""

    status, type, code = 500, "server_error", "generation_failed"


class CorruptAdapter(ServiceError):
    """A registry entry whose files do not match its recorded sha256 (or cannot be read)."""

    status, type, code = 500, "server_error", "corrupt_adapter"
