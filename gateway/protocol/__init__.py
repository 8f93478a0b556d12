"""The wire: frame models, error and close codes (PROTOCOL.md sections 2-4, 7, 10)."""
