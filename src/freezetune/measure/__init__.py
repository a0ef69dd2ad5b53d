"""Measurement: synchronized timing, memory high-water marks, FLOP counts."""
