"""Shipped hardware presets (`--hardware preset:NAME`)."""
