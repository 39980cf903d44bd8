"""Preprocessors that HeartPlans may name (filled in by the Numba resampling issue)."""
