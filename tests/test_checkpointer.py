"""SQLModelSaver: LangGraph's conformance suite at level FULL, on SQLite and PostgreSQL, and
what the suite does not check (blobs per changed channel, secret scrubbing, the sync API,
a real graph resumed by a new process-like saver, group commit, cancellation, lease fences)."""

from __future__ import annotations

import asyncio
import operator
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.serde.types import ERROR, INTERRUPT
from langgraph.graph import END, START, StateGraph
from sqlalchemy import func, select

from frugalflow.exceptions import LeaseError
from frugalflow.persistence import Store
from frugalflow.persistence import tables as t
from frugalflow.persistence.saver import SQLModelSaver
from frugalflow.persistence.scrub import REDACTED, scrub_metadata
from frugalflow.persistence.leases import Fence, fenced

BLOBS: Any = t.CheckpointBlobRow.__table__  # type: ignore[attr-defined]
CHECKPOINTS: Any = t.CheckpointRow.__table__  # type: ignore[attr-defined]

# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or the session's PostgreSQL database (`pg_url`, from tests/pg.py via
    conftest's pytest_plugins): savers of different tests use different thread IDs."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'checkpoints.db'}"
    return request.getfixturevalue("pg_url")  # type: ignore[no-any-return]


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store(db_url)
    yield s
    await s.close()


@pytest.fixture
def saver(store: Store) -> SQLModelSaver:
    return SQLModelSaver(store)


def _config(thread_id: str, checkpoint_id: str | None = None, ns: str = "") -> Any:
    conf = {"thread_id": thread_id, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _checkpoint(values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    cp = empty_checkpoint()
    cp["channel_values"] = values
    cp["channel_versions"] = versions
    return cp


async def _count(store: Store, table: Any, thread_id: str) -> int:
    async with store.read() as conn:
        return int((await conn.execute(
            select(func.count()).select_from(table).where(table.c.thread_id == thread_id)
        )).scalar_one())


# -- the official conformance suite ----------------------------------------------------------


async def test_conformance_is_full(db_url: str) -> None:
    stores: list[Store] = []

    async def factory() -> AsyncIterator[SQLModelSaver]:
        s = Store(db_url)  # a fresh saver (and Store) per capability, as the suite asks
        stores.append(s)
        yield SQLModelSaver(s)
        await s.close()

    registered = checkpointer_test(name=f"SQLModelSaver[{db_url.split(':')[0]}]")(factory)
    report = await validate(registered)
    if report.conformance_level() != "FULL":
        report.print_report()
        for name, result in report.results.items():
            for failure in result.failures:
                print(f"FAILED {name}: {failure}")
    assert report.conformance_level() == "FULL", report.to_dict()


# -- storage layout --------------------------------------------------------------------------


async def test_blobs_are_written_only_for_changed_channels(
    saver: SQLModelSaver, store: Store
) -> None:
    tid = uuid.uuid4().hex
    v1 = {ch: saver.get_next_version(None, None) for ch in ("a", "b", "c")}
    first = await saver.aput(_config(tid), _checkpoint({"a": [1], "b": {"x": 1}, "c": "big" * 100},
                                                        v1), {"step": 0}, v1)
    assert await _count(store, BLOBS, tid) == 3

    v2 = {**v1, "a": saver.get_next_version(v1["a"], None)}
    second = await saver.aput(first, _checkpoint({"a": [1, 2], "b": {"x": 1}, "c": "big" * 100},
                                                 v2), {"step": 1}, {"a": v2["a"]})
    # One new blob (channel a), not three: b and c point at the first put's blobs.
    assert await _count(store, BLOBS, tid) == 4

    latest = await saver.aget_tuple(second)
    older = await saver.aget_tuple(first)
    assert latest is not None and older is not None
    assert latest.checkpoint["channel_values"] == {"a": [1, 2], "b": {"x": 1}, "c": "big" * 100}
    assert older.checkpoint["channel_values"]["a"] == [1]
    assert v2["a"] > v1["a"]  # versions sort as strings
    assert len(v2["a"].split(".")[0]) == 32


async def test_checkpoint_row_holds_no_channel_values(saver: SQLModelSaver, store: Store) -> None:
    tid = uuid.uuid4().hex
    marker = "value-only-in-blobs-" + uuid.uuid4().hex
    versions = {"a": saver.get_next_version(None, None)}
    await saver.aput(_config(tid), _checkpoint({"a": marker}, versions), {}, versions)
    async with store.read() as conn:
        (row,) = (await conn.execute(
            select(CHECKPOINTS.c.checkpoint).where(CHECKPOINTS.c.thread_id == tid))).all()
    assert marker.encode() not in row.checkpoint


# -- metadata --------------------------------------------------------------------------------


def test_scrub_metadata_redacts_secret_keys_at_any_depth() -> None:
    md = {
        "api_key": "k", "OpenAI_ApiKey": "k", "headers": {"Authorization": "Bearer x"},
        "db": {"password": "p", "nested": [{"client_secret": "s"}]}, "access_token": "t",
        "input_tokens": 5, "max_tokens": 10, "note": "uses key sk-abcdefghijklmnop",
        "parents": {"get_token:1": "cp-id"}, "step": 1, "source": "loop",
    }
    assert scrub_metadata(md) == {
        "api_key": REDACTED, "OpenAI_ApiKey": REDACTED, "headers": {"Authorization": REDACTED},
        "db": {"password": REDACTED, "nested": [{"client_secret": REDACTED}]},
        "access_token": REDACTED, "input_tokens": 5, "max_tokens": 10,
        "note": f"uses key {REDACTED}",
        # LangGraph's own map of namespaces is not a secret, whatever a node is called.
        "parents": {"get_token:1": "cp-id"}, "step": 1, "source": "loop",
    }


async def test_secrets_in_metadata_never_reach_the_database(
    saver: SQLModelSaver, store: Store
) -> None:
    secret = "sk-live-" + uuid.uuid4().hex
    tid = uuid.uuid4().hex
    config = _config(tid)
    config["metadata"] = {"openai_api_key": secret, "user": "ann"}  # merged by LangGraph rules
    md: Any = {"source": "input", "step": -1, "parents": {}, "input_tokens": 12,
               "request": {"headers": {"authorization": f"Bearer {secret}"}, "password": secret}}
    stored = await saver.aput(config, _checkpoint({}, {}), md, {})

    tup = await saver.aget_tuple(stored)
    assert tup is not None
    assert tup.metadata["openai_api_key"] == REDACTED
    assert tup.metadata["request"] == {"headers": {"authorization": REDACTED},
                                       "password": REDACTED}
    assert tup.metadata["input_tokens"] == 12 and tup.metadata["user"] == "ann"

    async with store.read() as conn:
        rows = (await conn.execute(select(CHECKPOINTS))).all()
    assert rows and secret not in repr(rows)


async def test_metadata_filters_compare_json_values(saver: SQLModelSaver) -> None:
    tid = uuid.uuid4().hex
    cfg = _config(tid)
    for md in ({"flag": True, "n": 1, "tags": {"k": "v"}},
               {"flag": 1, "n": "1", "tags": {"k": "w"}},
               {"flag": False, "n": 1.0, "other": None}):
        cfg = await saver.aput(cfg, _checkpoint({}, {}), md, {})

    async def count(**flt: Any) -> int:
        return len([x async for x in saver.alist(_config(tid), filter=flt)])

    assert await count(flag=True) == 1  # true is not 1
    assert await count(n=1) == 2  # 1 == 1.0, but not "1"
    assert await count(n="1") == 1
    assert await count(tags={"k": "v"}) == 1
    assert await count(other=None) == 3  # null, or missing
    assert await count(flag=True, n=1) == 1
    assert len([x async for x in saver.alist(_config(tid), filter={"n": 1}, limit=1)]) == 1


# -- writes, runs, pruning -------------------------------------------------------------------


async def test_special_writes_overwrite_and_ordinary_writes_are_kept(
    saver: SQLModelSaver,
) -> None:
    stored = await saver.aput(_config(uuid.uuid4().hex), _checkpoint({}, {}), {}, {})
    await saver.aput_writes(stored, [("ch", "first"), (ERROR, "boom 1")], "task", "~a")
    await saver.aput_writes(stored, [("ch", "second"), (ERROR, "boom 2")], "task", "~a")
    await saver.aput_writes(stored, [(INTERRUPT, "ask")], "earlier", "")
    tup = await saver.aget_tuple(stored)
    assert tup is not None
    # Ordered by (task_path, task_id, idx), as live execution applies them.
    assert tup.pending_writes == [("earlier", INTERRUPT, "ask"), ("task", ERROR, "boom 2"),
                                  ("task", "ch", "first")]


async def test_delete_for_runs_and_prune_collect_unused_blobs(
    saver: SQLModelSaver, store: Store
) -> None:
    blobs = BLOBS
    tid = uuid.uuid4().hex
    cfg, versions = _config(tid), {}
    for step, run in enumerate(["r1", "r1", "r2", "r2"]):
        versions = {**versions, "a": saver.get_next_version(versions.get("a"), None)}
        cfg = await saver.aput(cfg, _checkpoint({"a": step}, versions),
                               {"run_id": f"{tid}-{run}", "step": step}, {"a": versions["a"]})
    assert await _count(store, blobs, tid) == 4

    await saver.adelete_for_runs([f"{tid}-r1"])
    listed = [x async for x in saver.alist(_config(tid))]
    assert [x.metadata["step"] for x in listed] == [3, 2]
    assert listed[-1].parent_config is None  # its parent was deleted
    assert await _count(store, blobs, tid) == 2

    await saver.aprune([tid])
    (kept,) = [x async for x in saver.alist(_config(tid))]
    assert kept.checkpoint["channel_values"] == {"a": 3}
    assert await _count(store, blobs, tid) == 1

    with pytest.raises(TypeError):
        await saver.aprune(tid)  # a str is not a list of thread IDs
    with pytest.raises(ValueError):
        await saver.aprune([tid], strategy="everything")


# -- the sync API ----------------------------------------------------------------------------


def test_sync_api_round_trip(db_url: str) -> None:
    store = Store(db_url)
    saver = SQLModelSaver(store)
    try:
        tid = uuid.uuid4().hex
        v = {"a": saver.get_next_version(None, None)}
        first = saver.put(_config(tid), _checkpoint({"a": {"n": 1}}, v), {"step": 0}, v)
        saver.put_writes(first, [("a", {"n": 2})], "task-1", "path")
        v2 = {"a": saver.get_next_version(v["a"], None)}
        second = saver.put(first, _checkpoint({"a": {"n": 2}}, v2), {"step": 1}, v2)

        tup = saver.get_tuple(_config(tid))
        assert tup is not None and tup.config == second
        assert tup.checkpoint["channel_values"] == {"a": {"n": 2}}
        assert tup.parent_config == first
        at_first = saver.get_tuple(first)
        assert at_first is not None and at_first.pending_writes == [("task-1", "a", {"n": 2})]
        assert [x.metadata["step"] for x in saver.list(_config(tid))] == [1, 0]
        assert [x.metadata["step"] for x in saver.list(None, filter={"step": 0})
                if x.config["configurable"]["thread_id"] == tid] == [0]

        saver.copy_thread(tid, tid + "-copy")
        assert len(list(saver.list(_config(tid + "-copy")))) == 2
        saver.delete_for_runs([])
        saver.prune([tid + "-copy"])
        assert len(list(saver.list(_config(tid + "-copy")))) == 1
        saver.delete_thread(tid)
        assert saver.get_tuple(_config(tid)) is None
        saver.close()
    finally:
        asyncio.run(store.close())


# -- a real graph ----------------------------------------------------------------------------


class State(TypedDict, total=False):
    topic: str
    trail: Annotated[list[str], operator.add]
    summary: str


def _graph(saver: SQLModelSaver) -> Any:
    def research(state: State) -> State:
        return {"trail": [f"research {state['topic']}"]}

    def draft(state: State) -> State:
        return {"trail": ["draft"]}

    def review(state: State) -> State:
        return {"trail": ["review"], "summary": " -> ".join(state["trail"])}

    g = StateGraph(State)
    g.add_node("research", research)
    g.add_node("draft", draft)
    g.add_node("review", review)
    g.add_edge(START, "research")
    g.add_edge("research", "draft")
    g.add_edge("draft", "review")
    g.add_edge("review", END)
    return g.compile(checkpointer=saver, interrupt_before=["review"])


async def test_graph_runs_pauses_and_resumes_from_its_checkpoint(db_url: str) -> None:
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
    store = Store(db_url)
    try:
        app = _graph(SQLModelSaver(store))
        await app.ainvoke({"topic": "tides"}, config)
        paused = await app.aget_state(config)
        assert paused.next == ("review",)
        assert paused.values["trail"] == ["research tides", "draft"]
    finally:
        await store.close()

    # A new Store and saver, as a new process would have, resume from the database.
    store = Store(db_url)
    try:
        app = _graph(SQLModelSaver(store))
        assert (await app.aget_state(config)).next == ("review",)
        out = await app.ainvoke(None, config)
        assert out["summary"] == "research tides -> draft"
        final = await app.aget_state(config)
        assert final.next == ()
        assert final.values["trail"] == ["research tides", "draft", "review"]
        history = [s async for s in app.aget_state_history(config)]
        assert [s.metadata["step"] for s in history] == [3, 2, 1, 0, -1]
        # Time travel: the state before "draft" is there too.
        before_draft = next(s for s in history if s.next == ("draft",))
        assert before_draft.values["trail"] == ["research tides"]
    finally:
        await store.close()


# -- concurrency and cancellation ------------------------------------------------------------


async def test_concurrent_puts_are_grouped_and_each_one_is_stored(
    saver: SQLModelSaver, store: Store
) -> None:
    async def writer(i: int) -> Any:
        tid = f"grp-{uuid.uuid4().hex}"
        cfg, versions = _config(tid), {}
        for step in range(5):
            versions = {"a": saver.get_next_version(versions.get("a"), None), "b": 1}
            cfg = await saver.aput(cfg, _checkpoint({"a": (i, step), "b": i}, versions),
                                   {"step": step}, versions if step == 0 else {"a": versions["a"]})
            await saver.aput_writes(cfg, [("a", step), (ERROR, f"e{step}")], f"t{step}")
        return tid, cfg

    results = await asyncio.gather(*(writer(i) for i in range(40)))
    for i, (tid, cfg) in enumerate(results):
        tup = await saver.aget_tuple(_config(tid))
        assert tup is not None and tup.config == cfg
        assert tup.checkpoint["channel_values"] == {"a": [i, 4], "b": i}
        assert tup.pending_writes == [("t4", ERROR, "e4"), ("t4", "a", 4)]
        assert len([x async for x in saver.alist(_config(tid))]) == 5


async def test_a_failing_call_does_not_fail_the_calls_grouped_with_it(
    saver: SQLModelSaver,
) -> None:
    good = [_config(uuid.uuid4().hex) for _ in range(20)]
    # A NUL character: PostgreSQL rejects it in text, SQLite stores it.
    bad = _config("bad\x00thread")
    calls = [saver.aput(c, _checkpoint({}, {}), {}, {}) for c in good]
    calls.insert(7, saver.aput(bad, _checkpoint({}, {}), {}, {}))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == (1 if saver.store.dialect == "postgresql" else 0)
    for c in good:
        assert await saver.aget_tuple(c) is not None


async def test_a_cancelled_put_leaves_all_of_its_checkpoint_or_nothing(
    saver: SQLModelSaver,
) -> None:
    values = {f"ch{i}": {"payload": "x" * 2000, "i": i} for i in range(20)}
    versions = {ch: saver.get_next_version(None, None) for ch in values}
    await saver.setup()
    for delay in (0, 0, 0.0005, 0.001, 0.002, 0.005):
        cfg = _config(uuid.uuid4().hex)
        cp = _checkpoint(values, versions)
        task = asyncio.create_task(saver.aput(cfg, cp, {}, versions))
        await asyncio.sleep(delay)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await saver.aclose()  # let a batch already in flight finish
        tup = await saver.aget_tuple(cfg)
        assert tup is None or tup.checkpoint["channel_values"] == values


async def test_closing_the_store_releases_and_later_reopens_connections(
    saver: SQLModelSaver, store: Store
) -> None:
    tid = uuid.uuid4().hex
    first = await saver.aput(_config(tid), _checkpoint({}, {}), {"step": 0}, {})
    await store.close()  # returns the connections the saver keeps
    second = await saver.aput(first, _checkpoint({}, {}), {"step": 1}, {})
    tup = await saver.aget_tuple(_config(tid))
    assert tup is not None and tup.config == second


# -- lease fencing ---------------------------------------------------------------------------


async def _lease(store: Store, run_id: str, holder: str, epoch: int, ttl: float) -> Fence:
    leases = t.LeaseRow.__table__  # type: ignore[attr-defined]
    expires = datetime.now(timezone.utc) + timedelta(seconds=ttl)
    async with store.write() as conn:
        await conn.execute(leases.insert().values(run_id=run_id, holder=holder, epoch=epoch,
                                                  expires_at=expires))
    return Fence(run_id, holder, epoch)


async def test_writes_under_a_stale_fence_are_rejected_and_leave_nothing(
    saver: SQLModelSaver, store: Store
) -> None:
    await store.setup()
    live = await _lease(store, f"live-{uuid.uuid4().hex}", "worker-a", 1, ttl=60)
    expired = await _lease(store, f"gone-{uuid.uuid4().hex}", "worker-b", 1, ttl=-1)
    taken = Fence(live.run_id, "worker-old", 1)  # another holder has the lease now

    async def put(fence: Fence) -> Any:
        with fenced(fence):  # as the Runner does around a run
            cfg = await saver.aput(_config(f"{fence.run_id}-{fence.holder}"),
                                   _checkpoint({}, {}), {}, {})
            await saver.aput_writes(cfg, [("ch", 1)], "task")
            return cfg

    # Concurrent calls under different fences: each is checked against its own lease.
    outcomes = await asyncio.gather(put(live), put(expired), put(taken), put(live),
                                    return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["dict", "LeaseError", "LeaseError", "dict"]
    for fence in (expired, taken):
        assert await saver.aget_tuple(_config(f"{fence.run_id}-{fence.holder}")) is None
    with fenced(taken), pytest.raises(LeaseError):
        await saver.adelete_thread(f"{live.run_id}-{live.holder}")
    tup = await saver.aget_tuple(_config(f"{live.run_id}-{live.holder}"))
    assert tup is not None and tup.pending_writes == [("task", "ch", 1)]


async def test_fences_with_a_ttl_checked_together_renew_the_held_leases_only(
    saver: SQLModelSaver, store: Store
) -> None:
    # The Runner's fences carry a TTL: a batch renews the leases still held in one go and
    # rejects the calls of a lease another executor took, whatever else shares the batch.
    await store.setup()
    held = [await _lease(store, f"held-{i}-{uuid.uuid4().hex}", "me", 1, ttl=1)
            for i in range(3)]
    gone = await _lease(store, f"gone-{uuid.uuid4().hex}", "someone-else", 2, ttl=60)
    fences = [Fence(f.run_id, f.holder, f.epoch, ttl=120) for f in held]
    fences.append(Fence(gone.run_id, "me", 1, ttl=120))

    async def put(fence: Fence) -> Any:
        with fenced(fence):
            return await saver.aput(_config(fence.run_id), _checkpoint({}, {}), {}, {})

    outcomes = await asyncio.gather(*(put(f) for f in fences * 3), return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == (["dict"] * 3 + ["LeaseError"]) * 3
    leases = t.LeaseRow.__table__  # type: ignore[attr-defined]
    async with store.read() as conn:
        rows = {r.run_id: r for r in (await conn.execute(select(leases))).all()}
    for fence in fences[:3]:  # renewed for the fence's TTL, not the 1 s they were taken for
        expires = rows[fence.run_id].expires_at
        expires = expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)
        assert expires > datetime.now(timezone.utc) + timedelta(seconds=60)
    assert rows[gone.run_id].holder == "someone-else" and rows[gone.run_id].epoch == 2
    assert await saver.aget_tuple(_config(gone.run_id)) is None


def test_sync_writes_are_fenced_too(db_url: str) -> None:
    store = Store(db_url)
    saver = SQLModelSaver(store)

    async def stale_lease() -> Fence:
        await store.setup()
        fence = await _lease(store, f"sync-{uuid.uuid4().hex}", "w", 1, ttl=-1)
        await store.close()  # its async engine belongs to this event loop
        return fence

    try:
        stale = asyncio.run(stale_lease())
        with fenced(stale), pytest.raises(LeaseError):
            saver.put(_config(stale.run_id), _checkpoint({}, {}), {}, {})
        assert saver.get_tuple(_config(stale.run_id)) is None
        saver.close()
    finally:
        asyncio.run(store.close())
