// A Node http server for `zdr serve -- node server.js` (see README.md
// beside it). It listens on $PORT; every answer names the process
// (`pid=`), the zdr generation (`generation=`) and the body bytes it read.
// `Upgrade: echo` switches a connection to echoing its bytes back.
const http = require("http");

const generation = process.env.ZDR_GENERATION || "0";

const server = http.createServer((req, res) => {
  let received = 0;
  req.on("data", (chunk) => (received += chunk.length));
  req.on("end", () => {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end(`pid=${process.pid} generation=${generation} received=${received}\n`);
  });
});

server.on("upgrade", (req, socket) => {
  socket.write(
    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
  );
  socket.pipe(socket);
});

server.listen(Number(process.env.PORT), "127.0.0.1");
process.on("SIGTERM", () => server.close(() => process.exit(0)));
