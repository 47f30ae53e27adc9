"""The built-in quality prior is on one scale per skill, and a missing score is explicit."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from frugalflow import Catalog, ModelSpec, Needs
from frugalflow.catalog import _builtin_quality
from frugalflow.needs import SKILLS, Unscored
from frugalflow.ranking import explain, rank

README = Path(__file__).resolve().parents[1] / "README.md"
SOURCE = "Artificial Analysis"
SNAPSHOT = "snapshot 2025-11-24"
# The one benchmark behind each directly measured skill (quality.toml's header says why).
BENCHMARK = {
    "classification": "MMLU-Pro",
    "reasoning": "GPQA Diamond",
    "coding": "LiveCodeBench",
    "math": "AIME 2025",
    "writing": "IFBench",
    "tool_use": "τ²-Bench Telecom",
}
DERIVED = ("extraction", "summarization")
KEYS = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "DEEPSEEK_API_KEY",
        "MISTRAL_API_KEY", "GROQ_API_KEY", "TOGETHER_API_KEY", "OLLAMA_HOST"]


def _catalog_refs() -> set[str]:
    text = (resources.files("frugalflow") / "data" / "catalog.toml").read_text()
    return {m["quality_ref"] for m in tomllib.loads(text)["models"]}


def _percent(source: str, benchmark: str) -> float:
    found = re.search(re.escape(benchmark) + r" (\d+\.\d)%", source)
    assert found, f"{benchmark} value not in {source!r}"
    return float(found.group(1)) / 100


def test_every_built_in_model_has_a_score_table() -> None:
    # Every catalog model's key has a table (an empty one says "unscored for every skill");
    # claude-3-5-haiku is kept for catalog files that name it.
    assert _catalog_refs() <= set(_builtin_quality())
    assert len(_builtin_quality()) == 26
    assert _builtin_quality()["qwen2.5-7b"] == {}  # not measured by the source: no invention


@pytest.mark.parametrize("skill", sorted(BENCHMARK))
def test_a_measured_skill_has_one_benchmark_from_one_source(skill: str) -> None:
    scored = 0
    for ref, table in _builtin_quality().items():
        entry = table.get(skill)
        if entry is None:
            continue
        scored += 1
        source = entry["source"]
        assert source.startswith(BENCHMARK[skill] + " "), f"{ref}.{skill}: {source}"
        assert SOURCE in source and SNAPSHOT in source, f"{ref}.{skill}: {source}"
        # The score is the named result / 100: no rescaling, no mixing.
        assert entry["score"] == pytest.approx(_percent(source, BENCHMARK[skill]), abs=6e-4)
    assert scored >= 21, f"{skill}: only {scored} of 26 models scored"


@pytest.mark.parametrize("skill", DERIVED)
def test_a_derived_skill_follows_its_stated_formula_from_the_same_source(skill: str) -> None:
    for ref, table in _builtin_quality().items():
        entry = table.get(skill)
        if entry is None:
            continue
        source = entry["source"]
        assert source.startswith("derived: mean of IFBench") and SNAPSHOT in source
        ifbench, lcr = _percent(source, "IFBench"), _percent(source, "AA-LCR")
        assert entry["score"] == pytest.approx((ifbench + lcr) / 2, abs=6e-4), ref
        # Its inputs are the same run's numbers as the model's own writing score.
        assert table["writing"]["score"] == pytest.approx(ifbench, abs=6e-4), ref


def test_scores_compare_like_with_like_across_tiers() -> None:
    # On one scale, a frontier model outscores a small one on every skill both have.
    q = _builtin_quality()
    for skill in SKILLS:
        if skill in q["gpt-5"] and skill in q["llama-3.1-8b"]:
            assert q["gpt-5"][skill]["score"] > q["llama-3.1-8b"][skill]["score"], skill


def _two_models() -> Catalog:
    return Catalog.from_dict({"models": [
        {"provider": "sim-a", "model": "claude-haiku-4-5", "quality_ref": "claude-haiku-4-5",
         "input_price": 1.0, "output_price": 5.0},
        {"provider": "sim-b", "model": "gpt-4.1", "quality_ref": "gpt-4.1",
         "input_price": 2.0, "output_price": 8.0},
    ]})


def test_a_missing_score_is_shown_as_unscored_with_its_rule() -> None:
    cat = _two_models()
    assert "writing" not in cat["sim-a/claude-haiku-4-5"].quality  # the source has no IFBench
    rows = {r["model"]: r for r in explain(cat, Needs(quality={"writing": 0.4}))}
    haiku = rows["sim-a/claude-haiku-4-5"]
    assert not haiku["accepted"]
    assert haiku["reasons"] == [
        "unscored for writing (rule: reject; measure it with `frugalflow eval`, "
        "or set Needs(unscored='accept'))"]
    assert rows["sim-b/gpt-4.1"]["accepted"]


def test_the_accept_rule_makes_unscored_models_candidates_by_cost() -> None:
    cat = _two_models()
    needs = Needs(quality={"writing": 0.4}, unscored="accept")
    assert needs.unscored is Unscored.ACCEPT
    assert "unscored=accept" in needs.describe()
    assert Needs(quality={"writing": 0.4}).cache_key != needs.cache_key
    ranked = [c.spec.key for c in rank(cat, needs).candidates]
    assert ranked == ["sim-a/claude-haiku-4-5", "sim-b/gpt-4.1"]  # cheapest first
    # A score below the minimum still rejects under either rule.
    low = rank(cat, Needs(quality={"writing": 0.9}, unscored="accept"))
    assert [c.spec.key for c in low.candidates] == ["sim-a/claude-haiku-4-5"]
    assert "quality.writing 0.43 < 0.9" in low.rejected[0][1]


def test_an_unknown_unscored_rule_is_refused_with_the_choices() -> None:
    with pytest.raises(ValidationError, match="'reject' or 'accept'"):
        Needs(quality={"writing": 0.4}, unscored="ignore")  # type: ignore[arg-type]


def test_a_catalog_file_can_score_what_the_source_leaves_unscored(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        '[[models]]\nprovider = "anthropic"\nmodel = "claude-haiku-4-5"\n'
        '[quality."claude-haiku-4-5"]\n'
        'writing = { score = 0.6, source = "our eval, 200 tickets" }\n'
    )
    spec = Catalog.from_file(path)["anthropic/claude-haiku-4-5"]
    built_in = Catalog.builtin()["anthropic/claude-haiku-4-5"]
    assert spec.quality["writing"] == 0.6
    assert spec.quality_sources["writing"] == "our eval, 200 tickets"
    assert spec.quality["classification"] == built_in.quality["classification"]  # inherited


def _quickstart(catalog: Catalog) -> dict[str, Any]:
    """The README quickstart's flow compiled on `catalog`: node -> first candidate."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    head = block.split("app = flow.compile")[0]
    ns: dict[str, Any] = {"__name__": "readme_quickstart"}
    exec(compile(head, str(README), "exec"), ns)
    flow = ns["flow"]
    needs = {name: flow.nodes[name].needs for name in ("classify", "reply")}
    return {name: rank(catalog, n).first().spec for name, n in needs.items()}


@pytest.mark.parametrize("which", ["simulated", "builtin"])
def test_the_quickstart_nodes_land_on_different_tiers(which: str) -> None:
    if which == "simulated":
        catalog = Catalog.simulated()
    else:  # every provider configured (fake keys): what a user with all keys would get
        catalog = Catalog(list(Catalog.builtin()), name="builtin", env=dict.fromkeys(KEYS, "x"))
    chosen: dict[str, ModelSpec] = _quickstart(catalog)
    easy, hard = chosen["classify"], chosen["reply"]
    assert easy.key != hard.key
    assert hard.quality["writing"] > easy.quality["writing"]  # the harder node's skill
    assert easy.estimate_cost(1000, 400) < hard.estimate_cost(1000, 400)
