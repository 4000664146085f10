"""What a study run is: its name, its command, its folder's log, and the order runs are made in.

A run is one stage script run (pretrain.py, part_learn.py, finetune.py) or one measurement study.py
makes itself (study_measures.py), in <out>/<name>/. study.py makes runs; study_tables.py reads them.
"""
import contextlib
import hashlib
import json
import os


# ----------------------------------------------------------------------------- runs

class Ref:
    """A file of another run, used as a flag value (--regions, --finetune, --encoder_weights)."""

    def __init__(self, run, file):
        self.run, self.file = run, file


class Run:
    """One stage run (stage = its script) or one measurement study.py makes itself (stage None), in
    <out>/<name>/. The name is a readable label plus a hash of everything that defines the run."""

    def __init__(self, kind, stage, flags, label, epochs=None):
        self.kind, self.stage, self.flags, self.epochs = kind, stage, list(flags), epochs
        self.deps = [f.run for f in self.flags if isinstance(f, Ref)]
        text = " ".join([kind, stage or "study"] + [self._text(f) for f in self.flags])
        self.name = f"{kind}-{label}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"

    @staticmethod
    def _text(f):
        return f"{f.run.name}/{f.file}" if isinstance(f, Ref) else str(f)

    def argv(self, out):
        """The flags with the other runs' files as paths under out."""
        return [os.path.join(out, f.run.name, f.file) if isinstance(f, Ref) else str(f)
                for f in self.flags]

    def script_argv(self, out):
        """The script and its arguments; study.py's own measurements run as study_measures.py."""
        if self.stage is None:
            return ["study_measures.py", self.kind, out, self.name] + self.argv(out)
        return [self.stage] + self.argv(out) + ["--output_dir", os.path.join(out, self.name)]

    def command(self, out):
        """The command that makes this run by hand."""
        return " ".join(["python"] + self.script_argv(out))


def read_log(folder):
    """The JSON records of folder/log.txt ([] when there is none); a line cut off by a kill is
    skipped."""
    records = []
    path = os.path.join(folder, "log.txt")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    records.append(json.loads(line))
    return records


def last_epoch(records):
    """The record of the highest epoch (a resumed run may repeat one; the later line wins)."""
    epochs = [r for r in records if "epoch" in r]
    return max(reversed(epochs), key=lambda r: r["epoch"]) if epochs else None


def is_complete(run, out):
    """Done = its log shows the end: the last epoch, the part learner's IoU record, the
    measurement's record."""
    folder = os.path.join(out, run.name)
    records = read_log(folder)
    if run.kind == "parts":
        return (os.path.isfile(os.path.join(folder, "regions.pt"))
                and any("iou_top" in r for r in records))
    if run.stage is None:
        return any(r.get("done") for r in records)
    last = last_epoch(records)
    return last is not None and last["epoch"] == run.epochs - 1


# ---------------------------------------------------------------------- the order runs are made in

def table_runs(table, seeds):
    """Every run the table reads, with their dependencies, each once, dependencies first."""
    order, seen = [], set()

    def add(run):
        if run.name in seen:
            return
        for dep in run.deps:
            add(dep)
        seen.add(run.name)
        order.append(run)
    for row in table.rows:
        for cell in row.cells.values():
            for seed in seeds:
                for run in cell(seed).runs:
                    add(run)
    return order


def table_runs_of(run):
    """The run and the runs it needs, dependencies first (the command chain of one table cell)."""
    order = []

    def add(r):
        for d in r.deps:
            add(d)
        if r not in order:
            order.append(r)
    add(run)
    return order
