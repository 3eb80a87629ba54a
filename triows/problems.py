"""RFC 9457 problem details: the body of every HTTP error triows answers."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from quart import Response

PROBLEM_TYPE_BASE = "https://triows.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem(
    status: int, detail: str, *, kind: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    """An ``application/problem+json`` response; ``kind`` names the problem type."""
    return Response(
        json.dumps(problem_document(status, detail, kind=kind)),
        status=status,
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def problem_document(status: int, detail: str, *, kind: str | None = None) -> dict[str, Any]:
    """The problem details object itself (for raw ASGI answers and batch items)."""
    title = HTTPStatus(status).phrase
    return {
        "type": PROBLEM_TYPE_BASE + (kind or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
    }
