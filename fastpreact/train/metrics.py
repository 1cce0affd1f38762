"""metrics.jsonl and curves.png of a training run (written by rank 0 only).

metrics.jsonl holds one JSON object a line:
  {"kind": "train", "step", "epoch", "loss", "lr", "img_per_s", "time"}   every --log-every iterations
  {"kind": "eval",  "step", "epoch", "top1_err", "top5_err", "val_loss", "images", "time"}
errors are in percent; top5_err is the top-min(5, classes) error. "time" is seconds since the run began
(resumed runs continue the count). curves.png plots loss, error and throughput against the iteration.
"""
import json
from pathlib import Path

from .checkpoint import atomic_write_text


class RunLog:
    def __init__(self, out_dir, resume_step=None):
        """Open out_dir/metrics.jsonl; on resume, drop the records a killed run wrote after resume_step
        (that run's future is replayed, and its lines would appear twice)."""
        self.path = Path(out_dir) / "metrics.jsonl"
        self.curves_path = Path(out_dir) / "curves.png"
        self.records = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif resume_step is None:
            self.path.write_text("", encoding="utf-8")
        # Seconds the run had been going before this process started: "time" continues from there.
        self.elapsed_before = max((r.get("time", 0.0) for r in self.records), default=0.0)

    def write(self, record):
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self):
        """Redraw curves.png from the records: training loss, error, throughput against iterations."""
        import matplotlib
        matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
        import matplotlib.pyplot as plt

        train = [r for r in self.records if r.get("kind") == "train"]
        evals = [r for r in self.records if r.get("kind") == "eval"]
        fig, (ax_loss, ax_err, ax_speed) = plt.subplots(1, 3, figsize=(15, 4))
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
        ax_loss.set(xlabel="iteration", ylabel="training loss", title="loss")
        if train and min(r["loss"] for r in train) > 0:
            ax_loss.set_yscale("log")
        for key, label in (("top1_err", "top-1"), ("top5_err", "top-5")):
            ax_err.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=label)
        ax_err.set(xlabel="iteration", ylabel="validation error (%)", title="error")
        ax_err.legend()
        ax_speed.plot([r["step"] for r in train], [r["img_per_s"] for r in train], lw=1)
        ax_speed.set(xlabel="iteration", ylabel="images / s", title="throughput")
        for ax in (ax_loss, ax_err, ax_speed):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.curves_path.with_name("curves.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.curves_path)
