"""Reports a person can read (C8): a terminal summary and a self-contained HTML page with inline SVG."""
from __future__ import annotations

import html
import shlex
from typing import Iterable

from .inject import InjectionResult
from .runner import Failure, TaskResult

TIERS = ("prefix", "targeted", "subsets", "torn", "recovery")


def replay_command(plan: str) -> str:
    return f"crashsim replay {shlex.quote(plan)}"


def precheck_line(results: list, before: str) -> str:
    """How many crash states the spec's check judged read-only before `before`, by exit code, and how many were corrupt."""
    exits: dict[str, int] = {}
    for r in results:
        for code, n in r.prechecks.items():
            exits[code] = exits.get(code, 0) + n
    return (f"{sum(exits.values())} crash states checked read-only before {before} ("
            + ", ".join(f"exit {code}: {n}" for code, n in sorted(exits.items()))
            + f"); {sum(r.precheck_corrupt for r in results)} reported corruption")


def summary_lines(results: list[TaskResult], seconds: float) -> list[str]:
    """One line per (workload, model): states per tier (e = exhaustive, s = sampled), failures."""
    width = max([16] + [len(r.workload if not r.variant else f"{r.variant}:{r.workload}") for r in results])
    lines = [f"{'workload':<{width}} {'model':<24} {'ops':>4} " + " ".join(f"{t:>11}" for t in TIERS)
             + f" {'images':>7} {'fail':>5} {'states/s':>9}"]
    for r in results:
        cells = []
        for t in TIERS:
            n = r.counts.get(t, 0)
            mark = "" if t not in r.exhaustive else (" e" if r.exhaustive[t] else " s")
            cells.append(f"{str(n) + mark:>11}")
        rate = r.states / r.seconds if r.seconds else 0.0
        name = r.workload if not r.variant else f"{r.variant}:{r.workload}"
        lines.append(f"{name:<{width}} {r.model:<24} {r.ops:>4} " + " ".join(cells)
                     + f" {r.distinct_images:>7} {r.failing_states:>5} {rate:>9.0f}")
    total = sum(r.states for r in results)
    failing = sum(r.failing_states for r in results)
    cpu = sum(r.seconds for r in results)
    seeds = sorted({r.seed for r in results})
    lines.append(f"{total} crash states checked in {seconds:.1f} s wall ({total / seconds if seconds else 0:.0f} states/s; "
                 f"{total / cpu if cpu else 0:.0f} states/s per core); {failing} failing; seed {','.join(map(str, seeds))}; "
                 "e = exhaustive, s = seeded sample")
    lines.append(precheck_line(results, "recovery"))
    orphans = sum(r.orphan_states for r in results)
    if orphans:
        lines.append(f"note: {orphans} states left an orphan file (e.g. `.creating` after a crash inside Image.create); "
                     "the single-image format has no directory scan yet, so they are reported, not failed")
    for r in results:
        for f in r.failures[:1]:
            lines.append(f"FAIL {r.workload} [{r.model}] ({f.tier}): {f.message}")
            lines.append(f"  plan: {f.plan}")
            lines.append(f"  replay: {replay_command(f.plan)}")
    return lines


_COLOURS = {"pwrite": "#4a90d9", "punch": "#9b59b6", "truncate": "#e67e22", "fsync": "#222", "create": "#27ae60",
            "rename": "#27ae60", "unlink": "#27ae60", "fsync_dir": "#555"}


def timeline_svg(failure: Failure) -> str:
    """The write/flush timeline of a failing trace: guest events above, storage ops below, the crash as a red line."""
    from .explore import Plan

    plan = Plan.parse(failure.plan)
    outcomes = dict(plan.outcomes)
    n = max(1, len(failure.ops))
    step = max(8, min(28, 900 // n))
    width = max(40 + n * step + 20, 560)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="185" font-family="monospace" font-size="10">']
    for kind, start, end in failure.guest:
        x = 40 + start * step
        w = max(step * (end - start), 3)
        parts.append(f'<rect x="{x}" y="10" width="{w}" height="22" fill="{"#f1c40f" if kind in ("flush", "close") else "#ddd"}" stroke="#999"/>'
                     f'<text x="{x + 2}" y="25">{html.escape(kind)}</text>')
    for i, (kind, offset, length) in enumerate(failure.ops):
        x = 40 + i * step
        colour = _COLOURS.get(kind, "#888")
        outcome = outcomes.get(i)
        if kind in ("fsync", "fsync_dir"):
            parts.append(f'<rect x="{x + step / 2 - 1}" y="45" width="3" height="70" fill="{colour}"><title>{i}: {kind}</title></rect>')
            continue
        fill = "#e74c3c" if outcome == "d" else "#27ae60" if outcome else colour
        opacity = "0.35" if i >= plan.crash else "1"
        parts.append(f'<rect x="{x + 1}" y="60" width="{step - 2}" height="40" fill="{fill}" opacity="{opacity}">'
                     f'<title>{i}: {kind} offset {offset} length {length} {outcome or ""}</title></rect>')
        if outcome:
            parts.append(f'<text x="{x + 2}" y="112">{html.escape(outcome[:1])}</text>')
    cx = 40 + plan.crash * step
    parts.append(f'<line x1="{cx}" y1="5" x2="{cx}" y2="125" stroke="red" stroke-width="2"/><text x="{cx + 3}" y="135" fill="red">crash</text>')
    parts.append('<text x="2" y="25">guest</text><text x="2" y="85">ops</text>'
                 '<text x="40" y="160">blue pwrite, purple punch, orange truncate, black bar fsync</text>'
                 '<text x="40" y="175">red = dropped, green = torn (d/t below); faded = after the crash, never issued</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(results: list[TaskResult], injections: Iterable[InjectionResult] = (), seconds: float = 0.0) -> str:
    """A self-contained HTML page: counts per workload and model, failing states with their timeline, injection counts."""
    esc = html.escape
    rows = []
    for r in results:
        cells = "".join(f"<td>{r.counts.get(t, 0)}{'' if t not in r.exhaustive else (' (exhaustive)' if r.exhaustive[t] else ' (sampled)')}</td>" for t in TIERS)
        status = "fail" if r.failing_states else "ok"
        rows.append(f'<tr class="{status}"><td>{esc(r.workload)}</td><td>{esc(r.model)}</td><td>{esc(r.variant or "")}</td><td>{r.ops}</td>{cells}'
                    f"<td>{r.distinct_images}</td><td>{r.failing_states}</td><td>{r.states / r.seconds if r.seconds else 0:.0f}</td></tr>")
    failures = []
    for r in results:
        for f in r.failures:
            failures.append(f"<h3>{esc(r.workload)} under {esc(r.model)} ({esc(f.tier)})</h3><p>{esc(f.message)}</p>"
                            f"<p><code>{esc(replay_command(f.plan))}</code></p>{timeline_svg(f)}")
    inj_rows = []
    for inj in injections:
        for region_kind, kinds in inj.counts.items():
            for fault, (n, detected, repaired) in kinds.items():
                inj_rows.append(f"<tr><td>{esc(inj.workload)}</td><td>{esc(region_kind)}</td><td>{esc(fault)}</td><td>{n}</td><td>{detected}</td>"
                                f"<td>{repaired if region_kind != 'data' else 'n/a (one copy of data in v1)'}</td></tr>")
    total = sum(r.states for r in results)
    head = "".join(f"<th>{t}</th>" for t in TIERS)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>crashsim report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
td:first-child,td:nth-child(2){{text-align:left}} tr.fail{{background:#fdd}} code{{background:#eee;padding:2px}}</style></head>
<body><h1>crashsim report</h1>
<p>{total} crash states checked in {seconds:.1f} s; {sum(r.failing_states for r in results)} failing; seeds {', '.join(sorted({str(r.seed) for r in results}))}.</p>
<h2>States per workload and persistence model</h2>
<table><tr><th>workload</th><th>model</th><th>variant</th><th>ops</th>{head}<th>distinct images</th><th>failing</th><th>states/s</th></tr>
{''.join(rows)}</table>
<h2>Failing states</h2>{''.join(failures) or '<p>none</p>'}
<h2>Corruption injection</h2>
{'<table><tr><th>workload</th><th>region</th><th>fault</th><th>injected</th><th>detected</th><th>repaired</th></tr>' + ''.join(inj_rows) + '</table>' if inj_rows else '<p>not run</p>'}
</body></html>
"""


def crash_repair_lines(results, seconds: float) -> list[str]:
    """Crashes during repair: states per region kind, fault kind, model and tier (failing in brackets), then the failures."""
    from .repaircrash import REPAIR_TIERS, totals

    table = totals(results)
    tiers = REPAIR_TIERS + (("uninterrupted",) if any("uninterrupted" in t for k in table.values() for f in k.values()
                                                     for t in f.values()) else ())
    models = list(dict.fromkeys(r.model for r in results))
    lines = ["crashes during repair (" + ", ".join(sorted({f"repair_{r.repairer}" for r in results}))
             + "; each state followed up by: repair again / writable open then repair)",
             f"{'region':<6} {'fault':<12} {'model':<14} " + " ".join(f"{t:>13}" for t in tiers)]
    for region in ("root", "map"):
        for kind, by_model in table.get(region, {}).items():
            for model in models:
                cells = by_model.get(model, {})
                lines.append(f"{region:<6} {kind:<12} {model:<14} "
                             + " ".join(f"{(f'{cells[t][0]} [{cells[t][1]}]' if t in cells else '-'):>13}" for t in tiers))
    exhaustive: dict[tuple[str, str], bool] = {}
    for r in results:
        for t, e in r.exhaustive.items():
            exhaustive[(r.model, t)] = exhaustive.get((r.model, t), True) and e
    for model in models:
        per_tier = {t: sum(c.get(model, {}).get(t, [0, 0])[0] for k in table.values() for c in k.values()) for t in tiers}
        marks = " ".join(f"{t} {n}{'' if (model, t) not in exhaustive else (' e' if exhaustive[(model, t)] else ' s')}"
                         for t, n in per_tier.items() if n)
        lines.append(f"model {model}: {marks}")
    states = sum(r.states for r in results)
    failing = sum(r.failing_states for r in results)
    faults = sum(r.faults for r in results)
    follow = sum(r.follow_ups for r in results)
    same = sum(r.identical for r in results)
    lines.append(f"{states} crash states during the repair of {faults} (fault, model) pairs checked in {seconds:.1f} s; "
                 f"{failing} failing; {same}/{follow} follow-ups byte-identical to the uninterrupted repair "
                 "(the others hold the same contents and the same root up to its generation); e = exhaustive, s = seeded sample")
    lines.append(precheck_line(results, "the follow-up"))
    for r in results:
        for f in r.failures[:1]:
            lines.append(f"FAIL {r.workload} [{r.model}] ({f.tier}) {f.fault}: {f.message}")
            lines.append(f"  plan: {f.plan}")
            lines.append(f"  replay: {replay_command(f.plan)}")
    return lines
