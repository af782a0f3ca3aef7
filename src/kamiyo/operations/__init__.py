"""What operators do by hand, safely: overrides, replay, the audit log, drift.

Shared by the CLI and the admin console. Every function that writes records an audit entry in
the same transaction as the change it describes, so the log and the data never disagree.
"""
