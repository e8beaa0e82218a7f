"""Customers, payment methods, payment intents (authorize, capture, cancel), charges and refunds."""
