"""Token coding of many channels: shared-content streams and their comparison."""
