"""Synthesis: versioned prompt folders, context rendering, output parsing and validity checks."""
