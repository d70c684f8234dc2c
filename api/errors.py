"""Errors in each protocol's own shape: OpenAI's ``{"error": {...}}`` and Megatron's ``{"message": ...}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from .triton import TritonError

# The ensemble's input names as each API calls them, for errors that name the field the client sent.
OPENAI_FIELDS = {"text_input": "prompt", "min_length": "min_tokens", "end_id": "ignore_eos", "stop_words": "stop"}
MEGATRON_FIELDS = {"text_input": "prompts", "max_tokens": "tokens_to_generate", "seed": "random_seed"}


class ApiError(Exception):
    """A request the API refuses or could not serve; ``param`` names the request field at fault."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             503: "service_unavailable", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        """OpenAI's error type for this status."""
        return self.TYPES.get(self.status) or ("invalid_request_error" if self.status < 500 else "server_error")

    def openai(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind,
                "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)

    def megatron(self) -> JSONResponse:
        return JSONResponse({"message": self.message}, status_code=self.status)

    @classmethod
    def from_triton(cls, err: TritonError, fields: dict[str, str]) -> ApiError:
        """A Triton error as the API reports it: a client's mistake is a 400 naming the field it sent."""
        if err.client_error:
            field = fields.get(err.field, err.field) if err.field else None
            message = err.message[err.message.find("invalid input"):]  # not "in ensemble 'ensemble', "
            if err.field and field != err.field:  # say it in the client's words, keep the ensemble's rule
                message = message.replace(f"'{err.field}'", f"'{field}'", 1)
            return cls(400, message, field)
        if err.unavailable:
            return cls(503, err.message, code="unavailable")
        return cls(500, err.message)


def field_of(location) -> str | None:
    """The top-level request field a validation error points at (pydantic's ``loc`` after ``body``), as
    OpenAI's ``param`` names it."""
    parts = [p for p in location if p != "body"]
    return str(parts[0]) if parts else None
