"""Runners: the agents that produce a run's results."""
