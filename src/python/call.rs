//! One request to a Python app: its state, shared by the runtime thread
//! (the service's future, the response body, the request body's
//! forwarder) and the Python thread (the app's `receive` and `send`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::{Bridge, Wake};
use crate::app::{Body, BoxError, Request};

/// Bytes of a body buffered on either side before the sender waits.
const ROOM: usize = 256 << 10;

/// zdr's ASGI app service: each request becomes a call queued for the
/// Python thread.
#[derive(Clone)]
pub(super) struct Asgi {
    bridge: Arc<Bridge>,
}

impl Asgi {
    pub(super) fn new(bridge: Arc<Bridge>) -> Asgi {
        Asgi { bridge }
    }
}

impl tower::Service<Request> for Asgi {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Answer {
        let (parts, body) = req.into_parts();
        let body_done = http_body::Body::is_end_stream(&body);
        let state = Arc::new(CallState {
            queued_ns: crate::sys::monotonic_ns(),
            taken_ns: std::sync::atomic::AtomicU64::new(0),
            bridge: Arc::clone(&self.bridge),
            waker: AtomicWaker::new(),
            room: tokio::sync::Notify::new(),
            changed: std::sync::Condvar::new(),
            inner: Mutex::new(Inner {
                head: Some(parts),
                body_done,
                ..Inner::default()
            }),
        });
        if !body_done {
            let forwarder = tokio::spawn(forward(Arc::clone(&state), body));
            state.lock().forwarder = Some(forwarder.abort_handle());
        }
        self.bridge.post(Wake::New(Arc::clone(&state)));
        Answer {
            side: Some(Side(state)),
        }
    }
}

/// One call's state.
pub(super) struct CallState {
    /// When it was queued for the app ([`crate::sys::monotonic_ns`]).
    queued_ns: u64,
    /// When the app's side took it.
    taken_ns: std::sync::atomic::AtomicU64,
    bridge: Arc<Bridge>,
    /// The runtime's side: the service's future, then the response body.
    waker: AtomicWaker,
    /// The request body's forwarder waits here for room.
    room: tokio::sync::Notify,
    inner: Mutex<Inner>,
    /// Notified when [`Inner::version`] changes.
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct Inner {
    /// The request's head, until the scope is made of it.
    head: Option<http::request::Parts>,
    /// Request body bytes not yet received by the app.
    body: VecDeque<Bytes>,
    body_bytes: usize,
    /// The request body has ended (all of it is in `body`).
    body_done: bool,
    /// The app has received the last of the request body.
    received_all: bool,
    /// The client or zdr is gone: `receive` says `http.disconnect`, and
    /// `send` drops what it is given.
    disconnected: bool,
    /// What the app awaits, if it waits: a `receive` or a `send`.
    waiting: Option<(Waiting, PyObject)>,
    /// The response's status and fields, once the app has started it.
    start: Option<(StatusCode, HeaderMap)>,
    /// The head may go out (the app sent body bytes, or had its turn).
    flushed: bool,
    /// The runtime has taken the head.
    head_taken: bool,
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// The app has sent the response's last bytes.
    out_done: bool,
    /// The app failed: its traceback.
    failed: Option<String>,
    /// Shed, having waited this long in the queue (ns): answered 503, the
    /// app never called.
    shed: Option<u64>,
    /// The app's call has returned.
    finished: bool,
    forwarder: Option<tokio::task::AbortHandle>,
    /// Counts the changes an app waiting in a thread may care for.
    version: u64,
}

impl Inner {
    /// The app has started the response (its head is here or taken).
    fn started(&self) -> bool {
        self.start.is_some() || self.head_taken
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Waiting {
    Receive,
    Send,
}

impl CallState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When it was queued for the app.
    pub(super) fn queued_ns(&self) -> u64 {
        self.queued_ns
    }

    /// The app's side takes it at `now_ns`.
    pub(super) fn taken(&self, now_ns: u64) {
        self.taken_ns
            .store(now_ns, std::sync::atomic::Ordering::Relaxed);
    }

    /// It is shed, having waited `waited_ns`: the runtime answers it.
    pub(super) fn shed(&self, waited_ns: u64) {
        self.lock().shed = Some(waited_ns);
        self.waker.wake();
    }

    /// Wakes the app's `receive` or `send`, if it waits: on the event
    /// loop (ASGI), or in a thread of its own (WSGI, blocked in
    /// [`Call::read_body`] or [`Call::body_blocking`]).
    fn resume_app(self: &Arc<Self>, inner: &mut Inner) {
        inner.version = inner.version.wrapping_add(1);
        self.changed.notify_all();
        if inner.waiting.is_some() {
            self.bridge.post(Wake::Resume(Arc::clone(self)));
        }
    }

    /// Waits, without the GIL, until the call's state has changed since
    /// `seen` (its [`Inner::version`]).
    fn wait_change(&self, py: Python<'_>, seen: u64) {
        py.allow_threads(|| {
            let mut inner = self.lock();
            while inner.version == seen && !inner.finished {
                inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
            }
        });
    }

    /// The runtime's side is gone (the client left, or the response is
    /// out): the app hears `http.disconnect`.
    fn disconnect(self: &Arc<Self>) {
        let mut inner = self.lock();
        inner.disconnected = true;
        if let Some(f) = inner.forwarder.take() {
            f.abort();
        }
        self.resume_app(&mut inner);
    }
}

/// Reads the request body into the call as the app makes room for it.
async fn forward(state: Arc<CallState>, mut body: crate::body::RequestBody) {
    loop {
        loop {
            let room = state.room.notified();
            {
                let inner = state.lock();
                if inner.finished || inner.disconnected {
                    return;
                }
                if inner.body_bytes < ROOM {
                    break;
                }
            }
            room.await;
        }
        let frame = body.frame().await;
        let mut inner = state.lock();
        match frame {
            None => inner.body_done = true,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        inner.body_bytes += data.len();
                        inner.body.push_back(data);
                    }
                }
            }
            // A broken or refused body: zdr answers it; the app hears the
            // client has gone.
            Some(Err(_)) => inner.disconnected = true,
        }
        let end = inner.body_done || inner.disconnected;
        state.resume_app(&mut inner);
        if end {
            return;
        }
    }
}

/// A call as the Python thread sees it (`glue.py`).
#[pyclass(frozen)]
pub(super) struct Call(Arc<CallState>);

impl Call {
    pub(super) fn new(state: Arc<CallState>) -> Call {
        Call(state)
    }
}

/// The next message `receive` has for the app, if it has one now.
fn next_message<'py>(
    py: Python<'py>,
    state: &CallState,
    inner: &mut Inner,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let message = PyDict::new(py);
    if !inner.received_all && !inner.disconnected {
        let chunk = inner.body.pop_front();
        if chunk.is_none() && !inner.body_done {
            return Ok(None);
        }
        let chunk = chunk.unwrap_or_default();
        inner.body_bytes -= chunk.len();
        let more = !(inner.body_done && inner.body.is_empty());
        inner.received_all = !more;
        state.room.notify_one();
        message.set_item("type", "http.request")?;
        message.set_item("body", PyBytes::new(py, &chunk))?;
        message.set_item("more_body", more)?;
        return Ok(Some(message));
    }
    if inner.disconnected {
        message.set_item("type", "http.disconnect")?;
        return Ok(Some(message));
    }
    Ok(None)
}

#[pymethods]
impl Call {
    /// The request's ASGI scope (`state`: the lifespan's, copied).
    fn scope<'py>(
        &self,
        py: Python<'py>,
        state: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let Some(head) = self.0.lock().head.take() else {
            return Err(PyRuntimeError::new_err("the scope was already made"));
        };
        scope(py, &head, state)
    }

    /// The next message, or `None` if the app must wait for it
    /// (`wait`).
    fn receive<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let mut inner = self.0.lock();
        next_message(py, &self.0, &mut inner)
    }

    /// The app awaits `future`: for the next message (after `receive`
    /// said `None`) or, `sending`, for room (after `send` said 1).
    /// Resolved at once if it may already go on.
    fn wait(&self, py: Python<'_>, future: PyObject, sending: bool) -> PyResult<()> {
        let mut inner = self.0.lock();
        let what = if sending {
            Waiting::Send
        } else {
            Waiting::Receive
        };
        inner.waiting = Some((what, future));
        resume(py, &self.0, &mut inner)
    }

    /// Goes on with what the app awaits, if it may (queued by zdr).
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        let mut inner = self.0.lock();
        resume(py, &self.0, &mut inner)
    }

    /// The app sends `message`: 0 when it may go on, 1 when it must wait
    /// for room (`wait`), 2 when it started the response (`flush` once it
    /// has had its turn).
    fn send(&self, message: &Bound<'_, PyDict>) -> PyResult<u8> {
        let kind: String = message
            .get_item("type")?
            .ok_or_else(|| PyRuntimeError::new_err("an ASGI message has a `type`"))?
            .extract()?;
        match kind.as_str() {
            "http.response.start" => {
                let status: u16 = message
                    .get_item("status")?
                    .ok_or_else(|| PyRuntimeError::new_err("http.response.start has a `status`"))?
                    .extract()?;
                self.start(status, message.get_item("headers")?)?;
                Ok(2)
            }
            "http.response.body" => {
                let more: bool = match message.get_item("more_body")? {
                    Some(v) => v.is_truthy()?,
                    None => false,
                };
                let body = message.get_item("body")?;
                let bytes = match &body {
                    Some(body) => body.downcast::<PyBytes>()?.as_bytes(),
                    None => &[],
                };
                Ok(u8::from(self.body(bytes, more)?))
            }
            other => Err(PyRuntimeError::new_err(format!(
                "zdr does not take the ASGI message {other:?} on an http scope"
            ))),
        }
    }

    /// A WSGI app's `start_response`, as the status line's code and the
    /// `(name, value)` string pairs.
    fn start_wsgi(&self, status: u16, headers: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut fields = HeaderMap::new();
        for pair in headers.try_iter()? {
            let (name, value): (String, String) = pair?.extract()?;
            fields.append(
                header_name(name.as_bytes())?,
                header_value(&name, value.as_bytes())?,
            );
        }
        self.0.lock().start = Some((http_status(status)?, fields));
        Ok(())
    }

    /// A part of a WSGI app's answer (`more`: not the last), waiting
    /// without the GIL while the connection has no room for more.
    fn body_blocking(&self, py: Python<'_>, data: &[u8], more: bool) -> PyResult<()> {
        if !self.body(data, more)? {
            return Ok(());
        }
        self.wait_room(py);
        Ok(())
    }

    /// A WSGI app's whole answer at once (a list of one part, the
    /// commonest): its status, fields and body.
    fn answer_wsgi(
        &self,
        py: Python<'_>,
        status: u16,
        headers: &Bound<'_, PyAny>,
        data: &[u8],
    ) -> PyResult<()> {
        self.start_wsgi(status, headers)?;
        self.body_blocking(py, data, false)
    }

    /// The whole request body, waited for without the GIL (WSGI reads it
    /// before calling the app); `None` if the client left.
    fn read_body<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let mut body: Vec<u8> = Vec::new();
        loop {
            let seen = {
                let mut inner = self.0.lock();
                if inner.disconnected && !inner.received_all {
                    return Ok(None);
                }
                while let Some(chunk) = inner.body.pop_front() {
                    inner.body_bytes -= chunk.len();
                    body.extend_from_slice(&chunk);
                }
                self.0.room.notify_one();
                if inner.body_done || inner.received_all {
                    inner.received_all = true;
                    return Ok(Some(PyBytes::new(py, &body)));
                }
                inner.version
            };
            self.0.wait_change(py, seen);
        }
    }

    /// The request as a WSGI environ, all but `wsgi.input` and
    /// `wsgi.errors` (PEP 3333: strings are the bytes as Latin-1).
    fn environ<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let Some(head) = self.0.lock().head.take() else {
            return Err(PyRuntimeError::new_err("the environ was already made"));
        };
        environ(py, &head)
    }
    /// The head may go out without body bytes.
    fn flush(&self) {
        self.0.lock().flushed = true;
        self.0.waker.wake();
    }

    /// The app's call raised: `traceback` says how.
    fn fail(&self, traceback: String) {
        let mut inner = self.0.lock();
        inner.failed = Some(traceback);
        self.end(&mut inner);
    }

    /// The app's call returned.
    fn finish(&self) {
        let mut inner = self.0.lock();
        if !inner.started() {
            inner.failed = Some("the app returned without sending a response".to_owned());
        } else if !inner.out_done && !inner.disconnected {
            inner.failed = Some("the app returned before its response ended".to_owned());
        }
        self.end(&mut inner);
    }
}

impl Call {
    /// The response starts: its status and fields.
    fn start(&self, status: u16, headers: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        let status = http_status(status)?;
        let mut fields = HeaderMap::new();
        if let Some(headers) = headers {
            for pair in headers.try_iter()? {
                let (name, value): (Vec<u8>, Vec<u8>) = pair?.extract()?;
                let name = header_name(&name)?;
                let value = header_value(name.as_str(), &value)?;
                fields.append(name, value);
            }
        }
        let mut inner = self.0.lock();
        if inner.started() {
            return Err(PyRuntimeError::new_err("the response has already started"));
        }
        inner.start = Some((status, fields));
        Ok(())
    }

    /// Body bytes (`more`: not the last); whether the sender must wait
    /// for room.
    fn body(&self, bytes: &[u8], more: bool) -> PyResult<bool> {
        let mut inner = self.0.lock();
        if !inner.started() {
            return Err(PyRuntimeError::new_err(
                "http.response.body before http.response.start",
            ));
        }
        if inner.out_done || inner.disconnected {
            return Ok(false);
        }
        if !bytes.is_empty() {
            inner.out_bytes += bytes.len();
            inner.out.push_back(Bytes::copy_from_slice(bytes));
        }
        inner.out_done = !more;
        inner.flushed = true;
        let wait = more && inner.out_bytes >= ROOM;
        drop(inner);
        self.0.waker.wake();
        Ok(wait)
    }

    /// Waits without the GIL until the answer has room again (or the
    /// client is gone).
    fn wait_room(&self, py: Python<'_>) {
        loop {
            let seen = {
                let inner = self.0.lock();
                if inner.out_bytes < ROOM || inner.disconnected || inner.finished {
                    return;
                }
                inner.version
            };
            self.0.wait_change(py, seen);
        }
    }

    fn end(&self, inner: &mut Inner) {
        inner.finished = true;
        inner.waiting = None;
        if let Some(f) = inner.forwarder.take() {
            f.abort();
        }
        self.0.room.notify_one();
        self.0.changed.notify_all();
        self.0.waker.wake();
    }
}

/// Resolves the app's awaited future if what it waits for has come.
fn resume(py: Python<'_>, state: &CallState, inner: &mut Inner) -> PyResult<()> {
    let Some((what, _)) = &inner.waiting else {
        return Ok(());
    };
    let value = match what {
        Waiting::Receive => match next_message(py, state, inner)? {
            Some(message) => message.into_any(),
            None => return Ok(()),
        },
        Waiting::Send if inner.out_bytes < ROOM || inner.disconnected => py.None().into_bound(py),
        Waiting::Send => return Ok(()),
    };
    if let Some((_, future)) = inner.waiting.take() {
        let future = future.bind(py);
        if !future.call_method0("done")?.is_truthy()? {
            future.call_method1("set_result", (value,))?;
        }
    }
    Ok(())
}

fn http_status(status: u16) -> PyResult<StatusCode> {
    StatusCode::from_u16(status)
        .map_err(|_| PyRuntimeError::new_err(format!("{status} is not an HTTP status")))
}

fn header_name(name: &[u8]) -> PyResult<HeaderName> {
    HeaderName::from_bytes(name).map_err(|_| {
        PyRuntimeError::new_err(format!(
            "{:?} is not a header name",
            String::from_utf8_lossy(name)
        ))
    })
}

fn header_value(name: &str, value: &[u8]) -> PyResult<HeaderValue> {
    HeaderValue::from_bytes(value)
        .map_err(|_| PyRuntimeError::new_err(format!("the {name} header's value is not valid")))
}

/// Bytes as PEP 3333's native strings: each byte one Latin-1 character.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|b| char::from(*b)).collect()
}

/// A request's WSGI environ, but for `wsgi.input` and `wsgi.errors`.
fn environ<'py>(py: Python<'py>, head: &http::request::Parts) -> PyResult<Bound<'py, PyDict>> {
    let environ = PyDict::new(py);
    environ.set_item("REQUEST_METHOD", head.method.as_str())?;
    environ.set_item("SCRIPT_NAME", "")?;
    environ.set_item("PATH_INFO", latin1(&percent_decoded_bytes(head.uri.path())))?;
    environ.set_item("QUERY_STRING", head.uri.query().unwrap_or(""))?;
    let host = head
        .headers
        .get(http::header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| head.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or(b"localhost");
    let host = latin1(host);
    let client = head.extensions.get::<crate::ClientInfo>();
    let scheme = client.map_or("http", |c| c.scheme);
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => {
            (name.to_owned(), port.to_owned())
        }
        _ => (
            host.clone(),
            if scheme == "https" { "443" } else { "80" }.to_owned(),
        ),
    };
    environ.set_item("SERVER_NAME", name)?;
    environ.set_item("SERVER_PORT", port)?;
    environ.set_item(
        "SERVER_PROTOCOL",
        match head.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            _ => "HTTP/1.1",
        },
    )?;
    environ.set_item(
        "REMOTE_ADDR",
        client
            .and_then(|c| c.addr)
            .map_or_else(String::new, |ip| ip.to_string()),
    )?;
    environ.set_item("wsgi.version", (1, 0))?;
    environ.set_item("wsgi.url_scheme", scheme)?;
    environ.set_item("wsgi.multithread", true)?;
    environ.set_item("wsgi.multiprocess", true)?;
    environ.set_item("wsgi.run_once", false)?;
    if !head.headers.contains_key(http::header::HOST) {
        if let Some(authority) = head.uri.authority() {
            environ.set_item("HTTP_HOST", authority.as_str())?;
        }
    }
    for name in head.headers.keys() {
        let mut values = head.headers.get_all(name).iter();
        let Some(first) = values.next() else {
            continue;
        };
        let mut value = latin1(first.as_bytes());
        // HTTP/2 sends each cookie as a field of its own; an application
        // is given them as one, joined with "; " (RFC 9113, 8.2.3).
        let comma = if name == http::header::COOKIE {
            "; "
        } else {
            ","
        };
        for more in values {
            value.push_str(comma);
            value.push_str(&latin1(more.as_bytes()));
        }
        let key = match *name {
            http::header::CONTENT_TYPE => "CONTENT_TYPE".to_owned(),
            http::header::CONTENT_LENGTH => "CONTENT_LENGTH".to_owned(),
            _ => {
                let mut key = String::with_capacity(5 + name.as_str().len());
                key.push_str("HTTP_");
                key.extend(name.as_str().chars().map(|c| match c {
                    '-' => '_',
                    c => c.to_ascii_uppercase(),
                }));
                key
            }
        };
        environ.set_item(key, value)?;
    }
    Ok(environ)
}

/// The ASGI scope of a request.
fn scope<'py>(
    py: Python<'py>,
    head: &http::request::Parts,
    state: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyDict>> {
    let scope = PyDict::new(py);
    let asgi = PyDict::new(py);
    asgi.set_item("version", "3.0")?;
    asgi.set_item("spec_version", "2.3")?;
    scope.set_item("type", "http")?;
    scope.set_item("asgi", asgi)?;
    scope.set_item(
        "http_version",
        match head.version {
            http::Version::HTTP_10 => "1.0",
            http::Version::HTTP_2 => "2",
            _ => "1.1",
        },
    )?;
    scope.set_item("method", head.method.as_str())?;
    let client = head.extensions.get::<crate::ClientInfo>();
    scope.set_item("scheme", client.map_or("http", |c| c.scheme))?;
    let raw_path = head.uri.path();
    scope.set_item("path", percent_decoded(raw_path))?;
    scope.set_item("raw_path", PyBytes::new(py, raw_path.as_bytes()))?;
    scope.set_item(
        "query_string",
        PyBytes::new(py, head.uri.query().unwrap_or("").as_bytes()),
    )?;
    scope.set_item("root_path", "")?;
    let headers = PyList::empty(py);
    if !head.headers.contains_key(http::header::HOST) {
        if let Some(authority) = head.uri.authority() {
            headers.append(PyTuple::new(
                py,
                [
                    PyBytes::new(py, b"host"),
                    PyBytes::new(py, authority.as_str().as_bytes()),
                ],
            )?)?;
        }
    }
    // HTTP/2 sends each cookie as a field of its own; an application is
    // given them as one, joined with "; " (RFC 9113, 8.2.3: Starlette and
    // others read only the first `cookie` field).
    let cookies = head.headers.get_all(http::header::COOKIE);
    let joined = (cookies.iter().nth(1).is_some()).then(|| {
        let mut joined = Vec::new();
        for (i, value) in cookies.iter().enumerate() {
            if i > 0 {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(value.as_bytes());
        }
        joined
    });
    for (name, value) in &head.headers {
        if joined.is_some() && name == http::header::COOKIE {
            continue;
        }
        headers.append(PyTuple::new(
            py,
            [
                PyBytes::new(py, name.as_str().as_bytes()),
                PyBytes::new(py, value.as_bytes()),
            ],
        )?)?;
    }
    if let Some(joined) = joined {
        headers.append(PyTuple::new(
            py,
            [PyBytes::new(py, b"cookie"), PyBytes::new(py, &joined)],
        )?)?;
    }
    scope.set_item("headers", headers)?;
    match client.and_then(|c| c.addr) {
        // The port is not kept; 0 says so.
        Some(ip) => scope.set_item("client", (ip.to_string(), 0))?,
        None => scope.set_item("client", py.None())?,
    }
    scope.set_item("server", py.None())?;
    scope.set_item("state", state.copy()?)?;
    // zdr's extension: how long the connection has left before its age
    // ends it (`--max-connection-age`), if it has a limit; the glue adds
    // the worker.
    let zdr = PyDict::new(py);
    zdr.set_item(
        "connection_expires_in",
        client.and_then(|c| c.connection_expires).map(|at| {
            at.saturating_duration_since(std::time::Instant::now())
                .as_secs_f64()
        }),
    )?;
    let extensions = PyDict::new(py);
    extensions.set_item("zdr", zdr)?;
    scope.set_item("extensions", extensions)?;
    Ok(scope)
}

/// A path with its `%XX` escapes decoded (as UTF-8, lossily).
fn percent_decoded(path: &str) -> String {
    if !path.contains('%') {
        return path.to_owned();
    }
    String::from_utf8_lossy(&percent_decoded_bytes(path)).into_owned()
}

/// A path's bytes with its `%XX` escapes decoded.
fn percent_decoded_bytes(path: &str) -> Vec<u8> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The runtime's hold on a call: dropped (the client left, or the whole
/// response is out), the app hears `http.disconnect`.
struct Side(Arc<CallState>);

impl Drop for Side {
    fn drop(&mut self) {
        self.0.disconnect();
    }
}

/// The service's future: the response's head, once the app has sent it.
pub(super) struct Answer {
    side: Option<Side>,
}

impl Future for Answer {
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(side) = &self.side else {
            return Poll::Ready(Err("polled after its answer".into()));
        };
        let state = Arc::clone(&side.0);
        state.waker.register(cx.waker());
        let mut inner = state.lock();
        if let (Some(waited), Some(shedder)) = (inner.shed, &state.bridge.shed) {
            let body_left = !inner.body_done;
            drop(inner);
            self.side = None;
            return Poll::Ready(Ok(shedder.answer_taken(waited, body_left)));
        }
        if inner.start.is_none() || !inner.flushed {
            if let Some(why) = inner.failed.take() {
                return Poll::Ready(Err(
                    format!("the Python app raised:\n{}", why.trim_end()).into()
                ));
            }
            return Poll::Pending;
        }
        let Some((status, fields)) = inner.start.take() else {
            return Poll::Pending;
        };
        inner.head_taken = true;
        if let Some(shedder) = &state.bridge.shed {
            let taken = state.taken_ns.load(std::sync::atomic::Ordering::Relaxed);
            shedder.served(crate::sys::monotonic_ns().saturating_sub(taken));
        }
        let body = if inner.out_done && inner.out.len() <= 1 {
            // The whole body came with the head: one buffer, and the
            // call is over for the runtime.
            let bytes = inner.out.pop_front().unwrap_or_default();
            inner.out_bytes = 0;
            drop(inner);
            self.side = None;
            Body::from(bytes)
        } else {
            drop(inner);
            Body::new(Streamed {
                side: self.side.take(),
            })
        };
        let mut res = http::Response::new(body);
        *res.status_mut() = status;
        *res.headers_mut() = fields;
        Poll::Ready(Ok(res))
    }
}

/// A response body the app sends in parts.
struct Streamed {
    side: Option<Side>,
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(side) = &self.side else {
            return Poll::Ready(None);
        };
        let state = Arc::clone(&side.0);
        state.waker.register(cx.waker());
        let mut inner = state.lock();
        if let Some(bytes) = inner.out.pop_front() {
            inner.out_bytes -= bytes.len();
            if inner.out_bytes < ROOM {
                state.resume_app(&mut inner);
            }
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        if let Some(why) = inner.failed.take() {
            return Poll::Ready(Some(Err(format!(
                "the Python app raised mid-response:\n{}",
                why.trim_end()
            )
            .into())));
        }
        if inner.out_done {
            drop(inner);
            self.side = None;
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}
