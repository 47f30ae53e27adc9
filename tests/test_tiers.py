"""Service tiers: batch / flex / off-peak prices and terms, deadline-aware ranking, costs by tier."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage as GUsage
from genai_prices import calc_price
from typer.testing import CliRunner

from frugalflow.catalog import Catalog, ModelSpec
from frugalflow.cli import app
from frugalflow.exceptions import CatalogError
from frugalflow.needs import Needs
from frugalflow.persistence import Store
from frugalflow.persistence.ledger import Ledger
from frugalflow.ranking import Ranking, explain, prefilter, rank
from frugalflow.statuses import Outcome
from frugalflow.tiers import (DEADLINE_MARGIN, Tier, next_off_peak, off_peak_windows, tier_prices,
                              tier_terms)
from frugalflow.usage import Attempt, Usage

KEYS = {k: "test-key" for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY",
                                 "DEEPSEEK_API_KEY")}
EARLY = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)  # DeepSeek's peak hours (00:30-16:30 UTC)
LATE = datetime(2026, 12, 1, 20, 0, tzinfo=UTC)  # its off-peak hours


@pytest.fixture(scope="module")
def builtin() -> Catalog:
    """The built-in catalog with OpenAI, Anthropic, Google and DeepSeek configured."""
    return Catalog(list(Catalog.builtin()), name="builtin", env=KEYS)


def _genai(spec: ModelSpec, usage: Usage, **kw: Any) -> float:
    return float(calc_price(GUsage(input_tokens=usage.input_tokens,
                                   output_tokens=usage.output_tokens,
                                   cache_read_tokens=usage.cache_read_tokens or None),
                            spec.model, provider_id=spec.provider, **kw).total_price)


# -- prices --------------------------------------------------------------------------------


@pytest.mark.parametrize("key, tier, context", [
    ("openai/gpt-4.1", Tier.BATCH, {"processing": "batch"}),
    ("openai/gpt-5", Tier.BATCH, {"processing": "batch"}),
    ("openai/gpt-5-mini", Tier.FLEX, {"service_tier": "flex"}),
    ("anthropic/claude-haiku-4-5", Tier.BATCH, {"processing": "batch"}),
    ("anthropic/claude-sonnet-4-6", Tier.BATCH, {"processing": "batch"}),
    ("google/gemini-2.5-flash", Tier.BATCH, {"processing": "batch"}),
    ("google/gemini-2.5-pro", Tier.BATCH, {"processing": "batch"}),
])
def test_batch_and_flex_prices_are_genai_prices_variants(
        builtin: Catalog, key: str, tier: Tier, context: dict[str, str]) -> None:
    spec = builtin[key]
    # Past Gemini 2.5 Pro's 200k-token price step too, and with cached input.
    for usage in (Usage(input_tokens=12_345, output_tokens=678, cache_read_tokens=1_000),
                  Usage(input_tokens=250_000, output_tokens=2_000)):
        expected = _genai(spec, usage, price_context=context)
        assert spec.cost(usage, tier) == pytest.approx(expected, rel=1e-12)
        assert expected < 0.75 * spec.cost(usage)  # a real discount, not the standard price
    assert tier_terms(spec, tier) is not None


def test_standard_cost_is_unchanged_for_existing_callers(builtin: Catalog) -> None:
    usage = Usage(input_tokens=5_000, output_tokens=300)
    for spec in builtin:
        assert spec.cost(usage) == spec.cost(usage, Tier.STANDARD) == spec.cost(usage, "standard")
    spec = builtin["openai/gpt-4.1"]
    assert spec.cost(usage) == pytest.approx(_genai(spec, usage), rel=1e-12)


def test_fallback_discount_where_genai_prices_has_no_variant() -> None:
    # genai-prices prices claude-3-haiku but has no batch price for it: half its standard
    # price (Anthropic's pricing page); an entry with its own prices likewise.
    usage = Usage(input_tokens=10_000, output_tokens=1_000)
    old = ModelSpec(provider="anthropic", model="claude-3-haiku")
    own = ModelSpec(provider="openai", model="in-house", input_price=1.0, output_price=4.0)
    for spec in (old, own):
        terms = tier_terms(spec, Tier.BATCH)
        assert terms is not None and terms.discount == 0.5 and terms.source.startswith("https://")
        assert spec.cost(usage, Tier.BATCH) == pytest.approx(0.5 * spec.cost(usage), rel=1e-12)
    assert own.cost(usage) == pytest.approx((10_000 * 1.0 + 1_000 * 4.0) / 1e6)
    # Flex has no fallback discount: offered only where genai-prices prices it.
    assert tier_terms(own, Tier.FLEX) is None
    assert tier_terms(ModelSpec(provider="openai", model="gpt-4.1"), Tier.FLEX) is None
    assert tier_terms(ModelSpec(provider="openai", model="gpt-5"), Tier.FLEX) is not None


def test_provider_terms_name_their_sources(builtin: Catalog) -> None:
    openai = tier_terms(builtin["openai/gpt-5"], Tier.BATCH)
    anthropic = tier_terms(builtin["anthropic/claude-haiku-4-5"], Tier.BATCH)
    google = tier_terms(builtin["google/gemini-2.5-flash"], Tier.BATCH)
    flex = tier_terms(builtin["openai/gpt-5"], Tier.FLEX)
    assert openai and anthropic and google and flex
    assert (openai.max_items, openai.max_bytes, openai.window_s) == (50_000, 200_000_000, 86_400)
    assert (anthropic.max_items, anthropic.max_bytes) == (100_000, 256_000_000)
    assert google.max_bytes == 20_000_000 and google.window_s == 86_400
    assert flex.latency_s == 900 and "429" in flex.note
    for t in (openai, anthropic, google, flex):
        assert t.source.startswith("https://") and t.turnaround_source
        assert 0 < t.turnaround_p50_s <= t.turnaround_p90_s
    # Not offered: no batch API spoken for DeepSeek, no batch or flex for the simulated mirrors.
    assert tier_terms(builtin["deepseek/deepseek-chat"], Tier.BATCH) is None
    assert tier_terms(Catalog.simulated()["sim-openai/gpt-4.1"], Tier.BATCH) is None


def test_an_entry_overrides_its_tiers() -> None:
    usage = Usage(input_tokens=10_000, output_tokens=1_000)
    cat = Catalog.from_dict({"models": [
        {"provider": "openai", "model": "gpt-5",
         "tiers": {"batch": {"discount": 0.3, "turnaround_p90_s": 1800},
                   "flex": {"enabled": False}}},
        {"provider": "anthropic", "model": "claude-haiku-4-5",
         "tiers": {"batch": {"input_price": 0.2, "output_price": 1.0}}},
        {"provider": "deepseek", "model": "deepseek-chat", "tiers": {"off_peak": {"enabled": False}}},
        {"provider": "mistral", "model": "mistral-small-latest", "tiers": {"batch": {}}},
    ]})
    gpt5 = cat["openai/gpt-5"]
    assert gpt5.cost(usage, Tier.BATCH) == pytest.approx(0.3 * gpt5.cost(usage), rel=1e-12)
    terms = tier_terms(gpt5, Tier.BATCH)
    assert terms is not None and terms.turnaround_p90_s == 1800 and terms.max_items == 50_000
    assert tier_terms(gpt5, Tier.FLEX) is None
    haiku = cat["anthropic/claude-haiku-4-5"]
    assert haiku.cost(usage, Tier.BATCH) == pytest.approx((10_000 * 0.2 + 1_000 * 1.0) / 1e6)
    assert tier_terms(cat["deepseek/deepseek-chat"], Tier.OFF_PEAK) is None
    assert off_peak_windows(cat["deepseek/deepseek-chat"]) == []
    # A tier its provider does not list: enabled with the tier's generic terms; priced by
    # genai-prices' Mistral batch variant.
    small = cat["mistral/mistral-small-latest"]
    generic = tier_terms(small, Tier.BATCH)
    assert generic is not None and generic.window_s == 86_400 and generic.max_items is None
    assert small.cost(usage, Tier.BATCH) == pytest.approx(
        _genai(small, usage, price_context={"processing": "batch"}), rel=1e-12)
    assert tier_terms(ModelSpec(provider="mistral", model="mistral-small-latest"),
                      Tier.BATCH) is None


def test_unknown_tier_is_a_one_line_catalog_error() -> None:
    with pytest.raises(CatalogError) as e:
        Catalog.from_dict({"models": [{"provider": "openai", "model": "gpt-5",
                                       "tiers": {"bulk": {"discount": 0.5}}}]})
    message = str(e.value)
    assert "\n" not in message
    assert "unknown tier 'bulk'; known: flex, batch, off_peak" in message
    assert "openai/gpt-5" in message
    with pytest.raises(CatalogError, match="tiers.batch.discount"):
        Catalog.from_dict({"models": [{"provider": "openai", "model": "gpt-5",
                                       "tiers": {"batch": {"discount": 2}}}]})


# -- off-peak hours ------------------------------------------------------------------------


def test_deepseek_off_peak_window_and_prices(builtin: Catalog) -> None:
    spec = builtin["deepseek/deepseek-chat"]
    assert off_peak_windows(spec) == [(time(16, 30, tzinfo=UTC), time(0, 30, tzinfo=UTC))]
    assert next_off_peak(spec, EARLY) == (datetime(2026, 12, 1, 16, 30, tzinfo=UTC),
                                          datetime(2026, 12, 2, 0, 30, tzinfo=UTC))
    # Inside the window: it is open now, until 00:30.
    assert next_off_peak(spec, LATE) == (LATE, datetime(2026, 12, 2, 0, 30, tzinfo=UTC))
    just_after = datetime(2026, 12, 2, 0, 10, tzinfo=UTC)
    assert next_off_peak(spec, just_after) == (just_after, datetime(2026, 12, 2, 0, 30, tzinfo=UTC))
    usage = Usage(input_tokens=10_000, output_tokens=2_000)
    peak, off = spec.cost(usage, at=EARLY), spec.cost(usage, at=LATE)
    assert peak == pytest.approx(_genai(spec, usage, genai_request_timestamp=EARLY), rel=1e-12)
    assert off == pytest.approx(_genai(spec, usage, genai_request_timestamp=LATE), rel=1e-12)
    assert off == pytest.approx(peak / 2, rel=1e-9)  # 0.135 / 0.55 against 0.27 / 1.10
    assert spec.cost(usage, Tier.OFF_PEAK, at=LATE) == off
    assert spec.cost(usage, Tier.OFF_PEAK) == pytest.approx(off, rel=1e-12)  # its next window
    assert tier_prices(spec, Tier.STANDARD, EARLY) == pytest.approx((0.27e-6, 1.10e-6))
    assert tier_prices(spec, Tier.STANDARD, LATE) == pytest.approx((0.135e-6, 0.55e-6))
    # Models without time-of-day prices have no window.
    assert off_peak_windows(builtin["openai/gpt-5"]) == []
    assert next_off_peak(builtin["openai/gpt-5"], EARLY) is None


# -- ranking -------------------------------------------------------------------------------


def _rows(r: Ranking) -> list[tuple[str, str, float]]:
    return [(c.spec.key, c.tier.value, c.expected_cost) for c in r]


def test_no_deadline_ranks_exactly_as_before(builtin: Catalog) -> None:
    needs = Needs(quality={"reasoning": 0.5})
    static = prefilter(builtin, needs)
    lazy = rank(builtin, needs, input_tokens=2_000, prefiltered=static)
    assert lazy._rows is None  # the fast path: candidates made when read
    # The per-call path (what a budget takes) gives the same rows; every one standard, at
    # the catalog's prices and the prior output estimate.
    slow = rank(builtin, needs, input_tokens=2_000, prefiltered=static, budget_left=1e9)
    assert _rows(lazy) == _rows(slow)
    assert static.prior is not None
    expected = sorted(
        (2_000 * (s.input_price_per_mtok / 1e6) + e.p50 * (s.output_price_per_mtok / 1e6),
         -s.mean_quality(["reasoning"]), s.latency_ms, i, s.key)
        for i, (s, e) in enumerate(zip(static.eligible, static.prior.estimates)))
    assert [(k, "standard", c) for c, *_, k in expected] == _rows(lazy)
    assert rank(builtin, needs, input_tokens=2_000, now=EARLY).tier_notes == ()


def test_six_hours_ranks_batch_rows_cheapest_first(builtin: Catalog) -> None:
    needs = Needs(quality={"reasoning": 0.5})
    plain = {c.spec.key: c.expected_cost for c in rank(builtin, needs, input_tokens=2_000)}
    ranking = rank(builtin, needs, input_tokens=2_000, deadline_s=6 * 3600, now=EARLY)
    rows = list(ranking)
    assert [c.expected_cost for c in rows] == sorted(c.expected_cost for c in rows)
    assert rows[0].tier is Tier.BATCH
    assert len({c.order for c in rows}) == len(rows)
    batch = {c.spec.key: c for c in rows if c.tier is Tier.BATCH}
    assert {"openai/gpt-5", "anthropic/claude-haiku-4-5", "google/gemini-2.5-pro"} <= set(batch)
    static = prefilter(builtin, needs)
    assert static.prior is not None
    for c in rows:
        if c.spec.provider != "deepseek" and c.tier is Tier.STANDARD:
            assert c.expected_cost == plain[c.spec.key]  # standard rows keep their cost
        if c.tier is Tier.BATCH:
            terms = tier_terms(c.spec, Tier.BATCH)
            assert terms is not None
            out = static.prior.by_key[c.spec.key].p50
            p_in, p_out = tier_prices(c.spec, Tier.BATCH)
            assert c.expected_cost == pytest.approx(
                2_000 * p_in + out * p_out + terms.miss_rate * plain[c.spec.key])
            assert c.expected_cost < plain[c.spec.key]
    chosen = [r for r in explain(builtin, needs, input_tokens=2_000, deadline_s=6 * 3600,
                                 now=EARLY) if r.get("chosen")]
    assert [(r["model"], r["tier"], r["rank"]) for r in chosen] == [
        (rows[0].spec.key, "batch", 1)]


def test_twenty_minutes_leaves_no_batch_and_says_why(builtin: Catalog) -> None:
    needs = Needs(quality={"reasoning": 0.5})
    ranking = rank(builtin, needs, input_tokens=2_000, deadline_s=20 * 60, now=EARLY)
    assert {c.tier for c in ranking} == {Tier.STANDARD}
    rows = explain(builtin, needs, input_tokens=2_000, deadline_s=20 * 60, now=EARLY)
    why = {(r["model"], r["tier"]): r["reasons"][0] for r in rows
           if not r["accepted"] and r["tier"]}
    assert why[("anthropic/claude-haiku-4-5", "batch")].startswith(
        "batch: turnaround p90 2h + margin 10m + standard call ")
    assert why[("anthropic/claude-haiku-4-5", "batch")].endswith("> 20m left")
    assert why[("openai/gpt-5", "flex")].startswith("flex: latency up to 15m + margin 10m")
    assert rows[0]["chosen"] and rows[0]["tier"] == "standard"


def test_flex_rows_when_an_hour_is_left(builtin: Catalog) -> None:
    needs = Needs(providers=("openai",))
    ranking = rank(builtin, needs, input_tokens=2_000, deadline_s=3600, now=EARLY)
    flex = {c.spec.key: c for c in ranking if c.tier is Tier.FLEX}
    assert set(flex) == {"openai/gpt-5-nano", "openai/gpt-5-mini", "openai/gpt-5"}
    assert not [c for c in ranking if c.tier is Tier.BATCH]  # p90 4h does not fit in 1h
    standard = {c.spec.key: c for c in ranking if c.tier is Tier.STANDARD}
    for key, c in flex.items():
        assert c.expected_cost < standard[key].expected_cost
        assert c.latency_ms > standard[key].latency_ms  # slower: loses cost ties
    assert DEADLINE_MARGIN(3600) == 600 and DEADLINE_MARGIN(6 * 3600) == 2160


def test_off_peak_chosen_only_when_its_window_opens_in_time(builtin: Catalog) -> None:
    needs = Needs(models=("deepseek/deepseek-chat",))
    # 03:00 UTC: the window opens at 16:30, 13.5 h away.
    short = explain(builtin, needs, input_tokens=2_000, deadline_s=6 * 3600, now=EARLY)
    assert [(r["tier"], r["accepted"]) for r in short if r["model"] == "deepseek/deepseek-chat"
            ] == [("standard", True), ("off_peak", False)]
    assert short[1]["reasons"][0].startswith("off_peak: window opens 16:30 UTC (in 13h30m)")
    long = rank(builtin, needs, input_tokens=2_000, deadline_s=16 * 3600, now=EARLY)
    first = long.first()
    assert first.tier is Tier.OFF_PEAK
    [standard] = [c for c in long if c.tier is Tier.STANDARD]
    assert first.expected_cost == pytest.approx(standard.expected_cost / 2)
    assert first.latency_ms >= 13.5 * 3600 * 1000
    # In the window already: the standard row has the off-peak price; no separate row.
    inside = rank(builtin, needs, input_tokens=2_000, deadline_s=16 * 3600, now=LATE)
    assert [c.tier for c in inside] == [Tier.STANDARD]
    assert inside.first().expected_cost == pytest.approx(first.expected_cost)


def test_per_call_caps_apply_to_each_tier(builtin: Catalog) -> None:
    needs = Needs(models=("openai/gpt-5",))
    plain = rank(builtin, needs, input_tokens=2_000).first().expected_cost
    ranking = rank(builtin, needs, input_tokens=2_000, deadline_s=6 * 3600, now=EARLY,
                   budget_left=plain * 0.9)
    assert {c.tier for c in ranking} == {Tier.BATCH, Tier.FLEX}
    assert "openai/gpt-5" not in {s.key for s, _ in ranking.rejected}
    none_left = rank(builtin, needs, input_tokens=2_000, deadline_s=6 * 3600, now=EARLY,
                     budget_left=plain * 0.01)
    assert len(none_left) == 0
    [(_, reasons)] = [r for r in none_left.rejected if r[0].key == "openai/gpt-5"]
    assert reasons[0].startswith("expected $") and "budget left" in reasons[0]
    assert {t for s, t, _ in none_left.tier_notes} == {Tier.BATCH, Tier.FLEX}


# -- ledger and CLI ------------------------------------------------------------------------


async def _record(db: str, flow: str) -> None:
    store = Store(db)
    ledger = Ledger(store)
    try:
        await ledger.create_run(f"{flow}-r1", flow, {})
        for i, (tier, cost) in enumerate(((None, 0.5), ("standard", 0.25), ("batch", 0.125),
                                          ("batch", 0.125), ("off_peak", 0.05))):
            await ledger.record_attempt(
                Attempt(node="n", model="openai/gpt-5", provider="openai", outcome=Outcome.OK,
                        run_id=f"{flow}-r1", call_id=f"{flow}-c{i}", cost_usd=cost, tier=tier,
                        usage=Usage(input_tokens=10, output_tokens=2)), flow=flow)
    finally:
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tiers.db'}"
    return request.getfixturevalue("pg_url")  # type: ignore[no-any-return]


async def test_ledger_costs_by_tier(db: str, request: pytest.FixtureRequest) -> None:
    flow = f"tiers_{request.node.callspec.id}"
    await _record(db, flow)
    store = Store(db)
    try:
        ledger = Ledger(store)
        rows = await ledger.costs("tier", flow=flow)
        record = await ledger.run_record(f"{flow}-r1")
        with pytest.raises(ValueError, match="tier"):
            await ledger.costs("colour")  # type: ignore[arg-type]
    finally:
        await store.close()
    assert [(r.key, r.cost_usd, r.attempts) for r in rows] == [
        ("standard", 0.75, 2), ("batch", 0.25, 2), ("off_peak", 0.05, 1)]
    assert record.cost_by("tier") == {"standard": 0.75, "batch": 0.25, "off_peak": 0.05}


def test_cli_costs_by_tier(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    asyncio.run(_record(db, "cli"))
    cli = CliRunner()
    out = cli.invoke(app, ["costs", "--by", "tier", "--db", db])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if "standard" in line or "batch" in line]
    assert "0.750000" in lines[0] and "batch" in lines[1] and "0.250000" in lines[1]
    as_json = json.loads(cli.invoke(app, ["costs", "--by", "tier", "--db", db, "--json"]).output)
    assert [r["key"] for r in as_json] == ["standard", "batch", "off_peak"]
    shown = cli.invoke(app, ["runs", "show", "cli-r1", "--db", db])
    assert "by tier: standard $0.750000, batch $0.250000, off_peak $0.050000" in shown.output
    bad = cli.invoke(app, ["costs", "--by", "colour", "--db", db])
    assert bad.exit_code == 2 and "--by" in bad.output and "tier" in bad.output


def test_cli_explain_with_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FRUGALFLOW_CATALOG", raising=False)
    cli = CliRunner()
    out = cli.invoke(app, ["explain", "document_extraction", "--deadline", "6h"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[1].lstrip().startswith("* 1.") and "[batch]" in lines[1]
    assert any("[flex]" in line for line in lines)
    assert any("[standard]" in line for line in lines)
    short = cli.invoke(app, ["explain", "document_extraction", "--deadline", "20m"])
    assert "[batch]" not in "".join(l for l in short.output.splitlines() if " x " not in l)
    assert "batch: turnaround p90 4h + margin 10m" in short.output
    plain = cli.invoke(app, ["explain", "document_extraction"])
    assert "[standard]" not in plain.output and "*" not in plain.output
    bad = cli.invoke(app, ["explain", "document_extraction", "--deadline", "soon"])
    assert bad.exit_code == 2 and "--deadline" in bad.output
