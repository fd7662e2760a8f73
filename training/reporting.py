"""Reporting: metrics.jsonl (plus wandb or tensorboard), the progress bar, the end-of-run report."""
from __future__ import annotations

import json
import os
import sys

from training.config import Config


class Reporter:
    """metrics.jsonl (rank 0), plus wandb or tensorboard when asked for."""

    def __init__(self, cfg: Config, main: bool, resume_step: int | None):
        self.main = main
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.backend = None
        if main and resume_step is not None and os.path.isfile(self.path):
            # drop what the interrupted run logged after its checkpoint
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        # a fresh run never finds another run's metrics.jsonl here: setup refuses such an output_dir
        if main and cfg.report_to == "wandb":
            import wandb

            wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), dir=cfg.output_dir,
                       resume="allow" if resume_step is not None else None)
            self.backend = ("wandb", wandb)
        elif main and cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = ("tensorboard", SummaryWriter(os.path.join(cfg.output_dir, "tensorboard")))

    def log(self, record: dict):
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.backend is not None:
            kind, obj = self.backend
            prefix = record.get("split", "train")
            flat = {f"{prefix}/{k}": v for k, v in record.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split")}
            if kind == "wandb":
                obj.log(flat, step=record["step"])
            else:
                for k, v in flat.items():
                    obj.add_scalar(k, v, record["step"])

    def close(self):
        if self.backend is not None:
            kind, obj = self.backend
            obj.finish() if kind == "wandb" else obj.close()


def progress_bar(total, initial, enabled):
    """A tqdm bar on an interactive terminal; None otherwise (then plain lines are printed)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=True, mininterval=0.5)


def show_step(bar, rec: dict, total_steps: int, print_line: bool, seconds: float):
    """A training step's record on the progress bar; with no bar, a printed line when ``print_line``."""
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}", bridge=f"{rec['bridge']:.4f}",
                        nmse=f"{rec['nmse']:.4f}", l0=f"{rec['l0']:.1f}", refresh=False)
    elif print_line:
        print(f"step {rec['step']}/{total_steps}  loss {rec['loss']:.4f}  kl {rec['kl']:.4f}  "
              f"bridge {rec['bridge']:.4f}  nmse {rec['nmse']:.4f}  sparsity {rec['sparsity']:.3f}  "
              f"l0 {rec['l0']:.1f}  lr {rec['lr']:.2e}  {seconds:.0f}s", flush=True)


def say(bar, msg):
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _fmt_pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def report(summary: dict, hesitation_word: str) -> str:
    """The end-of-run report, in words."""
    v = summary.get("final")
    lines = ["", "== transcoder adapters: result =="]
    if v:
        kl_h, kl_a = v["kl_hybrid"], v["kl"]
        drop = (1 - kl_a / kl_h) if kl_h > 0 else float("nan")
        change = f"{100 * drop:.1f}% lower" if drop >= 0 else f"{-100 * drop:.1f}% HIGHER"
        lines.append(f"KL(reference || model) on {v['n_positions']} held-out positions: hybrid start {kl_h:.4f} "
                     f"-> adapted {kl_a:.4f}  ({change})")
        lines.append(f"top-1 agreement with the reference: hybrid {100 * v['top1_hybrid']:.1f}% -> adapted "
                     f"{100 * v['top1']:.1f}%")
        lines.append("L0 per layer (active features per token): "
                     + ", ".join(f"{x:.2f}" for x in v["l0_layers"]) + f"  (mean {v['l0']:.2f})")
        if "dead_layers" in v:
            lines.append(f"dead features per layer (silent for {summary['dead_after_tokens']} training tokens): "
                         + ", ".join(str(x) for x in v["dead_layers"]))
        lines.append("NMSE per hidden state (embeddings, layers): "
                     + ", ".join(f"{x:.4f}" for x in v["nmse_layers"]))
    g = summary.get("generations")
    if g:
        lines.append(f"'{hesitation_word}' in greedy completions of {g['n']} held-out prompts: "
                     f"hybrid {_fmt_pct(g['hybrid']['hesitation_rate'])}, "
                     f"adapted {_fmt_pct(g['adapted']['hesitation_rate'])}, "
                     f"reference {_fmt_pct(g['reference']['hesitation_rate'])}")
        if g["adapted"]["match_rate"] is not None:
            lines.append(f"completions equal to the data's answer: hybrid {_fmt_pct(g['hybrid']['match_rate'])}, "
                         f"adapted {_fmt_pct(g['adapted']['match_rate'])}, "
                         f"reference {_fmt_pct(g['reference']['match_rate'])}")
        if g.get("prompts"):
            lines.append(f"example prompt: {g['prompts'][0]!r}")
            for name in ("hybrid", "adapted", "reference"):
                lines.append(f"  {name:9s} {g[name]['examples'][0]!r}")
    return "\n".join(lines)
