"""The pure core: routing, the run state machine and result rules. No sockets, no store."""
