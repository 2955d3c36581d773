"""An ASGI app for `zdr serve -- uvicorn ...` (see README.md beside it).

Every answer names the process (`pid=`), the zdr generation it belongs to
(`generation=`, from `ZDR_GENERATION`) and how many body bytes it read.
"""

import os

GENERATION = os.environ.get("ZDR_GENERATION", "0")


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    received = 0
    while True:
        message = await receive()
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    text = f"pid={os.getpid()} generation={GENERATION} received={received}\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})
