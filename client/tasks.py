"""What differs between tasks on a node: which data, which model, which loop.

The ClientApp handlers stay task-agnostic; each task knows how to find its
demo site, load and describe its data, and train and evaluate on it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client import hardware
from models.metrics import Predictions
from client.site import Site
from models.home import fedhosp_home
from models.builders import DEFAULT_MODEL, build_model

if TYPE_CHECKING:
    from torch import nn

    from client import train as local


def _local():
    """The training loops (torch): imported by the messages that compute, not by the site check."""
    from client import train

    return train


class OncologyTask:
    unit = "patients"

    def __init__(self, run_config: dict, node_config: dict):
        self.node_config = node_config
        self.endpoint = str(run_config.get("endpoint", "survival"))
        self.model = str(run_config.get("model") or DEFAULT_MODEL["oncology"])
        self.seed = int(run_config.get("seed", 42))
        self.features = [c.strip() for c in str(run_config.get("features", "")).split(",") if c.strip()]
        self.private = bool(run_config.get("dp", False))

    def demo_site(self, pid: int, count: int) -> Site:
        from client.data import demo

        region = demo.regions(count, self.seed)[pid]
        folder = fedhosp_home() / "demo" / f"oncology-seed{self.seed}" / region.name
        demo.write_site(folder, region, self.seed)
        return Site(region.name, folder)

    def load(self, site: Site, validation: bool = False):
        from client.data.tabular import load_cohort

        return load_cohort(site.folder, site.name, self.endpoint, self.seed, validation, self.features or None)

    def describe(self, data) -> tuple[list[str], dict[str, float]]:
        return list(data.features), {"skipped-rows": sum(data.skipped.values())}

    def fingerprint(self, site: Site, data) -> str:
        """SHA-256 of cohort.csv: tells later whether the data changed, names nothing."""
        from client.data.tabular import cohort_fingerprint

        return cohort_fingerprint(site.folder)

    def build(self, data) -> nn.Module:
        hardware.configure(self.node_config)  # threads (the tiny oncology models stay on the CPU)
        return build_model("oncology", self.model, endpoint=self.endpoint, num_features=len(data.features),
                           private=self.private)

    def privacy_units(self, data) -> int:
        """The rows DP-SGD samples from, one per patient."""
        return len(data.train)

    def train(self, model, data, cfg: local.TrainSettings, server_round: int, site: str) -> dict[str, float]:
        return _local().train_tabular(model, data.train, self.endpoint, cfg, server_round, site)

    def evaluate(self, model, data) -> dict[str, float]:
        return _local().evaluate_tabular(model, data.test, self.endpoint)

    def predictions(self, model, data) -> Predictions:
        """The test split with the model's outputs, for validation (stays on the node)."""
        local = _local()
        return local.tabular_predictions(local.predict(model, data.test.x), data.test, self.endpoint)


class RadiologyTask:
    unit = "images"

    def __init__(self, run_config: dict, node_config: dict):
        self.target = str(run_config.get("target", "kl-grade"))
        self.model = str(run_config.get("model") or DEFAULT_MODEL["radiology"])
        self.image_size = int(run_config.get("image-size", 64))
        self.seed = int(run_config.get("seed", 42))
        self.private = bool(run_config.get("dp", False))
        cache = node_config.get("cache-dir")
        self.cache_dir = Path(str(cache)) if cache else None
        self.node_config = node_config
        self.device = "cpu"  # until build() resolves node config device (auto | cpu | cuda)

    def demo_site(self, pid: int, count: int) -> Site:
        from client.data import radiology_demo

        region = radiology_demo.radiology_regions(count, self.seed)[pid]
        folder = fedhosp_home() / "demo" / f"radiology-seed{self.seed}" / region.name
        radiology_demo.write_radiology_site(folder, region, self.seed)
        return Site(region.name, folder)

    def load(self, site: Site, validation: bool = False):
        from client.data.dicom import load_radiology_site
        from client.data.pacs import synced_images

        images = synced_images(site.folder, site.name, self.node_config, self.cache_dir)  # None: a folder site
        return load_radiology_site(site.folder, site.name, image_size=self.image_size, seed=self.seed,
                                   target=self.target, cache_dir=self.cache_dir, validation=validation,
                                   images=images)

    def describe(self, data) -> tuple[list[str], dict[str, float]]:
        return [], {"skipped-rows": sum(data.skipped.values())}

    def fingerprint(self, site: Site, data) -> str:
        return data.fingerprint  # over the used files' content hashes and labels.csv

    def build(self, data) -> nn.Module:
        self.device = hardware.configure(self.node_config).device  # node config device / threads
        return build_model("radiology", self.model, target=self.target, image_size=self.image_size,
                           private=self.private)

    def privacy_units(self, data) -> int:
        """Patients, not images: under dp a round trains on one image of each (client/train.py)."""
        return len(np.unique(data.train.patients))

    def train(self, model, data, cfg: local.TrainSettings, server_round: int, site: str) -> dict[str, float]:
        return _local().train_images(model, data.train, dataclasses.replace(cfg, device=self.device), server_round, site)

    def evaluate(self, model, data) -> dict[str, float]:
        return _local().evaluate_images(model, data.test, self.target, self.device)

    def predictions(self, model, data) -> Predictions:
        """The test split with the class probabilities (or P(referral)), for validation (stays on the node)."""
        local = _local()
        return local.image_predictions(local.predict(model, data.test.images, device=self.device), data.test,
                                       self.target)


TASKS = {"oncology": OncologyTask, "radiology": RadiologyTask}


def task_for(run_config: dict, node_config: dict):
    name = str(run_config.get("task", "oncology"))
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}")
    return TASKS[name](run_config, node_config)
