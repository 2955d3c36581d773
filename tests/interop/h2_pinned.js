// One HTTP/2 client (Node's http2, built on nghttp2) sending requests one
// after another on one connection, and on a new one only when the server
// closes the first (GOAWAY): prints a JSON line per answer, or per error.
// A stream refused (REFUSED_STREAM: "not processed", RFC 9113 section 8.7,
// what a request raced by a GOAWAY gets) is sent again on a new
// connection, as browsers, gRPC and Go's client do; it is counted.
// Usage: node h2_pinned.js http://HOST:PORT /path
const http2 = require("http2");
const [base, path] = process.argv.slice(2);
let session = null;
let sessions = 0;
let retried = 0;

function connect() {
  const s = http2.connect(base);
  sessions += 1;
  const drop = () => {
    if (session === s) session = null;
  };
  s.on("goaway", drop);
  s.on("close", drop);
  s.on("error", drop);
  return s;
}

function next() {
  if (session === null || session.closed || session.destroyed) session = connect();
  const req = session.request({ ":path": path });
  let body = "";
  let status = 0;
  req.setEncoding("utf8");
  req.on("response", (headers) => (status = headers[":status"]));
  req.on("data", (chunk) => (body += chunk));
  req.on("end", () => {
    const pid = Number((/pid=(\d+)/.exec(body) || [])[1] || 0);
    console.log(JSON.stringify({ status, pid, sessions, retried }));
    next();
  });
  req.on("error", (e) => {
    if (String(e).includes("NGHTTP2_REFUSED_STREAM")) {
      retried += 1;
      session = null;
      return next();
    }
    console.log(JSON.stringify({ error: String(e), sessions, retried }));
    process.exit(1);
  });
  req.end();
}

next();
