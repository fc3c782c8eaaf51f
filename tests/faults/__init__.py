"""Fault injection: kills, interrupts, corrupt stores and hostile input (see RELIABILITY.md)."""
