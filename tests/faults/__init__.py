"""Fault injection and bad-input tests beyond tests/core (see RELIABILITY.md)."""
