"""The dashboard: a static single-page app at `/`, its scripts and styles under `/dashboard`.

Everything the page needs (ECharts included) is served from `api/dashboard/`, so it works
without internet access and without a build step.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboard"

router = APIRouter(include_in_schema=False)


# HEAD too, as on every GET route (api.head_requests): uptime checkers probe the page with it.
@router.get("/")
def index() -> FileResponse:
    page = DASHBOARD_DIR / "index.html"
    if not page.is_file():
        raise HTTPException(
            status_code=404,
            detail=f"the dashboard's files are not installed ({DASHBOARD_DIR} is missing): "
            "install archtree with its package data, or use the API under /v1",
        )
    # Revalidated on every load, so a new release's page is never served from a stale cache.
    return FileResponse(page, headers={"Cache-Control": "no-cache"})


def mount(app: FastAPI) -> None:
    """Serve the page at `/` and its static files under `/dashboard/`."""
    app.include_router(router)
    # check_dir=False: an install without the dashboard's files still serves the API.
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR, check_dir=False), name="dashboard")
