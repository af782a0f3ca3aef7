"""``api.payments``: the runbook's payments entry points."""
