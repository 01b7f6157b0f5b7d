"""The async shell around the pure scheduler: the event pump that owns it (pump), and the objects
that feed it events: adapter reconciliation, usage history, GPU monitoring, restart recovery."""
