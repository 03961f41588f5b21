"""What `service.core` refuses, answered over HTTP: the same status everywhere, in the shape of
the surface that was asked (the native API's `detail`, or OpenAI's `error` object under
`/openai/`)."""

from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException

from jobs.common.spec import SpecError
from service.core.errors import Conflict, Exists, NotFound, TooManyJobs
from service.core.serving import ServingUnavailable
from service.ray_jobs import RayUnavailable, UnknownToRay

OPENAI_PREFIX = "/openai/"


def answer(request: Request, code: int, detail: str | dict, headers: dict[str, str] | None = None) -> JSONResponse:
    if request.url.path.startswith(OPENAI_PREFIX):
        problems = detail.get("problems", []) if isinstance(detail, dict) else [detail]
        param = problems[0].split(":", 1)[0] if isinstance(detail, dict) and problems else None
        kind = {404: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error"}.get(
            code, "invalid_request_error")
        body = {"error": {"message": "; ".join(problems), "type": kind, "param": param,
                          "code": {404: "not_found", 409: "conflict", 429: "rate_limit_exceeded"}.get(code)}}
    else:
        body = {"detail": detail}
    return JSONResponse(body, status_code=code, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return answer(request, error.status_code, error.detail, headers=error.headers)

    @app.exception_handler(SpecError)
    async def invalid_spec(request: Request, error: SpecError) -> JSONResponse:
        return answer(request, status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": error.problems})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's own 422s (body, query, headers) in the same shape as spec problems."""
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return answer(request, status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": problems})

    @app.exception_handler(Conflict)
    async def reused_key(request: Request, error: Conflict) -> JSONResponse:
        return answer(request, status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": [f"Idempotency-Key: {error}"]})

    @app.exception_handler(Exists)
    async def exists(request: Request, error: Exists) -> JSONResponse:
        return answer(request, status.HTTP_409_CONFLICT, str(error))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, error: NotFound) -> JSONResponse:
        return answer(request, status.HTTP_404_NOT_FOUND, str(error))

    @app.exception_handler(UnknownToRay)
    async def forgotten_by_ray(request: Request, error: UnknownToRay) -> JSONResponse:
        return answer(request, status.HTTP_404_NOT_FOUND, "Ray no longer has this job's logs")

    @app.exception_handler(TooManyJobs)
    async def too_many(request: Request, error: TooManyJobs) -> JSONResponse:
        return answer(request, status.HTTP_429_TOO_MANY_REQUESTS, str(error),
                      headers={"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(RayUnavailable)
    async def ray_unavailable(request: Request, error: RayUnavailable) -> JSONResponse:
        return answer(request, status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray unreachable: {error}")

    @app.exception_handler(ServingUnavailable)
    async def serving_unavailable(request: Request, error: ServingUnavailable) -> JSONResponse:
        return answer(request, status.HTTP_503_SERVICE_UNAVAILABLE, str(error), headers={"Retry-After": "10"})

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, error: OperationalError) -> JSONResponse:
        """The database is down: say so, and lose nothing."""
        return answer(request, status.HTTP_503_SERVICE_UNAVAILABLE, "database unavailable", headers={"Retry-After": "5"})
