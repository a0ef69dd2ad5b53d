"""Side-by-side measurement of freeze configs (arms), and the benchmark built on it."""
