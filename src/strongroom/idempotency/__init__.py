"""Idempotency-Key handling (Stripe's semantics, IETF draft-ietf-httpapi-idempotency-key-header)."""
