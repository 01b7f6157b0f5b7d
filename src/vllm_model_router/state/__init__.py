"""What the router remembers: the SQLite usage store (store), the next-model predictor that reads it
(predict) and the in-memory lifecycle event log (lifecycle)."""
