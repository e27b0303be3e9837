"""The HTTP edge: FastAPI routes and the wire dialects (LLaVA, FastChat, OpenAI); imports no torch."""
