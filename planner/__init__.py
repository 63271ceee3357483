"""Decisions: the accuracy model, the bound search, plans, validation and the `moesz` command line."""
