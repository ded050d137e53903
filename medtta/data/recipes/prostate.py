"""Multi-site prostate T2 MRI (SAML / MS-Net release, Liu et al. 2020): official download layout.

```
<download>/            (often one extra folder after unzipping, e.g. Processed_data_nii/)
  RUNMC/Case00.nii.gz  RUNMC/Case00_segmentation.nii.gz   site A, NCI-ISBI 2013 (also named ISBI/)
  BMC/...                                                 site B, NCI-ISBI 2013 (also ISBI_1.5/; masks *_Segmentation)
  I2CVB/...  UCL/...  BIDMC/...  HK/...                   sites C-F, I2CVB and PROMISE12
```
Case numbers restart at every site, so a case id is `<site>_CaseNN`. The release has no official
train/test partition: cases get no split here and the protocol's seeded rule splits the source site.
"""

from __future__ import annotations

import re
from pathlib import Path

from medtta.data.recipes.base import Recipe, SourceCase
from medtta.data.recipes.download import find_root, nifti_index
from medtta.errors import DataError

SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
#: folder name (lower case) -> site; ISBI / ISBI_1.5 are the names in the SAML code's file lists
SITE_FOLDERS = {**{s.lower(): s for s in SITES}, "isbi": "RUNMC", "isbi_1.5": "BMC", "hcrudb": "I2CVB"}
_IMAGE = re.compile(r"case(\d+)", re.IGNORECASE)
_LABEL = re.compile(r"case(\d+)_segmentation", re.IGNORECASE)


def _site_folders(folder: Path) -> dict[str, Path]:
    """Site -> its folder among the sub-folders of `folder`; two folders for one site is an error."""
    sites: dict[str, Path] = {}
    for child in sorted(folder.iterdir()):
        site = SITE_FOLDERS.get(child.name.lower()) if child.is_dir() else None
        if site in sites:
            raise DataError(f"{child}: a second folder for site {site} (also {sites[site]}); keep one")
        if site:
            sites[site] = child
    return sites


class ProstateRecipe(Recipe):
    """Six-site prostate T2 MRI (RUNMC, BMC, I2CVB, UCL, BIDMC, HK); whole-gland label 1."""

    name = "prostate"
    description = "multi-site prostate T2 MRI of SAML / MS-Net (6 sites from NCI-ISBI 2013, I2CVB, PROMISE12)"
    labels = {"background": 0, "prostate": 1}
    channel = "T2"
    #: masks come as 0/1 or 0/255; NCI-ISBI-derived ones may keep 2 for the peripheral zone: all is prostate
    label_map = {0: 0, 1: 1, 2: 1, 255: 1}

    def find_cases(self, download: Path) -> list[SourceCase]:
        root = find_root(download, lambda p: bool(_site_folders(p)),
                         f"one folder per site ({', '.join(SITES)}) with CaseNN.nii.gz and CaseNN_segmentation.nii.gz")
        cases = []
        for site, folder in sorted(_site_folders(root).items(), key=lambda item: SITES.index(item[0])):
            cases += self._site_cases(site, folder)
        return cases

    @staticmethod
    def _site_cases(site: str, folder: Path) -> list[SourceCase]:
        images, labels = {}, {}
        for stem, path in nifti_index(folder).items():
            if m := _IMAGE.fullmatch(stem):
                images[m.group(1)] = path
            elif m := _LABEL.fullmatch(stem):
                labels[m.group(1)] = path
        if not images and not labels:
            raise DataError(f"{folder}: expected CaseNN.nii.gz and CaseNN_segmentation.nii.gz files; found none")
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise DataError(f"{folder / f'Case{orphans[0]}.nii.gz'}: missing image for label {labels[orphans[0]]}")
        cases = []
        for number, image in sorted(images.items()):
            if number not in labels:
                raise DataError(f"{folder / f'Case{number}_segmentation.nii.gz'}: missing label file for image {image}")
            cases.append(SourceCase(f"{site}_Case{number}", site, None, image, labels[number]))
        return cases
