"""Serving many adapters on one base: the server, its per-adapter parts, prediction rows."""
