"""A FastAPI app for tests/wheel.rs: each answer names its process, its zdr
generation and the app's version (the line the test rewrites to deploy new
code)."""

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

VERSION = "one"
GENERATION = os.environ.get("ZDR_GENERATION", "0")

app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
def index() -> str:
    return f"pid={os.getpid()} generation={GENERATION} version={VERSION}\n"
