from __future__ import annotations

import logging
from pathlib import Path

import pytest
from genai_prices import Usage as GUsage
from genai_prices import calc_price

from frugalflow import SKILLS, Catalog, CatalogError, ModelSpec, Usage


def test_builtin_catalog_covers_the_providers_people_choose_between() -> None:
    cat = Catalog.builtin()
    assert {"openai", "anthropic", "google", "deepseek", "mistral", "groq", "together",
            "ollama"} <= set(cat.providers)
    # several price tiers per provider
    for provider in ("openai", "anthropic", "google", "groq"):
        prices = {s.output_price_per_mtok for s in cat if s.provider == provider}
        assert len(prices) >= 2, provider


def test_prices_come_from_genai_prices() -> None:
    spec = Catalog.builtin()["openai/gpt-4o-mini"]
    expected = calc_price(GUsage(input_tokens=10_000), "gpt-4o-mini", provider_id="openai")
    assert spec.input_price_per_mtok == pytest.approx(float(expected.total_price) * 100)
    assert spec.sources["price"] == "genai-prices"
    usage = Usage(input_tokens=1234, output_tokens=567, cache_read_tokens=200)
    direct = calc_price(
        GUsage(input_tokens=1234, output_tokens=567, cache_read_tokens=200),
        "gpt-4o-mini", provider_id="openai",
    )
    assert spec.cost(usage) == pytest.approx(float(direct.total_price))


def test_cached_tokens_cost_less_than_fresh_ones() -> None:
    spec = Catalog.builtin()["openai/gpt-4.1"]
    fresh = spec.cost(Usage(input_tokens=10_000))
    cached = spec.cost(Usage(input_tokens=10_000, cache_read_tokens=8_000))
    assert cached < fresh


def test_capabilities_come_from_the_integration_profile() -> None:
    pytest.importorskip("langchain_openai")
    spec = Catalog.builtin()["openai/gpt-4o-mini"]
    assert spec.window == 128_000
    assert spec.caps.tool_calling and spec.caps.vision
    assert spec.sources["context_window"] == "profile"
    assert spec.sources["tool_calling"] == "profile"


def test_catalog_fields_override_library_values() -> None:
    cat = Catalog.builtin().override("openai/gpt-4o-mini", input_price=9.0, output_price=9.0,
                                     context_window=1000, capabilities={"vision": False})
    spec = cat["openai/gpt-4o-mini"]
    assert spec.input_price_per_mtok == 9.0
    assert spec.cost(Usage(input_tokens=1_000_000)) == pytest.approx(9.0)
    assert spec.window == 1000 and spec.caps.vision is False
    assert spec.sources["price"] == "catalog"


def test_quality_scores_carry_their_source() -> None:
    cat = Catalog.builtin()
    spec = cat["openai/gpt-4o"]
    assert spec.quality["reasoning"] > 0.5
    assert "GPQA Diamond" in spec.quality_sources["reasoning"]
    assert "Artificial Analysis" in spec.quality_sources["reasoning"]
    for s in cat:
        assert set(s.quality) <= set(SKILLS)
        for skill in s.quality:
            assert s.quality_sources.get(skill), f"{s.key}.{skill} has no source"


def test_same_open_weights_at_several_providers_share_quality() -> None:
    cat = Catalog.builtin()
    groq = cat["groq/llama-3.3-70b-versatile"]
    together = cat["together/meta-llama/Llama-3.3-70B-Instruct-Turbo"]
    assert groq.quality == together.quality
    assert groq.output_price_per_mtok != together.output_price_per_mtok


def test_availability_follows_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("langchain_openai")
    cat = Catalog.builtin()
    spec = cat["openai/gpt-4o-mini"]
    assert cat.unavailable_reason(spec) == "provider not configured: set OPENAI_API_KEY"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert cat.is_available(spec)
    assert all(not s.simulated for s in cat)
    assert Catalog.default().name == "builtin"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert Catalog.default().name == "simulated"


def test_simulated_catalog_says_it_is_simulated() -> None:
    cat = Catalog.simulated()
    assert all(s.simulated and s.provider.startswith("sim-") for s in cat)
    assert all("simulated" in s.description for s in cat)
    assert all(cat.is_available(s) for s in cat)
    # mirrors real tiers: prices equal the real model's
    real = Catalog.builtin()["openai/gpt-4o-mini"]
    assert cat["sim-openai/gpt-4o-mini"].output_price_per_mtok == real.output_price_per_mtok


def test_load_toml_and_yaml(tmp_path: Path) -> None:
    toml = tmp_path / "cat.toml"
    toml.write_text(
        """
[[models]]
provider = "sim-a"
model = "small"
simulated = true
input_price = 0.1
output_price = 0.2
quality = { classification = { score = 0.7, source = "my eval" }, writing = 0.5 }
"""
    )
    cat = Catalog.from_file(toml)
    spec = cat["sim-a/small"]
    assert spec.quality == {"classification": 0.7, "writing": 0.5}
    assert spec.quality_sources["classification"] == "my eval"
    yaml_file = tmp_path / "cat.yaml"
    yaml_file.write_text(
        "models:\n  - provider: sim-b\n    model: big\n    simulated: true\n"
        "    input_price: 1\n    output_price: 2\n"
    )
    assert Catalog.from_file(yaml_file)["sim-b/big"].output_price_per_mtok == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[models]]\nprovider="x"\nmodel="m"\nfoo=1\n', "foo"),
        ('[[models]]\nprovider="x"\nmodel="m"\nquality={wrting=0.5}\n', "unknown skill 'wrting'"),
        ('[[models]]\nprovider="x"\nmodel="m"\nquality={writing=1.5}\n', "0..1"),
        ('[[models]]\nprovider="x"\nmodel="m"\ninput_price=-1\n', "input_price"),
        ('[[models]]\nprovider="x"\nmodel="m"\ncapabilities={telepathy=true}\n', "telepathy"),
        ('name="x"\n', "no 'models' list"),
        ('models = [\n', "does not parse"),
        ('[[models]]\nprovider="sim-x"\nmodel="m"\n[[models]]\nprovider="sim-x"\nmodel="m"\n', "twice"),
    ],
)
def test_bad_catalog_files_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(CatalogError) as info:
        Catalog.from_file(path)
    assert needle in str(info.value)


def test_missing_file_and_unknown_model() -> None:
    with pytest.raises(CatalogError, match="does not exist"):
        Catalog.from_file("/nonexistent/cat.toml")
    with pytest.raises(CatalogError, match="did you mean"):
        Catalog.simulated()["sim-openai/gpt-4o-mnii"]


def test_missing_price_is_a_warning_naming_the_model(caplog: pytest.LogCaptureFixture) -> None:
    spec = ModelSpec(provider="sim-x", model="mystery-model-9000", simulated=True)
    with caplog.at_level(logging.WARNING, logger="frugalflow"):
        assert spec.cost(Usage(input_tokens=1000, output_tokens=1000)) == 0.0
    assert "mystery-model-9000" in caplog.text
    assert not spec.priced


def test_unknown_provider_is_a_catalog_error() -> None:
    with pytest.raises(CatalogError, match="did you mean 'openai'"):
        Catalog([ModelSpec(provider="openaii", model="gpt-4o")])


def test_strongest_is_the_best_available_model() -> None:
    cat = Catalog.simulated()
    best = cat.strongest()
    assert best.mean_quality(SKILLS) == max(s.mean_quality(SKILLS) for s in cat)


def test_usage_adds() -> None:
    total = Usage(1, 2, 0, 0, 1) + Usage(10, 20, 5, 0, 1)
    assert total == Usage(11, 22, 5, 0, 2)
    assert total.total_tokens == 33


def test_tiered_prices_follow_genai_prices() -> None:
    # Gemini 2.5 Pro charges more past 200k input tokens: the cost must come from genai-prices.
    spec = Catalog.builtin()["google/gemini-2.5-pro"]
    assert not spec._resolved.linear
    for n in (1_000, 300_000):
        usage = Usage(input_tokens=n, output_tokens=1_000)
        direct = calc_price(GUsage(input_tokens=n, output_tokens=1_000), "gemini-2.5-pro",
                            provider_id="google")
        assert spec.cost(usage) == pytest.approx(float(direct.total_price))
    small = spec.cost(Usage(input_tokens=1_000)) / 1_000
    large = spec.cost(Usage(input_tokens=300_000)) / 300_000
    assert large > small


def test_a_spec_copied_with_changes_derives_its_key_adapter_and_prices_again() -> None:
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    assert (spec.key, spec.adapter.__class__.__name__) == ("sim-openai/gpt-4o-mini", "SimulatedAdapter")
    price = spec.input_price_per_mtok
    moved = spec.model_copy(update={"provider": "openai", "simulated": False,
                                    "input_price": price * 2})
    assert moved.key == "openai/gpt-4o-mini"
    assert moved.adapter.__class__.__name__ == "OpenAIAdapter"
    assert moved.input_price_per_mtok == price * 2
    assert spec.model_copy().key == spec.key  # a plain copy keeps what it derived


def test_a_custom_catalog_file_inherits_built_in_scores_and_may_override_them(
        tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        """
[[models]]
provider = "openai"
model = "gpt-4o-mini"
input_price = 0.15
output_price = 0.6

[[models]]
provider = "my-vllm"
model = "served-4o-mini"
base_url = "http://127.0.0.1:9/v1"
integration = "langchain_openai:ChatOpenAI"
quality_ref = "gpt-4o-mini"
quality = { writing = { score = 0.5, source = "our own eval" } }

[[models]]
provider = "my-vllm"
model = "unknown-model"
base_url = "http://127.0.0.1:9/v1"
integration = "langchain_openai:ChatOpenAI"
"""
    )
    cat = Catalog.from_file(path)
    builtin = Catalog.builtin()["openai/gpt-4o-mini"]
    inherited = cat["openai/gpt-4o-mini"]
    assert inherited.quality == builtin.quality and inherited.quality  # by its key, no table
    assert inherited.quality_sources["writing"] == builtin.quality_sources["writing"]
    overridden = cat["my-vllm/served-4o-mini"]  # by quality_ref, one skill overridden
    assert overridden.quality["writing"] == 0.5
    assert overridden.quality_sources["writing"] == "our own eval"
    assert overridden.quality["reasoning"] == builtin.quality["reasoning"]
    assert cat["my-vllm/unknown-model"].quality == {}  # nothing invented
