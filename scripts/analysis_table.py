#!/usr/bin/env python3
"""Runs one `analyze` analysis over several weights files and writes one table in the paper's
layout (Markdown) and one figure with every file on it.

    scripts/analysis_table.py fgsm --config configs/imagenet_resnet50_cutmix.toml \\
        --weights baseline.safetensors --label Baseline \\
        --weights cutmix.safetensors --label CutMix \\
        --figure fgsm.png --table fgsm.md [-- any further analyze flags, e.g. --eps 8/255]

Analyses: fgsm (Table 11), ood (Table 12: the mean over the sets, then each set), occlusion
(Figure 5a as a table), between (Figure 5b as a table), calibration. Needs only Python 3 and
the release build of `analyze` (cargo build --release; --bin names another folder).
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value):
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def fgsm(results):
    eps = results[0][1]["eps"]
    header = ["Method", "clean top-1 acc (%)"] + [f"top-1 acc (%), eps {e * 255:.3g}/255" for e in eps]
    rows = [[label, fmt(r["clean_top1_acc"])] + [fmt(a) for a in r["top1_acc"]] for label, r in results]
    return "Top-1 accuracy after FGSM (the paper's Table 11)\n\n" + table(header, rows)


def ood(results):
    keys = [("tnr_at_tpr95", "TNR at TPR 95%"), ("auroc", "AUROC"), ("detection_acc", "Detection Acc."),
            ("aupr_in", "AUPR in"), ("aupr_out", "AUPR out")]
    header = ["Method"] + [name for _, name in keys]
    mean = [[label] + [fmt(r["mean"][k]) for k, _ in keys] for label, r in results]
    out = ["Out-of-distribution detection, mean over the sets (the paper's Table 12)\n", table(header, mean)]
    per_set = [[label, name] + [fmt(s[k]) for k, _ in keys]
               for label, r in results for name, s in r["sets"].items()]
    out += ["\nEach set\n", table(["Method", "set"] + [n for _, n in keys], per_set)]
    return "\n".join(out)


def occlusion(results):
    sizes = results[0][1]["sizes"]
    out = []
    for kind in ("centre", "boundary"):
        key = f"{kind}_top1_err"
        if key not in results[0][1]:
            continue
        header = ["Method"] + [f"s = {s}" for s in sizes]
        rows = [[label] + [fmt(v) for v in r[key]] for label, r in results]
        out.append(f"Top-1 error (%) under {kind} occlusion ({results[0][1]['fill']} fill; the paper's Figure 5a)\n\n" + table(header, rows))
    return "\n\n".join(out)


def between(results):
    lambdas = results[0][1]["lambdas"]
    out = []
    for method in ("mixup", "cutmix"):
        header = ["Method"] + [f"lambda {l:.2f}" for l in lambdas]
        rows = [[label] + [fmt(v) for v in r[f"{method}_neither"]] for label, r in results]
        out.append(f"Predicting neither class (%) on {method} in-between samples ({results[0][1]['pairs']} pairs; the paper's Figure 5b)\n\n" + table(header, rows))
    return "\n\n".join(out)


def calibration(results):
    header = ["Method", "top-1 err (%)", "ECE (%)", "NLL", "Brier"]
    fitted = "temperature" in results[0][1]
    if fitted:
        header += ["T (fitted)", "held-out ECE before (%)", "after (%)"]
    rows = []
    for label, r in results:
        row = [label, fmt(r["top1_err"]), fmt(r["ece"]), r["nll"], r["brier"]]
        if fitted:
            row += [r["temperature"], fmt(r["held_out_before"]["ece"]), fmt(r["held_out_after"]["ece"])]
        rows.append(row)
    return "Calibration\n\n" + table(header, rows)


LAYOUTS = {"fgsm": fgsm, "ood": ood, "occlusion": occlusion, "between": between, "calibration": calibration}


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("analysis", choices=sorted(LAYOUTS))
    parser.add_argument("--config", required=True)
    parser.add_argument("--weights", action="append", required=True, help="repeatable")
    parser.add_argument("--label", action="append", default=[], help="a name per --weights, in order")
    parser.add_argument("--figure", help="the PNG analyze writes")
    parser.add_argument("--table", help="also write the table to this file")
    parser.add_argument("--bin", default=os.path.join(REPO, "target", "release"), help="folder with analyze")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.weights):
        parser.error(f"--label: {len(args.label)} labels for {len(args.weights)} --weights")
    labels = args.label or args.weights
    command = [os.path.join(args.bin, "analyze"), args.analysis, "--config", args.config]
    for w in args.weights:
        command += ["--weights", w]
    for label in args.label:
        command += ["--label", label]
    if args.figure:
        command += ["--figure", args.figure]
    command += extra
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"analyze failed ({done.returncode}): {' '.join(command)}")
    lines = [json.loads(l) for l in done.stdout.splitlines() if l.strip()]
    if len(lines) != len(labels):
        sys.exit(f"analyze printed {len(lines)} lines for {len(labels)} weights files")
    text = LAYOUTS[args.analysis](list(zip(labels, lines)))
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
