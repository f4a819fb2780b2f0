"""Optimisers used by fedens methods (``ivon_prior.IVONPrior``: IVON with a per-element prior and
the Lagrangian terms of IVON-ADMM)."""
