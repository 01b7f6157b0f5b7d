"""The async shell around the pure scheduler: the event pump that owns it (pump), the tasks that carry
out its slow effects (tasks), the names clients may use (catalog), and the parts that feed the pump
events through its public side (base): adapter reconciliation (adapters), usage history and predictive
preload (history), GPU monitoring (gpu_monitor) and restart recovery (recovery)."""
