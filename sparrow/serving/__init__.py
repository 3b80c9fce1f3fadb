"""Serving: an OpenAI-compatible HTTP server (`sparrow serve`) on a continuous-batching engine, and its web chat page."""
