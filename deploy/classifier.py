"""The classifier deployment: a registered slice classifier or ensemble answering /v1/classify for one
slice image, or for a volume cut into slices as in training and aggregated as in training. `@serve.batch`
gathers slices, from one request or several, into one model call. The answer keeps the probabilities
(`top`) and names the model's decision (`predicted`), taken at its operating point (`decision`: the
cut-off chosen on validation, or argmax for a model without one), which need not be the top class."""

import asyncio

import numpy as np
from ray import serve

from datasets.errors import UserError
from deploy.inputs import user_error
from deploy.registry import load_classifier
from deploy.reloading import Loaded, RegistryModel, configure_batching, grouped
from deploy.settings import ServeSettings
from trainers.classification.metrics import aggregate
from trainers.classification.model import kept_slices
from trainers.classification.operating_point import decide, describe


def _top(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probs)[:k]
    return [{"class": classes[i], "probability": float(probs[i])} for i in order]


def _decision(predictor, probs: np.ndarray) -> dict:
    """The predicted class of one probability vector at the predictor's operating point, and the rule."""
    point = predictor.operating_point
    k = int(decide(probs[None, :], point)[0])
    return {"predicted": predictor.classes[k], "decision": describe(point)}


@serve.deployment
class ClassifierDeployment:
    def __init__(self, settings: ServeSettings):
        self.registry = RegistryModel(settings.classifier, load_classifier, settings)
        configure_batching(self.infer, settings)

    def info(self) -> dict:
        model = self.registry.current.model
        return {
            **self.registry.current.info,
            "classes": list(model.classes),
            "decision": describe(model.operating_point),
        }

    @staticmethod
    def run(predictor, images: list[np.ndarray]) -> list[np.ndarray]:
        """One model call on slice images of one model version: each one's class probabilities."""
        return list(predictor.predict_proba(images))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def infer(self, items: list[tuple[Loaded, np.ndarray]]) -> list[np.ndarray]:
        return await asyncio.to_thread(grouped, items, self.run)

    async def classify(self, image: np.ndarray | None, volume: np.ndarray | None, top_k: int) -> dict:
        """Top-k classes of one slice image, or of a volume (its slices cut as the model's training slices
        were, classified one by one, then aggregated as in training) with each slice's top-k."""
        loaded = self.registry.current
        predictor = loaded.model
        classes = list(predictor.classes)
        models = {"classifier": loaded.ref()}
        if volume is None:
            probs = await self.infer((loaded, image))
            return {"top": _top(probs, classes, top_k), **_decision(predictor, probs), "models": models}
        try:
            kept = await asyncio.to_thread(kept_slices, predictor, volume)
        except UserError as e:
            return user_error(e)
        probs = np.stack(await asyncio.gather(*(self.infer((loaded, s.image)) for s in kept)))
        _, volume_probs = aggregate(probs, ["volume"] * len(kept), predictor.aggregate)
        return {
            "top": _top(volume_probs[0], classes, top_k),
            **_decision(predictor, volume_probs[0]),  # the cut-off was chosen on volumes like this one
            "aggregate": predictor.aggregate,
            "shape": list(volume.shape),
            "slices": [
                {"axis": s.axis, "index": s.index, "top": _top(p, classes, top_k)}
                for s, p in zip(kept, probs, strict=True)
            ],
            "models": models,
        }
