"""`topd top`: a live terminal view of a teacher and its trainers (and rollouts), from their `/status`.

One panel per service, refreshed every `interval` seconds, the way nvtop shows GPUs: the teacher's
queue and tokens/s with a bar per client (its share of the tokens since the last refresh), each
trainer's step progress, phase, ETA and where its last step's time went. HTTP only: it needs
nothing but the services' REST ports (and the auth token when auth is on).

On a terminal the view redraws in place; otherwise (a pipe, a file, a test) each refresh is printed
in turn, like `top -b`.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

PHASE_STYLES = {"sample": "cyan", "score": "magenta", "branch": "yellow", "train": "green", "sync": "blue",
                "eval": "white", "checkpoint": "white"}
BAR_WIDTH = 24


def status_url(url: str) -> str:
    """`host:port`, `http://host:port` or `.../status` -> the `/status` URL."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url if url.endswith("/status") else url + "/status"


@dataclass
class Sample:
    """One /status read: the JSON (or why there is none) and when it was taken."""

    url: str
    at: float
    status: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Poller:
    """Reads every service's /status; keeps the previous read to turn totals into rates."""

    urls: list[str]
    token: str | None = None
    timeout: float = 2.0
    previous: dict[str, Sample] = field(default_factory=dict)

    def __post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(timeout=self.timeout, headers=headers)

    def read(self, url: str) -> Sample:
        sample = Sample(url, time.monotonic())
        try:
            resp = self._http.get(url)
        except httpx.HTTPError as exc:
            sample.error = f"cannot reach: {type(exc).__name__}: {exc}"
            return sample
        if resp.status_code in (401, 403):
            sample.error = f"HTTP {resp.status_code}: pass the services' token (--token-file, TOPD_AUTH_TOKEN)"
        elif resp.status_code != 200:
            sample.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        else:
            sample.status = resp.json()
        return sample

    def poll(self) -> list[tuple[Sample, Sample | None]]:
        """(this read, the previous one) per URL."""
        out = []
        for url in self.urls:
            sample = self.read(url)
            out.append((sample, self.previous.get(url)))
            if sample.status is not None:
                self.previous[url] = sample
        return out

    def close(self) -> None:
        self._http.close()


# --- formatting ------------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    """62 -> 1m02s, 3725 -> 1h02m; None -> '-'."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_number(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return f"{x:,}"


def bar(fraction: float, width: int = BAR_WIDTH, style: str = "green") -> ProgressBar:
    return ProgressBar(total=1.0, completed=max(0.0, min(1.0, fraction)), width=width, complete_style=style,
                       finished_style=style)


def short(url: str) -> str:
    """http://host:port/status -> host:port (https stays spelled out)."""
    return url.removesuffix("/status").removeprefix("http://")


def header(status: dict[str, Any], url: str) -> Text:
    ready = status.get("ready")
    text = Text()
    text.append(f"{status.get('service', '?')} ", style="bold")
    text.append(short(url), style="dim")
    text.append("  ")
    text.append("ready" if ready else f"not ready: {status.get('not_ready_reason', '?')}",
                style="green" if ready else "red")
    text.append(f"  up {fmt_duration(status.get('uptime_s'))}", style="dim")
    return text


def client_rates(now: Sample, before: Sample | None) -> dict[str, float | None]:
    """tokens/s of each client between two reads (None on the first read)."""
    clients = now.status.get("clients") or {}
    if before is None or before.status is None or now.at <= before.at:
        return {cid: None for cid in clients}
    old = before.status.get("clients") or {}
    dt = now.at - before.at
    return {cid: max(0, c.get("tokens", 0) - old.get(cid, {}).get("tokens", 0)) / dt for cid, c in clients.items()}


def model_server_view(now: Sample, before: Sample | None) -> RenderableType:
    """Teacher or rollout: model, queue, tokens/s; one row per client with its share of recent tokens."""
    s = now.status
    summary = Table.grid(padding=(0, 2))
    summary.add_row(f"model {s.get('model', '-')}", f"engine {s.get('engine', '-')}/{s.get('device', '-')}",
                    f"dtype {s.get('dtype', '-')}")
    summary.add_row(f"queue {s.get('queue_depth', 0)}", f"tokens/s (1m) {fmt_number(s.get('tokens_per_s_1m'))}",
                    f"requests {fmt_number(s.get('requests'))}  tokens {fmt_number(s.get('tokens'))}")
    if "policy_version" in s:
        update = s.get("last_update") or {}
        summary.add_row(f"policy version {s['policy_version']}",
                        f"last update {fmt_number(update.get('apply_seconds'))} s" if update else "no update yet", "")
    rates = client_rates(now, before)
    clients = s.get("clients") or {}
    if not clients:
        return Group(summary)
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for column in ("client", "tokens/s", "share", "requests", "tokens", "mean latency"):
        table.add_column(column, justify="left" if column in ("client", "share") else "right")
    total_rate = sum(r for r in rates.values() if r) or 0.0
    total_tokens = sum(c.get("tokens", 0) for c in clients.values()) or 1
    for cid, c in sorted(clients.items(), key=lambda kv: (rates.get(kv[0]) or 0.0, kv[1].get("tokens", 0)),
                         reverse=True):
        rate = rates.get(cid)
        share = (rate / total_rate) if rate is not None and total_rate else c.get("tokens", 0) / total_tokens
        table.add_row(cid, fmt_number(rate), bar(share, style="cyan"), fmt_number(c.get("requests")),
                      fmt_number(c.get("tokens")), f"{c.get('mean_latency_s', 0.0) * 1000:.1f} ms")
    return Group(summary, table)


def phase_times(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    return [(key.split("/", 1)[1], float(v)) for key, v in metrics.items()
            if key.startswith("time/") and key != "time/step" and isinstance(v, (int, float)) and v is not None]


def trainer_view(now: Sample) -> RenderableType:
    """Step progress, phase and ETA; the last step's loss, KL, accuracy; where its time went."""
    s = now.status
    step, max_steps = int(s.get("step") or 0), int(s.get("max_steps") or 0)
    progress = Table.grid(padding=(0, 2))
    phase = s.get("phase", "-")
    progress.add_row(bar(step / max_steps if max_steps else 0.0, width=BAR_WIDTH * 2),
                     f"step {step}/{max_steps}", Text(f"phase {phase}", style=PHASE_STYLES.get(phase, "")),
                     f"ETA {fmt_duration(s.get('eta_s'))}")
    metrics = s.get("last_metrics") or {}
    numbers = Table.grid(padding=(0, 2))
    numbers.add_row(f"objective {s.get('objective', '-')}", f"loss {fmt_number(metrics.get('loss'))}",
                    f"reverse KL {fmt_number(metrics.get('opd/reverse_kl'))}",
                    f"accuracy {fmt_number(metrics.get('eval/accuracy'))}",
                    f"step time {fmt_number(metrics.get('time/step'))} s")
    services = Table.grid(padding=(0, 2))
    for role in ("teacher", "rollout"):
        peer = s.get(role) or {}
        if peer:
            healthy = peer.get("healthy")
            extra = f" v{peer['policy_version']}" if "policy_version" in peer else ""
            services.add_row(f"{role} {peer.get('address', '-')}{extra}",
                             Text("healthy" if healthy else "unhealthy", style="green" if healthy else "red"))
    parts: list[RenderableType] = [progress, numbers, services]
    phases = phase_times(metrics)
    total = sum(t for _, t in phases)
    if total > 0:
        split = Text("last step: ")
        for name, t in phases:
            split.append("█" * max(1, round(BAR_WIDTH * 2 * t / total)), style=PHASE_STYLES.get(name, "white"))
        split.append("  " + "  ".join(f"{name} {t:.2f}s" for name, t in phases), style="dim")
        parts.append(split)
    return Group(*parts)


def render(samples: list[tuple[Sample, Sample | None]]) -> RenderableType:
    """Every service's panel, in the order given."""
    panels: list[RenderableType] = []
    for now, before in samples:
        if now.status is None:
            panels.append(Panel(Text(now.error or "no status", style="red"),
                                title=short(now.url), title_align="left", border_style="red"))
            continue
        service = now.status.get("service")
        body = trainer_view(now) if service == "trainer" else model_server_view(now, before)
        panels.append(Panel(body, title=header(now.status, now.url), title_align="left",
                            border_style="green" if now.status.get("ready") else "yellow"))
    panels.append(Text(time.strftime("%H:%M:%S") + "  Ctrl-C to quit", style="dim"))
    return Group(*panels)


def run_top(urls: Sequence[str], *, refreshes: int | None, interval: float, console: Console,
            token: str | None = None, timeout: float = 2.0) -> None:
    """Show the services at `urls` (REST ports) every `interval` seconds, `refreshes` times (None:
    until Ctrl-C)."""
    if not urls:
        raise ValueError("topd top needs at least one service URL (a REST port, e.g. 127.0.0.1:8001)")
    poller = Poller([status_url(u) for u in urls], token=token, timeout=timeout)
    count = 0
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, screen=False, transient=False) as live:
                while refreshes is None or count < refreshes:
                    live.update(render(poller.poll()), refresh=True)
                    count += 1
                    if refreshes is None or count < refreshes:
                        time.sleep(interval)
        else:
            while refreshes is None or count < refreshes:
                if count:
                    time.sleep(interval)
                    console.rule()
                console.print(render(poller.poll()))
                count += 1
    except KeyboardInterrupt:
        pass
    finally:
        poller.close()


def read_token(token_file: str | None) -> str | None:
    """The auth token: --token-file, else $TOPD_AUTH_TOKEN, else the file $TOPD_AUTH_TOKEN_FILE."""
    path = token_file or (None if os.environ.get("TOPD_AUTH_TOKEN") else os.environ.get("TOPD_AUTH_TOKEN_FILE"))
    if path:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    return os.environ.get("TOPD_AUTH_TOKEN") or None


def _top(args: argparse.Namespace) -> int:
    run_top(args.urls, refreshes=args.refreshes, interval=args.interval, console=Console(),
            token=read_token(args.token_file), timeout=args.timeout)
    return 0


def add_top_command(sub: "argparse._SubParsersAction") -> None:
    """Register `topd top` on the `topd` command's subparsers."""
    p = sub.add_parser("top", help="A live view of services' /status: teacher clients, queue, trainer steps",
                       description="A live view of a teacher, its trainers and rollouts from their /status")
    p.add_argument("urls", nargs="+", help="REST ports of the services, e.g. 127.0.0.1:8001 127.0.0.1:8003")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("-n", "--refreshes", type=int, default=None, help="stop after N refreshes (default: until Ctrl-C)")
    p.add_argument("--token-file", default=None,
                   help="file holding the services' auth token (default: $TOPD_AUTH_TOKEN, $TOPD_AUTH_TOKEN_FILE)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each /status")
    p.set_defaults(func=_top)
