"""Long-tailed demo: BatchNorm vs compound batch norm vs CBN with the dual path, each with
plain cross-entropy and with logit adjustment, on a long-tailed version of scikit-learn's
8x8 digits (1797 images shipped with the package). Paired over seeds.

Data: for each seed s, a balanced test set of `--test-per-class` images per class is held
out at random (split seed s); the training set keeps n_i = n_max * ratio^(-i / 9) images
of class i (the usual exponential profile: digit 0 is the most frequent, 9 the rarest),
for each imbalance ratio. Model: a small CNN (three 3x3 convolutions with `--width`,
2 `--width` and 2 `--width` channels, each followed by the normalization layer under
test and ReLU, a 2x2 max-pool after the second; global average pooling; a linear layer).
Training: SGD (momentum 0.9, weight decay 5e-4, `--lr` 0.1, cosine schedule), `--epochs`
12 epochs of batches of `--batch` 32, random one-pixel shifts.

Methods (every other hyper-parameter identical):

  bn            nn.BatchNorm2d, cross-entropy (CE)
  cbn           CompoundBatchNorm2d (K components), CE
  cbn+dual      CompoundBatchNorm2d, cbn_ext.dual_path_loss with the classes cut into K
                frequency groups (cbn_ext.class_groups)
  bn+LA, cbn+LA, cbn+dual+LA
                the same with logit adjustment (Menon et al., ICLR 2021): the training
                loss is CE(logits + tau * log pi, y), pi the training class prior
                (counts / total), tau = `--tau` (1); plain logits at test time. For the dual
                path both cross-entropies (main and auxiliary path) are adjusted; the
                consistency term KL(softmax(aux) || softmax(main)) stays on the raw logits.

Paired design: for a given seed every method sees the same data split (training subset
and test set), the same initial weights and the same sequence of mini-batches and
shifts. The initial weights: the BatchNorm model is built after torch.manual_seed(seed);
the CBN models are cbn_ext.convert_batchnorm of a copy of it (from_batchnorm copies the
BatchNorm's parameters into every component), so every convolution and the linear layer
start identical.

Reported on the balanced test set: overall accuracy and the mean per-class accuracy over
the head (3 most frequent), medium (next 4) and tail (3 rarest) classes, mean ± standard
deviation over the seeds; and, per seed, the difference of a method's accuracy to
BatchNorm's trained with the same loss (cbn - bn, cbn+LA - bn+LA, ...) with its mean and
95 % t confidence interval over the seeds; bn+LA - bn (what the loss alone does) as a
yardstick. Writes JSON, a Markdown table and a PNG plot of the paired differences.

    python examples/longtail_digits.py                        # ratios 10, 50, 100; 10 seeds
    python examples/longtail_digits.py --seeds 2 --epochs 1   # a smoke run

The defaults (width 16, batch 32, 12 epochs at lr 0.1, one CPU thread) are sized for the
180 runs (3 ratios x 10 seeds x 6 methods) to fit in about 10 minutes on a shared 2-core
CPU; the previous version of this demo (30 runs) used width 32 and 40 epochs of batch 64
at lr 0.05, about 1.7 times the updates per run at twice the width. The models are
therefore trained briefly: the comparison is at this budget.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cbn_ext  # noqa: E402

NORMS = ("bn", "cbn", "cbn+dual")
LOSSES = ("CE", "LA")
METHODS = tuple(n if loss == "CE" else f"{n}+LA" for loss in LOSSES for n in NORMS)
GROUPS = ("overall", "head", "medium", "tail")
# paired differences reported: (method, baseline). The same loss on both sides, so that
# the difference is the normalization's; the last one is the loss's own effect.
COMPARISONS = (("cbn", "bn"), ("cbn+dual", "bn"), ("cbn+LA", "bn+LA"),
               ("cbn+dual+LA", "bn+LA"), ("bn+LA", "bn"))

# two-sided 95 % quantiles of Student's t, df = 1..30 (no scipy needed)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom (table up to 30, then
    the Cornish-Fisher expansion around the normal quantile, within 1e-3)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def load_digits_tensors():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def long_tailed_split(x, y, ratio, test_per_class, split_seed=0):
    """Balanced test set; long-tailed training set with n_i = n_max ratio^(-i/(C-1))."""
    g = torch.Generator().manual_seed(split_seed)
    num_classes = int(y.max()) + 1
    test_idx, pools = [], []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:test_per_class])
        pools.append(idx[test_per_class:])
    n_max = min(len(p) for p in pools)
    counts = [max(1, int(n_max * ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]
    train_idx = torch.cat([p[:n] for p, n in zip(pools, counts)])
    test_idx = torch.cat(test_idx)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]), counts


def make_bn_model(num_classes=10, width=16):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
        nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def make_model(norm, K, seed, width=16):
    """The seed's initial model: BatchNorm, or the same weights with compound layers."""
    torch.manual_seed(seed)
    model = make_bn_model(width=width)
    if norm != "bn":
        model = cbn_ext.convert_batchnorm(copy.deepcopy(model), K)
    return model


def shift_augment(x, g):
    """Random translation by up to one pixel (zero padding)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def train_one(method, train, test, counts, K, seed, epochs, device, width=16, tau=1.0,
              lr=0.1, batch=32):
    norm = method.removesuffix("+LA")
    loss_name = "LA" if method.endswith("+LA") else "CE"
    model = make_model(norm, K, seed, width).to(device)
    x_tr, y_tr = train[0].to(device), train[1].to(device)
    g = torch.Generator().manual_seed(seed)  # the same batches and shifts for every method
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(y_tr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    counts_t = torch.tensor(counts, dtype=torch.float32)
    class_to_group = cbn_ext.class_groups(counts_t.long(), K).to(device)
    if loss_name == "LA":
        log_prior = (tau * torch.log(counts_t / counts_t.sum())).to(device)

        def criterion(logits, target):
            return F.cross_entropy(logits + log_prior, target)
    else:
        criterion = F.cross_entropy
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=g).to(device)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:
                continue
            xb, yb = shift_augment(x_tr[idx], g), y_tr[idx]
            if norm == "cbn+dual":
                loss = cbn_ext.dual_path_loss(model, xb, yb, class_to_group,
                                              criterion=criterion).loss
            else:
                loss = criterion(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(test[0].to(device)).argmax(1).cpu()
    y = test[1]
    per_class = [(pred[y == c] == c).float().mean().item() for c in range(len(counts))]
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))  # by training frequency
    head, medium, tail = order[:3], order[3:7], order[7:]
    return {"overall": (pred == y).float().mean().item(),
            "head": statistics.mean(per_class[c] for c in head),
            "medium": statistics.mean(per_class[c] for c in medium),
            "tail": statistics.mean(per_class[c] for c in tail),
            "per_class": per_class}


def summarize(runs):
    """Mean and standard deviation over the seeds, in %."""
    out = {}
    for key in GROUPS:
        vals = [100 * r[key] for r in runs]
        out[key] = {"mean": statistics.mean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def paired_difference(runs, baseline):
    """Per seed, method minus baseline (percentage points): mean, standard deviation and
    95 % t interval of the mean over the seeds (the interval is the mean alone with one
    seed)."""
    out = {}
    for key in GROUPS:
        d = [100 * (r[key] - b[key]) for r, b in zip(runs, baseline, strict=True)]
        mean = statistics.mean(d)
        std = statistics.stdev(d) if len(d) > 1 else 0.0
        half = t_quantile_975(len(d) - 1) * std / math.sqrt(len(d)) if len(d) > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half,
                    "n": len(d), "per_seed": d}
    return out


def markdown(results, diffs):
    lines = [f"| ratio | method | {' | '.join(GROUPS)} |", "|" + " --- |" * (2 + len(GROUPS))]
    for ratio, by_method in results.items():
        for method, s in by_method.items():
            cells = " | ".join(f"{s[g]['mean']:.1f} ± {s[g]['std']:.1f}" for g in GROUPS)
            lines.append(f"| {ratio} | {method} | {cells} |")
    dl = [f"| ratio | paired difference | {' | '.join(GROUPS)} |",
          "|" + " --- |" * (2 + len(GROUPS))]
    for ratio, by_cmp in diffs.items():
        for name, d in by_cmp.items():
            cells = []
            for g in GROUPS:
                s = f"{d[g]['mean']:+.1f} [{d[g]['ci_low']:+.1f}, {d[g]['ci_high']:+.1f}]"
                # bold: the interval excludes 0
                excludes_0 = d[g]["ci_low"] > 0 or d[g]["ci_high"] < 0
                cells.append(f"**{s}**" if d[g]["n"] > 1 and excludes_0 else s)
            dl.append(f"| {ratio} | {name} | {' | '.join(cells)} |")
    return lines, dl


def plot(diffs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(diffs)
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.2 * len(ratios), 4.4), squeeze=False)
    # the normalization comparisons only: the loss's own effect (bn+LA − bn, in the table)
    # is several times larger and would flatten them
    styles = {"cbn − bn": ("tab:orange", "o", "tab:orange"),
              "cbn+dual − bn": ("tab:green", "o", "tab:green"),
              "cbn+LA − bn+LA": ("tab:orange", "s", "white"),
              "cbn+dual+LA − bn+LA": ("tab:green", "s", "white")}
    for k, (ax, ratio) in enumerate(zip(axes[0], ratios)):
        names = [n for n in diffs[ratio] if n in styles]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            d = diffs[ratio][name]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(GROUPS))]
            means = [d[g]["mean"] for g in GROUPS]
            err = [[d[g]["mean"] - d[g]["ci_low"] for g in GROUPS],
                   [d[g]["ci_high"] - d[g]["mean"] for g in GROUPS]]
            color, marker, face = styles[name]
            ax.errorbar(xs, means, yerr=err, fmt=marker, color=color, mfc=face, capsize=3,
                        ms=5, label=name)
        ax.axhline(0, color="black", lw=0.8)
        for j in range(1, len(GROUPS)):
            ax.axvline(j - 0.5, color="0.85", lw=0.8)
        ax.set_xticks(range(len(GROUPS)))
        ax.set_xticklabels(GROUPS)
        ax.set_xlim(-0.5, len(GROUPS) - 0.5)
        if k == 0:
            ax.set_ylabel("difference to BatchNorm, same loss\n(accuracy points, 95 % CI)")
        ax.set_title(f"imbalance ratio {ratio}")
        ax.grid(axis="y", color="0.92")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ratios", default="10,50,100")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--width", type=int, default=16, help="channels of the first convolution")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--components", type=int, default=2, help="K of the compound layers")
    p.add_argument("--tau", type=float, default=1.0, help="logit adjustment strength")
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: these tiny layers gain nothing from more, "
                        "and lose much on a busy machine)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="longtail_digits")
    args = p.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and cbn_ext.build_info()["cuda"] else "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter instead of a bar
        tqdm = None

    x, y = load_digits_tensors()
    ratios = [int(r) for r in args.ratios.split(",")]
    jobs = [(r, s, m) for r in ratios for s in range(args.seeds) for m in METHODS]
    bar = tqdm(total=len(jobs), desc="training", unit="run") if tqdm else None
    runs, counts_by_ratio = {}, {}
    t0 = time.perf_counter()
    split = None
    for i, (ratio, seed, method) in enumerate(jobs, 1):
        if split is None or split[0] != (ratio, seed):  # the seed's split, for every method
            split = ((ratio, seed), long_tailed_split(x, y, ratio, args.test_per_class, seed))
        train, test, counts = split[1]
        counts_by_ratio[ratio] = counts  # the same for every seed (n_max is fixed)
        r = train_one(method, train, test, counts, args.components, seed, args.epochs, device,
                      width=args.width, tau=args.tau, lr=args.lr, batch=args.batch)
        runs.setdefault(ratio, {}).setdefault(method, []).append(r)
        if bar:
            bar.set_postfix_str(f"ratio {ratio} seed {seed} {method}: {100 * r['overall']:.1f}%")
            bar.update()
        else:
            print(f"[{i}/{len(jobs)}] ratio {ratio} seed {seed} {method}: "
                  f"{100 * r['overall']:.1f}%", flush=True)
    if bar:
        bar.close()
    seconds = time.perf_counter() - t0
    results = {ratio: {m: summarize(by_m[m]) for m in METHODS} for ratio, by_m in runs.items()}
    diffs = {ratio: {f"{m} − {b}": paired_difference(by_m[m], by_m[b]) for m, b in COMPARISONS}
             for ratio, by_m in runs.items()}

    command = "python examples/longtail_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {"command": command.strip(), "device": device,
            "machine": torch.cuda.get_device_name() if device == "cuda" else os.uname().machine,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "seconds": seconds,
            "epochs": args.epochs, "width": args.width, "batch": args.batch, "lr": args.lr,
            "seeds": args.seeds,
            "components": args.components, "tau": args.tau,
            "test_per_class": args.test_per_class, "train_counts": counts_by_ratio}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump({**info, "summary": results, "paired_differences": diffs, "runs": runs}, f,
                  indent=1)
    table, dtable = markdown(results, diffs)
    with open(stem + ".md", "w") as f:
        f.write(f"Command: `{info['command']}` ({device}, {info['threads']} thread(s), torch "
                f"{info['torch']}, {info['date']}, {seconds:.0f} s). Width {args.width}, "
                f"{args.epochs} epochs, K = {args.components}, tau = {args.tau:g}. Training "
                "counts per class: "
                + "; ".join(f"ratio {r}: {counts_by_ratio[r]}" for r in ratios) + ".\n\n")
        f.write(f"Accuracy (%) on the balanced test set, mean ± std over {args.seeds} seeds:"
                "\n\n" + "\n".join(table) + "\n\n")
        f.write("Paired difference to BatchNorm trained with the same loss (accuracy points, "
                f"per seed, then mean [95 % t interval] over the {args.seeds} seeds; bold: the "
                "interval excludes 0); `bn+LA − bn` is the effect of the loss alone:\n\n"
                + "\n".join(dtable) + "\n")
    plot(diffs, stem + ".png",
         f"long-tailed digits: paired differences, {args.seeds} seeds, width {args.width}, "
         f"{args.epochs} epochs, K = {args.components}, tau = {args.tau:g} "
         f"({device}, {info['date']})")
    print("\n".join(table) + "\n\n" + "\n".join(dtable))
    print(f"\n# wrote {stem}.{{json,md,png}} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
