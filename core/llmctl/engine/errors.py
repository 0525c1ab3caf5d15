"""Errors the engine raises to its callers."""


class EngineDeadError(RuntimeError):
    """The engine loop has died; every in-flight and future request fails with this."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (its own fault or an isolated kernel error); others go on."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id = request_id
        self.message = message
