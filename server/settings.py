"""The run config, read once into typed fields (kebab-case keys in pyproject)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class RunSettings:
    task: str = "oncology"
    endpoint: str = "survival"
    model: str = "linear"
    strategy: str = "fedavg"
    num_server_rounds: int = 5
    local_epochs: int = 2
    local_steps: int = 0
    batch_size: int = 64
    lr: float = 0.01
    server_lr: float = 0.1
    proximal_mu: float = 0.1
    seed: int = 42
    data_root: str = ""
    mlflow_uri: str = ""
    mlflow_experiment: str = "fedhosp"
    min_nodes: int = 2
    round_timeout: float = 3600.0

    @classmethod
    def from_run_config(cls, run_config: dict) -> "RunSettings":
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in known:
                default = getattr(cls, name)
                values[name] = type(default)(value)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        from models.oncology import ENDPOINTS, MODELS

        if self.task != "oncology":
            raise ValueError(f"run-config task={self.task!r} is not available; use 'oncology'")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"run-config endpoint={self.endpoint!r}; choose one of {ENDPOINTS}")
        if self.model not in MODELS:
            raise ValueError(f"run-config model={self.model!r}; choose one of {MODELS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"run-config strategy={self.strategy!r}; choose one of {STRATEGIES}")
        if self.num_server_rounds < 1:
            raise ValueError("run-config num-server-rounds must be at least 1")
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ValueError("run-config needs local-epochs >= 1 or local-steps >= 1")
        if self.batch_size < 2:
            raise ValueError("run-config batch-size must be at least 2 (a Cox risk set needs pairs)")

    def as_params(self) -> dict[str, object]:
        """The whole run config under its kebab-case keys, for MLflow params."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}
