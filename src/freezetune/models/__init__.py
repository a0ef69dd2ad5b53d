"""Models: the catalog, timm models, the ``freezetune models`` listing, building with weights.

The package spans two import layers: ``catalog``, ``timm_models``, ``structure`` and ``download``
sit below ``config`` (which checks model names against the catalog), ``weights`` and ``listing``
above it (building reads ``config.ModelConfig``; the listing is for the command line only).
"""
