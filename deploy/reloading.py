"""What the two model deployments share: the served version of one registered model, loaded in the
replica from the MLflow registry and, with `reload_on_alias`, swapped for the version its alias names
later without dropping a request; and a `@serve.batch` batch run once per model version it holds."""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
import torch

from deploy.registry import resolve_registered, version_info
from deploy.settings import ServeSettings

log = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log and the console


def use_registry(uri: str) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@dataclass(frozen=True)
class Loaded:
    version: str
    model: Any  # deploy.registry.Detector, or a SliceClassifier / Ensemble
    info: dict  # deploy.registry.version_info + the URI served

    def ref(self) -> dict:
        """Which model answered, as each response names it."""
        return {"name": self.info["name"], "version": self.version}


class RegistryModel:
    """The served version of one registered model, loaded from the registry of `settings.tracking_uri`;
    with `settings.reload_on_alias`, a thread checks the alias every `reload_interval_s` and swaps in the
    version it names once that is loaded."""

    def __init__(self, uri: str, load: Callable[[str], Any], settings: ServeSettings):
        use_registry(settings.tracking_uri)
        self.uri, self._load = uri, load
        self.current = self._fetch(*resolve_registered(uri))
        if settings.reload_on_alias and "@" in uri:
            threading.Thread(target=self._follow, args=(settings.reload_interval_s,), daemon=True).start()

    def _fetch(self, name: str, version: str) -> Loaded:
        model = self._load(f"models:/{name}/{version}")
        return Loaded(version, model, {**version_info(name, version), "uri": self.uri})

    def _follow(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            try:
                name, version = resolve_registered(self.uri)
                if version != self.current.version:
                    old = self.current.version
                    self.current = self._fetch(name, version)  # one assignment: requests see old or new
                    log.warning("%s: now serving version %s (was %s)", self.uri, version, old)
            except Exception:  # a registry hiccup must not stop serving: keep the current version
                log.exception(
                    "%s: checking the alias failed; still serving version %s", self.uri, self.current.version
                )


def configure_batching(method, settings: ServeSettings) -> None:
    """A deployment's `@serve.batch` method sized by the settings (the decorator's values are defaults)."""
    method.set_max_batch_size(settings.max_batch_size)
    method.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)


@torch.inference_mode()
def grouped(items: list[tuple[Loaded, Any]], run: Callable[[Any, list], list]) -> list:
    """run(model, inputs) once per model version among the batch's items (a reload can put two in one
    batch), results back in the items' order."""
    out: list = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (loaded, _) in enumerate(items):
        groups.setdefault(id(loaded), []).append(i)
    for indices in groups.values():
        model = items[indices[0]][0].model
        for i, result in zip(indices, run(model, [items[i][1] for i in indices]), strict=True):
            out[i] = result
    return out
