"""The training job's state machine: its statuses (`status`) and every transition (`lifecycle`)."""
