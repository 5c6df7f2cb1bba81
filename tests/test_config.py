import pytest

from datasets.errors import UserError
from search_spaces import SPACES, default_recipe, get_space, sample
from trainers.config import MaskRCNNConfig, apply_overrides, from_dict, parse_overrides, to_dict
from trainers.recipes import RECIPES, get_recipe


def test_strings_are_parsed_by_field_type():
    cfg = apply_overrides(
        MaskRCNNConfig(),
        parse_overrides(
            [
                "lr=0.005",
                "epochs=3",
                "anchor_sizes=(8, 16,32,64,128)",
                "aspect_ratios=[0.5,1]",
                "optimizer=adamw",
            ]
        ),
    )
    assert cfg.lr == 0.005 and cfg.epochs == 3 and cfg.optimizer == "adamw"
    assert cfg.anchor_sizes == (8, 16, 32, 64, 128) and cfg.aspect_ratios == (0.5, 1.0)


def test_typed_values_pass_and_wrong_types_fail():
    assert apply_overrides(MaskRCNNConfig(), {"lr": 1, "lr_steps": [3, 5]}).lr_steps == (3, 5)
    with pytest.raises(UserError, match="'epochs' expects an integer"):
        apply_overrides(MaskRCNNConfig(), {"epochs": True})
    with pytest.raises(UserError, match="'backbone' expects a string"):
        apply_overrides(MaskRCNNConfig(), {"backbone": 3})


def test_semantic_checks_name_the_field():
    with pytest.raises(UserError, match="anchor_sizes: expected 5 sizes"):
        apply_overrides(MaskRCNNConfig(), {"anchor_sizes": "8,16"})
    with pytest.raises(UserError, match="rpn_nms_thresh"):
        apply_overrides(MaskRCNNConfig(), {"rpn_nms_thresh": "1.5"})
    with pytest.raises(UserError, match="rpn_bg_iou_thresh"):
        apply_overrides(MaskRCNNConfig(), {"rpn_bg_iou_thresh": 0.8, "rpn_fg_iou_thresh": 0.7})


def test_round_trip_through_a_dict():
    cfg = get_recipe("dsb2018_demo")
    assert from_dict(MaskRCNNConfig, to_dict(cfg), "test") == cfg


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_valid(name):
    get_recipe(name).validate()


def test_recipe_file(tmp_path):
    path = tmp_path / "best.yaml"
    path.write_text("backbone: resnet18_fpn\nanchor_sizes: [8, 16, 32, 64, 128]\nlr: 0.001\n")
    cfg = get_recipe(str(path))
    assert cfg.anchor_sizes == (8, 16, 32, 64, 128) and cfg.lr == 0.001
    path.write_text("lr: [unclosed\n")
    with pytest.raises(UserError, match="best.yaml"):
        get_recipe(str(path))


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_space_samples_valid_configs(name):
    space = get_space(name)
    base = get_recipe(default_recipe(name))
    fields = set(type(base).__dataclass_fields__)
    seen: dict[str, set] = {}
    for seed in range(20):
        # search-only names (class_score_thresh.0, joined into a field by the space) are not fields
        values = {k: v for k, v in sample(space, seed, categories=("a", "b")).items() if "." not in k}
        assert values and set(values) <= fields, set(values) - fields
        cfg = apply_overrides(base, values, source=f"space {name}")
        cfg.validate()
        for key, value in values.items():
            got = getattr(cfg, key)  # tuple fields are sampled as "a,b,c" strings
            assert got == value or isinstance(got, tuple) and got, (key, value, got)
            seen.setdefault(key, set()).add(str(value))
    assert any(len(v) > 1 for v in seen.values())  # the samples vary


def test_unknown_space_lists_valid_names():
    with pytest.raises(UserError, match="rpn_anchors"):
        get_space("nope")
