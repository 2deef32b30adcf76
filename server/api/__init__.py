"""HTTP layer: FastAPI app, OpenAI-compatible routes, auth, metrics (see server/api/app.py)."""

from server.api.app import create_app

__all__ = ["create_app"]
