"""`crashsim`: explore crash states, inject corruption, replay a plan.

Exit codes: 0 everything passed; 1 a failing crash state, an undetected or
unrepaired fault, or a replayed plan that still fails; 2 bad usage
(argparse); 4 a simulator error; 5 a plan given to `replay` that does not
parse or fit its trace (`run` never makes one: its shrinker keeps only plans
that replay); 6 an unknown workload, model or control; 7 a trace file given
to `explore` that is missing, truncated, altered or of another version
(`BadTraceFile`); 8 a record whose replay does not rebuild the program's
real final files (`RecordMismatch`: the recorder missed a change); 9 an `--executor` that
is malformed, needs `distributed` (not installed) or names a Dask scheduler
that does not answer (`ExecutorUnavailable`).  Errors
print on one line, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import attrs

from lamina.spec.errors import LaminaError

from .controls import CONTROLS, get_control
from .errors import CrashsimError
from .executors import LOCAL, open_executor
from .explore import DEFAULT_MODELS, Budget, Model, Plan, pending_at
from .inject import inject_workload
from .repaircrash import REPAIR_BUDGET, REPAIR_CONTROLS, REPAIR_MODELS, REPAIRERS, RepairPlan, get_repair_control, list_faults, \
    replay_repair, result_json, run_crash_repair
from .report import crash_repair_lines, html_report, replay_command, summary_lines
from .runner import replay, run_all, run_task
from .workloads import LIBRARY, get_workload


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crashsim", description="Crash-state explorer for Lamina images.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="explore the crash states of workloads under persistence models")
    run.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"library workloads (default: all single-image ones): {', '.join(LIBRARY)}; "
                     "`layers` for every tree workload (layer-*)")
    run.add_argument("--random", type=int, default=0, metavar="N", help="also run N seeded random workloads")
    run.add_argument("--model", default=",".join(DEFAULT_MODELS),
                     help="comma-separated models; combine flags with + (e.g. strict,reorder+torn,namespace)")
    run.add_argument("--max-subset", type=int, default=Budget().max_subset, metavar="K",
                     help="exhaustive subsets when at most K un-synced ops (else a seeded sample)")
    run.add_argument("--samples", type=int, default=Budget().subset_samples, help="sampled subsets per crash point beyond K")
    run.add_argument("--recovery-images", type=int, default=Budget().recovery_images,
                     help="crashed images whose recovery is itself crashed, per workload and model")
    run.add_argument("--jobs", type=int, default=1, help="parallel worker processes (with --executor local)")
    _executor_option(run)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--control", help=f"run a broken variant (negative control): {', '.join(CONTROLS)}")
    run.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report")
    run.add_argument("--output", choices=["human", "json"], default="human")
    inject = sub.add_parser("inject", help="inject corruption into metadata and data; judge detection and repair")
    inject.add_argument("workloads", nargs="*", metavar="WORKLOAD")
    inject.add_argument("--seed", type=int, default=0)
    inject.add_argument("--report", metavar="FILE.html")
    inject.add_argument("--output", choices=["human", "json"], default="human")
    inject.add_argument("--crash-repair", action="store_true",
                        help="also crash the repair of every metadata fault at every point and follow each state up "
                        "(repair again; writable open then repair): clean, committed bytes intact, same as an uninterrupted repair")
    inject.add_argument("--model", default=",".join(REPAIR_MODELS), help="with --crash-repair: comma-separated persistence models")
    inject.add_argument("--repairer", choices=list(REPAIRERS), default="image",
                        help="with --crash-repair: repair_image on the file, or repair_tree on the top (what `lamina check --repair` runs)")
    inject.add_argument("--max-subset", type=int, default=REPAIR_BUDGET.max_subset, metavar="K")
    inject.add_argument("--samples", type=int, default=REPAIR_BUDGET.subset_samples, help="sampled subsets per crash point beyond K")
    inject.add_argument("--torn-samples", type=int, default=REPAIR_BUDGET.torn_samples, help="sampled tear patterns per write beyond the cap")
    inject.add_argument("--control", help=f"with --crash-repair: a broken repair (negative control): {', '.join(REPAIR_CONTROLS)}")
    inject.add_argument("--jobs", type=int, default=1, help="with --crash-repair: parallel worker processes (with --executor local)")
    _executor_option(inject, "with --crash-repair: ")
    inject.add_argument("--list-faults", action="store_true", help="list the numbered metadata faults (f= of a repair plan) and exit")
    rep = sub.add_parser("replay", help="re-run exactly the crash state a plan names")
    rep.add_argument("plan")
    rep.add_argument("--output", choices=["human", "json"], default="human")
    sub.add_parser("controls", help="run every negative control and say whether each is caught")
    _trace_parser(sub)
    _record_parsers(sub)
    _compare_parser(sub)
    return p


def _executor_option(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--executor", default=LOCAL, metavar="ADDRESS",
                   help=f"{prefix}where the states are explored: `local` (a process pool of --jobs) or the Dask scheduler "
                   "dask://HOST:PORT (or tcp://HOST:PORT); the results are those of --jobs 1")


def _compare_parser(sub) -> None:
    from .sidebyside import CONTROLS as COMPARE_CONTROLS, DEFAULT_COMPARE_MODELS, FORMATS, WORKLOADS

    cmp = sub.add_parser("compare", help="the same workloads on qcow2 (qemu-img, qemu-io) and Lamina (lamina), crash states "
                         "judged the same way, side by side",
                         description="Records each workload once per format with strace, explores it under every model "
                         "and classifies each crash state: ok, unopenable, corruption (check exit 2), leaks (exit 3), "
                         "stale copy, lost flushed data, non-atomic.  Exits 0 when no Lamina state fails.")
    cmp.add_argument("--workload", action="append", metavar="W", help=f"repeatable; default all: {', '.join(WORKLOADS)}")
    cmp.add_argument("--format", default=",".join(FORMATS), help="comma-separated: qcow2, lamina")
    cmp.add_argument("--model", default=",".join(DEFAULT_COMPARE_MODELS), help="comma-separated models; combine flags with +")
    cmp.add_argument("--max-subset", type=int, default=Budget().max_subset, metavar="K",
                     help="exhaustive subsets when at most K un-synced ops (else a seeded sample)")
    cmp.add_argument("--samples", type=int, default=Budget().subset_samples, help="sampled subsets per crash point beyond K")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--control", help=f"negative control: {', '.join(COMPARE_CONTROLS)} (failing-check: both checkers; "
                     "the others: a broken lamina recorded, as `crashsim trace --control`)")
    cmp.add_argument("--markdown", action="store_true", help="print the table as markdown")
    cmp.add_argument("--keep-traces", metavar="DIR", help="keep each record as DIR/WORKLOAD-FORMAT.trace (for `crashsim explore`)")
    cmp.add_argument("--output", choices=["human", "json"], default="human")


def _budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=",".join(DEFAULT_MODELS), help="comma-separated models; combine flags with +")
    p.add_argument("--max-subset", type=int, default=Budget().max_subset, metavar="K")
    p.add_argument("--samples", type=int, default=Budget().subset_samples, help="sampled subsets per crash point beyond K")
    p.add_argument("--torn-samples", type=int, default=Budget().torn_samples, help="sampled tear patterns per write beyond the cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", choices=["human", "json"], default="human")


def _record_parsers(sub) -> None:
    rec = sub.add_parser("record", help="record a program's file system calls (or NBD requests) into a self-checked trace file",
                         description="Runs COMMAND in DIR under strace (or against DIR/DEVICE served over NBD) and writes "
                         "TRACE: DIR's initial files and every operation with its data.  Fails (exit 8) unless replaying "
                         "TRACE rebuilds DIR's final files.")
    rec.add_argument("--via", choices=["strace", "nbd"], default="strace",
                     help="how to record: strace (file level), or nbd (block level: nbdkit serves DIR/DEVICE on a Unix "
                     "socket; {nbd} in COMMAND and $CRASHSIM_NBD are its URI)")
    rec.add_argument("--dir", required=True, metavar="DIR", help="the working directory (made if missing)")
    rec.add_argument("--init", metavar="DIR0", help="copy DIR0's files into DIR (new or empty) first")
    rec.add_argument("--out", required=True, metavar="TRACE", help="the trace file to write")
    rec.add_argument("--device", metavar="NAME", help="with --via nbd: the raw device file in DIR (default disk.raw)")
    rec.add_argument("--size", metavar="SIZE", help="with --via nbd: make the device a new sparse file of SIZE (e.g. 16M)")
    rec.add_argument("program", nargs="+", metavar="COMMAND", help="after --: the program and its arguments")
    exp = sub.add_parser("explore", help="run a checker on every crash state of a recorded trace file")
    exp.add_argument("trace", metavar="TRACE")
    exp.add_argument("--check", required=True, metavar="'CMD {dir}'",
                     help="a shell command run on every crash state's directory ({dir}; {done} is 1 after the "
                     "program's last call, else 0; {crash} the calls issued); exit 0 passes")
    exp.add_argument("--plan", metavar="PLAN", help="check only the crash state a printed plan names")
    exp.add_argument("--jobs", type=int, default=1, help="parallel worker processes for the checks (with --executor local)")
    _executor_option(exp)
    _budget_options(exp)


def _trace_parser(sub) -> None:
    from .cliworkloads import CLI_WORKLOADS, RECORD_CONTROLS

    trace = sub.add_parser("trace", help="record a real program's system calls with strace and check its crash states",
                           description="Without PROGRAM: the real `lamina` command on its workloads, judged in-process. "
                           "With `-- PROGRAM ARGS`: any program, run in a fresh directory, judged by --checker.")
    trace.add_argument("--workload", action="append", metavar="NAME",
                       help=f"a lamina workload (repeatable; default all): {', '.join(CLI_WORKLOADS)}")
    trace.add_argument("--checker", metavar="'CMD {dir}'",
                       help="with PROGRAM: a shell command run on every crash state's directory ({dir}; {done} is 1 "
                       "after the program's last call, else 0; {crash} the calls issued); exit 0 passes")
    trace.add_argument("--init", metavar="DIR", help="with PROGRAM: the files the working directory starts with (copied)")
    trace.add_argument("--control", help=f"record a broken lamina (negative control): {', '.join(RECORD_CONTROLS)}")
    trace.add_argument("--count-before-recovery", action="store_true",
                       help="count the exit codes of the read-only check before recovery instead of requiring 0 or 3")
    _budget_options(trace)
    trace.add_argument("program", nargs="*", metavar="PROGRAM", help="after --: the program and its arguments")


def _cmd_run(args: argparse.Namespace) -> int:
    from .trees import TREE_LIBRARY

    names = list(args.workloads) or list(LIBRARY)
    names = [n for name in names for n in (TREE_LIBRARY if name == "layers" else [name])]  # "layers": every tree workload
    for name in names:
        get_workload(name)
    names += [f"random-{args.seed + i}-8" for i in range(args.random)]
    models = [Model.parse(m).name for m in args.model.split(",") if m]
    if args.control:
        get_control(args.control)
    budget = Budget(max_subset=args.max_subset, subset_samples=args.samples, recovery_images=args.recovery_images)
    tasks = [(w, m) for w in names for m in models]
    started = time.perf_counter()
    human = args.output == "human"
    bar = None
    if human:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="task", desc="exploring", file=sys.stderr, disable=not sys.stderr.isatty())

    def done(result) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{result.workload}/{result.model}: {result.states} states")
            bar.update(1)

    if args.executor == LOCAL:  # --jobs N: forked lanes (`lanes.py`), no pool
        results = run_all(tasks, budget, args.seed, args.control, args.jobs, on_done=done)
    else:
        with open_executor(args.executor, args.jobs) as executor:
            results = run_all(tasks, budget, args.seed, args.control, args.jobs, executor=executor, on_done=done)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            fh.write(html_report(results, seconds=seconds))
    if human:
        print("\n".join(summary_lines(results, seconds)))
    else:
        print(json.dumps({"seconds": seconds, "seed": args.seed,
                          "budget": attrs.asdict(budget),
                          "results": [{**attrs.asdict(r, filter=lambda a, v: a.name != "failures"),
                                       "states": r.states, "prechecked": r.prechecked,
                                       "precheck_corrupt": r.precheck_corrupt,
                                       "failures": [{"plan": f.plan, "message": f.message, "tier": f.tier,
                                                     "replay": replay_command(f.plan)} for f in r.failures]}
                                      for r in results]}, indent=1))
    return 1 if any(r.failing_states for r in results) else 0


def _cmd_inject(args: argparse.Namespace) -> int:
    names = list(args.workloads) or [n for n in LIBRARY if not LIBRARY[n].create_in_trace]
    for name in names:
        if get_workload(name).create_in_trace or hasattr(get_workload(name), "tops"):
            raise CrashsimError(f"workload {name!r}: inject works on the final image of a single-image workload without create")
    if args.list_faults:
        for name in names:
            print("\n".join(f"{name} {line}" for line in list_faults(name, args.seed)))
        return 0
    results = [inject_workload(n, args.seed) for n in names]
    crashed = []
    seconds = 0.0
    if args.crash_repair:
        models = [Model.parse(m).name for m in args.model.split(",") if m]
        if args.control:
            get_repair_control(args.control)
        budget = attrs.evolve(REPAIR_BUDGET, max_subset=args.max_subset, subset_samples=args.samples, torn_samples=args.torn_samples)
        started = time.perf_counter()
        with open_executor(args.executor, args.jobs) as executor:
            crashed = run_crash_repair(names, models, budget, args.seed, args.repairer, args.control, args.jobs,
                                       executor=executor)
        seconds = time.perf_counter() - started
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            fh.write(html_report([], results))
    failed = any(r.failures for r in results) or any(r.failing_states for r in crashed)
    if args.output == "json":
        injected = [{"workload": r.workload, "counts": r.counts, "failures": list(r.failures)} for r in results]
        if args.crash_repair:  # an object instead of the list: the list stays what it was without the option
            print(json.dumps({"inject": injected, "crash_repair": {"seconds": seconds, "seed": args.seed, "repairer": args.repairer,
                                                                  "control": args.control, "budget": attrs.asdict(budget),
                                                                  "results": [result_json(r) for r in crashed]}}, indent=1))
        else:
            print(json.dumps(injected, indent=1))
    else:
        print(f"{'workload':<16} {'region':<6} {'fault':<12} {'injected':>8} {'detected':>8} {'repaired':>8}")
        for r in results:
            for region, kinds in r.counts.items():
                for fault, (n, detected, repaired) in kinds.items():
                    print(f"{r.workload:<16} {region:<6} {fault:<12} {n:>8} {detected:>8} {repaired if region != 'data' else 'n/a':>8}")
        for region in ("root", "map", "data"):
            n = sum(r.total(region, 0) for r in results)
            d = sum(r.total(region, 1) for r in results)
            rep = sum(r.total(region, 2) for r in results)
            print(f"{region}: {d}/{n} detected" + (f", {rep}/{n} repaired with every committed byte intact" if region != "data" else
                                                    " (data is one copy in format v1: detection only)"))
        for r in results:
            for f in r.failures:
                print("FAIL " + f)
        if crashed:
            print("\n".join(crash_repair_lines(crashed, seconds)))
    return 1 if failed else 0


def _cmd_replay_repair(args: argparse.Namespace) -> int:
    plan = RepairPlan.parse(args.plan)
    fr, message = replay_repair(plan)
    if args.output == "json":
        print(json.dumps({"plan": plan.to_string(), "fault": fr.fault.name, "ops": len(fr.ops), "failure": message}))
    else:
        print(f"workload {plan.workload}, fault {plan.fault} ({fr.fault.name}), {'repair_' + plan.repairer}"
              + (f" broken as {plan.variant}" if plan.variant else "") + f" ({len(fr.ops)} ops), model {plan.model}, "
              f"crash after op {plan.crash}, then {'the repair again' if plan.after == 'repair' else 'a writable open and the repair'}")
        for i, op in enumerate(fr.ops[: plan.crash]):
            outcome = dict(plan.outcomes).get(i, "k")
            state = "durable" if i not in set(pending_at(fr.barriers, plan.crash)) else \
                {'k': 'kept', 'd': 'dropped'}.get(outcome, 'torn ' + outcome[2:])
            print(f"  op {i}: {op.kind} offset {op.offset} length {len(op.data) or op.length} -> {state}")
        print(f"FAIL: {message}" if message else "ok: the repair after this crash ends clean, with every committed byte, "
              "as the uninterrupted repair does")
    return 1 if message else 0


def _cmd_replay(args: argparse.Namespace) -> int:
    if RepairPlan.is_repair_plan(args.plan):
        return _cmd_replay_repair(args)
    plan = Plan.parse(args.plan)
    rec, message = replay(plan)
    if args.output == "json":
        print(json.dumps({"plan": plan.to_string(), "ops": len(rec.ops), "failure": message}))
    else:
        print(f"workload {plan.workload} ({len(rec.ops)} ops), model {plan.model}, crash after op {plan.crash}"
              + (f", variant {plan.variant}" if plan.variant else ""))
        for i in plan.pending:
            op = rec.ops[i]
            outcome = dict(plan.outcomes).get(i, "k")
            print(f"  un-synced op {i}: {op.kind} offset {op.offset} length {len(op.data) or op.length} -> "
                  f"{ {'k': 'kept', 'd': 'dropped'}.get(outcome, 'torn ' + outcome[2:]) }")
        print(f"FAIL: {message}" if message else "ok: the state recovers, checks clean and reads a legal outcome")
    return 1 if message else 0


def _cmd_controls() -> int:
    bad = 0
    for c in CONTROLS.values():
        result = run_task(c.workload, c.model, Budget(), 0, c.name, stop_at_first=True)
        caught = "fails" if result.failing_states else "passes"
        ok = caught == c.expected
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {c.name:<30} expected {c.expected:<6} got {caught:<6} ({c.model}, {c.workload}, {result.states} states)")
        if result.failures:
            print(f"    {result.failures[0].message}\n    {replay_command(result.failures[0].plan)}")
    return 1 if bad else 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from .cliworkloads import CLI_WORKLOADS, run_cli_workloads
    from .syscalls import trace_program

    models, budget = _models_budget(args)
    tallies: dict = {}
    if args.program:
        if not args.checker or args.workload or args.control:
            raise CrashsimError("a PROGRAM needs --checker 'CMD {dir}' and takes neither --workload nor --control")
        _, results, seconds = trace_program(args.program, args.checker, models, budget, args.seed, args.init)
    else:
        if args.checker or args.init:
            raise CrashsimError("--checker and --init go with a PROGRAM (after --)")
        results, tallies, seconds = run_cli_workloads(args.workload or list(CLI_WORKLOADS), models, budget, args.seed,
                                                      args.control, judge_before_recovery=not args.count_before_recovery)
    return _print_trace_results(args, budget, results, tallies, seconds)


def _models_budget(args: argparse.Namespace) -> tuple[list[str], Budget]:
    models = [Model.parse(m).name for m in args.model.split(",") if m]
    return models, Budget(max_subset=args.max_subset, subset_samples=args.samples, torn_samples=args.torn_samples)


def _print_trace_results(args: argparse.Namespace, budget: Budget, results: list, tallies: dict, seconds: float) -> int:
    """The summary `trace` and `explore` print: one line per workload and model, failing plans, totals."""
    workloads = list(dict.fromkeys(r.workload for r in results))  # one result per workload and model
    ops = sum(r.ops for r in results if r.model == results[0].model) if results else 0
    totals = {"workloads": len(workloads), "ops": ops, "states": sum(r.states for r in results),
              "checked": sum(r.checked for r in results), "failing": sum(r.failing_states for r in results),
              "seconds": round(seconds, 2)}
    if args.output == "json":
        print(json.dumps({**totals, "seed": args.seed, "budget": attrs.asdict(budget),
                          "before_recovery": {w: dict(t) for w, t in tallies.items()},
                          "results": [{**attrs.asdict(r, filter=lambda a, v: a.name != "failures"),
                                       "failures": [attrs.asdict(f) for f in r.failures]} for r in results]}, indent=1))
    else:
        for r in results:
            label = r.workload + (f" (v={r.variant})" if r.variant else "")
            print(f"{label:<30} {r.model:<24} {r.ops:>5} ops {r.states:>6} states {r.checked:>5} checked "
                  f"{r.failing_states:>5} failing")
            for f in r.failures[:3]:
                print(f"    FAIL {f.plan}\n         {f.message}" + "".join(f"\n         {line}" for line in f.lost))
        for w, t in tallies.items():
            print(f"{w}: read-only check before recovery: " + ", ".join(f"{k}: {n}" for k, n in sorted(t.items())))
        print(f"{totals['workloads']} workloads, {ops} ops recorded, {totals['states']} states explored "
              f"({totals['checked']} distinct directories checked), {totals['failing']} failing, {seconds:.1f} s")
    return 1 if totals["failing"] else 0


def _cmd_record(args: argparse.Namespace) -> int:
    import os

    from .syscalls import compare_with_directory, record_in
    from .tracefile import TraceFile, read_trace, replayed, write_trace

    started = time.perf_counter()
    if args.via == "nbd":
        from .nbdrecord import DEFAULT_DEVICE, parse_size, record_nbd

        size = None if args.size is None else parse_size(args.size)
        base, ops = record_nbd(args.program, args.dir, args.init, args.device or DEFAULT_DEVICE, size)
        where = f"on {os.path.join(args.dir, args.device or DEFAULT_DEVICE)} over NBD"
    else:
        if args.device or args.size:
            raise CrashsimError("--device and --size go with --via nbd")
        base, recorder = record_in(args.program, args.dir, args.init)
        ops, where = recorder.ops, f"in {args.dir}"
    write_trace(args.out, TraceFile(tuple(args.program), base, tuple(ops)))
    compare_with_directory(replayed(read_trace(args.out)), args.dir)  # the file as written rebuilds the real files
    print(f"recorded {len(ops)} ops of `{' '.join(args.program)}` {where} into {args.out} "
          f"({os.path.getsize(args.out)} bytes); replaying it rebuilds the directory's final files, "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def _cmd_explore(args: argparse.Namespace) -> int:
    from .syscalls import check_plan, command_checker, explore_trace
    from .tracefile import read_trace

    models, budget = _models_budget(args)
    started = time.perf_counter()
    trace = read_trace(args.trace)
    check, context = command_checker(args.check, len(trace.ops))
    if args.plan:
        plan = Plan.parse(args.plan)
        message = check_plan(trace.base, trace.ops, plan, check)
        if args.output == "json":
            print(json.dumps({"plan": plan.to_string(), "ops": len(trace.ops), "failure": message}))
        else:
            print(f"FAIL: {message}" if message else f"ok: the checker passes on the state of {plan.to_string()}")
        return 1 if message else 0
    from lamina.impl.progress import Progress

    with open_executor(args.executor, args.jobs) as executor, Progress(True, "exploring", unit=" states") as bar:
        results = explore_trace("program", trace.base, trace.ops, models, budget, args.seed, check, context,
                                executor=executor, progress=bar.update)
    return _print_trace_results(args, budget, results, {}, time.perf_counter() - started)


def _cmd_compare(args: argparse.Namespace) -> int:
    import os

    from .sidebyside import FAILURES, WORKLOADS, compare, table_lines

    models = [Model.parse(m).name for m in args.model.split(",") if m]
    formats = [f for f in args.format.split(",") if f]
    budget = Budget(max_subset=args.max_subset, subset_samples=args.samples)
    started = time.perf_counter()
    human = args.output == "human"

    def progress(row) -> None:
        if human and sys.stderr.isatty():
            print(f"{row.workload}/{row.fmt}/{row.model}: {row.states} states, {row.seconds:.1f} s", file=sys.stderr)

    if args.keep_traces:
        os.makedirs(args.keep_traces, exist_ok=True)
    rows = compare(args.workload or list(WORKLOADS), formats, models, budget, args.seed, args.control, progress,
                   args.keep_traces)
    seconds = time.perf_counter() - started
    failing = sum(r.failing for r in rows if r.fmt == "lamina")
    if human:
        print("\n".join(table_lines(rows, markdown=args.markdown)))
        for r in rows:
            for kind, (plan, message) in r.examples.items():
                print(f"  {r.workload}/{r.fmt}/{r.model} {kind}: {plan}\n      {message}")
        print(f"{len(rows)} rows, {sum(r.states for r in rows)} states ({sum(r.checked for r in rows)} distinct "
              f"directories judged), Lamina states failing ({', '.join(FAILURES)}): {failing}, {seconds:.1f} s")
    else:
        print(json.dumps({"seconds": round(seconds, 2), "seed": args.seed, "budget": attrs.asdict(budget), "models": models,
                          "control": args.control, "lamina_failing": failing, "rows": [r.to_json() for r in rows]}, indent=1))
    return 1 if failing else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"run": _cmd_run, "inject": _cmd_inject, "replay": _cmd_replay, "trace": _cmd_trace,
                    "record": _cmd_record, "explore": _cmd_explore, "compare": _cmd_compare}
        return commands[args.command](args) if args.command in commands else _cmd_controls()
    except CrashsimError as exc:
        print(f"crashsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except LaminaError as exc:
        print(f"crashsim: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
