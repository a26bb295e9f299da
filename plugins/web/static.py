"""The page's assets, served by Starlette's ``StaticFiles`` with a day of caching.

Only ``static/`` is served (the HTML templates live in ``templates/``, outside it). Pages link each
asset with ``?v=<content hash>`` so a new release is fetched at once despite the caching.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
TEMPLATE_DIR = Path(__file__).parent / "templates"
CACHE_CONTROL = "public, max-age=86400"
# Set here rather than through the mimetypes registry, whose answer depends on the host's files.
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


class Assets(StaticFiles):
    """``StaticFiles`` (ETag, If-None-Match, no traversal) plus Cache-Control and fixed types."""

    def __init__(self) -> None:
        super().__init__(directory=STATIC_DIR)
        self.versions = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            for path in STATIC_DIR.iterdir()
            if path.is_file()
        }

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if response.status_code in (200, 304):
            response.headers["Cache-Control"] = CACHE_CONTROL
            media_type = MEDIA_TYPES.get(Path(path).suffix)
            if media_type and response.status_code == 200:
                response.headers["Content-Type"] = media_type
        return response

    def url(self, name: str) -> str:
        """The cache-busting URL of one asset."""
        return f"/static/{name}?v={self.versions[name]}"
