"""Tables, JSON and the chart from one run's data (see run.py for the data's shape).

Ratios: "/peer" compares with the best *peer* (a contestant that is neither aioqueue nor a
floor) on the same transport; "/floor" with the best floor row on the same transport. For
throughput a ratio above 1 is faster; for latency a ratio above 1 is slower.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

Row = dict[str, Any]
QUIET = ("skipped in quick mode", "floor: no task code", "needs two drained")


def med(cell: Any) -> float | None:
    if isinstance(cell, dict) and isinstance(cell.get("median"), int | float):
        v = float(cell["median"])
        return v if math.isfinite(v) else None
    return None


def why(cell: Any) -> str:
    if not isinstance(cell, dict):
        return "-"
    if "na" in cell:
        return "n/a"
    if "error" in cell:
        return "ERR"
    return "-"


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def is_peer(c: Row) -> bool:
    return not c["spec"]["floor"] and not c["spec"]["id"].startswith("aioqueue")


def best(rows: list[Row], key: str, transport: str, pick: Any, want: Any) -> float | None:
    vals = [
        med(r.get("results", {}).get(key))
        for r in rows
        if r["spec"]["transport"] == transport and pick(r)
    ]
    clean = [v for v in vals if v is not None]
    return want(clean) if clean else None


def ratio(v: float | None, ref: float | None) -> float | None:
    if v is None or ref is None or ref == 0:
        return None
    return v / ref


def version_of(c: Row) -> str:
    vers = c.get("describe", {}).get("versions", {})
    name = c["spec"]["label"].split()[0]
    if c["spec"]["floor"]:
        name = "aio-pika" if c["spec"]["transport"] == "amqp" else "redis"
    return str(vers.get(name, next(iter(vers.values()), "?")))[:12] if vers else "?"


def cell(c: Row, key: str) -> str:
    res = c.get("results", {}).get(key)
    v = med(res)
    if v is not None:
        return fmt_num(v)
    if c.get("status") != "ok":
        return "skip" if c.get("status") == "not available" else "ERR"
    return why(res)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(
        h.ljust(w) if i < 2 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    out = [line, "-" * len(line)]
    for r in rows:
        out.append(
            "  ".join(
                v.ljust(w) if i < 2 else v.rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(out)


def throughput_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for c in rows:
        t = c["spec"]["transport"]
        res = c.get("results", {})
        line = [c["spec"]["label"], t, version_of(c)]
        for key in ("enqueue", "enqueue_batch", "enqueue_c100", "drain"):
            v = med(res.get(key))
            line.append(cell(c, key))
            if key == "enqueue_c100":
                # against the floor's windowed (batch) publishes: the physical limit for many
                # sends in flight at once
                floor = best(rows, "enqueue_batch", t, lambda r: r["spec"]["floor"], max)
                line.append(fmt_ratio(ratio(v, floor)))
            elif key != "enqueue_batch":
                line.append(fmt_ratio(ratio(v, best(rows, key, t, is_peer, max))))
                line.append(
                    fmt_ratio(ratio(v, best(rows, key, t, lambda r: r["spec"]["floor"], max)))
                )
        line.append(cell(c, "peak_rss"))
        out.append(line)
    return out


def latency_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for c in rows:
        t = c["spec"]["transport"]
        res = c.get("results", {})
        line = [c["spec"]["label"], t]
        for key in ("roundtrip", "fanin"):
            v = med(res.get(key))
            p99 = res.get(key, {}).get("p99") if isinstance(res.get(key), dict) else None
            line.append(cell(c, key))
            line.append(fmt_num(med(p99)) if p99 else "-")
            line.append(fmt_ratio(ratio(v, best(rows, key, t, is_peer, min))))
            line.append(fmt_ratio(ratio(v, best(rows, key, t, lambda r: r["spec"]["floor"], min))))
        fan = res.get("fanin")
        line.append(str(fan.get("connections", "-")) if isinstance(fan, dict) else "-")
        out.append(line)
    return out


def other_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for c in rows:
        res = c.get("results", {})
        line = [
            c["spec"]["label"],
            c["spec"]["transport"],
            cell(c, "sync_cpu"),
            cell(c, "sync_block"),
        ]
        sc = res.get("scaling") or {}
        for k in ("1", "2", "4"):
            line.append(fmt_num(sc.get(k)) if isinstance(sc.get(k), int | float) else "-")
        leak = res.get("leak")
        if isinstance(leak, dict) and "growth" in leak:
            line.append(
                f"{leak['growth']:+.1f} ({leak['from_tasks'] // 1000}k-{leak['tasks'] // 1000}k)"
            )
        else:
            line.append("-")
        out.append(line)
    return out


def growth_sizes(rows: list[Row]) -> list[int]:
    sizes: set[int] = set()
    for c in rows:
        g = c.get("results", {}).get("growth")
        if isinstance(g, dict):
            sizes.update(int(n) for n in g.get("sizes", []))
    return sorted(sizes)


def growth_rows(rows: list[Row], sizes: list[int]) -> list[list[str]]:
    out = []
    for c in rows:
        g = c.get("results", {}).get("growth")
        if not isinstance(g, dict):
            continue
        line = [c["spec"]["label"], c["spec"]["transport"]]
        for n in sizes:
            cell_ = g.get(str(n)) or {}
            line.append(fmt_num(cell_.get("drain")))
            per = cell_.get("bytes_per_task")
            line.append(f"{per:,.0f}" if isinstance(per, int | float) else "-")
            line.append(fmt_num(cell_.get("peak_rss")))
        out.append(line)
    return out


def sub(c: Row, key: str, field: str) -> float | None:
    """A number inside a results cell (the payload and many-queues cells are flat dicts)."""
    res = c.get("results", {}).get(key)
    v = res.get(field) if isinstance(res, dict) else None
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def best_sub(rows: list[Row], key: str, field: str, transport: str, want: Any) -> float | None:
    vals = [sub(r, key, field) for r in rows if r["spec"]["transport"] == transport and is_peer(r)]
    clean = [v for v in vals if v is not None]
    return want(clean) if clean else None


def payload_queue_rows(rows: list[Row]) -> list[list[str]]:
    """Per contestant: its payload cells and their ratios to its own no-op cells, its
    many-queues drain and its ratio to its own one-queue drain; /peer as in the other tables."""
    out = []
    for c in rows:
        res = c.get("results", {})
        if not any(isinstance(res.get(k), dict) for k in ("payload", "queues")):
            continue
        t = c["spec"]["transport"]
        line = [c["spec"]["label"], t]
        cols = (
            ("payload", "enqueue", None),
            ("payload", "drain", max),
            ("payload", "rt_p50", min),
            ("queues", "drain", max),
        )
        for key, field, want in cols:
            cell_ = res.get(key)
            v = sub(c, key, field)
            if v is None:
                mark = why(cell_) if isinstance(cell_, dict) and len(cell_) == 1 else "-"
                line += [mark, "-"] + (["-"] if want else [])
                continue
            line.append(fmt_num(v))
            line.append(fmt_ratio(sub(c, key, f"{field}_x")))
            if want:
                line.append(fmt_ratio(ratio(v, best_sub(rows, key, field, t, want))))
        out.append(line)
    return out


def payload_queue_headers(rows: list[Row]) -> tuple[list[str], str]:
    size, q = 100_000, 20
    for c in rows:
        size = int(sub(c, "payload", "bytes") or size)
        q = int(sub(c, "queues", "queues") or q)
    kb = f"{size // 1000}KB"
    headers = [
        "contestant",
        "transport",
        f"{kb} enq/s",
        "x plain",
        f"{kb} drain/s",
        "x plain",
        "/peer",
        f"{kb} rt p50 ms",
        "x plain",
        "/peer",
        f"{q}q drain/s",
        "x 1q",
        "/peer",
    ]
    title = (
        f"Cost growth with payload size and queue count: {kb} = every task has one {size:,}-byte "
        "str argument (tiny result): one-by-one enqueue, drain by one fresh worker, sequential "
        f"round trip p50; {q}q = no-op tasks spread evenly over {q} queues, one worker "
        "listening on all of them. x plain / x 1q = the same contestant's no-op enqueue, "
        "drain and round trip, one queue, same run (throughput below 1.00x: slower; latency "
        "above 1.00x: slower); /peer as above"
    )
    return headers, title


def notes(rows: list[Row]) -> list[str]:
    out = []
    for c in rows:
        name = f"{c['spec']['label']} ({c['spec']['transport']})"
        if c.get("status") != "ok":
            out.append(f"{name}: {c.get('status')}: {c.get('error')}")
            continue
        for key, res in c.get("results", {}).items():
            if isinstance(res, dict) and "na" in res and not res["na"].startswith(QUIET):
                out.append(f"{name} {key}: n/a - {res['na']}")
            elif isinstance(res, dict) and "error" in res:
                out.append(f"{name} {key}: ERROR - {res['error']}")
            for note in res.get("notes", []) if isinstance(res, dict) else []:
                out.append(f"{name} {key}: {note}")
        if c.get("error"):
            out.append(f"{name}: ERROR - {c['error']}")
    return out


def render(data: dict[str, Any]) -> str:
    rows = list(data["contestants"].values())
    m = data["meta"]
    head = (
        f"aioqueue benchmarks - {m['mode']} mode, {m['date']}, {m['machine']['cpus']} cores, "
        f"Python {m['machine']['python']}, Redis {m['servers'].get('redis')}, "
        f"RabbitMQ {m['servers'].get('rabbitmq')}; n={m['plan']['n']}, "
        f"reps<={m['plan']['reps']}; median of reps"
    )
    t1 = render_table(
        [
            "contestant",
            "transport",
            "version",
            "enqueue/s",
            "/peer",
            "/floor",
            "batch/s",
            "c100/s",
            "/wfloor",
            "drain/s",
            "/peer",
            "/floor",
            "peakRSS MB",
        ],
        throughput_rows(rows),
    )
    t2 = render_table(
        [
            "contestant",
            "transport",
            "rt p50 ms",
            "p99",
            "/peer",
            "/floor",
            "fan-in p50 ms",
            "p99",
            "/peer",
            "/floor",
            "conns",
        ],
        latency_rows(rows),
    )
    t3 = render_table(
        [
            "contestant",
            "transport",
            "cpu s",
            "block s",
            "1 proc/s",
            "2 procs/s",
            "4 procs/s",
            "leak MB",
        ],
        other_rows(rows),
    )
    parts = [
        head,
        "",
        "Throughput (tasks/s, higher is better; c100 = 100 coroutines sending at once, each "
        "awaiting its own send; /wfloor = c100 over the floor's windowed batch publishes)",
        t1,
        "",
        "Latency (ms, lower is better; conns = client's broker/backend TCP connections)",
        t2,
        "",
        "Sync work (seconds to drain n tasks, lower is better), scaling (tasks/s, 10-90% "
        "window) and leak (worker RSS growth from its first chunk of tasks to its last)",
        t3,
    ]
    sizes = growth_sizes(rows)
    grows = growth_rows(rows, sizes)
    if grows:
        headers = ["contestant", "transport"]
        for n in sizes:
            k = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"
            headers += [f"{k} drain/s", f"{k} B/task", f"{k} RSS MB"]
        parts += [
            "",
            "Cost growth: n tasks waiting (prefilled, no worker), then one worker drains them "
            "(B/task = broker bytes per waiting task: Redis MEMORY USAGE of the bench db, plus "
            "RabbitMQ message_bytes (bodies) of the run's queues; RSS = worker peak during "
            "the drain)",
            render_table(headers, grows),
        ]
    pq = payload_queue_rows(rows)
    if pq:
        headers, title = payload_queue_headers(rows)
        parts += ["", title, render_table(headers, pq)]
    nts = notes(rows)
    if nts:
        parts += ["", "Notes:", *(f"  - {n}" for n in nts)]
    return "\n".join(parts)


def write_outputs(data: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    text = render(data)
    print()
    print(text)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    blob = json.dumps(data, indent=1, sort_keys=False, default=str)
    mode = data["meta"]["mode"]
    (results / f"{stamp}-{mode}.json").write_text(blob)
    (results / "latest.json").write_text(blob)
    (results / f"latest-{mode}.json").write_text(blob)
    (results / f"latest-{mode}.txt").write_text(text + "\n")
    try:
        growth_chart(data, results / f"growth-{mode}.png")
    except Exception as exc:
        print(f"\ngrowth chart failed: {exc}")
    try:
        chart(data, results / "chart.png")
        chart(data, results / f"chart-{mode}.png")
        print(f"\nwrote {results}/latest.json, {stamp}-{mode}.json, chart.png")
    except Exception as exc:  # the chart is a convenience; never fail the run on it
        print(f"\nchart failed: {exc}")


def chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in data["contestants"].values() if c.get("status") == "ok"]
    labels = [f"{c['spec']['label']}\n({c['spec']['transport']})" for c in rows]
    colors = [
        "#888888"
        if c["spec"]["floor"]
        else "#d62728"
        if c["spec"]["id"].startswith("aioqueue")
        else "#1f77b4"
        for c in rows
    ]
    panels = [
        ("drain", "drain, tasks/s (higher is better)"),
        ("enqueue", "enqueue one-by-one, tasks/s (higher is better)"),
        ("roundtrip", "round trip p50, ms (lower is better)"),
        ("fanin", "fan-in p50, ms (lower is better)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        vals = [med(c.get("results", {}).get(key)) or 0.0 for c in rows]
        log = key in ("roundtrip", "fanin")
        ax.barh(
            range(len(rows)),
            [v - 0.1 if log and v else v for v in vals],
            color=colors,
            left=0.1 if log else 0,
        )
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        if key in ("roundtrip", "fanin") and any(v > 0 for v in vals):
            ax.set_xscale("log")  # bars start at 0.1 ms so lengths compare on the log axis
            ax.set_xlim(left=0.1, right=max(vals) * 3)
        for i, v in enumerate(vals):
            if v:
                ax.text(v, i, f" {fmt_num(v)}", va="center", fontsize=7)
    m = data["meta"]
    fig.suptitle(
        f"aioqueue benchmarks ({m['mode']}, {m['date']}); grey = floor, red = aioqueue", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def growth_chart(data: dict[str, Any], path: Path) -> None:
    """Drain rate and bytes per waiting task against the backlog size (log x), one line each."""
    rows = [
        c
        for c in data["contestants"].values()
        if isinstance(c.get("results", {}).get("growth"), dict)
    ]
    sizes = growth_sizes(rows)
    if not rows or not sizes:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    for c in rows:
        g = c["results"]["growth"]
        label = f"{c['spec']['label']} ({c['spec']['transport']})"
        style = "-" if c["spec"]["id"].startswith("aioqueue") else "--"
        xs = [n for n in sizes if isinstance((g.get(str(n)) or {}).get("drain"), int | float)]
        left.plot(xs, [g[str(n)]["drain"] for n in xs], style, marker="o", label=label)
        xs = [n for n in sizes if (g.get(str(n)) or {}).get("bytes_per_task")]
        right.plot(xs, [g[str(n)]["bytes_per_task"] for n in xs], style, marker="o", label=label)
    for ax, title in (
        (left, "drain rate with n waiting, tasks/s (flat is the goal)"),
        (right, "broker bytes per waiting task"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("tasks waiting")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
