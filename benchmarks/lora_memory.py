"""LoRA DreamBooth beside full DreamBooth: the file each run writes and each tune's peak memory.

Each tune runs in its own ``hifi tune`` process (so that a CPU process's peak resident memory,
which cannot be reset, belongs to that tune alone), on the same ToyWorld subject, steps and
seed; the peaks are read from the runs' ``run.json`` (``peak_memory``), the sizes from their
files. On the CPU the peak includes the process's model and libraries; their difference is
what the training itself holds. Beside them, the float32 sizes on the SD 1.4 architecture,
counted from its UNet built on the meta device (no weights): every parameter for the full
file, ``rank * (in + out)`` per adapted projection for LoRA.

    python -m benchmarks.lora_memory --name lora-memory-toy-cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.report import report
from hifi.io.runs import DENOISER_FILE, LORA_FILE, RUN_FILE
from hifi.toyworld.subjects import export_dataset


def measure(subject: str = "striped_mug", steps: int = 50, rank: int = 4, backend: str = "toy") -> dict[str, Any]:
    """One full and one LoRA DreamBooth tune, each in its own process; their peaks and file sizes."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset, masks = export_dataset(Path(tmp) / "data", [subject])
        for name, extra, weights in (("full DreamBooth", [], DENOISER_FILE),
                                     (f"LoRA DreamBooth, rank {rank}", ["--lora-rank", str(rank)], LORA_FILE)):
            run_dir = Path(tmp) / name.split(",")[0].replace(" ", "-")
            subprocess.run([sys.executable, "-m", "hifi", "tune", "--subject", str(dataset / subject), "--masks",
                            str(masks / subject), "--class-name", "mug", "--out", str(run_dir), "--backend", backend,
                            "--mode", "dreambooth", "--steps", str(steps), "--samples", "0", "--quiet", *extra],
                           check=True)
            meta = json.loads((run_dir / RUN_FILE).read_text())
            rows.append({"tune": name, "file": weights, "file_bytes": (run_dir / weights).stat().st_size,
                         "peak_mb": meta["peak_memory"]["peak_mb"], "peak_what": meta["peak_memory"]["what"],
                         "lr": meta["config"]["lr"]})
    return {"backend": backend, "subject": subject, "steps": steps, "rows": rows, "sd14": sd14_sizes((rank, 16)),
            "file_ratio": rows[0]["file_bytes"] / rows[1]["file_bytes"],
            "peak_difference_mb": rows[0]["peak_mb"] - rows[1]["peak_mb"]}


def sd14_sizes(ranks: tuple[int, ...] = (4, 16)) -> dict[str, Any]:
    """Parameters and float32 MiB of the full SD 1.4 UNet and of its LoRA adapters at each rank."""
    import torch
    from diffusers import UNet2DConditionModel

    from hifi_backends.configs import load_config
    from hifi_backends.diffusers_backend import LORA_TARGETS

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_config("sd14", "unet"))
    adapted = [m for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in LORA_TARGETS)]
    full = sum(p.numel() for p in unet.parameters())
    lora = {r: r * sum(m.in_features + m.out_features for m in adapted) for r in ranks}
    return {"full_params": full, "full_mib": full * 4 / 2**20,
            "lora": [{"rank": r, "params": n, "mib": n * 4 / 2**20, "ratio": full / n} for r, n in lora.items()]}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# LoRA vs full DreamBooth on `{result['backend']}` ({result['subject']}, {result['steps']} steps,"
             " each tune in its own process)", "",
             "| tune | file | size (bytes) | peak memory (MB) | lr |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['tune']} | `{r['file']}` | {r['file_bytes']:,} | {r['peak_mb']:.1f} | {r['lr']:g} |"
              for r in result["rows"]]
    lines += ["", f"The full file is {result['file_ratio']:.0f}x the LoRA file; the full tune's peak is"
              f" {result['peak_difference_mb']:.1f} MB above LoRA's. Peak: {result['rows'][0]['peak_what']}.", "",
              "On the SD 1.4 UNet (float32, from parameter counts):", "",
              "| weights | parameters | MiB | full / this |", "| --- | ---: | ---: | ---: |",
              f"| full UNet | {result['sd14']['full_params']:,} | {result['sd14']['full_mib']:,.0f} | 1 |"]
    lines += [f"| LoRA rank {r['rank']} | {r['params']:,} | {r['mib']:.1f} | {r['ratio']:.0f} |"
              for r in result["sd14"]["lora"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", default="striped_mug")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--backend", default="toy")
    p.add_argument("--name", default=None, help="write benchmarks/results/NAME.json and NAME.md")
    args = p.parse_args(argv)
    result = measure(args.subject, args.steps, args.rank, args.backend)
    return report(result, markdown(result), args.name)


if __name__ == "__main__":
    raise SystemExit(main())
