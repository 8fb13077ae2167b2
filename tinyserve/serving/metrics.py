"""Server metrics: counters, gauges and latency histograms, rendered as Prometheus text."""

from __future__ import annotations

import threading

from ..outputs import RequestOutput


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for b, c in zip((*self.buckets, float("inf")), self.counts):
            total += c
            le = "+Inf" if b == float("inf") else repr(b)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


_HELP = {
    "num_requests_running": "Requests with a sequence in the running batch.",
    "num_requests_waiting": "Requests queued for the engine, not yet running.",
    "kv_cache_usage_perc": "Share of KV-cache blocks in use, 0 to 1 (free cached blocks count free).",
    "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
    "prefix_cache_hits_total": "Prompt tokens found in the prefix cache (not prefilled again).",
    "spec_decode_num_draft_tokens_total": "Speculative decoding: tokens proposed and verified.",
    "spec_decode_num_accepted_tokens_total": "Speculative decoding: proposed tokens kept.",
}


class Metrics:
    """Counters the engine thread and the HTTP handlers update; rendered as Prometheus text.

    `labels` go on every sample: behind Ray Serve, {"replica": id}, so one scrape of the ingress
    shows each replica's queue and cache apart, as routers that score replicas need.
    """

    def __init__(self, labels: dict[str, str] | None = None):
        self.labels = labels or {}
        self.lock = threading.Lock()
        self.http: dict[tuple[str, int], int] = {}  # (path, status) -> responses
        self.finished: dict[str, int] = {}  # finish reason of each request's first sample -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(
            "tinyserve_time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            "tinyserve_time_per_output_token_seconds",
            "Time per output token after the first.",
            _LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "tinyserve_e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS
        )
        self.gauges: dict[str, float] = dict.fromkeys(
            ["kv_blocks_in_use", "kv_blocks_total", "sequences_running", "sequences_waiting"]
            + ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"],
            0,
        )
        self.counters = dict.fromkeys(
            ["prefix_cache_queries_total", "prefix_cache_hits_total"]
            + ["spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total"],
            0,
        )

    def count_http(self, path: str, status: int) -> None:
        with self.lock:
            self.http[path, status] = self.http.get((path, status), 0) + 1

    def count_finished(self, out: RequestOutput | None, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if out is None:
                return
            m = out.metrics
            self.prompt_tokens += len(out.prompt_token_ids)
            self.generation_tokens += sum(len(o.token_ids) for o in out.outputs)
            for hist, v in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.e2e, m.e2e)):
                if v is not None:
                    hist.observe(v)

    def _http_lines(self) -> list[str]:
        return [
            "# HELP tinyserve_http_requests_total HTTP responses by path and status.",
            "# TYPE tinyserve_http_requests_total counter",
        ] + [
            f'tinyserve_http_requests_total{{path="{p}",status="{s}"}} {n}'
            for (p, s), n in sorted(self.http.items())
        ]

    def render_http(self) -> str:
        """Only the HTTP responses' counter: what a Ray ingress answers itself, with no engine."""
        with self.lock:
            lines = self._http_lines()
        return "\n".join(_labelled(line, self.labels) for line in lines) + "\n"

    def render(self) -> str:
        with self.lock:
            lines = self._http_lines()
            lines += [
                "# HELP tinyserve_requests_total Generation requests ended, by finish reason.",
                "# TYPE tinyserve_requests_total counter",
            ]
            lines += [
                f'tinyserve_requests_total{{finish_reason="{r}"}} {n}'
                for r, n in sorted(self.finished.items())
            ]
            for name, v, help in [
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                ("generation_tokens_total", self.generation_tokens, "Tokens generated."),
            ]:
                lines += [
                    f"# HELP tinyserve_{name} {help}",
                    f"# TYPE tinyserve_{name} counter",
                    f"tinyserve_{name} {v}",
                ]
            for kind, values in (("counter", self.counters), ("gauge", self.gauges)):
                for name, v in values.items():
                    if name in _HELP:
                        lines.append(f"# HELP tinyserve_{name} {_HELP[name]}")
                    lines += [f"# TYPE tinyserve_{name} {kind}", f"tinyserve_{name} {v}"]
            for hist in (self.ttft, self.tpot, self.e2e):
                lines += hist.render()
        if self.labels:
            lines = [_labelled(line, self.labels) for line in lines]
        return "\n".join(lines) + "\n"


def _labelled(line: str, labels: dict[str, str]) -> str:
    """One exposition line with `labels` put first in its sample's label set."""
    if line.startswith("#"):
        return line
    name, sep, rest = line.partition("{")
    if not sep:
        name, _, value = line.partition(" ")
        rest = "} " + value
    extra = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{extra}{',' if rest[0] != '}' else ''}{rest}"


def merge(texts: list[str]) -> str:
    """Prometheus texts of several replicas as one: each metric's HELP / TYPE once, then its
    samples from every replica (a scraper refuses a second TYPE line for one name)."""
    families: dict[str, list[str]] = {}  # name -> its HELP / TYPE lines, then samples
    for text in texts:
        name = None
        for line in text.splitlines():
            if line.startswith("# "):
                name = line.split()[2]
                family = families.setdefault(name, [])
                if line not in family:
                    family.append(line)
            elif line and name is not None:
                families[name].append(line)
    return "".join(line + "\n" for family in families.values() for line in family)
