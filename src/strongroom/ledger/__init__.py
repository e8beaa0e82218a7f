"""Double-entry ledger: accounts, journal postings, balances (ARCHITECTURE: data rules, money)."""
