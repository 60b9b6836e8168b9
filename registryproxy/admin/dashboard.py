"""The dashboard: one HTML page, its CSS and its JS, shipped in the package.

They are served without the token (they hold no data); the page asks for
the token and sends it with every call it makes to the JSON routes, which
check it as always.  Nothing is fetched from anywhere else.
"""

from __future__ import annotations

from importlib import resources

from twisted.web.iweb import IRequest

#: URL path -> (file in registryproxy/admin/static, content type)
ASSETS = {
    b"/": ("dashboard.html", b"text/html; charset=utf-8"),
    b"/static/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
    b"/static/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
}
#: the page loads its own files and talks to its own origin, nothing else
_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


class Dashboard:
    """The page and its assets, read from the package once."""

    def __init__(self) -> None:
        files = resources.files(__package__).joinpath("static")
        self._bodies = {
            path: (files.joinpath(name).read_bytes(), content_type)
            for path, (name, content_type) in ASSETS.items()
        }

    def serves(self, request: IRequest) -> bool:
        return request.method in (b"GET", b"HEAD") and request.path in self._bodies

    def render(self, request: IRequest) -> bytes:
        body, content_type = self._bodies[request.path]
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"Content-Security-Policy", _POLICY)
        return body
