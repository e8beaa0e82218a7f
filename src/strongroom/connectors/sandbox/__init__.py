"""The built-in sandbox processor: deterministic by Stripe's test card numbers (see `cards`)."""

from strongroom.connectors.sandbox.connector import SandboxConnector
from strongroom.connectors.sandbox.processor import SandboxProcessor

__all__ = ["SandboxConnector", "SandboxProcessor"]
