"""AG-UI both ways: the `/api/agui` endpoint (in) and the `agui` runner (out)."""
