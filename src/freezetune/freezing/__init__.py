"""Every ``requires_grad`` decision: freeze plans, integrity fingerprints, gradual unfreezing."""
