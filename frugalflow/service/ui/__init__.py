"""The run viewer: server-rendered pages under /ui (runs, a run, costs, catalog and health)."""
