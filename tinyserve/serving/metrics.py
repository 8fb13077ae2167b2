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


class Metrics:
    """Counters the engine thread and the HTTP handlers update; rendered as Prometheus text."""

    def __init__(self):
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
        self.gauges = dict.fromkeys(
            ["kv_blocks_in_use", "kv_blocks_total", "sequences_running", "sequences_waiting"], 0
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

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP tinyserve_http_requests_total HTTP responses by path and status.",
                "# TYPE tinyserve_http_requests_total counter",
            ]
            lines += [
                f'tinyserve_http_requests_total{{path="{p}",status="{s}"}} {n}'
                for (p, s), n in sorted(self.http.items())
            ]
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
            for name, v in self.gauges.items():
                lines += [f"# TYPE tinyserve_{name} gauge", f"tinyserve_{name} {v}"]
            for hist in (self.ttft, self.tpot, self.e2e):
                lines += hist.render()
        return "\n".join(lines) + "\n"
