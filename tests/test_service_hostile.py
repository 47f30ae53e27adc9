"""The service under hostile input and careless deployment (issue 11, item 6): binds and
tokens, streamed body limits, deep JSON, lone surrogates, budgets, health, docs, principals."""

from __future__ import annotations

import contextlib
import json
import math
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest
import uvicorn
from durable_flows import chain_flow, review_flow
from fastapi import FastAPI
from served import served
from sqlalchemy import text
from typer.testing import CliRunner

from frugalflow import Catalog, UserError
from frugalflow.cli import app as cli
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import (
    Principal,
    UnauthenticatedServiceWarning,
    create_app,
    create_router,
    is_loopback,
    load_tokens,
)

MB = 1_000_000


def make_runner(db: str) -> Runner:
    return Runner(db, flows=[chain_flow(3), review_flow()], catalog=Catalog.simulated(),
                  breakers=BreakerRegistry())


@contextlib.asynccontextmanager
async def serving(db: str, **app_kwargs: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Runner]]:
    """A real uvicorn on 127.0.0.1 (ephemeral port) around `create_app(runner, **app_kwargs)`."""
    runner = make_runner(db)
    async with served(create_app(runner, **app_kwargs)) as url, httpx.AsyncClient(
            base_url=url, timeout=30) as client:
        yield client, runner


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'service.db'}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def one_line(r: httpx.Response) -> str:
    message = r.json()["detail"]["message"]
    assert "\n" not in message
    return str(message)


# -- binds and tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "192.168.1.7", "example.com"])
def test_a_wildcard_or_non_loopback_bind_needs_a_token(db: str, host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(UserError, match="without a bearer token"):
        create_app(make_runner(db), host=host)
    create_app(make_runner(db), host=host, token="t0ken")  # with one: fine


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_serves_without_a_token_and_without_a_warning(db: str, host: str) -> None:
    assert is_loopback(host)
    create_app(make_runner(db), host=host)  # warnings are errors in this test run


@pytest.mark.parametrize("bad", ["", " ", "two words", "caf\u00e9"])
def test_empty_or_unsendable_tokens_are_refused(db: str, bad: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="empty|spaces or non-ASCII"):
        create_app(make_runner(db), token=bad, host="0.0.0.0")
    with pytest.raises(UserError, match="empty|spaces or non-ASCII"):
        create_router(make_runner(db), token=bad)
    f = tmp_path / "tokens.toml"
    f.write_text(f'[alice]\ntoken = "{bad}"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"the token of \[alice\]"):
        load_tokens(f)


def test_tokens_file_mistakes_get_one_clear_line(tmp_path: Path) -> None:
    f = tmp_path / "tokens.toml"
    f.write_text('[alice]\ntoken = "a-secret"\nrole = "root"\n')
    with pytest.raises(UserError, match='role = "admin" or "user"'):
        load_tokens(f)
    f.write_text('[alice]\ntoken = "same"\n[bob]\ntoken = "same"\n')
    with pytest.raises(UserError, match=r"\[alice\] and \[bob\] have the same token") as e:
        load_tokens(f)
    assert "same" not in str(e.value).replace("the same token", "")  # the secret is not shown
    f.write_text("[alice\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_tokens(f)
    with pytest.raises(UserError, match="does not exist"):
        load_tokens(tmp_path / "missing.toml")
    f.write_text('[alice]\ntoken = "a-secret"\n')
    assert load_tokens(f) == {"a-secret": Principal("alice", "user")}
    f.write_text('[admin]\ntoken = "a-secret"\nrole = "user"\n')
    with pytest.raises(UserError, match="name 'admin' is given both roles"):
        create_router(make_runner(f"sqlite:///{tmp_path / 'x.db'}"), token="ops-secret",
                      tokens=f)


def test_create_router_without_a_token_warns_unless_told_it_is_meant(db: str) -> None:
    with pytest.warns(UnauthenticatedServiceWarning, match="allow_unauthenticated=True"):
        create_router(make_runner(db))
    create_router(make_runner(db), allow_unauthenticated=True)  # no warning (they are errors)
    create_router(make_runner(db), token="t0ken")


def test_cli_serve_refuses_unauthenticated_wildcard_binds(
        db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw))
    monkeypatch.delenv("FRUGALFLOW_TOKEN", raising=False)
    monkeypatch.delenv("FRUGALFLOW_TOKENS", raising=False)
    flows = tmp_path / "flows"
    flows.mkdir()
    base = ["serve", "--db", db, "--flows", str(flows)]
    runner = CliRunner()

    r = runner.invoke(cli, [*base, "--host", ""])
    assert r.exit_code == 1 and served == []
    assert r.output.startswith("error: refusing to serve on every interface (an empty host) "
                               "without a bearer token") and r.output.count("\n") == 1
    r = runner.invoke(cli, [*base, "--host", "0.0.0.0", "--token", ""])
    assert r.exit_code == 1 and served == [] and "is empty" in r.output
    assert r.output.count("\n") == 1
    r = runner.invoke(cli, [*base, "--host", "::"])
    assert r.exit_code == 1 and served == []

    r = runner.invoke(cli, [*base, "--host", "0.0.0.0", "--token", "t0ken"])
    assert r.exit_code == 0 and served[-1]["host"] == "0.0.0.0"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[alice]\ntoken = "alice-secret"\nrole = "user"\n')
    r = runner.invoke(cli, [*base, "--host", "::"], env={"FRUGALFLOW_TOKENS": str(tokens)})
    assert r.exit_code == 0 and served[-1]["host"] == "::"


# -- body limits on the stream ------------------------------------------------------------


class Chunks:
    """A streamed request body: `n` chunks of 64 KB, counting how many were pulled."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.n):
            self.pulled += 1
            yield b'{"flow": "chain", "input": {"x": "' if self.pulled == 1 else b"x" * 65536


async def test_a_chunked_5_mb_upload_gets_413_from_a_real_server_and_stores_nothing(
        tmp_path: Path) -> None:
    path = tmp_path / "service.db"
    async with serving(f"sqlite:///{path}") as (client, runner):
        body = Chunks(80)  # ~5 MB, no Content-Length: Transfer-Encoding chunked
        r = await client.post("/runs", content=body.__aiter__(),
                              headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over 1000000 bytes" in one_line(r)
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in r.request.headers
        assert (await client.get("/runs")).json() == []
        assert await runner.ledger.list_runs() == []
        # And the server still serves on.
        ok = await client.post("/runs", json={"flow": "chain", "input": {"topic": "t"},
                                              "wait": True})
        assert ok.status_code == 200 and ok.json()["status"] == "succeeded"
    size = sum(p.stat().st_size for p in tmp_path.glob("service.db*"))
    assert size < MB, f"{size} bytes on disk"


async def test_the_limit_is_enforced_while_streaming_whatever_content_length_says(
        db: str) -> None:
    runner = make_runner(db)
    app = create_app(runner)
    transport = httpx.ASGITransport(app=app)  # streams the request body chunk by chunk
    async with runner_lifespan(runner), httpx.AsyncClient(transport=transport,
                                                          base_url="http://app") as client:
        chunked = Chunks(80)
        r = await client.post("/runs", content=chunked.__aiter__(),
                              headers={"content-type": "application/json"})
        assert r.status_code == 413
        # The server stopped reading just past 1 MB: 16 chunks of 64 KB, not all 80.
        assert chunked.pulled <= MB // 65536 + 2, chunked.pulled
        lying = Chunks(80)
        r = await client.post("/runs", content=lying.__aiter__(),
                              headers={"content-type": "application/json",
                                       "content-length": "100"})
        assert r.status_code == 413 and lying.pulled <= MB // 65536 + 2
        r = await client.post("/runs", content=b"x" * 2 * MB,
                              headers={"content-type": "application/json"})
        assert r.status_code == 413  # a declared Content-Length over the limit: at once
        assert await runner.ledger.list_runs() == []


async def test_a_mounted_router_limits_its_bodies_without_the_middleware(db: str) -> None:
    runner = make_runner(db)
    app = FastAPI()
    app.include_router(create_router(runner, token="t0ken", max_body_bytes=200_000))
    async with runner_lifespan(runner), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://app",
            headers=bearer("t0ken")) as client:
        body = Chunks(80)
        r = await client.post("/runs", content=body.__aiter__(),
                              headers={"content-type": "application/json"})
        assert r.status_code == 413 and one_line(r) == "request body over 200000 bytes"
        assert body.pulled <= 200_000 // 65536 + 2
        assert await runner.ledger.list_runs() == []


@contextlib.asynccontextmanager
async def runner_lifespan(runner: Runner) -> AsyncIterator[None]:
    await runner.setup()
    try:
        yield
    finally:
        await runner.close()


# -- JSON depth, surrogates, numbers -------------------------------------------------------


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"a": value}
    return value


async def test_deep_json_and_lone_surrogates_get_422_with_one_line(db: str) -> None:
    async with serving(db) as (client, runner):
        # The body is level 1, "input" level 2: 63 levels of input fit in 64.
        r = await client.post("/runs", json={"flow": "chain", "input": nested(62)})
        # past the depth guard: refused only for its unknown field (the input check)
        assert r.status_code == 422 and "unknown field 'a'" in one_line(r)
        r = await client.post("/runs", json={"flow": "chain", "input": nested(300)})
        assert r.status_code == 422
        assert one_line(r).startswith("the request's JSON is nested deeper than 64 levels "
                                      "(at input.a.a.a")
        r = await client.post("/runs", content=b"[" * 500_000,
                              headers={"content-type": "application/json"})
        assert r.status_code == 422 and "nested deeper than 64 levels" in one_line(r)
        raw = b'{"flow": "chain", "input": {"topic": "x\\ud800y"}}'  # the escape, as sent
        r = await client.post("/runs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert one_line(r) == ("the request's JSON has a lone surrogate (\\ud800) at input.topic: "
                               "send valid Unicode text (a \\ud800-\\udfff escape must be half "
                               "of a pair)")
        big = b'{"flow": "chain", "input": {"pad": "%s", "t": "\\ud800"}}' % (b"x" * 200_000)
        r = await client.post("/runs", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "lone surrogate (\\ud800) at input.t" in one_line(r)
        r = await client.post("/runs", json={"flow": "chain",
                                             "input": {"topic": "t", "pad": ["x" * 9] * 60_000}})
        # 720 KB of valid JSON (parsed off the event loop), refused only for its unknown field
        assert r.status_code == 422 and "unknown field 'pad'" in one_line(r)
        r = await client.post("/runs", content=b'{"flow": "chain", "input": {"k\\udfff": 1}}',
                              headers={"content-type": "application/json"})
        assert r.status_code == 422 and "lone surrogate (\\udfff)" in one_line(r)
        pair = b'{"flow": "chain", "input": {"topic": "\\ud83d\\ude00"}, "wait": true}'
        r = await client.post("/runs", content=pair, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["state"]["topic"] == "\U0001f600"
        r = await client.post("/runs", content=b'{"flow": "chain", "input": {"x": NaN}}',
                              headers={"content-type": "application/json"})
        assert r.status_code == 422 and one_line(r).startswith(
            "the number at input.x is not finite (NaN, Infinity, or too large for a double")
        r = await client.post(f"/runs/{'x' * 8}/resume", content=b'{"value": "\\udc80"}',
                              headers={"content-type": "application/json"})
        assert r.status_code == 422 and "at value" in one_line(r)
        runs = await runner.ledger.list_runs()
        assert len(runs) == 1  # the one accepted, nothing of the refused


async def insert_raw_run(runner: Runner, run_id: str, input_json: str, **extra: Any) -> None:
    """A row written straight into ff_runs, bypassing the API and the ledger's checks."""
    await runner.store.setup()
    cols = {"id": run_id, "flow": "chain", "status": "succeeded", "input": input_json,
            "cost_usd": 0.0, "cancel_requested": False, **extra}
    names = ", ".join(cols)
    values = ", ".join(f":{k}" for k in cols)
    async with runner.store.write() as conn:
        await conn.execute(text(f"INSERT INTO ff_runs ({names}, created_at, updated_at) "
                                f"VALUES ({values}, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                           cols)


async def test_no_stored_run_breaks_listing_or_reading_for_others(db_url: str) -> None:
    runner = make_runner(db_url)
    app = create_app(runner)
    async with runner_lifespan(runner), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        good = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "ok"},
                                                 "wait": True})).json()["run_id"]
        # Through the Python API (no depth limit there): readable, too deep to render.
        await runner.ledger.create_run("deep-300", "chain", nested(300))
        # Straight into the table: past the JSON decoder's recursion limit.
        await insert_raw_run(runner, "deep-5000", '{"a":' * 5000 + "1" + "}" * 5000)
        # A lone surrogate escape and non-finite numbers from before budgets were checked.
        await insert_raw_run(runner, "odd", '{"t": "x\\ud800y"}', budget_usd=math.nan,
                             cost_usd=math.inf)
        r = await client.get("/runs")
        assert r.status_code == 200
        runs = {run["id"]: run for run in r.json()}
        assert set(runs) == {good, "deep-300", "deep-5000", "odd"}
        assert runs[good]["input"] == {"topic": "ok"}
        assert runs["deep-300"]["input"] == {
            "not_shown": "the stored input is nested deeper than 200 levels"}
        assert runs["deep-5000"]["input"] == {
            "unreadable": "the stored input cannot be decoded (RecursionError)"}
        assert runs["odd"]["input"] == {"t": "x\ud800y"}  # shown as the \ud800 escape
        assert runs["odd"]["budget_usd"] is None and runs["odd"]["cost_usd"] is None
        for run_id in runs:
            one = await client.get(f"/runs/{run_id}")
            assert one.status_code == 200 and one.json()["id"] == run_id
        assert len((await client.get(f"/runs/{good}")).json()["calls"]) == 3


# -- lone surrogates that reach the ledger from a node's own output ------------------------


class OddState(TypedDict, total=False):
    topic: str
    text: str
    answer: str


async def test_a_lone_surrogate_in_a_prompt_loses_no_attempt_row(db_url: str) -> None:
    from langchain_core.messages import HumanMessage

    from frugalflow import END, START, Flow, Needs, RoutedChatModel

    flow: Flow[OddState] = Flow("odd", OddState)

    @flow.node()
    def fetch(state: OddState) -> OddState:
        # What json.loads makes of an external API's "\ud800" escape: a lone surrogate.
        return {"text": json.loads('"caf\\ud800 order 7"')}

    @flow.node(needs=Needs())
    async def answer(state: OddState, model: RoutedChatModel) -> OddState:
        reply = await model.ainvoke([HumanMessage(f"summarise: {state['text']}")])
        return {"answer": str(reply.content)}

    flow.add_edge(START, "fetch")
    flow.add_edge("fetch", "answer")
    flow.add_edge("answer", END)
    runner = Runner(db_url, flows=[flow], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry())
    try:
        result = await runner.start("odd", {"topic": "t"})
        assert result.status == "succeeded" and result.cost_usd > 0
        record = await runner.get(result.run_id)
        (call,) = record.attempts  # the paid call is in the ledger...
        assert call.prompt == "summarise: caf\\ud800 order 7"  # ...its prompt escaped as text
        assert record.run.cost_usd == pytest.approx(call.cost_usd)
    finally:
        await runner.close()


async def test_a_lone_surrogate_in_an_error_still_records_the_failure(db_url: str) -> None:
    from frugalflow import END, START, Flow

    flow: Flow[OddState] = Flow("oops", OddState)

    @flow.node()
    def fetch(state: OddState) -> OddState:
        raise ValueError(json.loads('"no such order: caf\\ud800"'))

    flow.add_edge(START, "fetch")
    flow.add_edge("fetch", END)
    runner = Runner(db_url, flows=[flow], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry())
    try:
        result = await runner.start("oops", {"topic": "t"})
        assert result.status == "failed"
        row = await runner.ledger.get_run(result.run_id)
        assert row.status == "failed" and "no such order: caf\\ud800" in (row.error or "")
    finally:
        await runner.close()


# -- budgets -------------------------------------------------------------------------------


BAD_BUDGETS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"0", b"-1", b'"lots"']


async def test_budgets_must_be_finite_and_positive_in_the_service(db: str) -> None:
    async with serving(db) as (client, runner):
        review = (await client.post("/runs", json={"flow": "review", "input": {"text": "hi"},
                                                   "wait": True})).json()
        assert review["status"] == "interrupted"
        for bad in BAD_BUDGETS:
            for path, body in [("/runs", b'{"flow": "chain", "budget": %s}' % bad),
                               (f"/runs/{review['run_id']}/resume", b'{"budget": %s}' % bad)]:
                r = await client.post(path, content=body,
                                      headers={"content-type": "application/json"})
                assert r.status_code == 422, (path, bad, r.text)
                assert "budget" in r.text
        assert len(await runner.ledger.list_runs()) == 1
        r = await client.post("/runs", json={"flow": "chain", "input": {"topic": "t"},
                                             "budget": 0.5, "wait": True})
        assert r.status_code == 200 and r.json()["status"] == "succeeded"


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e400", "0", "-1"])
def test_budgets_must_be_finite_and_positive_in_the_cli(bad: str) -> None:
    for command in (["run", "chain"], ["resume", "some-run"]):
        r = CliRunner().invoke(cli, [*command, f"--budget={bad}"])
        assert r.exit_code == 1
        assert r.output.startswith("error: --budget: budget must be a finite amount of USD "
                                   "above 0") and r.output.count("\n") == 1, r.output


async def test_budgets_must_be_finite_and_positive_in_python(db: str) -> None:
    from frugalflow.flow import check_budget

    compiled = chain_flow(2).compile(Catalog.simulated())
    for bad in (math.nan, math.inf, -math.inf, float("1e400"), 0, -1, 10**400, True, "1"):
        with pytest.raises(ValueError, match="budget must be"):
            compiled.new_context(budget=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="budget must be"):
            check_budget(bad)  # type: ignore[arg-type]
    assert check_budget(None) is None and check_budget(1) == 1.0
    runner = make_runner(db)
    try:
        with pytest.raises(ValueError, match="finite amount of USD above 0"):
            await runner.start("chain", {"topic": "t"}, budget=math.nan)
        with pytest.raises(ValueError, match="finite amount of USD above 0"):
            await runner.start("chain", {"topic": "t"}, budget=-1)
        assert await runner.ledger.list_runs() == []  # refused before anything was written
        paused = await runner.start("review", {"text": "hi"})
        with pytest.raises(ValueError, match="finite amount of USD above 0"):
            await runner.resume(paused.run_id, "yes", budget=math.inf)
        assert (await runner.resume(paused.run_id, "yes", budget=1.0)).ok
    finally:
        await runner.close()


# -- health, 404s, docs --------------------------------------------------------------------


async def test_health_is_public_and_its_details_need_the_token(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'secret-place.db'}"
    async with serving(db, token="t0ken") as (client, _):
        assert (await client.get("/health")).json() == {"ok": True}
        assert (await client.get("/health", headers=bearer("nope"))).json() == {"ok": True}
        details = (await client.get("/health", headers=bearer("t0ken"))).json()
        assert details["ok"] is True and details["database"] == {
            "dialect": "sqlite", "schema_version": details["database"]["schema_version"],
            "reachable": True}
        assert details["flows"] == ["chain", "review"] and "sim-openai" in details["providers"]
        assert "secret-place" not in json.dumps(details)
        for path in ("/runs/missing", "/runs/missing/events"):
            r = await client.get(path, headers=bearer("t0ken"))
            assert r.status_code == 404 and one_line(r) == "no run 'missing'"
            assert "secret-place" not in r.text and "sqlite" not in r.text
        for path in ("/runs/missing/resume", "/runs/missing/cancel"):
            r = await client.post(path, json={}, headers=bearer("t0ken"))
            assert r.status_code == 404 and "secret-place" not in r.text


async def test_an_unreachable_database_is_503_without_its_url(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = Runner(f"postgresql://app:pw@127.0.0.1:{port}/secretdb",
                    flows=[chain_flow(2)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry())
    app = FastAPI()
    app.include_router(create_router(runner, token="t0ken"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app",
                                 headers=bearer("t0ken")) as client:
        for r in (await client.get("/runs"), await client.get("/runs/r1"),
                  await client.post("/runs", json={"flow": "chain", "input": {"topic": "t"}})):
            assert r.status_code == 503, r.text
            assert one_line(r) == "the database is unavailable; try again later"
            assert "secretdb" not in r.text and str(port) not in r.text
        health = (await client.get("/health")).json()
        assert health["ok"] is True and health["database"]["reachable"] is False
    assert "secretdb" in caplog.text  # the operator's log has the details
    await runner.close()


@pytest.mark.parametrize("docs", ["token", "public", "off"])
async def test_openapi_docs_can_be_behind_the_token(db: str, docs: str) -> None:
    async with serving(db, token="t0ken", docs=docs) as (client, _):
        for path in ("/openapi.json", "/docs"):
            anonymous = await client.get(path)
            with_token = await client.get(path, headers=bearer("t0ken"))
            if docs == "token":
                assert (anonymous.status_code, with_token.status_code) == (401, 200)
            elif docs == "public":
                assert (anonymous.status_code, with_token.status_code) == (200, 200)
            else:
                assert (anonymous.status_code, with_token.status_code) == (404, 404)
        if docs != "off":
            schema = (await client.get("/openapi.json", headers=bearer("t0ken"))).json()
            assert "/runs/{run_id}/resume" in schema["paths"]


# -- principals ----------------------------------------------------------------------------


async def test_users_see_and_touch_only_their_own_runs(db: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[alice]\ntoken = "alice-secret"\n'
                      '[bob]\ntoken = "bob-secret"\nrole = "user"\n'
                      '[root]\ntoken = "root-secret"\nrole = "admin"\n')
    async with serving(db, tokens=str(tokens), token="ops-secret") as (client, runner):
        alice, bob, root, ops = (bearer(t) for t in
                                 ("alice-secret", "bob-secret", "root-secret", "ops-secret"))
        a = (await client.post("/runs", json={"flow": "review", "input": {"text": "a"},
                                              "wait": True}, headers=alice)).json()
        b = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "b"},
                                              "wait": True}, headers=bob)).json()
        o = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "o"},
                                              "wait": True}, headers=ops)).json()
        assert a["status"] == "interrupted" and b["status"] == "succeeded"

        def ids(r: httpx.Response) -> set[str]:
            return {run["id"] for run in r.json()}

        assert ids(await client.get("/runs", headers=alice)) == {a["run_id"]}
        assert ids(await client.get("/runs", headers=bob)) == {b["run_id"]}
        assert ids(await client.get("/runs", headers=root)) == {a["run_id"], b["run_id"],
                                                                o["run_id"]}
        assert ids(await client.get("/runs", headers=ops)) == ids(
            await client.get("/runs", headers=root))
        mine = (await client.get(f"/runs/{a['run_id']}", headers=alice)).json()
        assert mine["principal"] == "alice"
        assert (await client.get(f"/runs/{o['run_id']}", headers=root)).json()[
            "principal"] == "admin"  # the single token's principal

        # Bob cannot see, follow, resume, cancel or judge Alice's run: 404, as for none.
        a_id = a["run_id"]
        missing = await client.get("/runs/no-such-run", headers=bob)
        for method, path, body in [("GET", f"/runs/{a_id}", None),
                                   ("GET", f"/runs/{a_id}/events", None),
                                   ("POST", f"/runs/{a_id}/resume", {"value": "no"}),
                                   ("POST", f"/runs/{a_id}/cancel", None),
                                   ("POST", f"/runs/{a_id}/feedback",
                                    {"good": False, "node": "draft"})]:
            r = await client.request(method, path, json=body, headers=bob)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json() == json.loads(missing.text.replace("no-such-run", a_id))
        run = await runner.get(a_id)
        assert run.run.status == "interrupted" and all(c.feedback is None for c in run.attempts)

        # Alice can; so can an admin.
        r = await client.post(f"/runs/{a_id}/feedback", json={"good": True, "node": "draft"},
                              headers=alice)
        assert r.status_code == 200
        r = await client.post(f"/runs/{a_id}/resume", json={"value": "yes", "wait": True},
                              headers=alice)
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
        assert (await client.post(f"/runs/{b['run_id']}/cancel", headers=root)).status_code == 200
        assert (await client.get("/runs", headers=bearer("alice-secretX"))).status_code == 401
        assert (await client.get("/runs", headers={"Authorization": "Basic alice-secret"}
                                 )).status_code == 401


async def test_every_token_is_compared_in_constant_time_without_early_exit(
        db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    import frugalflow.service.auth as service

    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(service.hmac, "compare_digest", counting)
    tokens = {f"token-{i}" + "x" * i: Principal(f"p{i}") for i in range(5)}
    app = FastAPI()
    app.include_router(create_router(make_runner(db), token="t0ken", tokens=tokens))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://app") as client:
        for token in ("t0ken", "token-3xxx", "wrong", "token-0"):
            for path in ("/flows", "/runs"):  # /runs also asks who the caller is: once
                compared.clear()
                await client.get(path, headers=bearer(token))
                # Every configured token, whichever matched, as equal-length digests.
                assert compared == [(32, 32)] * 6


async def test_a_version_2_database_gains_the_principal_column_in_place(db_url: str) -> None:
    from frugalflow.persistence import Store
    from frugalflow.persistence.store import SCHEMA_VERSION

    store = Store(db_url)
    runner = Runner(store, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry())
    kept = await runner.start("chain", {"topic": "v2"})
    # Make it a database written by release 2: no ff_runs.principal, schema version 2.
    async with store.write() as conn:
        await conn.execute(text("DROP INDEX ix_ff_runs_principal"))
        await conn.execute(text("ALTER TABLE ff_runs DROP COLUMN principal"))
        await conn.execute(text("DELETE FROM ff_schema WHERE v > 2"))
    await runner.close()

    again = Store(db_url)
    upgraded = Runner(again, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                      breakers=BreakerRegistry())
    try:
        assert await again.version() == 2
        new = await upgraded.start("chain", {"topic": "v3"}, principal="alice")
        assert new.ok and await again.version() == SCHEMA_VERSION >= 3
        assert (await upgraded.ledger.get_run(kept.run_id)).principal is None
        assert [r.id for r in await upgraded.ledger.list_runs(principal="alice")] == [new.run_id]
        assert len((await upgraded.get(kept.run_id)).attempts) == 2  # nothing lost
    finally:
        await upgraded.close()
