"""Typed configuration: the recipe schema and its error wording, the adapter metadata schema."""
