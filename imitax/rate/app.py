"""The rating web app: rater pages, the admin page and a JSON API, on FastAPI with Jinja2 templates.

A rater's secret link is ``/r/TOKEN``: instructions first, then one item at a time (prompt, answer
A beside answer B, three choices, an optional reason, keyboard shortcuts, a progress bar). The
item shown is whatever the database says the rater is on, so a reload or a lost connection
resumes there. Pages never carry system names or anyone else's judgments.

Security:
- Model answers are Markdown rendered by markdown-it-py with raw HTML off, then sanitized by nh3
  (an allow-list HTML sanitizer), and the Content-Security-Policy allows only this server's own
  script file: an answer holding ``<script>`` or an ``onerror`` attribute runs nothing.
- Every state-changing form carries a CSRF token: an HMAC, under a key kept in the database, of a
  random per-browser session cookie (SameSite=Strict, HttpOnly), checked server-side.
- The JSON API authenticates with ``Authorization: Bearer TOKEN`` and reads no cookies, so a
  cross-site page cannot make a browser send a rater's credentials to it: it needs no CSRF token.
- Bodies over ``MAX_BODY`` bytes are refused with 413 before they are read.
- SQL goes through SQLAlchemy's bound parameters only (imitax.rate.store).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import secrets
from typing import Literal

import markdown_it
import nh3
from fastapi import Depends, FastAPI, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import BaseModel, Field
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from imitax.rate import store
from imitax.rate.models import Setting, open_database

MAX_BODY = 64 * 1024
_HERE = pathlib.Path(__file__).parent
_SESSION_COOKIE = "imitax_session"
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",  # links carry secret tokens
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
_markdown = markdown_it.MarkdownIt("commonmark", {"html": False}).enable("table")


def render_markdown(text: str) -> Markup:
    """A model answer as safe HTML: Markdown without raw HTML, then an allow-list sanitizer."""
    return Markup(nh3.clean(_markdown.render(text)))


class RateRequest(BaseModel):
    item_id: int
    choice: Literal["a", "b", "tie"]
    reason: str = Field("", max_length=store.MAX_REASON)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether or not Content-Length is sent.

    Starlette and uvicorn have no body size limit of their own, so this small ASGI wrapper is one:
    it reads the body (at most ``limit`` bytes) before the app runs, then hands it on unchanged.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        response = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        await response(scope, None, send)


def _signing_key(engine: Engine) -> bytes:
    """The CSRF signing key, created once per database so that every server process shares it."""
    with Session(engine) as session, session.begin():
        setting = session.get(Setting, "csrf_key")
        if setting is not None:
            return bytes.fromhex(setting.value)
    try:
        with Session(engine) as session, session.begin():
            session.add(Setting(key="csrf_key", value=secrets.token_hex(32)))
    except IntegrityError:  # another process created it first
        pass
    return _signing_key(engine)


def from_environment():
    """The app over ``$IMITAX_RATE_DB``, tables already made: what each ``serve --workers`` process builds."""
    return create_app(open_database(os.environ["IMITAX_RATE_DB"], create=False))


def create_app(db: str | Engine):
    """The web app (an ASGI app) over database ``db``, a URL or an engine."""
    engine = open_database(db) if isinstance(db, str) else db
    key = _signing_key(engine)
    templates = Jinja2Templates(directory=_HERE / "templates")
    templates.env.filters["markdown"] = render_markdown
    app = FastAPI(title="imitax rating", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    bearer = HTTPBearer(auto_error=False)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(_HEADERS)
        return response

    def csrf_token(session_id: str) -> str:
        return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()

    def check_csrf(request: Request, token: str) -> None:
        session_id = request.cookies.get(_SESSION_COOKIE, "")
        if not session_id or not hmac.compare_digest(csrf_token(session_id), token):
            raise HTTPException(403, "The form has expired or did not come from this site: reload the page.")

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        session_id = request.cookies.get(_SESSION_COOKIE) or secrets.token_urlsafe(32)
        response = templates.TemplateResponse(
            request, name, {"csrf": csrf_token(session_id), **context}, status_code=status
        )
        response.set_cookie(
            _SESSION_COOKIE, session_id, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    def bearer_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:  # noqa: B008
        if credentials is None:
            raise HTTPException(401, "send the header Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})
        return credentials.credentials

    @app.exception_handler(store.Unauthorized)
    def unauthorized(request: Request, _exc):
        return _error(request, 401, "This link or token is not valid. Check the link you were given.")

    @app.exception_handler(store.Forbidden)
    def forbidden(request: Request, _exc):
        return _error(request, 403, "This item is not assigned to you.")

    @app.exception_handler(store.Conflict)
    def conflict(request: Request, _exc):
        return _error(request, 409, "You already judged this item differently; your first judgment stands.")

    @app.exception_handler(StarletteHTTPException)  # also the router's own 404 and 405
    def http_error(request: Request, exc: StarletteHTTPException):
        return _error(request, exc.status_code, str(exc.detail), exc.headers)

    def _error(request: Request, status: int, message: str, headers=None):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=status, headers=headers)
        token = request.path_params.get("token") if request.url.path.startswith("/r/") else None
        return page(request, "error.html", status, message=message, back=f"/r/{token}" if token else None)

    # ---------------------------------------------------------------- rater pages

    @app.get("/r/{token}", response_class=HTMLResponse)
    def rater_page(request: Request, token: str):
        if not store.has_started(engine, token):
            return page(request, "instructions.html", token=token)
        served = store.next_item(engine, token)
        if served is None:
            return page(request, "done.html")
        return page(request, "item.html", token=token, item=served)

    @app.post("/r/{token}/start")
    def start(request: Request, token: str, csrf: str = Form("")):
        check_csrf(request, csrf)
        store.start(engine, token)
        return RedirectResponse(f"/r/{token}", status_code=303)

    @app.post("/r/{token}/rate")
    def rate_form(request: Request, token: str, item_id: int = Form(), choice: str = Form(""),
                  reason: str = Form(""), csrf: str = Form("")):  # fmt: skip
        check_csrf(request, csrf)
        if choice not in store.CHOICES:
            raise HTTPException(400, "Choose A, tie or B.")
        store.rate(engine, token, item_id, choice, reason)
        return RedirectResponse(f"/r/{token}", status_code=303)

    # ---------------------------------------------------------------- admin

    @app.get("/admin/{token}", response_class=HTMLResponse)
    def admin_page(request: Request, token: str):
        return page(request, "admin.html", progress=store.admin_progress(engine, token))

    @app.get("/api/admin/progress")
    def admin_api(token: str = Depends(bearer_token)):
        return store.admin_progress(engine, token)

    # ---------------------------------------------------------------- JSON API

    @app.get("/api/next")
    def api_next(token: str = Depends(bearer_token)):
        served = store.next_item(engine, token)
        if served is None:
            return Response(status_code=204)
        return {"item_id": served.item_id, "prompt": served.prompt, "a": served.a, "b": served.b,
                "progress": {"done": served.done, "total": served.total}}  # fmt: skip

    @app.post("/api/rate")
    def api_rate(body: RateRequest, token: str = Depends(bearer_token)):
        created = store.rate(engine, token, body.item_id, body.choice, body.reason)
        return {"status": "recorded" if created else "already recorded"}

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        return page(request, "error.html", 404, message="Open the link you were given.")

    return BodyLimit(app, MAX_BODY)
