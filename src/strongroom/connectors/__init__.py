"""Processor connectors behind one small interface (`base.Connector`)."""
