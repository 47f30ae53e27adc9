"""No secrets at rest: one scrubbing policy (frugalflow/persistence/scrub.py) for the ledger,
checkpoint writes (the `__error__` channel included) and the project's logs.

The proof: real provider clients (openai, anthropic, google-genai) send realistic keys to the
emulator, whose 401 bodies repeat the key (`auth_echo`), in Runner runs on SQLite and on
PostgreSQL; then the SQLite files and a `pg_dump` of the database are scanned byte by byte
for the keys (raw, a significant substring, hex as pg_dump renders bytea, base64)."""

from __future__ import annotations

import base64
import logging
import secrets
import shutil
import string
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from sqlalchemy import select
from sqlalchemy.engine import make_url

from frugalflow import END, START, AllModelsFailedError, Catalog, Flow, Needs, RoutedChatModel
from frugalflow.resilience import BreakerRegistry
from frugalflow.testing.emulator import ProviderEmulator, emulated_catalog
from frugalflow.persistence import Store
from frugalflow.persistence import scrub as policy
from frugalflow.persistence import tables as t
from frugalflow.persistence.saver import SQLModelSaver
from frugalflow.persistence.scrub import (
    REDACTED,
    SecretFilter,
    dump_scrubbed,
    register_secret,
    scrub,
    scrub_exact,
    scrub_text,
)
from frugalflow.runner import Runner
from provider_clients import forget_provider_clients

_ALNUM = string.ascii_letters + string.digits


def _random(n: int, alphabet: str = _ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _realistic_keys() -> dict[str, str]:
    """Key variable -> a fresh value shaped like that provider's real keys."""
    return {
        "OPENAI_API_KEY": f"sk-proj-{_random(48)}T3BlbkFJ{_random(48)}",
        "ANTHROPIC_API_KEY": f"sk-ant-api03-{_random(86, _ALNUM + '-_')}-{_random(6)}AA",
        "GOOGLE_API_KEY": f"AIzaSy{_random(33, _ALNUM + '-_')}",
        # A custom variable (named by the catalog entry only) holding a key of no known shape.
        "ACME_LLM_KEY": f"acme-live-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}",
    }


def _needles(key: str) -> dict[str, bytes]:
    """Byte patterns that would betray `key` in a file or dump."""
    raw = key.encode()
    middle = raw[len(raw) // 3: len(raw) // 3 + 16]  # a significant substring of the secret part
    out = {"raw": raw, "middle": middle, "hex": raw.hex().encode(),
           "middle-hex": middle.hex().encode()}
    for name, chunk in (("raw", raw), ("middle", middle)):
        for shift in range(3):  # base64 at each alignment: the groups wholly inside the chunk
            for enc in (base64.b64encode, base64.urlsafe_b64encode):
                out[f"{name}-b64-{shift}-{enc.__name__}"] = enc(b"\0" * shift + chunk)[4:-4]
    return out


def _assert_absent(data: bytes, keys: dict[str, str], where: str) -> None:
    for env, key in keys.items():
        for kind, needle in _needles(key).items():
            assert needle not in data, f"{env} found ({kind}) in {where}"


@pytest.fixture
async def _clients() -> AsyncIterator[None]:
    yield
    forget_provider_clients()


def _echo_catalog(emu: ProviderEmulator) -> Catalog:
    """OpenAI, Anthropic, Gemini and an OpenAI-compatible vendor (on the OpenAI route) with
    their keys in their own variables; the last one's variable is known only to the catalog."""
    envs = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY",
            "google": "GOOGLE_API_KEY", "deepseek": "ACME_LLM_KEY"}
    models = ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5", "google/gemini-2.5-flash",
              "deepseek/deepseek-chat")
    specs = [s.model_copy(update={"api_key_env": envs[s.provider]})
             for s in emulated_catalog(emu, models)]
    return Catalog(specs, name="echo")


class ChainState(TypedDict, total=False):
    topic: str
    n1: str
    n2: str


def chain_flow(n: int, *, rewrap: bool = False) -> Flow[ChainState]:
    """n (at most 2) model nodes in a row, each open to every model of the catalog;
    `rewrap`: a node re-raises a failed call as its own RuntimeError quoting the error (as
    user code does), which the Runner logs with its traceback."""
    flow: Flow[ChainState] = Flow("chain", ChainState)

    def make(i: int) -> Any:
        async def node(state: ChainState, model: RoutedChatModel) -> dict[str, str]:
            try:
                answer = await model.ainvoke([HumanMessage(f"step {i}: {state['topic']}")])
            except AllModelsFailedError as e:
                if rewrap:
                    raise RuntimeError(f"step {i} failed: {e}") from e
                raise
            return {f"n{i}": str(answer.content)[:60]}

        return node

    for i in range(1, n + 1):
        flow.add_node(f"n{i}", make(i), needs=Needs())
        flow.add_edge(START if i == 1 else f"n{i - 1}", f"n{i}")
    flow.add_edge(f"n{n}", END)
    return flow


def _pg_dump(url: str) -> bytes:
    try:  # the throwaway-server helpers know the embedded wheel's pg_dump (as new as it)
        from services import pg_tool  # type: ignore[import-not-found]
    except ImportError:
        pg_tool = shutil.which
    pg_dump = pg_tool("pg_dump")
    assert pg_dump, "pg_dump is needed for the PostgreSQL byte scan: apt install postgresql-client"
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    done = subprocess.run([pg_dump, "--no-owner", "--dbname", dsn], capture_output=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.usefixtures("_clients")
async def test_keys_echoed_by_401_bodies_are_nowhere_at_rest(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = _realistic_keys()
    for env, key in keys.items():
        monkeypatch.setenv(env, key)
    marker = f"scan-marker-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.DEBUG)
    # Two views of every log record: as emitted (before any handler filter) and through the
    # documented set-up for applications that also log other libraries at DEBUG level, a
    # SecretFilter on their handler (here caplog's).
    raw = _Records()
    logging.getLogger().handlers.insert(0, raw)
    caplog.handler.addFilter(SecretFilter())
    async with ProviderEmulator(seed=5) as emu:
        catalog = _echo_catalog(emu)
        for route in ("openai", "anthropic", "gemini"):
            emu.fault(route, "auth_echo", times=None)

        # 1. Every provider answers 401 with the key in the body: the node raises, LangGraph
        # writes the error (the `__error__` channel), the run fails.
        runner = Runner(db_url, flows=[chain_flow(1, rewrap=True)], catalog=catalog,
                        breakers=BreakerRegistry())
        failed = await runner.start("chain", {"topic": f"{marker} failing"})
        assert failed.status == "failed" and failed.error
        assert failed.error.startswith("RuntimeError: step 1 failed")
        echoed = {r.provider for r in emu.requests if r.fault == "auth_echo" and r.auth}
        assert echoed == {"openai", "anthropic", "gemini"}
        record = await runner.get(failed.run_id)
        assert len({a.model for a in record.attempts if a.error_class == "auth"}) == 4
        assert failed.error and REDACTED in failed.error
        await runner.close()

        # 2. OpenAI's route and Gemini echo, Anthropic answers: the run succeeds after
        # fallback; its input carries a key, which the state keeps only as "[redacted]".
        emu.clear_faults()
        for route in ("openai", "gemini"):
            emu.fault(route, "auth_echo", times=None)
        runner = Runner(db_url, flows=[chain_flow(2)], catalog=catalog, breakers=BreakerRegistry())
        ok = await runner.start("chain", {"topic": f"{marker} key {keys['ACME_LLM_KEY']}"})
        assert ok.ok, ok.error
        record = await runner.get(ok.run_id)
        assert any(a.error_class == "auth" for a in record.attempts)
        assert {a.provider for a in record.attempts if a.outcome == "ok"} == {"anthropic"}
        assert ok.state is not None and f"key {REDACTED}" in ok.state["topic"]

        dumped = []
        async with runner.store.read() as conn:
            for table in t.metadata.sorted_tables:
                dumped.extend(repr(tuple(row)) for row in (await conn.execute(select(table))))
        if runner.store.is_sqlite:  # the files as they are, WAL included, before closing
            files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
            assert any(name.endswith("-wal") for name in files)
        await runner.close()
        await catalog.aclose()

    everything = "\n".join(dumped).encode()
    assert marker.encode() in everything  # the scan sees the data
    _assert_absent(everything, keys, "the rows")
    if db_url.startswith("sqlite"):
        files.update({p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()})
        assert any(marker.encode() in data for data in files.values())
        for name, data in files.items():
            _assert_absent(data, keys, name)
    else:
        dump = _pg_dump(db_url)
        assert marker.encode() in dump and marker.encode().hex().encode() in dump  # bytea too
        _assert_absent(dump, keys, "pg_dump")
    logging.getLogger().removeHandler(raw)
    caplog.handler.removeFilter(caplog.handler.filters[-1])
    # The project's own records never hold a key, and no record holds a key echoed by a
    # provider; only the provider clients' DEBUG request logs repeat the user's prompt, which
    # here carries a key: a SecretFilter on the handler scrubs them as well.
    assert any(name == "frugalflow" and "Traceback" in text and REDACTED in text
               for name, text in raw.lines)  # the node's error, logged with its traceback
    _assert_absent("\n".join(text for name, text in raw.lines
                              if name.split(".")[0] == "frugalflow").encode(), keys,
                   "the frugalflow log records")
    echoed_keys = {env: key for env, key in keys.items() if env != "ACME_LLM_KEY"}
    _assert_absent("\n".join(text for _, text in raw.lines).encode(), echoed_keys, "the logs")
    leaks = {name for name, text in raw.lines if keys["ACME_LLM_KEY"] in text}
    assert leaks <= {"openai._base_client", "anthropic._base_client"}, leaks
    _assert_absent(caplog.text.encode(), keys, "the log capture")


class _Records(logging.Handler):
    """(logger name, formatted text with traceback) of every record, as emitted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, self.format(record)))


# -- the emulator fault itself --------------------------------------------------------------


@pytest.mark.usefixtures("_clients")
@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_auth_echo_repeats_the_presented_key_through_each_client(
    provider: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = _realistic_keys()
    for env, value in keys.items():
        monkeypatch.setenv(env, value)
    async with ProviderEmulator() as emu:
        emu.fault(provider, "auth_echo")
        catalog = _echo_catalog(emu)
        spec = next(s for s in catalog if s.provider == {"gemini": "google"}.get(provider,
                                                                               provider))
        key = keys[str(spec.api_key_env)]
        model = catalog.built(spec)
        try:
            with pytest.raises(Exception) as caught:
                await model.ainvoke([HumanMessage("hi")])
        finally:
            await catalog.aclose()
        seen = repr(caught.value) + str(caught.value) + repr(caught.value.__cause__)
        assert key in seen  # what a real echoing server puts in the client's exception
        assert emu.requests[-1].status == 401 and key not in repr(emu.requests)
        if provider == "openai":
            assert f"Incorrect API key provided: {key}." in str(caught.value)


# -- the policy, rule by rule ---------------------------------------------------------------

SHAPED = {
    "openai": "sk-" + _random(48),
    "openai-project": "sk-proj-" + _random(40, _ALNUM + "-_") + "T3BlbkFJ" + _random(40),
    "openai-service-account": "sk-svcacct-" + _random(60, _ALNUM + "-_"),
    "deepseek": "sk-" + uuid.uuid4().hex,
    "anthropic": "sk-ant-api03-" + _random(93, _ALNUM + "-_"),
    "openrouter": "sk-or-v1-" + uuid.uuid4().hex + uuid.uuid4().hex,
    "google": "AIzaSy" + _random(33, _ALNUM + "-_"),
    "groq": "gsk_" + _random(52),
    "together": "tgp_v1_" + _random(43, _ALNUM + "-_"),
}


@pytest.mark.parametrize("name", sorted(SHAPED))
def test_key_shapes_are_redacted_anywhere_in_text(name: str) -> None:
    key = SHAPED[name]
    for text in (f"Incorrect API key {key} used", f"'{key}'", f"{{\"k\": \"{key}\"}}", key):
        out = scrub_text(text)
        assert key not in out and key[-12:] not in out and REDACTED in out, (name, out)
    assert scrub_text(key.encode().decode()) == REDACTED


@pytest.mark.parametrize("text, expected", [
    ("Authorization: Bearer abc.def-ghi_jkl", "Authorization: Bearer [redacted]"),
    ("authorization: Basic dXNlcjpwYXNzd29yZA==", "authorization: [redacted]"),
    ("{'Authorization': 'Bearer eyJhbGciOiJI.eyJzdWIi.sig'}",
     "{'Authorization': 'Bearer [redacted]'}"),
    ("x-api-key: abcdefgh12345678", "x-api-key: [redacted]"),
    ("x-goog-api-key=q1w2e3r4t5y6u7i8", "x-goog-api-key=[redacted]"),
    ('{"api_key": "0123456789abcdef0123456789abcdef"}', '{"api_key": "[redacted]"}'),
    # Mistral (32 alphanumerics) and Together's 64-hex keys: only after a key-ish name.
    ("MISTRAL_API_KEY=aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF", "MISTRAL_API_KEY=[redacted]"),
    ("together api_key: " + "ab" * 32, "together api_key: [redacted]"),
    ("password=hunter2hunter2", "password=[redacted]"),
    ("https://generativelanguage.googleapis.com/v1beta/models/m:generateContent?key=k3y&alt=sse",
     "https://generativelanguage.googleapis.com/v1beta/models/m:generateContent?key=[redacted]"
     "&alt=sse"),
    ("GET /x?api_key=abc&access_token=def", "GET /x?api_key=[redacted]&access_token=[redacted]"),
    ("Incorrect API key provided: my-own-key-1. You can find",
     "Incorrect API key provided: [redacted]. You can find"),
])
def test_headers_assignments_and_urls_are_redacted(text: str, expected: str) -> None:
    assert scrub_text(text) == expected
    assert scrub_text(expected) == expected  # idempotent: scrubbing twice changes nothing


@pytest.mark.parametrize("text", [
    "max_tokens=100000000 input_tokens: 123456789 total_tokens=5",
    "task-0123456789abcdef and disk-encryption-keys",
    "digest sha256:" + "ab" * 32,
    "a basic understanding of bearer bonds",
    "a 32-character id aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF stays",
    "Incorrect API key provided: [redacted]. You can find",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert scrub_text(text) == text


def test_secret_named_keys_lose_their_values_at_any_depth() -> None:
    out = scrub({"api_key": "x", "X-Api-Key": 1, "headers": {"Authorization": "Bearer abc"},
                 "db": [{"password": "p", "client_secret": {"a": 1}}], "access_token": None,
                 "refresh_token": "r", "private_key": "k", "input_tokens": 5, "max_tokens": 9,
                 "note": "plain"})
    assert out == {"api_key": REDACTED, "X-Api-Key": REDACTED,
                   "headers": {"Authorization": REDACTED},
                   "db": [{"password": REDACTED, "client_secret": REDACTED}],
                   "access_token": REDACTED, "refresh_token": REDACTED,
                   "private_key": REDACTED, "input_tokens": 5, "max_tokens": 9, "note": "plain"}


def test_key_variables_are_scrubbed_as_exact_values(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = f"no-known-shape-{uuid.uuid4().hex}"  # only the exact rule can find this one
    monkeypatch.setenv("MISTRAL_API_KEY", odd)
    assert scrub_text(f"said {odd}!") == f"said {REDACTED}!"
    # A new value is scrubbed from the moment it is set; the old one is not a secret any more.
    newer = f"rotated-{uuid.uuid4().hex}"
    monkeypatch.setenv("MISTRAL_API_KEY", newer)
    assert scrub_text(f"{odd} {newer}") == f"{odd} {REDACTED}"
    for env in policy.COMMON_KEY_ENVS:
        value = f"common-{uuid.uuid4().hex}"
        monkeypatch.setenv(env, value)
        assert value not in scrub_text(f"x{value}x"), env


def test_variables_named_by_a_catalog_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    from frugalflow import ModelSpec

    env = f"MY_GATEWAY_KEY_{uuid.uuid4().hex[:6].upper()}"
    value = f"gw-{uuid.uuid4().hex}"
    monkeypatch.setenv(env, value)
    assert scrub_text(value) == value  # nobody named that variable yet
    Catalog([ModelSpec(provider="openai", model="gpt-4o-mini", api_key_env=env,
                       base_url="http://127.0.0.1:9/v1")], name="gateway")
    assert scrub_text(value) == REDACTED
    # A catalog reading a private mapping: its values are registered as they are.
    private = f"private-{uuid.uuid4().hex}"
    Catalog([ModelSpec(provider="openai", model="gpt-4o-mini", api_key_env="PRIV_KEY",
                       base_url="http://127.0.0.1:9/v1")], name="private",
            env={"PRIV_KEY": private})
    assert scrub_text(private) == REDACTED


def test_register_secret_and_the_minimum_length(monkeypatch: pytest.MonkeyPatch) -> None:
    value = f"explicit-{uuid.uuid4().hex}"
    register_secret(value)
    assert scrub_text(f"[{value}]") == f"[{REDACTED}]"
    register_secret(b"bytes-" + uuid.uuid4().hex.encode())
    register_secret("short")  # shorter than MIN_SECRET_LENGTH: ignored, or "short" would go
    monkeypatch.setenv("GROQ_API_KEY", "1234567")  # likewise for key variables
    assert scrub_text("short 1234567") == "short 1234567"
    assert policy.MIN_SECRET_LENGTH == 8


def test_bytes_and_exact_only_scrubbing_keep_user_data(monkeypatch: pytest.MonkeyPatch) -> None:
    key = f"sk-exact-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    unregistered = "sk-" + _random(40)  # key-shaped, but nobody's configured key
    assert policy.scrub_bytes(b"a" + key.encode() + b"z") == b"a" + REDACTED.encode() + b"z"
    assert REDACTED.encode() in policy.scrub_bytes(unregistered.encode(), full=True)
    state = {"topic": f"{key} and {unregistered}", "n": (1, key.encode()), "api_key": "mine"}
    assert scrub_exact(state) == {"topic": f"{REDACTED} and {unregistered}",
                                  "n": (1, REDACTED.encode()), "api_key": "mine"}


class Opaque:
    """A value msgpack cannot encode: a serde with pickle_fallback pickles it."""

    def __init__(self, secret: str) -> None:
        self.secret = secret


def test_serialised_values_lose_exact_keys_and_errors_lose_key_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = f"sk-proj-{_random(40)}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    serde = JsonPlusSerializer()
    shaped = "sk-" + _random(40)
    value = {"messages": [HumanMessage(f"key {key}, shape {shaped}")], "n": 3, "b": key.encode()}
    type_, data = dump_scrubbed(serde, value)
    assert key.encode() not in data
    back = serde.loads_typed((type_, data))
    assert back["messages"][0].content == f"key {REDACTED}, shape {shaped}"  # type kept
    assert back["n"] == 3 and back["b"] == REDACTED.encode()
    # Errors (the __error__ channel) lose key-shaped values and headers too.
    error = RuntimeError(f"401 {shaped} Authorization: Bearer tok12345678 {key}")
    type_, data = dump_scrubbed(serde, error, full=True)
    text = serde.loads_typed((type_, data))
    assert shaped not in text and key not in text and "tok12345678" not in text
    assert text.startswith("RuntimeError(") and REDACTED in text
    # A pickle cannot be rewritten: a value holding a key is stored as its scrubbed repr.
    pickling = JsonPlusSerializer(pickle_fallback=True)
    assert pickling.dumps_typed(Opaque("x"))[0] == "pickle"
    type_, data = dump_scrubbed(pickling, Opaque(key))
    assert key.encode() not in data and type_ != "pickle"
    clean = Opaque("nothing secret")
    assert dump_scrubbed(pickling, clean)[0] == "pickle"  # untouched when nothing is secret
    assert dump_scrubbed(pickling, clean, full=True)[0] == "pickle"
    # As an error (full policy), a pickle holding a header without a key shape goes too.
    type_, data = dump_scrubbed(pickling, Opaque("Authorization: Bearer tok12345678"), full=True)
    assert b"tok12345678" not in data and type_ != "pickle"


async def test_checkpoint_writes_and_blobs_are_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from langgraph.checkpoint.base import ERROR, empty_checkpoint

    key = f"AIzaSy{_random(33)}"
    monkeypatch.setenv("GEMINI_API_KEY", key)
    shaped = "gsk_" + _random(40)
    store = Store(f"sqlite:///{tmp_path / 'ck.db'}")
    saver = SQLModelSaver(store)
    config: Any = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}
    cp = empty_checkpoint()
    cp["channel_values"] = {"topic": f"mine {key} and {shaped}"}
    cp["channel_versions"] = {"topic": 1}
    saved = await saver.aput(config, cp, {"source": "input", "step": -1}, {"topic": 1})
    await saver.aput_writes(saved, [("topic", f"again {key}"),
                                    (ERROR, ValueError(f"401: key {shaped} / {key}"))], "task1")
    tup = await saver.aget_tuple(saved)
    assert tup is not None
    # The state keeps the user's text as given except the exact key value.
    assert tup.checkpoint["channel_values"]["topic"] == f"mine {REDACTED} and {shaped}"
    writes = {channel: value for _, channel, value in tup.pending_writes or []}
    assert writes["topic"] == f"again {REDACTED}"
    assert shaped not in writes[ERROR] and key not in writes[ERROR]
    await store.close()
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert any(shaped.encode() in data for data in files.values())  # the scan sees the state
    for name, data in files.items():
        assert key.encode() not in data, name


# -- logs -----------------------------------------------------------------------------------


def test_frugalflow_log_records_are_scrubbed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    key = f"sk-ant-api03-{_random(60)}"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    log = logging.getLogger("frugalflow")
    assert any(isinstance(f, SecretFilter) for f in log.filters)
    caplog.set_level(logging.DEBUG, logger="frugalflow")
    log.warning("call failed: %s", f"401 Incorrect API key provided: {key}")
    log.info("headers %r", {"Authorization": "Bearer abcdefgh12345678"})
    try:
        raise RuntimeError(f"boom {key}")
    except RuntimeError:
        log.exception("run %s failed", "r1")
    log.error("no secret here: %d tokens", 5)
    assert key not in caplog.text and "abcdefgh12345678" not in caplog.text
    assert "RuntimeError: boom [redacted]" in caplog.text  # the traceback, scrubbed
    assert "no secret here: 5 tokens" in caplog.text
    assert all(key not in r.getMessage() for r in caplog.records)
    # frugalflow.* loggers (a logger's filters see only its own records) get one as well, at
    # the latest when a catalog is built.
    child = logging.getLogger(f"frugalflow.module_{uuid.uuid4().hex[:6]}")
    Catalog.simulated()
    assert any(isinstance(f, SecretFilter) for f in child.filters)
    child.warning("child says %s", key)
    assert key not in caplog.text


async def test_ledger_rows_scrub_errors_and_prompts_but_keep_answers_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from langchain_core.messages import AIMessage

    from frugalflow.usage import Attempt
    from frugalflow.persistence.ledger import Ledger
    from frugalflow.persistence.ledger import scrub as ledger_scrub

    assert ledger_scrub is scrub  # one policy; the old import path still works
    key = f"sk-proj-{_random(40)}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    shaped = "sk-" + _random(40)
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger(store)
    await ledger.create_run("r1", "flow", {"topic": f"{key} {shaped}", "api_key": "mine"})
    await ledger.record_attempt(Attempt(
        node="n", model="m", provider="openai", outcome="error", call_id="c1", run_id="r1",
        error=f"401 Incorrect API key provided: {key}", prompt=f"use {shaped} please"))
    await ledger.record_attempt(Attempt(
        node="n", model="m", provider="openai", outcome="ok", call_id="c2", run_id="r1",
        response=AIMessage(f"your key {key}; a made-up one {shaped}")))
    await ledger.update_run("r1", status="interrupted", error=f"Bearer {shaped}",
                            pending_resume={"value": f"{key} {shaped}"})
    record = await ledger.run_record("r1")
    assert record.run.input == {"topic": f"{REDACTED} {REDACTED}", "api_key": REDACTED}
    assert record.run.error == f"Bearer {REDACTED}"
    assert record.run.pending_resume == {"value": f"{REDACTED} {shaped}"}  # the user's answer
    failed, answered = record.attempts
    assert failed.error == f"401 Incorrect API key provided: {REDACTED}"
    assert failed.prompt == f"use {REDACTED} please"
    assert answered.response is not None  # replayed on resume: only the exact key goes
    assert answered.response["data"]["content"] == f"your key {REDACTED}; a made-up one {shaped}"
    await store.close()
