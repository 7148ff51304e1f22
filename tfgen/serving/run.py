"""Starts the server: resolves the model, builds the app and runs it under uvicorn."""

from pathlib import Path

import uvicorn

from tfgen.serving import models
from tfgen.serving.app import ServerSettings, create_app


def served_model_name(name_or_path):
    """The id clients pass as `model`: a directory's name, else the name given (embedded model or hub id)."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)


def serve(model, host, port, settings, log_level="info"):
    """Serves `model` (a checkpoint, an embedded model's name, a hub id or a LiteRT export; loaded once the server
    is up, GET /health says when it is ready) until SIGTERM or Ctrl-C; on either, stops taking connections and
    lets the requests in flight finish."""
    directory = models.resolve(model, settings.max_batch)
    app = create_app(lambda: models.load_model(directory), settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=int(settings.request_timeout) + 5)
