"""Property-based fuzzing of every JSON route of a live server: whatever the body, name, path or
query, the answer is never a 500, every /api answer is standard JSON (errors with a code and a
message), the server stays up, and its health check stays fast while it is being fuzzed."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_fixtures import HealthProbe, fuzz_registry
from hostile_strategies import any_values, as_json_text, documents, raw_bodies, texts

BUDGETS = [pytest.param(dict(max_examples=150, derandomize=True), id="brief"),
           pytest.param(dict(max_examples=2000), id="long", marks=pytest.mark.slow)]
HEALTH_P50_MS = 50.0


def encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def segment(text: str) -> str:
    """A path segment as a client would send it: percent-encoded, lone surrogates included."""
    return quote(encoded(text), safe="")


submissions = (documents(fuzz_registry()).map(lambda document: encoded(as_json_text({"workflow": document})))
               | st.builds(lambda document, outputs: encoded(as_json_text({"workflow": document, "outputs": outputs})),
                           documents(fuzz_registry()), st.lists(st.sampled_from(["out", "n0"]) | texts) | any_values))
bodies = raw_bodies | submissions | any_values.map(lambda value: encoded(as_json_text(value)))
run_ids = st.sampled_from(["0" * 32, "x"]) | texts
file_paths = st.lists(texts | st.sampled_from(["..", ".", "", ".hidden", "a.png", "%2e%2e"]), min_size=1, max_size=4)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None, dict[str, str]]:
    """(method, path with query, body, extra headers) for one route of the API."""
    route = draw(st.sampled_from(["submit", "list", "get", "cancel", "order", "save", "load", "convert", "files",
                                  "file", "upload", "catalogue", "queue", "events", "unknown"]))
    body = draw(bodies)
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain", "", "multipart/form-data",
                                                     "multipart/form-data; boundary=XYZ"]) | header_values)}
    if draw(st.integers(0, 9)) == 0:
        headers[draw(st.sampled_from(["Origin", "Host", "Authorization", "Cookie"]))] = draw(header_values)
    if route == "submit":
        return "POST", "/api/runs", draw(submissions | st.just(body)), headers
    if route == "list":
        query = draw(st.dictionaries(st.sampled_from(["limit", "status", "x"]), texts, max_size=2))
        return "GET", "/api/runs?" + urlencode({k: encoded(v) for k, v in query.items()}), None, headers
    if route == "get":
        return "GET", f"/api/runs/{segment(draw(run_ids))}", None, headers
    if route == "cancel":
        return "POST", f"/api/runs/{segment(draw(run_ids))}/cancel", None, headers
    if route == "order":
        return "POST", "/api/queue/order", body, headers
    if route in ("save", "load"):
        name = draw(texts.map(lambda text: text + ".json") | texts | st.integers(100, 400).map(lambda n: "w" * n + ".json"))
        return ("PUT" if route == "save" else "GET"), f"/api/workflows/{segment(name)}", body, headers
    if route == "convert":
        return "POST", "/api/workflows/convert", body, headers
    if route == "files":
        folder = draw(st.sampled_from(["inputs", "outputs", "workflows"]) | texts)
        return "GET", f"/api/files/{segment(folder)}?images={segment(draw(texts))}", None, headers
    if route == "file":
        folder = draw(st.sampled_from(["inputs", "outputs"]) | texts)
        return "GET", f"/api/files/{segment(folder)}/" + "/".join(segment(p) for p in draw(file_paths)), None, headers
    if route == "upload":
        return "POST", "/api/files/inputs", body, headers
    if route == "catalogue":
        return "GET", draw(st.sampled_from(["/api/nodes", "/api/models", "/api/openapi.json", "/api/workers"])), None, headers
    if route == "queue":
        return draw(st.sampled_from(["GET", "DELETE"])), "/api/queue", None, headers
    if route == "events":
        return "GET", "/api/events", None, headers  # not an upgrade request
    return draw(st.sampled_from(["GET", "POST", "PATCH"])), "/api/" + segment(draw(texts)), body, headers


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in a response: not standard JSON")


@pytest.mark.parametrize("budget", BUDGETS)
def test_no_request_gets_a_500_and_health_stays_fast(live_server, budget):
    statuses: dict[int, int] = {}

    @settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), **budget)
    @given(request=requests())
    def check(request):
        method, path, body, headers = request
        status, response_headers, answer = live_server.request(method, path, body if method != "GET" else None, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, answer[:500])
        assert response_headers.get("Content-Type", "").startswith("application/json"), (status, answer[:200])
        data = json.loads(answer, parse_constant=_refuse_constant)
        if status >= 400:
            assert isinstance(data.get("error"), str) and isinstance(data.get("message"), str), data

    with HealthProbe(live_server) as probe:
        check()
    assert probe.failures == []
    assert len(probe.latencies) >= 10
    assert probe.p50_ms() < HEALTH_P50_MS, f"health p50 {probe.p50_ms():.1f} ms during the fuzz"
    assert live_server.request("GET", "/api/health")[0] == 200  # still up
    assert any(200 <= status < 300 for status in statuses) and any(400 <= status < 500 for status in statuses), statuses
