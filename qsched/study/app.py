"""The study's FastAPI app: rater page, pair/vote/image API, admin endpoints and the results page.

Authentication: raters pass their token as ``?token=`` (page and images) or the ``X-Rater-Token`` header (API);
admin endpoints need the admin token (``X-Admin-Token`` header or ``?token=``). Image URLs name an issued pair
and a side, never a file path or a system, so raters cannot tell systems apart and no path can be traversed.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qsched.study.create import load_manifest
from qsched.study.page import RATER_PAGE, message_page
from qsched.study.pairing import PairScheduler
from qsched.study.store import DB_NAME, Store, VoteRejected


class VoteIn(BaseModel):
    """Body of ``POST /api/vote``."""

    model_config = ConfigDict(extra="forbid")
    pair_id: str = Field(min_length=1, max_length=64)
    answer: Literal["left", "right", "tie", "both_bad"]


class RaterIn(BaseModel):
    """Body of ``POST /api/admin/raters``."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")


def _err(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(study_dir: str | os.PathLike, admin_token: str | None = None, seed: int | None = None) -> FastAPI:
    """Build the app for a created study directory (votes in ``DIR/votes.sqlite``)."""
    root = Path(study_dir).resolve()
    manifest = load_manifest(root)
    images_root = (root / "images").resolve()
    store = Store(root / DB_NAME)
    admin = store.admin_token(admin_token)
    systems = [s["id"] for s in manifest["systems"]]
    items = [(pi, sd) for pi in range(len(manifest["prompts"])) for sd in manifest["seeds"]]
    scheduler = PairScheduler(store, systems, items, seed=seed)

    app = FastAPI(title="qsched preference study", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.manifest, app.state.scheduler, app.state.admin_token = store, manifest, scheduler, admin

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"error": f"malformed request: {where or 'body'}: {first.get('msg', 'invalid')}"},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _err(exc.status_code, str(exc.detail))

    @app.exception_handler(VoteRejected)
    async def _rejected(request: Request, exc: VoteRejected) -> JSONResponse:
        return _err(exc.status, exc.message)

    def rater(header: str | None, query: str | None) -> str:
        name = store.rater_of(header or query)
        if name is None:
            raise VoteRejected(401, "missing or invalid rater token")
        return name

    def check_admin(header: str | None, query: str | None) -> None:
        given = header or query or ""
        if not hmac.compare_digest(given.encode(), admin.encode()):
            raise VoteRejected(401, "missing or invalid admin token")

    @app.get("/", response_class=HTMLResponse)
    def page(token: str | None = Query(None, max_length=128)) -> HTMLResponse:
        if store.rater_of(token) is None:
            return HTMLResponse(message_page("Rater link needed",
                                             "Open the personal link you were given (it ends in ?token=...)."), 401)
        return HTMLResponse(RATER_PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/api/next")
    def next_pair(x_rater_token: str | None = Header(None, max_length=128),
                  token: str | None = Query(None, max_length=128)) -> dict[str, Any]:
        name = rater(x_rater_token, token)
        tok = x_rater_token or token
        p = scheduler.next_pair(name)
        answered = store.n_votes(name)
        if p is None:
            return {"done": True, "answered": answered}
        return {"done": False, "pair_id": p.id, "prompt": manifest["prompts"][p.prompt],
                "images": {s: f"/api/image/{p.id}/{s}?token={tok}" for s in ("left", "right")},
                "answered": answered, "remaining": scheduler.comparisons_per_rater - answered}

    @app.post("/api/vote")
    def vote(body: VoteIn, x_rater_token: str | None = Header(None, max_length=128),
             token: str | None = Query(None, max_length=128)) -> dict[str, Any]:
        name = rater(x_rater_token, token)
        vid = store.record_vote(name, body.pair_id, body.answer)
        return {"ok": True, "vote_id": vid}

    @app.get("/api/image/{pair_id}/{side}")
    def image(pair_id: str, side: Literal["left", "right"], token: str | None = Query(None, max_length=128),
              x_rater_token: str | None = Header(None, max_length=128)) -> FileResponse:
        name = rater(x_rater_token, token)
        p = store.get_pair(pair_id)
        if p is None or p["rater"] != name:
            raise VoteRejected(404, "no such image")
        system = p["left_sys"] if side == "left" else p["right_sys"]
        rel = manifest["images"].get(system, {}).get(f"{p['prompt']}:{p['seed']}")
        path = (root / rel).resolve() if rel else None
        if path is None or not path.is_relative_to(images_root) or not path.is_file():
            raise VoteRejected(404, "no such image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/admin/raters")
    def add_rater(body: RaterIn | None = None, x_admin_token: str | None = Header(None, max_length=128),
                  token: str | None = Query(None, max_length=128)) -> dict[str, Any]:
        check_admin(x_admin_token, token)
        name, tok = store.add_rater(body.name if body else None)
        return {"name": name, "token": tok, "link": f"/?token={tok}"}

    @app.get("/api/admin/raters")
    def list_raters(x_admin_token: str | None = Header(None, max_length=128),
                    token: str | None = Query(None, max_length=128)) -> list[dict[str, Any]]:
        check_admin(x_admin_token, token)
        return [{**r, "votes": store.n_votes(r["name"])} for r in store.raters()]

    @app.get("/api/results")
    def results_json(x_admin_token: str | None = Header(None, max_length=128),
                     token: str | None = Query(None, max_length=128)) -> dict[str, Any]:
        from qsched.study.results import compute_results

        check_admin(x_admin_token, token)
        return compute_results(manifest, store.votes(), n_boot=200)

    @app.get("/results", response_class=HTMLResponse)
    def results_page(token: str | None = Query(None, max_length=128),
                     x_admin_token: str | None = Header(None, max_length=128)) -> HTMLResponse:
        from qsched.study.results import compute_results, render_html

        try:
            check_admin(x_admin_token, token)
        except VoteRejected:
            return HTMLResponse(message_page("Admin token needed", "Open /results?token=ADMIN_TOKEN."), 401)
        return HTMLResponse(render_html(compute_results(manifest, store.votes(), n_boot=200)))

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        return {"ok": True}

    return app
