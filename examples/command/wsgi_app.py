"""A WSGI app for `zdr serve -- gunicorn ...` (see README.md beside it).

Every answer names the process (`pid=`), the zdr generation it belongs to
(`generation=`, from `ZDR_GENERATION`) and how many body bytes it read.
"""

import os

GENERATION = os.environ.get("ZDR_GENERATION", "0")


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    received = len(environ["wsgi.input"].read(length)) if length else 0
    text = f"pid={os.getpid()} generation={GENERATION} received={received}\n"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [text.encode()]
