"""One error path: serving code raises these; build_app turns them into OpenAI's error shape."""

from __future__ import annotations


class ObliviateError(Exception):
    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequest(ObliviateError):
    pass


class UnknownProfile(ObliviateError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"unknown profile {name!r}; known profiles: {', '.join(sorted(known))}", param="profile",
            code="profile_not_found")


class UnknownModel(ObliviateError):
    status_code = 404
    type = "not_found_error"

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"the model {name!r} does not exist; served: {', '.join(known)}", param="model",
            code="model_not_found")


class Unauthorized(ObliviateError):
    status_code = 401
    type = "authentication_error"


class EngineFailure(ObliviateError):
    status_code = 500
    type = "server_error"


class CLIError(Exception):
    """A bad command line or input file: printed as one line, exit status 2."""
