"""The model catalog (families, stages, heads) and building a model with its weights."""
