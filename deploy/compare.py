"""`fedcompose compare`: several runs' held-out curves in one picture, and their final figures.

Reads each run directory's `metrics.jsonl`, `config.toml` and `status.json`
(never TensorFlow), draws held-out accuracy and loss against round, one line
per run, and prints a table: the algorithm, rounds, final and best held-out
accuracy, final held-out loss, and the privacy spent by DP runs. Runs that
differ in something other than the algorithm (data, seeds, clients per
round, workers) or whose final figures are from different rounds are
compared all the same, but the differences are printed.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from shared import config as config_lib
from shared import files
from shared.errors import RunDirError, UsageError

DESCRIPTION = (
    "Compare runs: draw the held-out accuracy and loss of several run directories in one "
    "PNG (--output) and print a table of their final figures."
)

_SAME = ("data", "model", "federation.workers", "training.clients_per_round", "training.seed")


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.label = path.name or str(path)
        """The run's name in the table and the legend (`run` makes it unique)."""
        if not path.is_dir():
            why = "not a directory" if path.exists() else "no such directory"
            raise RunDirError(f"{path} is not a run directory ({why})")
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise RunDirError(f"{path} holds no metrics.jsonl; is it a fedcompose run directory?")
        self.rows = []
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            # Rows that are not what a run writes (an edited or damaged file) are left out.
            if isinstance(row, dict) and type(row.get("round")) is int:
                self.rows.append(row)
        self.evals = [(r["round"], r["eval"]) for r in self.rows if _is_eval(r.get("eval"))]
        if not self.evals:
            raise RunDirError(
                f"{path} has no held-out evaluation yet (metrics.jsonl has no eval rows)"
            )
        try:
            config = tomllib.loads((path / "config.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            config = {}
        self.config = {k: v for k, v in config.items() if isinstance(v, dict)}
        try:
            status = json.loads((path / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        self.status = status if isinstance(status, dict) else {}

    def setting(self, dotted: str):
        section, _, key = dotted.partition(".")
        table = self.config.get(section, {})
        if not key:
            return table
        return table.get(key) if isinstance(table, dict) else None

    @property
    def algorithm(self) -> str:
        """A short name for the run's four blocks (the defaults left out)."""
        if not self.config:
            return "? (no readable config.toml)"
        a, t = self.setting("algorithm"), self.setting("training")
        a, t = (x if isinstance(x, dict) else {} for x in (a, t))
        if not a:  # a run from before the blocks were choices: the tutorial's
            return "clipped sgd | mean | server sgd"
        client = f"{a.get('client_work')} {a.get('client_optimizer')}"
        if a.get("proximal_mu"):
            client += f" prox {_g(a['proximal_mu'])}"
        aggregator = str(a.get("aggregator", "mean"))
        if aggregator.startswith("dp_"):
            aggregator += f" z={_g(a.get('noise_multiplier'))}"
        elif a.get("weighting") == "uniform":
            aggregator += " uniform"
        server = f"server {a.get('server_optimizer')} {_g(t.get('server_learning_rate', 1.0))}"
        return f"{client} | {aggregator} | {server}"

    def epsilon(self) -> str:
        privacy = next(
            (r["privacy"] for r in reversed(self.rows) if isinstance(r.get("privacy"), dict)),
            None,
        )
        if privacy is None:
            return "-"
        eps = privacy.get("epsilon")
        return f"{'inf' if eps is None else _g(eps, '.3g')} (d={_g(privacy.get('delta'))})"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_eval(value: object) -> bool:
    return (
        isinstance(value, dict)
        and _is_number(value.get("accuracy"))
        and _is_number(value.get("loss"))
    )


def _g(value: object, spec: str = "g") -> str:
    """A number as `spec` formats it; anything else (a hand-edited file) as it is."""
    return format(value, spec) if _is_number(value) else str(value)


def _differences(runs: list[Run]) -> list[str]:
    notes = []
    for dotted in _SAME:
        values = {json.dumps(r.setting(dotted), sort_keys=True) for r in runs}
        if len(values) > 1:
            notes.append(f"runs differ in {dotted}")
    last = {r.label: r.evals[-1][0] for r in runs}
    if len(set(last.values())) > 1:
        rounds = ", ".join(f"{label} {n}" for label, n in last.items())
        notes.append(f"the final figures are from different rounds ({rounds})")
    return notes


def table(runs: list[Run]) -> str:
    header = (
        "run",
        "algorithm",
        "rounds",
        "held-out acc",
        "best acc",
        "held-out loss",
        "epsilon",
        "status",
    )
    lines = []
    for r in runs:
        last_round, last = r.evals[-1]
        best = max(e["accuracy"] for _, e in r.evals)
        lines.append(
            (
                r.label,
                r.algorithm,
                str(last_round),
                f"{last['accuracy']:.4f}",
                f"{best:.4f}",
                f"{last['loss']:.4f}",
                r.epsilon(),
                str(r.status.get("state", "?")),
            )
        )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*row) for row in lines]
    return "\n".join(out)


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    legend_inches = 0.2 + 0.2 * len(runs)
    height = 4.2 + legend_inches
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, height))
    for r in runs:
        xs = [round_num for round_num, _ in r.evals]
        label = f"{r.label}: {r.algorithm}"
        ax_acc.plot(xs, [e["accuracy"] for _, e in r.evals], "o-", markersize=3, label=label)
        ax_loss.plot(xs, [e["loss"] for _, e in r.evals], "o-", markersize=3)
    ax_acc.set(xlabel="round", ylabel="held-out accuracy", title="held-out accuracy", ylim=(0, 1))
    ax_loss.set(xlabel="round", ylabel="held-out loss", title="held-out loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds, not 2.2
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    fig.legend(loc="lower center", fontsize=8, frameon=False)
    try:
        with files.atomic_target(path, ".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def run(config: config_lib.RunConfig) -> int:
    c = config.compare
    seen: dict[Path, str] = {}
    for given in c.run_dirs:
        same = seen.setdefault(Path(given).resolve(), given)
        if same is not given:
            twice = given if given == same else f"{same} (as {given})"
            raise UsageError(f"a run directory is listed twice: {twice}")
    output = Path(c.output)
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output {output}: give a .png file")
    if output.is_dir():
        raise UsageError(f"--output {output} is a directory; give a .png file")
    runs = [Run(Path(p)) for p in c.run_dirs]
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:  # runs/a/fedavg and runs/b/fedavg: say which
            r.label = str(r.path)
    plot(runs, output)
    print(table(runs))
    for note in _differences(runs):
        print(f"note: {note}", file=sys.stderr)
    print(f"picture: {output}", file=sys.stderr)
    return 0
