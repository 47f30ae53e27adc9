"""One scrubbing policy for everything frugalflow writes at rest: ledger rows, checkpoint
writes (errors included) and the project's log records.

What is a secret (replaced by `REDACTED`, "[redacted]"; a header or assignment keeps its
name, e.g. "Bearer [redacted]", "api_key=[redacted]", "?key=[redacted]"):

* exact values: the current value of every key variable a catalog names (each ModelSpec's
  `api_key_env`, or its provider's default) and of `COMMON_KEY_ENVS`, read when scrubbing
  (a changed key is scrubbed from then on), plus every value given to `register_secret`.
  Values shorter than `MIN_SECRET_LENGTH` characters are ignored: scrubbing "abc"
  everywhere would destroy data and protect nothing.
* key-shaped values (`scrub_text`): OpenAI/DeepSeek/OpenRouter/Anthropic `sk-...`
  (sk-proj-, sk-ant-, sk-or-), Google `AIza...`, Groq `gsk_...`, Together `tgp_v1_...`,
  Hugging Face `hf_...`, xAI `xai-...`; `Bearer <token>`; a value after a secret-looking
  name (`Authorization:`, `x-api-key:`, `api_key=`, `"password": "..."`), which also covers
  32-character Mistral and 64-hex Together keys; `key=`/`api_key=`/`token=`... in URLs
  (Gemini's `?key=`).
* by name (`scrub`): the whole value of a mapping key that contains api_key/apikey/api-key,
  authorization, password/passwd, secret, token (not "tokens": input_tokens stays),
  private_key or access_key.

Where which part applies:

* `scrub` / `scrub_text` (everything above): ledger rows (run input, output, interrupts and
  error, node errors, attempt errors and prompts), checkpoint metadata, the `__error__`
  channel of checkpoint writes, log records of the `frugalflow` loggers.
* `scrub_exact` / `dump_scrubbed(full=False)` (exact values only): the graph state in
  checkpoints (channel values, task writes) and the recorded answers in the ledger. A
  user's own input is stored as given, except that an exact key value in it is replaced.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

__all__ = [
    "COMMON_KEY_ENVS",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "SecretFilter",
    "contains_secret",
    "dump_scrubbed",
    "install_log_filter",
    "register_key_envs",
    "register_secret",
    "scrub",
    "scrub_bytes",
    "scrub_exact",
    "scrub_exact_text",
    "scrub_json",
    "scrub_metadata",
    "scrub_text",
    "secret_values",
]

REDACTED: Final = "[redacted]"
MIN_SECRET_LENGTH: Final = 8
COMMON_KEY_ENVS: Final = (
    "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY",
    "DEEPSEEK_API_KEY", "MISTRAL_API_KEY", "GROQ_API_KEY", "TOGETHER_API_KEY",
    "OPENROUTER_API_KEY", "FRUGALFLOW_TOKEN",
)
# Variables a provider adapter names as its "key" that hold no secret (Ollama's server URL).
_NOT_SECRET_ENVS: Final = frozenset({"OLLAMA_HOST"})

_lock = threading.Lock()
_key_envs: set[str] = set(COMMON_KEY_ENVS)
_registered: set[str] = set()
_names: tuple[str, ...] = tuple(sorted(_key_envs))  # a snapshot, replaced on registration
_raw_names: tuple[bytes, ...] = tuple(map(os.fsencode, _names))

# -- the rules ------------------------------------------------------------------------------

# A mapping key naming a secret. "token" but not "tokens": keep usage counters.
_SECRET_KEY = re.compile(
    r"api[_\-]?key|authorization|passw(?:or)?d|secret|token(?!s)|private_?key|access_?key",
    re.I)
# Provider key shapes (prefixes chosen so that ordinary words never match).
_SHAPES = (
    r"\bsk-[A-Za-z0-9_\-]{8,}"  # OpenAI (sk-, sk-proj-), DeepSeek, Anthropic, OpenRouter
    r"|\bAIza[0-9A-Za-z_\-]{20,}"  # Google / Gemini
    r"|\bgsk_[A-Za-z0-9]{20,}"  # Groq
    r"|\btgp_v1_[A-Za-z0-9_\-]{20,}"  # Together
    r"|\bhf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|\bxai-[A-Za-z0-9]{20,}"  # xAI
)
_SHAPE = re.compile(_SHAPES)
_SHAPE_BYTES = re.compile(_SHAPES.encode())
_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/\-]{8,}=*", re.I)
_SHAPE_CUES = ("sk-", "AIza", "gsk_", "tgp_v1_", "hf_", "xai-")
_ASSIGNED_CUES = ("key", "auth", "passw", "secret", "token")
# `name: value` / `name=value` / `"name": "value"` where name looks like a secret's; the
# value may carry an auth scheme (Authorization: Basic ...).
_ASSIGNED = re.compile(
    # The match starts at the secret word itself (x-goog-api-key: its "api-key" part), so
    # nothing backtracks over long runs of word characters (a prompt may hold a base64 blob).
    r"""(?P<name>(?:api[_\-]?key|authorization|passw(?:or)?d"""
    r"""|secret|token(?!s)|private_?key|access_?key)[\w\-]{0,40})"""
    r"""(?P<sep>["']?\s*[:=]\s*["']?)"""
    r"""(?P<value>(?:(?:bearer|basic|token)\s+)?(?!\[redacted)[^\s"',;&)\]}]{8,})""",
    re.I)
# Query parameters that carry credentials (Gemini takes `?key=`).
_URL_PARAM = re.compile(
    r"([?&](?:key|api[_\-]?key|apikey|access_token|token|auth|password|secret|sig|signature)=)"
    r"[^&#\s\"'<>]+", re.I)
# "Incorrect API key provided: <key>." whatever the key looks like.
_PROVIDED = re.compile(
    r"(\bkey provided:\s*)(?!\[redacted\])[^\s\"',;)\]}]+?(?=\.?(?:[\s\"',;)\]}]|$))", re.I)

# Mapping keys under which LangGraph keeps namespaces or channel names, not secrets.
_STRUCTURAL_KEYS = frozenset({"parents", "counters_since_delta_snapshot"})


# -- registry -------------------------------------------------------------------------------


def register_secret(value: str | bytes | None) -> None:
    """Scrub `value` (exactly) from everything written at rest from now on, e.g. a key
    passed to a client directly rather than through an environment variable."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value and len(value.strip()) >= MIN_SECRET_LENGTH:
        with _lock:
            _registered.add(value.strip())


def register_key_envs(names: Iterable[str], env: Mapping[str, str] | None = None) -> None:
    """Scrub the values of these key variables (read from os.environ at each scrub); with a
    private `env` mapping (a Catalog built with `env=`), its current values instead."""
    global _names, _raw_names
    names = [n for n in names if n and n not in _NOT_SECRET_ENVS]
    if env is not None:
        for name in names:
            register_secret(env.get(name))
        return
    with _lock:
        if not _key_envs.issuperset(names):
            _key_envs.update(names)
            _names = tuple(sorted(_key_envs))
            _raw_names = tuple(map(os.fsencode, _names))


def secret_values() -> tuple[str, ...]:
    """The exact values scrubbed now, longest first (so a key containing another wins)."""
    return _exact()[0]


class _Exact:
    """The current exact values, as text and bytes patterns and as byte needles."""

    def __init__(self, key: tuple[Any, ...], values: tuple[str, ...]) -> None:
        self.key = key
        self.values = values
        self.needles = tuple(v.encode() for v in values)
        self.text = re.compile("|".join(map(re.escape, values))) if values else None
        self.raw = re.compile(b"|".join(map(re.escape, self.needles))) if values else None


_current = _Exact((), ())


def _exact() -> tuple[tuple[str, ...], _Exact]:
    """The exact values now; recompiled only when a variable or the registry changed (the
    variables are read at every call: a key set or rotated later is scrubbed at once)."""
    global _current
    names, raw_names = _names, _raw_names
    raw = getattr(os.environ, "_data", None)
    if isinstance(raw, dict) and os.name == "posix":
        # os.environ's own store (bytes on POSIX), kept in step by os.environ's setters:
        # a tenth of the cost of os.environ.get, which runs for every value written.
        key: tuple[Any, ...] = (len(_registered), *map(raw.get, raw_names))
    else:
        key = (len(_registered), *(os.environ.get(n) for n in names))
    current = _current
    if current.key != key:
        with _lock:
            values = set(_registered)
        for name in names:
            value = os.environ.get(name)
            if value and len(value.strip()) >= MIN_SECRET_LENGTH:
                values.add(value.strip())
        current = _current = _Exact(key, tuple(sorted(values, key=lambda v: (-len(v), v))))
    return current.values, current


# -- text and bytes -------------------------------------------------------------------------


def _assigned(m: re.Match[str]) -> str:
    value = m["value"]
    if value.isdigit() and len(value) < 16:  # a counter (token_count: 12345678)
        return m[0]
    return f"{m['name']}{m['sep']}{REDACTED}"


def scrub_text(text: str) -> str:
    """`text` with exact secret values and key-shaped values replaced."""
    exact = _exact()[1].text
    if exact is not None:
        text = exact.sub(REDACTED, text)
    # Each rule runs only when its literal cue is present: most text has none (fast path).
    if any(cue in text for cue in _SHAPE_CUES):
        text = _SHAPE.sub(REDACTED, text)
    lower = text.lower()
    if "bearer" in lower:
        text = _BEARER.sub(lambda m: m[1] + REDACTED, text)
    if "key provided" in lower:
        text = _PROVIDED.sub(lambda m: m[1] + REDACTED, text)
    if "=" in text:
        text = _URL_PARAM.sub(lambda m: m[1] + REDACTED, text)
    if any(cue in lower for cue in _ASSIGNED_CUES):
        text = _ASSIGNED.sub(_assigned, text)
    return text


def scrub_exact_text(text: str) -> str:
    """`text` with exact secret values replaced; anything else stays as given."""
    exact = _exact()[1].text
    return exact.sub(REDACTED, text) if exact is not None else text


def scrub_bytes(data: bytes, *, full: bool = False) -> bytes:
    """`data` with exact secret values (their UTF-8 bytes) replaced; `full`: key shapes too."""
    exact = _exact()[1]
    if exact.raw is not None and any(n in data for n in exact.needles):
        data = exact.raw.sub(REDACTED.encode(), data)
    if full:
        data = _SHAPE_BYTES.sub(REDACTED.encode(), data)
    return data


def contains_secret(data: str | bytes, *, full: bool = False) -> bool:
    """Whether `data` holds an exact secret value (`full`: or a key-shaped value)."""
    exact = _exact()[1]
    if isinstance(data, str):
        return any(v in data for v in exact.values) or (full and scrub_text(data) != data)
    return any(n in data for n in exact.needles) or bool(full and _SHAPE_BYTES.search(data))


# -- structures -----------------------------------------------------------------------------


def scrub(value: Any) -> Any:
    """A JSON-safe copy of `value` with secret-named keys' values and secret-looking text
    redacted (the ledger's rows)."""
    if isinstance(value, Mapping):
        return {str(k): REDACTED if _SECRET_KEY.search(str(k)) else scrub(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if hasattr(value, "model_dump"):
        return scrub(value.model_dump(mode="json"))
    import json

    return scrub(json.loads(json.dumps(value, default=str)))


def scrub_exact(value: Any) -> Any:
    """`value` with exact secret values replaced in its strings and bytes, at any depth of
    dicts, lists and tuples; the structure and every other value are kept as given."""
    if isinstance(value, str):
        return scrub_exact_text(value)
    if isinstance(value, bytes):
        return scrub_bytes(value)
    if isinstance(value, Mapping):
        return {scrub_exact(k): scrub_exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_exact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub_exact(v) for v in value)
    return value


def scrub_json(value: Any, *, redact: bool = True) -> Any:
    """A JSON-safe copy for a JSON column: strings lose NUL characters (PostgreSQL's JSONB
    refuses them), non-finite floats and unknown types become strings; `redact`: secret-named
    keys' values and secret-looking text are redacted as by `scrub`."""
    if isinstance(value, dict):
        return {str(k): REDACTED if redact and _SECRET_KEY.search(str(k))
                else scrub_json(v, redact=redact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_json(v, redact=redact) for v in value]
    if isinstance(value, str):
        value = value.replace("\x00", "")
        return scrub_text(value) if redact else value
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return scrub_json(str(value), redact=redact)


def scrub_metadata(value: Any) -> Any:
    """A JSON-safe copy of checkpoint metadata, scrubbed as by `scrub_json`, except that
    LangGraph's own top-level maps keyed by namespaces and channel names (`parents`, ...)
    keep their keys: a subgraph node called "get_token" keeps its `parents` entry."""
    if not isinstance(value, dict):
        return scrub_json(value)
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = str(k)
        if _SECRET_KEY.search(key):
            out[key] = REDACTED
        elif key in _STRUCTURAL_KEYS:
            out[key] = {str(sk): scrub_json(sv) for sk, sv in v.items()} if isinstance(
                v, dict) else scrub_json(v)
        else:
            out[key] = scrub_json(v)
    return out


# -- serialised checkpoint values -----------------------------------------------------------


class _Serde(Protocol):
    def dumps_typed(self, obj: Any) -> tuple[str, bytes]: ...


def dump_scrubbed(serde: _Serde, value: Any, *, full: bool = False) -> tuple[str, bytes]:
    """`serde.dumps_typed(value)` with secrets removed from the bytes written.

    Exact secret values always; `full`: key-shaped values too (the `__error__` channel,
    whose value is an exception's text). LangGraph's msgpack is rewritten string by string
    (its structure and types survive); raw bytes are replaced in place. A serialisation that
    cannot be rewritten (a pickle, an unknown format) and still holds a secret is stored as
    the scrubbed `repr()` of the value instead: a secret never reaches the database."""
    type_, data = serde.dumps_typed(value)
    # An error's text is always rewritten: headers and assignments have no byte signature.
    if not data or not (full or contains_secret(data)):
        return type_, data  # the common case: one scan for the exact values
    text = scrub_text if full else scrub_exact_text
    if type_ == "msgpack":
        try:
            data = _rewrite_msgpack(data, text, full)
        except Exception:  # an extension we cannot rebuild: the fallback below
            pass
    elif type_ in ("bytes", "bytearray"):
        data = scrub_bytes(data, full=full)
    if _holds_secret(data, full=full):
        type_, data = serde.dumps_typed(text(repr(value)))
    return type_, data


def _holds_secret(data: bytes, *, full: bool) -> bool:
    if contains_secret(data, full=full):
        return True
    if not full:
        return False
    # Any serialisation (a pickle too) shows its strings' characters as they are.
    as_text = data.decode("latin-1")
    return scrub_text(as_text) != as_text


def _rewrite_msgpack(data: bytes, text: Callable[[str], str], full: bool) -> bytes:
    import ormsgpack

    def ext(code: int, payload: bytes) -> Any:
        # LangGraph's extensions hold msgpack themselves (constructor args, pydantic fields).
        try:
            inner = _rewrite_msgpack(payload, text, full)
        except Exception:
            inner = scrub_bytes(payload, full=full)
        return ormsgpack.Ext(code, inner)

    def walk(obj: Any) -> Any:
        if isinstance(obj, str):
            return text(obj)
        if isinstance(obj, bytes):
            return scrub_bytes(obj, full=full)
        if isinstance(obj, dict):
            return {walk(k): walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v) for v in obj]
        return obj

    obj = ormsgpack.unpackb(data, ext_hook=ext, option=ormsgpack.OPT_NON_STR_KEYS)
    return ormsgpack.packb(walk(obj), option=ormsgpack.OPT_NON_STR_KEYS)


# -- logs -----------------------------------------------------------------------------------


class SecretFilter(logging.Filter):
    """Scrubs a log record's message (with its arguments), traceback and stack text.

    Installed on the `frugalflow` logger and its children; add it to your own handlers to
    scrub other libraries' records too."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it itself
            return True
        scrubbed = scrub_text(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and record.exc_info[0] is not None:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            clean = scrub_text(record.exc_text)
            if clean != record.exc_text:
                # No handler may render the live exception (and its secret) again.
                record.exc_text, record.exc_info = clean, None
        elif record.exc_text:
            record.exc_text = scrub_text(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub_text(record.stack_info)
        return True


def install_log_filter(name: str = "frugalflow") -> None:
    """Add a `SecretFilter` to logger `name` and to its existing children (a logger's
    filters see only its own records, not its children's). Idempotent."""
    manager = logging.Logger.manager
    names = [name] + [n for n in list(manager.loggerDict) if n.startswith(name + ".")]
    for n in names:
        logger = logging.getLogger(n)
        if not any(isinstance(f, SecretFilter) for f in logger.filters):
            logger.addFilter(SecretFilter())


install_log_filter()
