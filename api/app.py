"""The ASGI application: routes, the API key, errors in each protocol's shape, health and model listing."""

from __future__ import annotations

import contextlib
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from preprocessing.tokenizer import Tokenizer

from . import megatron_routes, openai_routes, tokenizer_routes
from .chat_template import ChatTemplate
from .errors import ApiError, field_of
from .metrics import ApiMetrics
from .settings import Settings
from .triton import TritonLink

OPEN_PATHS = {"/health", "/metrics", "/docs", "/openapi.json"}  # the rest needs the key when API_KEY is set


def create_app(settings: Settings, link: TritonLink | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.link = link or TritonLink(settings.triton_grpc, settings.timeout_s)
        yield
        await app.state.link.close()

    app = FastAPI(title="megatron-triton API", lifespan=lifespan)
    app.state.settings, app.state.started = settings, int(time.time())
    app.state.tokenizer = Tokenizer(settings.tokenizer)
    app.state.template = ChatTemplate(settings.chat_template)
    metrics = ApiMetrics()

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if settings.api_key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                return _shaped(request, ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                                                 code="invalid_api_key"))
        return await call_next(request)

    app.middleware("http")(metrics.middleware)  # added last, so it runs first and sees the key's 401s too

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
        if first.get("type") == "extra_forbidden":
            message = f"'{field}' is not a field this server knows or supports"
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


def _model(app: FastAPI) -> dict:
    s = app.state.settings
    return {"id": s.model_name, "object": "model", "created": app.state.started, "owned_by": "megatron-triton",
            "max_model_len": s.context}


def _shaped(request: Request, err: ApiError) -> JSONResponse:
    """Megatron's routes answer in Megatron's shape, the others in OpenAI's."""
    return err.megatron() if request.url.path == "/api" else err.openai()
