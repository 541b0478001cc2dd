#!/usr/bin/python3
"""The report of `adapterctl bench`: PNG charts and an index.html showing them with the
scenario, the target and the server's build information. Run by `adapterctl bench report
RESULTS.json --out DIR` (Debian's python3-matplotlib).

Charts: throughput (output tokens/s, requests/s) and p50/p99 latency against concurrency or
rate; TTFT and inter-token latency CDFs per level; per-adapter latency; output tokens/s over
time. index.html marks itself rendered (body data-rendered = images decoded) for headless
browser checks.
"""
import argparse
import html
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def cdf(ax, values, label):
    v = sorted(values)
    if not v:
        return
    ax.plot([x * 1000 for x in v], [(i + 1) / len(v) for i in range(len(v))], label=label)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        with open(args.results, encoding="utf-8") as f:
            r = json.load(f)
        levels = r["levels"]
        requests = r["requests"]
        scenario = r["scenario"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"bench report: {args.results} is not an adapterctl bench result: {e}")
    os.makedirs(args.out, exist_ok=True)
    closed = scenario.get("mode") == "closed"
    xlabel = "concurrency (requests in flight)" if closed else "offered rate (requests/s)"
    xs = [l["level"] for l in levels]
    charts = []

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name), dpi=90)
        plt.close(fig)
        charts.append((name, title))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [l["output_tokens_per_s"] for l in levels], "o-", label="output tokens/s")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [l["requests_per_s"] for l in levels], "s--", color="tab:orange", label="requests/s")
    ax2.set_ylabel("requests/s")
    ax.set_title("Throughput")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png", "Throughput against load")

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, name in (("ttft_s", "TTFT"), ("itl_s", "inter-token"), ("latency_s", "end-to-end")):
        line, = ax.plot(xs, [l[key]["p99"] * 1000 for l in levels], "o-", label=f"{name} p99")
        ax.plot(xs, [l[key]["p50"] * 1000 for l in levels], ":", color=line.get_color(), label=f"{name} p50")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("Latency")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, "latency.png", "Latency (p50 dotted, p99 solid) against load")

    for key, name, file in (("ttft_s", "time to first token", "ttft_cdf.png"),
                            ("itl_s", "inter-token latency", "itl_cdf.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, l in enumerate(levels):
            values = []
            for q in requests:
                if q["level"] != i or q["warmup"] or q["status"] != "OK":
                    continue
                if key == "ttft_s" and q["ttft_s"] is not None:
                    values.append(q["ttft_s"])
                elif key == "itl_s":
                    values.extend(q["itl_s"])
            cdf(ax, values, f"{'c' if closed else 'rate'}={l['level']:g}")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if key == "ttft_s" else "fraction of tokens")
        ax.set_xscale("log")
        ax.set_title(f"{name.capitalize()} CDF")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, file, f"{name.capitalize()} distribution per level")

    per = r["overall"].get("per_adapter", {})
    names = sorted(per)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    idx = list(range(len(names)))
    for k, (key, stat, label) in enumerate((("ttft_s", "p50", "TTFT p50"), ("ttft_s", "p99", "TTFT p99"),
                                            ("itl_s", "p99", "inter-token p99"))):
        ax.bar([i + (k - 1) * width for i in idx], [per[n][key][stat] * 1000 for n in names], width, label=label)
    ax.set_xticks(idx)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("Latency per adapter (all levels)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save(fig, "per_adapter.png", "Latency per adapter")

    # Output tokens over time: each token at its estimated arrival (first token, then gaps).
    arrivals = []
    for q in requests:
        if q["status"] != "OK" or q["ttft_s"] is None:
            continue
        t = q["start_s"] + q["ttft_s"]
        arrivals.append(t)
        for gap in q["itl_s"]:
            t += gap
            arrivals.append(t)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if arrivals:
        end = max(arrivals)
        bins = max(1, int(end) + 1)
        counts = [0] * bins
        for t in arrivals:
            counts[min(bins - 1, int(t))] += 1
        ax.step(range(bins), counts, where="post")
    ax.set_xlabel("seconds since the run began")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Output tokens per second over time")
    ax.grid(alpha=0.3)
    save(fig, "tokens_over_time.png", "Output tokens per second over time")

    rows = []
    for l in levels:
        statuses = ", ".join(f"{k} {v}" for k, v in l["by_status"].items())
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            f"{l['level']:g}", l["sent"], statuses, f"{l['requests_per_s']:.2f}", f"{l['output_tokens_per_s']:.1f}",
            f"{l['ttft_s']['p50'] * 1000:.1f}", f"{l['ttft_s']['p99'] * 1000:.1f}",
            f"{l['itl_s']['p50'] * 1000:.1f}", f"{l['itl_s']['p99'] * 1000:.1f}",
            f"{l['latency_s']['p99'] * 1000:.1f}")) + "</tr>")
    images = "\n".join(f'<figure><img src="{html.escape(n)}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}'
                       f"</figcaption></figure>" for n, t in charts)
    client = r.get("client", {})
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>adapterd capacity report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body data-rendered="0" data-expected="{len(charts)}">
<h1>adapterd capacity report</h1>
<p>Target: {html.escape(r['target']['transport'])} {html.escape(r['target'].get('address') or '')} ·
{r['sent']} requests sent, {r['answered']} answered in {r['wall_s']:.1f} s ·
client overhead {client.get('cpu_ms_per_request', 0):.2f} ms CPU per request
({100 * client.get('cores_used', 0):.1f}% of one core)</p>
<table><tr><th>{'concurrency' if closed else 'rate'}</th><th>sent</th><th>status</th><th>req/s</th>
<th>output tok/s</th><th>TTFT p50 ms</th><th>TTFT p99 ms</th><th>ITL p50 ms</th><th>ITL p99 ms</th>
<th>latency p99 ms</th></tr>
{''.join(rows)}</table>
{images}
<h2>Scenario</h2><pre>{html.escape(json.dumps(scenario, indent=2))}</pre>
<h2>Server</h2><pre>{html.escape(json.dumps(r.get('server_info', {}), indent=2))}</pre>
<script>
function mark() {{
  const imgs = Array.from(document.images);
  document.body.dataset.rendered = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}}
for (const i of document.images) i.addEventListener("load", mark);
window.addEventListener("load", mark);
</script>
</body></html>
"""
    with open(os.path.join(args.out, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)
    print(f"bench report: {len(charts)} charts and index.html in {args.out}")


if __name__ == "__main__":
    main()
