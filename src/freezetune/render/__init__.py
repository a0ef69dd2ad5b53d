"""Turning results into text, tables and figures for people."""
