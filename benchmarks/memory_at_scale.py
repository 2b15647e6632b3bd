"""Every rank's peak resident memory at each phase of a large GPT's life, on 2 CPU ranks.

    python benchmarks/memory_at_scale.py              # 729M parameters (peak ~7 GiB per rank, 2 ranks)
    python benchmarks/memory_at_scale.py --size ci    # ~59M, what the CI test runs

Strategies: FSDP, FSDP + CPU offload, DeepSpeed ZeRO-3, fp32 AdamW, short sequences. Phases
(runtime/phase_memory.py): init, 2 steps, checkpoint save in one pair of processes; resume,
then init_from (from the FSDP run's checkpoint), each in a fresh pair, as a restarted job or
a fine-tune starts (the strategies in turn in each, ZeRO-3 last). Each rank's VmHWM per phase
(reset before it, minus the process's resident memory before the model) against the theory:
the sharded training state
(16 bytes x params / N for FSDP: params, grads, AdamW m and v; 20 for ZeRO-3, which adds an
fp32 master copy) plus the activation estimate (runtime/activations.py). Goal: <= 1.15.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

SIZES = {  # GPT: 12 x layers x d^2 + vocab x d parameters (tied embedding)
    "750m": ["model.d_model=1536", "model.n_head=16", "model.n_layer=24", "model.vocab_size=32000"],
    "ci": ["model.d_model=640", "model.n_head=10", "model.n_layer=8", "model.vocab_size=32000"],
}
COMMON = ["tracking.enabled=false", "resources.workers=2", "model.seq_len=32", "train.micro_batch_size=2",
          "optim.grad_clip=1.0", "model.dropout=0.0"]
STRATEGIES = {"fsdp": (["strategy=fsdp"], 16), "fsdp_offload": (["strategy=fsdp_offload"], 16),
              "zero3": (["strategy=deepspeed_zero3"], 20)}  # name -> (overrides, bytes per parameter)


def specs(size: str, names: list[str], sets: tuple[str, ...] = ()) -> dict[str, str]:
    from temper.spec import load_spec, spec_to_json

    return {n: spec_to_json(load_spec("jobs/ci/tiny-gpt.yaml", [*COMMON, *SIZES[size], *STRATEGIES[n][0], *sets]))
            for n in STRATEGIES if n in names}  # FSDP first: its checkpoint is init_from's source


def run_all(texts: dict[str, str], root: str, phases: tuple[str, ...]) -> dict:
    """On each rank: every strategy's `phases`; FSDP's checkpoint is every init_from's source."""
    from temper.dist import build_dist_context
    from temper.runtime.phase_memory import measure_phases, write_source
    from temper.spec import FSDPSpec, spec_from_json

    ctx = build_dist_context(device="cpu")
    source = str(Path(root, "fsdp"))
    try:
        if "fsdp" not in texts and "init" in phases:  # no FSDP run writes the init_from source: an untrained one
            first = spec_from_json(next(iter(texts.values())))
            write_source(first.model_copy(update={"strategy": FSDPSpec()}), ctx, folder=source)
        return {name: measure_phases(spec_from_json(text), ctx, folder=str(Path(root, name)), init_from=source,
                                     phases=phases)
                for name, text in texts.items()}
    finally:
        ctx.close()


def measure(texts: dict[str, str], root: str) -> list[dict]:
    """Each rank's {strategy: {phase: peak bytes above its process's baseline}}: 2 ranks per
    process of runtime/phase_memory.PROCESSES (a resume and an init_from start fresh ones)."""
    from tests.distributed.spawn import run_ranks

    from temper.runtime.phase_memory import PROCESSES

    results = [{name: {} for name in texts} for _ in range(2)]
    for phases in PROCESSES:
        for rank, got in enumerate(run_ranks(run_all, 2, texts, root, phases)):
            for name, peaks in got.items():
                results[rank][name] = {**peaks, **results[rank][name]}  # the first process's base
    return results


def theory(text: str, name: str, world: int = 2) -> tuple[int, int]:
    """(parameters, theory bytes per rank)."""
    import torch

    from temper.models import build_model
    from temper.runtime.activations import estimate_activations
    from temper.spec import spec_from_json

    spec = spec_from_json(text)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(spec.model, objective=spec.objective).parameters())
    act = estimate_activations(spec)
    return params, STRATEGIES[name][1] * params // world + (act.peak if act else 0)


def table(results: list[dict], texts: dict[str, str]) -> list[str]:
    from temper.runtime.phase_memory import PHASES

    lines = ["| strategy | rank | theory (GiB) | " + " | ".join(PHASES) + " |",
             "|---|---|---|" + "---|" * len(PHASES)]
    for name, text in texts.items():
        params, bound = theory(text, name)
        for rank, res in enumerate(results):
            cells = [f"{res[name][p] / 2**30:.2f} ({res[name][p] / bound:.2f}x)" for p in PHASES]
            lines.append(f"| {name} ({params / 1e6:.0f}M) | {rank} | {bound / 2**30:.2f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="750m")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a job spec override for every strategy, e.g. resources.malloc_mmap_threshold_kib=null")
    args = parser.parse_args()
    names = args.strategies.split(",")
    if unknown := set(names) - set(STRATEGIES):
        parser.error(f"--strategies: unknown {sorted(unknown)}; choose from {list(STRATEGIES)}")
    texts = specs(args.size, names, tuple(args.set))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as root:
        results = measure(texts, root)
    print("peak resident memory above the process baseline, GiB (ratio to theory)")
    print("\n".join(table(results, texts)))
    print(f"wall {time.monotonic() - t0:.0f} s; baseline RSS per rank (GiB):", [round(r[next(iter(texts))]["base"] / 2**30, 2) for r in results])


if __name__ == "__main__":
    main()
