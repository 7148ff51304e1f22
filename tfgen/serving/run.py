"""Starts the server: resolves the model, builds the app and runs it under uvicorn."""

import dataclasses
from pathlib import Path

import uvicorn

from tfgen.serving import chat, models
from tfgen.serving.app import create_app


def served_model_name(name_or_path):
    """The id clients pass as `model`: a directory's name, else the name given (embedded model or hub id)."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)


def serve(model, host, port, settings, log_level="info", chat_template=None):
    """Serves `model` (a checkpoint, an embedded model's name, a hub id or a LiteRT export; loaded once the server
    is up, GET /health says when it is ready) until SIGTERM or Ctrl-C; on either, stops taking connections and
    lets the requests in flight finish. Chats are rendered by the template file `chat_template`, else by the
    model's own, if it has one."""
    directory = models.resolve(model, settings.max_batch)
    settings = dataclasses.replace(settings, chat_template=chat.load(directory, chat_template))
    app = create_app(lambda: models.load_model(directory), settings)
    uvicorn.run(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(settings.request_timeout) + 5
    )
