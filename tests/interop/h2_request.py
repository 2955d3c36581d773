"""Sends HTTP/2 requests exactly as given, over cleartext HTTP/2 with prior
knowledge, with the python `h2` library's own checks turned off (so that
malformed requests go out as written), and prints what came back.

Usage: h2_request.py HOST PORT REQUESTS_JSON
REQUESTS_JSON is a list of requests, each a list of [name, value] header
fields (pseudo-headers first, as given). Each is sent on a stream of the
same connection, one after the other; prints one JSON line per request:
{"status": 200, "body": "...", "reset": null} or, for a stream the server
reset, {"status": null, "reset": "PROTOCOL_ERROR"}, or for a connection it
ended, {"goaway": "..."} (and no further requests are sent).
"""

import json
import socket
import sys

import h2.config
import h2.connection
import h2.events


def main():
    host, port, requests = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    sock = socket.create_connection((host, port), timeout=30)
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    for fields in requests:
        stream = conn.get_next_available_stream_id()
        headers = [(k.encode(), v.encode()) for k, v in fields]
        conn.send_headers(stream, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        result = {"status": None, "body": "", "reset": None}
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                result["goaway"] = "closed"
                print(json.dumps(result), flush=True)
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    for k, v in event.headers:
                        if k == b":status":
                            result["status"] = int(v)
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    result["body"] += event.data.decode("utf-8", "replace")
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    done = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    result["reset"] = event.error_code.name
                    done = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    result["goaway"] = event.error_code.name
                    print(json.dumps(result), flush=True)
                    return
            sock.sendall(conn.data_to_send())
        print(json.dumps(result), flush=True)


main()
