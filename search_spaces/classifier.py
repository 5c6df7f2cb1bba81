"""Slice-classifier search spaces (ForamDeepSlice, RECIPES.md section 2)."""

from ray import tune

from search_spaces import register_space


@register_space(
    "classifier",
    "timm model, lr per phase, weight decay, label smoothing, Mixup/CutMix, epochs per phase, input size",
    recipe="adrenal3d_cpu",
)
def classifier() -> dict:
    return {
        # the paper's families at the sizes a search can afford; all take any input size
        "model_name": tune.choice(
            ["resnet18", "resnet34", "efficientnetv2_rw_t", "mobilenetv3_large_100", "convnext_nano"]
        ),
        "head_lr": tune.loguniform(3e-5, 1e-3),
        "lr": tune.loguniform(1e-5, 3e-3),
        "weight_decay": tune.loguniform(1e-4, 0.1),
        "label_smoothing": tune.uniform(0.0, 0.2),
        "mixup_alpha": tune.choice([0.0, 0.2, 0.8]),
        "cutmix_alpha": tune.choice([0.0, 1.0]),
        "mix_prob": tune.uniform(0.3, 1.0),
        "head_epochs": tune.choice([0, 2, 5, 10]),
        "restart_epochs": tune.choice([0.0, 5.0, 10.0]),
        "input_size": tune.choice([64, 128, 224]),
    }
