"""Every refusal in OpenAI's error shape, {"error": {"message", "type", "param", "code"}}: ``APIError`` raised
anywhere in a handler, and the app's handlers that turn FastAPI's own errors into the same shape."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param,
                                                    "code": code}}


def error_response(status: int, error: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI, counted=lambda path, status: None) -> None:
    """FastAPI's own errors (unknown route, bad query or path parameter, an unexpected exception) answered in
    OpenAI's shape too; ``counted(path, status)`` sees every APIError (the request metrics)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        counted(request.url.path, e.status)
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, {"message": str(e.detail), "type": "invalid_request_error",
                                              "param": None, "code": None}, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_parameter(request: Request, e: RequestValidationError):
        # A query or path parameter FastAPI checks itself: a 400 in OpenAI's shape (vLLM's choice), not a 422.
        err = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return error_response(400, {"message": f"{param}: {err.get('msg', 'invalid')}" if param else
                                    str(err.get("msg", "invalid request")), "type": "invalid_request_error",
                                    "param": param, "code": "invalid_value"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(500, {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                    "param": None, "code": None})
