"""Scale-out on Ray Serve: N replicas of the server (engine, scheduler and app of serving.app, each with its own
copy of the model) behind Ray Serve's HTTP proxy, with the single server's API. Needs the ray extra
(pip install "tfgen[ray]").

Three ways to run it:
- `tfgen serve --ray --replicas 2` (`serve_on_ray`);
- Ray's CLI: `serve run tfgen.serving.ray:app_builder model=ko-mini replicas=2` (`app_builder`);
- Python, on a cluster `ray.init` reached: `serve.run(tfgen.serving.ray.application(model, settings, replicas=2))`.
"""

import asyncio
import dataclasses
import signal
import threading

import ray
from ray import serve

from tfgen.serving import chat, models
from tfgen.serving.app import ServerSettings, create_app
from tfgen.serving.run import served_model_name

APP_NAME = "tfgen"
REPLICA_HEADER = "x-tfgen-replica"  # on every response: the id of the replica that made it
_LOAD_POLL_SECONDS = 0.2


class ReplicaHeader:
    """ASGI middleware: adds `x-tfgen-replica: ID` to every HTTP response (streams included)."""

    def __init__(self, app, replica_id):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.ingress()  # the app is built in the replica, by __serve_build_asgi_app__
class TfgenReplica:
    """One replica: `create_app`'s Starlette app on its own engine. `model` is resolved on the replica's machine (an
    embedded model's name, a hub id, or a directory at the same path on every machine)."""

    def __init__(self, model, settings):
        self.model = model
        self.settings = settings
        self.engine = None

    def __serve_build_asgi_app__(self):
        directory = models.resolve(self.model, self.settings.max_batch)
        app = create_app(lambda: models.load_model(directory), self.settings)
        self.engine = app.state.server.engine
        app.add_middleware(ReplicaHeader, replica_id=serve.get_replica_context().replica_id.unique_id)
        return app

    async def check_health(self):
        """Ray Serve's health check. The first, which a replica passes before it gets requests, waits for the model
        to load and warm up, so no request reaches a replica that would answer 503 "loading"."""
        while not self.engine.ready.is_set() and self.engine.failed is None:
            await asyncio.sleep(_LOAD_POLL_SECONDS)
        if self.engine.failed is not None:
            raise RuntimeError(f"the model failed to load: {self.engine.failed}")


def application(model, settings, replicas=1, replica_cpus=1.0, replica_gpus=0.0):
    """The Ray Serve application: `replicas` TfgenReplicas serving `model` with `settings` (a ServerSettings).
    A replica takes as many requests at once as its engine holds (slots plus queue), so that its continuous
    batching, not Ray's router, decides what waits; past that, requests wait in Ray's proxy."""
    deployment = serve.deployment(
        TfgenReplica,
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=settings.max_batch + settings.max_queue,
    )
    return deployment.bind(model, settings)


_SETTINGS_FIELDS = {field.name: field.type for field in dataclasses.fields(ServerSettings)}
_APPLICATION_ARGS = {"replicas": int, "replica_cpus": float, "replica_gpus": float}


def app_builder(args):
    """For `serve run tfgen.serving.ray:app_builder model=M replicas=N [max_batch=16 max_queue=64 api_key=KEY
    request_timeout=120 chat_template=FILE replica_cpus=1 replica_gpus=0]` (Ray passes the key=value pairs as
    strings)."""
    args = dict(args)
    model = args.pop("model", "ko-mini")
    template_file = args.pop("chat_template", None)  # a file, as `tfgen serve --chat-template` takes it
    known = _SETTINGS_FIELDS.keys() | _APPLICATION_ARGS.keys()
    unknown = sorted(args.keys() - known)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)}; the known ones are model, {', '.join(sorted(known))}"
        )
    settings = ServerSettings(
        **{
            "model_name": served_model_name(model),
            **{k: _SETTINGS_FIELDS[k](v) for k, v in args.items() if k in _SETTINGS_FIELDS},
        }
    )
    directory = models.resolve(model, settings.max_batch)  # a missing model fails here, before any replica starts
    settings = dataclasses.replace(settings, chat_template=chat.load(directory, template_file))
    return application(
        model, settings, **{k: _APPLICATION_ARGS[k](v) for k, v in args.items() if k in _APPLICATION_ARGS}
    )


def _wait_for_stop():
    """Blocks until SIGTERM or Ctrl-C."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def serve_on_ray(
    model, host, port, settings, chat_template=None, replicas=1, ray_address=None, replica_cpus=1.0, replica_gpus=0.0
):
    """`tfgen serve --ray`: joins the Ray cluster `ray.init(ray_address)` finds or starts, runs `replicas` replicas
    behind Ray Serve's proxy on host:port, says so once they are ready, then serves until SIGTERM or Ctrl-C; then
    deletes the application and leaves the cluster (a cluster it started stops). Chats are rendered by the template
    file `chat_template`, else by the model's own, if it has one (read here, sent to the replicas)."""
    directory = models.resolve(model, settings.max_batch)  # a missing model fails before Ray starts
    settings = dataclasses.replace(settings, chat_template=chat.load(directory, chat_template))
    ray.init(address=ray_address)
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(
                application(model, settings, replicas, replica_cpus, replica_gpus), name=APP_NAME, route_prefix="/"
            )
        except RuntimeError as error:  # Ray's "Deploying application ... failed", after retrying the replicas
            raise ValueError(
                f"the replicas did not start (their log under /tmp/ray/session_latest/logs/serve/ says why): {error}"
            ) from None
        print(
            f"tfgen: {replicas} replica(s) of {settings.model_name} ready on http://{host}:{port} (Ray Serve)",
            flush=True,
        )
        _wait_for_stop()
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
