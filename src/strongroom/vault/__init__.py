"""The card vault: the only code that sees a full card number."""
