"""The tool and output schemas the wire tests ask models for (shared by the emulator's and
the batch APIs' tests)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class GetWeather(BaseModel):
    """Get the weather forecast for a city."""

    city: str
    days: int
    unit: Literal["celsius", "fahrenheit"]


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str
    age: int
    tags: list[str]
    email: str | None = None
