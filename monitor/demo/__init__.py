"""The embedded end-to-end demo (``latentwatch demo``): real model, real text, metrics and an alarm."""
