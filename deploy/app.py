"""The Ray Serve application, built from its parts: a detector deployment (deploy/detector.py), a
classifier deployment (deploy/classifier.py), a matcher deployment (deploy/matcher.py) and the HTTP
ingress with the page (deploy/ingress.py), as ServeSettings (deploy/settings.py) ask.
`python -m platform.serve` starts it; so does a Serve config file:

    serve run deploy/serve.yaml        # from the repository root; `serve deploy` for a running cluster

Models load in `__init__` from the MLflow registry, pinned to the version their alias names at start;
with `reload_on_alias` a thread follows the alias and swaps in a new version once it is loaded, so no
request is dropped (deploy/reloading.py). `@serve.batch` gathers detector tiles and classifier slices,
from one request or several, into one model call.
"""

from deploy.classifier import ClassifierDeployment
from deploy.detector import DetectorDeployment
from deploy.ingress import Ingress
from deploy.library import library_paths
from deploy.matcher import MatcherDeployment
from deploy.registry import resolve_registered
from deploy.reloading import use_registry
from deploy.settings import ServeSettings, settings_from


def check_models(settings: ServeSettings) -> dict[str, tuple[str, str]]:
    """{role: (name, version)} of the models to serve; a UserError for one the registry lacks or for a
    library folder without volumes."""
    if settings.library:
        library_paths(settings.library)
    use_registry(settings.tracking_uri)
    return {
        role: resolve_registered(uri)
        for role, uri in (("detector", settings.detector), ("classifier", settings.classifier))
        if uri
    }


def application(settings: ServeSettings):
    check_models(settings)  # before any replica starts: a missing model is one clear error
    model_options = {
        "ray_actor_options": {"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
        # enough requests in a replica at once to fill a batch of slices
        "max_ongoing_requests": max(16, 2 * settings.max_batch_size),
    }
    detector = classifier = matcher = None
    if settings.library:
        # No CPU reserved: a query takes about half a second of one core, now and then; reserving a core
        # would leave a 2-core laptop unable to place the two model replicas.
        matcher = MatcherDeployment.options(ray_actor_options={"num_cpus": 0}).bind(settings)
    if settings.detector:
        detector = DetectorDeployment.options(num_replicas=settings.detector_replicas, **model_options)
        detector = detector.bind(settings)
    if settings.classifier:
        classifier = ClassifierDeployment.options(num_replicas=settings.classifier_replicas, **model_options)
        classifier = classifier.bind(settings)
    return Ingress.bind(detector, classifier, matcher, settings)


def build_app(args: dict):
    """Serve's application builder (`import_path: deploy.app:build_app`); `args` are ServeSettings fields."""
    return application(settings_from(args))
