"""Merchants, API keys and (later) the OAuth 2.0 server."""
