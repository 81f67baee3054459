"""Warm-up, keep-warm, and warm pool sizing and applying it (provisioned concurrency, min instances)."""
