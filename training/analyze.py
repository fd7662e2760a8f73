"""Model diffing with a trained adapter run, in one command:

    python -m training.analyze RUN_DIR                     # e.g. runs/tiny after python -m training.train
    python -m training.analyze RUN_DIR --n_prompts 256 --layers 10,20 --subsets cutoffs --out DIR

writes ``DIR`` (default ``RUN_DIR/analysis``): ``report.md`` with its PNG figures and
``analysis.json`` with every number. The parts (``training/diffing``):

* output faithfulness: KL to the reference and top-1 error of the base, hybrid, adapted and
  reference models on the run's held-out data;
* internal faithfulness: NMSE of every hidden state, and the KL with every contiguous subset of the
  reference's layers replaced by the adapted model's (``--subsets cutoffs``: only the two cut-off
  curves, for deep models);
* task evaluation: accuracy, response length and hesitation of greedy completions of held-out
  prompts by the four models, and the share of the reference's accuracy gain recovered;
* features: density, dead features, top-activating examples and where features fire (prompt,
  reasoning, answer) at the chosen layers;
* hesitation: attribution of the hesitation word to adapter features (integrated gradients, or
  gradient x activation), the smallest feature set whose ablation removes it and which, added to
  the hybrid, brings it (within --max_share of the features; else the necessary set), the causal tests
  (ablating the set; adding it to the hybrid, also steered), and the decision point (log p of the
  word in the hybrid with the ranking's top features patched in).

Everything streams over the held-out data batch by batch with the sparse ops and the chunked KL:
no ``[tokens, vocab]`` or ``[tokens, features]`` tensor is ever made.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from training.data import DataError
from training.loop import SetupError

PARTS = ("output", "internal", "tasks", "features", "hesitation")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="output_dir of a finished python -m training.train run (with final_model/)")
    p.add_argument("--out", default=None, help="where the report goes (default RUN_DIR/analysis)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="the models' dtype (default: the run's)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--batch_size", type=int, default=16, help="held-out sequences per forward")
    p.add_argument("--max_val_examples", type=int, default=None, help="held-out sequences (default: the run's)")
    p.add_argument("--subsets", default="all", choices=("all", "cutoffs"),
                   help="layer subsets replaced: all contiguous ones, or only the cut-offs")
    p.add_argument("--n_prompts", type=int, default=128, help="held-out prompts completed by each model")
    p.add_argument("--max_new_tokens", type=int, default=None, help="tokens per completion (default: the run's)")
    p.add_argument("--generation_batch_size", type=int, default=32)
    p.add_argument("--layers", default=None, help="comma-separated adapter layers for the feature statistics "
                                                   "(default: all)")
    p.add_argument("--answer_marker", default="Answer:", help="where a response's answer begins")
    p.add_argument("--reasoning_end", default=None, help="the answer begins after this instead (e.g. </think>)")
    p.add_argument("--hesitation_word", default=None, help="default: the run's hesitation_word")
    p.add_argument("--max_share", type=float, default=0.05, help="largest feature set, as a share of all")
    p.add_argument("--target_removal", type=float, default=0.9, help="share of hesitations the set must remove")
    p.add_argument("--attribution", default="path", choices=("path", "gradient"),
                   help="hesitation attribution: integrated gradients from no features (path) or "
                        "gradient x activation")
    p.add_argument("--attribution_steps", type=int, default=8, help="the path's quadrature points")
    p.add_argument("--examples_kept", type=int, default=64,
                   help="features per layer whose top examples analysis.json keeps (the most frequent)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--parts: {bad or 'nothing'} not among {', '.join(PARTS)}")
    args.parts = parts
    for name in ("batch_size", "n_prompts", "generation_batch_size", "attribution_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if not 0 < args.max_share <= 1 or not 0 < args.target_removal <= 1:
        p.error("--max_share and --target_removal must be in (0, 1]")
    if args.layers is not None:
        try:
            args.layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            p.error(f"--layers: expected comma-separated layer indices, got {args.layers!r}")
    return args


def analyze(args: argparse.Namespace) -> dict:
    """Run the chosen parts on ``args.run_dir``; returns every number (what analysis.json holds)."""
    from training.diffing import faithfulness, features, hesitation, tasks
    from training.diffing.run import load_run

    t0 = time.time()
    run = load_run(args.run_dir, args.device, args.max_val_examples, args.dtype)
    cfg = run.cfg
    word = args.hesitation_word or cfg.hesitation_word
    max_new = args.max_new_tokens or cfg.max_new_tokens
    results = {"run_dir": args.run_dir, "base_model": cfg.base_model, "reference_model": cfg.reference_model,
               "n_layers": run.adapted.config.num_hidden_layers, "n_features": cfg.n_features,
               "hesitation_word": word, "n_heldout_sequences": len(run.val_ex), "device": str(run.device),
               "torch": torch.__version__}

    def step(name, fn):
        t = time.time()
        print(f"{name} ...", flush=True)
        results[name] = fn()
        results.setdefault("part_seconds", {})[name] = round(time.time() - t, 1)

    with torch.no_grad():
        if "output" in args.parts:
            step("output", lambda: faithfulness.output_faithfulness(run, args.batch_size))
        if "internal" in args.parts:
            step("internal", lambda: faithfulness.internal_faithfulness(run, args.batch_size, args.subsets))
        if "features" in args.parts:
            step("features", lambda: features.feature_statistics(run, args.layers, args.batch_size,
                                                                 answer_marker=args.answer_marker,
                                                                 reasoning_end=args.reasoning_end))
        records = [r for r in run.val_records if isinstance(r, dict)][:args.n_prompts]
        completions = None
        if "tasks" in args.parts or "hesitation" in args.parts:
            def task_part():
                nonlocal completions
                numbers, completions = tasks.task_evaluation(run, records, max_new, word, args.generation_batch_size)
                return numbers
            step("tasks", task_part)
    if "hesitation" in args.parts:
        step("hesitation", lambda: hesitation.hesitation_experiment(
            run, records, completions, word, max_new, args.max_share, args.target_removal,
            args.generation_batch_size, seed=args.seed, method=args.attribution, steps=args.attribution_steps))
    if "features" in results:
        _keep_examples(results, args.examples_kept)
    results["seconds"] = round(time.time() - t0, 1)
    return results


def _keep_examples(results: dict, n: int) -> None:
    """Keep the top-activating examples of the ``n`` most frequent features per layer and of the
    hesitation set only: for every feature of a large model they would be hundreds of MB of JSON."""
    chosen = results.get("hesitation", {}).get("set", {}).get("features", {})
    for layer, st in results["features"]["per_layer"].items():
        counts = st["fire_counts"]
        keep = set(sorted(range(len(counts)), key=lambda f: -counts[f])[:n])
        keep |= set(chosen.get(int(layer), chosen.get(layer, [])))
        st["top_examples"] = {f: v for f, v in st["top_examples"].items() if int(f) in keep}


def main(argv=None) -> int:
    args = parse_args(argv)
    from training.diffing.report import write_report

    out = args.out or os.path.join(args.run_dir, "analysis")
    try:
        os.makedirs(out, exist_ok=True)
        results = analyze(args)
    except (SetupError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path, figures = write_report(results, out)
    results["figures"] = figures
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    print(f"report: {path}; numbers: {os.path.join(out, 'analysis.json')}; {results['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
