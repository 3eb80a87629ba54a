"""``triows demo``: start a server on the memory backend and let Anne message Bob."""

from __future__ import annotations

import json

import httpx

from triows.client import open_events, post_send
from triows.process import serve_instance


def _show(who: str, frame: object) -> None:
    print(f"{who:>5} <- {json.dumps(frame)}")


def _show_response(to: str, response: httpx.Response) -> None:
    print(f" Anne -> POST /send {{'to': '{to}'}}: {response.status_code} {response.text.strip()}")


async def run_demo() -> int:
    """Run the core scenario on one machine and print every frame; 0 if Bob got both."""
    async with serve_instance("memory") as instance:
        print(f"triows serve is up at {instance.base_url} (memory backend, dev mode)")
        async with httpx.AsyncClient() as http, open_events(instance.base_url, user="Bob") as bob:
            _show("Bob", bob.hello)
            response = await post_send(
                http, instance.base_url, "Bob", {"text": "hi Bob"}, sender="Anne"
            )
            _show_response("Bob", response)
            first = await bob.receive()
            _show("Bob", first)
            async with open_events(instance.base_url, user="Anne") as anne:
                _show("Anne", anne.hello)
                await anne.send("Bob", {"text": "over the WebSocket"}, ref="1")
                _show("Anne", await anne.receive())
                second = await bob.receive()
                _show("Bob", second)
            offline = await post_send(http, instance.base_url, "Carol", "hello?", sender="Anne")
            _show_response("Carol", offline)
    delivered = first["from"] == "Anne" and second["message"] == {"text": "over the WebSocket"}
    print("demo OK: Bob received both messages" if delivered else "demo FAILED")
    return 0 if delivered else 1
