"""The import paths the on-call runbook uses, kept stable whatever kamiyo's own layout."""
