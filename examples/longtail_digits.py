"""Long-tailed demo: BatchNorm vs compound batch norm vs CBN with the dual path, on a
long-tailed version of scikit-learn's 8x8 digits (1797 images shipped with the package).

Data: a balanced test set of `--test-per-class` images per class is held out (the same
split for every run); the training set keeps n_i = n_max * ratio^(-i / 9) images of
class i (the usual exponential profile: digit 0 is the most frequent, 9 the rarest), for
each imbalance ratio. Model: a small CNN (three 3x3 convolutions, each followed by the
normalization layer under test, ReLU, global average pooling, a linear layer). Every
method gets the same data, seeds and hyper-parameters:

  bn         nn.BatchNorm2d, cross-entropy
  cbn        CompoundBatchNorm2d (K components), cross-entropy
  cbn+dual   CompoundBatchNorm2d (K components), cbn_ext.dual_path_loss with the classes cut
             into K frequency groups (cbn_ext.class_groups)

Reported on the balanced test set: overall accuracy, and the mean accuracy over the head
(3 most frequent), medium (next 4) and tail (3 rarest) classes; mean and standard
deviation over the seeds. Writes JSON, a Markdown table and a PNG plot.

    python examples/longtail_digits.py                       # ratios 10 and 50, 5 seeds
    python examples/longtail_digits.py --seeds 1 --epochs 2  # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cbn_ext  # noqa: E402

METHODS = ("bn", "cbn", "cbn+dual")
GROUPS = ("overall", "head", "medium", "tail")


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


def make_model(method, K, num_classes=10, width=32):
    def norm(c):
        return nn.BatchNorm2d(c) if method == "bn" else cbn_ext.CompoundBatchNorm2d(c, K)

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), norm(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), norm(2 * width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), norm(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def shift_augment(x, g):
    """Random translation by up to one pixel (zero padding)."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return padded[:, :, dy:dy + 8, dx:dx + 8]


def train_one(method, train, test, counts, K, seed, epochs, device, lr=0.05, batch=64):
    torch.manual_seed(seed)
    model = make_model(method, K).to(device)
    x_tr, y_tr = train[0].to(device), train[1].to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(y_tr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    class_to_group = cbn_ext.class_groups(torch.tensor(counts), K).to(device)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=g).to(device)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2:
                continue
            xb, yb = shift_augment(x_tr[idx], g), y_tr[idx]
            if method == "cbn+dual":
                loss = cbn_ext.dual_path_loss(model, xb, yb, class_to_group).loss
            else:
                loss = F.cross_entropy(model(xb), yb)
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
    out = {}
    for key in GROUPS:
        vals = [100 * r[key] for r in runs]
        out[key] = {"mean": statistics.mean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def markdown(results, args):
    lines = [f"| ratio | method | {' | '.join(GROUPS)} |", "|" + " --- |" * (2 + len(GROUPS))]
    for ratio, by_method in results.items():
        for method, s in by_method.items():
            cells = " | ".join(f"{s[g]['mean']:.1f} ± {s[g]['std']:.1f}" for g in GROUPS)
            lines.append(f"| {ratio} | {method} | {cells} |")
    return lines


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(results)
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        methods = list(results[ratio])
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            s = results[ratio][method]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(GROUPS))]
            ax.bar(xs, [s[g]["mean"] for g in GROUPS], width,
                   yerr=[s[g]["std"] for g in GROUPS], capsize=3, label=method)
        ax.set_xticks(range(len(GROUPS)))
        ax.set_xticklabels(GROUPS)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%), balanced test set")
        ax.set_title(f"imbalance ratio {ratio}")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(methods))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ratios", default="10,50")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--components", type=int, default=2, help="K of the compound layers")
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="longtail_digits")
    args = p.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and cbn_ext.build_info()["cuda"] else "cpu"
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter instead of a bar
        tqdm = None

    x, y = load_digits_tensors()
    ratios = [int(r) for r in args.ratios.split(",")]
    jobs = [(r, m, s) for r in ratios for m in METHODS for s in range(args.seeds)]
    bar = tqdm(total=len(jobs), desc="training", unit="run") if tqdm else None
    runs, splits = {}, {}
    t0 = time.perf_counter()
    for i, (ratio, method, seed) in enumerate(jobs, 1):
        if ratio not in splits:
            splits[ratio] = long_tailed_split(x, y, ratio, args.test_per_class)
        train, test, counts = splits[ratio]
        r = train_one(method, train, test, counts, args.components, seed, args.epochs, device)
        runs.setdefault(ratio, {}).setdefault(method, []).append(r)
        if bar:
            bar.set_postfix_str(f"ratio {ratio} {method} seed {seed}: {100 * r['overall']:.1f}%")
            bar.update()
        else:
            print(f"[{i}/{len(jobs)}] ratio {ratio} {method} seed {seed}: "
                  f"{100 * r['overall']:.1f}%", flush=True)
    if bar:
        bar.close()
    results = {ratio: {m: summarize(rs) for m, rs in by_m.items()} for ratio, by_m in runs.items()}
    seconds = time.perf_counter() - t0

    command = "python examples/longtail_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {"command": command.strip(), "device": device,
            "machine": torch.cuda.get_device_name() if device == "cuda" else os.uname().machine,
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "seconds": seconds, "epochs": args.epochs, "seeds": args.seeds,
            "components": args.components, "test_per_class": args.test_per_class,
            "train_counts": {r: splits[r][2] for r in ratios}}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump({**info, "summary": results, "runs": runs}, f, indent=1)
    lines = markdown(results, args)
    with open(stem + ".md", "w") as f:
        f.write(f"Command: `{info['command']}` ({device}, torch {info['torch']}, {info['date']}, "
                f"{seconds:.0f} s). Accuracy (%) on the balanced test set, mean ± std over "
                f"{args.seeds} seeds; training counts per class: "
                + "; ".join(f"ratio {r}: {splits[r][2]}" for r in ratios) + ".\n\n")
        f.write("\n".join(lines) + "\n")
    plot(results, stem + ".png",
         f"long-tailed digits, {args.seeds} seeds, {args.epochs} epochs, K = {args.components} "
         f"({device}, {info['date']})")
    print("\n".join(lines))
    print(f"\n# wrote {stem}.{{json,md,png}} ({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
