"""The GPU figures in one run (under 8 minutes on one H100 or H200): the fixed-cost breakdown of a cached run on
CUDA, the synth-mri grid of every method on CUDA (recovery, seconds per volume, cost ratio to unadapted inference,
peak memory), and sam-vit-b at 1024 px (random weights in SAM's key format) in fp32 vs bf16: ms per slice, peak
memory and how far the bf16 prediction is from fp32's. Prints figures; asserts nothing.

    python benchmarks/gpu.py [--results DIR] [--methods all] [--slices 16]

(`--device cpu` runs the same steps on the CPU, to try the script where there is no GPU.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from precision import parent_metrics  # benchmarks/ is the script's folder

from medtta.bench import BenchConfig, bench, select_methods, select_protocols
from medtta.engine import RunConfig, peak_memory_mb, reset_peak_memory, resolve_device, timed
from medtta.metrics import volume_dice
from medtta.models import build_network
from medtta.models.sam import SPECS, build_sam
from medtta.precision import autocast
from medtta.report import format_table

PROTOCOL = "synth-mri"


def fixed_cost(results: Path, device: str) -> None:
    script = Path(__file__).with_name("fixed_cost.py")
    subprocess.run([sys.executable, str(script), "--dataset", PROTOCOL, "--device", device, "--results", str(results)],
                   check=True)


def grid(results: Path, methods: str, device: str) -> None:
    chosen = select_methods(methods)
    run = RunConfig(method="source", device=device, results=results)
    outcome = bench(BenchConfig(chosen, select_protocols(PROTOCOL), run=run), echo=print)
    print(f"\n{PROTOCOL} on {device}: source models {outcome.prepare_seconds:.0f} s, "
          f"cells {outcome.cells_seconds:.0f} s")
    metrics = parent_metrics(results, PROTOCOL)
    shown = (("dice_recovery", ".3f"), ("seconds_per_volume", ".3f"), ("cost_ratio", ".1f"), ("peak_memory_mb", ".0f"))
    rows = [[m, *(f"{metrics[(m, 'fp32')][k]:{f}}" for k, f in shown)] for m in chosen if (m, "fp32") in metrics]
    print(format_table(["method", "recovery", "s/volume", "cost ratio", "peak MB"], rows))


def random_sam_checkpoint(folder: Path, n_classes: int) -> Path:
    """sam-vit-b at random weights, saved as SAM's own state dict (nothing is downloaded)."""
    torch.manual_seed(0)
    path = folder / "sam_vit_b_random.pth"
    torch.save(build_sam(SPECS["vit-b"], 1024, n_classes).state_dict(), path)
    return path


@torch.no_grad()
def sam_precisions(folder: Path, n_slices: int, device: torch.device, batch: int = 4) -> None:
    model = build_network("sam-vit-b", 1, 4, checkpoint=str(random_sam_checkpoint(folder, 4))).to(device).eval()
    x = torch.randn(n_slices, 1, 256, 256, generator=torch.Generator().manual_seed(1)).to(device)
    labels, rows = {}, []
    for precision in ("fp32", "bf16"):
        with autocast(precision, device):
            model(x[:batch])  # warm-up: kernels chosen, memory pools filled
            reset_peak_memory(device)
            logits, seconds = timed(lambda: torch.cat([model(b) for b in torch.split(x, batch)]), device)
        labels[precision] = logits.float().argmax(1).cpu()
        rows.append([precision, f"{1000 * seconds / n_slices:.1f}", f"{peak_memory_mb(device):.0f}"])
    agreement = volume_dice(labels["bf16"], labels["fp32"], {"background": 0, "a": 1, "b": 2, "c": 3})["dice"]
    print(f"\nsam-vit-b at 1024 px, random weights, {n_slices} slices in batches of {batch} "
          f"(Dice of the bf16 labels against fp32's: {agreement:.4f})")
    print(format_table(["precision", "ms/slice", "peak MB"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="results dir (default: a new one)")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    device = resolve_device(args.device)  # fails without CUDA
    print(torch.cuda.get_device_name() if device.type == "cuda" else "CPU", f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        results = args.results or Path(tmp)
        grid(results, args.methods, args.device)  # trains the source models fixed_cost then finds cached
        fixed_cost(results, args.device)
        sam_precisions(Path(tmp), args.slices, device)


if __name__ == "__main__":
    main()
