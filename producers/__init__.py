"""How work comes in: the Python client, the HTTP API, bulk JSONL submission."""
