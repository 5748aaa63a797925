#!/usr/bin/env python3
"""kronfluence's side of scripts/bench/vs-kronfluence.sh, and the comparison table.

  prepare  --model HF_DIR --wordnet DIR --out INPUTS.safetensors [--docs 64] [--queries 4] [--max-len 128]
      The workload: WordNet noun glosses (the reference pack's selection rule, 16 per category,
      36-128 tokens: 2,698 tokens, close to the issue's 2,723) and the pack's first queries of each category, tokenised with the model's
      tokenizer.json, right-padded with id 2, in the pack's inputs.safetensors layout.
  run      --model HF_DIR --inputs INPUTS.safetensors --out DIR [--batch 8] [--threads 2]
      kronfluence 1.0.1 EK-FAC, empirical Fisher, default damping (0.1 x mean lambda): fit,
      pairwise scores, per-token scores; wall time and peak RSS (VmHWM, reset between stages
      through /proc/self/clear_refs) of each; scores.safetensors + report.json in DIR.
  compare  --ours DIR --theirs DIR [--label NAME]
      Prints the per-stage table (seconds, ratio, peak RSS, predicted peak) and Pearson
      correlations of the scores.

The data selection, tokenisation, task (summed next-token cross-entropy) and kronfluence calls
are those of the reference pack (tests/data/kronfluence-smollm2-2l/make_reference.py of the
repository, imported from there), so both tools compute the same thing.
"""
import argparse
import json
import os
import sys
import time


def reference_pack():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    ref = os.path.normpath(os.path.join(root, "tests", "data", "kronfluence-smollm2-2l"))
    if not os.path.exists(os.path.join(ref, "make_reference.py")):
        sys.exit(f"kronfluence.py: {ref}/make_reference.py not found (it is committed in the repository)")
    sys.path.insert(0, ref)
    import make_reference  # noqa: E402
    return make_reference


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cmd_prepare(a):
    mr = reference_pack()
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    per_cat = a.docs // len(mr.WORDNET_CATEGORIES)
    train = mr.select_wordnet(a.wordnet, tok, per_cat=per_cat, min_tokens=a.min_tokens, max_tokens=a.max_len)
    train = mr.tokenize_train(train, tok, a.max_len)
    queries = mr.wordnet_queries(train)
    # One query per category first (the list alternates two per category).
    queries = [queries[i] for i in range(0, len(queries), 2)] + [queries[i] for i in range(1, len(queries), 2)]
    queries = mr.tokenize_queries(queries[: a.queries], tok, a.max_len)
    inputs = mr.build_inputs(train, queries, a.max_len)
    save_file({k: v.contiguous() for k, v in inputs.items()}, a.out)
    n_tok = int(inputs["train_attention_mask"].sum())
    print(f"prepare: {len(train)} train docs ({n_tok} tokens, longest {max(len(d['ids']) for d in train)}), "
          f"{len(queries)} queries -> {a.out}")


def cmd_run(a):
    mr = reference_pack()
    import torch
    from safetensors.torch import load_file, save_file
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    import logging

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    inputs = load_file(a.inputs)
    n_layers = json.load(open(os.path.join(a.model, "config.json")))["num_hidden_layers"]
    stages = {}

    def timed(name, f):
        reset_peak()
        t0, c0 = time.perf_counter(), os.times()
        v = f()
        c1 = os.times()
        stages[name] = {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_bytes(),
                        "cpu_seconds": (c1.user + c1.system) - (c0.user + c0.system)}
        print(f"kronfluence: {name}: {stages[name]['seconds']:.2f} s, peak RSS "
              f"{stages[name]['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        return v

    model = timed("load", lambda: mr.load_model(a.model, n_layers))
    names = mr.tracked_module_names(n_layers)
    task = mr.LanguageModelingTask(names)
    model = prepare_model(model, task)
    train_ds = mr.RowsDataset(inputs["train_input_ids"], inputs["train_attention_mask"], inputs["train_labels"])
    query_ds = mr.RowsDataset(inputs["query_input_ids"], inputs["query_attention_mask"], inputs["query_labels"])
    os.makedirs(a.out, exist_ok=True)
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True,
                        output_dir=os.path.join(a.out, "kronfluence"), disable_tqdm=True, log_level=logging.WARNING)
    fa = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    timed("fit", lambda: analyzer.fit_all_factors("ekfac", dataset=train_ds, per_device_batch_size=a.batch,
                                                  factor_args=fa, overwrite_output_dir=True))

    def score(key, per_token):
        sa = ScoreArguments(damping_factor=None, compute_per_token_scores=per_token)
        analyzer.compute_pairwise_scores(key, factors_name="ekfac", query_dataset=query_ds, train_dataset=train_ds,
                                         per_device_query_batch_size=a.batch, per_device_train_batch_size=a.batch,
                                         score_args=sa, overwrite_output_dir=True)
        return analyzer.load_pairwise_scores(key)["all_modules"]

    pairwise = timed("pairwise", lambda: score("pairwise", False))
    per_token = timed("per_token", lambda: score("per_token", True))
    save_file({"pairwise": pairwise.float().contiguous(), "per_token": per_token.float().contiguous()},
              os.path.join(a.out, "scores.safetensors"))
    stages["workload"] = {"train_docs": int(inputs["train_input_ids"].shape[0]),
                          "queries": int(inputs["query_input_ids"].shape[0]),
                          "train_tokens": int(inputs["train_attention_mask"].sum()),
                          "tracked_layers": len(names), "batch": a.batch, "torch_threads": torch.get_num_threads()}
    json.dump(stages, open(os.path.join(a.out, "report.json"), "w"), indent=1)


def pearson(x, y):
    import numpy as np
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def rel_to_max(x, ref):
    import numpy as np
    x, ref = np.asarray(x, dtype=np.float64).ravel(), np.asarray(ref, dtype=np.float64).ravel()
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def cmd_compare(a):
    from safetensors.numpy import load_file
    ours, theirs = (json.load(open(os.path.join(d, "report.json"))) for d in (a.ours, a.theirs))
    so, st = (load_file(os.path.join(d, "scores.safetensors")) for d in (a.ours, a.theirs))
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    w = ours["workload"]
    print(f"\n## {a.label}: {w['tracked_layers']} tracked layers, {w['train_docs']} train docs "
          f"({w['train_tokens']} tokens), {w['queries']} queries, batch {w['batch']} documents "
          f"(source-tda: and at most {w.get('token_budget', '?')} tokens)\n")
    print("| stage | source-tda s (CPU s) | kronfluence s (CPU s) | speed-up wall (CPU) "
          "| source-tda peak RSS GiB | predicted GiB | kronfluence peak RSS GiB | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    cpu = lambda s: s.get("cpu_seconds", float("nan"))  # noqa: E731
    pred = ours.get("predicted_peak_bytes", {})
    rows = [("fit", "fit", "fit", pred.get("fit")), ("pairwise", "pairwise", "pairwise", pred.get("score")),
            ("per_token", "per_token", "per_token", pred.get("score"))]
    for label, o, t, p in rows:
        oo, tt = ours[o], theirs[t]
        print(f"| {label} | {oo['seconds']:.1f} ({cpu(oo):.1f}) | {tt['seconds']:.1f} ({cpu(tt):.1f}) "
              f"| {tt['seconds'] / oo['seconds']:.1f}x ({cpu(tt) / cpu(oo):.1f}x) "
              f"| {gib(oo['peak_rss_bytes'])} | {gib(p) if p else '-'} | {gib(tt['peak_rss_bytes'])} "
              f"| {tt['peak_rss_bytes'] / oo['peak_rss_bytes']:.1f}x |")
    both = ours["pairwise_and_per_token"]
    kf_two = theirs["pairwise"]["seconds"] + theirs["per_token"]["seconds"]
    kf_two_cpu = cpu(theirs["pairwise"]) + cpu(theirs["per_token"])
    print(f"| pairwise + per-token (ours: one pass) | {both['seconds']:.1f} ({cpu(both):.1f}) "
          f"| {kf_two:.1f} ({kf_two_cpu:.1f}) | {kf_two / both['seconds']:.1f}x ({kf_two_cpu / cpu(both):.1f}x) "
          f"| {gib(both['peak_rss_bytes'])} | {gib(pred.get('score', 0))} "
          f"| {gib(max(theirs['pairwise']['peak_rss_bytes'], theirs['per_token']['peak_rss_bytes']))} | |")
    peak_o = max(ours[k]["peak_rss_bytes"] for k in ("fit", "pairwise", "per_token", "pairwise_and_per_token"))
    peak_t = max(theirs[k]["peak_rss_bytes"] for k in ("fit", "pairwise", "per_token"))
    if a.ours_f32:
        # The same fit with `[attribution] eigendecomposition = "f32"`, then the score stage's pass.
        o32 = json.load(open(os.path.join(a.ours_f32, "report.json")))
        for label, o, t_s, t_cpu, t_peak in [
                ("fit, f32 eigendecomposition", o32["fit"], theirs["fit"]["seconds"], cpu(theirs["fit"]),
                 theirs["fit"]["peak_rss_bytes"]),
                ("pairwise + per-token, f32 eigendecomposition (ours: one pass)", o32["pairwise_and_per_token"],
                 kf_two, kf_two_cpu, max(theirs["pairwise"]["peak_rss_bytes"], theirs["per_token"]["peak_rss_bytes"]))]:
            print(f"| {label} | {o['seconds']:.1f} ({cpu(o):.1f}) | {t_s:.1f} ({t_cpu:.1f}) "
                  f"| {t_s / o['seconds']:.1f}x ({t_cpu / cpu(o):.1f}x) | {gib(o['peak_rss_bytes'])} | - "
                  f"| {gib(t_peak)} | {t_peak / o['peak_rss_bytes']:.1f}x |")
    print(f"\nwhole run peak RSS: source-tda {gib(peak_o)} GiB, kronfluence {gib(peak_t)} GiB "
          f"({peak_o / peak_t:.2f} of kronfluence's)")
    n_tok = min(so["per_token"].shape[2], st["per_token"].shape[2])
    print("\n| scores | Pearson | max abs diff / max abs |")
    print("|---|---|---|")
    for key, x, y in [("pairwise", so["pairwise"], st["pairwise"]),
                      ("pairwise (from the per-token pass)", so["pairwise_from_token_pass"], st["pairwise"]),
                      ("per_token", so["per_token"][..., :n_tok], st["per_token"][..., :n_tok])]:
        print(f"| {key} | {pearson(x, y):.7f} | {rel_to_max(x, y):.2e} |")
    if a.ours_f32:
        s32 = load_file(os.path.join(a.ours_f32, "scores.safetensors"))
        for key, x, y in [("pairwise, f32 eigendecomposition", s32["pairwise"], st["pairwise"]),
                          ("per_token, f32 eigendecomposition", s32["per_token"][..., :n_tok],
                           st["per_token"][..., :n_tok])]:
            print(f"| {key} | {pearson(x, y):.7f} | {rel_to_max(x, y):.2e} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare")
    s.add_argument("--model", required=True)
    s.add_argument("--wordnet", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--docs", type=int, default=64)
    s.add_argument("--queries", type=int, default=4)
    s.add_argument("--max-len", type=int, default=128)
    s.add_argument("--min-tokens", type=int, default=36)
    s = sub.add_parser("run")
    s.add_argument("--model", required=True)
    s.add_argument("--inputs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("compare")
    s.add_argument("--ours", required=True)
    s.add_argument("--theirs", required=True)
    s.add_argument("--label", default="workload")
    s.add_argument("--ours-f32", help="a bench_attribution run with BENCH_EIGEN=f32 BENCH_ONE_PASS=1")
    a = p.parse_args()
    {"prepare": cmd_prepare, "run": cmd_run, "compare": cmd_compare}[a.cmd](a)


if __name__ == "__main__":
    main()
