"""One error path: serving code raises these; build_app turns them into OpenAI's error shape."""

from __future__ import annotations


class ObliviateError(Exception):
    status_code = 400
    type = "invalid_request_error"
    rejection = True  # refused before any generation (counted as rejected); False: failed while generating

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.headers = {"Retry-After": str(retry_after)} if retry_after else {}

    @property
    def reason(self) -> str:
        """A short label for metrics."""
        return self.code or self.type


def shown(name: str, limit: int = 64) -> str:
    """A client-given name as quoted in an error: never echoed whole."""
    return repr(name if len(name) <= limit else name[:limit] + "…")


class InvalidRequest(ObliviateError):
    pass


class UnknownProfile(ObliviateError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"unknown profile {shown(name)}; known profiles: {', '.join(sorted(known))}", param="profile",
            code="profile_not_found")


class UnknownModel(ObliviateError):
    status_code = 404
    type = "not_found_error"

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"the model {shown(name)} does not exist; served: {', '.join(known)}", param="model",
            code="model_not_found")


class Unauthorized(ObliviateError):
    status_code = 401
    type = "authentication_error"


class Forbidden(ObliviateError):
    status_code = 403
    type = "permission_error"


class NotFound(ObliviateError):
    status_code = 404
    type = "not_found_error"


class Conflict(ObliviateError):
    status_code = 409
    type = "invalid_request_error"


class PayloadTooLarge(ObliviateError):
    status_code = 413

    def __init__(self, limit: int):
        super().__init__(f"request body larger than {limit} bytes (the server's --max-body-bytes)",
                         code="request_too_large")


class Overloaded(ObliviateError):
    """The waiting queue is full: try again after `retry_after` seconds."""
    status_code = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, code="overloaded", retry_after=retry_after)


class Unavailable(ObliviateError):
    status_code = 503
    type = "server_error"

    def __init__(self, message: str):
        super().__init__(message, code="unavailable", retry_after=10)


class RequestTimeout(ObliviateError):
    status_code = 504
    type = "timeout_error"
    rejection = False

    def __init__(self, seconds: float):
        super().__init__(f"the request did not finish within {seconds:g} s (the server's --request-timeout)",
                         code="request_timeout")


class EngineFailure(ObliviateError):
    status_code = 500
    type = "server_error"
    rejection = False


class CLIError(Exception):
    """A bad command line or input file: printed as one line, exit status 2."""
