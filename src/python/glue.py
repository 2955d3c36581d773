"""zdr's side of the ASGI protocol, run in a worker's Python thread.

zdr's HTTP layer (Rust, on the worker's runtime thread) never takes the
GIL: it queues work for this thread and writes to `wake_fd`; this thread's
event loop reads the queue (`inbox.take()`) and runs the app. Calls go
back through the `Call` objects zdr hands over (`receive`, `send`, ...).
"""

import asyncio
import faulthandler
import inspect
import io
import threading
import os
import sys
import traceback

# What zdr queues (the first item of each of inbox.take()'s pairs).
NEW, RESUME, SHUTDOWN, DRAINING = 0, 1, 2, 3


class Worker:
    """The zdr worker the app runs in, as `zdr.worker` and as an ASGI
    scope's `extensions["zdr"]["worker"]`: its pid, generation and master,
    and whether it drains (a reload, a stop, its request limit), so that an
    app holding a long answer (a stream of events) can end it politely
    rather than be cut at the graceful timeout. (The scope's
    `extensions["zdr"]["connection_expires_in"]` is the seconds its
    connection has left under `--max-connection-age`, or None.)"""

    def __init__(self):
        self._inbox = None
        self._loop = None
        self._waiters = []

    @property
    def pid(self):
        return os.getpid()

    @property
    def generation(self):
        return int(os.environ.get("ZDR_GENERATION", "0"))

    @property
    def master_pid(self):
        return int(os.environ.get("ZDR_MASTER_PID", "0"))

    def draining(self):
        """Whether the worker has started draining (from any thread)."""
        return self._inbox is not None and self._inbox.draining()

    async def wait_draining(self):
        """Returns once the worker starts draining (on the app's loop)."""
        if self.draining():
            return
        future = self._loop.create_future()
        self._waiters.append(future)
        await future

    def _bind(self, inbox, loop):
        self._inbox = inbox
        self._loop = loop

    def _drained(self):
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


WORKER = Worker()


def at_exit():
    """What the app registered with `atexit`, and its buffered output,
    when the worker ends (the interpreter is not finalised)."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


def install_module():
    """Makes `import zdr` give the app its worker (`zdr.worker`)."""
    import types

    # The wheel's own `zdr` package, when zdr runs from it; else a module
    # made here.
    module = sys.modules.get("zdr")
    if module is None:
        module = types.ModuleType("zdr", "The zdr worker this app runs in: zdr.worker.")
        sys.modules["zdr"] = module
    module.worker = WORKER
    module.Worker = Worker


def make_loop():
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def load(name):
    """Imports MODULE:APP; returns (app, None) or (None, the traceback)."""
    module, _, attr = name.partition(":")
    try:
        obj = __import__(module, fromlist=["_"])
        for part in attr.split("."):
            obj = getattr(obj, part)
    except BaseException:
        return None, traceback.format_exc()
    if not callable(obj):
        return None, f"{name} is not callable (an ASGI app is `async def app(scope, receive, send)`)"
    return obj, None


def is_asgi(app):
    """An ASGI app is a coroutine function (or an object whose __call__ is
    one); anything else callable is taken for a WSGI app, as uvicorn's
    `--interface auto` tells them apart."""
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)
    return inspect.iscoroutinefunction(call)


class Wsgi:
    """A WSGI app, each request run in a pool of `threads` threads
    (Gunicorn's `--threads`) straight from zdr's queue: its body read
    whole first, its answer's parts sent as they come (each waiting, without
    the GIL, while the connection has no room for more)."""

    def __init__(self, app, threads):
        self.app = app
        self.threads = threads

    def start(self, inbox, state):
        """Starts the threads, which take new calls from zdr themselves."""
        inbox.serve_in_threads()

        def serve():
            while True:
                call = inbox.next_call()
                if call is None:
                    return
                self.handle(call, state)

        for i in range(self.threads):
            threading.Thread(target=serve, name=f"zdr-wsgi-{i}", daemon=True).start()

    def handle(self, call, state):
        """One request, in a pool thread."""
        try:
            self.run(call, state)
        except BaseException as e:
            call.fail("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        else:
            call.finish()

    def run(self, call, state):
        environ = call.environ()
        body = call.read_body()
        if body is None:
            # The client left.
            return
        environ["wsgi.input"] = io.BytesIO(body)
        environ["wsgi.errors"] = sys.stderr
        started = []
        pending = []
        send = call.body_blocking

        def start_response(status, headers, exc_info=None):
            if exc_info and sent_head:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [(int(status.split(" ", 1)[0]), headers)]
            return pending.append

        def head():
            if not started:
                raise RuntimeError("the WSGI app did not call start_response")
            call.start_wsgi(*started[0])

        sent_head = False
        result = self.app(environ, start_response)
        if type(result) is list and len(result) == 1 and started and not pending:
            # The commonest answer, a list of one part: all at once.
            call.answer_wsgi(started[0][0], started[0][1], result[0])
            return
        try:
            for part in result:
                if not part and not pending:
                    continue
                if not sent_head:
                    head()
                    sent_head = True
                if pending:
                    for data in pending:
                        if data:
                            send(data, True)
                    pending.clear()
                if part:
                    send(part, True)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if not sent_head:
            head()
        for data in pending:
            if data:
                send(data, True)
        send(b"", False)


class Runner:
    """Runs one app on one event loop: its lifespan and its requests."""

    def __init__(self, app, loop, wake_fd, inbox, tick_every, threads, interface):
        asgi = is_asgi(app) if interface == "auto" else interface == "asgi"
        self.wsgi = None if asgi else Wsgi(app, threads)
        self.app = app
        self.loop = loop
        self.wake_fd = wake_fd
        self.inbox = inbox
        # Shared with every request's scope (ASGI's lifespan state).
        self.state = {}
        self.tasks = set()
        self.lifespan_task = None
        self.lifespan_queue = None
        self.stopped = None
        loop.add_reader(wake_fd, self.on_wake)
        WORKER._bind(inbox, loop)
        # The ticker shows zdr the loop runs: one that stops (an app that
        # blocks it) for --timeout gets the worker aborted, and the
        # threads' Python stacks are written to the log first.
        faulthandler.enable()
        self.tick_every = tick_every
        loop.call_soon(self.tick)
        if self.wsgi is not None:
            self.wsgi.start(inbox, self.state)

    def tick(self):
        self.inbox.tick()
        self.loop.call_later(self.tick_every, self.tick)

    def on_wake(self):
        try:
            os.read(self.wake_fd, 8)
        except BlockingIOError:
            pass
        for kind, obj in self.inbox.take():
            if kind == NEW and self.wsgi is not None:
                # Queued before the threads started.
                self.wsgi.handle(obj, self.state)
            elif kind == NEW:
                task = self.loop.create_task(self.serve(obj))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif kind == RESUME:
                obj.resume()
            elif kind == SHUTDOWN:
                self.loop.create_task(self.shutdown(obj))
            elif kind == DRAINING:
                WORKER._drained()

    async def serve(self, call):
        loop = self.loop
        scope = call.scope(self.state)
        scope["extensions"]["zdr"]["worker"] = WORKER

        async def receive():
            message = call.receive()
            if message is None:
                future = loop.create_future()
                call.wait(future, False)
                message = await future
            return message

        async def send(message):
            wait = call.send(message)
            if wait == 1:
                future = loop.create_future()
                call.wait(future, True)
                await future
            elif wait == 2:
                # The head alone: sent once the app has had its turn to
                # send the body with it.
                loop.call_soon(call.flush)

        try:
            await self.app(scope, receive, send)
        except BaseException as e:
            call.fail("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            call.finish()

    def startup(self, timeout):
        """Runs the lifespan's startup; returns (ok, message)."""
        return self.loop.run_until_complete(self._startup(timeout))

    async def _startup(self, timeout):
        if self.wsgi is not None:
            # WSGI has no lifespan.
            return (True, "")
        self.lifespan_queue = asyncio.Queue()
        started = self.loop.create_future()
        self.stopped = self.loop.create_future()
        stopped = self.stopped
        scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }

        async def receive():
            return await self.lifespan_queue.get()

        async def send(message):
            kind = message.get("type")
            if kind == "lifespan.startup.complete" and not started.done():
                started.set_result((True, ""))
            elif kind == "lifespan.startup.failed" and not started.done():
                started.set_result((False, message.get("message") or "lifespan startup failed"))
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                if not stopped.done():
                    stopped.set_result(message.get("message", ""))

        async def main():
            try:
                await self.app(scope, receive, send)
            except BaseException:
                text = traceback.format_exc()
                if not started.done():
                    # As uvicorn's `--lifespan auto`: an app that fails on
                    # the lifespan scope before starting up does not speak
                    # it, and serves without.
                    print(
                        f"[zdr] the app does not support ASGI lifespan; serving without it:\n{text}",
                        file=sys.stderr,
                        flush=True,
                    )
                    started.set_result((True, ""))
            finally:
                if not started.done():
                    started.set_result((True, ""))
                if not stopped.done():
                    stopped.set_result("")

        self.lifespan_task = self.loop.create_task(main())
        self.lifespan_queue.put_nowait({"type": "lifespan.startup"})
        try:
            return await asyncio.wait_for(asyncio.shield(started), timeout)
        except asyncio.TimeoutError:
            return (False, f"lifespan startup did not complete within {timeout:g} s")

    async def shutdown(self, done):
        """The lifespan's shutdown, within done's time; then the loop stops."""
        try:
            if self.lifespan_task is not None and not self.lifespan_task.done():
                self.lifespan_queue.put_nowait({"type": "lifespan.shutdown"})
                try:
                    await asyncio.wait_for(asyncio.shield(self.stopped), done.seconds())
                except asyncio.TimeoutError:
                    pass
            for task in list(self.tasks):
                task.cancel()
        finally:
            # Before zdr hears the shutdown is done (the worker then exits).
            at_exit()
            done.set()
            self.loop.stop()
