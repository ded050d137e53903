"""A results folder written by plain nnunetv2 commands loads in medtta: the Dice of medtta's unadapted prediction
(`medtta run -m source --checkpoint <folder>`) against `nnUNetv2_predict`'s on the same target cases.

It generates a small synth-ct3d dataset (site A: 6 cases, site B: 2; the medtta layout is nnU-Net's raw layout plus
sites.csv), then runs, with nnU-Net's folder variables in a temporary folder:

    nnUNetv2_plan_and_preprocess -d 42 -c 2d -np 1 --verify_dataset_integrity
    nnUNetv2_train 42 2d 0 -tr nnUNetTrainer_1epoch -device cpu       (250 iterations of the full-size network)
    nnUNetv2_predict -i <site B images> -o <out> -d 42 -c 2d -f 0 -tr nnUNetTrainer_1epoch --disable_tta -device cpu
    medtta run -m source -d <dataset> --source-site A --target-site B --checkpoint <results folder>

and prints, per site-B case, the Dice of nnUNetv2_predict's mask and medtta's (`dice_source` of the run's case
table), and the largest difference. Measured with --configuration 3d_fullres (2 CPU cores shared with a test run,
2026-12-08): 6277 s in all (about 22 s per training iteration); Dice 0.886137 and 0.880898 from both, largest
difference 0. It installs nothing (nnunetv2 must be installed: `pip install -e ".[nnunet]"`).

    python benchmarks/nnunet_plain.py [--root /tmp/nnunet-plain] [--configuration 2d]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medtta.data.layout import read_dataset
from medtta.data.synthetic.abdomen3d import generate
from medtta.metrics import volume_dice

DATASET_ID = 42


def run(command: list[str], env: dict[str, str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/nnunet-plain"))
    parser.add_argument("--configuration", default="2d", choices=["2d", "3d_fullres"])
    args = parser.parse_args()
    if shutil.which("nnUNetv2_train") is None:
        sys.exit("nnunetv2 is not installed: pip install -e '.[nnunet]'")
    root, config = args.root.resolve(), args.configuration
    shutil.rmtree(root, ignore_errors=True)
    data = root / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_ct3d"
    generate(data, seed=1, cases={"A": 6, "B": 2}, splits={"A": [3, 1]})
    env = {**os.environ, **{k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
    trainer = "nnUNetTrainer_1epoch"
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", config, "-np", "1",
         "--verify_dataset_integrity"], env)
    run(["nnUNetv2_train", str(DATASET_ID), config, "0", "-tr", trainer, "-device", "cpu"], env)
    dataset = read_dataset(data)
    cases = dataset.cases_of("B")
    images = root / "site-B"
    images.mkdir()
    for case in cases:
        shutil.copy(case.image, images / case.image.name)
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(root / "predicted"), "-d", str(DATASET_ID), "-c", config,
         "-f", "0", "-tr", trainer, "--disable_tta", "-device", "cpu"], env)
    folder = root / "nnUNet_results" / data.name / f"{trainer}__nnUNetPlans__{config}"
    run(["medtta", "run", "-m", "source", "-d", str(data), "--source-site", "A", "--target-site", "B",
         "--checkpoint", str(folder), "--results", str(root / "medtta-results"), "-q"], env)
    table = next((root / "medtta-results" / "runs").rglob("cases-B.csv"))
    with table.open() as fh:
        ours = {row["case_id"]: float(row["dice_source"]) for row in csv.DictReader(fh)}
    print(f"\n{'case':8} {'nnUNetv2_predict':>16} {'medtta':>8}")
    differences = []
    for case in cases:
        predicted = np.asarray(nib.load(str(root / "predicted" / case.label.name)).dataobj)
        reference = np.asarray(nib.load(str(case.label)).dataobj)
        theirs = volume_dice(torch.as_tensor(predicted).long(), torch.as_tensor(reference).long(),
                             {k: v for k, v in dataset.labels.items() if v > 0})["dice"]
        differences.append(abs(theirs - ours[case.case_id]))
        print(f"{case.case_id:8} {theirs:16.6f} {ours[case.case_id]:8.6f}")
    print(f"largest Dice difference: {max(differences):.2e} over {len(cases)} cases ({config}, {trainer})")


if __name__ == "__main__":
    main()
