"""Passes over the IR graph: each reads a Graph and returns a new result; none edits its input."""
