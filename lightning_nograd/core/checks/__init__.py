"""The checks: each module finds one kind of problem (or a few of one family), while it happens."""
