"""nbmeter: operator entry points (the `nbmeter` command and the local stack)."""
