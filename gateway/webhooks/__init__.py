"""Webhooks (issue 15, item 1): endpoints named in the settings receive the events they
subscribe to as signed POSTs, durably and in order per conversation (docs/webhooks.md)."""
