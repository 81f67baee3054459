"""Thin adapters from a platform's events to the protocol-neutral core (AWS Lambda, Cloud Run,
gRPC, the local server)."""
