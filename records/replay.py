#!/usr/bin/env python3
"""Turn a record back into its run: its source files and the command that repeats it.

    python records/replay.py RECORD --out DIR            write DIR/train_gpt2.py, ..., DIR/command.sh
    python records/replay.py RECORD --run [-- FLAGS]     also run it here, then compare it with the record

The command holds the record's flags (its Hyperparameters: block) except the per-run ones, and
OMP_NUM_THREADS from its cpu_threads: note; this Python runs it, and its record and checkpoints go
under DIR. Flags after -- replace the record's, for example --device=cpu or --input_bin=... Only our
own records run here: a public record needs its own hardware.
"""

import ast
import glob
import os
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  also puts the repository root on sys.path

from data.flags import FlagParser, run_tool  # noqa: E402

# Flags that name where this run's outputs go or where it came from, not what it computes.
PER_RUN_FLAGS = ("records_dir", "checkpoint_dir", "resume", "run_name")


def fail(message):
    raise SystemExit(f"replay.py: {message}")


def read_record(path):
    """The record, refused in one line when its source is not whole."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file; give a record (a .txt that train_gpt2.py wrote)")
    try:
        run = compare.read_log(path)
    except compare.NotARunLog as e:
        if "binary" in str(e):
            fail(f"{e}; give a record that train_gpt2.py wrote")
        fail(f"{path}: no line of 100 '=': a record cut or incomplete inside its source, or no record at all")
    if not run.source_closed or not run.files:
        fail(f"{path}: its source is cut or incomplete (no line of 100 '=' after it); it cannot be replayed")
    for name, lines in run.files.items():
        if os.path.isabs(name) or ".." in name.split("/"):
            fail(f"{path}: embedded file name {name!r} leads outside --out; it cannot be replayed")
        if name.endswith(".py"):
            try:
                tree = ast.parse("\n".join(lines) + "\n", name)
            except SyntaxError as e:
                fail(f"{path}: its {name} is cut or incomplete (no valid Python at line {e.lineno})")
            for module in missing_modules(tree, run.files):
                fail(
                    f"{path}: its {name} imports {module}, which the record does not embed: it cannot be "
                    "replayed; replay a record that embeds it"
                )
    return run


def missing_modules(tree, files):
    """The project modules (files of this checkout) that `tree` imports at its top and `files` lacks."""
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for module in names:
            file = module.replace(".", "/") + ".py"
            if os.path.isfile(os.path.join(ROOT, file)) and file not in files:
                yield module


def flag_items(flags):
    """[(name, value)] of --name=value and --name value flags; anything else is refused."""
    items, rest = [], list(flags)
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--") or len(flag) < 3:
            fail(f"{flag}: after -- give trainer flags such as --device=cpu")
        if "=" in flag:
            items.append(tuple(flag[2:].split("=", 1)))
        elif rest and not rest[0].startswith("--"):
            items.append((flag[2:], rest.pop(0)))
        else:
            items.append((flag[2:], "true"))
    return items


# torchrun on this machine as run.sh starts it: loopback for the workers' store
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1"]


def launcher(processes):
    """This Python, or its torchrun."""
    return [sys.executable] if processes == 1 else [*TORCHRUN, f"--nproc_per_node={processes}"]


def command(run, out, overrides=()):
    """(environment additions, argv) that repeat the run with the copy in `out`, from any folder."""
    out = os.path.abspath(out)
    script = os.path.join(out, compare.MAIN_FILE)
    if not run.hparams:  # a public record: the script as it was, on the GPUs it names
        return {}, [*launcher(run.env.get("gpus") or run.env.get("world_size") or 8), script]
    flags = {k: v for k, v in run.hparams.items() if k not in PER_RUN_FLAGS}
    flags.update(records_dir=os.path.join(out, "records"), checkpoint_dir=os.path.join(out, "checkpoints"))
    flags.update(flag_items(overrides))
    threads = run.note("cpu_threads")
    env = {"OMP_NUM_THREADS": threads.split()[0]} if threads and threads.split()[0].isdigit() else {}
    return env, [*launcher(run.env.get("world_size") or 1), script, *(f"--{k}={v}" for k, v in flags.items())]


def shell_line(env, argv, exec_word=()):
    """The command as a shell line; the variables go before `exec`, where the shell reads them as such."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *exec_word, *map(shlex.quote, argv)])


def write_out(run, out, env, argv):
    """Every embedded file under its own name, and command.sh; returns the command line."""
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        for name, lines in run.files.items():
            path = os.path.join(out, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("\n".join(lines).rstrip("\n") + "\n")
        with open(os.path.join(out, "command.sh"), "w") as f:
            f.write(f"#!/bin/sh\n# repeats {run.path}; relative data paths start in the folder it runs in\n")
            f.write(f'{shell_line(env, argv, ["exec"])} "$@"\n')
    except OSError as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)  # a refusal leaves no partial folder
        fail(f"--out {out}: {e.strerror or e}; pick another folder")
    return shell_line(env, argv)


def launch(env, argv, out):
    """Run the command here; returns the path of the record it wrote."""
    try:
        status = subprocess.run(argv, env={**os.environ, **env}).returncode
    except KeyboardInterrupt:
        print("replay.py: stopped (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
    if status:
        fail(f"the replay exited with status {status}; its output is above")
    records = glob.glob(os.path.join(glob.escape(os.path.join(out, "records")), "*", "*.txt"))
    if not records:
        fail(f"the replay wrote no record under {out}/records")
    return max(records, key=os.path.getmtime)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ap = FlagParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("record", metavar="RECORD", help="a record file (ours or the public speedrun's)")
    ap.add_argument("--out", metavar="DIR", help="folder for the source files and command.sh")
    ap.add_argument("--run", action="store_true", help="run it here, then compare the new record with RECORD")
    args = ap.parse_args(argv[:split])
    overrides = argv[split + 1 :]
    if overrides and not args.run:
        fail("flags after -- change the replayed run: give --run too")
    run = read_record(args.record)
    if args.run and not run.hparams:
        fail(
            f"{args.record} is a public speedrun record: its script runs only on its own hardware "
            f"({run.machine or 'its GPUs'}); write it out with --out and run it there"
        )
    if not args.out:
        fail("give --out DIR: the folder the source files and command.sh go to")
    env, cmd = command(run, args.out, overrides)
    print(write_out(run, args.out, env, cmd))
    if args.run:
        new = launch(env, cmd, args.out)
        print(f"\nreplay.py: {args.record} (A) against its replay {new} (B)\n", flush=True)
        compare.main([args.record, new])


if __name__ == "__main__":
    run_tool(main, "replay.py")
