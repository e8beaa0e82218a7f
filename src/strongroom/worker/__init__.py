"""Background work with an owner: jobs leased from a table, run by `strongroom worker`."""
