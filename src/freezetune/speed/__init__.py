"""How a run executes fast: the execution decision, the frozen prefix, the feature cache, precision."""
