"""The analysis as a markdown report with PNG figures (matplotlib, no display needed)."""
from __future__ import annotations

import os
from typing import Optional

MODELS = ("base", "hybrid", "adapted", "reference")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _save(fig, out_dir: str, name: str, figures: list) -> None:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    _plt().close(fig)
    figures.append(name)


# --------------------------------------------------------------------------------------------------
# sections: each returns its markdown lines and draws its figures
# --------------------------------------------------------------------------------------------------
def _output_section(o: dict, out_dir: str, figures: list) -> list:
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    names = [m for m in MODELS if m in o["kl"]]
    ax[0].bar(names, [o["kl"][m] for m in names], color="C0")
    ax[0].set_yscale("symlog", linthresh=1e-3)
    ax[0].set_title("KL(reference || model)")
    ax[1].bar(names, [o["top1_error"][m] for m in names], color="C1")
    ax[1].set_title("top-1 error")
    _save(fig, out_dir, "output_faithfulness.png", figures)
    lines = ["## Output faithfulness", "",
             f"On {o['n_sequences']} held-out sequences ({o['n_positions']} scored positions):", "",
             "| model | KL(reference‖model) | top-1 error |", "|---|---|---|"]
    lines += [f"| {m} | {_fmt(o['kl'][m])} | {_pct(o['top1_error'][m])} |" for m in names]
    return lines + ["", "![output faithfulness](output_faithfulness.png)", ""]


def _internal_section(f: dict, out_dir: str, figures: list) -> list:
    plt = _plt()
    L = f["n_layers"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, vals in f["nmse"].items():
        ax[0].plot(range(len(vals)), vals, marker="o", label=name)
    ax[0].set_xticks(range(len(f["hidden_states"])))
    ax[0].set_xticklabels(["emb"] + [str(i) for i in range(L)])
    ax[0].set_title("NMSE of hidden states vs reference")
    ax[0].set_xlabel("after layer")
    ax[0].legend()
    ks = list(range(L + 1))
    ax[1].plot(ks, f["adapted_below_k"], marker="o", label="adapted layers < k")
    ax[1].plot(ks, f["adapted_from_k"], marker="o", label="adapted layers >= k")
    ax[1].axhline(f["all_layers"], color="gray", ls="--", label="all layers")
    ax[1].set_title("KL with layers replaced, by cut-off")
    ax[1].set_xlabel("cut-off k")
    ax[1].legend(fontsize=8)
    m = f["subset_kl"]
    grid = [[(m[i][j] if m[i][j] is not None and i < j else float("nan")) for j in range(L + 1)] for i in range(L + 1)]
    im = ax[2].imshow(grid, cmap="viridis", origin="upper")
    ax[2].set_title("KL, adapted layers [i, j) in the reference")
    ax[2].set_xlabel("j")
    ax[2].set_ylabel("i")
    fig.colorbar(im, ax=ax[2])
    _save(fig, out_dir, "internal_faithfulness.png", figures)
    lines = ["## Internal faithfulness", "",
             "NMSE of each hidden state against the reference's (embeddings, then after each layer):", "",
             "| model | " + " | ".join(["emb"] + [f"layer {i}" for i in range(L)]) + " |",
             "|---|" + "---|" * (L + 1)]
    lines += [f"| {name} | " + " | ".join(_fmt(v, 3) for v in vals) + " |" for name, vals in f["nmse"].items()]
    lines += ["", f"KL(reference‖reference with its layers [i, j) replaced by the adapted model's), "
                  f"{f['subsets']} subsets: all layers {_fmt(f['all_layers'])}, largest proper subset "
                  f"{_fmt(f['max_subset_kl'])}; every subset below all layers: "
                  f"{'yes' if f['subsets_below_all'] else 'no'} (the paper finds yes: errors do not accumulate).",
              "", "| cut-off k | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * (L + 1),
              "| adapted layers < k | " + " | ".join(_fmt(v, 3) for v in f["adapted_below_k"]) + " |",
              "| adapted layers ≥ k | " + " | ".join(_fmt(v, 3) for v in f["adapted_from_k"]) + " |",
              "", "![internal faithfulness](internal_faithfulness.png)", ""]
    return lines


def _task_section(t: dict, out_dir: str, figures: list, word: str) -> list:
    plt = _plt()
    ms = t["models"]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3))
    for a, key, title in ((ax[0], "accuracy", "accuracy"), (ax[1], "mean_tokens", "response tokens"),
                          (ax[2], "hesitation_rate", f"completions with {word!r}")):
        a.bar(list(ms), [ms[m][key] or 0 for m in ms], color=["C0", "C1", "C2", "C3"])
        a.set_title(title)
    _save(fig, out_dir, "tasks.png", figures)
    g = t["gain_recovered"]
    lines = ["## Task evaluation", "",
             f"Greedy completions of {t['n']} held-out prompts (up to {t['max_new_tokens']} tokens); a "
             "completion is correct when its final answer equals that of the record's response.", "",
             f"| model | accuracy | mean response tokens | writes {word!r} |", "|---|---|---|---|"]
    lines += [f"| {m} | {_pct(s['accuracy'])} | {s['mean_tokens']:.1f} | {_pct(s['hesitation_rate'])} |"
              for m, s in ms.items()]
    lines += ["", f"Share of the reference's accuracy gain over the base that the adapted model recovers: "
                  f"{_pct(g['adapted'])} (the paper: 50–90%)"
                  + ("" if g["adapted"] is not None else
                     " — undefined: the reference is not more accurate than the base on these prompts") + ".",
              f"Share of the gap from the hybrid start to the reference that it closes: "
              f"{_pct(t.get('gap_closed'))}.",
              f"Response length, adapted / reference: {_fmt(t['length_ratio'], 3)} (the paper: the adapted model "
              f"matches the reference's length).", "", "![tasks](tasks.png)", "", "Examples:", ""]
    for m in MODELS:
        for ex in t["examples"][m][:2]:
            lines.append(f"- {m}: `{ex}`")
    return lines + [""]


def _features_section(fs: dict, out_dir: str, figures: list, highlight: dict, n_show: int = 4) -> list:
    """``highlight``: ``{layer: [features]}`` to show first (the hesitation set)."""
    plt = _plt()
    per = fs["per_layer"]
    lines = ["## Features", "",
             f"On {fs['n_tokens']} held-out tokens (prompt {fs['segment_tokens']['prompt']}, reasoning "
             f"{fs['segment_tokens']['reasoning']}, answer {fs['segment_tokens']['answer']}; the answer begins at "
             f"{fs['reasoning_end'] or fs['answer_marker']!r}).", "",
             "| layer | L0 | never fired (held-out) | dead (training counters) | enrichment prompt / reasoning / "
             "answer | features mostly in prompt / reasoning / answer (per-token rates) |",
             "|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(per), figsize=(3.2 * len(per), 2.8), squeeze=False)
    for ax, (layer, st) in zip(axes[0], per.items()):
        h = st["density_histogram"]
        edges = h["bin_edges"]
        ax.bar(edges[:-1], h["counts"], width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
        ax.set_title(f"layer {layer}: log10 density")
        seg = st["segments"]
        enr = " / ".join(_fmt(seg["enrichment"][k], 3) for k in ("prompt", "reasoning", "answer"))
        mostly = " / ".join(str(seg["mostly_normalised"][k]) for k in ("prompt", "reasoning", "answer"))
        lines.append(f"| {layer} | {st['l0']:.2f} | {st['dead']['held_out']} | {_fmt(st['dead']['training'])} | "
                     f"{enr} | {mostly} |")
    _save(fig, out_dir, "feature_density.png", figures)
    lines += ["", "![feature density](feature_density.png)", "",
              "Top-activating examples (the token marked «»), for the hesitation set's features and the most "
              "frequent ones:", ""]
    for layer, st in per.items():
        counts = st["fire_counts"]
        frequent = sorted(range(len(counts)), key=lambda f: -counts[f])[:n_show]
        for f in list(highlight.get(int(layer), highlight.get(layer, []))) + frequent:
            exs = st["top_examples"].get(str(f), [])
            if exs:
                lines.append(f"- layer {layer} feature {f} ({counts[f]} firings): "
                             + "; ".join(f"`{e['context']}` ({e['value']:.2f})" for e in exs[:3]))
    return lines + [""]


def _hesitation_section(h: dict, out_dir: str, figures: list, word: str) -> list:
    lines = ["## Hesitation", ""]
    a = h.get("attribution", {})
    how = ("integrated gradients from no features to the adapted model's, "
           f"{a.get('steps')} steps" if a.get("method") == "path" else "gradient × activation")
    lines.append(f"Attribution ({how}) of log p({word!r}) over {h['attributed_sequences']} "
                 f"hesitating completions of {h['n_selection']} selection prompts; "
                 f"{_pct(h['predicting_share'])} of it at the positions that predict the word.")
    if a.get("method") == "path" and h["attributed_sequences"]:
        n = h["attributed_sequences"]
        lines.append(f"The scores sum to {a['score_sum'] / n:.2f} nats per completion; the gap they account "
                     f"for (log p with every feature minus with none) is {a['gap'] / n:.2f}.")
    if "set" not in h:
        return lines + ["", h.get("note", ""), ""]
    s, c = h["set"], h["causal"]
    plt = _plt()
    d = h.get("decision_point")
    fig, ax = plt.subplots(1, 3 if d else 2, figsize=(14 if d else 9, 3))
    nec, suff = h["necessary_set"], h["sufficient_set"]
    for search, label, color in ((nec, "set ablated", "C0"), (suff, "set patched into the hybrid", "C1")):
        ax[0].plot([t["size"] for t in search["tried"]], [t["hesitation_rate"] for t in search["tried"]],
                   marker="o", color=color, label=label)
        ax[0].axhline(search["goal_rate"], color=color, ls="--", lw=0.8)
    ax[0].axvline(s["size"], color="gray", ls=":")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("top features of the ranking")
    ax[0].set_title("hesitation rate (selection prompts)")
    ax[0].legend(fontsize=7)
    bars = {"adapted": c["adapted"], "set ablated": c["ablated"], "random ablated": c["random_ablated"],
            "hybrid": c["hybrid"]}
    bars["hybrid + set (patched)"] = c["hybrid_plus_set"]
    bars["hybrid + set (own encoders)"] = c["hybrid_plus_set_encoded"]
    if suff["size"] != s["size"]:
        bars[f"hybrid + {suff['size']} features (patched)"] = c["hybrid_plus_sufficient_set"]
    ax[1].barh(list(bars), [v["hesitation_rate"] for v in bars.values()])
    ax[1].set_title(f"writes {word!r} (test prompts)")
    if d:
        ax[2].plot([p["size"] for p in d["patched"]], [p["top1"] for p in d["patched"]], marker="o",
                   label="first token most likely")
        ax[2].plot([p["size"] for p in d["patched"]], [p["gap_closed"] for p in d["patched"]], marker=".",
                   label="log-prob gap closed")
        ax[2].axhline(1.0, color="gray", ls="--")
        ax[2].set_xscale("log")
        ax[2].set_xlabel("top features patched into the hybrid")
        ax[2].set_title("at the decision point")
        ax[2].legend(fontsize=7)
    _save(fig, out_dir, "hesitation.png", figures)
    removal = _pct(1 - nec["goal_rate"] / nec["rate_before"]) if nec["rate_before"] else "n/a"
    lines += ["", f"On the selection prompts, the smallest prefix of the ranking whose ablation removes {removal} "
                  f"of the hesitations: {nec['size']} features"
                  + ("" if nec["reached"] else " (NOT reached within the budget)")
                  + f"; the smallest that, patched into the hybrid, makes it hesitate half as often as the adapted "
                  f"model: {suff['size']} features ({_pct(suff['share'])})"
                  + ("" if suff["reached"] else ", not reached even with every positively attributed feature")
                  + f". The set ({s['rule']}): {s['size']} features ({_pct(s['share'])} of "
                  f"{h['n_features_total']}), {'both' if s['reached'] else 'NOT both'} necessary and sufficient "
                  f"there (ablated: {_pct(s['ablated_rate'])} hesitate, patched: {_pct(s['induced_rate'])}); "
                  "by layer: " + ", ".join(f"{k}: {len(v)}" for k, v in s["features"].items()) + ".", "",
              f"Causal tests on {h['n_test']} other prompts:", "",
              "| model | writes it | accuracy | mean tokens |", "|---|---|---|---|"]
    for name, v in bars.items():
        lines.append(f"| {name} | {_pct(v['hesitation_rate'])} | {_pct(v['accuracy'])} | {v['mean_tokens']:.1f} |")
    lines += ["", f"Ablating the set removes {_pct(c['hesitation_removed'])} of the hesitations (target ≥ 90%), "
                  f"changes accuracy by {_fmt(None if c['accuracy_change'] is None else 100 * c['accuracy_change'], 3)} "
                  f"points (target: at most 5 lost) and the response length by {c['length_change']:.1f} tokens; patched "
                  f"into the hybrid (at the values the adapted model gives it on the same tokens, with every adapter's decoder bias) it makes the "
                  f"hybrid write {word!r} in {_pct(c['induced'])} of completions (target ≥ 50%)"
                  + ("." if suff["size"] == s["size"] else
                     f"; the smallest sufficient prefix ({suff['size']} features) induces "
                     f"{_pct(c['hybrid_plus_sufficient_set']['hesitation_rate'])}."),
              ""]
    if d and d["n_sequences"]:
        lines += [f"At the decision point (each of the adapted model's {d['n_sequences']} hesitating test "
                  f"completions, teacher-forced up to the word): the hybrid gives log p({word!r}) "
                  f"{d['hybrid']['mean_log_prob']:.2f} (its first token the most likely next one in "
                  f"{_pct(d['hybrid']['top1'])}), the adapters with no features (their decoder biases alone) "
                  f"{d['no_features']['mean_log_prob']:.2f} ({_pct(d['no_features']['top1'])}), the "
                  f"adapted model {d['adapted']['mean_log_prob']:.2f} ({_pct(d['adapted']['top1'])}); with the top "
                  f"features of the ranking patched in (gap closed: from no features to the adapted model):", "",
                  "| features patched | log p | first token most likely | gap closed |", "|---|---|---|---|"]
        lines += [f"| {p['size']} | {p['mean_log_prob']:.2f} | {_pct(p['top1'])} | {_pct(p['gap_closed'])} |"
                  for p in d["patched"]]
        lines.append("")
    if h.get("steered"):
        lines += [f"The set of {s['size']} features patched into the hybrid at multiples of the adapted model's "
                  f"values (steering): at the decision point, and in generation on the test prompts:", "",
                  f"| scale | first token most likely | gap closed | writes {word!r} | accuracy | mean tokens |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {v['scale']:g} | {_pct(v['decision_top1'])} | {_pct(v['decision_gap_closed'])} | "
                  f"{_pct(v['hesitation_rate'])} | {_pct(v['accuracy'])} | {v['mean_tokens']:.1f} |"
                  for v in h["steered"]]
        lines.append("")
    return lines + ["![hesitation](hesitation.png)", ""]


def write_report(results: dict, out_dir: str) -> tuple:
    """``report.md`` and its figures in ``out_dir`` from the analysis ``results``; returns the
    report's path and the figures' file names."""
    figures: list = []
    word = results["hesitation_word"]
    lines = [f"# Model diffing: {results['run_dir']}", "",
             f"Base {results['base_model']}, reference {results['reference_model']}, "
             f"{results['n_layers']} layers × {results['n_features']} adapter features.", ""]
    if "output" in results:
        lines += _output_section(results["output"], out_dir, figures)
    if "internal" in results:
        lines += _internal_section(results["internal"], out_dir, figures)
    if "tasks" in results:
        lines += _task_section(results["tasks"], out_dir, figures, word)
    if "features" in results:
        chosen = results.get("hesitation", {}).get("set", {}).get("features", {})
        lines += _features_section(results["features"], out_dir, figures, chosen)
    if "hesitation" in results:
        lines += _hesitation_section(results["hesitation"], out_dir, figures, word)
    lines += [f"Every number: `analysis.json`. Made in {results['seconds']:.0f} s."]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, figures
