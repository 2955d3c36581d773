"""A Flask app that logs a browser in the way real ones do: `/set` sets
three cookies and redirects to `/get`, which answers the cookies it
received as JSON. Behind zdr over HTTP/2, a browser sends them as separate
`cookie` fields; all three must arrive. `/get` also names the scheme the app
was told of (`X-Forwarded-Proto` behind a proxy; the WSGI scheme and
protocol when served in-process)."""

from flask import Flask, jsonify, make_response, redirect, request

app = Flask(__name__)


@app.get("/set")
def set_cookies():
    response = make_response(redirect("/get"))
    for name, value in (("a", "1"), ("b", "2"), ("c", "3")):
        response.set_cookie(name, value, secure=True)
    return response


@app.get("/get")
def get_cookies():
    return jsonify(
        cookies=dict(request.cookies),
        proto=request.headers.get("X-Forwarded-Proto"),
        fields=len(request.headers.getlist("Cookie")),
        scheme=request.scheme,
        http=request.environ.get("SERVER_PROTOCOL"),
    )
