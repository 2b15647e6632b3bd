"""Fine-tune from a pretrained GPT vs from scratch on pystdlib-packages; print a markdown table.

Measures what `init_from:` buys on a real task (which stdlib package a code window comes
from), in-process and without the CLI: the classifier of jobs/pystdlib-classify.yaml is
built twice per seed, once fresh and once with every backbone tensor copied from the
pretraining checkpoint (names present in both with equal shapes: all but heads.*), then both
train the same steps, lr schedule, batches and seed; accuracy is on the whole eval split
(files never seen in fine-tuning). Run:

    temper data pack pystdlib data/pystdlib --format pystdlib --seq-len 128 --shard-size 10000
    temper data pack pystdlib-packages data/pystdlib-packages --format pystdlib-packages \
        --seq-len 128 --shard-size 1000
    temper run jobs/pystdlib-gpt.yaml --launcher inprocess --set tracking.enabled=false \
        --set checkpoint.dir=temper-runs/bench
    python benchmarks/text_finetune.py temper-runs/bench/<run folder> --steps 300 --seeds 0 1 2

Note: the pretraining corpus (all of the stdlib) includes the eval files' text, unlabelled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from temper.checkpoint import export_checkpoint
from temper.data.manifest import Manifest
from temper.models import build_model
from temper.runtime.optim import build_optimizer, build_scheduler
from temper.spec import load_spec


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a packed split as (tokens [N, seq_len + 1], labels [N])."""
    import webdataset as wds

    manifest = Manifest.load(folder)
    samples = list(wds.WebDataset(manifest.shard_urls(folder), shardshuffle=False, empty_check=False).decode())
    tokens = torch.from_numpy(np.stack([s["tokens.npy"].astype(np.int64) for s in samples]))
    labels = torch.tensor([int(s["cls"]) for s in samples])
    return tokens, labels


def pretrained_backbone(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as out:
        export_checkpoint(checkpoint, out)
        return load_file(str(Path(out) / "model.safetensors"))


def copy_backbone(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    """Copy tensors whose names and shapes match (the heads stay new); returns how many."""
    state = model.state_dict()
    loaded = {k: v for k, v in weights.items() if k in state and not k.startswith("heads.")
              and v.shape == state[k].shape}
    model.load_state_dict(loaded, strict=False)
    return len(loaded)


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, seq_len: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), 256):
        logits = model(tokens[i:i + 256, :seq_len], head="classify")
        correct += int((logits.argmax(-1) == labels[i:i + 256]).sum())
    model.train()
    return correct / len(labels)


def finetune(spec, *, weights, train, evalset, seed: int, steps: int) -> tuple[float, float]:
    """Train the classifier `steps` steps; returns (eval accuracy, seconds)."""
    torch.manual_seed(seed)
    model = build_model(spec.model, objective=spec.objective)
    if weights is not None:
        n = copy_backbone(model, weights)
        assert n == len(model.state_dict()) - 2, n  # everything but heads.classify.{weight,bias}
    opt = build_optimizer(model, spec.optim)
    sched = build_scheduler(opt, spec=spec.optim.schedule, max_steps=steps)
    gen = torch.Generator().manual_seed(seed)  # the same batches for both inits
    tokens, labels = train
    bs, seq_len = spec.train.micro_batch_size, spec.model.seq_len
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(labels), (bs,), generator=gen)
        logits = model(tokens[idx, :seq_len], head="classify")
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        opt.step()
        sched.step()
    return accuracy(model, *evalset, seq_len=seq_len), time.perf_counter() - start


def ngram_reference(train, evalset, *, seed: int, fraction: float = 1.0) -> float:
    """What the task allows a classic model: TF-IDF of byte 1-4-grams plus logistic regression
    (scikit-learn), on the same windows (optionally a seeded fraction of them)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    def texts(tokens: torch.Tensor) -> list[str]:
        return [bytes(t for t in row if t < 256).decode("latin-1") for row in tokens.tolist()]

    (tokens, labels), (eval_tokens, eval_labels) = train, evalset
    idx = np.random.default_rng(seed).permutation(len(labels))[: max(1, int(fraction * len(labels)))]
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), min_df=2, sublinear_tf=True, max_features=200_000)
    x = vec.fit_transform(texts(tokens[idx]))
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x, labels.numpy()[idx])
    return float((clf.predict(vec.transform(texts(eval_tokens))) == eval_labels.numpy()).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the pretraining run's checkpoint folder (run or step-N)")
    p.add_argument("--job", default="jobs/pystdlib-classify.yaml")
    p.add_argument("--data", default="data/pystdlib-packages")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reference", action="store_true",
                   help="add a TF-IDF byte n-gram + logistic regression row (scikit-learn, ~1 min per seed)")
    args = p.parse_args()
    spec = load_spec(args.job)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    weights = pretrained_backbone(args.checkpoint)
    train, evalset = load_split(Path(args.data) / "train"), load_split(Path(args.data) / "eval")
    print(f"train {len(train[1])} samples, eval {len(evalset[1])} samples, {args.steps} steps x "
          f"batch {spec.train.micro_batch_size}, lr {spec.optim.lr}", file=sys.stderr)
    results: dict[str, list[float]] = {"scratch": [], "pretrained": []}
    for seed in args.seeds:
        for init in ("scratch", "pretrained"):
            acc, secs = finetune(spec, weights=weights if init == "pretrained" else None, train=train,
                                 evalset=evalset, seed=seed, steps=args.steps)
            results[init].append(acc)
            print(f"seed {seed} {init}: eval acc {acc:.4f} ({secs:.0f}s)", file=sys.stderr)
        if args.reference:
            results.setdefault("byte n-gram TF-IDF + logistic regression", []).append(
                ngram_reference(train, evalset, seed=seed))
    print(f"\n| init | {' | '.join(f'seed {s}' for s in args.seeds)} | mean | std |")
    print(f"|---|{'---|' * len(args.seeds)}---|---|")
    for init, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {init} | {' | '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.3f} | {std:.3f} |")
    print(f"\nchance: {1 / spec.model.num_classes:.3f}; eval: {len(evalset[1])} windows from held-out files")


if __name__ == "__main__":
    main()
