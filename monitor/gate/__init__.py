"""The release gate: checks on a candidate model's internals that a release must pass (``latentwatch gate``)."""
