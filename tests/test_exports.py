import frugalflow


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name for name in dir(frugalflow)
        if not name.startswith("_") and name not in {
            # submodules are reachable but not part of the flat API
            "catalog", "cli", "dispatch", "emulator", "exceptions", "fallback", "flow", "learning", "persistence",
            "providers", "routing", "runner", "service", "usage",
            "annotations", "PackageNotFoundError", "version",
        }
    }
    assert public == set(frugalflow.__all__) - {"__version__"}
    assert sorted(frugalflow.__all__, key=str.lower) == sorted(frugalflow.__all__, key=str.lower)
