"""The errors r1serve raises about a request, typed so that every layer can tell what was wrong without reading
a message: the field (`param`) and a machine-readable `code`, as OpenAI's error body carries them.

`InvalidRequestError` is a `ValueError`, so library users who catch `ValueError` keep working; the server maps
it to a 400 with its `param` and `code`. `EngineDeadError` says the engine is gone for good: the server answers
503 and exits so that its supervisor restarts it. This module imports nothing, so that the client side, the
server and the engine can all use it.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given; `param` names the field, `code` the kind of problem."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineDeadError(RuntimeError):
    """The engine stopped for good (its process died, or the device failed); nothing more will be served."""
