"""Export a registered detector or slice classifier as a TorchScript or ONNX file, with a JSON beside it
(classes, input size, preprocessing, thresholds, model name/version/run, software versions), for running
it outside Python: ONNX Runtime (C++, C#, Java, JavaScript, ...) or libtorch.

    python -m platform.export --model models:/nuclei@champion --format onnx --out exported/nuclei.onnx
    python -m platform.export --model models:/adrenal/3 --format torchscript --out exported/adrenal.pt
    python -m platform.export --model .ray_results/RUN/checkpoint_000049 --format onnx --out model.onnx

--out gets the model; --out + ".json" the description of its inputs and outputs (nuclei.onnx.json), both
written atomically. The detector file takes one image of any size (3 x H x W float in [0, 1], after the
model's `normalize` mode) and resizes it inside, as PyTorch does; the JSON says what stays outside the graph
(tiling for models trained on tiles, class score thresholds, minimum mask area, mask threshold, TTA).
What works and what fails with this torch/torchvision, and why: deploy/export.py. A mistake in the command
(no such model, an ensemble, unknown format, --out not writable) is one `error:` line (exit 2).
"""

import argparse
import tempfile
from pathlib import Path

from datasets.errors import UserError
from platform import _cli

# torch, MLflow and the model code are imported inside the functions that use them: --help answers at once.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m platform.export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--model", required=True, help="models:/NAME@alias, models:/NAME/VERSION, or a folder")
    p.add_argument("--format", required=True, help="torchscript or onnx")
    p.add_argument("--out", required=True, help="the model file to write (its JSON: the same name + .json)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or .mlflow/)")
    return p


def output_file(value: str) -> Path:
    """--out, checked before any model is loaded: not a folder, and its folder (created) writable."""
    out = Path(value).expanduser()
    if out.is_dir():
        raise UserError(f"--out: {out} is a folder; give the file to write, e.g. {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise UserError(f"--out: cannot write in {out.parent} ({e.strerror or e})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deploy.export import check_format, export_model, sidecar

    check_format(args.format)
    out = output_file(args.out)
    folder = _cli.model_folder(args.model, args.tracking_uri)
    meta = export_model(folder, args.format, out, args.model)
    model = meta["model"]
    version = f" (version {model['version']})" if model["version"] else ""
    print(f"{meta['kind']} {args.model}{version} -> {out} ({args.format}, {meta['bytes'] / 2**20:.1f} MiB)")
    print(f"inputs, outputs, preprocessing, thresholds: {sidecar(out)}")
    if meta["kind"] == "detector" and meta["preprocessing"]["tile_size"]:
        print(
            f"note: trained on {meta['preprocessing']['tile_size']} px tiles; run it tile by tile (the JSON)"
        )
    if meta["kind"] == "detector" and meta["postprocessing"]["tta"] != "off":
        print(f"note: its test-time augmentation ({meta['postprocessing']['tta']}) is not in the file")
    return 0


if __name__ == "__main__":
    _cli.run(main)
