"""Read models built from the event log: current state, history and statistics tables."""
