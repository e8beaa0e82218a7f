"""Events written in the same transaction as the change they describe (delivery: a later issue)."""
