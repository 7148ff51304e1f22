"""`tfgen serve`: an OpenAI-compatible completions server with continuous batching (needs the `serve` extra)."""
