"""Serving: `create_app` (retrolm.serve.app), the batching worker (engine, batch), the web page."""
