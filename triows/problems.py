"""RFC 9457 problem details: the body of every HTTP error triows answers."""

from __future__ import annotations

import json
from http import HTTPStatus

from quart import Response

PROBLEM_TYPE_BASE = "https://triows.dev/problems/"


def problem(
    status: int, detail: str, *, kind: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    """An ``application/problem+json`` response; ``kind`` names the problem type."""
    title = HTTPStatus(status).phrase
    body = {
        "type": PROBLEM_TYPE_BASE + (kind or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
    }
    return Response(
        json.dumps(body), status=status, content_type="application/problem+json", headers=headers
    )
