"""Generic recipe: any nnU-Net v2 raw dataset plus the user's `case_id,site[,split]` CSV."""

from __future__ import annotations

import json
from pathlib import Path

from medtta.data.layout import read_dataset_json, read_sites_csv
from medtta.data.recipes.base import Recipe, SourceCase
from medtta.errors import DataError


class NnUNetRecipe(Recipe):
    """Any nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) with a case_id,site CSV (`--sites`)."""

    name = "nnunet"
    description = "any nnU-Net v2 raw dataset plus a case_id,site[,split] CSV"

    def __init__(self, sites: str | Path | None = None) -> None:
        if sites is None:
            raise DataError("recipe 'nnunet' needs --sites CSV (columns case_id,site[,split])")
        self.sites = Path(sites)

    def find_cases(self, download: Path) -> list[SourceCase]:
        meta = read_dataset_json(download / "dataset.json")
        self.labels = {str(k): int(v) for k, v in meta["labels"].items()}
        self.channel = str(next(iter(meta["channel_names"].values())))
        if len(meta["channel_names"]) > 1:
            raise DataError(f"{download / 'dataset.json'}: medtta takes single-channel images "
                            f"(channel_names: {json.dumps(meta['channel_names'])})")
        ending = meta.get("file_ending", ".nii.gz")
        cases = []
        for row in read_sites_csv(self.sites):
            cid = row["case_id"].strip()
            case = SourceCase(cid, row["site"].strip(), (row.get("split") or "").strip() or None,
                              download / "imagesTr" / f"{cid}_0000{ending}", download / "labelsTr" / f"{cid}{ending}")
            for path in (case.image, case.label):
                if not path.is_file():
                    raise DataError(f"{path}: missing (case '{cid}' is listed in {self.sites})")
            cases.append(case)
        return cases
