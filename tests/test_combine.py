"""Test-time augmentation and the mask-vote ensemble (trainers/detection/combine.py): TTA of a detector that
is equivariant by construction finds what it finds without TTA, the mask vote of hand-made members gives
the hand-computed masks and scores, members must share their input, and an ensemble of two checkpoints
built by `platform.ensemble` registers in MLflow, loads with deploy.registry.load_detector and predicts
through the one inference path."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from datasets.errors import UserError
from tests.helpers import ThresholdDetector, mlflow_uris_restored, random_checkpoint, sample_subset
from trainers.detection.combine import (
    MaskVoteEnsemble,
    TTAModel,
    check_folders,
    mask_boxes,
    merge_instances,
    with_tta,
)


def blobs(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A 3 x H x W image in [0, 1] of smooth random blobs (irregular shapes, distinct mean intensities)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random((height, width)), 2.0)
    field = (field - field.min()) / (field.max() - field.min())
    return torch.from_numpy(field).float().expand(3, height, width).clone()


def assert_same_instances(ours: dict, theirs: dict, soft: bool = True) -> None:
    assert len(ours["scores"]) == len(theirs["scores"]) > 0
    assert torch.equal(ours["masks"] >= 0.5, theirs["masks"] >= 0.5)
    if soft:  # the mask vote answers vote fractions, which binarise to the same masks
        assert torch.allclose(ours["masks"], theirs["masks"], atol=1e-6)
    assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-6)
    assert torch.equal(ours["labels"], theirs["labels"])
    assert torch.equal(ours["boxes"], theirs["boxes"])


@pytest.mark.parametrize("mode", ["flips", "flips+rot90"])
@pytest.mark.parametrize("shape", [(40, 40), (36, 52)])
def test_tta_of_an_equivariant_detector_finds_the_same_instances(mode, shape):
    detector = ThresholdDetector()
    image = blobs(*shape)
    plain = detector([image])[0]
    augmented = with_tta(detector, mode)
    assert isinstance(augmented, TTAModel) and with_tta(detector, "off") is detector
    # a new mode replaces the model's TTA, never wraps it: TTA of TTA would predict each image 4-64 times
    assert with_tta(augmented, "off") is detector and with_tta(augmented, "flips+rot90").model is detector
    assert_same_instances(augmented([image, blobs(*shape, seed=1)])[0], plain)
    # the stand-in for roi_heads caps the merged output and passes the cap on
    augmented.roi_heads.detections_per_img = 2
    assert detector.roi_heads.detections_per_img == 2 and len(augmented([image])[0]["scores"]) == 2


def test_tta_of_a_detector_that_is_not_equivariant_differs():
    """A detector that sees only the left half: its flipped views find other blobs, so TTA must differ
    (the test above could not pass by never mapping anything back)."""

    class LeftHalf(ThresholdDetector):
        def detect(self, grey):
            return super().detect(torch.where(torch.arange(grey.shape[1]) < grey.shape[1] // 2, grey, 0))

    detector, image = LeftHalf(), blobs(40, 40)
    merged = TTAModel(detector, "flips")([image])[0]
    plain = detector([image])[0]
    assert not (
        len(merged["scores"]) == len(plain["scores"]) and torch.allclose(merged["scores"], plain["scores"])
    )


def output(masks: list[np.ndarray], scores: list[float], labels: list[int], inside=0.9, outside=0.2) -> dict:
    binary = torch.from_numpy(np.stack(masks)).bool()
    return {
        "boxes": mask_boxes(binary),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels),
        "masks": torch.where(binary, inside, outside)[:, None],
    }


def box(rows: slice, cols: slice, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


def test_mask_vote_of_hand_made_members():
    a1, a2 = box(slice(0, 4), slice(0, 4)), box(slice(5, 8), slice(5, 8))
    b1 = box(slice(0, 4), slice(0, 3))  # IoU 12/16 with a1
    b2 = box(slice(5, 8), slice(7, 8))  # IoU 3/9 with a2: not matched, its own group
    b3 = box(slice(0, 2), slice(6, 8))  # nobody else: one vote of three
    c1 = box(slice(1, 4), slice(0, 4))  # IoU 12/16 with a1
    members = [
        output([a1, a2], [0.9, 0.6], [1, 2]),
        output([b1, b2, b3], [0.7, 0.5, 0.4], [1, 1, 1]),
        output([c1, a2], [0.8, 0.3], [2, 1]),
    ]
    merged = merge_instances(members, vote=True)
    first = box(slice(0, 4), slice(0, 4))
    first[0, 3] = False  # only a1 has it
    assert torch.equal(merged["masks"][:, 0] >= 0.5, torch.from_numpy(np.stack([first, a2])))
    assert torch.allclose(merged["scores"], torch.tensor([(0.9 + 0.7 + 0.8) / 3, (0.6 + 0.3) / 3]))
    assert merged["labels"].tolist() == [1, 2]  # majority; a tie goes to the better member (a2 0.6 > 0.3)
    assert merged["boxes"].tolist() == [[0, 0, 4, 4], [5, 5, 8, 8]]
    assert torch.allclose(merged["masks"][0, 0, 0, :4], torch.tensor([2, 2, 2, 1]) / 3)  # vote fractions
    # the TTA flavour averages soft masks, b (which missed a2) counting as zeros, not as its background
    soft = merge_instances(members, vote=False)
    assert torch.allclose(soft["masks"][1, 0, 5:, 5:], torch.tensor((0.9 + 0 + 0.9) / 3))
    assert torch.allclose(soft["masks"][1, 0, 0, 0], torch.tensor((0.2 + 0 + 0.2) / 3))


class FixedOutput(torch.nn.Module):
    """A detection model that answers every image with one fixed output."""

    def __init__(self, out: dict):
        super().__init__()
        self.out = out

    def forward(self, images):
        return [dict(self.out) for _ in images]


def test_the_vote_binarises_each_member_at_its_own_mask_threshold():
    # one object: pixels at 0.9 in both members' soft masks, a rim at 0.6 (above 0.5, below 0.7)
    core, rim = box(slice(2, 5), slice(2, 5)), box(slice(1, 6), slice(1, 6))
    soft = torch.from_numpy(np.where(core, 0.9, np.where(rim, 0.6, 0.0))).float()[None, None]
    out = {
        "boxes": torch.tensor([[1.0, 1, 6, 6]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([1]),
    }
    member = FixedOutput({**out, "masks": soft})
    image = torch.zeros(3, 8, 8)
    at = {t: MaskVoteEnsemble([member, member], [t, t])([image])[0]["masks"][0, 0] >= 0.5 for t in (0.5, 0.7)}
    assert torch.equal(at[0.5], torch.from_numpy(rim)) and torch.equal(at[0.7], torch.from_numpy(core))
    # members that disagree: the rim has one vote of two, which is half, so it stays
    mixed = MaskVoteEnsemble([member, member], [0.5, 0.7])([image])[0]["masks"][0, 0]
    assert torch.equal(mixed >= 0.5, torch.from_numpy(rim)) and torch.allclose(mixed[1, 1], torch.tensor(0.5))


def test_predict_image_binarises_masks_at_the_configs_mask_threshold():
    from pycocotools import mask as mask_utils

    from trainers.config import MaskRCNNConfig, apply_overrides
    from trainers.detection.inference import predict_image

    core, rim = box(slice(2, 5), slice(2, 5)), box(slice(1, 6), slice(1, 6))
    soft = torch.from_numpy(np.where(core, 0.9, np.where(rim, 0.6, 0.0))).float()[None, None]
    model = FixedOutput(
        {"boxes": torch.tensor([[1.0, 1, 6, 6]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}
        | {"masks": soft}
    )
    image = np.zeros((8, 8, 3), np.uint8)
    for threshold, expected in ((0.5, rim), (0.7, core)):
        cfg = MaskRCNNConfig(mask_threshold=threshold)
        [result] = predict_image(model, image, "cpu", cfg=cfg, categories=[{"id": 1, "name": "x"}])
        assert np.array_equal(mask_utils.decode(result["segmentation"]).astype(bool), expected), threshold
    with pytest.raises(UserError, match=r"mask_threshold: expected a value in \(0, 1\)"):
        apply_overrides(MaskRCNNConfig(), {"mask_threshold": 1.0}, "test")


def test_an_ensemble_of_one_member_is_the_member():
    detector, image = ThresholdDetector(), blobs(36, 52)
    assert_same_instances(MaskVoteEnsemble([detector])([image])[0], detector([image])[0], soft=False)


def write_member(folder, **fields) -> None:
    """A checkpoint folder whose config and categories are real and whose weights are not: the members'
    check must answer before any weights load."""
    from trainers.config import MaskRCNNConfig, write_json

    folder.mkdir()
    write_json(MaskRCNNConfig(**fields), folder / "config.json")
    (folder / "categories.json").write_text(json.dumps([{"id": 1, "name": "nucleus"}]))
    (folder / "model.pt").write_text("not weights")


def test_members_must_share_their_input(tmp_path):
    write_member(tmp_path / "a", normalize="range")
    write_member(tmp_path / "b", normalize="percentile")
    write_member(tmp_path / "c", normalize="range", tile_size=128)
    with pytest.raises(UserError, match="members differ in normalize: A has 'range', B has 'percentile'"):
        check_folders([tmp_path / "a", tmp_path / "b"], ["A", "B"])
    with pytest.raises(UserError, match="members differ in tile_size"):
        check_folders([tmp_path / "a", tmp_path / "c"])


def test_ensemble_cli_registers_a_detector_that_loads_and_predicts(tmp_path, capsys):
    import mlflow

    from deploy.registry import load_detector, own_mode, predict_image
    from platform.ensemble import main
    from trainers.detection import inference
    from trainers.detection.combine import save_ensemble
    from trainers.detection.model import load_checkpoint_model
    from trainers.detection.train import config_split

    data = sample_subset(tmp_path / "data", 4)
    members = [random_checkpoint(tmp_path / f"member{seed}", data, seed) for seed in (0, 1)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_uris_restored():
        args = ["--models", *map(str, members), "--method", "mask-vote", "--register-as", "ens"]
        assert main([*args, "--tracking-uri", uri]) == 0
        printed = capsys.readouterr().out
        assert "registered model: name=ens version=1 alias=champion (first champion)" in printed
        table = printed.split("tta off, on the members' validation images")[1].splitlines()
        assert table[2].startswith("ensemble") and table[4].startswith(str(members[1]))
        assert "ensemble vs best member (" in printed

        detector = load_detector("models:/ens@champion", "cpu")
        assert isinstance(detector.model, MaskVoteEnsemble) and detector.version == "1"
        image = inference.open_image(config_split(detector.config)[1][0].image_path)
        results = inference.predict_image(detector.model, image, "cpu", **own_mode(detector))
        expected = MaskVoteEnsemble([load_checkpoint_model(m)[0] for m in members])
        assert results and results == inference.predict_image(expected, image, "cpu", **own_mode(detector))
        answer = mlflow.pyfunc.load_model("models:/ens@champion").predict([image])[0]
        assert np.allclose(answer["scores"], predict_image(detector, image)["scores"])
    # TTA on top of the ensemble, from the ensemble's own tta
    composed = load_detector(str(save_ensemble(tmp_path / "tta", members, tta="flips+rot90")), "cpu")
    assert composed.config.tta == "flips+rot90" and isinstance(composed.model, TTAModel)
    assert isinstance(composed.model.model, MaskVoteEnsemble) and len(composed.model.model.members) == 2
