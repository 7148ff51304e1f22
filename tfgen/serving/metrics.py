"""The server's Prometheus metrics, in a registry of their own (one per app)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, slots):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tfgen_requests", "Completion requests answered, by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("tfgen_prompt_tokens", "Prompt tokens of admitted rows", registry=r)
        self.completion_tokens = Counter("tfgen_completion_tokens", "Tokens generated", registry=r)
        self.finished_rows = Counter(
            "tfgen_finished_rows",
            "Rows that left their slot, by finish_reason (stop, length, cancelled: the client went away)",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("tfgen_queue_depth", "Rows waiting for a decode slot", registry=r)
        self.busy_slots = Gauge("tfgen_busy_slots", "Decode slots holding a row (batch occupancy)", registry=r)
        Gauge("tfgen_slots", "Decode slots (--max-batch)", registry=r).set(slots)
        self.steps = Counter("tfgen_engine_steps", "Engine steps (each advances every busy slot)", registry=r)
        self.step_rows = Histogram(
            "tfgen_step_rows", "Rows advanced per engine step", registry=r, buckets=tuple(2**i for i in range(11))
        )
        self.time_to_first_token = Histogram(
            "tfgen_time_to_first_token_seconds",
            "From a row's arrival to its first generated token",
            registry=r,
            buckets=_SECONDS,
        )
        self.prefix_cache_hits = Counter(
            "tfgen_prefix_cache_hits",
            "Admitted rows whose prompt began with cached blocks of keys and values (prefix caching)",
            registry=r,
        )
        self.prefix_cache_misses = Counter(
            "tfgen_prefix_cache_misses", "Admitted rows that found no cached prefix", registry=r
        )
        self.prefix_cache_reused_tokens = Counter(
            "tfgen_prefix_cache_reused_tokens",
            "Prompt tokens taken from the prefix cache instead of prefilled",
            registry=r,
        )
        self.latency = Histogram(
            "tfgen_request_latency_seconds", "From a row's arrival to its last token", registry=r, buckets=_SECONDS
        )
