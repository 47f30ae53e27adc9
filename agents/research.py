"""Agents for a research brief: plan sub-questions, research each, synthesise, critique."""

from __future__ import annotations

from pydantic import BaseModel, Field

from frugalflow import Agent, Needs


class Plan(BaseModel):
    questions: list[str] = Field(description="2 to 4 focused sub-questions", min_length=1)


class Critique(BaseModel):
    acceptable: bool
    issues: list[str] = Field(default_factory=list)


planner = Agent(
    name="plan",
    instructions="Split the research topic into 2-4 focused sub-questions.",
    needs=Needs(quality={"reasoning": 0.7}, expected_output_tokens=120),
    output=Plan,
    prompt=lambda s: f"Topic: {s['topic']}",
)

# `researcher` gets its search tool from the flow (the documents folder is the flow's choice).
researcher = Agent(
    name="research",
    instructions="Answer the sub-question from the knowledge base in 2-3 sentences; cite files.",
    needs=Needs(quality={"summarization": 0.2}, expected_output_tokens=200),
    prompt=lambda s: f"Sub-question: {s['question']}",
)

synthesizer = Agent(
    name="synthesize",
    instructions="Write a concise brief (under 200 words) from the findings; keep citations.",
    needs=Needs(quality={"writing": 0.28}, expected_output_tokens=400),
    prompt=lambda s: (f"Topic: {s['topic']}\nFindings:\n" + "\n".join(s.get("findings", []))
                      + (f"\nFix these issues: {s['issues']}" if s.get("issues") else "")),
)

critic = Agent(
    name="critique",
    instructions="Check the brief against the findings: unsupported claims, gaps, clarity.",
    needs=Needs(quality={"reasoning": 0.72}, expected_output_tokens=150),
    output=Critique,
    prompt=lambda s: f"Findings:\n{s.get('findings')}\n\nBrief:\n{s['brief']}",
)
