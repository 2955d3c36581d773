"""zdr: a pre-fork HTTP server with zero-downtime restarts.

Run it as `zdr` (the console script) or `python -m zdr`. Inside a worker
that serves a Python app, `zdr.worker` is the worker the app runs in (its
pid, generation, `draining()` and `await wait_draining()`).
"""
