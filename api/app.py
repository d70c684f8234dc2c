"""The ASGI application: routes, the API key, errors in each protocol's shape, health and model listing."""

from __future__ import annotations

import contextlib
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from preprocessing import tokenization

from . import megatron_routes, openai_routes, tokenizer_routes
from .chat_template import ChatTemplate
from .errors import ApiError, field_of
from .metrics import ApiMetrics
from .settings import Settings
from .triton import TritonLink

OPEN_PATHS = {"/health"}  # every other route needs the key when API_KEY is set (scrapers send it as a bearer token)


def create_app(settings: Settings, link: TritonLink | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.link = link or TritonLink(settings.triton_grpc, settings.timeout_s)
        yield
        await app.state.link.close()

    app = FastAPI(title="megatron-triton API", lifespan=lifespan)
    app.state.settings, app.state.started = settings, int(time.time())
    app.state.tokenizer = tokenization.from_env({tokenization.ENV: settings.tokenizer})
    app.state.template = ChatTemplate(settings.chat_template, app.state.tokenizer)
    metrics = ApiMetrics()

    app.add_middleware(Gate, api_key=settings.api_key, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return metrics.render()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _shaped(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):  # unknown route, unreadable body...
        return _shaped(request, ApiError(err.status_code, str(err.detail)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0]
        field = field_of(first.get("loc", ()))
        if first.get("type") == "extra_forbidden":  # named whole: 'structured_outputs.structural_tag'
            path = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            message = f"'{path}' is not a field this server knows or supports"
        elif first.get("type") in ("json_invalid", "model_attributes_type") or field is None:
            message = f"the request body is not a JSON object of this endpoint: {first.get('msg')}"
            field = None
        else:  # a field of several accepted types fails once per type: say them all
            rules = dict.fromkeys(e.get("msg") for e in errors if field_of(e.get("loc", ())) == field)
            message = f"'{field}': {'; or '.join(rules)}"
        return _shaped(request, ApiError(400, message, field))

    @app.get("/health")
    async def health(request: Request):
        ready = await request.app.state.link.ready()
        return JSONResponse({} if ready else {"message": "the ensembles are not ready"},
                            status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [_model(request.app)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        if name != settings.model_name:
            raise ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        return _model(request.app)

    app.include_router(openai_routes.router)
    app.include_router(megatron_routes.router)
    app.include_router(tokenizer_routes.router)
    return app


class Gate:
    """The API key and the request metrics, as plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would
    pass every event of a stream through a queue of its own (measured: an eighth of the API process's busy time
    at one stream)."""

    def __init__(self, app, api_key: str, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, started = scope["path"], time.perf_counter()

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.observe(path, message["status"], time.perf_counter() - started)
            await send(message)

        if self.expected is not None and path not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                                 code="invalid_api_key")
                response = error.megatron() if path == "/api" else error.openai()
                return await response(scope, receive, counted)
        await self.app(scope, receive, counted)


def _model(app: FastAPI) -> dict:
    s = app.state.settings
    return {"id": s.model_name, "object": "model", "created": app.state.started, "owned_by": "megatron-triton",
            "max_model_len": s.context}


def _shaped(request: Request, err: ApiError) -> JSONResponse:
    """Megatron's routes answer in Megatron's shape, the others in OpenAI's."""
    return err.megatron() if request.url.path == "/api" else err.openai()
