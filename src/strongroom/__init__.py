"""Strongroom: a self-hosted, security-first payment platform with a Stripe-compatible API."""

__version__ = "0.1.0"
